// SPDX-License-Identifier: BSD-2-Clause
//
// kup.js -- the Node.js client of the kupd gateway.
//
// It loads the same protos/kup/v1/kup.proto as every other client (through
// @grpc/proto-loader, no generated code) and talks to kupd over its unix
// socket with @grpc/grpc-js.  The Python client (clients/python/kupclient)
// is the reference: same operations, same errors, same argument checks.
//
//   const kup = require('./kup');
//   const client = kup.connect('/run/kupd/kupd.sock');   // {caller} optional
//   await client.listDevices();                    // [{name, channels: [{id, state: 'free'}], ...}]
//   const s = await client.openSession('echo');    // s.lease: {lease_id, channel, ...}
//   const first = await s.receive();               // the kernel's PASS
//   await s.send(Buffer.from('hello'));
//   const reply = await s.receive(5000);           // {data, kind: 'data', seq}
//   const r2 = await s.exchange('again', 5000);    // send + receive as one request
//   await s.pass();
//   await s.close();                               // resolves once kupd let go of the lease
//   const r = await client.call('echo', 'ping');   // {data, kind, seq, channel}
//   const lease = await client.attach('echo', null, { timeoutMs: 2000 });  // leaseSend / leaseReceive /
//   //   leaseExchange / leasePass / release(lease.lease_id)
//   for await (const ev of client.watch('echo', { initialState: true })) ...  // watch.cancel()
//   await client.health();                         // 'SERVING'
//   client.close();                                // ends its open sessions and watches too
//   await s.receive(undefined, { signal });        // any operation: an AbortSignal ends its wait
//
// kup.call(client, ...), kup.listDevices(client, ...) and
// kup.openSession(client, ...) are the same methods as functions; the raw
// grpc-js stub is client.stub.
//
// The contract (docs/gateway.md, "Node.js client"):
//
// * Errors are instances of kup.KupError subclasses named as kupd's classes
//   (kup.NotFound, kup.Busy, kup.Releasing (a Busy), kup.NotYourTurn,
//   kup.Shutdown, kup.TooBig, kup.InvalidArgument, kup.DeadlineExceeded, ...)
//   with .name and .kupError the class name, .code the gRPC status code,
//   .kupCode the KUP_E_* number (or 0), .details (= .message) kupd's text,
//   .retryAfterMs the ms until kupd may admit a refused request again,
//   rounded up (a calls_per_second or channel_ops_per_second refusal's, from
//   a status's kup-retry-after-ms or a Session's in-band retry_after_ms
//   alike; null otherwise), and
//   .fromKupd true for kupd's answers, false when gRPC itself failed (kupd
//   not reachable, connection broken) or the client refused on its own: gRPC's
//   failures are mapped by status code (UNAVAILABLE -> Unavailable, or
//   Shutdown when it says EKU_SHUTDOWN; UNIMPLEMENTED -> NotFound; ...).
//   Bad arguments are refused before anything is sent with a TypeError or
//   RangeError naming them; data larger than any message kupd carries
//   (MAX_PAYLOAD) or than the session's channel is TooBig, nothing sent.
// * Timeouts are milliseconds.  A receive / exchange / leaseReceive /
//   leaseExchange timeout of undefined (or null) blocks, 0 does not wait and
//   resolves null when nothing is there (Python raises NotReady), > 0 waits at
//   most that long (DeadlineExceeded after; should kupd itself not answer
//   within that plus 5 s -- hung, stopped -- DeadlineExceeded too, and a
//   Session's stream is then ended).  A Call without timeoutMs sends
//   timeout_ms 0 (kupd's call_timeout) with no RPC deadline; with one, the
//   RPC's deadline is that plus 5 s, so kupd answers the deadline itself.
// * Every operation that can wait takes an AbortSignal, as fetch() does:
//   {signal} in its options object, the last argument (call(device, data,
//   {timeoutMs, caller, signal}), s.receive(timeoutMs, {signal}),
//   leaseExchange(id, data, timeoutMs, {signal}), watch(device,
//   {initialState, signal}), watch.next({signal}), ...).  A signal already
//   aborted rejects at once (watch() throws), nothing sent; one aborted
//   while the operation waits rejects it with kup.AbortError (a KupError:
//   .name 'AbortError', .code CANCELLED, .cause the signal's reason) and
//   cancels it, and kupd lets go of what it held or waited for: a Call's
//   pool channel or place in the queue; an attach takes no lease; a
//   leaseReceive / leaseExchange leaves the lease as it was, a message kupd
//   took for it kept for the next receive; a Session operation ends the
//   session (the stream is cancelled; a timeoutMs keeps it, as in Python);
//   a Watch's signal ends the Watch, next({signal}) only that wait.  A
//   reply that reached the client before the abort is not thrown away: the
//   operation resolves with it.  No listener stays on the signal once the
//   operation settled.  Otherwise an operation under way ends by its
//   timeout, Session.close(), Watch.cancel() or client.close(), and kupd
//   lets go of what it held or waited for (an Attach lease lives on until
//   release()).
// * attach(device, channel, {timeoutMs}) gives up after timeoutMs (the RPC's
//   deadline; default ATTACH_DEADLINE_MS, 30 s), releasing by its attach_id.
// * A program whose lease receives outlive the client names them itself:
//   {receiveId, againOf} of leaseReceive / leaseExchange, {againOf} of
//   leaseSend / leasePass (up to 64 of [A-Za-z0-9_-], as kupd takes; see
//   leaseReceive).  Within one client, leave them out.
// * Calls carry caller `${os.hostname()}:${process.pid}` unless
//   connect(path, {caller}) or call(..., {caller}) names another.
// * Result objects use the .proto's snake_case field names (the same as the
//   Python client's DeviceInfo, ChannelInfo, Lease and WatchEvent, except
//   a device's not_answering_ms, in seconds there as not_answering_s); channel
//   states and watch event types are Python's strings ('free', 'session',
//   'lease', 'calls', 'quarantined', 'external', 'module', 'not_announced';
//   'LEASE_TAKEN', ...), message kinds 'data' | 'pass' | 'close'.
// * data is a string (UTF-8), a Buffer (sent as it is), or an ArrayBuffer /
//   any ArrayBufferView (copied).
// * A Session holds its channel until close(), client.close(), kupd ending
//   the stream, or, dropped without close(), until it is garbage-collected
//   (its stream is then cancelled).  An open Session keeps Node running,
//   as an open socket does.  After close() its operations reject with
//   InvalidArgument "... is closed" (one still waiting: "... was closed while
//   the operation waited"); after the stream ended otherwise, with the error
//   that ended it.  After client.close() every method rejects with
//   InvalidArgument "client of PATH is closed" (a Watch being iterated,
//   and an RPC under way: "... was closed while the operation waited").
'use strict';

const crypto = require('node:crypto');
const path = require('node:path');
const fs = require('node:fs');
const os = require('node:os');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// The .proto of the repository (clients/node -> ../../protos).
const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'kup/v1/kup.proto';

// gRPC message limit, the same as kupd's and the Python client's
// (kupapi.MAX_GRPC_MESSAGE): the largest KUP message, KUP_MAX_PAGES (1024)
// pages of 4 KiB, plus 64 KiB for the rest of the envelope.
const MAX_MESSAGE = 4 * 1024 * 1024 + 64 * 1024;
// The largest payload kupd's messages carry (kupclient._args.MAX_PAYLOAD):
// larger, gRPC itself would refuse the message (and end a Session).
const MAX_PAYLOAD = MAX_MESSAGE - 64 * 1024;

// Channel ids and timeouts are uint32 on the wire: a larger number would
// wrap (channel 2**32 + 40 attached channel 40).
const MAX_UINT32 = 0xffffffff;

// After a failed connect gRPC waits this long before the next attempt,
// growing the wait up to RECONNECT_MAX_MS (kupclient._types'
// RECONNECT_INITIAL_MS / RECONNECT_MAX_MS).  gRPC's defaults (1 s growing to
// 2 minutes) are for remote servers: with them a client whose kupd was away
// 15 s kept failing Unavailable for 13 s after a new kupd served the socket.
const RECONNECT_INITIAL_MS = 100;
const RECONNECT_MAX_MS = 1000;

// Deadline of the short unary RPCs (ListDevices, Attach, Send, ...), as Python's.
const UNARY_DEADLINE_MS = 30000;
// How long a Session's TooBig waits for ListDevices to tell which limit it is.
const SIZE_LOOKUP_MS = 2000;
// A timeout given to kupd gets that much more on the RPC's own deadline, so
// kupd answers DEADLINE_EXCEEDED itself, with its error attached.
const DEADLINE_SLACK_MS = 5000;
// How many leases' receive given up on a client keeps the name of (as
// Python's kupclient._again.AGAIN_KEPT): a lease never used again does not
// keep its entry for the client's life.
const AGAIN_KEPT = 1024;

const LOAD_OPTIONS = {
  keepCase: true,      // field names exactly as in the .proto
  longs: Number,       // seq and sizes fit a double here
  enums: String,       // 'MESSAGE_KIND_DATA', ...
  defaults: true,
  oneofs: true,        // resp.result names the set member
};

let cachedPackage = null;
let cachedHealth = null;

function loadKup() {
  if (cachedPackage) return cachedPackage;
  const full = path.join(PROTO_ROOT, PROTO_FILE);
  if (!fs.existsSync(full)) {
    throw new Error(`kup.proto not found at ${full}`);
  }
  const def = protoLoader.loadSync(PROTO_FILE, { includeDirs: [PROTO_ROOT], ...LOAD_OPTIONS });
  cachedPackage = grpc.loadPackageDefinition(def).kup.v1;
  return cachedPackage;
}

// grpc.health.v1 (not in this repository's protos): the two messages and
// the Check method, as protobufjs JSON.
function loadHealth() {
  if (cachedHealth) return cachedHealth;
  const json = {
    nested: { grpc: { nested: { health: { nested: { v1: { nested: {
      HealthCheckRequest: { fields: { service: { type: 'string', id: 1 } } },
      HealthCheckResponse: {
        fields: { status: { type: 'ServingStatus', id: 1 } },
        nested: { ServingStatus: { values: { UNKNOWN: 0, SERVING: 1, NOT_SERVING: 2, SERVICE_UNKNOWN: 3 } } },
      },
      Health: { methods: { Check: { requestType: 'HealthCheckRequest', responseType: 'HealthCheckResponse' } } },
    } } } } } } },
  };
  const def = protoLoader.fromJSON(json, LOAD_OPTIONS);
  cachedHealth = grpc.loadPackageDefinition(def).grpc.health.v1.Health;
  return cachedHealth;
}

// ---------------------------------------------------------------- errors

const S = grpc.status;

// kupd's error classes (kupapi/errors.py): name -> [KUP_E_* code, the gRPC
// code kupd answers it with (kupd/service.py), parent].
class KupError extends Error {
  // fromKupd: true only for kupd's answers (errorFromGrpc with kupd's
  // trailers, a Session's in-band error); the client's own refusals (TooBig
  // before sending, "... is closed") and gRPC's failures are false.
  // retryAfterMs: milliseconds until kupd may admit the refused request
  // again, rounded up (kup-retry-after-ms, or a Session's in-band
  // retry_after_ms: a calls_per_second or channel_ops_per_second
  // refusal's), no sooner but no promise; null when kupd did not say.
  constructor(message, { code, kupCode, fromKupd = false, retryAfterMs = null } = {}) {
    super(message);
    this.name = new.target.name;
    this.kupError = new.target.name;
    this.code = code !== undefined ? code : new.target.grpcCode;
    this.kupCode = kupCode !== undefined ? kupCode : new.target.kupCode;
    this.details = message;
    this.fromKupd = fromKupd;
    this.retryAfterMs = retryAfterMs;
  }
}
KupError.grpcCode = S.UNKNOWN;
KupError.kupCode = 0;

function errorClass(name, parent, kupCode, grpcCode) {
  const cls = { [name]: class extends parent {} }[name];
  cls.kupCode = kupCode;
  cls.grpcCode = grpcCode;
  return cls;
}

const Shutdown = errorClass('Shutdown', KupError, 1001, S.UNAVAILABLE);
const NotReady = errorClass('NotReady', KupError, 1002, S.UNAVAILABLE);
const NotYourTurn = errorClass('NotYourTurn', KupError, 1003, S.FAILED_PRECONDITION);
const TooBig = errorClass('TooBig', KupError, 1004, S.INVALID_ARGUMENT);
const DeadlineExceeded = errorClass('DeadlineExceeded', KupError, 1005, S.DEADLINE_EXCEEDED);
const ProtocolError = errorClass('ProtocolError', KupError, 1006, S.INTERNAL);
const VersionMismatch = errorClass('VersionMismatch', KupError, 1007, S.FAILED_PRECONDITION);
const Busy = errorClass('Busy', KupError, 1008, S.FAILED_PRECONDITION);
const Releasing = errorClass('Releasing', Busy, 1013, S.FAILED_PRECONDITION);
const NotFound = errorClass('NotFound', KupError, 1009, S.NOT_FOUND);
const PeerGone = errorClass('PeerGone', KupError, 1010, S.ABORTED);
const InvalidArgument = errorClass('InvalidArgument', KupError, 1011, S.INVALID_ARGUMENT);
const SystemFailure = errorClass('SystemFailure', KupError, 1012, S.INTERNAL);
const PermissionDenied = errorClass('PermissionDenied', KupError, 0, S.PERMISSION_DENIED);
const ResourceExhausted = errorClass('ResourceExhausted', KupError, 0, S.RESOURCE_EXHAUSTED);
const Unavailable = errorClass('Unavailable', KupError, 0, S.UNAVAILABLE);

const ERRORS = {
  KupError, Shutdown, NotReady, NotYourTurn, TooBig, DeadlineExceeded, ProtocolError,
  VersionMismatch, Busy, Releasing, NotFound, PeerGone, InvalidArgument, SystemFailure,
  PermissionDenied, ResourceExhausted, Unavailable,
};

// The client's own, never kupd's (not in ERRORS: no kup-error names it): an
// operation ended by its AbortSignal.  .name 'AbortError', as the errors of
// fetch() and of Node's own APIs; .cause the signal's reason (a DOMException
// 'AbortError' unless abort(reason) gave one); .code CANCELLED.
const AbortError = errorClass('AbortError', KupError, 0, S.CANCELLED);

// A status kupd did not send (no kup-error metadata) is mapped by its code
// (kupclient._errors._BY_STATUS).
const BY_STATUS = {
  [S.NOT_FOUND]: NotFound,
  [S.FAILED_PRECONDITION]: NotYourTurn,
  [S.INVALID_ARGUMENT]: InvalidArgument,
  [S.DEADLINE_EXCEEDED]: DeadlineExceeded,
  [S.UNAVAILABLE]: Unavailable,
  [S.PERMISSION_DENIED]: PermissionDenied,
  [S.RESOURCE_EXHAUSTED]: ResourceExhausted,
  [S.ABORTED]: PeerGone,
  // gRPC's own "Method not found!": not served on this socket
  [S.UNIMPLEMENTED]: NotFound,
};

function classOf(kind) {
  return Object.prototype.hasOwnProperty.call(ERRORS, kind) ? ERRORS[kind] : null;
}

// The largest kup-retry-after-ms kupd sends (kupapi.errors.RETRY_AFTER_MAX_MS):
// what a Number holds exactly.
const RETRY_AFTER_MAX_MS = Number.MAX_SAFE_INTEGER;

// A kup-retry-after-ms value ('340'), or an in-band Error's retry_after_ms
// (a Number; undefined when not set), as a Number of ms (> 0), null for
// anything else (ignored, as kupclient._errors.retry_after_ms does).
function retryAfterOf(value) {
  if (value === undefined || value === null) return null;
  const text = String(value);
  if (!/^[0-9]+$/.test(text)) return null;
  const ms = Number(text);
  return ms > 0 && ms <= RETRY_AFTER_MAX_MS ? ms : null;
}

function metadataValue(metadata, key) {
  const v = metadata && typeof metadata.get === 'function' ? metadata.get(key) : [];
  return v && v.length ? String(v[0]) : '';
}

// Why kupd closes a client's connection with ENHANCE_YOUR_CALM.
const PING_TIMEOUT = 'a keepalive ping went unanswered: kupd drops a client that does not '
  + 'answer within its keepalive_timeout while the connection is quiet -- a stopped process, '
  + 'or an event loop too busy to answer -- (or one that pings kupd more often than every 5 s)';

// The KupError of a failed RPC (a grpc-js ServiceError: code, details,
// metadata = the trailers).  Anything else is returned as it is.
function errorFromGrpc(err) {
  if (!err || typeof err.code !== 'number') return err;
  let details = err.details || err.message || (S[err.code] || String(err.code));
  let kind = metadataValue(err.metadata, 'kup-error');
  const fromKupd = kind !== '';
  if (!kind && err.code === S.UNAVAILABLE && details.includes('EKU_SHUTDOWN')) kind = 'Shutdown';
  if (!kind && err.code === S.UNIMPLEMENTED) {
    details = `the server on this socket does not serve that method (${details}): an Admin `
      + 'call needs kupd\'s admin_socket; otherwise the kupd is older than this client';
  }
  let code = err.code;
  if (!kind && code === S.RESOURCE_EXHAUSTED && details.includes('larger than max')) {
    // gRPC's receive limit, met before kupd saw the request (a tenant's
    // max_message_bytes + 16 KiB, or kupd's 4 MiB): the one size error the
    // API has, TooBig, as kupd's own answer a little over the limit
    kind = 'TooBig';
    details = `the message is larger than this socket accepts (${details}): the tenant's `
      + 'max_message_bytes (listDevices, the lease) is the limit to keep to';
  }
  if (!kind && code === S.RESOURCE_EXHAUSTED && details.includes('Bandwidth exhausted')) {
    // grpc-js's words for a stream ended by HTTP/2 ENHANCE_YOUR_CALM: kupd
    // closed the connection -- not a quota of kupd's, which names its key
    code = S.UNAVAILABLE;
    details = `kupd closed the connection (${details}): ${PING_TIMEOUT}`;
  }
  const cls = classOf(kind) || BY_STATUS[code] || SystemFailure;
  const kupCode = Number(metadataValue(err.metadata, 'kup-code')) || cls.kupCode;
  const retryAfterMs = fromKupd ? retryAfterOf(metadataValue(err.metadata, 'kup-retry-after-ms')) : null;
  return new cls(details, { code, kupCode, fromKupd, retryAfterMs });
}

// A Session's in-band error (the session goes on): as errorFromGrpc maps
// kupd's status of the same code, class and retry figure.
function errorFromPb(err) {
  const cls = classOf(err.kind) || BY_STATUS[err.grpc_code] || SystemFailure;
  return new cls(err.message, {
    code: err.grpc_code,
    kupCode: err.kup_code || cls.kupCode,
    fromKupd: true,
    retryAfterMs: retryAfterOf(err.retry_after_ms),
  });
}

// True for an Unavailable that gRPC itself raised (kupd could not be
// reached, or the connection broke), false for one kupd answered.
function isConnectionFailure(err) {
  return err instanceof Unavailable && !err.fromKupd;
}

function clientClosed(where, pending) {
  return new InvalidArgument(pending
    ? `client of ${where} was closed while the operation waited`
    : `client of ${where} is closed`);
}

// The AbortError of `what` (e.g. "call to echo") ended by `signal`; its
// reason is named when it is not the default one.
function abortError(what, signal) {
  const reason = signal.reason;
  let why = '';
  if (reason instanceof Error && reason.name !== 'AbortError') why = `: ${reason.name}: ${reason.message}`;
  else if (!(reason instanceof Error) && reason !== undefined) why = `: ${describe(reason)}`;
  const err = new AbortError(`${what} was aborted${why}`);
  err.cause = reason;
  return err;
}

// Calls fn once when `signal` aborts; returns the function that stops
// listening (called as the operation settles: a long-lived signal used for
// many operations keeps no listener of a finished one).
function onAbort(signal, fn) {
  signal.addEventListener('abort', fn, { once: true });
  return () => signal.removeEventListener('abort', fn);
}

function channelClosed(what, pending) {
  return new InvalidArgument(pending ? `${what} was closed while the operation waited` : `${what} is closed`);
}

// ---------------------------------------------------------------- arguments

// Argument checks, before anything goes on the wire (as kupclient._args in
// Python): a bad one is named instead of reaching kupd as something else
// (a negative timeout_ms becomes a huge uint32, undefined data an empty
// message).

// A string as an error message quotes it: as Python's repr() of a str
// (the Python client's messages say {value!r}, the C++ client's '...'), so
// that the three clients word a bad name alike -- single quotes, double
// ones when the text has a ' and no ", and backslash escapes for the
// backslash, the quote, and what is not printable (control characters,
// separators other than ' ', lone surrogates: \xNN, \uNNNN, \UNNNNNNNN).
const NOT_PRINTABLE = /[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}\p{Zs}]/u;
const ESCAPES = new Map([['\\', '\\\\'], ['\t', '\\t'], ['\n', '\\n'], ['\r', '\\r']]);

function quote(text) {
  const q = text.includes("'") && !text.includes('"') ? '"' : "'";
  let out = q;
  for (const ch of text) {  // by code point; a lone surrogate is one
    const cp = ch.codePointAt(0);
    if (ESCAPES.has(ch)) out += ESCAPES.get(ch);
    else if (ch === q) out += `\\${q}`;
    else if (ch === ' ' || !NOT_PRINTABLE.test(ch)) out += ch;
    else if (cp < 0x100) out += `\\x${cp.toString(16).padStart(2, '0')}`;
    else if (cp < 0x10000) out += `\\u${cp.toString(16).padStart(4, '0')}`;
    else out += `\\U${cp.toString(16).padStart(8, '0')}`;
  }
  return out + q;
}

function describe(value) {
  if (value === null) return 'null';
  if (typeof value === 'string') return `string ${quote(value)}`;
  if (typeof value === 'number') return String(value);
  if (typeof value === 'bigint') return `bigint ${value}n`;
  if (typeof value === 'symbol') return `symbol ${String(value)}`;
  if (Array.isArray(value)) return 'array';
  return typeof value;
}

// A Buffer for a bytes field: a string is UTF-8, a Buffer goes as it is
// (grpc-js serializes it before the call returns), an ArrayBuffer or any
// other view (Uint8Array, DataView, Float32Array, ...) is copied.
function toBuffer(data, name = 'data') {
  if (typeof data === 'string') return Buffer.from(data, 'utf8');
  if (Buffer.isBuffer(data)) return data;
  if (ArrayBuffer.isView(data)) {
    return Buffer.from(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
  }
  if (data instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && data instanceof SharedArrayBuffer)) {
    return Buffer.from(new Uint8Array(data));
  }
  const what = data === null ? 'null' : Array.isArray(data) ? 'array' : typeof data;
  throw new TypeError(`${name} must be a Buffer, Uint8Array, ArrayBuffer(View) or string, not ${what}`);
}

function checkPayload(buf, name = 'data') {
  if (buf.length > MAX_PAYLOAD) {
    throw new TooBig(`${name} of ${buf.length} bytes is larger than any message kupd carries `
      + `(${MAX_PAYLOAD} bytes, gRPC's limit)`);
  }
  return buf;
}

// A Session's TooBig text for n bytes over its max_message_bytes `limit`
// (as kupclient._args.check_size words it): `channelBytes` is the channel's
// data area where known (0: not), and a lower limit is the tenant's rule.
function sizeRefusal(n, limit, channel, device, channelBytes) {
  const where = `channel ${channel} of device ${device}`;
  if (channelBytes && limit < channelBytes) {
    return `rule max_message_bytes: message of ${n} bytes exceeds max_message_bytes=${limit} `
      + `(this tenant's limit; ${where} itself carries ${channelBytes} bytes)`;
  }
  if (channelBytes) {
    return `message of ${n} bytes exceeds max_message_bytes=${limit} of ${where} (the channel's data area)`;
  }
  return `message of ${n} bytes exceeds max_message_bytes=${limit} of ${where} `
    + '(its data area, or the tenant\'s own limit if lower)';
}

function dataArg(data, name = 'data') {
  return checkPayload(toBuffer(data, name), name);
}

function textArg(value, name) {
  if (typeof value !== 'string') {
    throw new TypeError(`${name} must be a string, not ${describe(value)}`);
  }
  if (Buffer.from(value, 'utf8').toString('utf8') !== value) {
    throw new RangeError(`${name} must be valid UTF-8 text (no lone surrogates), not ${quote(value)}`);
  }
  return value;
}

function deviceArg(device) {
  if (typeof device !== 'string' || device === '') {
    const what = device === '' ? "''" : describe(device);
    throw new TypeError(`device must be a non-empty string, not ${what}`);
  }
  return textArg(device, 'device');
}

// A device to filter by: a name, or undefined / null / '' for every device.
function deviceFilterArg(device) {
  if (device === undefined || device === null) return '';
  return textArg(device, 'device');
}

function leaseArg(leaseId) {
  if (typeof leaseId !== 'string' || leaseId === '') {
    const what = leaseId === '' ? "''" : describe(leaseId);
    throw new TypeError(`lease id must be a non-empty string, not ${what}`);
  }
  return textArg(leaseId, 'lease id');
}

// A name a client gives its request (receiveId, againOf: a Receive's
// receive_id / again_of, a Send's and a Pass's again_of): up to
// REQUEST_NAME_MAX of [A-Za-z0-9_-], what kupd takes
// (kupapi.defaults.request_name_error); undefined / null for the client's
// own.  Checked before it is sent, naming the option.
const REQUEST_NAME_MAX = 64;
const REQUEST_NAME = /^[A-Za-z0-9_-]*$/;

function receiveNameArg(value, name) {
  if (value === undefined || value === null) return null;
  if (typeof value !== 'string') {
    throw new TypeError(`${name} must be a string, not ${describe(value)}`);
  }
  if (value === '') throw new RangeError(`${name} must not be empty (leave it out: undefined)`);
  // characters are code points, as Python's len() and the C++ client count
  // them: a string's length counts UTF-16 units (an emoji is 2), and is
  // never fewer, so only a string over the limit in units is counted again
  const characters = value.length > REQUEST_NAME_MAX ? [...value].length : value.length;
  if (characters > REQUEST_NAME_MAX) {
    throw new RangeError(`${name} of ${characters} characters: at most ${REQUEST_NAME_MAX}`);
  }
  if (!REQUEST_NAME.test(value)) {
    throw new RangeError(`${name} ${quote(value)}: only letters, digits, '_' and '-'`);
  }
  return value;
}

function callerArg(caller) {
  return textArg(caller, 'caller');
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

// An options object: undefined / null for none; unknown keys are refused
// (a misspelt timeoutMs would otherwise be ignored).
function optionsArg(opts, known, what) {
  if (opts === undefined || opts === null) return {};
  if (typeof opts !== 'object' || Array.isArray(opts)) {
    throw new TypeError(`${what} options must be an object, not ${describe(opts)}`);
  }
  for (const key of Object.keys(opts)) {
    if (!known.includes(key)) {
      throw new TypeError(`${what}: unknown option ${quote(key)} (known: ${known.join(', ')})`);
    }
  }
  return opts;
}

// A grpc-js interceptor of one unary call: entry.replied once kupd's reply
// message reached the client (its status comes after it).
function replyWatch(entry) {
  return (options, nextCall) => new grpc.InterceptingCall(nextCall(options), {
    start(metadata, listener, next) {
      next(metadata, {
        onReceiveMessage(message, nextMessage) {
          if (message !== null) entry.replied = true;
          nextMessage(message);
        },
      });
    },
  });
}

// An AbortSignal option (duck-typed, as Node's own APIs check one), or
// null for none.
function signalArg(signal) {
  if (signal === undefined || signal === null) return null;
  if (typeof signal !== 'object' || typeof signal.aborted !== 'boolean'
      || typeof signal.addEventListener !== 'function' || typeof signal.removeEventListener !== 'function') {
    throw new TypeError(`signal must be an AbortSignal, not ${describe(signal)}`);
  }
  return signal;
}

// The signal of an operation's options ({signal}), checked.
function signalOf(opts, what) {
  return signalArg(optionsArg(opts, ['signal'], what).signal);
}

// {mode, timeout_ms} of a receive: undefined / null blocks, 0 does not wait.
function receiveMode(timeoutMs) {
  if (timeoutMs === undefined || timeoutMs === null) return { mode: 'RECEIVE_MODE_BLOCK', timeout_ms: 0 };
  const ms = msArg(timeoutMs, true, 'timeoutMs');
  if (ms === 0) return { mode: 'RECEIVE_MODE_NONBLOCK', timeout_ms: 0 };
  return { mode: 'RECEIVE_MODE_DEADLINE', timeout_ms: ms };
}

// The RPC deadline for a wait of timeoutMs (undefined / null: none).
function deadlineFor(timeoutMs) {
  return timeoutMs === undefined || timeoutMs === null ? null : timeoutMs + DEADLINE_SLACK_MS;
}

// ---------------------------------------------------------------- results

const STATE_NAMES = {
  CHANNEL_STATE_NOT_ANNOUNCED: 'not_announced',
  CHANNEL_STATE_FREE: 'free',
  CHANNEL_STATE_SESSION: 'session',
  CHANNEL_STATE_LEASE: 'lease',
  CHANNEL_STATE_CALLS: 'calls',
  CHANNEL_STATE_QUARANTINED: 'quarantined',
  CHANNEL_STATE_EXTERNAL: 'external',
  CHANNEL_STATE_MODULE: 'module',
};

function toMessage(m) {
  return {
    data: Buffer.from(m.data || []),
    kind: String(m.kind).replace('MESSAGE_KIND_', '').toLowerCase(), // 'data' | 'pass' | 'close'
    seq: Number(m.seq),
  };
}

// A ReceiveResponse: the message, or null when a non-blocking receive found nothing.
function fromReceived(r) {
  if (!r || r.not_ready) return null;
  return toMessage(r.message);
}

function toDevice(d) {
  return {
    name: d.name,
    reachable: d.reachable,
    abi_version: d.abi_version,
    page_size: d.page_size,
    channel_count: d.channel_count,
    announced: d.announced,
    pages_per_channel: d.pages_per_channel,
    max_message_bytes: Number(d.max_message_bytes),
    notify_gen: Number(d.notify_gen),
    shutting_down: d.shutting_down,
    call_channels: d.call_channels,
    error: d.error,
    calls_in_flight: d.calls_in_flight,
    calls_queued: d.calls_queued,
    // the tenant whose Calls the two above count ('': every Call of the pool)
    calls_tenant: d.calls_tenant,
    channels: (d.channels || []).map((c) => ({
      id: c.id, state: STATE_NAMES[c.state] || 'unknown', lease_id: c.lease_id,
    })),
    drained: d.drained,
    // milliseconds, as in the .proto (Python's DeviceInfo: not_answering_s)
    not_answering_ms: d.not_answering_ms || 0,
    // answering, but new attaches cannot reach it (its node was removed)
    cannot_attach: Boolean(d.cannot_attach),
  };
}

function toLease(a) {
  return {
    lease_id: a.lease_id,
    device: a.device,
    channel: a.channel,
    max_message_bytes: Number(a.max_message_bytes),
    idle_timeout_ms: a.idle_timeout_ms,
  };
}

function toEvent(e) {
  return {
    type: String(e.type).replace('WATCH_EVENT_TYPE_', ''), // 'LEASE_TAKEN', ... (Python's EventType names)
    device: e.device,
    channel: e.channel,
    lease_id: e.lease_id,
    holder: e.holder,
    announced: e.announced,
    notify_gen: Number(e.notify_gen),
    reason: e.reason,
    initial: e.initial,
    time_unix_ms: Number(e.time_unix_ms),
  };
}

// ---------------------------------------------------------------- streams

// A stream dropped without close() (its Session or Watch collected) is
// cancelled, so kupd releases the lease.  The registry holds the stream's
// core, which never refers back to its Session / Watch.
const dropped = new FinalizationRegistry((core) => core.abandon());

// A stream of the stub, made without a stack trace: grpc-js keeps an Error
// made at the call (for its own error stacks), and the frames of its stack
// trace would keep their receivers -- the Session being made -- alive for
// the life of the stream, so a dropped Session was never collected.
function openStream(make) {
  const limit = Error.stackTraceLimit;
  Error.stackTraceLimit = 0;
  try {
    return make();
  } finally {
    Error.stackTraceLimit = limit;
  }
}

// Node's timers fire at once for a delay over 2**31 - 1 ms (about 24.8
// days; timeouts are uint32 ms, up to 49.7 days).
const MAX_TIMER_MS = 0x7fffffff;

// An unref()ed timer calling fn after ms, however long (re-armed in steps
// of at most MAX_TIMER_MS); returns the function that stops it.
function longTimeout(fn, ms) {
  const due = Date.now() + ms;
  let t = null;
  const arm = () => {
    const left = due - Date.now();
    if (left <= 0) {
      fn();
      return;
    }
    t = setTimeout(arm, Math.min(left, MAX_TIMER_MS));
    t.unref();
  };
  t = setTimeout(arm, Math.min(ms, MAX_TIMER_MS));
  t.unref();
  return () => clearTimeout(t);
}

// The state of a Session stream, apart from the Session object.
class SessionCore {
  constructor(client) {
    this.client = client;
    this.what = 'session';
    this.pending = [];      // FIFO of {id, resolve, reject}: kupd answers in order
    this.nextId = 0;
    this.ended = null;      // the error of any later operation, once over
    this.finished = false;  // the stream's status has arrived
    this.onFinished = [];
    this.stream = openStream(() => client.stub.Session());
    this.stream.on('data', (resp) => this.onResponse(resp));
    this.stream.on('error', (err) => this.fail(errorFromGrpc(err)));
    // kupd ended the stream without an error status: its answer
    this.stream.on('end', () => this.fail(new PeerGone(`${this.what}: session ended`, { fromKupd: true })));
    this.stream.on('status', () => this.finish());
    client.live.add(this);
  }

  onResponse(resp) {
    const p = this.pending.shift();
    if (!p) return;
    if (Number(resp.request_id) !== p.id) {
      const e = new ProtocolError(`${this.what}: response to request ${resp.request_id}, expected ${p.id}`);
      p.reject(e);
      this.fail(e);
      this.stream.cancel();
      return;
    }
    if (resp.result === 'error') p.reject(errorFromPb(resp.error));
    else p.resolve(resp[resp.result]);
  }

  // The stream is over (or being ended): later operations get `err`, the
  // waiting ones `pendingErr` (default `err`).
  fail(err, pendingErr) {
    if (!this.ended) this.ended = err;
    const e = pendingErr || this.ended;
    for (const p of this.pending.splice(0)) p.reject(e);
    this.client.live.delete(this);
  }

  finish() {
    this.finished = true;
    this.client.live.delete(this);
    for (const f of this.onFinished.splice(0)) f();
  }

  done() {
    return this.finished ? Promise.resolve() : new Promise((r) => this.onFinished.push(r));
  }

  // waitMs (0 or more; undefined: a blocking wait, unbounded): kupd bounds
  // the wait itself; should kupd not answer within that plus
  // DEADLINE_SLACK_MS (hung, stopped), the operation fails with
  // DeadlineExceeded and the session is ended (its state is unknown), as
  // the Python client does.
  //
  // signal (an AbortSignal or null): already aborted, the operation rejects
  // with AbortError and nothing is sent; aborted while kupd has not
  // answered, it rejects with AbortError and the session ends (the stream
  // is cancelled, kupd releases the lease), as a cancelled operation ends a
  // Python asyncio session: kupd answers a session's requests in order, so
  // its late answer would otherwise answer the next request.  `name`
  // ('receive', ...) is the operation's, for the error.
  op(op, waitMs, signal = null, name = Object.keys(op)[0]) {
    if (signal && signal.aborted) return Promise.reject(abortError(`${this.what}: ${name}`, signal));
    if (this.ended) return Promise.reject(this.ended);
    this.nextId += 1;
    const id = this.nextId;
    return new Promise((resolve, reject) => {
      const stops = [];
      const stop = () => { for (const f of stops.splice(0)) f(); };
      const p = { id, resolve: (v) => { stop(); resolve(v); }, reject: (e) => { stop(); reject(e); } };
      if (waitMs !== undefined) {
        const bound = waitMs + DEADLINE_SLACK_MS;
        stops.push(longTimeout(() => this.noAnswer(p, bound), bound));
      }
      if (signal) stops.push(onAbort(signal, () => this.aborted(p, name, signal)));
      this.pending.push(p);
      this.stream.write({ request_id: id, ...op });
    });
  }

  aborted(p, name, signal) {
    const i = this.pending.indexOf(p);
    if (i < 0) return;
    this.pending.splice(i, 1);
    p.reject(abortError(`${this.what}: ${name}`, signal));
    this.fail(new InvalidArgument(`${this.what} is closed: an operation on it was aborted `
      + '(use timeoutMs to keep the session)'));
    if (!this.finished) this.stream.cancel();
  }

  noAnswer(p, bound) {
    if (!this.pending.includes(p) || this.finished) return;
    const s = bound / 1000;
    this.fail(
      new InvalidArgument(`${this.what} is closed: kupd did not answer an operation within `
        + 'its timeout plus the grace'),
      new DeadlineExceeded(`${this.what}: kupd did not answer within ${s} s (the operation's `
        + "timeout plus the client's grace); the session was ended"),
    );
    this.stream.cancel();
  }

  // close(): cancel under a waiting operation (half-closing would leave kupd
  // waiting in a blocked receive, the lease held), else half-close and let
  // kupd end the stream once it has let go of the lease.
  close() {
    const waiting = this.pending.length > 0;
    this.fail(channelClosed(this.what, false), channelClosed(this.what, true));
    if (this.finished) return;
    if (waiting) {
      this.stream.cancel();
    } else {
      this.stream.end();
      // kupd ends the stream at once; should it not, do not wait forever
      const t = setTimeout(() => this.stream.cancel(), 10000);
      t.unref();
      this.onFinished.push(() => clearTimeout(t));
    }
  }

  // client.close(): cancel, the session's operations say it was closed
  abort() {
    this.fail(channelClosed(this.what, false), channelClosed(this.what, true));
    if (!this.finished) this.stream.cancel();
  }

  // the Session was collected without close()
  abandon() {
    if (this.finished) return;
    this.fail(channelClosed(this.what, false));
    this.stream.cancel();
  }
}

// A Session stream: an exclusive lease on one channel while it is open.
// Made by client.openSession(device, channel) (or kup.openSession).
class Session {
  constructor(client) {
    clientArg(client).checkOpen();
    this.client = client;
    this.lease = null;
    this.closed = false;    // close() was called
    this._core = new SessionCore(client);
    dropped.register(this, this._core, this._core);
  }

  get stream() {
    return this._core.stream;
  }

  get device() {
    return this.lease ? this.lease.device : null;
  }

  get channel() {
    return this.lease ? this.lease.channel : null;
  }

  async attach(device, channel, signal = null) {
    const attach = { device: deviceArg(device) };
    if (channelArg(channel) !== null) attach.channel = channel;
    this._core.what = `session on ${device}`;
    this.lease = toLease(await this._core.op({ attach }, undefined, signalArg(signal)));
    this._core.what = `channel ${this.lease.channel} of ${this.lease.device}`;
    return this.lease;
  }

  // TooBig (nothing sent, the session goes on) when data is larger than the
  // session's max_message_bytes (the channel's data area, or the tenant's own
  // limit if lower): over gRPC's own limit it would end the stream.  The
  // error says which limit it is when the client can tell: it compares with
  // the channel's data area (ListDevices' pages_per_channel x page_size, as
  // the client last saw it, or asked for then), as kupclient does.
  async _refuse(buf) {
    const { device, channel } = this.lease;
    if (!this.client._channelBytes.has(device)) {
      try {
        await this.client._listDevices(device, SIZE_LOOKUP_MS);
      } catch {
        // not known then: the error says both limits
      }
    }
    return new TooBig(sizeRefusal(buf.length, this.lease.max_message_bytes, channel, device,
      this.client._channelBytes.get(device) || 0));
  }

  _over(buf) {
    const max = this.lease ? this.lease.max_message_bytes : 0;
    return max && buf.length > max;
  }

  // opts: {signal}, an AbortSignal, for every operation below: already
  // aborted, the operation rejects with AbortError, nothing sent, and the
  // session goes on; aborted before kupd answered, it rejects with
  // AbortError and ends the session (SessionCore.op) -- pass timeoutMs
  // instead to keep it.
  async send(data, opts) {
    const signal = signalOf(opts, 'send');
    const buf = toBuffer(data);
    if (this._over(buf)) throw await this._refuse(buf);
    await this._core.op({ send: { data: checkPayload(buf) } }, undefined, signal);
  }

  async pass(opts) {
    await this._core.op({ pass_turn: {} }, undefined, signalOf(opts, 'pass'), 'pass');
  }

  // timeoutMs: undefined blocks, 0 does not wait (resolves null when not
  // ready), > 0 waits at most that long (DeadlineExceeded after).
  async receive(timeoutMs, opts) {
    const receive = receiveMode(timeoutMs);
    const signal = signalOf(opts, 'receive');
    const wait = receive.mode === 'RECEIVE_MODE_BLOCK' ? undefined : receive.timeout_ms;
    return fromReceived(await this._core.op({ receive }, wait, signal));
  }

  // send(data) then receive(timeoutMs) as one request on the stream.  A
  // refused send sent nothing; when the wait fails (DeadlineExceeded) the
  // data was sent and the reply is still owed: receive() gets it.
  async exchange(data, timeoutMs, opts) {
    const { mode, timeout_ms } = receiveMode(timeoutMs);
    const signal = signalOf(opts, 'exchange');
    const raw = toBuffer(data);
    if (this._over(raw)) throw await this._refuse(raw);
    const buf = checkPayload(raw);
    const wait = mode === 'RECEIVE_MODE_BLOCK' ? undefined : timeout_ms;
    return fromReceived(await this._core.op({ exchange: { data: buf, mode, timeout_ms } }, wait, signal));
  }

  // Ends the session (kupd releases the lease); resolves once the stream is
  // over (the channel is free then), never rejects.  An operation still
  // waiting (a blocked receive) rejects with InvalidArgument "... was
  // closed while the operation waited".
  close() {
    if (!this.closed) {
      this.closed = true;
      dropped.unregister(this._core);
      this._core.close();
    }
    return this._core.done();
  }
}

// An async iterator of watch events ({type, device, channel, lease_id,
// ...}); ends when cancel()led; a kupd shutdown ends it by throwing
// Shutdown after the SERVER_SHUTTING_DOWN event (kupd dying: Unavailable),
// and every later next() throws that again; client.close() ends it by
// throwing InvalidArgument "client of PATH was closed while the operation
// waited", then "client of PATH is closed".  Its signal (watch(device,
// {signal})) aborted ends it too: the waiting next() and every later one
// reject with that AbortError.  next({signal}) gives up one wait only: that
// next() rejects with AbortError, the Watch goes on and keeps its events for
// the next next().
class WatchCore {
  constructor(client, request, signal) {
    this.client = client;
    this.device = request.device;
    this.queue = [];
    this.waiters = [];
    this.error = null;      // what ended the stream (null: cancel() or a quiet end)
    this.later = null;      // after client.close(): the error of next() calls after the first
    this.over = false;
    this.cancelled = false;
    this.stream = openStream(() => client.stub.Watch(request));
    this.stream.on('data', (ev) => {
      this.push({ value: toEvent(ev), done: false });
      if (this.queue.length >= 1024) this.stream.pause();
    });
    this.stream.on('error', (err) => {
      if (!this.cancelled) this.error = errorFromGrpc(err);
      this.end();
    });
    this.stream.on('end', () => this.end());
    this.stream.on('status', () => this.end());
    client.live.add(this);
    this.unlisten = signal ? onAbort(signal, () => this.aborted(signal)) : null;
  }

  push(item) {
    const w = this.waiters.shift();
    if (w) w.resolve(item);
    else this.queue.push(item);
  }

  // The stream is over: the waiting next() calls get its error (or the
  // end), and so does every later one -- the error is kept, an ended Watch
  // never turns into a quiet end.  client.close() gives the first next()
  // (waiting or not) "... was closed while the operation waited" and the
  // later ones "... is closed", as with any other operation.
  end() {
    if (this.over) return;
    this.over = true;
    this.client.live.delete(this);
    if (this.unlisten) this.unlisten();
    for (const w of this.waiters.splice(0)) this.settle(w);
  }

  settle(w) {
    if (!this.error) {
      w.resolve({ value: undefined, done: true });
      return;
    }
    w.reject(this.error);
    if (this.later) {
      this.error = this.later;
      this.later = null;
    }
  }

  next(signal) {
    if (signal && signal.aborted) return Promise.reject(abortError('watch next()', signal));
    if (this.queue.length) {
      const item = this.queue.shift();
      if (this.queue.length < 256 && !this.over) this.stream.resume();
      return Promise.resolve(item);
    }
    if (this.over) return new Promise((resolve, reject) => this.settle({ resolve, reject }));
    return new Promise((resolve, reject) => {
      if (!signal) {
        this.waiters.push({ resolve, reject });
        return;
      }
      let unlisten = null;
      const w = {
        resolve: (v) => { unlisten(); resolve(v); },
        reject: (e) => { unlisten(); reject(e); },
      };
      unlisten = onAbort(signal, () => {
        const i = this.waiters.indexOf(w);
        if (i < 0) return;
        this.waiters.splice(i, 1);
        w.reject(abortError('watch next()', signal));
      });
      this.waiters.push(w);
    });
  }

  // the Watch's own signal aborted: ended as by client.close(), with its
  // AbortError for the waiting next() and every later one
  aborted(signal) {
    if (this.over) return;
    this.cancelled = true;
    this.queue.length = 0;
    this.error = abortError(`watch of ${this.device || 'every device'}`, signal);
    this.stream.cancel();
    this.end();
  }

  cancel() {
    if (this.over) return;
    this.cancelled = true;
    this.queue.length = 0;
    this.stream.cancel();
    this.end();
  }

  // client.close(): the iteration rejects with InvalidArgument "client of
  // PATH was closed while the operation waited", as any other operation
  // under way then (it used to end as if cancel()led)
  abort() {
    if (this.over) return;
    this.cancelled = true;
    this.queue.length = 0;
    this.error = clientClosed(this.client.path, true);
    this.later = clientClosed(this.client.path, false);
    this.stream.cancel();
    this.end();
  }

  abandon() {
    this.cancel();
  }
}

class Watch {
  constructor(client, request, signal = null) {
    this._core = new WatchCore(client, request, signal);
    dropped.register(this, this._core, this._core);
  }

  get stream() {
    return this._core.stream;
  }

  // opts: {signal} ends this wait only (for await passes none)
  next(opts) {
    let signal;
    try {
      signal = signalOf(opts, 'next');
    } catch (err) {
      return Promise.reject(err);
    }
    return this._core.next(signal);
  }

  // for await ... break
  return() {
    this.cancel();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }

  cancel() {
    dropped.unregister(this._core);
    this._core.cancel();
  }
}

// ---------------------------------------------------------------- client

// A client of kupd on a unix socket (kup.connect()).
class Client {
  constructor(socketPath, { caller } = {}) {
    this.path = socketPath;
    this.caller = caller === undefined || caller === null
      ? `${os.hostname()}:${process.pid}` : callerArg(caller);
    this.closed = false;
    this.live = new Set();      // open stream cores (Sessions, Watches)
    this.inflight = new Set();  // unary RPCs under way: {call, reject}
    // lease id -> receive_id of its receive given up on (_leaseReply), at
    // most AGAIN_KEPT leases' (the oldest forgotten)
    this.again = new Map();
    const kup = loadKup();
    const target = socketPath.startsWith('unix:') ? socketPath : `unix:${path.resolve(socketPath)}`;
    // the raw grpc-js stub (kup.v1.Kup)
    this.stub = new kup.Kup(target, grpc.credentials.createInsecure(), {
      'grpc.max_send_message_length': MAX_MESSAGE,
      'grpc.max_receive_message_length': MAX_MESSAGE,
      'grpc.keepalive_time_ms': 30000,
      'grpc.keepalive_timeout_ms': 10000,
      'grpc.initial_reconnect_backoff_ms': RECONNECT_INITIAL_MS,
      'grpc.max_reconnect_backoff_ms': RECONNECT_MAX_MS,
    });
    this._health = null;
    this._channelBytes = new Map();  // device -> its channel data area (ListDevices)
  }

  checkOpen() {
    if (this.closed) throw clientClosed(this.path, false);
  }

  // A unary RPC; deadlineMs null: none.  signal (an AbortSignal or null):
  // already aborted, the RPC rejects with AbortError (`what` names it) and
  // nothing is sent; aborted while the RPC is under way, it rejects with
  // AbortError and the RPC is cancelled (kupd lets go of what it held or
  // waited for: docs/gateway.md) -- unless kupd's reply has already reached
  // the client: that one is not thrown away (a received message, a granted
  // lease), the RPC resolves with it.
  _unary(method, request, deadlineMs, { stub = this.stub, signal = null, what = method } = {}) {
    if (signal && signal.aborted) return Promise.reject(abortError(what, signal));
    this.checkOpen();
    return new Promise((resolve, reject) => {
      const opts = deadlineMs === null ? {} : { deadline: new Date(Date.now() + deadlineMs) };
      let unlisten = null;
      const settle = (f) => (v) => {
        this.inflight.delete(entry);
        if (unlisten) unlisten();
        f(v);
      };
      const entry = { reject: settle(reject), call: null, replied: false };
      if (signal) opts.interceptors = [replyWatch(entry)];
      this.inflight.add(entry);
      try {
        entry.call = stub[method](request, opts, (err, resp) => {
          if (err) entry.reject(errorFromGrpc(err));
          else settle(resolve)(resp);
        });
      } catch (err) {
        this.inflight.delete(entry);
        throw err;
      }
      if (signal) {
        unlisten = onAbort(signal, () => {
          if (entry.replied) return;
          entry.reject(abortError(what, signal));
          entry.call.cancel();
        });
      }
    });
  }

  // Ends the client: its open Sessions and Watches are cancelled (kupd
  // releases their leases), RPCs under way reject with InvalidArgument
  // "client of PATH was closed while the operation waited", later ones with
  // "client of PATH is closed".
  close() {
    if (this.closed) return;
    this.closed = true;
    for (const core of [...this.live]) {
      dropped.unregister(core);
      core.abort();
    }
    for (const entry of [...this.inflight]) {
      entry.reject(clientClosed(this.path, true));
      entry.call.cancel();
    }
    this.inflight.clear();
    this.stub.close();
  }

  // Devices kupd serves (or only `device`), with channel states.  Every
  // method below takes opts {signal} (an AbortSignal) last: see _unary.
  async listDevices(device, opts) {
    return this._listDevices(device, UNARY_DEADLINE_MS, signalOf(opts, 'listDevices'));
  }

  async _listDevices(device, deadlineMs, signal = null) {
    const request = { device: deviceFilterArg(device) };
    const resp = await this._unary('ListDevices', request, deadlineMs, { signal, what: 'listDevices' });
    const devices = resp.devices.map(toDevice);
    for (const d of devices) {
      // each device's channel data area: a Session's TooBig names the limit
      if (d.reachable && d.pages_per_channel && d.page_size) {
        this._channelBytes.set(d.name, d.pages_per_channel * d.page_size);
      }
    }
    return devices;
  }

  // Request/reply without holding a channel.  Resolves to {data, kind, seq, channel}.
  // An aborted Call is cancelled: kupd takes it out of the pool's queue, or
  // gives its pool channel back once the module answered or the channel's
  // quarantine is over (as for a Call past its deadline).
  async call(device, data, opts) {
    const { timeoutMs, caller, signal } = optionsArg(opts, ['timeoutMs', 'caller', 'signal'], 'call');
    const none = timeoutMs === undefined || timeoutMs === null;
    const request = {
      device: deviceArg(device),
      data: dataArg(data),
      timeout_ms: none ? 0 : msArg(timeoutMs, false, 'timeoutMs'),
      caller: caller === undefined || caller === null ? this.caller : callerArg(caller),
    };
    const resp = await this._unary('Call', request, none ? null : request.timeout_ms + DEADLINE_SLACK_MS,
      { signal: signalArg(signal), what: `call to ${device}` });
    return { ...toMessage(resp.reply), channel: resp.channel };
  }

  // A Session holding channel `channel` of `device` (null: any free one).
  // opts {signal}: aborted while kupd attaches, the stream is cancelled and
  // kupd keeps no lease (see docs/gateway.md).
  async openSession(device, channel, opts) {
    // checked before the stream exists: a stream opened and cancelled unused
    // kept node from exiting
    deviceArg(device);
    channelArg(channel);
    const signal = signalOf(opts, 'openSession');
    if (signal && signal.aborted) throw abortError(`session on ${device}: attach`, signal);
    this.checkOpen();
    const s = new Session(this);
    try {
      await s.attach(device, channel, signal);
    } catch (err) {
      s.closed = true;
      dropped.unregister(s._core);
      s._core.abort();
      throw err;
    }
    return s;
  }

  // Device and lease events of `device` (null / '': every device); with
  // initialState the current state first, as events with initial = true.
  // signal: ends the Watch when aborted (see WatchCore); one already
  // aborted throws its AbortError here, nothing sent.
  watch(device, opts) {
    const { initialState = false, signal } = optionsArg(opts, ['initialState', 'signal'], 'watch');
    if (typeof initialState !== 'boolean') {
      throw new TypeError(`initialState must be a boolean, not ${describe(initialState)}`);
    }
    const request = { device: deviceFilterArg(device), initial_state: initialState };
    const sig = signalArg(signal);
    if (sig && sig.aborted) throw abortError(`watch of ${request.device || 'every device'}`, sig);
    this.checkOpen();
    return new Watch(this, request, sig);
  }

  // The health status name ('SERVING', 'NOT_SERVING', ...) of `service`
  // ('' or 'kup.v1.Kup': kupd as a whole; 'kup.v1.Kup/DEVICE': one device).
  async health(service = '', opts) {
    textArg(service, 'service');
    const signal = signalOf(opts, 'health');
    if (signal && signal.aborted) throw abortError('health', signal);
    this.checkOpen();
    if (!this._health) {
      const Health = loadHealth();
      this._health = new Health('unused', grpc.credentials.createInsecure(),
        { channelOverride: this.stub.getChannel() });
    }
    const resp = await this._unary('Check', { service }, UNARY_DEADLINE_MS,
      { stub: this._health, signal, what: 'health' });
    return String(resp.status);
  }

  // -- leases: Attach / Send / Receive / Pass / Release -------------------

  // A lease on a channel (any free one when channel is null / undefined).
  // Aborted while kupd waits for the channel, kupd takes no lease; one
  // whose reply had reached the client is returned (see _unary).  One given
  // up on -- aborted, or past its deadline -- leaves no lease behind: kupd
  // may have granted it and written the reply as the abort or the deadline
  // came (gRPC then drops the reply), so the attach names itself with a
  // random attach_id and, given up on, releases by that name
  // (Release{attach_id}: kupd ends the lease it granted, or grants none)
  // before it rejects -- within DEADLINE_SLACK_MS, best effort.  A signal
  // aborted before the attach sends nothing at all.  opts.timeoutMs: how
  // long to wait for the lease, ms (> 0; undefined / null:
  // ATTACH_DEADLINE_MS, 30 s) -- the RPC's deadline (kupd has no attach
  // timeout of its own), given up on as the default one is.
  async attach(device, channel, opts) {
    const request = { device: deviceArg(device), attach_id: crypto.randomBytes(16).toString('hex') };
    if (channelArg(channel) !== null) request.channel = channel;
    const { signal: sig, timeoutMs } = optionsArg(opts, ['signal', 'timeoutMs'], 'attach');
    const signal = signalArg(sig);
    const deadlineMs = timeoutMs === undefined || timeoutMs === null
      ? module.exports.ATTACH_DEADLINE_MS : msArg(timeoutMs, false, 'timeoutMs');
    const sent = !(signal && signal.aborted);
    try {
      return toLease(await this._unary('Attach', request, deadlineMs,
        { signal, what: `attach to ${device}` }));
    } catch (err) {
      const gaveUp = err instanceof AbortError ||
        (err.code === S.DEADLINE_EXCEEDED && !err.fromKupd);
      if (gaveUp && sent && !this.closed) {
        await this._unary('Release', { attach_id: request.attach_id }, DEADLINE_SLACK_MS).catch(() => {});
      }
      throw err;
    }
  }

  // An aborted leaseSend / leasePass / release may or may not have reached
  // kupd: the lease's next operation tells (NotYourTurn, NotFound, ...).
  // After a receive on the lease given up on, leaseSend and leasePass (and
  // leaseExchange) carry its name (again_of): kupd refuses one over the
  // message it wrote for that receive, which this client never got --
  // NotYourTurn, nothing sent -- and the name stays for the leaseReceive
  // that gets the message.  opts.againOf: that name, given by a program
  // whose receives outlive the client (see leaseReceive), in place of the
  // client's own.
  async leaseSend(leaseId, data, opts) {
    const request = { lease_id: leaseArg(leaseId), data: dataArg(data) };
    const { signal, againOf } = this._afterOpts(opts, 'leaseSend');
    const pending = this.again.get(leaseId) || '';
    request.again_of = againOf === null ? pending : againOf;
    await this._unary('Send', request, UNARY_DEADLINE_MS, { signal, what: `leaseSend on lease ${leaseId}` });
    this._succeeded(leaseId, pending);
  }

  // {signal, againOf} of leaseSend's and leasePass's options, checked.
  _afterOpts(opts, what) {
    const { signal, againOf } = optionsArg(opts, ['signal', 'againOf'], what);
    return { signal: signalArg(signal), againOf: receiveNameArg(againOf, 'againOf') };
  }

  // {signal, receiveId, againOf} of leaseReceive's and leaseExchange's
  // options, checked.
  _receiveOpts(opts, what) {
    const { signal, receiveId, againOf } = optionsArg(opts, ['signal', 'receiveId', 'againOf'], what);
    return {
      signal: signalArg(signal),
      receiveId: receiveNameArg(receiveId, 'receiveId'),
      againOf: receiveNameArg(againOf, 'againOf'),
    };
  }

  // The lease's receive given up on (named receiveId): its name is the one
  // the lease's next receive asks for again (_leaseReply).
  _gaveUp(leaseId, receiveId) {
    this.again.delete(leaseId);  // to the end of the Map's order
    this.again.set(leaseId, receiveId);
    while (this.again.size > AGAIN_KEPT) this.again.delete(this.again.keys().next().value);
  }

  // An operation on the lease that started while `pending` was its name
  // given up on ('' none) succeeded: kupd ran it after that one, whose
  // message it no longer keeps.  A name given up on meanwhile stays.
  _succeeded(leaseId, pending) {
    if ((this.again.get(leaseId) || '') === pending) this.again.delete(leaseId);
  }

  // A lease Receive, or Send with wait_reply, named by a random receive_id:
  // kupd keeps the message it answers with until the lease's next
  // operation.  Given up on -- aborted, past its deadline -- its reply may
  // have been written all the same (grpc-js drops a reply that comes after
  // the cancel): the lease's next leaseReceive names it (again_of) and kupd
  // answers that with the same message.  Until one of the lease's
  // operations succeeds, its receives and exchanges take the name of the
  // one given up on as their own: the next one may fail before kupd ran it
  // (refused by the tenant's channel_ops_per_second, its connection lost),
  // or run and be given up on in turn, and either way the name kupd kept
  // is the one the next receive asks for.  A signal aborted before sends
  // nothing and changes nothing.  An exchange names it too (again_of, as
  // leaseSend): refused NotYourTurn over the message kupd kept for it.
  // names {receiveId, againOf} (null: the client's own) take the place of
  // those, as Python's ReceiveNames.names: the caller's againOf is this
  // one's own name too unless it gives receiveId.
  async _leaseReply(method, request, leaseId, deadlineMs, opts, names) {
    const pending = this.again.get(leaseId) || '';
    const ask = names.againOf === null ? pending : names.againOf;
    const receiveId = names.receiveId || ask || crypto.randomBytes(16).toString('hex');
    request.receive_id = receiveId;
    request.again_of = ask;
    const sent = !(opts.signal && opts.signal.aborted);
    let resp;
    try {
      resp = await this._unary(method, request, deadlineMs, opts);
    } catch (err) {
      const gaveUp = err instanceof AbortError ||
        (err.code === S.DEADLINE_EXCEEDED && !err.fromKupd);
      if (gaveUp && sent) this._gaveUp(leaseId, receiveId);
      throw err;
    }
    // A receive that found nothing keeps the name: kupd answers a
    // non-blocking one at once while another operation holds the lease --
    // such as the one given up on, still under way in kupd, which may
    // write yet.  (An exchange always runs: its send did.)
    if (!(method === 'Receive' && resp.not_ready)) this._succeeded(leaseId, pending);
    return resp;
  }

  // timeoutMs as Session.receive: undefined blocks, 0 resolves null when
  // nothing is there, > 0 waits at most that long.  Aborted, the lease
  // stays and loses nothing: a message kupd took for the aborted receive
  // is kept for the lease's next receive, and one whose reply kupd wrote
  // as the abort came is that receive's again (_leaseReply).
  //
  // Within one client, leave opts.receiveId and opts.againOf out.  A
  // program whose receives outlive the client (a new process each time,
  // as `kupctl recv`) gives them itself: receiveId, the name this receive
  // carries; againOf, the name of the lease's receive given up on -- kupd
  // answers with the message it wrote for that one, if it did, else this
  // is a receive like any other; this receive then carries that name too,
  // unless receiveId is given.  Up to 64 of [A-Za-z0-9_-]; a bad one is a
  // TypeError / RangeError naming it, nothing sent.
  async leaseReceive(leaseId, timeoutMs, opts) {
    const { mode, timeout_ms } = receiveMode(timeoutMs);
    const request = { lease_id: leaseArg(leaseId), mode, timeout_ms };
    const { signal, ...names } = this._receiveOpts(opts, 'leaseReceive');
    return fromReceived(await this._leaseReply('Receive', request, leaseId,
      deadlineFor(timeoutMs), { signal, what: `leaseReceive on lease ${leaseId}` }, names));
  }

  // Send with wait_reply: the data and the wait for the reply in one RPC.
  // When the wait fails (DeadlineExceeded) the data was sent and the reply
  // is still owed: leaseReceive gets it.  Aborted, the same once kupd had
  // sent the data; an abort that came first sent nothing, and leaseReceive
  // is then NotYourTurn (the turn is still this side's: send again).
  // opts.receiveId / opts.againOf as leaseReceive's (its Send carries
  // both): againOf refuses it, NotYourTurn and nothing sent, over the
  // message kupd kept for that name, as leaseSend's does.
  async leaseExchange(leaseId, data, timeoutMs, opts) {
    const { mode, timeout_ms } = receiveMode(timeoutMs);
    const request = {
      lease_id: leaseArg(leaseId),
      data: dataArg(data),
      wait_reply: true,
      reply_mode: mode,
      reply_timeout_ms: timeout_ms,
    };
    const { signal, ...names } = this._receiveOpts(opts, 'leaseExchange');
    const resp = await this._leaseReply('Send', request, leaseId, deadlineFor(timeoutMs),
      { signal, what: `leaseExchange on lease ${leaseId}` }, names);
    // a kupd without wait_reply
    if (!resp.reply) return this.leaseReceive(leaseId, timeoutMs, { signal });
    return fromReceived(resp.reply);
  }

  // opts.againOf as leaseSend's.
  async leasePass(leaseId, opts) {
    const { signal, againOf } = this._afterOpts(opts, 'leasePass');
    const request = { lease_id: leaseArg(leaseId) };
    const pending = this.again.get(leaseId) || '';
    request.again_of = againOf === null ? pending : againOf;  // as leaseSend's
    await this._unary('Pass', request, UNARY_DEADLINE_MS,
      { signal, what: `leasePass on lease ${leaseId}` });
    this._succeeded(leaseId, pending);
  }

  async release(leaseId, opts) {
    const signal = signalOf(opts, 'release');
    if (!(signal && signal.aborted)) this.again.delete(leaseId);
    await this._unary('Release', { lease_id: leaseArg(leaseId) }, UNARY_DEADLINE_MS,
      { signal, what: `release of lease ${leaseId}` });
  }
}

function clientArg(client) {
  if (!(client instanceof Client)) {
    throw new TypeError(`client must be a client made by kup.connect(), not ${describe(client)}`);
  }
  return client;
}

// A client of kupd on the unix socket at socketPath.  opts.caller: the
// Calls' fairness key (default `${os.hostname()}:${process.pid}`).
function connect(socketPath, opts) {
  if (typeof socketPath !== 'string' || socketPath === '') {
    const what = typeof socketPath === 'string' ? "''" : describe(socketPath);
    throw new TypeError(`socketPath must be a non-empty string, not ${what}`);
  }
  return new Client(socketPath, optionsArg(opts, ['caller'], 'connect'));
}

// The functions of the first versions of this client, kept: the methods.
async function call(client, device, data, opts) {
  return clientArg(client).call(device, data, opts);
}

async function listDevices(client, device, opts) {
  return clientArg(client).listDevices(device, opts);
}

async function openSession(client, device, channel, opts) {
  return clientArg(client).openSession(device, channel, opts);
}

module.exports = {
  ...ERRORS,
  AbortError,
  // The deadline of an Attach, ms (kupd itself waits up to 10 s for a
  // channel its module has not let go of): read at each attach.
  ATTACH_DEADLINE_MS: UNARY_DEADLINE_MS,
  Client,
  MAX_MESSAGE,
  MAX_PAYLOAD,
  PROTO_FILE,
  PROTO_ROOT,
  Session,
  Watch,
  call,
  connect,
  errorFromGrpc,
  grpc,
  isConnectionFailure,
  listDevices,
  loadKup,
  openSession,
};
