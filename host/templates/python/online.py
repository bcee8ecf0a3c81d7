"""{{name}}: a cim online-list handler (world `online-list`, event `online`).

The host calls `visible` when a user asks who is online. As written everyone sees everyone.
Build it as README.md says.
"""

# Import every module you need here, at the top of the file: only modules imported at top
# level exist at run time. The build runs this file once and snapshots the interpreter, and a
# component has no file system to load modules from later, so `import json` inside a method
# fails with ModuleNotFoundError when the host calls it.
from typing import List

from wit_world import exports
from wit_world.imports.types import User


class OnlineHandler(exports.OnlineHandler):
    def visible(self, caller: User, online: List[User]) -> List[User]:
        # Your logic here: the users caller may see, out of online. E.g. hide the caller:
        # return [u for u in online if u.id != caller.id]
        return online
