// SPDX-License-Identifier: BSD-2-Clause
//
// kupclient.hpp -- the C++ client of the kupd gateway (C++17).
//
// Synchronous and RAII; the Python client (clients/python/kupclient) is the
// reference: the same operations, the same errors, the same argument
// checks.  It talks kup.v1 (protos/kup/v1/kup.proto) over kupd's unix
// socket with grpc++.  docs/gateway.md, "C++ client", has the contract.
//
//   kup::Client c("/run/kupd/kupd.sock");          // caller "host:pid" unless given
//   for (const kup::DeviceInfo& d : c.list_devices()) ...
//   kup::CallReply r = c.call("echo", "ping");     // r.data, r.kind, r.seq, r.channel
//   kup::Session s = c.open("echo");               // a Session stream; channel: any free
//   s.receive();                                   // the kernel's opening hand-over (a PASS)
//   s.send("hello");
//   auto m = s.receive(kup::ms(5000));             // std::nullopt only for a timeout of 0
//   auto x = s.exchange("again", kup::ms(5000));   // send + receive in one request
//   s.pass();
//   s.close();                                     // or its destructor: the lease ends
//   kup::Lease l = c.attach("echo");               // lease_send / lease_receive /
//   //   lease_exchange / lease_pass / release(l.lease_id)
//   kup::Watch w = c.watch("echo", true);          // while (auto ev = w.next()) ...; w.cancel()
//   c.health();                                    // "SERVING"
//
// Errors: every failure kupd (or gRPC) reports is a kup::Error subclass
// named as kupd's classes (kupd/errors.py); a refused argument is a
// kup::ArgumentError (a std::invalid_argument), thrown before anything is
// sent.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace kup {

// ---------------------------------------------------------------- errors

// gRPC's status code numbers (grpc::StatusCode), so that this header needs
// no grpc++ include.
enum class StatusCode : int {
    OK = 0,
    CANCELLED = 1,
    UNKNOWN = 2,
    INVALID_ARGUMENT = 3,
    DEADLINE_EXCEEDED = 4,
    NOT_FOUND = 5,
    ALREADY_EXISTS = 6,
    PERMISSION_DENIED = 7,
    RESOURCE_EXHAUSTED = 8,
    FAILED_PRECONDITION = 9,
    ABORTED = 10,
    OUT_OF_RANGE = 11,
    UNIMPLEMENTED = 12,
    INTERNAL = 13,
    UNAVAILABLE = 14,
    DATA_LOSS = 15,
    UNAUTHENTICATED = 16,
};

// Base of every error of kupd's taxonomy.  what() is kupd's message (or the
// client's own), kind() the class name ("NotFound": the kup-error trailing
// metadata), kup_code() the KUP_E_* number of the class (NotFound: 1009; 0
// for PermissionDenied, ResourceExhausted, Unavailable), grpc_code() the
// status the client received it as (kupd's answer or gRPC's own failure),
// std::nullopt for an error the client raised itself with no status (a
// TooBig refused before sending, a closed client or session).  from_kupd()
// is true for kupd's answers (the status carried kup-error), false for
// gRPC's own failures and the client's own refusals.  retry_after() is how
// long until kupd may admit a request it refused, rounded up, when kupd
// said (kup-retry-after-ms, or a Session's in-band retry_after_ms: a Call
// over the tenant's calls_per_second, an operation over its
// channel_ops_per_second) -- no sooner, but no promise: another client of
// the tenant may take that turn; std::nullopt otherwise.
class Error : public std::runtime_error {
public:
    Error(const std::string& message, std::optional<StatusCode> grpc_code, bool from_kupd,
          std::optional<std::chrono::milliseconds> retry_after = std::nullopt);
    virtual const char* kind() const noexcept { return "KupError"; }
    virtual int kup_code() const noexcept { return 0; }
    std::optional<StatusCode> grpc_code() const noexcept { return grpc_code_; }
    bool from_kupd() const noexcept { return from_kupd_; }
    std::optional<std::chrono::milliseconds> retry_after() const noexcept { return retry_after_; }
    // An Unavailable that gRPC itself raised: kupd could not be reached, or
    // the connection to it broke (Python's is_connection_failure).
    bool is_connection_failure() const noexcept;

private:
    std::optional<StatusCode> grpc_code_;
    bool from_kupd_;
    std::optional<std::chrono::milliseconds> retry_after_;
};

#define KUP_ERROR_CLASS(NAME, BASE, CODE)                                                       \
    class NAME : public BASE {                                                                  \
    public:                                                                                     \
        using BASE::BASE;                                                                       \
        const char* kind() const noexcept override { return #NAME; }                            \
        int kup_code() const noexcept override { return CODE; }                                 \
    };

KUP_ERROR_CLASS(Shutdown, Error, 1001)          // EKU_SHUTDOWN: device or kupd shutting down
KUP_ERROR_CLASS(NotReady, Error, 1002)          // EKU_NOTREADY: channel not announced yet
KUP_ERROR_CLASS(NotYourTurn, Error, 1003)       // EKU_NOTTURN
KUP_ERROR_CLASS(TooBig, Error, 1004)            // EKU_TOOBIG: nothing was sent
KUP_ERROR_CLASS(DeadlineExceeded, Error, 1005)  // EKU_TIMEDOUT
KUP_ERROR_CLASS(ProtocolError, Error, 1006)     // EKU_PROTO
KUP_ERROR_CLASS(VersionMismatch, Error, 1007)   // EKU_VERSION
KUP_ERROR_CLASS(Busy, Error, 1008)              // EKU_BUSY: held by someone else
KUP_ERROR_CLASS(Releasing, Busy, 1013)          // EKU_RELEASING: its module still holds it
KUP_ERROR_CLASS(NotFound, Error, 1009)          // EKU_NOENT: device, channel or lease
KUP_ERROR_CLASS(PeerGone, Error, 1010)          // EKU_PEER: the kernel side left
KUP_ERROR_CLASS(InvalidArgument, Error, 1011)   // EKU_INVAL (kupd's, or a closed object)
KUP_ERROR_CLASS(SystemFailure, Error, 1012)     // EKU_SYS
KUP_ERROR_CLASS(PermissionDenied, Error, 0)     // the tenant's policy
KUP_ERROR_CLASS(ResourceExhausted, Error, 0)    // a limit of kupd
KUP_ERROR_CLASS(Unavailable, Error, 0)          // kupd unreachable, or a device

#undef KUP_ERROR_CLASS

// An argument the client refused before sending anything; the message names
// it (Python's ArgumentValueError).
class ArgumentError : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

// ---------------------------------------------------------------- types

using ms = std::chrono::milliseconds;
// A receive's timeout: std::nullopt blocks, 0 does not wait, > 0 waits at
// most that long (then DeadlineExceeded).
using Timeout = std::optional<ms>;

// The largest payload kupd's messages carry: gRPC's message limit on both
// ends (4 MiB + 64 KiB) less its 64 KiB of headroom for the envelope.
constexpr std::size_t MAX_GRPC_MESSAGE = 4 * 1024 * 1024 + 64 * 1024;
constexpr std::size_t MAX_PAYLOAD = MAX_GRPC_MESSAGE - 64 * 1024;
// How long past an operation's own timeout the client waits for kupd's
// answer (kupd applies the timeout itself): Python's KUPD_GRACE.
constexpr ms KUPD_GRACE{5000};
// How long an attach waits for its lease unless its caller says (attach's
// timeout): Python's ATTACH_DEADLINE, Node's ATTACH_DEADLINE_MS.
constexpr ms ATTACH_DEADLINE{30000};

enum class Kind : int { Data = 1, Pass = 2, Close = 3 };
const char* kind_name(Kind k) noexcept;  // "data", "pass", "close"

struct Message {
    std::string data;  // the payload's bytes
    Kind kind = Kind::Data;
    std::uint64_t seq = 0;
};

// A Call's reply, and the pool channel that carried it.
struct CallReply : Message {
    std::uint32_t channel = 0;
};

struct ChannelInfo {
    std::uint32_t id = 0;
    // "free", "session", "lease", "calls", "quarantined", "external",
    // "module", "not_announced"
    std::string state;
    std::string lease_id;
};

struct DeviceInfo {
    std::string name;
    bool reachable = false;
    std::uint32_t abi_version = 0;
    std::uint32_t page_size = 0;
    std::uint32_t channel_count = 0;
    std::uint32_t announced = 0;
    std::uint32_t pages_per_channel = 0;
    std::uint64_t max_message_bytes = 0;
    std::uint64_t notify_gen = 0;
    bool shutting_down = false;
    std::uint32_t call_channels = 0;
    std::string error;
    std::uint32_t calls_in_flight = 0;
    std::uint32_t calls_queued = 0;
    std::vector<ChannelInfo> channels;
    bool drained = false;
    std::uint32_t not_answering_ms = 0;
    std::string calls_tenant;
    bool cannot_attach = false;
};

// The names of a lease receive, for a program whose receives outlive the
// client (a new process each time, as `kupctl recv`); within one client,
// leave them out (the client names its receives itself).  Each is
// std::nullopt (the client's own) or up to 64 of [A-Za-z0-9_-], what kupd
// takes; anything else, "" included, is an ArgumentError naming it,
// nothing sent.
//   receive_id: the name this lease_receive / lease_exchange carries: kupd
//     keeps the message it answers with, and the next process's receive
//     naming it (again_of) gets it should this one be given up on.
//   again_of: the name of the lease's receive (or exchange) given up on.
//     A lease_receive naming it gets the message kupd kept for it (else it
//     is a receive like any other); a lease_send, lease_pass or
//     lease_exchange naming it is NotYourTurn, nothing sent, while that
//     message is a DATA one.  A receive or exchange with again_of and no
//     receive_id carries that name on.
// Either takes the place of the name the client would have used.
// lease_send and lease_pass take again_of only.
struct ReceiveNames {
    std::optional<std::string> receive_id;
    std::optional<std::string> again_of;
};

struct Lease {
    std::string lease_id;
    std::string device;
    std::uint32_t channel = 0;
    std::uint64_t max_message_bytes = 0;
    std::uint32_t idle_timeout_ms = 0;
};

enum class EventType : int {
    DEVICE_APPEARED = 1,
    DEVICE_GONE = 2,
    CHANNELS_ANNOUNCED = 3,
    DEVICE_SHUTTING_DOWN = 4,
    LEASE_TAKEN = 5,
    LEASE_RELEASED = 6,
    SERVER_SHUTTING_DOWN = 7,
    DEVICE_DRAINED = 8,
    DEVICE_UNDRAINED = 9,
};
const char* event_name(EventType t) noexcept;  // "LEASE_TAKEN", ...

struct WatchEvent {
    EventType type = EventType::DEVICE_APPEARED;
    std::string device;
    std::uint32_t channel = 0;
    std::string lease_id;
    std::string holder;  // "session" or "lease"
    std::uint32_t announced = 0;
    std::uint64_t notify_gen = 0;
    std::string reason;
    bool initial = false;
    std::int64_t time_unix_ms = 0;
};

// ---------------------------------------------------------------- client

namespace detail {
struct ClientCore;
struct SessionCore;
struct WatchCore;
}  // namespace detail

class Session;
class Watch;

// A connection to kupd on a unix socket (gRPC connects at the first RPC and
// again after kupd restarts).  Thread-safe: its methods may be called from
// several threads at once.  close() (or the destructor) ends its open
// Sessions and Watches too: an operation waiting on one fails with
// InvalidArgument "... was closed while the operation waited", a later one
// with "client of PATH is closed" / "channel N of DEV is closed".
//
// fork(): gRPC C++ does not support it (a child shares the parent's
// connection and gRPC's poller: any gRPC use there takes the parent's
// traffic).  The parent's objects go on unaffected.  In the child, a
// Client, Session or Watch made before the fork refuses every operation
// with InvalidArgument "... was created in process N and cannot be used
// after fork(); ...", and so does making a new Client; close(), cancel()
// and the destructors do nothing there (the objects are left undestroyed).
// A child may exec (its program makes its own Client) or _exit.
class Client {
public:
    // path: kupd's socket (non-empty; "unix:PATH" as well).  caller: the Call
    // fairness key, "host:pid" when not given.
    explicit Client(const std::string& path, std::optional<std::string> caller = std::nullopt);
    ~Client();
    Client(const Client&) = delete;
    Client& operator=(const Client&) = delete;
    Client(Client&&) noexcept;
    Client& operator=(Client&&) noexcept;

    const std::string& path() const;
    const std::string& caller() const;
    void close();

    // Devices kupd serves (or only `device`; "" for all), with channel states.
    std::vector<DeviceInfo> list_devices(std::string_view device = "");
    // The health status name ("SERVING", "NOT_SERVING", ...) of `service`.
    std::string health(std::string_view service = "");

    // Request/reply over the device's Call pool.  timeout: std::nullopt is
    // kupd's call_timeout; else > 0.
    CallReply call(std::string_view device, std::string_view data,
                   std::optional<ms> timeout = std::nullopt);

    // A Session holding `channel` of `device` (std::nullopt: any free one)
    // for as long as the returned object lives (or until its close()).
    Session open(std::string_view device, std::optional<std::uint32_t> channel = std::nullopt);

    // Device and lease events (`device` "" for every device).
    Watch watch(std::string_view device = "", bool initial_state = false);

    // Leases: an Attach lease on a channel, used by id with the unary RPCs.
    // After a lease_receive / lease_exchange past its deadline whose reply
    // kupd had written (gRPC drops it), the lease's next lease_receive gets
    // that message; a lease_send, lease_pass or lease_exchange before it is
    // NotYourTurn, nothing sent, instead of dropping it.
    //
    // attach's timeout: how long to wait for the lease (> 0; std::nullopt:
    // ATTACH_DEADLINE, 30 s) -- the RPC's deadline (kupd has no attach
    // timeout of its own).  Past it, DeadlineExceeded, and the client
    // releases by the attach's random attach_id (within KUPD_GRACE, best
    // effort) before it throws: a lease kupd granted as it passed does not
    // stay.  (An overload, not a defaulted parameter, so that the two-
    // argument attach keeps its type: test/api_compat.cpp.)
    Lease attach(std::string_view device, std::optional<std::uint32_t> channel = std::nullopt);
    Lease attach(std::string_view device, std::optional<std::uint32_t> channel,
                 std::optional<ms> timeout);
    void lease_send(std::string_view lease_id, std::string_view data);
    void lease_send(std::string_view lease_id, std::string_view data, const ReceiveNames& names);
    void lease_pass(std::string_view lease_id);
    void lease_pass(std::string_view lease_id, const ReceiveNames& names);
    // std::nullopt only when timeout is 0 and nothing is there yet.
    std::optional<Message> lease_receive(std::string_view lease_id, Timeout timeout = std::nullopt);
    std::optional<Message> lease_receive(std::string_view lease_id, Timeout timeout,
                                         const ReceiveNames& names);
    // Send and wait for the reply in one RPC; a failed wait leaves the data
    // sent and the reply owed (lease_receive gets it).
    std::optional<Message> lease_exchange(std::string_view lease_id, std::string_view data,
                                          Timeout timeout = std::nullopt);
    std::optional<Message> lease_exchange(std::string_view lease_id, std::string_view data,
                                          Timeout timeout, const ReceiveNames& names);
    void release(std::string_view lease_id);

private:
    std::shared_ptr<detail::ClientCore> core_;
};

// One channel held through a Session stream.  Operations are serialised (one
// at a time); close() may be called from another thread while one waits (it
// then fails with InvalidArgument "channel N of DEV was closed while the
// operation waited").  The destructor is close(): the stream is ended and
// kupd lets go of the lease before it returns (or, kupd not answering,
// after KUPD_GRACE, cancelling the stream).
class Session {
public:
    ~Session();
    Session(Session&&) noexcept;
    Session& operator=(Session&&) noexcept;
    Session(const Session&) = delete;
    Session& operator=(const Session&) = delete;

    const Lease& lease() const;
    std::uint32_t channel() const;
    const std::string& device() const;
    // The largest message this session may send (the lease's max_message_bytes).
    std::uint64_t max_message_bytes() const;

    // Send `data` and hand the turn to the kernel (TooBig, nothing sent, over
    // max_message_bytes()).
    void send(std::string_view data);
    // Hand the turn over without data.
    void pass();
    // The kernel's next message: std::nullopt blocks, 0 does not wait
    // (std::nullopt returned when nothing is there), > 0 at most that long
    // (DeadlineExceeded).  Should kupd not answer within the timeout plus
    // KUPD_GRACE, DeadlineExceeded and the session is ended.
    std::optional<Message> receive(Timeout timeout = std::nullopt);
    // send + receive as one request on the stream.  A refused send sent
    // nothing; a failed wait leaves the reply owed (receive gets it).
    std::optional<Message> exchange(std::string_view data, Timeout timeout = std::nullopt);
    // End the session; kupd releases the lease.  Idempotent.
    void close();

private:
    friend class Client;
    explicit Session(std::unique_ptr<detail::SessionCore> core);
    std::unique_ptr<detail::SessionCore> core_;
};

// A stream of WatchEvents.  next() blocks for the next one and returns
// std::nullopt once cancel() ended the stream.  kupd ending it throws: its
// shutdown Shutdown (after the SERVER_SHUTTING_DOWN event), kupd dying or
// unreachable Unavailable (is_connection_failure()); every later next()
// throws that error again.  The client's close() ends it with
// InvalidArgument ("client of PATH was closed while the operation waited",
// then "... is closed").  cancel() may be called from another thread.  The
// destructor cancels.
class Watch {
public:
    ~Watch();
    Watch(Watch&&) noexcept;
    Watch& operator=(Watch&&) noexcept;
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

    std::optional<WatchEvent> next();
    void cancel();

private:
    friend class Client;
    explicit Watch(std::unique_ptr<detail::WatchCore> core);
    std::unique_ptr<detail::WatchCore> core_;
};

}  // namespace kup
