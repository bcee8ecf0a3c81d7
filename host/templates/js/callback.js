// {{name}}: a cim message callback (world `message-callback`, event `callback`). The host
// calls `onDelivered` after messages were delivered, off the sender's path: a failure here
// never affects delivery. As written it does nothing. Build it with `npm run build`
// (README.md).
//
// Records are camelCase objects, u64 values are BigInts. Side effects go through the
// key-value store, e.g. `import { get, set } from 'cim:im/key-value@0.2.0';` (a store granted
// in spin.toml).

export const callbackHandler = {
  // Each item is { message, recipients }: a delivered message and the ids it went to.
  onDelivered(batch) {
    // Your logic here.
  },
};
