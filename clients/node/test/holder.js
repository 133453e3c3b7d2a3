// SPDX-License-Identifier: BSD-2-Clause
//
// A child of lifecycle.js: opens a Session on DEVICE, prints its channel id
// and then, by MODE, leaves it open and
//   clientclose  calls client.close() only (the session is not closed)
//   dropped      drops every reference to it and lets it be collected
//                (the client is not closed either)
// Node must then exit on its own (lifecycle.js waits for it) and kupd free
// the channel.
'use strict';

const kup = require('../kup');

const [socketPath, device, mode] = process.argv.slice(2);

async function openAndDrop(client) {
  const s = await client.openSession(device);
  await s.receive(10000);
  console.log(`channel ${s.lease.channel}`);
  return s.lease.channel;
}

(async () => {
  const client = kup.connect(socketPath);
  if (mode === 'clientclose') {
    const s = await client.openSession(device);
    await s.receive(10000);
    console.log(`channel ${s.lease.channel}`);
    client.close();
    globalThis.held = s; // still referenced: only client.close() ends it
  } else if (mode === 'dropped') {
    await openAndDrop(client);
    for (let i = 0; i < 5; i += 1) {
      global.gc();
      await new Promise((r) => setTimeout(r, 50));
    }
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
})();
