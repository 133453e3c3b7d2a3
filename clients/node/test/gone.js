// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client when kupd goes away under it (see common.js): run with
// KUPD_PID naming a kupd of the test's own and KUPD_SIGNAL SIGTERM (kupd's
// shutdown: Shutdown, kupd's answer, after the SERVER_SHUTTING_DOWN event)
// or SIGKILL (the connection breaks: Unavailable, a connection failure).
// Once kupd is gone the test writes "kupd gone" on stderr and waits for a
// line on stdin: tests/node starts a new kupd on the same socket then, and
// the same client must work with it.
'use strict';

const test = require('node:test');
const fs = require('node:fs');
const net = require('node:net');
const readline = require('node:readline');
const { assert, device, kup, kupErr, sleep, socketPath } = require('./common');

const S = kup.grpc.status;
const pid = Number(process.env.KUPD_PID);
const signal = process.env.KUPD_SIGNAL;
const killed = signal === 'SIGKILL';
// How long kupd stays away, the client calling all along ...
const OUTAGE_MS = 15000;
// ... and the most from kupd serving the path again to the first RPC it
// answers: one back-off, 1.2 s at most (8.4 s at least with gRPC's default)
const RECOVERY_BOUND_MS = 4000;

// Iterate `w` to its end: {events, sawShutdown, error} (error null: it ended quietly).
async function untilEnd(w) {
  const out = { events: 0, sawShutdown: false, error: null };
  try {
    for (;;) {
      const { value, done } = await w.next();
      if (done) break;
      out.events += 1;
      if (value.type === 'SERVER_SHUTTING_DOWN') out.sawShutdown = true;
    }
  } catch (err) {
    out.error = err;
  }
  return out;
}

// The error kupd's going away gives: Shutdown (its answer) or Unavailable
// (gRPC's: the connection broke).
function endedAsExpected(err) {
  if (killed) {
    kupErr(kup.Unavailable, null, S.UNAVAILABLE)(err);
    assert.equal(err.fromKupd, false, `${err}`);
    assert.ok(kup.isConnectionFailure(err), `${err}`);
  } else {
    kupErr(kup.Shutdown, /EKU_SHUTDOWN/, S.UNAVAILABLE)(err);
    assert.equal(err.fromKupd, true, `${err}`);
  }
  return true;
}

// Bounded: a stream kupd's end never reached fails the test instead of hanging it.
function limit(promise, ms, what) {
  let t;
  const timeout = new Promise((_, reject) => {
    t = setTimeout(() => reject(new Error(`${what} still waiting after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(t));
}

function nextLine() {
  const rl = readline.createInterface({ input: process.stdin });
  return new Promise((resolve) => rl.once('line', (line) => { rl.close(); resolve(line); }));
}

test(`kupd ended by ${signal} under a Watch, an idle Watch and a Session; it comes back`, async () => {
  assert.ok(pid > 1 && (signal === 'SIGTERM' || killed), 'KUPD_PID and KUPD_SIGNAL must be set');
  const client = kup.connect(socketPath);
  try {
    const waited = client.watch(device, { initialState: true });
    const idle = client.watch(null, { initialState: true });
    // (the streams are up: the initial state came)
    assert.equal((await waited.next()).done, false);
    assert.equal((await idle.next()).done, false);
    const s = await client.openSession(device);
    await s.receive(10000);
    await s.send('!hold'); // never answered: the receive below waits
    const receiving = s.receive(60000);
    receiving.catch(() => {});
    const watching = untilEnd(waited);
    await sleep(300);
    process.kill(pid, signal);

    const ended = await limit(watching, 60000, 'the waited Watch');
    assert.ok(ended.error, `the waited Watch ended quietly after ${ended.events} events`);
    endedAsExpected(ended.error);
    if (!killed) assert.ok(ended.sawShutdown, 'SERVER_SHUTTING_DOWN came before Shutdown');
    const endedIdle = await limit(untilEnd(idle), 60000, 'the idle Watch');
    assert.ok(endedIdle.error, `the idle Watch ended quietly after ${endedIdle.events} events`);
    endedAsExpected(endedIdle.error);
    // the stream stays ended: next() rejects with the same again, for ever
    for (let i = 0; i < 2; i += 1) {
      const again = await untilEnd(waited);
      assert.equal(again.events, 0);
      assert.ok(again.error, `the ended Watch's next() #${i + 2} ended quietly`);
      endedAsExpected(again.error);
      assert.equal(again.error.message, ended.error.message);
    }
    // the Session's waiting receive, and its later operations: the same class
    await limit(assert.rejects(receiving, endedAsExpected), 60000, 'the Session\'s receive');
    await assert.rejects(s.receive(0), endedAsExpected);
    await assert.rejects(s.send('x'), endedAsExpected);
    await s.close(); // resolves: the stream is over

    // kupd is gone (a SIGTERMed one takes a moment to exit): an RPC, and a
    // new Watch, cannot connect
    const unreachable = (err) => {
      kupErr(kup.Unavailable, null, S.UNAVAILABLE)(err);
      assert.ok(kup.isConnectionFailure(err), `${err}`);
      return true;
    };
    for (let t0 = Date.now(); ; await sleep(50)) {
      const err = await client.listDevices().then(() => null, (e) => e);
      if (err && kup.isConnectionFailure(err)) break;
      assert.ok(Date.now() - t0 < 60000, `kupd still answers 60 s after ${signal}`);
    }
    const after = client.watch();
    await assert.rejects(limit(after.next(), 60000, 'a Watch of no kupd'), unreachable);

    // A new kupd on the same socket: this client's next RPC reaches it within
    // gRPC's reconnect back-off, which is short for a local socket (at most
    // 1 s, plus jitter).  gRPC's default grows to 2 minutes: after 15 s of
    // failures the next attempt was 8 s or more away.  While kupd is away a
    // stand-in here accepts and closes each connection (a failed connect for
    // gRPC), so the outage ends right after an attempt, and what is measured
    // -- kupd serving the path to the first RPC it answers -- is one back-off,
    // not kupd's start-up nor the back-off's phase.
    fs.rmSync(socketPath, { force: true });
    let attempts = 0;
    const standIn = net.createServer((conn) => { attempts += 1; conn.destroy(); });
    await new Promise((resolve) => standIn.listen(socketPath, resolve));
    process.stderr.write('kupd gone\n');  // tests/node starts a new kupd on another path
    const ready = nextLine();
    for (const t0 = Date.now(); Date.now() - t0 < OUTAGE_MS; await sleep(200)) {
      await assert.rejects(client.listDevices(), unreachable);
    }
    assert.equal(await limit(ready, 120000, 'the new kupd'), 'ready');
    const seen = attempts;
    for (const t0 = Date.now(); attempts === seen; await sleep(10)) {
      assert.ok(Date.now() - t0 < 60000, 'the client made no connect attempt');
      await assert.rejects(client.listDevices(), unreachable);
    }
    await new Promise((resolve) => standIn.close(resolve));
    const back = nextLine();
    process.stderr.write('rename\n');  // tests/node links the new kupd's socket at this path
    assert.equal(await limit(back, 60000, 'the rename'), 'back');
    const served = Date.now();
    for (;;) {
      const err = await client.listDevices(device).then(() => null, (e) => e);
      if (!err) break;
      assert.ok(unreachable(err));
      assert.ok(Date.now() - served < 60000, 'the client never reconnected');
      await sleep(20);
    }
    const took = Date.now() - served;
    assert.ok(took < RECOVERY_BOUND_MS, `the first RPC kupd answered came ${took} ms after it `
      + `served again (bound ${RECOVERY_BOUND_MS} ms): gRPC's reconnect back-off is not bounded`);
    const [dev] = await client.listDevices(device);
    assert.equal(dev.name, device);
    const reply = await client.call(device, 'abc', { timeoutMs: 10000 });
    assert.equal(reply.data.toString().toLowerCase(), 'abc');
    const s2 = await client.openSession(device);
    assert.equal((await s2.receive(10000)).kind, 'pass');
    await s2.close();
  } finally {
    client.close();
  }
});
