// SPDX-License-Identifier: BSD-2-Clause
//
// Tests of the C++ client against a running kupd serving the echo module
// (even channels echo, odd channels upper-case):
//
//   kup_client_test /path/to/kupd.sock [DEVICE] [TEST-NAME...]
//
// tests/cpp/test_cpp_client.py builds this (plain and under ASan + UBSan)
// and runs it against a real kupsim + kupd with call_timeout 2 s.  Each
// test prints "ok NAME" or "not ok NAME: why"; the summary lines are
// "# pass N" and "# fail N", and the exit status is 1 when any failed.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "../src/internal.hpp"
#include "kupclient.hpp"

namespace {

std::string g_socket;
std::string g_device = "echo";

struct Failure {
    std::string why;
};

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        if (!(cond)) throw Failure{std::string(__FILE__ ":") + std::to_string(__LINE__) +       \
                                   ": CHECK(" #cond ") failed"};                                \
    } while (0)

#define CHECK_EQ(a, b)                                                                          \
    do {                                                                                        \
        auto va_ = (a);                                                                         \
        auto vb_ = (b);                                                                         \
        if (!(va_ == vb_))                                                                      \
            throw Failure{std::string(__FILE__ ":") + std::to_string(__LINE__) + ": " #a " == " \
                          #b " failed: " + show(va_) + " != " + show(vb_)};                     \
    } while (0)

std::string show(const std::string& s) { return "\"" + s + "\""; }
std::string show(const char* s) { return show(std::string(s)); }
template <class T>
std::string show(const T& v) {
    if constexpr (std::is_enum_v<T>)
        return std::to_string(static_cast<long long>(v));
    else
        return std::to_string(v);
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Run `fn`, which must throw E; then `check(e)`.
template <class E, class Fn>
void expect_throw(Fn fn, const std::function<void(const E&)>& check, const char* where) {
    try {
        fn();
    } catch (const E& e) {
        check(e);
        return;
    } catch (const kup::Error& e) {
        throw Failure{std::string(where) + ": threw " + e.kind() + ": " + e.what()};
    } catch (const std::exception& e) {
        throw Failure{std::string(where) + ": threw another exception: " + e.what()};
    }
    throw Failure{std::string(where) + ": did not throw"};
}

#define STR2(x) #x
#define STR(x) STR2(x)
#define WHERE __FILE__ ":" STR(__LINE__)

// A kup::Error of exactly class E (its kind() named so), with the gRPC code,
// from kupd or not, and a message containing `part`.
template <class E>
std::function<void(const E&)> is_error(std::optional<kup::StatusCode> code, bool from_kupd,
                                        std::string part = "") {
    return [=](const E& e) {
        CHECK_EQ(e.kind(), std::string(E("", std::nullopt, false).kind()));
        CHECK(e.grpc_code() == code);
        CHECK_EQ(e.from_kupd(), from_kupd);
        if (!part.empty() && !contains(e.what(), part))
            throw Failure{"message \"" + std::string(e.what()) + "\" lacks \"" + part + "\""};
    };
}

std::function<void(const kup::ArgumentError&)> arg_error(std::string part) {
    return [=](const kup::ArgumentError& e) {
        if (!contains(e.what(), part))
            throw Failure{"message \"" + std::string(e.what()) + "\" lacks \"" + part + "\""};
    };
}

std::string expected_echo(std::uint32_t channel, std::string text) {
    if (channel % 2 == 1)
        for (auto& c : text)
            if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
    return text;
}

std::string channel_state(kup::Client& c, std::uint32_t id) {
    auto devs = c.list_devices(g_device);  // (kept: the loop refers into it)
    for (const auto& ch : devs.at(0).channels)
        if (ch.id == id) return ch.state;
    return "missing";
}

// Wait (generously: the machine is shared) until channel `id` is in `want`.
void wait_state(kup::Client& c, std::uint32_t id, const std::string& want) {
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    std::string st;
    while ((st = channel_state(c, id)) != want) {
        if (std::chrono::steady_clock::now() > until)
            throw Failure{"channel " + std::to_string(id) + " still " + st + " (want " + want + ")"};
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
}

const kup::ms T{10000};  // a generous wait for echo's answers

// Cancels `w` should it still be waited on after `limit`: a next() waiting
// for an event that never comes then ends (the test fails, instead of
// hanging).
class CancelAfter {
public:
    CancelAfter(kup::Watch& w, std::chrono::seconds limit)
        : thread_([&w, limit, done = done_.get_future()] {
              if (done.wait_for(limit) == std::future_status::timeout) w.cancel();
          }) {}
    ~CancelAfter() {
        done_.set_value();
        thread_.join();
    }

private:
    std::promise<void> done_;
    std::thread thread_;
};

// ---------------------------------------------------------------- the tests

void test_devices_and_health() {
    kup::Client c(g_socket);
    auto devs = c.list_devices();
    const kup::DeviceInfo* dev = nullptr;
    for (const auto& d : devs)
        if (d.name == g_device) dev = &d;
    CHECK(dev != nullptr);
    CHECK(dev->reachable);
    CHECK(dev->channel_count > 0);
    CHECK_EQ(dev->channels.size(), static_cast<std::size_t>(dev->channel_count));
    CHECK(dev->max_message_bytes > 0);
    CHECK_EQ(dev->max_message_bytes, std::uint64_t(dev->pages_per_channel) * dev->page_size);
    CHECK_EQ(c.list_devices(g_device).size(), std::size_t(1));
    CHECK_EQ(c.health(), std::string("SERVING"));
    CHECK_EQ(c.health("kup.v1.Kup"), std::string("SERVING"));
    CHECK(contains(c.caller(), ":" + std::to_string(getpid())));
    kup::Client named(g_socket, std::string("worker 3"));
    CHECK_EQ(named.caller(), std::string("worker 3"));
}

void test_session_round_trip() {
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    CHECK_EQ(s.lease().device, g_device);
    CHECK(!s.lease().lease_id.empty());
    CHECK(s.max_message_bytes() > 0);
    CHECK_EQ(channel_state(c, s.channel()), std::string("session"));
    // a fresh channel: the kernel hands the turn over with a PASS (seq 1)
    auto first = s.receive();
    CHECK(first.has_value());
    CHECK(first->kind == kup::Kind::Pass);
    CHECK_EQ(first->seq, std::uint64_t(1));
    s.send("hello from c++");
    auto reply = s.receive();
    CHECK(reply && reply->kind == kup::Kind::Data);
    CHECK_EQ(reply->seq, std::uint64_t(2));
    CHECK_EQ(reply->data, expected_echo(s.channel(), "hello from c++"));
    // the reply taken, this side holds the turn: NotYourTurn, in-band
    expect_throw<kup::NotYourTurn>([&] { s.receive(); },
                                   [](const kup::NotYourTurn& e) {
                                       is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION,
                                                                  true, "EKU_NOTTURN")(e);
                                       CHECK_EQ(e.kup_code(), 1003);
                                   },
                                   WHERE);
    s.pass();
    auto back = s.receive(T);
    CHECK(back && back->kind == kup::Kind::Pass);
    CHECK_EQ(back->seq, std::uint64_t(3));
    // binary data, NUL bytes included, unchanged
    const std::string bin("\x00\x01\x02\xfe\xff", 5);
    s.send(bin);
    CHECK_EQ(s.receive(T)->data, bin);
    // exchange: send + receive as one request
    for (int i = 0; i < 5; ++i) {
        std::string text = "exchange " + std::to_string(i);
        auto x = s.exchange(text, T);
        CHECK(x.has_value());
        CHECK_EQ(x->data, expected_echo(s.channel(), text));
        CHECK_EQ(x->seq, std::uint64_t(5 + i));
    }
    s.close();
    s.close();  // twice: nothing more
}

void test_odd_channel_and_busy() {
    kup::Client c(g_socket);
    std::optional<std::uint32_t> odd;
    auto devs = c.list_devices(g_device);
    for (const auto& ch : devs.at(0).channels)
        if (ch.state == "free" && ch.id % 2 == 1) {
            odd = ch.id;
            break;
        }
    CHECK(odd.has_value());
    kup::Session s = c.open(g_device, *odd);
    CHECK_EQ(s.channel(), *odd);
    s.receive(T);
    CHECK_EQ(s.exchange("mixed Case", T)->data, std::string("MIXED CASE"));
    // a second session on it: Busy, which kupd answers FAILED_PRECONDITION
    expect_throw<kup::Busy>([&] { c.open(g_device, *odd); },
                            [](const kup::Busy& e) {
                                is_error<kup::Busy>(kup::StatusCode::FAILED_PRECONDITION, true)(e);
                                CHECK_EQ(e.kup_code(), 1008);
                            },
                            WHERE);
    // and an Attach lease on it too
    expect_throw<kup::Busy>([&] { c.attach(g_device, *odd); },
                            is_error<kup::Busy>(kup::StatusCode::FAILED_PRECONDITION, true), WHERE);
    // the session goes on
    CHECK_EQ(s.exchange("again", T)->data, std::string("AGAIN"));
}

void test_nonblocking_receive_and_deadline() {
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    s.receive(T);
    // a message on its way: poll with timeout 0 until it is there
    s.send("polled");
    std::optional<kup::Message> m;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!(m = s.receive(kup::ms(0)))) {
        CHECK(std::chrono::steady_clock::now() < until);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    CHECK_EQ(m->data, expected_echo(s.channel(), "polled"));
    // echo never answers !hold: non-blocking finds nothing, a timeout is
    // kupd's DeadlineExceeded, and the session goes on
    s.send("!hold");
    CHECK(!s.receive(kup::ms(0)).has_value());
    expect_throw<kup::DeadlineExceeded>(
        [&] { s.receive(kup::ms(200)); },
        [](const kup::DeadlineExceeded& e) {
            is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, true)(e);
            CHECK_EQ(e.kup_code(), 1005);
        },
        WHERE);
    CHECK(!s.receive(kup::ms(0)).has_value());
    // not your turn: the kernel holds it
    expect_throw<kup::NotYourTurn>(
        [&] { s.send("x"); },
        is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true), WHERE);
}

void test_leases() {
    kup::Client c(g_socket);
    kup::Lease l = c.attach(g_device);
    CHECK(!l.lease_id.empty());
    CHECK_EQ(l.device, g_device);
    CHECK(l.max_message_bytes > 0);
    CHECK(l.idle_timeout_ms > 0);
    CHECK_EQ(channel_state(c, l.channel), std::string("lease"));
    auto first = c.lease_receive(l.lease_id, T);
    CHECK(first && first->kind == kup::Kind::Pass);
    c.lease_send(l.lease_id, "lease data");
    auto r = c.lease_receive(l.lease_id, T);
    CHECK(r && r->seq == 2);
    CHECK_EQ(r->data, expected_echo(l.channel, "lease data"));
    auto x = c.lease_exchange(l.lease_id, "one rpc", T);
    CHECK(x && x->seq == 3);
    CHECK_EQ(x->data, expected_echo(l.channel, "one rpc"));
    c.lease_pass(l.lease_id);
    auto p = c.lease_receive(l.lease_id, T);
    CHECK(p && p->kind == kup::Kind::Pass && p->seq == 4);
    // sending twice: the kernel's turn (or its reply unread): NotYourTurn
    c.lease_send(l.lease_id, "!hold");
    CHECK(!c.lease_receive(l.lease_id, kup::ms(0)).has_value());
    expect_throw<kup::NotYourTurn>(
        [&] { c.lease_send(l.lease_id, "y"); },
        is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true), WHERE);
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.lease_receive(l.lease_id, kup::ms(200)); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, true), WHERE);
    c.release(l.lease_id);
    expect_throw<kup::NotFound>([&] { c.lease_receive(l.lease_id, kup::ms(0)); },
                                is_error<kup::NotFound>(kup::StatusCode::NOT_FOUND, true, l.lease_id),
                                WHERE);
    expect_throw<kup::NotFound>([&] { c.release("no-such-lease"); },
                                is_error<kup::NotFound>(kup::StatusCode::NOT_FOUND, true), WHERE);
    wait_state(c, l.channel, "free");
}

// Run against a proxy (tests/gateway/h2stall.py) that passes kupd's reply
// to the first RPC and holds its status: the attach's deadline (its
// timeout, 2 s; the default one, 30 s, is given up on the same way) passes
// after kupd wrote the reply, which gRPC then drops.  The client releases
// by its attach_id: the channel is free at once.
void test_attach_past_deadline() {
    kup::Client c(g_socket);
    const std::uint32_t chan = 5;  // (not one of the Call pool's)
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.attach(g_device, chan, kup::ms(2000)); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    CHECK_EQ(channel_state(c, chan), std::string("free"));
}

// Run against tests/gateway/attach_recorder.py, a server that grants every
// Attach a lease "recorded" and records the deadline it came with (the
// Python side checks those: 30 s, then 2.5 s).
void test_attach_deadline() {
    CHECK(kup::ATTACH_DEADLINE == kup::ms(30000));
    kup::Client c(g_socket);
    CHECK_EQ(c.attach(g_device, 3).lease_id, std::string("recorded"));
    CHECK_EQ(c.attach(g_device, 3, kup::ms(2500)).lease_id, std::string("recorded"));
}

// kupd's own socket (KUPD_DIRECT), for the tests run against the stall
// proxy (tests/gateway/h2stall.py): what must not go through the proxy.
const char* direct_socket() {
    const char* direct = std::getenv("KUPD_DIRECT");
    CHECK(direct != nullptr);
    return direct;
}

// A lease on `chan` taken through `c`, echo's greeting (a PASS) received,
// and `first` sent unless empty: echo's answer is the lease's next message.
kup::Lease greeted_lease(kup::Client& c, std::uint32_t chan, std::string_view first = {}) {
    kup::Lease l = c.attach(g_device, chan);
    auto hello = c.lease_receive(l.lease_id, T);
    CHECK(hello && hello->kind == kup::Kind::Pass);
    if (!first.empty()) c.lease_send(l.lease_id, first);
    return l;
}

// A program whose receives outlive the client names them itself
// (kup::ReceiveNames).  Against the proxy, kupd's direct socket in
// KUPD_DIRECT: the lease_receive through the proxy, named, is given up on
// after kupd wrote its reply; a second, fresh client's lease_send,
// lease_pass and lease_exchange naming it (again_of) are NotYourTurn,
// nothing sent, and its lease_receive naming it gets the message.
void test_named_receive_across_clients() {
    const char* direct = direct_socket();
    const std::uint32_t chan = 6;  // (not one of the Call pool's)
    std::string lease_id;
    {
        kup::Client d(direct);
        lease_id = greeted_lease(d, chan, "outlives its client").lease_id;
    }
    {
        kup::Client c(g_socket);
        expect_throw<kup::DeadlineExceeded>(
            [&] { c.lease_receive(lease_id, kup::ms{1000}, {"given-up_1", std::nullopt}); },
            is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    }
    kup::Client fresh(direct);
    kup::ReceiveNames again;
    again.again_of = "given-up_1";
    auto refused = is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true,
                                              "its receive given-up_1");
    expect_throw<kup::NotYourTurn>([&] { fresh.lease_send(lease_id, "sent anyway", again); },
                                   refused, WHERE);
    expect_throw<kup::NotYourTurn>([&] { fresh.lease_pass(lease_id, again); }, refused, WHERE);
    expect_throw<kup::NotYourTurn>(
        [&] { fresh.lease_exchange(lease_id, "exchanged anyway", T, again); }, refused, WHERE);
    auto got = fresh.lease_receive(lease_id, T, again);
    CHECK(got && got->kind == kup::Kind::Data);
    CHECK_EQ(got->data, expected_echo(chan, "outlives its client"));
    // nothing was sent: the turn is this side's
    expect_throw<kup::NotYourTurn>(
        [&] { fresh.lease_receive(lease_id, kup::ms(0)); },
        is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true, "already received"),
        WHERE);
    fresh.release(lease_id);
}

// As test_named_receive_across_clients for an exchange: the one given up
// on names its reply (receive_id); a fresh client's exchange naming it is
// NotYourTurn, and its lease_receive naming it gets the reply.
void test_named_exchange_across_clients() {
    const char* direct = direct_socket();
    const std::uint32_t chan = 6;
    std::string lease_id;
    {
        kup::Client d(direct);
        lease_id = greeted_lease(d, chan).lease_id;
    }
    {
        kup::Client c(g_socket);
        expect_throw<kup::DeadlineExceeded>(
            [&] { c.lease_exchange(lease_id, "request", kup::ms{1000}, {"xchg-1", std::nullopt}); },
            is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    }
    kup::Client fresh(direct);
    kup::ReceiveNames again;
    again.again_of = "xchg-1";
    expect_throw<kup::NotYourTurn>(
        [&] { fresh.lease_exchange(lease_id, "sent anyway", T, again); },
        is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true, "its receive xchg-1"),
        WHERE);
    auto got = fresh.lease_receive(lease_id, T, again);
    CHECK(got && got->kind == kup::Kind::Data);
    CHECK_EQ(got->data, expected_echo(chan, "request"));
    fresh.release(lease_id);
}

// Run against the same proxy, kupd's direct socket in KUPD_DIRECT: the
// lease is taken and its message sent directly, and the receive through
// the proxy is the proxy's first RPC.  Its deadline (1 s + KUPD_GRACE)
// passes after kupd wrote the reply, which gRPC then drops; the next
// lease_receive names it (again_of) and gets the same message.
void test_receive_past_deadline() {
    kup::Client d(direct_socket());
    const std::uint32_t chan = 6;  // (not one of the Call pool's)
    kup::Lease l = greeted_lease(d, chan, "the one message");
    kup::Client c(g_socket);
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.lease_receive(l.lease_id, kup::ms{1000}); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    auto got = c.lease_receive(l.lease_id, T);
    CHECK(got && got->kind == kup::Kind::Data);
    CHECK_EQ(got->data, expected_echo(chan, "the one message"));
    d.release(l.lease_id);
}

// As test_receive_past_deadline, with a lease_send between that kupd
// refuses before it runs on the lease (too big for the channel): kupd still
// keeps the message of the receive given up on, and the next lease_receive
// must name that one still (it named none: NotYourTurn).
void test_receive_past_deadline_then_refused() {
    kup::Client d(direct_socket());
    const std::uint32_t chan = 7;
    kup::Lease l = greeted_lease(d, chan, "the one message");
    kup::Client c(g_socket);
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.lease_receive(l.lease_id, kup::ms{1000}); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    expect_throw<kup::TooBig>(
        [&] { c.lease_send(l.lease_id, std::string(l.max_message_bytes + 1, '.')); },
        is_error<kup::TooBig>(kup::StatusCode::INVALID_ARGUMENT, true), WHERE);
    auto got = c.lease_receive(l.lease_id, T);
    CHECK(got && got->kind == kup::Kind::Data);
    CHECK_EQ(got->data, expected_echo(chan, "the one message"));
    d.release(l.lease_id);
}

// As test_receive_past_deadline, then the program sends anyway: lease_send,
// lease_pass and lease_exchange name the receive given up on (again_of) and
// kupd refuses each, NotYourTurn, over the message it kept for it (before,
// the send ran and the message was lost); the next lease_receive gets it.
void test_send_after_receive_past_deadline() {
    kup::Client d(direct_socket());
    const std::uint32_t chan = 6;  // (not one of the Call pool's)
    kup::Lease l = greeted_lease(d, chan, "not lost");
    kup::Client c(g_socket);
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.lease_receive(l.lease_id, kup::ms{1000}); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, false), WHERE);
    auto refused = is_error<kup::NotYourTurn>(kup::StatusCode::FAILED_PRECONDITION, true,
                                              "receive it first (again_of)");
    expect_throw<kup::NotYourTurn>([&] { c.lease_send(l.lease_id, "sent anyway"); }, refused,
                                   WHERE);
    expect_throw<kup::NotYourTurn>([&] { c.lease_pass(l.lease_id); }, refused, WHERE);
    expect_throw<kup::NotYourTurn>([&] { c.lease_exchange(l.lease_id, "exchanged", T); },
                                   refused, WHERE);
    auto got = c.lease_receive(l.lease_id, T);
    CHECK(got && got->kind == kup::Kind::Data);
    CHECK_EQ(got->data, expected_echo(chan, "not lost"));
    c.lease_send(l.lease_id, "now");
    CHECK_EQ(c.lease_receive(l.lease_id, T)->data, expected_echo(chan, "now"));
    d.release(l.lease_id);
}

void test_calls() {
    kup::Client c(g_socket);
    auto r = c.call(g_device, "ping from c++");
    CHECK(r.kind == kup::Kind::Data);
    CHECK_EQ(r.data, expected_echo(r.channel, "ping from c++"));
    // parallel Calls from threads, each answered correctly
    std::vector<std::future<std::string>> futs;
    for (int i = 0; i < 8; ++i)
        futs.push_back(std::async(std::launch::async, [&c, i] {
            std::string text = "call number " + std::to_string(i);
            auto rep = c.call(g_device, text, kup::ms(20000));
            return rep.data == expected_echo(rep.channel, text) ? std::string() : rep.data;
        }));
    for (auto& f : futs) CHECK_EQ(f.get(), std::string());
    // a full-size message; one byte more is kupd's TooBig naming the limit
    auto max = c.list_devices(g_device).at(0).max_message_bytes;
    std::string full(max, '.');
    CHECK_EQ(c.call(g_device, full).data, full);
    expect_throw<kup::TooBig>([&] { c.call(g_device, std::string(max + 1, '.')); },
                              [&](const kup::TooBig& e) {
                                  is_error<kup::TooBig>(kup::StatusCode::INVALID_ARGUMENT, true,
                                                        std::to_string(max))(e);
                                  CHECK_EQ(e.kup_code(), 1004);
                              },
                              WHERE);
    // kupd's deadline: a Call whose reply does not come
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.call(g_device, "!hold", kup::ms(300)); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, true), WHERE);
    // without a timeout: kupd's call_timeout (2 s in the test's kupd)
    expect_throw<kup::DeadlineExceeded>(
        [&] { c.call(g_device, "!hold"); },
        is_error<kup::DeadlineExceeded>(kup::StatusCode::DEADLINE_EXCEEDED, true), WHERE);
}

void test_unknown_device() {
    kup::Client c(g_socket);
    auto nf = [](const kup::NotFound& e) {
        is_error<kup::NotFound>(kup::StatusCode::NOT_FOUND, true, "no-such-device")(e);
        CHECK_EQ(e.kup_code(), 1009);
    };
    expect_throw<kup::NotFound>([&] { c.call("no-such-device", "x"); }, nf, WHERE);
    expect_throw<kup::NotFound>([&] { c.open("no-such-device"); }, nf, WHERE);
    expect_throw<kup::NotFound>([&] { c.attach("no-such-device"); }, nf, WHERE);
    expect_throw<kup::NotFound>([&] { c.list_devices("no-such-device"); }, nf, WHERE);
}

void test_watch() {
    kup::Client c(g_socket);
    kup::Watch init = c.watch(g_device, true);
    auto ev0 = init.next();
    CHECK(ev0 && ev0->initial);
    CHECK_EQ(ev0->device, g_device);
    init.cancel();
    // cancel() ends it: the events already there may still come, then none
    int left = 0;
    while (init.next()) CHECK(++left < 10000);
    CHECK(!init.next().has_value());

    kup::Watch w = c.watch(g_device);
    CancelAfter limit(w, std::chrono::seconds(60));
    std::uint32_t id;
    std::string lease;
    {
        kup::Session s = c.open(g_device);
        id = s.channel();
        lease = s.lease().lease_id;
    }
    auto taken = w.next();
    while (taken && !(taken->type == kup::EventType::LEASE_TAKEN && taken->lease_id == lease))
        taken = w.next();
    CHECK(taken.has_value());
    CHECK_EQ(taken->channel, id);
    CHECK_EQ(taken->holder, std::string("session"));
    CHECK_EQ(std::string(kup::event_name(taken->type)), std::string("LEASE_TAKEN"));
    auto released = w.next();
    while (released && !(released->type == kup::EventType::LEASE_RELEASED && released->lease_id == lease))
        released = w.next();
    CHECK(released.has_value());
    CHECK_EQ(released->reason, std::string("stream ended"));
    // cancel() from another thread ends a next() that waits
    auto waiting = std::async(std::launch::async, [&w] {
        int n = 0;
        while (w.next()) ++n;
        return n;
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    w.cancel();
    waiting.get();
    CHECK(!w.next().has_value());
    // so does destroying the Watch (the waiting next() returns std::nullopt)
    auto owned = std::make_unique<kup::Watch>(c.watch(g_device));
    kup::Watch* raw = owned.get();
    auto ended = std::async(std::launch::async, [raw] {
        while (raw->next()) {
        }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    owned.reset();
    ended.get();
}

void test_too_big() {
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    s.receive(T);
    auto max = s.max_message_bytes();
    for (std::size_t n : {std::size_t(max + 1), kup::MAX_PAYLOAD + 1}) {
        std::string big(n, '.');
        for (int op = 0; op < 2; ++op)
            expect_throw<kup::TooBig>(
                [&] {
                    if (op)
                        s.exchange(big, T);
                    else
                        s.send(big);
                },
                [&](const kup::TooBig& e) {
                    // the client's own refusal: no status, kupd never saw it
                    is_error<kup::TooBig>(std::nullopt, false)(e);
                    CHECK_EQ(e.kup_code(), 1004);
                    CHECK(contains(e.what(), std::to_string(n) + " bytes"));
                },
                WHERE);
    }
    // the limit is named (the channel's data area)
    expect_throw<kup::TooBig>(
        [&] { s.send(std::string(max + 1, '.')); },
        is_error<kup::TooBig>(std::nullopt, false,
                              std::to_string(max + 1) + " bytes exceeds max_message_bytes=" +
                                  std::to_string(max) + " of channel " + std::to_string(s.channel()) +
                                  " of device " + g_device + " (the channel's data area)"),
        WHERE);
    // nothing was sent: the next message is seq 2
    auto m = s.exchange("..", T);
    CHECK_EQ(m->data, std::string(".."));
    CHECK_EQ(m->seq, std::uint64_t(2));
    // over any message kupd carries: TooBig before the wire, for every RPC
    std::string huge(kup::MAX_PAYLOAD + 1, '.');
    auto own = is_error<kup::TooBig>(std::nullopt, false,
                                     "data of " + std::to_string(kup::MAX_PAYLOAD + 1) +
                                         " bytes is larger than any message kupd carries");
    expect_throw<kup::TooBig>([&] { c.call(g_device, huge); }, own, WHERE);
    kup::Lease l = c.attach(g_device);
    c.lease_receive(l.lease_id, T);
    expect_throw<kup::TooBig>([&] { c.lease_send(l.lease_id, huge); }, own, WHERE);
    expect_throw<kup::TooBig>([&] { c.lease_exchange(l.lease_id, huge, T); }, own, WHERE);
    auto r = c.lease_exchange(l.lease_id, "..", T);
    CHECK(r && r->seq == 2);
    c.release(l.lease_id);
}

void test_bad_arguments() {
    expect_throw<kup::ArgumentError>([] { kup::Client bad(""); }, arg_error("socket path must not be empty"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([] { kup::Client bad("unix:"); },
                                     arg_error("socket path must not be empty"), WHERE);
    kup::Client c(g_socket);
    expect_throw<kup::ArgumentError>([&] { c.call("", "x"); }, arg_error("device name is required"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([&] { c.call("\xff", "x"); },
                                     arg_error(R"(device must be valid UTF-8 text, not '\udcff')"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.call(g_device, "x", kup::ms(0)); },
                                     arg_error("timeout must be std::nullopt or > 0 ms, not 0"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.call(g_device, "x", kup::ms(-1)); },
                                     arg_error("> 0 ms, not -1"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.call(g_device, "x", kup::ms(4294967296LL)); },
                                     arg_error("at most 4294967295 ms (uint32 milliseconds on the wire), not 4294967296"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([&] { c.open(""); }, arg_error("device name is required"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.attach(""); }, arg_error("device name is required"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_send("", "x"); }, arg_error("lease id is required"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("", kup::ms(0)); },
                                     arg_error("lease id is required"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(-3)); },
                                     arg_error(">= 0 ms, not -3"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_pass(""); }, arg_error("lease id is required"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.release(""); }, arg_error("lease id is required"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.list_devices("\xc0\xaf"); },
                                     arg_error(R"(device must be valid UTF-8 text, not '\udcc0\udcaf')"),
                                     WHERE);
    // (an encoded surrogate is no UTF-8: Python's and Node's '\ud800')
    expect_throw<kup::ArgumentError>([&] { c.release("\xed\xa0\x80"); },
                                     arg_error(R"(lease id must be valid UTF-8 text, not '\udced\udca0\udc80')"),
                                     WHERE);
    // attach's timeout: the RPC's deadline, > 0, what uint32 ms hold
    expect_throw<kup::ArgumentError>([&] { c.attach(g_device, 3, kup::ms(-1)); },
                                     arg_error("timeout must be std::nullopt or > 0 ms, not -1"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.attach(g_device, 3, kup::ms(0)); },
                                     arg_error("> 0 ms, not 0"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.attach(g_device, 3, kup::ms(4294967296LL)); },
                                     arg_error("at most 4294967295 ms"), WHERE);
    // receive names: up to 64 of [A-Za-z0-9_-], as kupd and every client
    kup::ReceiveNames spaces{"no spaces", std::nullopt};
    kup::ReceiveNames long_again{std::nullopt, std::string(65, 'x')};
    kup::ReceiveNames empty_again{std::nullopt, std::string()};
    kup::ReceiveNames just_id{"an-id", std::nullopt};
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), spaces); },
                                     arg_error("receive_id 'no spaces': only letters, digits, '_' and '-'"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), long_again); },
                                     arg_error("again_of of 65 characters: at most 64"), WHERE);
    // a bad name quoted as Python's repr() and Node's quote() quote it
    // (clients/node/test/errors.js's cases), its length in characters
    kup::ReceiveNames tab{"tab\there\\", std::nullopt};
    kup::ReceiveNames apostrophe{std::nullopt, "it's"};
    kup::ReceiveNames both{std::nullopt, "it's \"x\""};
    kup::ReceiveNames accented{std::string(63, 'a') + "\u00e9", std::nullopt};
    kup::ReceiveNames not_utf8{std::nullopt, "x\xff"};
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), tab); },
                                     arg_error(R"(receive_id 'tab\there\\': only letters)"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), apostrophe); },
                                     arg_error(R"(again_of "it's": only letters)"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), both); },
                                     arg_error(R"(again_of 'it\'s "x"': only letters)"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), accented); },
                                     arg_error("receive_id '" + std::string(63, 'a') +
                                               "\u00e9': only letters"),
                                     WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), not_utf8); },
                                     arg_error(R"(again_of 'x\udcff': only letters)"), WHERE);
    kup::ReceiveNames long_accented{std::nullopt, std::string(64, 'a') + "\u00e9"};
    expect_throw<kup::ArgumentError>([&] { c.lease_pass("l", long_accented); },
                                     arg_error("again_of of 65 characters: at most 64"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_receive("l", kup::ms(0), empty_again); },
                                     arg_error("again_of must not be empty"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_exchange("l", "x", T, spaces); },
                                     arg_error("receive_id 'no spaces'"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_exchange("l", "x", T, long_again); },
                                     arg_error("again_of of 65 characters"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_send("l", "x", long_again); },
                                     arg_error("again_of of 65 characters"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_pass("l", empty_again); },
                                     arg_error("again_of must not be empty"), WHERE);
    expect_throw<kup::ArgumentError>([&] { c.lease_send("l", "x", just_id); },
                                     arg_error("lease_send takes no receive_id (again_of only)"), WHERE);
    // on an open session, which goes on afterwards (nothing was sent)
    kup::Session s = c.open(g_device);
    s.receive(T);
    expect_throw<kup::ArgumentError>([&] { s.receive(kup::ms(-5)); }, arg_error(">= 0 ms, not -5"), WHERE);
    expect_throw<kup::ArgumentError>([&] { s.exchange("x", kup::ms(-5)); }, arg_error(">= 0 ms, not -5"),
                                     WHERE);
    auto m = s.exchange("..", T);
    CHECK_EQ(m->data, std::string(".."));
    CHECK_EQ(m->seq, std::uint64_t(2));
}

// kup::detail::quote, which every quoted value of an argument error goes
// through, as Python's repr() of the text (decoded with surrogateescape:
// what Python's own sys.argv shows for those bytes) and the Node client's
// quote(): clients/node/test/errors.js's cases and more, each checked
// against repr().  And characters(), the length such errors give.
void test_quoting() {
    using kup::detail::quote;
    const std::pair<std::string, std::string> cases[] = {
        {"no spaces", R"('no spaces')"},
        {"", R"('')"},
        {"tab\there\\", R"('tab\there\\')"},
        {"it's", R"("it's")"},
        {"it's \"x\"", R"('it\'s "x"')"},
        {"say \"hi\"", R"('say "hi"')"},
        {"\x01\x1b[0m\x7f", R"('\x01\x1b[0m\x7f')"},
        {"line\r\n", R"('line\r\n')"},
        // NEL, no-break space, soft hyphen (Cc, Zs, Cf); é is printable
        {"\u0085\u00a0\u00ad\u00e9", "'\\x85\\xa0\\xad\u00e9'"},
        // zero-width space, line separator, ideographic space, BOM
        {"\u200b\u2028\u3000\ufeff", R"('\u200b\u2028\u3000\ufeff')"},
        {"\U0001F600", "'\U0001F600'"},
        // a tag, private use in and past the BMP
        {"\U000E0001\ue000\U000F0000", R"('\U000e0001\ue000\U000f0000')"},
        // noncharacters; U+13439 (Cf since Unicode 15, unassigned before)
        {"\uffff\ufdd0\U0001FFFE\U00013439", R"('\uffff\ufdd0\U0001fffe\U00013439')"},
        // bytes of no UTF-8 character: each one \udcNN
        {"\xff", R"('\udcff')"},
        {"a\xc0\xaf" "b", R"('a\udcc0\udcafb')"},
        {"\xed\xa0\x80", R"('\udced\udca0\udc80')"},  // an encoded surrogate
        {"\xe2\x82", R"('\udce2\udc82')"},             // cut short
        {"\xe2\x82" "A", R"('\udce2\udc82A')"},
        {"\xf4\x90\x80\x80", R"('\udcf4\udc90\udc80\udc80')"},  // past U+10FFFF
        {"\u00fc\xfc", "'\u00fc\\udcfc'"},
    };
    for (const auto& [text, want] : cases) CHECK_EQ(quote(text), want);
    using kup::detail::characters;
    CHECK_EQ(characters(""), std::size_t(0));
    CHECK_EQ(characters("\u00e9\U0001F600x"), std::size_t(3));
    CHECK_EQ(characters("\xe2\x82" "A"), std::size_t(3));
    CHECK_EQ(characters("\xed\xa0\x80"), std::size_t(3));
}

void test_destructor_releases() {
    kup::Client c(g_socket);
    std::uint32_t id;
    {
        kup::Session s = c.open(g_device);
        id = s.channel();
        s.receive(T);
        CHECK_EQ(channel_state(c, id), std::string("session"));
    }  // dropped without close(): the destructor ends the stream and the lease
    CHECK_EQ(channel_state(c, id), std::string("free"));
    {
        kup::Session again = c.open(g_device, id);
        CHECK_EQ(again.channel(), id);
        again.receive(T);
        again.send("!hold");  // the kernel keeps the turn: dropped all the same
    }
    // attachable again (kupd waits for the module to let go)
    kup::Session third = c.open(g_device, id);
    CHECK_EQ(third.channel(), id);
    // a moved-from Session owns nothing; the moved-to one holds the channel
    kup::Session moved = std::move(third);
    CHECK_EQ(moved.channel(), id);
    moved = c.open(g_device);  // assigning over it ends the old session
    CHECK(moved.channel() != id);
    wait_state(c, id, "free");
}

void test_close_while_waiting() {
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    auto id = s.channel();
    s.receive(T);
    s.send("!hold");
    auto pending = std::async(std::launch::async, [&s] { s.receive(); });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    s.close();
    std::string what = "channel " + std::to_string(id) + " of " + g_device;
    expect_throw<kup::InvalidArgument>([&] { pending.get(); },
                                       is_error<kup::InvalidArgument>(
                                           std::nullopt, false, what + " was closed while the operation waited"),
                                       WHERE);
    expect_throw<kup::InvalidArgument>([&] { s.receive(kup::ms(0)); },
                                       is_error<kup::InvalidArgument>(std::nullopt, false, what + " is closed"),
                                       WHERE);
    wait_state(c, id, "free");
    // the destructor, while another thread's receive waits: that receive
    // fails the same way, and ends its call before the Session is gone
    auto owned = std::make_unique<kup::Session>(c.open(g_device));
    kup::Session* raw = owned.get();
    auto id2 = raw->channel();
    raw->receive(T);
    raw->send("!hold");
    auto waiting = std::async(std::launch::async, [raw] { raw->receive(); });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    owned.reset();
    expect_throw<kup::InvalidArgument>(
        [&] { waiting.get(); },
        is_error<kup::InvalidArgument>(std::nullopt, false, " was closed while the operation waited"), WHERE);
    wait_state(c, id2, "free");
}

void test_client_close() {
    kup::Client c(g_socket);
    kup::Client c2(g_socket);
    kup::Session s = c2.open(g_device);
    kup::Session idle = c2.open(g_device);
    s.receive(T);
    s.send("!hold");
    auto pending = std::async(std::launch::async, [&s] { s.receive(); });
    kup::Lease l = c2.attach(g_device);
    c2.lease_receive(l.lease_id, T);
    c2.lease_send(l.lease_id, "!hold");
    auto lease_wait = std::async(std::launch::async, [&] { c2.lease_receive(l.lease_id); });
    kup::Watch w = c2.watch(g_device);
    auto watching = std::async(std::launch::async, [&w] {
        while (w.next()) {
        }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    c2.close();
    auto waited = " was closed while the operation waited";
    expect_throw<kup::InvalidArgument>(
        [&] { pending.get(); },
        is_error<kup::InvalidArgument>(std::nullopt, false,
                                       "channel " + std::to_string(s.channel()) + " of " + g_device + waited),
        WHERE);
    expect_throw<kup::InvalidArgument>(
        [&] { lease_wait.get(); },
        is_error<kup::InvalidArgument>(std::nullopt, false, "client of " + g_socket + waited), WHERE);
    expect_throw<kup::InvalidArgument>(
        [&] { watching.get(); },
        is_error<kup::InvalidArgument>(std::nullopt, false, "client of " + g_socket + waited), WHERE);
    expect_throw<kup::InvalidArgument>([&] { idle.receive(kup::ms(0)); },
                                       is_error<kup::InvalidArgument>(std::nullopt, false, " is closed"),
                                       WHERE);
    auto closed = is_error<kup::InvalidArgument>(std::nullopt, false, "client of " + g_socket + " is closed");
    expect_throw<kup::InvalidArgument>([&] { c2.call(g_device, "x"); }, closed, WHERE);
    expect_throw<kup::InvalidArgument>([&] { c2.list_devices(); }, closed, WHERE);
    expect_throw<kup::InvalidArgument>([&] { c2.open(g_device); }, closed, WHERE);
    expect_throw<kup::InvalidArgument>([&] { c2.watch(); }, closed, WHERE);
    expect_throw<kup::InvalidArgument>([&] { w.next(); }, closed, WHERE);  // (and stays so)
    expect_throw<kup::InvalidArgument>([&] { c2.health(); }, closed, WHERE);
    c2.close();  // twice: nothing more
    wait_state(c, s.channel(), "free");
    wait_state(c, idle.channel(), "free");
    c.release(l.lease_id);
}

void test_unreachable() {
    kup::Client nowhere("/nonexistent-kupd-dir/missing.sock");
    auto unreachable = [](const kup::Unavailable& e) {
        is_error<kup::Unavailable>(kup::StatusCode::UNAVAILABLE, false)(e);
        CHECK(e.is_connection_failure());
        CHECK_EQ(e.kup_code(), 0);
    };
    expect_throw<kup::Unavailable>([&] { nowhere.call(g_device, "x"); }, unreachable, WHERE);
    expect_throw<kup::Unavailable>([&] { nowhere.list_devices(); }, unreachable, WHERE);
    expect_throw<kup::Unavailable>([&] { nowhere.attach(g_device); }, unreachable, WHERE);
    expect_throw<kup::Unavailable>([&] { nowhere.health(); }, unreachable, WHERE);
}

void test_session_ended_by_module() {
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    s.receive(T);
    // echo's !kick: the module ends the session (kupdev_disconnect)
    s.send("!kick");
    expect_throw<kup::PeerGone>([&] { s.receive(kup::ms(30000)); },
                                [](const kup::PeerGone& e) {
                                    is_error<kup::PeerGone>(kup::StatusCode::ABORTED, true, "EKU_PEER")(e);
                                    CHECK_EQ(e.kup_code(), 1010);
                                },
                                WHERE);
}

// The one mapping of statuses kupd never sends (no kup-error metadata), as
// gRPC's own failures come, and of kupd's class names.
void test_status_mapping() {
    using kup::StatusCode;
    auto check = [](StatusCode code, const std::string& details, const std::string& kind,
                    const std::string& want, const std::string& part, bool from_kupd) {
        try {
            std::rethrow_exception(kup::detail::error_from_status(code, details, kind));
        } catch (const kup::Error& e) {
            CHECK_EQ(std::string(e.kind()), want);
            CHECK(e.grpc_code() == code);
            CHECK_EQ(e.from_kupd(), from_kupd);
            if (!contains(e.what(), part))
                throw Failure{"message \"" + std::string(e.what()) + "\" lacks \"" + part + "\""};
        }
    };
    check(StatusCode::UNAVAILABLE, "EKU_SHUTDOWN: device echo is shutting down", "", "Shutdown",
          "EKU_SHUTDOWN: device echo", false);
    check(StatusCode::UNAVAILABLE, "Connection dropped", "", "Unavailable", "Connection dropped", false);
    check(StatusCode::UNAVAILABLE, "ping timeout", "", "Unavailable", "keepalive ping went unanswered",
          false);
    check(StatusCode::INTERNAL, "boom", "", "SystemFailure", "boom", false);
    check(StatusCode::CANCELLED, "Cancelled", "", "SystemFailure", "Cancelled", false);
    check(StatusCode::UNIMPLEMENTED, "Method not found!", "", "NotFound", "does not serve that method",
          false);
    check(StatusCode::RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4259840)", "",
          "TooBig", "larger than this socket accepts", false);
    check(StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded", "", "DeadlineExceeded",
          "kupd did not answer within the RPC's deadline", false);
    check(StatusCode::UNAVAILABLE, "failed to connect to all addresses; Connection reset by peer", "",
          "Unavailable", "max_connections", false);
    check(StatusCode::FAILED_PRECONDITION, "still releasing", "", "NotYourTurn", "still releasing", false);
    // with kup-error: that class, whatever the code; Releasing is a Busy
    check(StatusCode::FAILED_PRECONDITION, "channel 3 of echo: still releasing", "Releasing", "Releasing",
          "still releasing", true);
    try {
        std::rethrow_exception(kup::detail::error_from_status(StatusCode::FAILED_PRECONDITION, "r", "Releasing"));
    } catch (const kup::Busy& e) {
        CHECK_EQ(e.kup_code(), 1013);
        CHECK(!e.is_connection_failure());
    }
    check(StatusCode::UNAVAILABLE, "device rot13 is not reachable", "Unavailable", "Unavailable",
          "not reachable", true);
    check(StatusCode::PERMISSION_DENIED, "revoked", "PermissionDenied", "PermissionDenied", "revoked", true);
    // kup-retry-after-ms: whole ms > 0 (at most 2^53 - 1), anything else ignored
    using kup::detail::retry_after_of;
    CHECK(retry_after_of("340") == kup::ms(340));
    CHECK(retry_after_of("9007199254740991") == kup::ms(9007199254740991LL));
    for (const char* bad : {"", "0", "-5", "1.5", "1e3", " 3", "9007199254740992",
                            "99999999999999999999"})
        if (retry_after_of(bad)) throw Failure{std::string("retry_after_of(\"") + bad + "\") is set"};
    // a Session's in-band Error.retry_after_ms: the same range
    CHECK(retry_after_of(std::uint64_t{340}) == kup::ms(340));
    CHECK(retry_after_of(std::uint64_t{9007199254740991ULL}) == kup::ms(9007199254740991LL));
    CHECK(!retry_after_of(std::uint64_t{0}));
    CHECK(!retry_after_of(std::uint64_t{9007199254740992ULL}));
    // kept on kupd's answer, whatever its class; not on gRPC's own failure
    try {
        std::rethrow_exception(kup::detail::error_from_status(
            StatusCode::RESOURCE_EXHAUSTED, "calls_per_second", "ResourceExhausted", kup::ms(340)));
    } catch (const kup::ResourceExhausted& e) {
        CHECK(e.retry_after() == kup::ms(340));
    }
    try {
        std::rethrow_exception(kup::detail::error_from_status(StatusCode::RESOURCE_EXHAUSTED, "limit", "",
                                                              kup::ms(340)));
    } catch (const kup::ResourceExhausted& e) {
        CHECK(!e.retry_after().has_value());
    }
    check(StatusCode::RESOURCE_EXHAUSTED, "limit", "ResourceExhausted", "ResourceExhausted", "limit", true);
    // an unknown class name: by code
    check(StatusCode::NOT_FOUND, "x", "NoSuchClass", "NotFound", "x", true);
    check(StatusCode::DATA_LOSS, "", "", "SystemFailure", "DATA_LOSS", false);
}

// Messages of KUP's largest size (4 MiB) both ways: run by name, against a
// kupd whose echo has 1024 pages per channel (tests/cpp does).  gRPC's
// default receive limit (4 MiB) is below such a reply with its envelope:
// the client raises it as kupd does (MAX_GRPC_MESSAGE).
void test_big_messages() {
    kup::Client c(g_socket);
    auto max = c.list_devices(g_device).at(0).max_message_bytes;
    CHECK_EQ(max, std::uint64_t(4 * 1024 * 1024));
    const std::string big(max, '.');  // '.' is the same on every channel
    CHECK_EQ(c.call(g_device, big, kup::ms(60000)).data, big);
    kup::Session s = c.open(g_device);
    s.receive(kup::ms(60000));
    auto m = s.exchange(big, kup::ms(60000));
    CHECK(m.has_value());
    CHECK_EQ(m->data.size(), big.size());
    CHECK(m->data == big);
    kup::Lease l = c.attach(g_device);
    c.lease_receive(l.lease_id, kup::ms(60000));
    auto r = c.lease_exchange(l.lease_id, big, kup::ms(60000));
    CHECK(r && r->data == big);
    c.release(l.lease_id);
}

// A Session operation kupd does not answer (kupd stopped: SIGSTOP) fails
// after its timeout plus KUPD_GRACE and ends the session.  Run by name,
// with KUPD_PID naming kupd's process (tests/cpp does).
void test_kupd_not_answering() {
    const char* pid_text = std::getenv("KUPD_PID");
    CHECK(pid_text != nullptr);
    const pid_t pid = static_cast<pid_t>(std::atol(pid_text));
    CHECK(pid > 1);
    kup::Client c(g_socket);
    kup::Session s = c.open(g_device);
    const std::string what = "channel " + std::to_string(s.channel()) + " of " + g_device;
    s.receive(T);
    // kupd runs again however the test ends, and after 30 s at the latest
    // (a client that waited for ever would then get kupd's answer and fail)
    std::promise<void> done;
    std::thread resume([pid, ended = done.get_future()] {
        ended.wait_for(std::chrono::seconds(30));
        kill(pid, SIGCONT);
    });
    struct Join {
        std::promise<void>& done;
        std::thread& t;
        ~Join() {
            done.set_value();
            t.join();
        }
    } join{done, resume};
    CHECK_EQ(kill(pid, SIGSTOP), 0);
    expect_throw<kup::DeadlineExceeded>(
        [&] { s.exchange("x", kup::ms(100)); },
        is_error<kup::DeadlineExceeded>(std::nullopt, false,
                                        what + ": kupd did not answer within 5.1 s (the operation's "
                                               "timeout plus the client's grace); the session was ended"),
        WHERE);
    CHECK_EQ(kill(pid, SIGCONT), 0);
    expect_throw<kup::InvalidArgument>(
        [&] { s.receive(kup::ms(0)); },
        is_error<kup::InvalidArgument>(
            std::nullopt, false,
            what + " is closed: kupd did not answer an operation within its timeout plus the grace"),
        WHERE);
    wait_state(c, s.channel(), "free");
}

// How a Watch, a Session and the unary RPCs end when kupd goes away under
// them: `sig` SIGTERM (kupd's shutdown: Shutdown, kupd's answer, after the
// SERVER_SHUTTING_DOWN event) or SIGKILL (the connection breaks:
// Unavailable, a connection failure).  Run by name, with KUPD_PID naming a
// kupd of the test's own (tests/cpp does): kupd is gone afterwards.
struct Ending {
    bool saw_server_shutting_down = false;
    int events = 0;
    std::string kind;  // the class next() threw ("" if it returned std::nullopt)
    std::optional<kup::StatusCode> code;
    bool from_kupd = false;
    bool connection_failure = false;
    std::string what;
};

Ending watch_until_end(kup::Watch& w) {
    Ending out;
    try {
        while (auto ev = w.next()) {
            ++out.events;
            if (ev->type == kup::EventType::SERVER_SHUTTING_DOWN) out.saw_server_shutting_down = true;
        }
    } catch (const kup::Error& e) {
        out.kind = e.kind();
        out.code = e.grpc_code();
        out.from_kupd = e.from_kupd();
        out.connection_failure = e.is_connection_failure();
        out.what = e.what();
    }
    return out;
}

pid_t kupd_pid() {
    const char* pid_text = std::getenv("KUPD_PID");
    if (!pid_text) throw Failure{"KUPD_PID is not set"};
    const pid_t pid = static_cast<pid_t>(std::atol(pid_text));
    if (pid <= 1) throw Failure{"KUPD_PID is not a process id"};
    return pid;
}

void kupd_goes_away(int sig) {
    const pid_t pid = kupd_pid();
    const bool killed = sig == SIGKILL;
    kup::Client c(g_socket);
    // a Watch whose next() waits as kupd goes, and one nobody waits on then
    kup::Watch waited = c.watch(g_device, true);
    kup::Watch idle = c.watch("", true);
    CHECK(waited.next().has_value());  // (the streams are up: the initial state came)
    CHECK(idle.next().has_value());
    // a Session whose receive waits (echo never answers !hold)
    kup::Session s = c.open(g_device);
    const std::string what = "channel " + std::to_string(s.channel()) + " of " + g_device;
    s.receive(T);
    s.send("!hold");
    // (bounded: should kupd's end not reach them, the test fails instead of hanging)
    CancelAfter limit_waited(waited, std::chrono::seconds(120));
    CancelAfter limit_idle(idle, std::chrono::seconds(120));
    auto watching = std::async(std::launch::async, [&waited] { return watch_until_end(waited); });
    auto receiving = std::async(std::launch::async, [&s] { s.receive(kup::ms(60000)); });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    CHECK_EQ(kill(pid, sig), 0);

    // kupd's answer, or gRPC's own (the connection broke); `first`: the
    // stream's events came before it (not again once it ended)
    auto expected = [&](const char* which, const Ending& e, bool first) {
        std::string got = std::string(which) + " ended with \"" + e.kind + "\" (" + e.what +
                          "), code " + (e.code ? show(*e.code) : "none") + ", from_kupd " +
                          show(e.from_kupd) + ", after " + show(e.events) + " events";
        bool ok = killed ? e.kind == "Unavailable" && e.code == kup::StatusCode::UNAVAILABLE &&
                               !e.from_kupd && e.connection_failure
                         : e.kind == "Shutdown" && e.code == kup::StatusCode::UNAVAILABLE &&
                               e.from_kupd && contains(e.what, "EKU_SHUTDOWN") &&
                               (e.saw_server_shutting_down || !first);
        if (!ok) throw Failure{got};
    };
    Ending ended = watching.get();
    expected("the waited Watch", ended, true);
    Ending ended_idle = watch_until_end(idle);
    expected("the idle Watch", ended_idle, true);
    // the stream stays ended: next() throws the same again
    Ending again = watch_until_end(waited);
    expected("the waited Watch's next() again", again, false);
    CHECK_EQ(again.events, 0);
    CHECK_EQ(again.what, ended.what);
    // the Session's waiting receive: the same class; later operations too
    if (killed)
        expect_throw<kup::Unavailable>([&] { receiving.get(); },
                                       [](const kup::Unavailable& e) {
                                           is_error<kup::Unavailable>(kup::StatusCode::UNAVAILABLE,
                                                                      false)(e);
                                           CHECK(e.is_connection_failure());
                                       },
                                       WHERE);
    else
        expect_throw<kup::Shutdown>([&] { receiving.get(); },
                                    is_error<kup::Shutdown>(kup::StatusCode::UNAVAILABLE, true,
                                                            "EKU_SHUTDOWN"),
                                    WHERE);
    auto later = what + " is closed: the session already ended with ";
    if (killed)
        expect_throw<kup::Unavailable>([&] { s.receive(kup::ms(0)); },
                                       is_error<kup::Unavailable>(kup::StatusCode::UNAVAILABLE, false,
                                                                  later + "Unavailable: "),
                                       WHERE);
    else
        expect_throw<kup::Shutdown>([&] { s.receive(kup::ms(0)); },
                                    is_error<kup::Shutdown>(kup::StatusCode::UNAVAILABLE, true,
                                                            later + "Shutdown: EKU_SHUTDOWN"),
                                    WHERE);
    // kupd is gone (once it has exited; a SIGTERMed kupd takes a moment):
    // an RPC, and a new Watch, cannot connect
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
        try {
            c.list_devices();
        } catch (const kup::Unavailable& e) {
            if (e.is_connection_failure()) break;
        } catch (const kup::Error&) {
        }
        if (std::chrono::steady_clock::now() > until) throw Failure{"kupd still answers"};
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    auto unreachable = [](const kup::Unavailable& e) {
        is_error<kup::Unavailable>(kup::StatusCode::UNAVAILABLE, false)(e);
        CHECK(e.is_connection_failure());
    };
    kup::Watch after = c.watch();
    expect_throw<kup::Unavailable>([&] { after.next(); }, unreachable, WHERE);
}

void test_kupd_shutdown() { kupd_goes_away(SIGTERM); }
void test_kupd_killed() { kupd_goes_away(SIGKILL); }

// fork() with a client open: gRPC C++ does not support it, so the child's
// copies refuse every operation (and a new Client) naming the fork, and
// their destructors leave the parent's connection alone; the child then
// execs this program, whose own client works.  The parent -- a Call, a
// Session and a Watch it had -- goes on unaffected.
void test_fork() {
    auto c = std::make_unique<kup::Client>(g_socket);
    CHECK_EQ(c->call(g_device, "before", T).data.size(), std::size_t(6));
    auto s = std::make_unique<kup::Session>(c->open(g_device));
    s->receive(T);
    const std::uint32_t chan = s->channel();
    auto w = std::make_unique<kup::Watch>(c->watch(g_device));
    const pid_t parent = getpid();
    int out[2];
    CHECK_EQ(pipe(out), 0);
    std::fflush(stdout);
    const pid_t child = fork();
    CHECK(child >= 0);
    if (child == 0) {
        // The child: nothing here may touch the parent's gRPC (so no CHECK
        // that throws out of here: every outcome is written to the pipe).
        close(out[0]);
        std::string report;
        auto refused = [&](const char* what, const std::function<void()>& fn,
                           const std::string& part) {
            try {
                fn();
                report += std::string("FAIL ") + what + ": did not throw\n";
            } catch (const kup::InvalidArgument& e) {
                if (!contains(e.what(), part))
                    report += std::string("FAIL ") + what + ": " + e.what() + "\n";
                else
                    report += std::string("refused ") + what + "\n";
            } catch (const std::exception& e) {
                report += std::string("FAIL ") + what + ": threw " + e.what() + "\n";
            }
        };
        const std::string created =
            " was created in process " + std::to_string(parent) +
            " and cannot be used after fork(); gRPC C++ does not support fork()";
        refused("call", [&] { c->call(g_device, "x"); }, "client of " + g_socket + created);
        refused("list_devices", [&] { c->list_devices(); }, "client of " + g_socket + created);
        refused("open", [&] { c->open(g_device); }, "client of " + g_socket + created);
        refused("watch", [&] { c->watch(); }, "client of " + g_socket + created);
        refused("session", [&] { s->receive(kup::ms(0)); },
                "channel " + std::to_string(chan) + " of " + g_device + " (client of " + g_socket +
                    ")" + created);
        refused("watch next", [&] { w->next(); }, "watch (client of " + g_socket + ")" + created);
        refused("new client", [&] { kup::Client fresh(g_socket); },
                "kup::Client cannot be made in process " + std::to_string(getpid()) +
                    ": it was forked from process " + std::to_string(parent) +
                    " after a kup::Client was made there");
        // closing and destroying them does nothing to the parent's connection
        w->cancel();
        s->close();
        c->close();
        w.reset();
        s.reset();
        c.reset();
        report += "destroyed\n";
        if (write(out[1], report.data(), report.size()) != static_cast<ssize_t>(report.size()))
            _exit(3);
        // exec: a program of its own, with a client of its own
        if (dup2(out[1], 1) < 0) _exit(4);
        close(out[1]);
        char exe[PATH_MAX] = {0};
        if (readlink("/proc/self/exe", exe, sizeof exe - 1) <= 0) _exit(5);
        execl(exe, exe, g_socket.c_str(), g_device.c_str(), "session_round_trip", (char*)nullptr);
        _exit(6);
    }
    close(out[1]);
    // the parent meanwhile: its Call, Session and Watch go on (bounded: a
    // connection the child took hangs them)
    CHECK_EQ(c->call(g_device, "during", T).data.size(), std::size_t(6));
    CHECK_EQ(s->exchange("sess", T)->data, expected_echo(chan, "sess"));
    // the child's output, until it (and the program it execs) ends
    std::string got;
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    for (;;) {
        pollfd pfd{out[0], POLLIN, 0};
        int n = poll(&pfd, 1, 1000);
        if (n > 0) {
            char buf[4096];
            ssize_t r = read(out[0], buf, sizeof buf);
            if (r <= 0) break;
            got.append(buf, static_cast<std::size_t>(r));
        }
        if (std::chrono::steady_clock::now() > until) {
            kill(child, SIGKILL);
            break;
        }
    }
    close(out[0]);
    int status = 0;
    CHECK_EQ(waitpid(child, &status, 0), child);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 || contains(got, "FAIL") ||
        !contains(got, "destroyed\n") ||
        !contains(got, "ok session_round_trip\n# pass 1\n# fail 0"))
        throw Failure{"the child (status " + std::to_string(status) + ") said:\n" + got};
    for (const char* what :
         {"call", "list_devices", "open", "watch", "session", "watch next", "new client"})
        CHECK(contains(got, std::string("refused ") + what + "\n"));
    // after the child's destructors and exit: all still works
    CHECK_EQ(c->call(g_device, "after", T).data.size(), std::size_t(5));
    CHECK_EQ(s->exchange("again", T)->data, expected_echo(chan, "again"));
    std::string lease;
    {
        kup::Session other = c->open(g_device);
        lease = other.lease().lease_id;
    }
    CancelAfter limit(*w, std::chrono::seconds(60));
    auto ev = w->next();
    while (ev && !(ev->type == kup::EventType::LEASE_TAKEN && ev->lease_id == lease))
        ev = w->next();
    CHECK(ev.has_value());
    kup::Client fresh(g_socket);
    CHECK_EQ(fresh.health(), std::string("SERVING"));
}

// One Client shared by threads at once: Calls from several, a Session per
// thread, an Attach lease's operations, ListDevices, and a Watch seeing every
// Session's lease taken -- each answer checked, none mixed up with another
// thread's.
void test_threads() {
    constexpr int SESSIONS = 4, CALLERS = 4, ROUNDS = 50;
    kup::Client c(g_socket);
    kup::Watch w = c.watch(g_device);
    std::mutex seen_mu;
    std::set<std::string> taken;  // the leases the Watch saw taken
    auto watcher = std::async(std::launch::async, [&] {
        while (auto ev = w.next())
            if (ev->type == kup::EventType::LEASE_TAKEN) {
                std::lock_guard<std::mutex> g(seen_mu);
                taken.insert(ev->lease_id);
            }
    });
    CancelAfter limit(w, std::chrono::seconds(300));
    // each job: "" or what went wrong
    std::vector<std::future<std::string>> sessions, others;
    for (int i = 0; i < SESSIONS; ++i)
        sessions.push_back(std::async(std::launch::async, [&c, i]() -> std::string {
            kup::Session s = c.open(g_device);
            auto first = s.receive(T);
            if (!first || first->kind != kup::Kind::Pass) return "session " + std::to_string(i) + ": no PASS";
            for (int r = 0; r < ROUNDS; ++r) {
                std::string text = "session " + std::to_string(i) + " round " + std::to_string(r);
                auto m = s.exchange(text, T);
                if (!m || m->data != expected_echo(s.channel(), text) ||
                    m->seq != std::uint64_t(2 + r))
                    return text + ": got " + (m ? m->data + " seq " + std::to_string(m->seq) : "none");
            }
            std::string lease = s.lease().lease_id;
            s.close();
            return "lease " + lease;
        }));
    for (int i = 0; i < CALLERS; ++i)
        others.push_back(std::async(std::launch::async, [&c, i]() -> std::string {
            for (int r = 0; r < ROUNDS; ++r) {
                std::string text = "caller " + std::to_string(i) + " call " + std::to_string(r);
                auto rep = c.call(g_device, text, kup::ms(60000));
                if (rep.data != expected_echo(rep.channel, text)) return text + ": got " + rep.data;
            }
            return "";
        }));
    others.push_back(std::async(std::launch::async, [&c]() -> std::string {
        for (int r = 0; r < ROUNDS / 5; ++r) {
            if (c.list_devices(g_device).at(0).name != g_device) return "list_devices: another device";
            kup::Lease l = c.attach(g_device);
            c.lease_receive(l.lease_id, T);
            std::string text = "lease round " + std::to_string(r);
            auto m = c.lease_exchange(l.lease_id, text, T);
            c.release(l.lease_id);
            if (!m || m->data != expected_echo(l.channel, text)) return text + ": wrong reply";
        }
        return "";
    }));
    std::vector<std::string> leases;
    for (auto& f : sessions) {
        std::string got = f.get();
        if (got.rfind("lease ", 0) != 0) throw Failure{got};
        leases.push_back(got.substr(6));
    }
    for (auto& f : others) CHECK_EQ(f.get(), std::string());
    // the Watch saw every Session's lease taken (its events may trail)
    auto until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    for (;;) {
        {
            std::lock_guard<std::mutex> g(seen_mu);
            if (std::all_of(leases.begin(), leases.end(),
                            [&](const std::string& l) { return taken.count(l) > 0; }))
                break;
        }
        if (std::chrono::steady_clock::now() > until) throw Failure{"the Watch missed a lease taken"};
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    w.cancel();
    watcher.get();
}

// A Call over the tenant's calls_per_second (KUPD_RATE, at most 1 a
// second: a burst of one) -- kupd's refusal says when to retry: retry_after()
// more than 0 and at most one token's refill, and the message says it too.
void test_calls_per_second() {
    const char* rate_env = std::getenv("KUPD_RATE");
    double rate = rate_env ? std::atof(rate_env) : 0.0;
    if (!(rate > 0.0 && rate <= 1.0)) throw Failure{"KUPD_RATE must be in (0, 1]"};
    kup::Client c(g_socket);
    c.call(g_device, "one");  // the burst's one token
    expect_throw<kup::ResourceExhausted>(
        [&] { c.call(g_device, "two"); },
        [&](const kup::ResourceExhausted& e) {
            is_error<kup::ResourceExhausted>(kup::StatusCode::RESOURCE_EXHAUSTED, true,
                                             "rule calls_per_second")(e);
            CHECK(e.retry_after().has_value());
            auto most = static_cast<std::int64_t>(1000.0 / rate) + 1;
            CHECK(e.retry_after()->count() > 0);
            CHECK(e.retry_after()->count() <= most);
            if (!contains(e.what(), "at the earliest"))
                throw Failure{"message \"" + std::string(e.what()) + "\" does not say when"};
        },
        WHERE);
}

// The tenant's Session and lease operations are held to KUPD_OPS_RATE (one
// each 10 s or fewer: a burst of one, the next turn past kupd's PACE_LIMIT
// of 5 s) -- an operation refused for it says when to retry, in-band on a
// Session (Error.retry_after_ms) as in a lease RPC's status
// (kup-retry-after-ms): retry_after() more than 0, at most the wait for the
// turn less what the operation may wait, and the message says it too.
void test_channel_ops_per_second() {
    constexpr std::int64_t PACE_LIMIT_MS = 5000;  // kupd.policy.PACE_LIMIT
    const char* rate_env = std::getenv("KUPD_OPS_RATE");
    double rate = rate_env ? std::atof(rate_env) : 0.0;
    if (!(rate > 0.0 && rate <= 0.1)) throw Failure{"KUPD_OPS_RATE must be in (0, 0.1]"};
    const auto turn = static_cast<std::int64_t>(1000.0 / rate) + 1;
    auto told = [](std::int64_t most) {
        return [most](const kup::ResourceExhausted& e) {
            is_error<kup::ResourceExhausted>(kup::StatusCode::RESOURCE_EXHAUSTED, true,
                                             "rule channel_ops_per_second")(e);
            CHECK(e.retry_after().has_value());
            CHECK(e.retry_after()->count() > 0);
            if (e.retry_after()->count() > most)
                throw Failure{"retry_after " + std::to_string(e.retry_after()->count()) + " > " +
                              std::to_string(most)};
            if (!contains(e.what(), "at the earliest"))
                throw Failure{"message \"" + std::string(e.what()) + "\" does not say when"};
        };
    };
    kup::Client c(g_socket);
    {
        auto s = c.open(g_device);
        s.receive(kup::ms(0));  // the burst's one operation
        // a non-blocking one: its whole wait; a blocking one: that less
        // what it may wait (kupd's limit, its timeout being longer)
        expect_throw<kup::ResourceExhausted>([&] { s.receive(kup::ms(0)); }, told(turn), WHERE);
        expect_throw<kup::ResourceExhausted>([&] { s.exchange("soon", kup::ms(30000)); },
                                             told(turn - PACE_LIMIT_MS), WHERE);
    }
    kup::Lease l = c.attach(g_device);
    expect_throw<kup::ResourceExhausted>([&] { c.lease_receive(l.lease_id, kup::ms(0)); },
                                         told(turn), WHERE);
    c.release(l.lease_id);
}

struct Test {
    const char* name;
    void (*fn)();
    bool by_name_only = false;  // needs a kupd of its own: run only when named
};

const Test TESTS[] = {
    {"status_mapping", test_status_mapping},
    {"devices_and_health", test_devices_and_health},
    {"session_round_trip", test_session_round_trip},
    {"odd_channel_and_busy", test_odd_channel_and_busy},
    {"nonblocking_receive_and_deadline", test_nonblocking_receive_and_deadline},
    {"leases", test_leases},
    {"calls", test_calls},
    {"unknown_device", test_unknown_device},
    {"watch", test_watch},
    {"too_big", test_too_big},
    {"bad_arguments", test_bad_arguments},
    {"quoting", test_quoting},
    {"destructor_releases", test_destructor_releases},
    {"close_while_waiting", test_close_while_waiting},
    {"client_close", test_client_close},
    {"unreachable", test_unreachable},
    {"session_ended_by_module", test_session_ended_by_module},
    {"fork", test_fork},
    {"threads", test_threads},
    {"big_messages", test_big_messages, true},
    {"kupd_not_answering", test_kupd_not_answering, true},
    {"kupd_shutdown", test_kupd_shutdown, true},
    {"kupd_killed", test_kupd_killed, true},
    {"attach_past_deadline", test_attach_past_deadline, true},
    {"attach_deadline", test_attach_deadline, true},
    {"named_receive_across_clients", test_named_receive_across_clients, true},
    {"named_exchange_across_clients", test_named_exchange_across_clients, true},
    {"receive_past_deadline", test_receive_past_deadline, true},
    {"receive_past_deadline_then_refused", test_receive_past_deadline_then_refused, true},
    {"send_after_receive_past_deadline", test_send_after_receive_past_deadline, true},
    {"calls_per_second", test_calls_per_second, true},
    {"channel_ops_per_second", test_channel_ops_per_second, true},
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s KUPD_SOCKET [DEVICE] [TEST...]\n", argv[0]);
        return 2;
    }
    g_socket = argv[1];
    if (argc > 2) g_device = argv[2];
    std::vector<std::string> only(argv + std::min(argc, 3), argv + argc);
    int pass = 0, fail = 0;
    for (const Test& t : TESTS) {
        bool named = std::find(only.begin(), only.end(), t.name) != only.end();
        if (only.empty() ? t.by_name_only : !named) continue;
        std::string why;
        try {
            t.fn();
        } catch (const Failure& f) {
            why = f.why;
        } catch (const kup::Error& e) {
            why = std::string("unexpected ") + e.kind() + ": " + e.what();
        } catch (const std::exception& e) {
            why = std::string("unexpected exception: ") + e.what();
        }
        if (why.empty()) {
            ++pass;
            std::printf("ok %s\n", t.name);
        } else {
            ++fail;
            std::printf("not ok %s: %s\n", t.name, why.c_str());
        }
        std::fflush(stdout);
    }
    std::printf("# pass %d\n# fail %d\n", pass, fail);
    return fail ? 1 : 0;
}
