"""{{name}}: a cim private-send handler (world `private-send`, event `private`).

The host calls `handle` with the private messages queued at that moment and carries out one
decision per message. As written it delivers every message unchanged. Build it as README.md
says.
"""

# Import every module you need here, at the top of the file: only modules imported at top
# level exist at run time. The build runs this file once and snapshots the interpreter, and a
# component has no file system to load modules from later, so `import json` inside a method
# fails with ModuleNotFoundError when the host calls it.
from typing import List

from wit_world import exports
from wit_world.imports.types import PrivateRequest, SendDecision, SendDecision_Deliver


class PrivateHandler(exports.PrivateHandler):
    def handle(self, batch: List[PrivateRequest]) -> List[SendDecision]:
        # One decision per message, in the same order. Work shared by the whole batch
        # (reading a variable, parsing a list) goes before the loop.
        return [self.decide(request) for request in batch]

    def decide(self, request: PrivateRequest) -> SendDecision:
        # Your logic here: request.message (text, sender, ...) and request.to. A decision is
        # SendDecision_Deliver(), SendDecision_Rewrite(text) or SendDecision_Reject(reason)
        # (the reason goes back to the sender). An exception fails the message: its sender
        # gets the traceback's last line.
        return SendDecision_Deliver()
