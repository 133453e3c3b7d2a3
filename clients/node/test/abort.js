// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client's AbortSignal option ({signal}) on every operation that
// can wait, against a real kupd + kupsim (see common.js): a signal already
// aborted sends nothing, one aborted mid-wait cancels the operation and kupd
// lets go of what it held or waited for, a lease's aborted receive loses no
// message, and no listener is left on a signal once an operation settled.
'use strict';

const test = require('node:test');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { getEventListeners, setMaxListeners } = require('node:events');
const { assert, channelState, connectForTests, device, expectedEcho, kup, kupErr, sleep, waitState } = require('./common');

const client = connectForTests();

const S = kup.grpc.status;

const listeners = (signal) => getEventListeners(signal, 'abort').length;

// An assert.rejects predicate: the AbortError of `what` (a RegExp of its
// message) carrying `signal`'s reason.
function abortErr(signal, re) {
  return (err) => {
    kupErr(kup.AbortError, re, S.CANCELLED)(err);
    assert.equal(err.fromKupd, false);
    assert.equal(err.kupCode, 0);
    assert.equal(err.cause, signal.reason);
    return true;
  };
}

function abortedSignal(reason) {
  const ac = new AbortController();
  ac.abort(reason);
  return ac.signal;
}

async function freshSession() {
  const s = await client.openSession(device);
  await s.receive(10000); // the kernel's opening PASS: the turn is ours
  return s;
}

async function freshLease() {
  const lease = await client.attach(device);
  const first = await client.leaseReceive(lease.lease_id, 10000);
  assert.equal(first.kind, 'pass');
  return lease;
}

// Calls in flight and queued on the device
async function calls() {
  const [d] = await client.listDevices(device);
  return d;
}

test('a signal already aborted rejects at once with AbortError and its reason; nothing is sent', async () => {
  const signal = abortedSignal();
  assert.ok(signal.reason instanceof Error && signal.reason.name === 'AbortError');
  // the leases on the device before: a channel some earlier test (another
  // file's, the same kupd) left quarantined, locked by the module or leased
  // may change state meanwhile, but gets no lease of this test's
  const leases = async () => (await client.listDevices(device))[0].channels
    .filter((c) => c.lease_id).map((c) => c.lease_id);
  const before = new Set(await leases());
  const opts = { signal };
  const refused = [
    [client.call(device, 'x', { timeoutMs: 5000, signal }), /^call to echo was aborted$/],
    [kup.call(client, device, 'x', { signal }), /^call to echo was aborted$/],
    [client.listDevices(device, opts), /^listDevices was aborted$/],
    [kup.listDevices(client, device, opts), /^listDevices was aborted$/],
    [client.health('', opts), /^health was aborted$/],
    [client.attach(device, null, opts), /^attach to echo was aborted$/],
    [client.openSession(device, null, opts), /^session on echo: attach was aborted$/],
    [kup.openSession(client, device, undefined, opts), /^session on echo: attach was aborted$/],
  ];
  for (const [promise, re] of refused) await assert.rejects(promise, abortErr(signal, re));
  assert.throws(() => client.watch(device, { signal }), abortErr(signal, /^watch of echo was aborted$/));
  assert.throws(() => client.watch(null, { signal }), abortErr(signal, /^watch of every device was aborted$/));
  // no attach reached kupd: no channel is taken
  assert.deepEqual((await leases()).filter((id) => !before.has(id)), []);

  // a session's operations: refused, the session goes on as if never asked
  const s = await freshSession();
  const at = `channel ${s.lease.channel} of ${device}`;
  try {
    await assert.rejects(s.send('nope', opts), abortErr(signal, new RegExp(`^${at}: send was aborted$`)));
    await assert.rejects(s.exchange('nope', 5000, opts), abortErr(signal, new RegExp(`^${at}: exchange was aborted$`)));
    await assert.rejects(s.receive(0, opts), abortErr(signal, new RegExp(`^${at}: receive was aborted$`)));
    await assert.rejects(s.pass(opts), abortErr(signal, new RegExp(`^${at}: pass was aborted$`)));
    // nothing was sent: the turn is still ours, and the next exchange is answered
    const r = await s.exchange('yes', 10000);
    assert.deepEqual([r.seq, r.data.toString()], [2, expectedEcho(s.lease.channel, 'yes')]);
  } finally {
    await s.close();
  }

  // the lease API: the same
  const lease = await freshLease();
  const id = lease.lease_id;
  try {
    for (const [promise, re] of [
      [client.leaseSend(id, 'nope', opts), `^leaseSend on lease ${id} was aborted$`],
      [client.leaseExchange(id, 'nope', 5000, opts), `^leaseExchange on lease ${id} was aborted$`],
      [client.leaseReceive(id, undefined, opts), `^leaseReceive on lease ${id} was aborted$`],
      [client.leasePass(id, opts), `^leasePass on lease ${id} was aborted$`],
      [client.release(id, opts), `^release of lease ${id} was aborted$`],
    ]) await assert.rejects(promise, abortErr(signal, new RegExp(re)));
    const r = await client.leaseExchange(id, 'yes', 10000);
    assert.deepEqual([r.seq, r.data.toString()], [2, expectedEcho(lease.channel, 'yes')]);
  } finally {
    await client.release(id);
  }

  // the reason given to abort() is the error's cause, and named
  const why = new Error('the user left');
  const withReason = abortedSignal(why);
  await assert.rejects(client.call(device, 'x', { signal: withReason }),
    abortErr(withReason, /^call to echo was aborted: Error: the user left$/));
  const text = abortedSignal('shutting down');
  await assert.rejects(client.listDevices(undefined, { signal: text }),
    abortErr(text, /^listDevices was aborted: string 'shutting down'$/));
  const timedOut = AbortSignal.timeout(1);
  while (!timedOut.aborted) await sleep(10); // (its timer does not keep node running)
  await assert.rejects(client.health('', { signal: timedOut }),
    abortErr(timedOut, /^health was aborted: TimeoutError: /));
});

test('a bad signal or option is refused before anything is sent, naming it', async () => {
  const refused = [
    [client.call(device, 'x', { signal: {} }), TypeError, /^signal must be an AbortSignal, not object$/],
    [client.listDevices(device, { signal: 'stop' }), TypeError, /^signal must be an AbortSignal, not string 'stop'$/],
    [client.leaseReceive('L1', 0, { signal: true }), TypeError, /^signal must be an AbortSignal, not boolean$/],
    [client.attach(device, null, { sginal: null }), TypeError, /^attach: unknown option 'sginal' \(known: signal, timeoutMs\)$/],
    [client.openSession(device, null, 5), TypeError, /^openSession options must be an object, not 5$/],
    [client.health('', []), TypeError, /^health options must be an object, not array$/],
  ];
  for (const [promise, cls, re] of refused) {
    await assert.rejects(promise, (err) => {
      assert.ok(err instanceof cls, `${err} is a ${cls.name}`);
      assert.match(err.message, re);
      return true;
    });
  }
  assert.throws(() => client.watch(device, { signal: 1 }),
    { name: 'TypeError', message: /^signal must be an AbortSignal, not 1$/ });
  const s = await freshSession();
  try {
    await assert.rejects(s.receive(0, { signal: {} }),
      { name: 'TypeError', message: /^signal must be an AbortSignal, not object$/ });
    await assert.rejects(s.send('x', { timeoutMs: 5 }),
      { name: 'TypeError', message: /^send: unknown option 'timeoutMs' \(known: signal\)$/ });
    const w = client.watch(device);
    await assert.rejects(w.next({ signal: 'x' }),
      { name: 'TypeError', message: /^signal must be an AbortSignal, not string 'x'$/ });
    w.cancel();
    // (the session goes on: nothing was sent)
    const r = await s.exchange('ok', 10000);
    assert.equal(r.data.toString(), expectedEcho(s.lease.channel, 'ok'));
  } finally {
    await s.close();
  }
});

test('a Session receive or exchange aborted mid-wait rejects AbortError and ends the session; kupd frees the channel', async () => {
  for (const how of ['receive', 'exchange', 'receive with a timeout']) {
    const s = await freshSession();
    const id = s.lease.channel;
    const ac = new AbortController();
    let waiting;
    if (how === 'exchange') {
      waiting = s.exchange('!hold', undefined, { signal: ac.signal }); // never answered
    } else {
      await s.send('!hold');
      waiting = s.receive(how === 'receive' ? undefined : 60000, { signal: ac.signal });
    }
    const other = s.receive(0); // queued behind it on the stream
    await sleep(200); // (on its way to kupd, or waiting there)
    assert.equal(listeners(ac.signal), 1);
    ac.abort();
    const name = how === 'exchange' ? 'exchange' : 'receive';
    await assert.rejects(waiting, abortErr(ac.signal, new RegExp(`^channel ${id} of ${device}: ${name} was aborted$`)));
    assert.equal(listeners(ac.signal), 0);
    const ended = kupErr(kup.InvalidArgument, new RegExp(`^channel ${id} of ${device} is closed: an operation on it `
      + 'was aborted \\(use timeoutMs to keep the session\\)$'), S.INVALID_ARGUMENT);
    await assert.rejects(other, ended);
    await assert.rejects(s.send('x'), ended);
    await assert.rejects(s.receive(0), ended);
    await s.close(); // resolves: kupd let go of the lease
    assert.equal(await channelState(client, id), 'free', how);
  }
});

test('an openSession and an attach aborted while their channel is locked take no lease', async () => {
  // a channel echo's worker keeps locked after its user left: attaching it
  // waits in kupd (up to 10 s) until "!lockfree"
  const s = await freshSession();
  const id = s.lease.channel;
  await s.send('!lockhold60000');
  await s.close();
  await waitState(client, id, 'module', 30000);
  const ac = new AbortController();
  const attaching = client.attach(device, id, { signal: ac.signal });
  const opening = client.openSession(device, id, { signal: ac.signal });
  // (handled now: the aborted attach releases by its attach_id before it
  // rejects, and opening rejects meanwhile)
  opening.catch(() => {});
  await sleep(300); // (both on their way to kupd, or waiting there)
  assert.equal(listeners(ac.signal), 2);
  ac.abort();
  await assert.rejects(attaching, abortErr(ac.signal, /^attach to echo was aborted$/));
  await assert.rejects(opening, abortErr(ac.signal, /^session on echo: attach was aborted$/));
  assert.equal(listeners(ac.signal), 0);
  const r = await client.call(device, '!lockfree', { timeoutMs: 30000 });
  assert.equal(r.data.toString().toLowerCase(), '!lockfree');
  // the channel comes free, and no lease is left on it: it attaches at once
  await waitState(client, id, 'free', 30000);
  const lease = await client.attach(device, id);
  await client.release(lease.lease_id);
  // the client goes on
  const s2 = await client.openSession(device, id);
  await s2.close();
});

// echo answers "!lockhold60000 ..." only once "!lockfree" comes (or after
// 60 s): an abort before that surely comes before kupd has the message.
// (An abort as kupd writes the reply is the window docs/gateway.md names:
// kupd counts a reply it wrote before it read the cancel as delivered.)
async function lockfree() {
  const r = await client.call(device, '!lockfree', { timeoutMs: 30000 });
  assert.equal(r.data.toString().toLowerCase(), '!lockfree');
}

test('a leaseReceive aborted mid-wait leaves the lease usable and its message is not lost', async () => {
  const lease = await freshLease();
  const id = lease.lease_id;
  try {
    const text = '!lockhold60000 r';
    await client.leaseSend(id, text);
    const ac = new AbortController();
    const waiting = client.leaseReceive(id, undefined, { signal: ac.signal });
    await sleep(300); // (on its way to kupd, or waiting there)
    ac.abort();
    await assert.rejects(waiting, abortErr(ac.signal, new RegExp(`^leaseReceive on lease ${id} was aborted$`)));
    assert.equal(listeners(ac.signal), 0);
    // kupd no longer waits for the aborted receive: a non-blocking one
    // (served once kupd is done with it) finds nothing yet
    assert.equal(await client.leaseReceive(id, 0), null);
    await lockfree();
    // the module's answer is the lease's next receive's, once
    const msg = await client.leaseReceive(id, 30000);
    assert.deepEqual([msg.kind, msg.seq, msg.data.toString()], ['data', 2, expectedEcho(lease.channel, text)]);
    const r = await client.leaseExchange(id, 'next', 30000);
    assert.deepEqual([r.seq, r.data.toString()], [3, expectedEcho(lease.channel, 'next')]);
  } finally {
    await client.release(id);
  }
});

test('a leaseExchange aborted mid-wait: the reply is still owed and the next leaseReceive gets it', async () => {
  const lease = await freshLease();
  const id = lease.lease_id;
  try {
    const text = '!lockhold60000 x';
    const ac = new AbortController();
    const p = client.leaseExchange(id, text, undefined, { signal: ac.signal });
    await sleep(300);
    ac.abort();
    await assert.rejects(p, abortErr(ac.signal, new RegExp(`^leaseExchange on lease ${id} was aborted$`)));
    let resent = false;
    if (await client.leaseReceive(id, 0).catch((err) => {
      // the abort came before kupd sent it: nothing was sent, the turn is ours
      kupErr(kup.NotYourTurn)(err);
      return 'not sent';
    }) === 'not sent') {
      await client.leaseSend(id, text);
      resent = true;
    }
    await lockfree();
    const msg = await client.leaseReceive(id, 30000);
    assert.deepEqual([msg.seq, msg.data.toString()], [2, expectedEcho(lease.channel, text)], `resent: ${resent}`);
    const r = await client.leaseExchange(id, 'then', 30000);
    assert.deepEqual([r.seq, r.data.toString()], [3, expectedEcho(lease.channel, 'then')]);
  } finally {
    await client.release(id);
  }
});
test('Calls aborted on pool channels and in the queue: kupd frees them all, the client goes on', async () => {
  const [dev] = await client.listDevices(device);
  const pool = dev.channels.filter((c) => c.state === 'calls').map((c) => c.id);
  assert.ok(pool.length >= 1, 'a Call pool');
  const ac = new AbortController();
  // echo never answers !hold: these hold every pool channel, the rest queue
  const held = pool.map(() => client.call(device, '!hold', { timeoutMs: 120000, signal: ac.signal }));
  const queued = [0, 1, 2].map((i) => client.call(device, `queued ${i}`, { timeoutMs: 120000, signal: ac.signal }));
  for (const t0 = Date.now(); ; await sleep(50)) {
    const d = await calls();
    if (d.calls_queued >= queued.length && d.calls_in_flight >= pool.length + queued.length) break;
    assert.ok(Date.now() - t0 < 30000, `calls not queued: ${d.calls_in_flight} in flight, ${d.calls_queued} queued`);
  }
  assert.equal(listeners(ac.signal), held.length + queued.length);
  ac.abort(new Error('enough'));
  for (const p of [...held, ...queued]) {
    await assert.rejects(p, abortErr(ac.signal, /^call to echo was aborted: Error: enough$/));
  }
  assert.equal(listeners(ac.signal), 0);
  // kupd let go of every one: no Call in flight or queued, the pool's
  // channels back (after their quarantine)
  for (const t0 = Date.now(); ; await sleep(100)) {
    const d = await calls();
    const states = pool.map((id) => d.channels.find((c) => c.id === id).state);
    if (d.calls_in_flight === 0 && d.calls_queued === 0 && states.every((st) => st === 'calls')) break;
    assert.ok(Date.now() - t0 < 60000,
      `after 60 s: ${d.calls_in_flight} Calls in flight, ${d.calls_queued} queued, pool ${states}`);
  }
  const r = await client.call(device, 'after', { timeoutMs: 30000 });
  assert.equal(r.data.toString(), expectedEcho(r.channel, 'after'));
});

test('unary RPCs kupd does not answer (stopped) end by their abort, not their deadline', async (t) => {
  const pid = Number(process.env.KUPD_PID);
  if (!pid) {
    t.skip('KUPD_PID not set (tests/node sets it)');
    return;
  }
  await client.health(); // (connected)
  const ac = new AbortController();
  process.kill(pid, 'SIGSTOP');
  try {
    const ops = [
      [client.listDevices(device, { signal: ac.signal }), /^listDevices was aborted$/],
      [client.health('', { signal: ac.signal }), /^health was aborted$/],
      [client.call(device, 'stopped', { signal: ac.signal }), /^call to echo was aborted$/],
    ];
    await sleep(200);
    ac.abort();
    // each rejected at once, without kupd (a 30 s deadline or none otherwise)
    for (const [p, re] of ops) await assert.rejects(p, abortErr(ac.signal, re));
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  assert.equal(listeners(ac.signal), 0);
  // the client goes on, and so does kupd's Call pool
  assert.equal(await client.health(), 'SERVING');
  const r = await client.call(device, 'after', { timeoutMs: 30000 });
  assert.equal(r.data.toString(), expectedEcho(r.channel, 'after'));
  for (const t0 = Date.now(); ; await sleep(100)) {
    const d = await calls();
    if (d.calls_in_flight === 0 && d.calls_queued === 0) break;
    assert.ok(Date.now() - t0 < 30000, `${d.calls_in_flight} Calls in flight, ${d.calls_queued} queued`);
  }
});

test('a Watch\'s signal ends it with AbortError; next({signal}) gives up one wait and loses no event', async () => {
  const ac = new AbortController();
  const w = client.watch(device, { signal: ac.signal });
  assert.equal(listeners(ac.signal), 1);
  // one next() given up: the Watch goes on
  const one = new AbortController();
  const given = w.next({ signal: one.signal });
  assert.equal(listeners(one.signal), 1);
  one.abort();
  await assert.rejects(given, abortErr(one.signal, /^watch next\(\) was aborted$/));
  assert.equal(listeners(one.signal), 0);
  // its event comes to a later next(): taken and released while nobody waits
  const lease = await client.attach(device);
  await client.release(lease.lease_id);
  const ev = await w.next({ signal: abortedSignal() }).catch((err) => err);
  assert.ok(ev instanceof kup.AbortError, 'an aborted signal takes no event either');
  for (;;) {
    const { value } = await w.next({ signal: new AbortController().signal });
    if (value.lease_id === lease.lease_id) {
      assert.equal(value.type, 'LEASE_TAKEN');
      break;
    }
  }
  // the Watch's own signal: the iteration and every later next() reject
  const iterating = (async () => { for await (const e of w) if (e.type === 'CHANNELS_ANNOUNCED') break; })();
  await sleep(100);
  ac.abort();
  const ended = abortErr(ac.signal, /^watch of echo was aborted$/);
  await assert.rejects(iterating, ended);
  await assert.rejects(w.next(), ended);
  await assert.rejects(w.next(), ended);
  assert.equal(listeners(ac.signal), 0);
  // a Watch cancel()led or ended otherwise lets go of its signal too
  const ac2 = new AbortController();
  const w2 = client.watch(device, { signal: ac2.signal, initialState: true });
  assert.equal((await w2.next()).done, false);
  w2.cancel();
  assert.equal(listeners(ac2.signal), 0);
  const w3 = client.watch(device, { signal: ac2.signal, initialState: true });
  for await (const e of w3) { void e; break; } // eslint-disable-line no-unreachable-loop
  assert.equal(listeners(ac2.signal), 0);
});

// A stand-in kup.v1 server whose Receive and Attach answer their reply at
// once and their status only when the test says (served as a server stream:
// on the wire a unary client sees no difference), so that an abort can come
// between the two.
function startHeld() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kup-node-held-'));
  const socket = path.join(dir, 'held.sock');
  const server = new kup.grpc.Server();
  const kupService = kup.loadKup().Kup.service;
  const held = [];
  const streamed = (name) => ({ ...kupService[name], responseStream: true });
  server.addService({ Receive: streamed('Receive'), Attach: streamed('Attach') }, {
    Receive(call) {
      call.write({ message: { data: Buffer.from('kept'), kind: 'MESSAGE_KIND_DATA', seq: 7 } });
      held.push(call);
    },
    Attach(call) {
      call.write({ lease_id: 'L7', device: call.request.device, channel: 3, max_message_bytes: 4096 });
      held.push(call);
    },
  });
  return new Promise((resolve, reject) => {
    server.bindAsync(`unix:${socket}`, kup.grpc.ServerCredentials.createInsecure(), (err) => {
      if (err) reject(err);
      else resolve({ server, socket, dir, held });
    });
  });
}

test('an abort after kupd\'s reply reached the client does not throw the reply away', async () => {
  const fake = await startHeld();
  const c = kup.connect(fake.socket);
  try {
    for (const [method, op] of [
      ['Receive', (signal) => c.leaseReceive('L7', undefined, { signal })],
      ['Attach', (signal) => c.attach(device, 3, { signal })],
    ]) {
      const ac = new AbortController();
      // abort the moment the reply is through the client's gRPC library
      // (kupd's status not sent yet): an interceptor after the client's own
      const stub = c.stub;
      const plain = stub[method];
      stub[method] = (request, opts, cb) => plain.call(stub, request, {
        ...opts,
        interceptors: [...(opts.interceptors || []), (options, nextCall) => new kup.grpc.InterceptingCall(
          nextCall(options), {
            start(metadata, listener, next) {
              next(metadata, {
                onReceiveMessage(message, nextMessage) {
                  nextMessage(message);
                  setImmediate(() => ac.abort());
                },
              });
            },
          })],
      }, cb);
      const result = op(ac.signal).then((v) => v, (err) => err);
      try {
        while (!ac.signal.aborted) await sleep(10);
      } finally {
        stub[method] = plain;
      }
      fake.held.shift().end(); // the status, after the abort
      const got = await result;
      assert.ok(!(got instanceof Error), `${method}: ${got && got.stack}`);
      if (method === 'Receive') assert.deepEqual([got.data.toString(), got.seq], ['kept', 7]);
      else assert.deepEqual([got.lease_id, got.channel], ['L7', 3]);
      assert.equal(listeners(ac.signal), 0);
    }
  } finally {
    c.close();
    fake.server.forceShutdown();
    fs.rmSync(fake.dir, { recursive: true, force: true });
  }
});

test('one long-lived signal for 10,000 operations keeps no listener of a finished one', async () => {
  const ac = new AbortController();
  const { signal } = ac;
  // hundreds under way at once: no MaxListenersExceededWarning (the counts
  // are checked below)
  setMaxListeners(500, signal);
  const opts = { signal };
  const s = await freshSession();
  const lease = await freshLease();
  const w = client.watch(device, { signal, initialState: true });
  let done = 0;
  let peak = 0;
  const batch = async (n, op) => {
    const ps = [];
    for (let i = 0; i < n; i += 1) ps.push(op(i));
    peak = Math.max(peak, listeners(signal));
    await Promise.all(ps);
    done += n;
    // only the Watch's own, whatever the outcome was
    assert.equal(listeners(signal), 1, `after ${done} operations`);
  };
  try {
    for (let round = 0; round < 25; round += 1) {
      // a session's exchanges, in order on the stream
      // (in batches of at most 100 under way: the point is the count, not load)
      for (let k = 0; k < 2; k += 1) await batch(100, (i) => s.exchange(`s${i}`, 30000, opts));
      // calls, lease exchanges (one at a time: one turn), listDevices
      for (let k = 0; k < 2; k += 1) await batch(50, (i) => client.call(device, `c${i}`, { timeoutMs: 30000, signal }));
      for (let i = 0; i < 40; i += 1) await batch(1, () => client.leaseExchange(lease.lease_id, `l${i}`, 30000, opts));
      await batch(40, () => client.listDevices(device, opts));
      // operations that fail: kupd's errors, in-band and not
      await batch(10, () => s.receive(0, opts).then(() => assert.fail('not our turn')).catch((err) => {
        if (!(err instanceof kup.NotYourTurn)) throw err;
      }));
      await batch(10, () => assert.rejects(client.leaseReceive('no-such-lease', 0, opts), kup.NotFound));
      // the Watch's events, the lease's taken and released event
      const l2 = await client.attach(device, null, opts);
      await client.release(l2.lease_id, opts);
      done += 2;
      for (;;) {
        const e = await w.next(opts);
        done += 1;
        if (e.value.type === 'LEASE_RELEASED' && e.value.lease_id === l2.lease_id) break;
      }
    }
    assert.ok(done >= 10000, `${done} operations`);
    assert.ok(peak > 1, `${peak}: listeners while operations were under way`);
  } finally {
    w.cancel();
    await s.close();
    await client.release(lease.lease_id);
  }
  assert.equal(listeners(signal), 0);
});
