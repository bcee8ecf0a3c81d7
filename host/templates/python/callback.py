"""{{name}}: a cim message callback (world `message-callback`, event `callback`).

The host calls `on_delivered` after messages were delivered, off the sender's path: a failure
here never affects delivery. As written it does nothing. Build it as README.md says.
"""

# Import every module you need here, at the top of the file: only modules imported at top
# level exist at run time. The build runs this file once and snapshots the interpreter, and a
# component has no file system to load modules from later, so `import json` inside a method
# fails with ModuleNotFoundError when the host calls it.
from typing import List

from wit_world import exports
from wit_world.imports.types import Delivered


class CallbackHandler(exports.CallbackHandler):
    def on_delivered(self, batch: List[Delivered]) -> None:
        # Your logic here: each item is a delivered message and the ids it went to. Side
        # effects go through the key-value store (wit_world.imports.key_value, a store
        # granted in spin.toml).
        pass
