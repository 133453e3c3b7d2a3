// SPDX-License-Identifier: BSD-2-Clause
//
// Shared by the Node client's test files (run.js, lifecycle.js, api.js,
// errors.js, abort.js, big.js, gone.js): each is run as
//
//   node --expose-gc clients/node/test/FILE.js /path/to/kupd.sock [DEVICE]
//
// against a kupd serving the echo module (tests/node starts kupsim + kupd
// with call_timeout 2 s and runs the first five files against it; big.js
// against a kupd whose echo has 4 MiB channels, gone.js against a kupd of
// its own, which it ends).
'use strict';

const assert = require('node:assert/strict');
const kup = require('../kup');

const socketPath = process.argv[2];
const device = process.argv[3] || 'echo';
if (!socketPath) {
  console.error(`usage: node ${process.argv[1]} KUPD_SOCKET [DEVICE]`);
  process.exit(2);
}

// A client of the kupd under test for a file's tests, closed after them
// (kup.connect does not connect until the first call).
function connectForTests() {
  const client = kup.connect(socketPath);
  require('node:test').after(() => client.close());
  return client;
}

// The echo module: even channels echo, odd channels upper-case ASCII a-z.
function expectedEcho(channel, text) {
  return channel % 2 === 0 ? text : text.toUpperCase();
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function channelState(client, id) {
  const [dev] = await client.listDevices(device);
  return dev.channels.find((c) => c.id === id).state;
}

// Wait until channel `id` is in state `want` ('free', ...), at most ms.
async function waitState(client, id, want = 'free', ms = 10000) {
  const t0 = Date.now();
  for (;;) {
    const st = await channelState(client, id);
    if (st === want) return Date.now() - t0;
    if (Date.now() - t0 > ms) assert.fail(`channel ${id} still ${st} after ${ms} ms (want ${want})`);
    await sleep(50);
  }
}

// An assert.rejects / assert.throws predicate: a kup error of class `cls`
// (and gRPC code `code`) whose message matches `re`.
function kupErr(cls, re, code) {
  return (err) => {
    assert.ok(err instanceof cls, `${err && err.stack} is a ${cls.name}`);
    assert.ok(err instanceof kup.KupError && err instanceof Error);
    assert.equal(err.kupError, cls.name);
    assert.equal(err.name, cls.name);
    if (code !== undefined) assert.equal(err.code, code, `code of ${err}`);
    if (re) assert.match(err.message, re);
    assert.equal(err.details, err.message);
    return true;
  };
}

module.exports = { assert, channelState, connectForTests, device, expectedEcho, kup, kupErr, sleep, socketPath, waitState };
