// SPDX-License-Identifier: BSD-2-Clause
//
// A Call over the tenant's calls_per_second, against a real kupd whose only
// tenant may make one Call a second or fewer (tests/node: KUPD_RATE): kupd's
// refusal is kup.ResourceExhausted with .retryAfterMs, the time until the
// tenant's next token, rounded up -- more than 0, at most one token's
// refill -- and the message says it too.
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
