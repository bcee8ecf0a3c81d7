"""{{name}}: a cim login handler (world `login`, event `login`).

The host calls `login` once per login, after it has refused invalid ids and duplicate logins
itself. As written it accepts everyone. Build it as README.md says.
"""

# Import every module you need here, at the top of the file: only modules imported at top
# level exist at run time. The build runs this file once and snapshots the interpreter, and a
# component has no file system to load modules from later, so `import json` inside a method
# fails with ModuleNotFoundError when the host calls it.
from wit_world import exports
from wit_world.imports.types import LoginDecision, LoginDecision_Accept, LoginRequest


class LoginHandler(exports.LoginHandler):
    def login(self, req: LoginRequest) -> LoginDecision:
        # Your logic here: req.user (id, name), req.claims (the verified token's claims; None
        # when the host verifies no tokens). Return LoginDecision_Accept() or
        # LoginDecision_Reject(reason): the client gets the reason and is disconnected.
        return LoginDecision_Accept()
