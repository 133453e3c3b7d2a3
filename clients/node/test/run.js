// SPDX-License-Identifier: BSD-2-Clause
//
// Node client test against a running kupd serving the echo module:
//
//   node --expose-gc clients/node/test/run.js /path/to/kupd.sock [DEVICE]
//
// Uses node's built-in test runner (node:test): run directly, it reports
// each test and exits non-zero when any fails.  tests/node/ starts kupsim +
// kupd and runs this and the other files here (lifecycle.js: closing and
// dropping; api.js: exchange, leases, watch, health, listDevices; errors.js:
// errors, argument checks, caller and timeouts).  This one goes through the
// first version's functions (kup.call(client, ...), ...), the others
// through the client's methods.
'use strict';

const test = require('node:test');
const { assert, connectForTests, device, expectedEcho, kup, kupErr, socketPath, waitState } = require('./common');

const client = connectForTests();

test('ListDevices shows the device and its channels', async () => {
  const devices = await kup.listDevices(client);
  const dev = devices.find((d) => d.name === device);
  assert.ok(dev, `device ${device} in ${JSON.stringify(devices.map((d) => d.name))}`);
  assert.equal(dev.reachable, true);
  assert.ok(dev.channel_count > 0);
  assert.equal(dev.channels.length, dev.channel_count);
  assert.ok(Number(dev.max_message_bytes) > 0);
});

test('Session: attach, receive the PASS, send, receive the echo, pass', async () => {
  const s = await kup.openSession(client, device);
  try {
    const lease = s.lease;
    assert.equal(lease.device, device);
    assert.ok(lease.lease_id.length > 0, 'lease id');
    assert.ok(Number(lease.max_message_bytes) > 0);

    // A fresh channel: the kernel hands the turn over with a PASS (seq 1).
    const first = await s.receive();
    assert.deepEqual([first.kind, first.seq], ['pass', 1]);

    const text = 'hello from node';
    await s.send(Buffer.from(text));
    const reply = await s.receive();
    assert.equal(reply.kind, 'data');
    assert.equal(reply.seq, 2);
    assert.equal(reply.data.toString(), expectedEcho(lease.channel, text));

    // Holding the turn with the reply consumed: receive is NotYourTurn, in-band.
    await assert.rejects(s.receive(), (err) => err.kupError === 'NotYourTurn');

    await s.pass();
    const back = await s.receive(5000);
    assert.deepEqual([back.kind, back.seq], ['pass', 3]);

    // A second round on the same lease, with binary data.
    const bin = Buffer.from([0, 1, 2, 0xfe, 0xff]);
    await s.send(bin);
    const binReply = await s.receive();
    assert.ok(binReply.data.equals(bin), 'binary payload echoed unchanged');
    assert.equal(binReply.seq, 4);
  } finally {
    s.close();
  }
});

test('Session on an explicit channel; a second session on it is refused', async () => {
  const devices = await kup.listDevices(client, device);
  const free = devices[0].channels.find((c) => c.state === 'free' && c.id % 2 === 1);
  assert.ok(free, 'a free odd channel');
  const s = await kup.openSession(client, device, free.id);
  try {
    assert.equal(s.lease.channel, free.id);
    await s.receive();
    await s.send('mixed Case');
    const reply = await s.receive();
    assert.equal(reply.data.toString(), 'MIXED CASE');
    await assert.rejects(kup.openSession(client, device, free.id), (err) => {
      return err.code === kup.grpc.status.FAILED_PRECONDITION && err.kupError === 'Busy'
        && err instanceof kup.Busy;
    });
  } finally {
    s.close();
  }
});

test('Call: request/reply on a pooled channel', async () => {
  const text = 'ping from node';
  const r = await kup.call(client, device, Buffer.from(text));
  assert.equal(r.kind, 'data');
  assert.equal(r.data.toString(), expectedEcho(r.channel, text));
});

test('Calls in parallel are all answered correctly', async () => {
  const texts = Array.from({ length: 20 }, (_, i) => `call number ${i}`);
  const replies = await Promise.all(texts.map((t) => kup.call(client, device, t)));
  replies.forEach((r, i) => {
    assert.equal(r.data.toString(), expectedEcho(r.channel, texts[i]));
  });
});

test('Call with a full-size message; one byte more is INVALID_ARGUMENT naming the limit', async () => {
  const [dev] = await kup.listDevices(client, device);
  const max = Number(dev.max_message_bytes);
  const full = Buffer.alloc(max, 0x2e); // '.' is the same on every channel
  const r = await kup.call(client, device, full);
  assert.ok(r.data.equals(full), 'full-size reply');
  await assert.rejects(kup.call(client, device, Buffer.alloc(max + 1, 0x2e)), (err) => {
    assert.equal(err.code, kup.grpc.status.INVALID_ARGUMENT);
    assert.equal(err.kupError, 'TooBig');
    assert.match(err.details, new RegExp(String(max)));
    return true;
  });
});

test('Call on an unknown device is NOT_FOUND naming it', async () => {
  await assert.rejects(kup.call(client, 'no-such-device', 'x'), (err) => {
    assert.equal(err.code, kup.grpc.status.NOT_FOUND);
    assert.equal(err.kupError, 'NotFound');
    assert.match(err.details, /no-such-device/);
    return true;
  });
});

test('bad arguments are refused before the wire, naming them', async () => {
  const refused = [
    [kup.call(client, device, undefined), TypeError, /data must be a Buffer, Uint8Array, ArrayBuffer\(View\) or string, not undefined/],
    [kup.call(client, device, 42), TypeError, /not number/],
    [kup.call(client, '', 'x'), TypeError, /device must be a non-empty string/],
    [kup.call(client, device, 'x', { timeoutMs: -1 }), RangeError, /timeoutMs must be .* > 0, not -1/],
    [kup.call(client, device, 'x', { timeoutMs: 0 }), RangeError, /> 0, not 0/],
    [kup.call(client, device, 'x', { timeoutMs: NaN }), RangeError, /not NaN/],
    [kup.openSession(client, device, -2), RangeError, /channel must be an integer in 0\.\.4294967295 \(uint32\), not -2/],
    // a channel id past uint32 wrapped on the wire (2**32 + 40 attached channel 40)
    [kup.openSession(client, device, 2 ** 32 + 40), RangeError, /0\.\.4294967295 .*not 4294967336/],
    [kup.openSession(client, device, 2 ** 32), RangeError, /not 4294967296/],
    [kup.openSession(client, device, '3'), TypeError, /channel must be an integer or null, not string '3'/],
    [kup.call(client, device, 'x', { timeoutMs: '1000' }), TypeError,
      /timeoutMs must be a number of milliseconds, not string '1000'/],
    [kup.call(client, device, 'x', { timeoutMs: 2 ** 32 }), RangeError, /<= 4294967295 .*not 4294967296/],
    [kup.openSession(client, device, 1.5), RangeError, /not 1.5/],
  ];
  for (const [promise, cls, re] of refused) {
    await assert.rejects(promise, (err) => {
      assert.ok(err instanceof cls, `${err} is a ${cls.name}`);
      assert.match(err.message, re);
      return true;
    });
  }
  // and on an open session, which goes on afterwards
  const s = await kup.openSession(client, device);
  try {
    await s.receive(10000); // echo's opening PASS
    await assert.rejects(s.receive(-5), /timeoutMs must be .* >= 0, not -5/);
    await assert.rejects(s.send(null), /data must be a Buffer, Uint8Array, ArrayBuffer\(View\) or string, not null/);
    await s.send(new Uint8Array([0x2e, 0x2e]));
    const m = await s.receive(10000);
    assert.equal(m.data.toString(), '..');
  } finally {
    s.close();
  }
});

test('connect refuses a socket path that is not a non-empty string', () => {
  assert.throws(() => kup.connect(5), { name: 'TypeError', message: /socketPath must be a non-empty string, not 5/ });
  assert.throws(() => kup.connect(''), { name: 'TypeError', message: /socketPath must be a non-empty string, not ''/ });
  assert.throws(() => kup.connect(undefined), /socketPath must be a non-empty string, not undefined/);
});

test('close() while a receive waits rejects it, cancels the stream and frees the channel', async () => {
  const s = await kup.openSession(client, device);
  const id = s.lease.channel;
  await s.receive(10000); // echo's opening PASS
  await s.send('!hold'); // echo never answers it: the receive below waits
  const pending = s.receive();
  await new Promise((r) => setTimeout(r, 300));
  const t0 = Date.now();
  s.close();
  // InvalidArgument as Python's (kupclient._errors.channel_closed), not a bare CANCELLED
  await assert.rejects(pending, kupErr(kup.InvalidArgument,
    new RegExp(`^channel ${id} of ${device} was closed while the operation waited$`),
    kup.grpc.status.INVALID_ARGUMENT));
  assert.ok(Date.now() - t0 < 2000, 'the receive was rejected promptly');
  // and the session stays closed
  await assert.rejects(s.receive(0), kupErr(kup.InvalidArgument, new RegExp(`^channel ${id} of ${device} is closed$`)));
  await waitState(client, id, 'free');
});

test('a send larger than the channel is TooBig before the wire; the session goes on', async () => {
  const s = await kup.openSession(client, device);
  try {
    await s.receive(10000);
    const max = Number(s.lease.max_message_bytes);
    for (const n of [max + 1, kup.MAX_MESSAGE + 1]) { // the second is over gRPC's own limit
      await assert.rejects(s.send(Buffer.alloc(n, 0x2e)), (err) => {
        assert.ok(err instanceof kup.TooBig);
        assert.equal(err.kupError, 'TooBig');
        assert.equal(err.code, kup.grpc.status.INVALID_ARGUMENT);
        assert.match(err.message, new RegExp(`${n} bytes exceeds max_message_bytes=${max} `));
        return true;
      });
    }
    await s.send('..');
    const m = await s.receive(10000);
    assert.equal(m.data.toString(), '..');
    assert.equal(m.seq, 2); // nothing else was sent
  } finally {
    s.close();
  }
});
