// SPDX-License-Identifier: BSD-2-Clause
//
// kup.js -- a small Node.js client of the kupd gateway.
//
// It loads the same protos/kup/v1/kup.proto as every other client (through
// @grpc/proto-loader, no generated code) and talks to kupd over its unix
// socket with @grpc/grpc-js.
//
//   const kup = require('./kup');
//   const client = kup.connect('/run/kupd/kupd.sock');
//   const s = await kup.openSession(client, 'echo');      // {lease, ...}
//   const first = await s.receive();                       // the kernel's PASS
//   await s.send(Buffer.from('hello'));
//   const reply = await s.receive();                       // {data, kind, seq}
//   await s.pass();
//   s.close();
//   const r = await kup.call(client, 'echo', Buffer.from('ping'));
//   client.close();
//
// Errors are Error objects with .code (the gRPC status code), .kupError
// (the kupd error class name, e.g. "NotYourTurn") and .details.
'use strict';

const path = require('node:path');
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The .proto of the repository (clients/node -> ../../protos).
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'kup/v1/kup.proto';

// gRPC message limit, the same as kupd's and the Python client's
// (kupapi.MAX_GRPC_MESSAGE): the largest KUP message, KUP_MAX_PAGES (1024)
// pages of 4 KiB, plus 64 KiB for the rest of the envelope.
const MAX_MESSAGE = 4 * 1024 * 1024 + 64 * 1024;

let cachedPackage = null;

function loadKup() {
  if (cachedPackage) return cachedPackage;
  const full = path.join(PROTO_ROOT, PROTO_FILE);
  if (!fs.existsSync(full)) {
    throw new Error(`kup.proto not found at ${full}`);
  }
  const def = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: true,      // field names exactly as in the .proto
    longs: Number,       // seq and sizes fit a double here
    enums: String,       // 'MESSAGE_KIND_DATA', ...
    defaults: true,
    oneofs: true,        // resp.result names the set member
  });
  cachedPackage = grpc.loadPackageDefinition(def).kup.v1;
  return cachedPackage;
}

// A client of kupd on the unix socket at socketPath.
function connect(socketPath) {
  if (typeof socketPath !== 'string' || socketPath === '') {
    const what = typeof socketPath === 'string' ? '""' : describe(socketPath);
    throw new TypeError(`socketPath must be a non-empty string, not ${what}`);
  }
  const kup = loadKup();
  const target = socketPath.startsWith('unix:') ? socketPath : `unix:${path.resolve(socketPath)}`;
  return new kup.Kup(target, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': MAX_MESSAGE,
    'grpc.max_receive_message_length': MAX_MESSAGE,
  });
}

// Turn a gRPC status error into an Error naming the kupd error class.
function kupError(err) {
  if (!err || typeof err.code !== 'number') return err;
  const md = err.metadata && err.metadata.get ? err.metadata.get('kup-error') : [];
  const kind = md && md.length ? String(md[0]) : '';
  const e = new Error(`${kind || grpc.status[err.code]}: ${err.details || err.message}`);
  e.code = err.code;
  e.kupError = kind;
  e.details = err.details;
  return e;
}

// Session in-band errors (the session goes on).
function inbandError(err) {
  const e = new Error(`${err.kind || 'Error'}: ${err.message}`);
  e.code = err.grpc_code;
  e.kupError = err.kind;
  e.details = err.message;
  return e;
}

function toMessage(m) {
  return {
    data: Buffer.from(m.data || []),
    kind: String(m.kind).replace('MESSAGE_KIND_', '').toLowerCase(), // 'data' | 'pass' | 'close'
    seq: Number(m.seq),
  };
}

// Channel ids and timeouts are uint32 on the wire: a larger number would
// wrap (channel 2**32 + 40 attached channel 40).
const MAX_UINT32 = 0xffffffff;

function describe(value) {
  if (value === null) return 'null';
  if (typeof value === 'string') return `string ${JSON.stringify(value)}`;
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  return typeof value;
}

// Argument checks, before anything goes on the wire (as kupclient._args in
// Python): a bad one is named instead of reaching kupd as something else
// (a negative timeout_ms becomes a huge uint32, undefined data an empty
// message).
function dataArg(data) {
  if (typeof data === 'string') return Buffer.from(data);
  if (Buffer.isBuffer(data)) return data;
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  const what = data === null ? 'null' : typeof data;
  throw new TypeError(`data must be a Buffer, Uint8Array or string, not ${what}`);
}

function deviceArg(device) {
  if (typeof device !== 'string' || device === '') {
    throw new TypeError(`device must be a non-empty string, not ${JSON.stringify(device)}`);
  }
  return device;
}

// A channel id, or null for any free channel.
function channelArg(channel) {
  if (channel === undefined || channel === null) return null;
  if (typeof channel !== 'number') {
    throw new TypeError(`channel must be an integer or null, not ${describe(channel)}`);
  }
  if (!Number.isInteger(channel) || channel < 0 || channel > MAX_UINT32) {
    throw new RangeError(`channel must be an integer in 0..${MAX_UINT32} (uint32), not ${channel}`);
  }
  return channel;
}

function msArg(ms, zeroOk, what) {
  if (typeof ms !== 'number') {
    throw new TypeError(`${what} must be a number of milliseconds, not ${describe(ms)}`);
  }
  if (!Number.isFinite(ms) || ms < 0 || (ms === 0 && !zeroOk) || ms > MAX_UINT32) {
    const bound = zeroOk ? '>= 0' : '> 0';
    throw new RangeError(
      `${what} must be a finite number of milliseconds <= ${MAX_UINT32} and ${bound}, not ${ms}`);
  }
  return Math.max(zeroOk && ms === 0 ? 0 : 1, Math.round(ms));
}

function unary(client, method, request, timeoutMs = 30000) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutMs);
    client[method](request, { deadline }, (err, resp) => {
      if (err) reject(kupError(err));
      else resolve(resp);
    });
  });
}

// Request/reply without holding a channel.  Resolves to {data, kind, seq, channel}.
async function call(client, device, data, { timeoutMs = 10000, caller = '' } = {}) {
  const request = {
    device: deviceArg(device),
    data: dataArg(data),
    timeout_ms: msArg(timeoutMs, false, 'timeoutMs'),
    caller,
  };
  const resp = await unary(client, 'Call', request, request.timeout_ms + 5000);
  return { ...toMessage(resp.reply), channel: resp.channel };
}

async function listDevices(client, device = '') {
  const resp = await unary(client, 'ListDevices', { device });
  return resp.devices;
}

// A Session stream: an exclusive lease on one channel while it is open.
class Session {
  constructor(client) {
    this.stream = client.Session();
    this.nextId = 0;
    this.pending = [];      // FIFO of {id, resolve, reject}: kupd answers in order
    this.ended = null;      // Error once the stream is over
    this.closed = false;    // close() was called
    this.stream.on('data', (resp) => this._onResponse(resp));
    this.stream.on('error', (err) => this._fail(kupError(err)));
    this.stream.on('end', () => this._fail(new Error('session stream ended')));
  }

  _onResponse(resp) {
    const p = this.pending.shift();
    if (!p) return;
    if (Number(resp.request_id) !== p.id) {
      p.reject(new Error(`response to request ${resp.request_id}, expected ${p.id}`));
      return;
    }
    if (resp.result === 'error') p.reject(inbandError(resp.error));
    else p.resolve(resp[resp.result]);
  }

  _fail(err) {
    if (!this.ended) this.ended = err;
    for (const p of this.pending.splice(0)) p.reject(this.ended);
  }

  _op(op) {
    if (this.ended) return Promise.reject(this.ended);
    this.nextId += 1;
    const id = this.nextId;
    return new Promise((resolve, reject) => {
      this.pending.push({ id, resolve, reject });
      this.stream.write({ request_id: id, ...op });
    });
  }

  async attach(device, channel) {
    const attach = { device: deviceArg(device) };
    if (channelArg(channel) !== null) attach.channel = channel;
    this.lease = await this._op({ attach });
    return this.lease;
  }

  // TooBig (nothing sent, the session goes on) when data is larger than the
  // channel's max_message_bytes: over gRPC's own limit it would end the stream.
  async send(data) {
    const buf = dataArg(data);
    const max = this.lease ? Number(this.lease.max_message_bytes) : 0;
    if (max && buf.length > max) {
      const ch = this.lease.channel;
      const e = new Error(`TooBig: message of ${buf.length} bytes exceeds the data area of `
        + `channel ${ch} of device ${this.lease.device} (${max} bytes)`);
      e.code = grpc.status.INVALID_ARGUMENT;
      e.kupError = 'TooBig';
      e.details = e.message.slice('TooBig: '.length);
      throw e;
    }
    await this._op({ send: { data: buf } });
  }

  pass() {
    return this._op({ pass_turn: {} }).then(() => undefined);
  }

  // timeoutMs: undefined blocks, 0 does not wait (resolves null when not
  // ready), > 0 waits at most that long (DEADLINE_EXCEEDED after).
  async receive(timeoutMs) {
    let receive;
    if (timeoutMs === undefined || timeoutMs === null) receive = { mode: 'RECEIVE_MODE_BLOCK' };
    else if (timeoutMs === 0) receive = { mode: 'RECEIVE_MODE_NONBLOCK' };
    else receive = { mode: 'RECEIVE_MODE_DEADLINE', timeout_ms: msArg(timeoutMs, true, 'timeoutMs') };
    const r = await this._op({ receive });
    if (r.not_ready) return null;
    return toMessage(r.message);
  }

  // Ends the session (kupd releases the lease).  An operation still waiting
  // (a blocked receive) rejects with an Error saying the session was closed,
  // and the stream is cancelled under it: half-closing would leave kupd
  // waiting in the receive, the lease held and node unable to exit.
  close() {
    if (this.closed) return;
    this.closed = true;
    const where = this.lease ? `channel ${this.lease.channel} of ${this.lease.device}` : 'session';
    const closed = new Error(`session closed (${where})`);
    closed.code = grpc.status.CANCELLED;
    closed.kupError = '';
    closed.details = closed.message;
    const waiting = this.pending.length > 0;
    if (!this.ended) this.ended = closed;
    for (const p of this.pending.splice(0)) {
      const e = new Error(`session closed (${where}) while the operation waited`);
      e.code = closed.code;
      e.kupError = '';
      e.details = e.message;
      p.reject(e);
    }
    if (waiting) this.stream.cancel();
    else this.stream.end();
  }
}

async function openSession(client, device, channel) {
  // checked before the stream exists: a stream opened and cancelled unused
  // kept node from exiting
  deviceArg(device);
  channelArg(channel);
  const s = new Session(client);
  try {
    await s.attach(device, channel);
  } catch (err) {
    s.stream.cancel();
    throw err;
  }
  return s;
}

module.exports = {
  MAX_MESSAGE,
  PROTO_FILE,
  PROTO_ROOT,
  Session,
  call,
  connect,
  grpc,
  listDevices,
  loadKup,
  openSession,
};
