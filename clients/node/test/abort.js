// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client's AbortSignal option ({signal}) on every operation that
// can wait, against a real kupd + kupsim (see common.js): a signal already
// aborted sends nothing, one aborted mid-wait cancels the operation and kupd
// lets go of what it held or waited for, a lease's aborted receive loses no
// message, and no listener is left on a signal once an operation settled.
'use strict';

const test = require('node:test');
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
  const [before] = await client.listDevices(device);
  const busy = before.channels.filter((c) => c.state !== 'free' && c.state !== 'calls').length;
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
  const [after] = await client.listDevices(device);
  assert.equal(after.channels.filter((c) => c.state !== 'free' && c.state !== 'calls').length, busy);

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
    abortErr(text, /^listDevices was aborted: string "shutting down"$/));
  const timedOut = AbortSignal.timeout(1);
  while (!timedOut.aborted) await sleep(10); // (its timer does not keep node running)
  await assert.rejects(client.health('', { signal: timedOut }),
    abortErr(timedOut, /^health was aborted: TimeoutError: /));
});

test('a bad signal or option is refused before anything is sent, naming it', async () => {
  const refused = [
    [client.call(device, 'x', { signal: {} }), TypeError, /^signal must be an AbortSignal, not object$/],
    [client.listDevices(device, { signal: 'stop' }), TypeError, /^signal must be an AbortSignal, not string "stop"$/],
    [client.leaseReceive('L1', 0, { signal: true }), TypeError, /^signal must be an AbortSignal, not boolean$/],
    [client.attach(device, null, { sginal: null }), TypeError, /^attach: unknown option "sginal" \(known: signal\)$/],
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
      { name: 'TypeError', message: /^send: unknown option "timeoutMs" \(known: signal\)$/ });
    const w = client.watch(device);
    await assert.rejects(w.next({ signal: 'x' }),
      { name: 'TypeError', message: /^signal must be an AbortSignal, not string "x"$/ });
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

test('a leaseReceive aborted mid-wait leaves the lease usable and its message is not lost', async () => {
  const lease = await freshLease();
  const id = lease.lease_id;
  try {
    // nothing comes (!hold): the abort ends the wait in kupd, the lease stays
    await client.leaseSend(id, '!hold');
    const ac = new AbortController();
    const waiting = client.leaseReceive(id, undefined, { signal: ac.signal });
    await sleep(300);
    ac.abort();
    await assert.rejects(waiting, abortErr(ac.signal, new RegExp(`^leaseReceive on lease ${id} was aborted$`)));
    assert.equal(await client.leaseReceive(id, 0), null); // kupd no longer waits for it
    // the module answers 300 ms after !delay: aborted at any point before
    // or as it comes, the message is the aborted receive's (the abort came
    // after the reply had reached the client) or the next receive's, once
    for (let i = 0; i < 4; i += 1) {
      const lease2 = await freshLease();
      try {
        const text = `!delay ${i}`;
        await client.leaseSend(lease2.lease_id, text);
        const ac2 = new AbortController();
        const p = client.leaseReceive(lease2.lease_id, undefined, { signal: ac2.signal });
        await sleep([0, 100, 290, 310][i]);
        ac2.abort();
        const got = await p.catch((err) => {
          abortErr(ac2.signal, /was aborted$/)(err);
          return null;
        });
        const msg = got || await client.leaseReceive(lease2.lease_id, 30000);
        assert.deepEqual([msg.kind, msg.seq, msg.data.toString()], ['data', 2, expectedEcho(lease2.channel, text)]);
        // and only once: the turn is ours again
        assert.equal(listeners(ac2.signal), 0);
        const r = await client.leaseExchange(lease2.lease_id, 'next', 30000);
        assert.deepEqual([r.seq, r.data.toString()], [3, expectedEcho(lease2.channel, 'next')]);
      } finally {
        await client.release(lease2.lease_id);
      }
    }
  } finally {
    await client.release(id);
  }
});

// kupd stopped (SIGSTOP) while the module's reply arrives and the client
// aborts: when kupd runs again, both the cancel and the channel's wake-up
// are pending, and it may take the message for the aborted receive; it
// keeps it for the lease's next receive.
test('a leaseReceive aborted as the message arrives (kupd stopped): the next receive gets it', async (t) => {
  const pid = Number(process.env.KUPD_PID);
  if (!pid) {
    t.skip('KUPD_PID not set (tests/node sets it)');
    return;
  }
  for (let i = 0; i < 3; i += 1) {
    const lease = await freshLease();
    try {
      const text = `!lockhold800 ${i}`; // answered 0.8 s later
      await client.leaseSend(lease.lease_id, text);
      const ac = new AbortController();
      const p = client.leaseReceive(lease.lease_id, undefined, { signal: ac.signal });
      const outcome = p.then(() => 'resolved', (err) => err);
      await sleep(300); // (the Receive on its way to kupd, or waiting there)
      process.kill(pid, 'SIGSTOP');
      try {
        await sleep(1500); // the module answers meanwhile
        ac.abort();
        // Node writes the cancel (RST_STREAM) from its event loop: let it
        // reach kupd's socket before kupd runs again (a cancel kupd sees
        // only after writing the reply cannot keep the message: gateway.md)
        await sleep(1000);
      } finally {
        process.kill(pid, 'SIGCONT');
      }
      const got = await outcome;
      abortErr(ac.signal, /was aborted$/)(got);
      const msg = await client.leaseReceive(lease.lease_id, 30000);
      assert.deepEqual([msg.seq, msg.data.toString()], [2, expectedEcho(lease.channel, text)], `try ${i}`);
    } finally {
      await client.release(lease.lease_id);
    }
  }
});

test('a leaseExchange aborted mid-wait: the reply is still owed and the next leaseReceive gets it', async () => {
  const lease = await freshLease();
  try {
    const ac = new AbortController();
    const p = client.leaseExchange(lease.lease_id, '!lockhold1000 x', undefined, { signal: ac.signal });
    await sleep(300);
    ac.abort();
    const got = await p.catch((err) => {
      abortErr(ac.signal, new RegExp(`^leaseExchange on lease ${lease.lease_id} was aborted$`))(err);
      return null;
    });
    let msg = got;
    if (!msg) {
      try {
        msg = await client.leaseReceive(lease.lease_id, 30000);
      } catch (err) {
        // the abort came before kupd sent it: nothing was sent
        kupErr(kup.NotYourTurn)(err);
        msg = await client.leaseExchange(lease.lease_id, '!lockhold1000 x', 30000);
      }
    }
    assert.deepEqual([msg.seq, msg.data.toString()], [2, expectedEcho(lease.channel, '!lockhold1000 x')]);
    const r = await client.leaseExchange(lease.lease_id, 'then', 30000);
    assert.equal(r.data.toString(), expectedEcho(lease.channel, 'then'));
  } finally {
    await client.release(lease.lease_id);
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
  let ops;
  try {
    ops = [
      [client.listDevices(device, { signal: ac.signal }), /^listDevices was aborted$/],
      [client.health('', { signal: ac.signal }), /^health was aborted$/],
      [client.attach(device, null, { signal: ac.signal }), /^attach to echo was aborted$/],
    ];
    await sleep(200);
    ac.abort();
    // each rejected at once, without kupd (a 30 s deadline otherwise)
    for (const [p, re] of ops) await assert.rejects(p, abortErr(ac.signal, re));
    // the cancels (RST_STREAM) reach kupd's socket before kupd runs again:
    // Node writes them from its event loop (see the receive test above)
    await sleep(1000);
  } finally {
    process.kill(pid, 'SIGCONT');
  }
  assert.equal(listeners(ac.signal), 0);
  assert.equal(await client.health(), 'SERVING');
  // the aborted attach left no lease (kupd saw its caller gone, or never
  // granted it): every channel but the pool's comes back free
  for (const t0 = Date.now(); ; await sleep(100)) {
    const [d] = await client.listDevices(device);
    const taken = d.channels.filter((c) => c.state === 'lease');
    if (taken.length === 0) break;
    assert.ok(Date.now() - t0 < 30000, `leases left: ${JSON.stringify(taken)}`);
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
      await batch(200, (i) => s.exchange(`s${i}`, 30000, opts));
      // calls, lease exchanges (one at a time: one turn), listDevices
      await batch(100, (i) => client.call(device, `c${i}`, { timeoutMs: 30000, signal }));
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
