// SPDX-License-Identifier: BSD-2-Clause
//
// The C++ client of kupd: kup::Client, kup::Session, kup::Watch
// (include/kupclient.hpp).  clients/python/kupclient/client.py is the
// reference; where this differs, the comment says why.
#include <grpcpp/grpcpp.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdint>
#include <limits.h>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "health.grpc.pb.h"
#include "internal.hpp"
#include "kup/v1/kup.grpc.pb.h"

namespace pb = ::kup::v1;

namespace kup {

const char* kind_name(Kind k) noexcept {
    switch (k) {
    case Kind::Data: return "data";
    case Kind::Pass: return "pass";
    case Kind::Close: return "close";
    }
    return "unknown";
}

const char* event_name(EventType t) noexcept {
    switch (t) {
    case EventType::DEVICE_APPEARED: return "DEVICE_APPEARED";
    case EventType::DEVICE_GONE: return "DEVICE_GONE";
    case EventType::CHANNELS_ANNOUNCED: return "CHANNELS_ANNOUNCED";
    case EventType::DEVICE_SHUTTING_DOWN: return "DEVICE_SHUTTING_DOWN";
    case EventType::LEASE_TAKEN: return "LEASE_TAKEN";
    case EventType::LEASE_RELEASED: return "LEASE_RELEASED";
    case EventType::SERVER_SHUTTING_DOWN: return "SERVER_SHUTTING_DOWN";
    case EventType::DEVICE_DRAINED: return "DEVICE_DRAINED";
    case EventType::DEVICE_UNDRAINED: return "DEVICE_UNDRAINED";
    }
    return "UNKNOWN";
}

namespace detail {
namespace {

// A monotonic deadline `t` from now, as the completion queue takes it.
gpr_timespec after(ms t) {
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_millis(static_cast<std::int64_t>(t.count()), GPR_TIMESPAN));
}

// Deadline of the short unary RPCs (ListDevices, Attach, Send, ...), as Python's.
constexpr ms SHORT_RPC{30000};
// Channel ids and timeouts travel as uint32 (milliseconds).
constexpr std::int64_t MAX_TIMEOUT_MS = 0xFFFFFFFFLL;
// kupclient._types: reconnect settings (why: see there); the keepalive
// ones are in internal.hpp.
constexpr int RECONNECT_INITIAL_MS = 100;
constexpr int RECONNECT_MAX_MS = 1000;

// ---------------------------------------------------------------- arguments

// Seconds as a short decimal ("5", "5.3").
std::string seconds_text(ms t) {
    char buf[32];
    snprintf(buf, sizeof buf, "%g", static_cast<double>(t.count()) / 1000.0);
    return buf;
}

std::string text_arg(std::string_view value, const char* name) {
    if (!valid_utf8(value))
        throw ArgumentError(std::string(name) + " must be valid UTF-8 text, not " + quote(value));
    return std::string(value);
}

std::string socket_arg(const std::string& path) {
    std::string p = text_arg(path, "socket path");
    if (p.empty() || p == "unix:")
        throw ArgumentError(
            "socket path must not be empty (kupd's unix socket, e.g. /run/kupd/kupd.sock)");
    return p;
}

std::string device_arg(std::string_view device) {
    std::string d = text_arg(device, "device");
    if (d.empty()) throw ArgumentError("device name is required");
    return d;
}

std::string lease_arg(std::string_view lease_id) {
    std::string l = text_arg(lease_id, "lease id");
    if (l.empty()) throw ArgumentError("lease id is required");
    return l;
}

// A request name the caller gave (ReceiveNames): std::nullopt, or up to
// 64 of [A-Za-z0-9_-] (kupapi.defaults.request_name_error, kupd's rule).
std::optional<std::string> name_arg(const std::optional<std::string>& value, const char* name) {
    if (!value) return std::nullopt;
    const std::string& v = *value;
    constexpr std::size_t MAX = 64;
    if (v.empty())
        throw ArgumentError(std::string(name) + " must not be empty (leave it out: std::nullopt)");
    // (characters, not bytes: a name of 64 characters of which one is not
    // ASCII is too long for nothing but that character, as in Python)
    if (std::size_t n = characters(v); n > MAX)
        throw ArgumentError(std::string(name) + " of " + std::to_string(n) +
                            " characters: at most " + std::to_string(MAX));
    for (char ch : v) {
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                  ch == '_' || ch == '-';
        if (!ok)
            throw ArgumentError(std::string(name) + " " + quote(v) +
                                ": only letters, digits, '_' and '-'");
    }
    return v;
}

std::string data_arg(std::string_view data, const char* name = "data") {
    if (data.size() > MAX_PAYLOAD)
        throw_too_big(std::string(name) + " of " + std::to_string(data.size()) +
                      " bytes is larger than any message kupd carries (" +
                      std::to_string(MAX_PAYLOAD) + " bytes, gRPC's limit)");
    return std::string(data);
}

// A timeout: >= 0 ms (> 0 unless zero_ok), at most what uint32 ms holds.
void timeout_arg(const std::optional<ms>& timeout, bool zero_ok) {
    if (!timeout) return;
    auto n = timeout->count();
    if (n < 0 || (n == 0 && !zero_ok))
        throw ArgumentError(std::string("timeout must be std::nullopt or ") +
                            (zero_ok ? ">= 0" : "> 0") + " ms, not " + std::to_string(n));
    if (n > MAX_TIMEOUT_MS)
        throw ArgumentError("timeout must be at most " + std::to_string(MAX_TIMEOUT_MS) +
                            " ms (uint32 milliseconds on the wire), not " + std::to_string(n));
}

// (mode, timeout_ms) of a receive's timeout: std::nullopt blocks, 0 does not wait.
std::pair<pb::ReceiveMode, std::uint32_t> receive_mode(const Timeout& timeout) {
    timeout_arg(timeout, true);
    if (!timeout) return {pb::RECEIVE_MODE_BLOCK, 0};
    if (timeout->count() == 0) return {pb::RECEIVE_MODE_NONBLOCK, 0};
    return {pb::RECEIVE_MODE_DEADLINE, static_cast<std::uint32_t>(timeout->count())};
}

// The client-side bound of an operation with `timeout`: kupd answers the
// timeout itself; the client waits KUPD_GRACE more for that answer.
std::optional<ms> bound_of(const Timeout& timeout) {
    if (!timeout) return std::nullopt;
    return *timeout + KUPD_GRACE;
}

// TooBig when `n` bytes are over the session's `limit` (kupclient._args.check_size:
// the same words, naming which limit it is).
void check_size(std::size_t n, std::uint64_t limit, std::uint32_t chan, const std::string& device,
                std::uint64_t channel_bytes) {
    if (!limit || n <= limit) return;
    std::string where = "channel " + std::to_string(chan) + " of device " + device;
    std::string ns = std::to_string(n), ls = std::to_string(limit);
    if (channel_bytes && limit < channel_bytes)
        throw_too_big("rule max_message_bytes: message of " + ns +
                      " bytes exceeds max_message_bytes=" + ls + " (this tenant's limit; " + where +
                      " itself carries " + std::to_string(channel_bytes) + " bytes)");
    if (channel_bytes)
        throw_too_big("message of " + ns + " bytes exceeds max_message_bytes=" + ls + " of " +
                      where + " (the channel's data area)");
    throw_too_big("message of " + ns + " bytes exceeds max_message_bytes=" + ls + " of " + where +
                  " (its data area, or the tenant's own limit if lower)");
}

std::string default_caller() {
    char host[HOST_NAME_MAX + 1] = {0};
    if (gethostname(host, sizeof host - 1) != 0) host[0] = 0;
    return std::string(host) + ":" + std::to_string(getpid());
}

std::string target_for(const std::string& path) {
    if (path.rfind("unix:", 0) == 0) return path;
    if (!path.empty() && path[0] == '/') return "unix:" + path;
    char cwd[PATH_MAX];
    std::string dir = getcwd(cwd, sizeof cwd) ? cwd : ".";
    return "unix:" + dir + "/" + path;
}

// ---------------------------------------------------------------- conversions

Message message_of(const pb::Message& m) {
    Message out;
    out.data = m.data();
    out.kind = static_cast<Kind>(m.kind());
    out.seq = m.seq();
    return out;
}

const char* state_name(pb::ChannelState s) {
    switch (s) {
    case pb::CHANNEL_STATE_NOT_ANNOUNCED: return "not_announced";
    case pb::CHANNEL_STATE_FREE: return "free";
    case pb::CHANNEL_STATE_SESSION: return "session";
    case pb::CHANNEL_STATE_LEASE: return "lease";
    case pb::CHANNEL_STATE_CALLS: return "calls";
    case pb::CHANNEL_STATE_QUARANTINED: return "quarantined";
    case pb::CHANNEL_STATE_EXTERNAL: return "external";
    case pb::CHANNEL_STATE_MODULE: return "module";
    default: return "unknown";
    }
}

DeviceInfo device_of(const pb::DeviceInfo& d) {
    DeviceInfo out;
    out.name = d.name();
    out.reachable = d.reachable();
    out.abi_version = d.abi_version();
    out.page_size = d.page_size();
    out.channel_count = d.channel_count();
    out.announced = d.announced();
    out.pages_per_channel = d.pages_per_channel();
    out.max_message_bytes = d.max_message_bytes();
    out.notify_gen = d.notify_gen();
    out.shutting_down = d.shutting_down();
    out.call_channels = d.call_channels();
    out.error = d.error();
    out.calls_in_flight = d.calls_in_flight();
    out.calls_queued = d.calls_queued();
    out.drained = d.drained();
    out.not_answering_ms = d.not_answering_ms();
    out.calls_tenant = d.calls_tenant();
    out.cannot_attach = d.cannot_attach();
    for (const auto& c : d.channels()) out.channels.push_back({c.id(), state_name(c.state()), c.lease_id()});
    return out;
}

Lease lease_of(const pb::AttachResponse& a) {
    return {a.lease_id(), a.device(), a.channel(), a.max_message_bytes(), a.idle_timeout_ms()};
}

std::string closed_text(const std::string& what, bool pending, const std::string& cause = "") {
    if (pending) return what + " was closed while the operation waited";
    if (!cause.empty()) return what + " is closed: " + cause;
    return what + " is closed";
}

// ---------------------------------------------------------------- fork()

// gRPC C++ has no fork support (grpc's doc/fork_support.md: Python only):
// a child process shares the parent's connections and gRPC's epoll set, so
// any gRPC use there -- the inherited client's, or a new client's, which
// gRPC would put on the same connection -- takes the parent's traffic (the
// parent's next RPC hung, or failed "Broken pipe" once the child's
// destructors ran).  A child may only exec or _exit; the client's objects
// refuse every operation there before touching gRPC (or a lock a parent's
// thread may hold for ever), and are left undestroyed.

// Counts fork()s in this process's line (pthread_atfork's child handler).
std::atomic<unsigned> fork_generation{0};
// The fork generation the first kup::Client of this process's line was made
// in (-1: none yet): a later generation is a child forked after it.
std::atomic<int> first_client_generation{-1};
std::once_flag at_fork_once;

void in_forked_child() { fork_generation.fetch_add(1, std::memory_order_relaxed); }

constexpr const char* FORK_ADVICE =
    "gRPC C++ does not support fork(): exec a program in the child (or fork before making "
    "any kup::Client)";

// Called as a Client is made: InvalidArgument in a child forked after a
// kup::Client was made (gRPC ran there: a new client would share its state).
void check_new_client() {
    std::call_once(at_fork_once, [] { pthread_atfork(nullptr, nullptr, in_forked_child); });
    int gen = static_cast<int>(fork_generation.load(std::memory_order_relaxed));
    int first = -1;
    if (first_client_generation.compare_exchange_strong(first, gen) || first == gen) return;
    throw_invalid("kup::Client cannot be made in process " + std::to_string(getpid()) +
                  ": it was forked from process " + std::to_string(getppid()) +
                  " after a kup::Client was made there; " + FORK_ADVICE);
}

std::string forked_text(const std::string& what, pid_t pid) {
    return what + " was created in process " + std::to_string(pid) +
           " and cannot be used after fork(); " + FORK_ADVICE;
}

// Keep `obj` (a Client's, Session's or Watch's core in a forked child) for
// good: destroying it would work the parent's connection.  Held reachable,
// so that a leak checker does not count it.
void abandon(std::shared_ptr<void> obj) {
    static std::mutex mu;  // (taken in forked children only)
    static auto* kept = new std::vector<std::shared_ptr<void>>;
    std::lock_guard<std::mutex> g(mu);
    kept->push_back(std::move(obj));
}

}  // namespace

// ---------------------------------------------------------------- client core

struct SessionCore;
struct WatchCore;

struct ClientCore {
    std::string path;
    std::string caller;
    pid_t pid = getpid();  // the process it was made in
    unsigned fork_gen = fork_generation.load(std::memory_order_relaxed);
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<pb::Kup::Stub> stub;
    std::unique_ptr<grpc::health::v1::Health::Stub> health;

    std::mutex mu;
    std::atomic<bool> closed{false};
    std::set<grpc::ClientContext*> unary;  // RPCs under way, cancelled by close()
    std::set<SessionCore*> sessions;
    std::set<WatchCore*> watches;
    // each device's channel data area, as ListDevices last said (TooBig's text)
    std::map<std::string, std::uint64_t, std::less<>> channel_bytes;
    // lease id -> the receive_id of its lease_receive / lease_exchange given
    // up on (past its deadline), and when (the oldest is forgotten past
    // AGAIN_KEPT leases).  The lease's receives and exchanges take that name
    // as their own until one of its operations succeeds: the next one may
    // fail before kupd ran it, or run and be given up on in turn, and either
    // way the name kupd kept is the one the next receive asks for (again_of).
    struct Again {
        std::string receive_id;
        std::uint64_t seq;
    };
    static constexpr std::size_t AGAIN_KEPT = 1024;  // as Python's
    std::map<std::string, Again, std::less<>> again;
    std::uint64_t again_seq = 0;

    // The name of the lease's receive given up on ("" when none).
    std::string pending_again(std::string_view lease_id) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = again.find(lease_id);
        return it == again.end() ? std::string{} : it->second.receive_id;
    }
    void set_again(std::string_view lease_id, std::string receive_id) {
        std::lock_guard<std::mutex> lock(mu);
        again[std::string(lease_id)] = Again{std::move(receive_id), ++again_seq};
        if (again.size() <= AGAIN_KEPT) return;
        auto oldest = again.begin();
        for (auto it = again.begin(); it != again.end(); ++it)
            if (it->second.seq < oldest->second.seq) oldest = it;
        again.erase(oldest);
    }
    // An operation on the lease that started while `pending` was its name
    // given up on ("" none) succeeded: kupd ran it after that one, whose
    // message it no longer keeps.  A name given up on meanwhile stays.
    void again_succeeded(std::string_view lease_id, const std::string& pending) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = again.find(lease_id);
        if (it != again.end() && it->second.receive_id == pending) again.erase(it);
    }
    void forget_again(std::string_view lease_id) {
        std::lock_guard<std::mutex> lock(mu);
        auto it = again.find(lease_id);
        if (it != again.end()) again.erase(it);
    }

    // In a child process forked after this client was made.
    bool forked() const { return fork_gen != fork_generation.load(std::memory_order_relaxed); }

    // InvalidArgument naming the fork (`what`: the object used).
    [[noreturn]] void refuse_forked(const std::string& what) const {
        throw_invalid(forked_text(what, pid));
    }
    // That, for the client itself, when forked().
    void check_fork() const {
        if (forked()) refuse_forked("client of " + path);
    }

    [[noreturn]] void gone(bool pending) const {
        check_fork();
        throw_invalid(closed_text("client of " + path, pending));
    }

    void check_open() {
        check_fork();  // (before the lock: a parent's thread may hold it for ever)
        std::lock_guard<std::mutex> g(mu);
        if (closed) gone(false);
    }

    // Register `ctx` as an RPC under way (close() cancels it).
    void begin(grpc::ClientContext* ctx) {
        check_fork();
        std::lock_guard<std::mutex> g(mu);
        if (closed) gone(false);
        unary.insert(ctx);
    }
    // Unregister it; true when close() came meanwhile.
    bool end(grpc::ClientContext* ctx) {
        std::lock_guard<std::mutex> g(mu);
        unary.erase(ctx);
        return closed;
    }

    // One unary RPC: `invoke(ctx, response)` with a deadline; errors mapped.
    template <class Resp, class Invoke>
    Resp call_unary(Invoke invoke, std::optional<ms> deadline) {
        grpc::ClientContext ctx;
        if (deadline) ctx.set_deadline(std::chrono::system_clock::now() + *deadline);
        Resp resp;
        begin(&ctx);
        grpc::Status st = invoke(&ctx, &resp);
        bool closed_meanwhile = end(&ctx);
        if (!st.ok()) {
            if (closed_meanwhile) gone(true);
            throw_status(st, ctx);
        }
        return resp;
    }

    void note_channel_bytes(const std::vector<DeviceInfo>& devs) {
        std::lock_guard<std::mutex> g(mu);
        for (const auto& d : devs)
            if (d.reachable && d.pages_per_channel && d.page_size)
                channel_bytes[d.name] = std::uint64_t(d.pages_per_channel) * d.page_size;
    }

    std::uint64_t channel_bytes_of(const std::string& device) {
        std::lock_guard<std::mutex> g(mu);
        auto it = channel_bytes.find(device);
        return it == channel_bytes.end() ? 0 : it->second;
    }

    void close();
};

// ---------------------------------------------------------------- session core

// A Session stream, driven through its own completion queue so that an
// operation's wait can be bounded (its timeout + KUPD_GRACE, as Python's
// watchdog bounds it) and cancelled from another thread.
struct SessionCore {
    enum Tag : std::intptr_t { START = 1, WRITE, READ, DONE, FINISH, NTAGS };

    std::shared_ptr<ClientCore> client;
    std::string device;
    std::string what;  // "session on DEV", then "channel N of DEV"
    Lease lease;
    grpc::ClientContext ctx;
    grpc::CompletionQueue cq;
    std::unique_ptr<grpc::ClientAsyncReaderWriter<pb::SessionRequest, pb::SessionResponse>> stream;
    grpc::Status status;

    std::mutex op_mu;                 // one operation at a time
    std::atomic<bool> closed{false};  // no more operations
    std::atomic<bool> closing{false};  // close() cancelled the stream under an operation
    bool pending[NTAGS] = {};
    bool ok[NTAGS] = {};
    bool started = false;
    bool finished = false;
    std::uint64_t next_id = 0;
    std::string cause;        // why the client ended the session itself
    std::exception_ptr ended_by;  // kupd's error that ended it
    ms late{0};               // kupd did not answer within this bound

    SessionCore(std::shared_ptr<ClientCore> c, std::string dev)
        : client(std::move(c)), device(std::move(dev)), what("session on " + device) {}

    ~SessionCore() {
        {
            std::lock_guard<std::mutex> g(client->mu);
            client->sessions.erase(this);
        }
        // an operation close() just cancelled (from another thread) ends
        // its call first
        std::lock_guard<std::mutex> g(op_mu);
        teardown();
        cq.Shutdown();
        void* tag;
        bool okay;
        while (cq.Next(&tag, &okay)) {
        }
    }

    // Wait for `tags` to complete, until `deadline` (false: it passed first).
    bool await(std::initializer_list<Tag> tags, std::optional<gpr_timespec> deadline) {
        for (;;) {
            bool any = false;
            for (Tag t : tags) any = any || pending[t];
            if (!any) return true;
            void* tag = nullptr;
            bool okay = false;
            if (deadline) {
                auto st = cq.AsyncNext(&tag, &okay, *deadline);
                if (st == grpc::CompletionQueue::TIMEOUT) return false;
                if (st == grpc::CompletionQueue::SHUTDOWN) return true;
            } else if (!cq.Next(&tag, &okay)) {
                return true;
            }
            auto t = reinterpret_cast<std::intptr_t>(tag);
            if (t > 0 && t < NTAGS) {
                pending[t] = false;
                ok[t] = okay;
            }
        }
    }

    // Cancel the stream (from any thread).
    void cancel() { ctx.TryCancel(); }

    // End the call: every operation completed, the status read.  Called
    // with op_mu held (or from the destructor).
    void teardown() {
        if (!started || finished) return;
        if (pending[WRITE] || pending[READ] || pending[DONE]) {
            cancel();
            await({WRITE, READ, DONE}, std::nullopt);
        }
        pending[FINISH] = true;
        stream->Finish(&status, reinterpret_cast<void*>(FINISH));
        if (!await({FINISH}, after(KUPD_GRACE))) {
            cancel();
            await({FINISH}, std::nullopt);
        }
        finished = true;
    }

    std::exception_ptr gone(bool pending_op) {
        if (late.count() && pending_op)
            return std::make_exception_ptr(DeadlineExceeded(
                what + ": kupd did not answer within " + seconds_text(late) +
                    " s (the operation's timeout plus the client's grace); the session was ended",
                std::nullopt, false));
        if (ended_by && !(pending_op && closing)) return session_ended(what, ended_by);
        return std::make_exception_ptr(
            InvalidArgument(closed_text(what, pending_op && closing, cause), std::nullopt, false));
    }

    // (before any lock: a parent's thread may hold it for ever)
    void check_fork() const {
        if (client->forked()) client->refuse_forked(what + " (client of " + client->path + ")");
    }

    void start() {
        check_fork();
        {
            std::lock_guard<std::mutex> g(client->mu);
            if (client->closed) client->gone(false);
            client->sessions.insert(this);
        }
        stream = client->stub->PrepareAsyncSession(&ctx, &cq);
        started = true;
        pending[START] = true;
        stream->StartCall(reinterpret_cast<void*>(START));
        await({START}, std::nullopt);
    }

    // One request and its response.  In-band errors are thrown and the
    // session goes on; a stream that ends closes the session.
    pb::SessionResponse op(pb::SessionRequest& req, std::optional<ms> bound) {
        // (under the lock: what gone() reads is the operation's to write; an
        // operation that close() cancelled gives it up promptly)
        check_fork();
        std::lock_guard<std::mutex> g(op_mu);
        if (closed) std::rethrow_exception(gone(false));
        req.set_request_id(++next_id);
        pb::SessionResponse resp;
        pending[WRITE] = pending[READ] = true;
        stream->Write(req, reinterpret_cast<void*>(WRITE));
        stream->Read(&resp, reinterpret_cast<void*>(READ));
        std::optional<gpr_timespec> deadline;
        if (bound) deadline = after(*bound);
        if (!await({WRITE, READ}, deadline)) {
            // kupd did not answer within the bound: the session's state is
            // unknown (the reply would answer the next request), so it ends
            late = *bound;
            cause = "kupd did not answer an operation within its timeout plus the grace";
            closed = true;
            teardown();
            std::rethrow_exception(gone(true));
        }
        if (!ok[READ]) {
            closed = true;
            teardown();
            if (closing) std::rethrow_exception(gone(true));
            if (status.ok()) {
                ended_by = std::make_exception_ptr(
                    PeerGone(what + ": session ended", std::nullopt, false));
            } else {
                try {
                    throw_status(status, ctx);
                } catch (...) {
                    ended_by = std::current_exception();
                }
            }
            std::rethrow_exception(ended_by);
        }
        if (resp.result_case() == pb::SessionResponse::kError) {
            // mapped as the status it stands for: the same class, and the
            // same retry_after() as kup-retry-after-ms would give
            const auto& e = resp.error();
            std::optional<ms> retry_after;
            if (e.has_retry_after_ms()) retry_after = retry_after_of(e.retry_after_ms());
            std::rethrow_exception(error_from_status(static_cast<StatusCode>(e.grpc_code()),
                                                     e.message(), e.kind(), retry_after));
        }
        return resp;
    }

    // close(): half-close, and wait (at most KUPD_GRACE) for kupd to end the
    // stream once it let go of the lease, so the channel is free on return.
    void close() {
        if (client->forked()) return;  // the stream is the parent's
        std::unique_lock<std::mutex> g(op_mu, std::try_to_lock);
        if (!g.owns_lock()) {
            // an operation waits: cancel the stream under it
            closing = true;
            closed = true;
            cancel();
            return;
        }
        if (!closed) {
            closed = true;
            auto deadline = after(KUPD_GRACE);
            pending[DONE] = true;
            stream->WritesDone(reinterpret_cast<void*>(DONE));
            bool in_time = await({DONE}, deadline);
            pb::SessionResponse resp;
            while (in_time) {  // until kupd ends the stream
                pending[READ] = true;
                stream->Read(&resp, reinterpret_cast<void*>(READ));
                in_time = await({READ}, deadline);
                if (in_time && !ok[READ]) break;
            }
            if (!in_time) cancel();
        }
        teardown();
    }

    std::optional<Message> received(const pb::ReceiveResponse& rr) {
        if (rr.not_ready()) return std::nullopt;
        return message_of(rr.message());
    }
};

// ---------------------------------------------------------------- watch core

struct WatchCore {
    std::shared_ptr<ClientCore> client;
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReader<pb::WatchEvent>> reader;
    std::atomic<bool> cancelled{false};
    std::mutex mu;  // next() against the destructor
    bool done = false;
    std::exception_ptr ended_by;  // the error that ended the stream (next() throws it again)

    explicit WatchCore(std::shared_ptr<ClientCore> c) : client(std::move(c)) {}

    ~WatchCore() {
        {
            std::lock_guard<std::mutex> g(client->mu);
            client->watches.erase(this);
        }
        // cancelled before the lock: a next() waiting in another thread
        // holds it until its Read ends (then returns std::nullopt)
        cancelled = true;
        ctx.TryCancel();
        std::lock_guard<std::mutex> g(mu);
        if (reader && !done) reader->Finish();
    }
};

void ClientCore::close() {
    if (forked()) return;  // the connection is the parent's
    {
        std::lock_guard<std::mutex> g(mu);
        if (closed) return;
        closed = true;
        for (auto* c : unary) c->TryCancel();
        // cancelled under the lock: a Session or Watch unregisters under
        // it before it is destroyed
        for (auto* s : sessions) {
            if (!s->closed) {
                s->closing = true;
                s->closed = true;
            }
            s->cancel();
        }
        for (auto* w : watches) w->ctx.TryCancel();
    }
}

}  // namespace detail

// ---------------------------------------------------------------- Client

using detail::ClientCore;

Client::Client(const std::string& path, std::optional<std::string> caller) {
    std::string p = detail::socket_arg(path);
    detail::check_new_client();
    core_ = std::make_shared<ClientCore>();
    core_->path = std::move(p);
    core_->caller = caller ? *caller : detail::default_caller();
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(static_cast<int>(MAX_GRPC_MESSAGE));
    args.SetMaxSendMessageSize(static_cast<int>(MAX_GRPC_MESSAGE));
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, detail::KEEPALIVE_TIME_MS);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, detail::KEEPALIVE_TIMEOUT_MS);
    args.SetInt("grpc.http2.ping_timeout_ms", detail::KEEPALIVE_TIMEOUT_MS);
    args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, detail::RECONNECT_INITIAL_MS);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, detail::RECONNECT_MAX_MS);
    core_->channel = grpc::CreateCustomChannel(detail::target_for(core_->path),
                                               grpc::InsecureChannelCredentials(), args);
    core_->stub = pb::Kup::NewStub(core_->channel);
    core_->health = grpc::health::v1::Health::NewStub(core_->channel);
}

namespace detail {
namespace {
// Close `core` (the object owning it is going); in a forked child leave it
// alone and undestroyed instead.
template <class Core, class Owner>
void let_go(Owner& core, bool forked) {
    if (!core) return;
    if (forked)
        abandon(std::shared_ptr<Core>(std::move(core)));
    else
        core->close();
}
}  // namespace
}  // namespace detail

Client::~Client() { detail::let_go<ClientCore>(core_, core_ && core_->forked()); }

Client::Client(Client&&) noexcept = default;

Client& Client::operator=(Client&& other) noexcept {
    if (this != &other) {
        detail::let_go<ClientCore>(core_, core_ && core_->forked());
        core_ = std::move(other.core_);
    }
    return *this;
}

namespace {
ClientCore& core_of(const std::shared_ptr<ClientCore>& core) {
    if (!core) detail::throw_invalid("kup::Client was moved from");
    return *core;
}
}  // namespace

const std::string& Client::path() const { return core_of(core_).path; }
const std::string& Client::caller() const { return core_of(core_).caller; }

void Client::close() {
    if (core_) core_->close();
}

std::vector<DeviceInfo> Client::list_devices(std::string_view device) {
    auto& c = core_of(core_);
    pb::ListDevicesRequest req;
    req.set_device(detail::text_arg(device, "device"));
    auto resp = c.call_unary<pb::ListDevicesResponse>(
        [&](grpc::ClientContext* ctx, pb::ListDevicesResponse* r) {
            return c.stub->ListDevices(ctx, req, r);
        },
        detail::SHORT_RPC);
    std::vector<DeviceInfo> out;
    for (const auto& d : resp.devices()) out.push_back(detail::device_of(d));
    c.note_channel_bytes(out);
    return out;
}

std::string Client::health(std::string_view service) {
    auto& c = core_of(core_);
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(detail::text_arg(service, "service"));
    auto resp = c.call_unary<grpc::health::v1::HealthCheckResponse>(
        [&](grpc::ClientContext* ctx, grpc::health::v1::HealthCheckResponse* r) {
            return c.health->Check(ctx, req, r);
        },
        detail::SHORT_RPC);
    return grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status());
}

CallReply Client::call(std::string_view device, std::string_view data, std::optional<ms> timeout) {
    auto& c = core_of(core_);
    pb::CallRequest req;
    req.set_device(detail::device_arg(device));
    req.set_data(detail::data_arg(data));
    detail::timeout_arg(timeout, false);
    req.set_timeout_ms(timeout ? static_cast<std::uint32_t>(timeout->count()) : 0);
    req.set_caller(c.caller);
    auto resp = c.call_unary<pb::CallResponse>(
        [&](grpc::ClientContext* ctx, pb::CallResponse* r) { return c.stub->Call(ctx, req, r); },
        detail::bound_of(timeout));
    CallReply out;
    static_cast<Message&>(out) = detail::message_of(resp.reply());
    out.channel = resp.channel();
    return out;
}

namespace {
// A random attach_id (or receive_id): 32 hex digits.
std::string new_attach_id() {
    static thread_local std::mt19937_64 gen{std::random_device{}()};
    static const char hex[] = "0123456789abcdef";
    std::string id;
    for (int i = 0; i < 2; ++i) {
        std::uint64_t v = gen();
        for (int j = 0; j < 16; ++j, v >>= 4) id += hex[v & 0xf];
    }
    return id;
}
}  // namespace

Lease Client::attach(std::string_view device, std::optional<std::uint32_t> channel) {
    return attach(device, channel, std::nullopt);
}

Lease Client::attach(std::string_view device, std::optional<std::uint32_t> channel,
                     std::optional<ms> timeout) {
    auto& c = core_of(core_);
    pb::AttachRequest req;
    req.set_device(detail::device_arg(device));
    if (channel) req.set_channel(*channel);
    detail::timeout_arg(timeout, false);
    const ms deadline = timeout ? *timeout : ATTACH_DEADLINE;
    // kupd may grant the lease and write its reply as the deadline passes:
    // gRPC then drops the reply, and the lease is known to no one.  The
    // attach names itself, and past its deadline releases by that name
    // (kupd ends the lease it granted, or grants none) before it throws.
    req.set_attach_id(new_attach_id());
    try {
        auto resp = c.call_unary<pb::AttachResponse>(
            [&](grpc::ClientContext* ctx, pb::AttachResponse* r) {
                return c.stub->Attach(ctx, req, r);
            },
            deadline);
        return detail::lease_of(resp);
    } catch (const DeadlineExceeded&) {
        pb::ReleaseRequest rel;
        rel.set_attach_id(req.attach_id());
        try {  // best effort, within KUPD_GRACE
            c.call_unary<pb::ReleaseResponse>(
                [&](grpc::ClientContext* ctx, pb::ReleaseResponse* r) {
                    return c.stub->Release(ctx, rel, r);
                },
                KUPD_GRACE);
        } catch (const Error&) {
        }
        throw;
    }
}

namespace {
// The again_of of a lease_send / lease_pass's names (which take no receive_id).
std::optional<std::string> again_only(const ReceiveNames& names, const char* what) {
    if (names.receive_id)
        throw ArgumentError(std::string(what) + " takes no receive_id (again_of only)");
    return detail::name_arg(names.again_of, "again_of");
}
}  // namespace

void Client::lease_send(std::string_view lease_id, std::string_view data) {
    lease_send(lease_id, data, ReceiveNames{});
}

void Client::lease_send(std::string_view lease_id, std::string_view data,
                        const ReceiveNames& names) {
    auto& c = core_of(core_);
    pb::SendRequest req;
    req.set_lease_id(detail::lease_arg(lease_id));
    req.set_data(detail::data_arg(data));
    auto again_of = again_only(names, "lease_send");
    // After a receive on the lease given up on, its name (again_of): kupd
    // refuses the send over the message it wrote for that receive, which
    // this client never got -- NotYourTurn, nothing sent -- and the name
    // stays for the lease_receive that gets the message.  The caller's
    // again_of takes its place.
    std::string pending = c.pending_again(lease_id);
    req.set_again_of(again_of ? *again_of : pending);
    c.call_unary<pb::SendResponse>(
        [&](grpc::ClientContext* ctx, pb::SendResponse* r) { return c.stub->Send(ctx, req, r); },
        detail::SHORT_RPC);
    c.again_succeeded(lease_id, pending);  // it ran: nothing to ask again for
}

void Client::lease_pass(std::string_view lease_id) { lease_pass(lease_id, ReceiveNames{}); }

void Client::lease_pass(std::string_view lease_id, const ReceiveNames& names) {
    auto& c = core_of(core_);
    pb::PassRequest req;
    req.set_lease_id(detail::lease_arg(lease_id));
    auto again_of = again_only(names, "lease_pass");
    std::string pending = c.pending_again(lease_id);
    req.set_again_of(again_of ? *again_of : pending);  // as lease_send's
    c.call_unary<pb::PassResponse>(
        [&](grpc::ClientContext* ctx, pb::PassResponse* r) { return c.stub->Pass(ctx, req, r); },
        detail::SHORT_RPC);
    c.again_succeeded(lease_id, pending);
}

namespace {
// (pending, receive_id, again_of) of a lease receive or exchange: the name
// of the lease's receive given up on ("" none), and the names the request
// carries -- the caller's (checked) in place of the client's own, its
// again_of this one's own name too unless it gives receive_id (Python's
// ReceiveNames.names: should this one be given up on as well, the name
// kupd keeps is the one the next asks for).
struct Named {
    std::string pending, receive_id, again_of;
};
Named names_of(detail::ClientCore& c, std::string_view lease_id, const ReceiveNames& names) {
    auto receive_id = detail::name_arg(names.receive_id, "receive_id");
    auto again_of = detail::name_arg(names.again_of, "again_of");
    Named n;
    n.pending = c.pending_again(lease_id);
    n.again_of = again_of ? *again_of : n.pending;
    n.receive_id = receive_id ? *receive_id : n.again_of.empty() ? new_attach_id() : n.again_of;
    return n;
}
}  // namespace

std::optional<Message> Client::lease_receive(std::string_view lease_id, Timeout timeout) {
    return lease_receive(lease_id, timeout, ReceiveNames{});
}

std::optional<Message> Client::lease_receive(std::string_view lease_id, Timeout timeout,
                                             const ReceiveNames& names) {
    auto& c = core_of(core_);
    pb::ReceiveRequest req;
    req.set_lease_id(detail::lease_arg(lease_id));
    auto [mode, t] = detail::receive_mode(timeout);
    req.set_mode(mode);
    req.set_timeout_ms(t);
    // kupd may write the reply as the deadline passes: gRPC then drops it.
    // The receive names itself, kupd keeps the message it answered with
    // until the lease's next operation, and the next lease_receive after
    // one past its deadline names that one (again_of): the same message
    // (and takes its name as its own: see ClientCore::again).
    Named n = names_of(c, lease_id, names);
    const std::string& pending = n.pending;
    req.set_receive_id(n.receive_id);
    req.set_again_of(n.again_of);
    pb::ReceiveResponse resp;
    try {
        resp = c.call_unary<pb::ReceiveResponse>(
            [&](grpc::ClientContext* ctx, pb::ReceiveResponse* r) {
                return c.stub->Receive(ctx, req, r);
            },
            detail::bound_of(timeout));
    } catch (const DeadlineExceeded&) {
        c.set_again(lease_id, req.receive_id());
        throw;
    }
    // one that found nothing keeps the name: kupd answers a non-blocking
    // receive at once while another operation holds the lease -- such as
    // the one given up on, still under way in kupd, which may write yet
    if (resp.not_ready()) return std::nullopt;
    c.again_succeeded(lease_id, pending);
    return detail::message_of(resp.message());
}

std::optional<Message> Client::lease_exchange(std::string_view lease_id, std::string_view data,
                                              Timeout timeout) {
    return lease_exchange(lease_id, data, timeout, ReceiveNames{});
}

std::optional<Message> Client::lease_exchange(std::string_view lease_id, std::string_view data,
                                              Timeout timeout, const ReceiveNames& names) {
    auto& c = core_of(core_);
    pb::SendRequest req;
    req.set_lease_id(detail::lease_arg(lease_id));
    req.set_data(detail::data_arg(data));
    auto [mode, t] = detail::receive_mode(timeout);
    req.set_wait_reply(true);
    req.set_reply_mode(mode);
    req.set_reply_timeout_ms(t);
    Named n = names_of(c, lease_id, names);  // as lease_receive's
    const std::string& pending = n.pending;
    req.set_receive_id(n.receive_id);
    req.set_again_of(n.again_of);  // as lease_send's
    pb::SendResponse resp;
    try {
        resp = c.call_unary<pb::SendResponse>(
            [&](grpc::ClientContext* ctx, pb::SendResponse* r) { return c.stub->Send(ctx, req, r); },
            detail::bound_of(timeout));
    } catch (const DeadlineExceeded&) {
        c.set_again(lease_id, req.receive_id());
        throw;
    }
    c.again_succeeded(lease_id, pending);  // it ran (its send did), found something or not
    if (!resp.has_reply()) return lease_receive(lease_id, timeout);  // a kupd without wait_reply
    if (resp.reply().not_ready()) return std::nullopt;
    return detail::message_of(resp.reply().message());
}

void Client::release(std::string_view lease_id) {
    auto& c = core_of(core_);
    pb::ReleaseRequest req;
    req.set_lease_id(detail::lease_arg(lease_id));
    c.forget_again(lease_id);
    c.call_unary<pb::ReleaseResponse>(
        [&](grpc::ClientContext* ctx, pb::ReleaseResponse* r) { return c.stub->Release(ctx, req, r); },
        detail::SHORT_RPC);
}

Session Client::open(std::string_view device, std::optional<std::uint32_t> channel) {
    core_of(core_);
    std::string dev = detail::device_arg(device);
    // as Python's open(): the device must exist (NotFound), and its channel
    // size is known for TooBig's text
    list_devices(dev);
    auto core = std::make_unique<detail::SessionCore>(core_, dev);
    core->start();
    pb::SessionRequest req;
    req.mutable_attach()->set_device(dev);
    if (channel) req.mutable_attach()->set_channel(*channel);
    pb::SessionResponse resp;
    try {
        resp = core->op(req, std::nullopt);
    } catch (...) {
        core->close();
        throw;
    }
    core->lease = detail::lease_of(resp.attached());
    core->what = "channel " + std::to_string(core->lease.channel) + " of " + dev;
    return Session(std::move(core));
}

Watch Client::watch(std::string_view device, bool initial_state) {
    auto& c = core_of(core_);
    pb::WatchRequest req;
    req.set_device(detail::text_arg(device, "device"));
    req.set_initial_state(initial_state);
    c.check_fork();  // (before the lock)
    auto core = std::make_unique<detail::WatchCore>(core_);
    {
        std::lock_guard<std::mutex> g(c.mu);
        if (c.closed) c.gone(false);
        c.watches.insert(core.get());
    }
    core->reader = c.stub->Watch(&core->ctx, req);
    return Watch(std::move(core));
}

// ---------------------------------------------------------------- Session

Session::Session(std::unique_ptr<detail::SessionCore> core) : core_(std::move(core)) {}
Session::~Session() {
    detail::let_go<detail::SessionCore>(core_, core_ && core_->client->forked());
}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&& other) noexcept {
    if (this != &other) {
        detail::let_go<detail::SessionCore>(core_, core_ && core_->client->forked());
        core_ = std::move(other.core_);
    }
    return *this;
}

namespace {
detail::SessionCore& session_of(const std::unique_ptr<detail::SessionCore>& core) {
    if (!core) detail::throw_invalid("kup::Session was moved from");
    return *core;
}
}  // namespace

const Lease& Session::lease() const { return session_of(core_).lease; }
std::uint32_t Session::channel() const { return session_of(core_).lease.channel; }
const std::string& Session::device() const { return session_of(core_).device; }
std::uint64_t Session::max_message_bytes() const { return session_of(core_).lease.max_message_bytes; }

void Session::send(std::string_view data) {
    auto& s = session_of(core_);
    detail::data_arg(data);
    detail::check_size(data.size(), s.lease.max_message_bytes, s.lease.channel, s.device,
                       s.client->channel_bytes_of(s.device));
    pb::SessionRequest req;
    req.mutable_send()->set_data(data.data(), data.size());
    s.op(req, std::nullopt);
}

void Session::pass() {
    auto& s = session_of(core_);
    pb::SessionRequest req;
    req.mutable_pass_turn();
    s.op(req, std::nullopt);
}

std::optional<Message> Session::receive(Timeout timeout) {
    auto& s = session_of(core_);
    auto [mode, t] = detail::receive_mode(timeout);
    pb::SessionRequest req;
    req.mutable_receive()->set_mode(mode);
    req.mutable_receive()->set_timeout_ms(t);
    auto resp = s.op(req, detail::bound_of(timeout));
    return s.received(resp.received());
}

std::optional<Message> Session::exchange(std::string_view data, Timeout timeout) {
    auto& s = session_of(core_);
    auto [mode, t] = detail::receive_mode(timeout);
    detail::data_arg(data);
    detail::check_size(data.size(), s.lease.max_message_bytes, s.lease.channel, s.device,
                       s.client->channel_bytes_of(s.device));
    pb::SessionRequest req;
    auto* x = req.mutable_exchange();
    x->set_data(data.data(), data.size());
    x->set_mode(mode);
    x->set_timeout_ms(t);
    auto resp = s.op(req, detail::bound_of(timeout));
    return s.received(resp.exchanged());
}

void Session::close() {
    if (core_) core_->close();
}

// ---------------------------------------------------------------- Watch

Watch::Watch(std::unique_ptr<detail::WatchCore> core) : core_(std::move(core)) {}
namespace {
// (the core's destructor cancels the stream: not in a forked child)
void let_go(std::unique_ptr<detail::WatchCore>& core) {
    if (core && core->client->forked())
        detail::abandon(std::shared_ptr<detail::WatchCore>(std::move(core)));
}
}  // namespace

Watch::~Watch() { let_go(core_); }
Watch::Watch(Watch&&) noexcept = default;
Watch& Watch::operator=(Watch&& other) noexcept {
    if (this != &other) {
        let_go(core_);
        core_ = std::move(other.core_);
    }
    return *this;
}

std::optional<WatchEvent> Watch::next() {
    if (!core_) detail::throw_invalid("kup::Watch was moved from");
    auto& w = *core_;
    if (w.client->forked())  // (before the lock)
        w.client->refuse_forked("watch (client of " + w.client->path + ")");
    std::lock_guard<std::mutex> g(w.mu);
    if (w.done) {
        // ended: as Python's iterator, the error that ended it, every time
        if (w.ended_by) std::rethrow_exception(w.ended_by);
        if (!w.cancelled && w.client->closed) w.client->gone(false);
        return std::nullopt;
    }
    pb::WatchEvent ev;
    if (w.reader->Read(&ev)) {
        WatchEvent out;
        out.type = static_cast<EventType>(ev.type());
        out.device = ev.device();
        out.channel = ev.channel();
        out.lease_id = ev.lease_id();
        out.holder = ev.holder();
        out.announced = ev.announced();
        out.notify_gen = ev.notify_gen();
        out.reason = ev.reason();
        out.initial = ev.initial();
        out.time_unix_ms = ev.time_unix_ms();
        return out;
    }
    grpc::Status st = w.reader->Finish();
    w.done = true;
    if (st.error_code() == grpc::StatusCode::CANCELLED) {
        // close() of the client cancelled it: as every operation under way
        if (!w.cancelled && w.client->closed) w.client->gone(true);
        return std::nullopt;
    }
    if (st.ok()) return std::nullopt;
    try {
        detail::throw_status(st, w.ctx);
    } catch (const Error&) {
        w.ended_by = std::current_exception();
        throw;
    }
}

void Watch::cancel() {
    if (!core_ || core_->client->forked()) return;  // the stream is the parent's
    core_->cancelled = true;
    core_->ctx.TryCancel();
}

}  // namespace kup
