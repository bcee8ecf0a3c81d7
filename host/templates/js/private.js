// {{name}}: a cim private-send handler (world `private-send`, event `private`). The host calls
// `handle` with the private messages queued at that moment and carries out one decision per
// message. As written it delivers every message unchanged. Build it with `npm run build`
// (README.md).
//
// Records are camelCase objects, u64 values are BigInts, variants are `{ tag, val }`. The
// host's functions are imported from their interfaces, e.g.
// `import { log } from 'cim:im/log@0.2.0';` or `import { get } from 'cim:im/variables@0.2.0';`.

export const privateHandler = {
  // One decision per message, in the same order.
  handle(batch) {
    return batch.map((request) => decide(request));
  },
};

// { tag: 'deliver' }, { tag: 'rewrite', val: text } or { tag: 'reject', val: reason } (the
// reason goes back to the sender). request.message has text, sender, ...; request.to the
// receiver's id.
function decide(request) {
  // Your logic here, e.g.:
  // if (request.message.text.includes('spam')) return { tag: 'reject', val: 'no spam, please' };
  return { tag: 'deliver' };
}
