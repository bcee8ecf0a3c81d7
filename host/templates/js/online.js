// {{name}}: a cim online-list handler (world `online-list`, event `online`). The host calls
// `visible` when a user asks who is online. As written everyone sees everyone. Build it with
// `npm run build` (README.md).
//
// Users are { id, name } with a BigInt id. The host's functions are imported from their
// interfaces, e.g. `import { log } from 'cim:im/log@0.2.0';`.

export const onlineHandler = {
  // The users caller may see, out of online.
  visible(caller, online) {
    // Your logic here, e.g. hide the caller: return online.filter((u) => u.id !== caller.id);
    return online;
  },
};
