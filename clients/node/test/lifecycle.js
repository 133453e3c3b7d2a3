// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client: closing and dropping sessions and clients (run with
// --expose-gc; see common.js).
'use strict';

const test = require('node:test');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { assert, channelState, connectForTests, device, expectedEcho, kup, kupErr, sleep, socketPath, waitState } = require('./common');

const client = connectForTests();

const IA = kup.grpc.status.INVALID_ARGUMENT;

test('close() resolves once kupd let go of the channel; later operations say it is closed', async () => {
  for (let i = 0; i < 3; i += 1) {
    const s = await client.openSession(device);
    const id = s.lease.channel;
    await s.receive(10000);
    await s.close();
    // free the moment close() resolved: attachable again at once
    assert.equal(await channelState(client, id), 'free', `round ${i}`);
    const closed = kupErr(kup.InvalidArgument, new RegExp(`^channel ${id} of ${device} is closed$`), IA);
    await assert.rejects(s.send('x'), closed);
    await assert.rejects(s.receive(0), closed);
    await assert.rejects(s.pass(), closed);
    await assert.rejects(s.exchange('x', 1000), closed);
    await s.close(); // twice: nothing more
    const again = await client.openSession(device, id);
    assert.equal(again.lease.channel, id);
    await again.close();
  }
});

test('client.close() ends its open sessions, watches and RPCs under way', async () => {
  const c2 = kup.connect(socketPath);
  const s = await c2.openSession(device);
  const idle = await c2.openSession(device);
  const id = s.lease.channel;
  await s.receive(10000);
  await s.send('!hold'); // never answered: the receive below waits
  const pending = s.receive();
  const lease = await c2.attach(device);
  await c2.leaseReceive(lease.lease_id, 10000);
  await c2.leaseSend(lease.lease_id, '!hold');
  const leaseWait = c2.leaseReceive(lease.lease_id); // a unary RPC under way
  const w = c2.watch(device);
  const events = (async () => { const got = []; for await (const ev of w) got.push(ev); return got; })();
  const w2 = c2.watch(device, { initialState: true }); // not iterated when the client closes
  const first = await w2.next(); // (one event, so the stream is surely open)
  await sleep(300);
  c2.close();
  await assert.rejects(pending, kupErr(kup.InvalidArgument,
    new RegExp(`^channel ${id} of ${device} was closed while the operation waited$`), IA));
  await assert.rejects(leaseWait, kupErr(kup.InvalidArgument,
    new RegExp(`^client of ${socketPath} was closed while the operation waited$`), IA));
  // a watch ends as every operation under way does (it used to end quietly)
  const whileWaited = kupErr(kup.InvalidArgument,
    new RegExp(`^client of ${socketPath} was closed while the operation waited$`), IA);
  await assert.rejects(events, whileWaited);
  await assert.rejects(w2.next(), whileWaited);
  // then it is closed, as every method of the client
  const closed = kupErr(kup.InvalidArgument, new RegExp(`^client of ${socketPath} is closed$`), IA);
  await assert.rejects(w2.next(), closed);
  await assert.rejects(w2.next(), closed);
  assert.equal(first.done, false);
  await assert.rejects(s.send('x'), kupErr(kup.InvalidArgument, /^channel \d+ of .* is closed$/, IA));
  await assert.rejects(idle.receive(0), kupErr(kup.InvalidArgument, /is closed$/, IA));
  // kupd released both sessions' channels (the stream was cancelled)
  await waitState(client, id, 'free', 5000);
  await waitState(client, idle.lease.channel, 'free', 5000);
  await client.release(lease.lease_id);
});

test('a client used after close() is InvalidArgument "client of PATH is closed"', async () => {
  const c2 = kup.connect(socketPath);
  await c2.listDevices();
  c2.close();
  c2.close(); // twice: nothing more
  const closed = kupErr(kup.InvalidArgument, new RegExp(`^client of ${socketPath} is closed$`), IA);
  await assert.rejects(c2.call(device, 'x'), closed);
  await assert.rejects(kup.call(c2, device, 'x'), closed);
  await assert.rejects(c2.listDevices(), closed);
  await assert.rejects(kup.listDevices(c2), closed);
  await assert.rejects(c2.openSession(device), closed);
  await assert.rejects(kup.openSession(c2, device), closed);
  await assert.rejects(c2.attach(device), closed);
  await assert.rejects(c2.leaseSend('l', 'x'), closed);
  await assert.rejects(c2.leaseReceive('l', 0), closed);
  await assert.rejects(c2.leaseExchange('l', 'x'), closed);
  await assert.rejects(c2.leasePass('l'), closed);
  await assert.rejects(c2.release('l'), closed);
  await assert.rejects(c2.health(), closed);
  assert.throws(() => c2.watch(device), closed);
});

test('a Session dropped without close() is cancelled when collected (its channel freed)', async () => {
  assert.equal(typeof global.gc, 'function', 'run with node --expose-gc');
  const id = await (async () => {
    const s = await client.openSession(device);
    await s.receive(10000);
    return s.lease.channel;
  })();
  assert.equal(await channelState(client, id), 'session');
  for (let i = 0; i < 5; i += 1) {
    global.gc();
    await sleep(100);
  }
  await waitState(client, id, 'free', 5000);
});

function runHolder(mode) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--expose-gc', path.join(__dirname, 'holder.js'), socketPath, device, mode],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const t0 = Date.now();
    const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, out, ms: Date.now() - t0 });
    });
  });
}

for (const mode of ['clientclose', 'dropped']) {
  test(`node exits by itself after client.close() with a session left open (${mode})`, async () => {
    const r = await runHolder(mode);
    assert.equal(r.signal, null, `node did not exit within 10 s (killed): ${r.out}`);
    assert.equal(r.code, 0, r.out);
    const m = /channel (\d+)/.exec(r.out);
    assert.ok(m, r.out);
    await waitState(client, Number(m[1]), 'free', 5000);
  });
}

// kupd stopped (SIGSTOP: it answers nothing, as a hung kupd would): an
// operation with a timeout fails after that plus the client's 5 s grace,
// not after gRPC's keepalive, and the session is ended, saying why.
test('a session operation kupd does not answer fails after its timeout plus 5 s', async (t) => {
  const pid = Number(process.env.KUPD_PID);
  if (!pid) {
    t.skip('KUPD_PID not set (tests/node sets it)');
    return;
  }
  const s = await client.openSession(device);
  const id = s.lease.channel;
  await s.receive(10000);
  const t0 = Date.now();
  process.kill(pid, 'SIGSTOP');
  try {
    await assert.rejects(s.exchange('x', 500), kupErr(kup.DeadlineExceeded,
      new RegExp(`^channel ${id} of ${device}: kupd did not answer within 5\\.5 s .*the session was ended$`),
      kup.grpc.status.DEADLINE_EXCEEDED));
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  const took = Date.now() - t0;
  assert.ok(took >= 5500 && took < 30000, `failed after ${took} ms`);
  await assert.rejects(s.send('y'), kupErr(kup.InvalidArgument,
    new RegExp(`^channel ${id} of ${device} is closed: kupd did not answer`), IA));
  await s.close();
  await waitState(client, id, 'free', 10000);
});

test('a session wait longer than Node\'s longest timer (2**31 - 1 ms) still waits', async () => {
  // the client bounds each wait by its timeout plus 5 s; a setTimeout of
  // more than 2**31 - 1 ms fires at once, which ended the session with
  // DeadlineExceeded "kupd did not answer" a millisecond into the wait
  const s = await client.openSession(device);
  const id = s.lease.channel;
  try {
    await s.receive(10000);
    await s.send('!hold'); // never answered
    let settled = null;
    const long = s.receive(2 ** 32 - 1).then(() => 'resolved', (err) => { settled = err; return err; });
    const longer = s.exchange('x', 3e9).then(() => 'resolved', (err) => err);
    await sleep(500);
    assert.equal(settled, null, `${settled}`);
    await s.close();
    const whileWaited = kupErr(kup.InvalidArgument,
      new RegExp(`^channel ${id} of ${device} was closed while the operation waited$`), IA);
    whileWaited(await long);
    whileWaited(await longer);
  } finally {
    await s.close();
  }
  await waitState(client, id, 'free', 10000);
});

test('client.close() under Calls in the pool and in its queue and a blocked lease receive: kupd frees them all', async () => {
  const c2 = kup.connect(socketPath);
  const [dev] = await client.listDevices(device);
  const pool = dev.channels.filter((c) => c.state === 'calls').map((c) => c.id);
  assert.ok(pool.length >= 1, 'a Call pool');
  // echo never answers !hold: these hold every pool channel, the rest queue
  const held = pool.map(() => c2.call(device, '!hold', { timeoutMs: 120000 }));
  const queued = [0, 1, 2].map((i) => c2.call(device, `queued ${i}`, { timeoutMs: 120000 }));
  const lease = await c2.attach(device);
  await c2.leaseReceive(lease.lease_id, 10000);
  await c2.leaseSend(lease.lease_id, '!hold');
  const receiving = c2.leaseReceive(lease.lease_id); // blocks in kupd
  for (const t0 = Date.now(); ; await sleep(50)) {
    const [d] = await client.listDevices(device);
    if (d.calls_queued >= queued.length && d.calls_in_flight >= pool.length + queued.length) break;
    assert.ok(Date.now() - t0 < 30000, `calls not queued: ${d.calls_in_flight} in flight, ${d.calls_queued} queued`);
  }
  c2.close();
  const whileWaited = kupErr(kup.InvalidArgument,
    new RegExp(`^client of ${socketPath} was closed while the operation waited$`), IA);
  for (const p of [...held, ...queued, receiving]) await assert.rejects(p, whileWaited);
  // kupd let go of every one: no Call in flight or queued, the pool's
  // channels back (after their quarantine), the lease's receive ended
  for (const t0 = Date.now(); ; await sleep(100)) {
    const [d] = await client.listDevices(device);
    const states = pool.map((id) => d.channels.find((c) => c.id === id).state);
    if (d.calls_in_flight === 0 && d.calls_queued === 0 && states.every((s) => s === 'calls')) break;
    assert.ok(Date.now() - t0 < 60000,
      `after 60 s: ${d.calls_in_flight} Calls in flight, ${d.calls_queued} queued, pool ${states}`);
  }
  const r = await client.call(device, 'after', { timeoutMs: 30000 });
  assert.equal(r.data.toString(), expectedEcho(r.channel, 'after'));
  // the lease is the one thing that outlives its client (kupd's idle
  // timeout ends it); its cancelled receive no longer waits there
  assert.equal(await client.leaseReceive(lease.lease_id, 0), null);
  await client.release(lease.lease_id);
  await waitState(client, lease.channel, 'free', 30000);
});

test('client.close() under an attach and a session attach waiting for their channel: kupd takes no lease', async () => {
  // a channel echo's worker keeps locked after its user left: attaching it
  // waits in kupd (up to 10 s) until "!lockfree"
  const s = await client.openSession(device);
  const id = s.lease.channel;
  await s.receive(10000);
  await s.send('!lockhold60000');
  await s.close();
  await waitState(client, id, 'module', 30000);
  const c2 = kup.connect(socketPath);
  const attaching = c2.attach(device, id);
  const opening = c2.openSession(device, id);
  await sleep(300); // (both on their way to kupd, or waiting there)
  c2.close();
  await assert.rejects(attaching, kupErr(kup.InvalidArgument,
    new RegExp(`^client of ${socketPath} was closed while the operation waited$`), IA));
  await assert.rejects(opening, kupErr(kup.InvalidArgument,
    new RegExp(`^session on ${device} was closed while the operation waited$`), IA));
  const r = await client.call(device, '!lockfree', { timeoutMs: 30000 });
  assert.equal(r.data.toString().toLowerCase(), '!lockfree');
  // the channel comes free, and no lease is left on it: it attaches at once
  await waitState(client, id, 'free', 30000);
  const lease = await client.attach(device, id);
  await client.release(lease.lease_id);
});
