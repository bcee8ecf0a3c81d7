"""{{name}}: a cim group-send handler (world `group-send`, event `group`).

The host calls `handle` with the group messages queued at that moment and carries out one
decision per message. As written it delivers every message unchanged to everyone online but
its sender. Build it as README.md says.
"""

# Import every module you need here, at the top of the file: only modules imported at top
# level exist at run time. The build runs this file once and snapshots the interpreter, and a
# component has no file system to load modules from later, so `import json` inside a method
# fails with ModuleNotFoundError when the host calls it.
from typing import List

from wit_world import exports
from wit_world.imports.types import (
    GroupDecision,
    Message,
    Recipients_AllOnlineExceptSender,
    SendDecision_Deliver,
)


class GroupHandler(exports.GroupHandler):
    def handle(self, batch: List[Message]) -> List[GroupDecision]:
        # One decision per message, in the same order. Work shared by the whole batch
        # (reading a variable, parsing a list) goes before the loop.
        return [self.decide(message) for message in batch]

    def decide(self, message: Message) -> GroupDecision:
        # Your logic here. A decision is SendDecision_Deliver(), SendDecision_Rewrite(text) or
        # SendDecision_Reject(reason) (the reason goes back to the sender); recipients are
        # Recipients_AllOnlineExceptSender() or Recipients_Only([ids]). An exception fails the
        # message: its sender gets the traceback's last line.
        return GroupDecision(SendDecision_Deliver(), Recipients_AllOnlineExceptSender())
