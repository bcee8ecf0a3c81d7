// {{name}}: a cim login handler (world `login`, event `login`). The host calls `login` once
// per login, after it has refused invalid ids and duplicate logins itself. As written it
// accepts everyone. Build it with `npm run build` (README.md).
//
// Records are camelCase objects, u64 values are BigInts, variants are `{ tag, val }`. The
// host's functions are imported from their interfaces, e.g.
// `import { log } from 'cim:im/log@0.2.0';` or `import { get } from 'cim:im/variables@0.2.0';`.

export const loginHandler = {
  // { tag: 'accept' } or { tag: 'reject', val: reason }: the client gets the reason and is
  // disconnected. req.user is { id, name }, req.claims the verified token's claims (undefined
  // when the host verifies no tokens).
  login(req) {
    // Your logic here, e.g.:
    // if (req.user.id > 1000n) return { tag: 'reject', val: `user ${req.user.id} may not log in here` };
    return { tag: 'accept' };
  },
};
