// SPDX-License-Identifier: BSD-2-Clause
//
// A Call over the tenant's calls_per_second, against a real kupd whose only
// tenant may make one Call a second or fewer (tests/node: KUPD_RATE): kupd's
// refusal is kup.ResourceExhausted with .retryAfterMs, the time until the
// tenant's next token, rounded up -- more than 0, at most one token's
// refill -- and the message says it too.  The same tenant's Session and
// lease operations are held to one each 5 s or fewer (KUPD_OPS_RATE): one
// refused for it says when to retry as well, in-band on a Session as in a
// unary lease RPC's status.
'use strict';

const test = require('node:test');
const { assert, device, kup, socketPath } = require('./common');

test('a Call over calls_per_second says when to retry', async () => {
  const rate = Number(process.env.KUPD_RATE);
  assert.ok(rate > 0 && rate <= 1, `KUPD_RATE=${process.env.KUPD_RATE}`);
  const client = kup.connect(socketPath);
  try {
    await client.call(device, 'one'); // the burst's one token
    const err = await client.call(device, 'two').then(
      () => { throw new Error('the second Call was admitted'); },
      (e) => e);
    assert.ok(err instanceof kup.ResourceExhausted, String(err));
    assert.ok(err.fromKupd);
    assert.ok(Number.isInteger(err.retryAfterMs), String(err.retryAfterMs));
    assert.ok(err.retryAfterMs > 0 && err.retryAfterMs <= Math.ceil(1000 / rate), String(err.retryAfterMs));
    assert.match(err.message, /rule calls_per_second: .* retry in .* at the earliest/);
  } finally {
    client.close();
  }
});

// kupd's longest wait for a turn (kupd.policy.PACE_LIMIT): an operation
// whose turn is further off than that is refused, not made to wait.
const PACE_LIMIT_MS = 5000;

test('an operation over channel_ops_per_second says when to retry', async () => {
  const rate = Number(process.env.KUPD_OPS_RATE);
  assert.ok(rate > 0 && rate <= 1000 / (2 * PACE_LIMIT_MS), `KUPD_OPS_RATE=${process.env.KUPD_OPS_RATE}`);
  const turn = Math.ceil(1000 / rate); // the wait after the burst's one operation
  const refused = async (op, most, what) => {
    const err = await op().then(
      () => { throw new Error(`${what} was admitted`); },
      (e) => e);
    assert.ok(err instanceof kup.ResourceExhausted, `${what}: ${err && err.stack}`);
    assert.ok(err.fromKupd, what);
    assert.ok(Number.isInteger(err.retryAfterMs), `${what}: ${err.retryAfterMs}`);
    assert.ok(err.retryAfterMs > 0 && err.retryAfterMs <= most, `${what}: ${err.retryAfterMs} > ${most}`);
    assert.match(err.message, /rule channel_ops_per_second: .* retry in .* at the earliest/, what);
  };
  const client = kup.connect(socketPath);
  try {
    const s = await client.openSession(device);
    try {
      await s.receive(0); // the burst's one operation
      // in-band: a non-blocking one's whole wait; a blocking one's less
      // what it may wait (kupd's limit, its timeout being longer)
      await refused(() => s.receive(0), turn, 'a non-blocking Session receive');
      await refused(() => s.exchange('soon', 30000), turn - PACE_LIMIT_MS, 'a Session exchange');
    } finally {
      await s.close();
    }
    // a unary lease RPC: the status's kup-retry-after-ms
    const lease = await client.attach(device);
    try {
      await refused(() => client.leaseReceive(lease.lease_id, 0), turn, 'a non-blocking leaseReceive');
    } finally {
      await client.release(lease.lease_id);
    }
  } finally {
    client.close();
  }
});
