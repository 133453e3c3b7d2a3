// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client with messages of 4 MiB, the largest a KUP channel carries
// (KUP_MAX_PAGES pages of 4 KiB) and as large as gRPC's default message
// limit, which the envelope takes them past: run against a kupd whose echo
// has channels that large (tests/node starts one; see common.js).
'use strict';

const test = require('node:test');
const { assert, connectForTests, device, kup, kupErr, waitState } = require('./common');

const client = connectForTests();
const S = kup.grpc.status;
const T = 60000; // generous: 4 MiB each way on a shared machine

test('4 MiB through a Call, a Session and a lease; one byte more is TooBig naming the limit', async () => {
  const [dev] = await client.listDevices(device);
  const max = dev.max_message_bytes;
  assert.equal(max, 4 * 1024 * 1024);
  const big = Buffer.alloc(max, 0x2e); // '.' is the same on every channel
  const over = Buffer.alloc(max + 1, 0x2e);
  const r = await client.call(device, big, { timeoutMs: T });
  assert.ok(r.data.equals(big), `a Call's reply of ${r.data.length} bytes`);
  // one more: TooBig naming the limit (the client's own: 4 MiB is also
  // kup.MAX_PAYLOAD, the most any KUP message carries)
  const tooBig = kupErr(kup.TooBig, new RegExp(`^data of ${max + 1} bytes is larger than any message `
    + `kupd carries \\(${max} bytes`), S.INVALID_ARGUMENT);
  await assert.rejects(client.call(device, over, { timeoutMs: T }), tooBig);

  const s = await client.openSession(device);
  const id = s.lease.channel;
  try {
    assert.equal(s.lease.max_message_bytes, max);
    await s.receive(T);
    const m = await s.exchange(big, T);
    assert.ok(m.data.equals(big), `a Session's reply of ${m.data.length} bytes`);
    assert.equal(m.seq, 2);
    // one more: the client's TooBig, naming the channel's limit; nothing sent
    const refused = kupErr(kup.TooBig, new RegExp(`^message of ${max + 1} bytes exceeds `
      + `max_message_bytes=${max} of channel ${id} of device ${device} \\(the channel's data area\\)$`),
    S.INVALID_ARGUMENT);
    await assert.rejects(s.exchange(over, T), refused);
    await assert.rejects(s.send(over), refused);
    const again = await s.exchange(big, T); // the session goes on
    assert.deepEqual([again.seq, again.data.equals(big)], [3, true]);
  } finally {
    await s.close();
  }
  await waitState(client, id, 'free', 30000);

  const lease = await client.attach(device);
  try {
    await client.leaseReceive(lease.lease_id, T);
    const l = await client.leaseExchange(lease.lease_id, big, T);
    assert.ok(l.data.equals(big), `a lease's reply of ${l.data.length} bytes`);
    await assert.rejects(client.leaseSend(lease.lease_id, over), tooBig);
    await assert.rejects(client.leaseExchange(lease.lease_id, over, T), tooBig);
    const l2 = await client.leaseExchange(lease.lease_id, big, T);
    assert.deepEqual([l2.seq, l2.data.equals(big)], [3, true]);
  } finally {
    await client.release(lease.lease_id);
  }
});
