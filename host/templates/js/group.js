// {{name}}: a cim group-send handler (world `group-send`, event `group`). The host calls
// `handle` with the group messages queued at that moment and carries out one decision per
// message. As written it delivers every message unchanged to everyone online but its sender.
// Build it with `npm run build` (README.md).
//
// Records are camelCase objects, u64 values are BigInts, variants are `{ tag, val }`. The
// host's functions are imported from their interfaces, e.g.
// `import { log } from 'cim:im/log@0.2.0';` or `import { get } from 'cim:im/variables@0.2.0';`.

export const groupHandler = {
  // One decision per message, in the same order.
  handle(batch) {
    return batch.map((message) => decide(message));
  },
};

// What to do with the message — { tag: 'deliver' }, { tag: 'rewrite', val: text } or
// { tag: 'reject', val: reason } (the reason goes back to the sender) — and who gets it:
// { tag: 'all-online-except-sender' } or { tag: 'only', val: [ids as BigInt] }.
function decide(message) {
  // Your logic here, e.g. shout: decision: { tag: 'rewrite', val: message.text.toUpperCase() }
  return {
    decision: { tag: 'deliver' },
    recipients: { tag: 'all-online-except-sender' },
  };
}
