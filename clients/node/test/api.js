// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client's API beyond Session + Call: listDevices' results,
// Session.exchange, the lease API, watch and health (see common.js).
'use strict';

const test = require('node:test');
const { assert, channelState, connectForTests, device, expectedEcho, kup, kupErr, sleep, socketPath, waitState } = require('./common');

const client = connectForTests();

test('listDevices: plain objects with the Python client\'s field names and state strings', async () => {
  const all = await client.listDevices();
  const names = all.map((d) => d.name);
  assert.deepEqual((await client.listDevices(null)).map((d) => d.name), names); // null / '': every device
  assert.deepEqual((await client.listDevices('')).map((d) => d.name), names);
  const dev = all.find((d) => d.name === device);
  assert.ok(dev, `device ${device}`);
  assert.deepEqual(Object.keys(dev).sort(), [
    'abi_version', 'announced', 'call_channels', 'calls_in_flight', 'calls_queued', 'calls_tenant',
    'cannot_attach', 'channel_count', 'channels', 'drained', 'error', 'max_message_bytes', 'name', 'not_answering_ms',
    'notify_gen', 'page_size', 'pages_per_channel', 'reachable', 'shutting_down',
  ]);
  assert.equal(dev.not_answering_ms, 0); // its host answers
  assert.equal(dev.cannot_attach, false); // and its node is there
  assert.equal(typeof dev.max_message_bytes, 'number');
  assert.equal(typeof dev.notify_gen, 'number');
  assert.equal(dev.drained, false);
  assert.equal(dev.channels.length, dev.channel_count);
  assert.deepEqual(Object.keys(dev.channels[0]).sort(), ['id', 'lease_id', 'state']);
  const states = new Set(dev.channels.map((c) => c.state));
  assert.ok(states.has('calls') && states.has('free'), [...states].join());
  for (const st of states) {
    assert.ok(['free', 'session', 'lease', 'calls', 'quarantined', 'external', 'module', 'not_announced'].includes(st), st);
  }
  const s = await client.openSession(device);
  try {
    const [d2] = await client.listDevices(device);
    const ch = d2.channels.find((c) => c.id === s.lease.channel);
    assert.deepEqual(ch, { id: s.lease.channel, state: 'session', lease_id: s.lease.lease_id });
  } finally {
    await s.close();
  }
  await assert.rejects(client.listDevices('no-such-device'), kupErr(kup.NotFound, /no-such-device/));
});

test('Session.exchange: send + receive as one request', async () => {
  const s = await client.openSession(device);
  try {
    assert.deepEqual(Object.keys(s.lease).sort(), ['channel', 'device', 'idle_timeout_ms', 'lease_id', 'max_message_bytes']);
    const first = await s.receive(10000);
    assert.equal(first.kind, 'pass');
    const r = await s.exchange('exchange me', 10000);
    assert.deepEqual([r.kind, r.seq, r.data.toString()], ['data', 2, expectedEcho(s.lease.channel, 'exchange me')]);
    const r2 = await s.exchange(Buffer.from([1, 2, 3])); // blocking
    assert.deepEqual([...r2.data], [1, 2, 3]);
    assert.equal(r2.seq, 3);
    // a wait that fails leaves the data sent and the reply owed: receive gets it
    await assert.rejects(s.exchange('!delay', 50), kupErr(kup.DeadlineExceeded, null, kup.grpc.status.DEADLINE_EXCEEDED));
    const late = await s.receive(5000);
    assert.equal(late.data.toString(), expectedEcho(s.lease.channel, '!delay'));
    // 0: does not wait, null when the reply is not there yet
    assert.equal(await s.exchange('!delay', 0), null);
    assert.equal((await s.receive(5000)).data.toString(), expectedEcho(s.lease.channel, '!delay'));
    // refused before the wire: TooBig, NotYourTurn in-band; the session goes on
    await assert.rejects(s.exchange(Buffer.alloc(s.lease.max_message_bytes + 1)), kupErr(kup.TooBig, /exceeds max_message_bytes=\d+ of channel/));
    await s.send('x');
    await assert.rejects(s.exchange('y', 1000), kupErr(kup.NotYourTurn, null, kup.grpc.status.FAILED_PRECONDITION));
    assert.equal((await s.receive(5000)).data.toString(), expectedEcho(s.lease.channel, 'x'));
    await assert.rejects(s.exchange(null), /data must be/);
    await assert.rejects(s.exchange('x', -1), /timeoutMs must be/);
  } finally {
    await s.close();
  }
});

test('leases: attach, leaseReceive, leaseSend, leaseExchange, leasePass, release', async () => {
  const lease = await client.attach(device);
  assert.deepEqual(Object.keys(lease).sort(), ['channel', 'device', 'idle_timeout_ms', 'lease_id', 'max_message_bytes']);
  assert.equal(lease.device, device);
  assert.ok(lease.idle_timeout_ms > 0);
  const id = lease.lease_id;
  assert.equal(await channelState(client, lease.channel), 'lease');
  const first = await client.leaseReceive(id, 10000);
  assert.deepEqual([first.kind, first.seq], ['pass', 1]);
  await assert.rejects(client.leaseReceive(id, 0), kupErr(kup.NotYourTurn)); // already taken
  await client.leaseSend(id, 'lease text');
  const r = await client.leaseReceive(id); // blocking
  assert.deepEqual([r.kind, r.seq, r.data.toString()], ['data', 2, expectedEcho(lease.channel, 'lease text')]);
  const x = await client.leaseExchange(id, 'one rpc', 10000);
  assert.deepEqual([x.seq, x.data.toString()], [3, expectedEcho(lease.channel, 'one rpc')]);
  assert.equal((await client.leaseExchange(id, new Uint8Array([7, 8]))).data.length, 2);
  // 0: null when nothing is there yet; a failed wait leaves the reply owed
  await client.leaseSend(id, '!delay');
  assert.equal(await client.leaseReceive(id, 0), null);
  assert.equal((await client.leaseReceive(id, 5000)).data.toString(), expectedEcho(lease.channel, '!delay'));
  assert.equal(await client.leaseExchange(id, '!delay', 0), null);
  assert.equal((await client.leaseReceive(id, 5000)).seq, 6);
  await assert.rejects(client.leaseExchange(id, '!delay', 50), kupErr(kup.DeadlineExceeded));
  assert.equal((await client.leaseReceive(id, 5000)).seq, 7);
  await client.leasePass(id);
  assert.equal((await client.leaseReceive(id, 5000)).kind, 'pass');
  // someone else's channel: Busy
  await assert.rejects(client.attach(device, lease.channel), kupErr(kup.Busy, null, kup.grpc.status.FAILED_PRECONDITION));
  await assert.rejects(client.openSession(device, lease.channel), kupErr(kup.Busy));
  await client.release(id);
  await waitState(client, lease.channel, 'free');
  await assert.rejects(client.leaseSend(id, 'x'), kupErr(kup.NotFound, new RegExp(id), kup.grpc.status.NOT_FOUND));
  await assert.rejects(client.release(id), kupErr(kup.NotFound));
  // arguments
  await assert.rejects(client.leaseSend('', 'x'), { name: 'TypeError', message: /lease id must be a non-empty string, not ''/ });
  await assert.rejects(client.leasePass(7), { name: 'TypeError', message: /lease id must be a non-empty string, not 7/ });
  await assert.rejects(client.leaseReceive(id, 'soon'), { name: 'TypeError', message: /timeoutMs/ });
  await assert.rejects(client.attach(device, -1), { name: 'RangeError' });
});

test('watch: initial state, lease events, cancel() and break end it', async () => {
  const w = client.watch(device, { initialState: true });
  const got = [];
  const done = (async () => {
    for await (const ev of w) {
      got.push(ev);
    }
  })();
  await sleep(300);
  const s = await client.openSession(device);
  const ch = s.lease.channel;
  await s.close();
  for (let i = 0; i < 50 && !got.some((e) => e.type === 'LEASE_RELEASED' && e.channel === ch); i += 1) await sleep(50);
  w.cancel();
  await done; // cancel() ends the iteration
  const initial = got.filter((e) => e.initial);
  assert.ok(initial.length >= 1 && initial[0].type === 'DEVICE_APPEARED', JSON.stringify(got[0]));
  assert.equal(initial[0].device, device);
  const taken = got.find((e) => e.type === 'LEASE_TAKEN' && e.channel === ch);
  const released = got.find((e) => e.type === 'LEASE_RELEASED' && e.channel === ch);
  assert.ok(taken && released, JSON.stringify(got));
  assert.equal(taken.holder, 'session');
  assert.equal(taken.lease_id, s.lease.lease_id);
  assert.equal(typeof taken.time_unix_ms, 'number');
  assert.deepEqual(Object.keys(taken).sort(), ['announced', 'channel', 'device', 'holder', 'initial', 'lease_id',
    'notify_gen', 'reason', 'time_unix_ms', 'type']);
  // break out of for await: the watch is cancelled
  const w2 = client.watch(null, { initialState: true });
  for await (const ev of w2) {
    assert.equal(ev.initial, true);
    break;
  }
  assert.deepEqual(await w2.next(), { value: undefined, done: true });
  assert.throws(() => client.watch(device, { initial_state: true }), /unknown option 'initial_state'/);
  assert.throws(() => client.watch(5), /device must be a string, not 5/);
  assert.throws(() => client.watch(device, { initialState: 1 }), /initialState must be a boolean/);
});

test('watch on an unknown device fails through the same errors', async () => {
  const w = client.watch('no-such-device');
  const notFound = kupErr(kup.NotFound, /no-such-device/, kup.grpc.status.NOT_FOUND);
  await assert.rejects(w.next(), notFound);
  // ended by that error: every later next() rejects with it too, never a quiet end
  await assert.rejects(w.next(), notFound);
  await assert.rejects(w.next(), notFound);
});

test('health: SERVING for kupd and its device, NotFound for an unknown service', async () => {
  assert.equal(await client.health(), 'SERVING');
  assert.equal(await client.health('kup.v1.Kup'), 'SERVING');
  assert.equal(await client.health(`kup.v1.Kup/${device}`), 'SERVING');
  await assert.rejects(client.health('no.such.Service'), kupErr(kup.NotFound));
  await assert.rejects(client.health(5), { name: 'TypeError', message: /service must be a string/ });
});

test('hundreds of Calls and Sessions at once from one client: every reply is its request\'s', async () => {
  const [dev] = await client.listDevices(device);
  const calls = Array.from({ length: 400 }, (_, i) => `call ${i} of many`);
  // (generous timeouts: 400 Calls queue for kupd's few pool channels)
  const replies = await Promise.all(calls.map((t) => client.call(device, t, { timeoutMs: 120000 })));
  replies.forEach((r, i) => {
    assert.equal(r.kind, 'data', `call ${i}`);
    assert.equal(r.data.toString(), expectedEcho(r.channel, calls[i]), `call ${i} on channel ${r.channel}`);
  });
  // sessions on most free channels at once (the pool's are not free), each a few exchanges
  const n = Math.min(100, dev.channels.filter((c) => c.state === 'free').length - 2);
  assert.ok(n >= 50, `${n} free channels`);
  const rounds = 5;
  const sessions = await Promise.all(Array.from({ length: n }, () => client.openSession(device)));
  try {
    assert.equal(new Set(sessions.map((s) => s.lease.channel)).size, n, 'each session its own channel');
    const results = await Promise.all(sessions.map(async (s, i) => {
      const got = [await s.receive(60000)];
      for (let r = 0; r < rounds; r += 1) got.push(await s.exchange(`session ${i} round ${r}`, 60000));
      return got;
    }));
    results.forEach((got, i) => {
      const ch = sessions[i].lease.channel;
      assert.equal(got[0].kind, 'pass', `session ${i}`);
      for (let r = 0; r < rounds; r += 1) {
        const m = got[r + 1];
        assert.deepEqual([m.kind, m.seq, m.data.toString()],
          ['data', r + 2, expectedEcho(ch, `session ${i} round ${r}`)], `session ${i} round ${r}`);
      }
    });
    // and the calls still go on while the sessions hold their channels
    const more = await Promise.all(calls.slice(0, 50).map((t) => client.call(device, t, { timeoutMs: 120000 })));
    more.forEach((r, i) => assert.equal(r.data.toString(), expectedEcho(r.channel, calls[i])));
  } finally {
    await Promise.all(sessions.map((s) => s.close()));
  }
  const [after] = await client.listDevices(device);
  assert.equal(after.channels.filter((c) => c.state === 'session').length, 0);
  assert.equal(after.calls_in_flight, 0);
});
