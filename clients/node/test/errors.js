// SPDX-License-Identifier: BSD-2-Clause
//
// The Node client's errors, argument checks, Call caller and timeouts (see
// common.js).  Some run against a fake kup.v1 server in this process, which
// records what the client sent and answers statuses kupd never sends
// (without kup-error metadata, as gRPC's own failures come).
'use strict';

const test = require('node:test');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { assert, device, expectedEcho, kup, kupErr, socketPath } = require('./common');

const S = kup.grpc.status;

let client;
let fake;           // {server, socket, calls: [{request, deadline}]}
let fakeClient;

function startFake() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kup-node-fake-'));
  const socket = path.join(dir, 'fake.sock');
  const calls = [];
  const server = new kup.grpc.Server();
  const md = (kind, more = {}) => {
    const m = new kup.grpc.Metadata();
    if (kind) m.set('kup-error', kind);
    for (const [k, v] of Object.entries(more)) m.set(k, v);
    return m;
  };
  const limited = (ms, kind = 'ResourceExhausted') => ({
    code: S.RESOURCE_EXHAUSTED,
    details: 'tenant t: rule calls_per_second: more than calls_per_second=2',
    metadata: md(kind, { 'kup-retry-after-ms': ms }),
  });
  // Attach records the deadline it came with and grants a lease of no
  // kupd; the rest are not implemented: UNIMPLEMENTED, as an Admin method
  // on a tenant's socket
  server.addService(kup.loadKup().Kup.service, {
    Attach(call, cb) {
      calls.push({ request: call.request, deadline: call.getDeadline() });
      cb(null, { lease_id: 'recorded', device: call.request.device, channel: call.request.channel });
    },
    Call(call, cb) {
      const text = call.request.data.toString();
      calls.push({ request: call.request, deadline: call.getDeadline() });
      const answers = {
        shutdown: { code: S.UNAVAILABLE, details: 'EKU_SHUTDOWN: device echo is shutting down' },
        gone: { code: S.UNAVAILABLE, details: 'Connection dropped' },
        internal: { code: S.INTERNAL, details: 'boom' },
        cancelled: { code: S.CANCELLED, details: 'Cancelled' },
        toolarge: { code: S.RESOURCE_EXHAUSTED, details: 'Received message larger than max (5000000 vs. 4259840)' },
        calm: { code: S.RESOURCE_EXHAUSTED, details: 'Bandwidth exhausted or memory limit exceeded' },
        releasing: { code: S.FAILED_PRECONDITION, details: 'channel 3 of echo: still releasing', metadata: md('Releasing') },
        limited: limited('340'),
        limitedmax: limited(String(Number.MAX_SAFE_INTEGER)),
        limitedzero: limited('0'),
        limitedneg: limited('-5'),
        limitedfrac: limited('1.5'),
        limitedexp: limited('1e3'),
        limitedbig: limited(String(Number.MAX_SAFE_INTEGER + 2)),
        limitednokind: limited('340', ''),
        limitednone: { code: S.RESOURCE_EXHAUSTED, details: 'limit', metadata: md('ResourceExhausted') },
      };
      if (answers[text]) cb(answers[text]);
      else cb(null, { reply: { data: call.request.data, kind: 'MESSAGE_KIND_DATA', seq: 1 }, channel: 0 });
    },
  });
  return new Promise((resolve, reject) => {
    server.bindAsync(`unix:${socket}`, kup.grpc.ServerCredentials.createInsecure(), (err) => {
      if (err) reject(err);
      else resolve({ server, socket, calls, dir });
    });
  });
}

test.before(async () => {
  client = kup.connect(socketPath);
  fake = await startFake();
  fakeClient = kup.connect(fake.socket);
});
test.after(() => {
  client.close();
  fakeClient.close();
  fake.server.forceShutdown();
  fs.rmSync(fake.dir, { recursive: true, force: true });
});

test('Calls carry caller host:pid unless one is given', async () => {
  assert.equal(fakeClient.caller, `${os.hostname()}:${process.pid}`);
  await fakeClient.call(device, 'a');
  await kup.call(fakeClient, device, 'b', { caller: 'job-7' });
  const named = kup.connect(fake.socket, { caller: 'worker 3' });
  try {
    assert.equal(named.caller, 'worker 3');
    await named.call(device, 'c');
    await named.call(device, 'd', { caller: null }); // null: the client's
  } finally {
    named.close();
  }
  assert.deepEqual(fake.calls.slice(-4).map((c) => c.request.caller),
    [`${os.hostname()}:${process.pid}`, 'job-7', 'worker 3', 'worker 3']);
  await assert.rejects(fakeClient.call(device, 'x', { caller: 42 }), { name: 'TypeError', message: /caller must be a string, not 42/ });
  await assert.rejects(fakeClient.call(device, 'x', { caller: {} }), { name: 'TypeError', message: /caller must be a string, not object/ });
  assert.throws(() => kup.connect(fake.socket, { caller: 5 }), { name: 'TypeError', message: /caller must be a string, not 5/ });
});

test('a Call without timeoutMs sends timeout_ms 0 (kupd\'s call_timeout) and has no RPC deadline', async () => {
  await fakeClient.call(device, 'x');
  let last = fake.calls[fake.calls.length - 1];
  assert.equal(last.request.timeout_ms, 0);
  assert.equal(last.deadline, Infinity);
  await fakeClient.call(device, 'x', null); // opts null: none
  await fakeClient.call(device, 'x', { timeoutMs: null });
  assert.equal(fake.calls[fake.calls.length - 1].request.timeout_ms, 0);
  // with one: that many ms to kupd, and the RPC's deadline 5 s later
  const t0 = Date.now();
  await fakeClient.call(device, 'x', { timeoutMs: 1500 });
  last = fake.calls[fake.calls.length - 1];
  assert.equal(last.request.timeout_ms, 1500);
  // (the deadline as the server reads it, t0 + 6500 ms plus the time the
  // call took to start and arrive: not exact, see
  // tests/gateway/attach_recorder.py.  The bounds tell 6.5 s from 1.5 s
  // -- no grace -- and from the grace counted twice or a 30 s default, and
  // leave seconds for a loaded machine: not a check of how fast it is)
  const left = Number(last.deadline) - t0;
  assert.ok(left > 6000 && left < 1500 + 2 * 5000, `deadline ${left} ms away`);
});

test('an attach without timeoutMs has the documented 30 s deadline; with one, that one', async () => {
  assert.equal(kup.ATTACH_DEADLINE_MS, 30000);
  // (as above, the deadline less t0 is the timeout plus the time the call
  // took to start and arrive.  Each window runs from a second under the
  // timeout to the timeout plus the 5 s grace -- a deadline that wrongly
  // added it: that tells it from the other timeout, from milliseconds
  // taken for seconds and from none, and leaves a loaded machine seconds)
  let t0 = Date.now();
  await fakeClient.attach(device, 3);
  let left = Number(fake.calls[fake.calls.length - 1].deadline) - t0;
  assert.ok(left > 29000 && left < 30000 + 5000, `deadline ${left} ms away`);
  t0 = Date.now();
  await fakeClient.attach(device, 3, { timeoutMs: 2500 });
  left = Number(fake.calls[fake.calls.length - 1].deadline) - t0;
  assert.ok(left > 1500 && left < 2500 + 5000, `deadline ${left} ms away`);
});

test('against kupd, a Call without timeoutMs waits kupd\'s call_timeout (2 s here), not a client default', async () => {
  // kupd's DeadlineExceeded names the timeout it applied ("no message
  // within 2.000s", or "no pool channel became free within ..."): no clock
  // is read (a check of the time taken, under 1.5 s for 300 ms against
  // kupd's 2 s, had a window a loaded machine could miss)
  await assert.rejects(client.call(device, '!hold'),
    kupErr(kup.DeadlineExceeded, /within 2\.000s/, S.DEADLINE_EXCEEDED));
  await assert.rejects(client.call(device, '!hold', { timeoutMs: 300 }),
    (err) => kupErr(kup.DeadlineExceeded, /within 0\.300s/, S.DEADLINE_EXCEEDED)(err) && err.fromKupd);
});

test('kup-retry-after-ms on a kupd error is .retryAfterMs; anything else is null', async () => {
  const got = async (text) => {
    try {
      await fakeClient.call(device, text);
    } catch (err) {
      assert.ok(err instanceof kup.ResourceExhausted, `${text}: ${err}`);
      return err.retryAfterMs;
    }
    throw new Error(`${text} was not refused`);
  };
  assert.equal(await got('limited'), 340);
  assert.equal(await got('limitedmax'), Number.MAX_SAFE_INTEGER);
  for (const text of ['limitedzero', 'limitedneg', 'limitedfrac', 'limitedexp', 'limitedbig',
    'limitednokind', 'limitednone']) {
    assert.equal(await got(text), null, text);
  }
  // the client's own errors carry none either
  assert.equal(new kup.TooBig('x').retryAfterMs, null);
});

test('statuses without kup-error metadata are mapped by code', async () => {
  const cases = [
    ['shutdown', kup.Shutdown, S.UNAVAILABLE, /^EKU_SHUTDOWN: device echo is shutting down$/],
    ['gone', kup.Unavailable, S.UNAVAILABLE, /^Connection dropped$/],
    ['internal', kup.SystemFailure, S.INTERNAL, /^boom$/],
    ['cancelled', kup.SystemFailure, S.CANCELLED, /^Cancelled$/],
    // gRPC's receive limit, met before kupd saw the request: TooBig, as in
    // Python and C++ (one taxonomy)
    ['toolarge', kup.TooBig, S.RESOURCE_EXHAUSTED, /larger than this socket accepts .*max_message_bytes/],
    // grpc-js's words for a stream cut by ENHANCE_YOUR_CALM: kupd closed
    // the connection (an unanswered keepalive ping), not a quota
    ['calm', kup.Unavailable, S.UNAVAILABLE, /^kupd closed the connection \(Bandwidth exhausted.*keepalive ping/],
  ];
  for (const [text, cls, code, re] of cases) {
    await assert.rejects(fakeClient.call(device, text), (err) => {
      kupErr(cls, re, code)(err);
      assert.equal(err.fromKupd, false);
      return true;
    });
  }
  await assert.rejects(fakeClient.call(device, 'gone'), (err) => kup.isConnectionFailure(err));
  // gRPC's own UNIMPLEMENTED: not served on this socket
  await assert.rejects(fakeClient.release('L1'), (err) => {
    kupErr(kup.NotFound, /does not serve that method/, S.UNIMPLEMENTED)(err);
    assert.equal(err.fromKupd, false);
    return true;
  });
  // with the metadata: that class; Releasing is a Busy
  await assert.rejects(fakeClient.call(device, 'releasing'), (err) => {
    kupErr(kup.Releasing, /still releasing/, S.FAILED_PRECONDITION)(err);
    assert.ok(err instanceof kup.Busy);
    assert.equal(err.kupCode, 1013);
    assert.equal(err.fromKupd, true);
    assert.equal(kup.isConnectionFailure(err), false);
    return true;
  });
});

test('kupd not reachable: Unavailable, a connection failure', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kup-node-none-'));
  const nowhere = kup.connect(path.join(dir, 'missing.sock'));
  try {
    const unreachable = (err) => {
      kupErr(kup.Unavailable, null, S.UNAVAILABLE)(err);
      assert.ok(kup.isConnectionFailure(err));
      assert.equal(err.fromKupd, false);
      return true;
    };
    await assert.rejects(nowhere.call(device, 'x'), unreachable);
    await assert.rejects(nowhere.listDevices(), unreachable);
    await assert.rejects(nowhere.openSession(device), unreachable);
    await assert.rejects(nowhere.attach(device), unreachable);
    await assert.rejects(nowhere.health(), unreachable);
  } finally {
    nowhere.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('kupd\'s errors are KupError subclasses with the gRPC code, the kind and the KUP_E_* code', async () => {
  await assert.rejects(client.call('no-such-device', 'x'), (err) => {
    kupErr(kup.NotFound, /no-such-device/, S.NOT_FOUND)(err);
    assert.equal(err.fromKupd, true);
    assert.equal(err.kupCode, 1009);
    assert.equal(String(err), `NotFound: ${err.message}`);
    return true;
  });
  const s = await client.openSession(device);
  try {
    await s.receive(10000);
    await assert.rejects(s.receive(0), (err) => { // in-band
      kupErr(kup.NotYourTurn, /EKU_NOTTURN/, S.FAILED_PRECONDITION)(err);
      assert.equal(err.kupCode, 1003);
      return true;
    });
    await assert.rejects(kup.openSession(client, device, s.lease.channel), kupErr(kup.Busy, null, S.FAILED_PRECONDITION));
  } finally {
    await s.close();
  }
});

test('data over any message kupd carries is TooBig before it is sent', async () => {
  const big = Buffer.alloc(kup.MAX_PAYLOAD + 1, 0x2e);
  const tooBig = kupErr(kup.TooBig, new RegExp(`^data of ${kup.MAX_PAYLOAD + 1} bytes is larger than any message kupd `
    + `carries \\(${kup.MAX_PAYLOAD} bytes, gRPC's limit\\)$`), S.INVALID_ARGUMENT);
  await assert.rejects(client.call(device, big), tooBig);
  // the client's own refusal: kupd never saw it
  await assert.rejects(client.call(device, big), (err) => err.fromKupd === false);
  await assert.rejects(client.call(device, Buffer.alloc(kup.MAX_MESSAGE + 1)), kupErr(kup.TooBig));
  const lease = await client.attach(device);
  try {
    await client.leaseReceive(lease.lease_id, 10000);
    await assert.rejects(client.leaseSend(lease.lease_id, big), tooBig);
    await assert.rejects(client.leaseExchange(lease.lease_id, big, 1000), tooBig);
    // the lease goes on: nothing was sent
    const r = await client.leaseExchange(lease.lease_id, '..', 5000);
    assert.deepEqual([r.seq, r.data.toString()], [2, '..']);
  } finally {
    await client.release(lease.lease_id);
  }
  // exactly MAX_PAYLOAD is not refused by the client (kupd answers for the channel)
  await assert.rejects(client.call(device, Buffer.alloc(kup.MAX_PAYLOAD, 0x2e)), (err) => err.fromKupd && err instanceof kup.TooBig);
});

test('argument checks: device filters, options, bigint / symbol values, buffers of every kind', async () => {
  const refused = [
    [client.listDevices(5), TypeError, /^device must be a string, not 5$/],
    [client.listDevices({}), TypeError, /^device must be a string, not object$/],
    [kup.listDevices(client, 5n), TypeError, /^device must be a string, not bigint 5n$/],
    [client.call(device, 'x', 'fast'), TypeError, /^call options must be an object, not string 'fast'$/],
    [client.call(device, 'x', { timeout: 5 }), TypeError, /unknown option 'timeout'/],
    [client.call(Symbol('x'), 'x'), TypeError, /^device must be a non-empty string, not symbol Symbol\(x\)$/],
    [client.call(5n, 'x'), TypeError, /not bigint 5n$/],
    [client.call('\ud800', 'x'), RangeError, /device must be valid UTF-8/],
    [client.openSession(device, 3n), TypeError, /^channel must be an integer or null, not bigint 3n$/],
    [client.openSession(device, true), TypeError, /not boolean$/],
    [client.call(device, 'x', { timeoutMs: 100n }), TypeError, /^timeoutMs must be a number of milliseconds, not bigint 100n$/],
    [client.call(device, 'x', { timeoutMs: Symbol('t') }), TypeError, /not symbol Symbol\(t\)$/],
    [client.call(device, [46, 46]), TypeError, /^data must be a Buffer, Uint8Array, ArrayBuffer\(View\) or string, not array$/],
    [client.call(device, 7n), TypeError, /not bigint$/],
  ];
  for (const [promise, cls, re] of refused) {
    await assert.rejects(promise, (err) => {
      assert.ok(err instanceof cls, `${err} is a ${cls.name}`);
      assert.match(err.message, re);
      return true;
    });
  }
  assert.throws(() => kup.connect(Symbol('s')), /socketPath must be a non-empty string, not symbol Symbol\(s\)/);
  assert.throws(() => kup.connect(socketPath, 'x'), /connect options must be an object/);
  await assert.rejects(kup.call({}, device, 'x'), /client must be a client made by kup.connect\(\), not object/);
  // every kind of binary data is sent as its bytes (views copied)
  const bytes = [0x2e, 0x21, 0x2e, 0x2e];
  const backing = new Uint8Array([0xff, ...bytes, 0xff]);
  const kinds = [
    ['ArrayBuffer', new Uint8Array(bytes).buffer],
    ['DataView', new DataView(backing.buffer, 1, 4)],
    ['subarray', backing.subarray(1, 5)],
    ['Uint16Array', new Uint16Array(new Uint8Array(bytes).buffer)],
    ['Int8Array', new Int8Array(bytes)],
  ];
  for (const [what, data] of kinds) {
    const r = await client.call(device, data);
    assert.deepEqual([...r.data], bytes, what);
  }
  const s = await client.openSession(device);
  try {
    await s.receive(10000);
    const r = await s.exchange(new DataView(backing.buffer, 1, 4), 5000);
    assert.deepEqual([...r.data], bytes);
    await s.send(new Uint8Array(bytes).buffer);
    assert.deepEqual([...(await s.receive(5000)).data], bytes);
    const text = await s.exchange('héllo', 5000); // a string is UTF-8
    assert.equal(text.data.toString(), expectedEcho(s.lease.channel, 'héllo'));
  } finally {
    await s.close();
  }
});

test('the lease API refuses bad arguments before anything is sent, naming them', async () => {
  // against the fake server, which serves no lease method: an argument that
  // reached the wire would come back NotFound ("does not serve that method")
  const refused = [
    [fakeClient.attach(device, -1), RangeError, /^channel must be an integer in 0\.\.4294967295 \(uint32\), not -1$/],
    [fakeClient.attach(device, 2 ** 32 + 1), RangeError, /not 4294967297$/],
    [fakeClient.attach(''), TypeError, /^device must be a non-empty string, not ''$/],
    [fakeClient.leaseSend(undefined, 'x'), TypeError, /^lease id must be a non-empty string, not undefined$/],
    [fakeClient.leaseSend('L1', undefined), TypeError, /^data must be a Buffer, .* not undefined$/],
    [fakeClient.leaseSend('L1', Buffer.alloc(kup.MAX_PAYLOAD + 1)), kup.TooBig, /larger than any message kupd carries/],
    [fakeClient.leaseReceive('L1', -5), RangeError, /^timeoutMs must be .* >= 0, not -5$/],
    [fakeClient.leaseReceive('L1', '100'), TypeError, /^timeoutMs must be a number of milliseconds, not string '100'$/],
    [fakeClient.leaseReceive('L1', 2 ** 32), RangeError, /not 4294967296$/],
    [fakeClient.leaseExchange('L1', 'x', NaN), RangeError, /not NaN$/],
    [fakeClient.leaseExchange('L1', null, 100), TypeError, /^data must be a Buffer, .* not null$/],
    [fakeClient.leaseExchange(5, 'x', 100), TypeError, /^lease id must be a non-empty string, not 5$/],
    [fakeClient.leasePass({}), TypeError, /^lease id must be a non-empty string, not object$/],
    [fakeClient.release(''), TypeError, /^lease id must be a non-empty string, not ''$/],
    [fakeClient.release('\ud800'), RangeError, /^lease id must be valid UTF-8 text \(no lone surrogates\), not '\\ud800'$/],
    // attach's timeoutMs: the RPC's deadline, > 0
    [fakeClient.attach(device, 3, { timeoutMs: -1 }), RangeError, /^timeoutMs must be .* > 0, not -1$/],
    [fakeClient.attach(device, 3, { timeoutMs: 0 }), RangeError, /> 0, not 0$/],
    [fakeClient.attach(device, 3, { timeoutMs: NaN }), RangeError, /not NaN$/],
    [fakeClient.attach(device, 3, { timeoutMs: 2 ** 32 }), RangeError, /<= 4294967295 .* not 4294967296$/],
    [fakeClient.attach(device, 3, { timeoutMs: '2000' }), TypeError, /^timeoutMs must be a number of milliseconds, not string '2000'$/],
    // receive names: up to 64 of [A-Za-z0-9_-], as kupd and every client;
    // a bad one quoted as Python's repr() and the C++ client quote it
    [fakeClient.leaseReceive('L1', 0, { receiveId: 'no spaces' }), RangeError, /^receiveId 'no spaces': only letters, digits, '_' and '-'$/],
    [fakeClient.leaseReceive('L1', 0, { receiveId: 'tab\there\\' }), RangeError, /^receiveId 'tab\\there\\\\': only letters/],
    [fakeClient.leaseReceive('L1', 0, { againOf: "it's" }), RangeError, /^againOf "it's": only letters/],
    [fakeClient.leaseReceive('L1', 0, { againOf: `it's "x"` }), RangeError, /^againOf 'it\\'s "x"': only letters/],
    [fakeClient.leaseReceive('L1', 0, { againOf: 'x'.repeat(65) }), RangeError, /^againOf of 65 characters: at most 64$/],
    // its length in characters (code points), as Python and C++ count it:
    // 64 emoji are 128 UTF-16 units, 'x' * 64 and one emoji 65 characters
    [fakeClient.leaseReceive('L1', 0, { receiveId: '\u{1F600}'.repeat(64) }), RangeError,
      new RegExp(`^receiveId '${'\u{1F600}'.repeat(64)}': only letters`, 'u')],
    [fakeClient.leaseSend('L1', 'x', { againOf: `${'x'.repeat(64)}\u{1F600}` }), RangeError,
      /^againOf of 65 characters: at most 64$/],
    [fakeClient.leaseReceive('L1', 0, { againOf: '' }), RangeError, /^againOf must not be empty/],
    [fakeClient.leaseReceive('L1', 0, { receiveId: 7 }), TypeError, /^receiveId must be a string, not 7$/],
    [fakeClient.leaseExchange('L1', 'x', 100, { receiveId: 'a/b' }), RangeError, /^receiveId 'a\/b': only letters/],
    [fakeClient.leaseExchange('L1', 'x', 100, { againOf: 'x'.repeat(65) }), RangeError, /^againOf of 65 characters/],
    [fakeClient.leaseSend('L1', 'x', { againOf: 'no spaces' }), RangeError, /^againOf 'no spaces': only letters/],
    [fakeClient.leaseSend('L1', 'x', { receiveId: 'x' }), TypeError, /^leaseSend: unknown option 'receiveId' \(known: signal, againOf\)$/],
    [fakeClient.leasePass('L1', { againOf: '' }), RangeError, /^againOf must not be empty/],
  ];
  for (const [promise, cls, re] of refused) {
    await assert.rejects(promise, (err) => {
      assert.ok(err instanceof cls, `${err} is a ${cls.name}`);
      assert.match(err.message, re);
      return true;
    });
  }
  assert.throws(() => fakeClient.watch(device, { initialState: 'yes' }),
    { name: 'TypeError', message: /^initialState must be a boolean, not string 'yes'$/ });
  // (and a good one does reach it)
  await assert.rejects(fakeClient.leasePass('L1'), kupErr(kup.NotFound, /does not serve that method/));
});
