// SPDX-License-Identifier: BSD-2-Clause
//
// A compile-only test (make -C clients/cpp api-compat; tests/cpp runs it):
// code written against an earlier kupclient.hpp still compiles.  Adding a
// parameter to a function, even a defaulted one, changes its type, and a
// program that took its address with the old type (a member-function
// pointer, a table of operations) stops compiling; a new parameter comes as
// a new overload instead.  Every public member function's type is taken
// here as a program would have written it, the oldest signatures first;
// add a line when a function is added, never change one.
//
// (An unannotated `auto p = &kup::Client::attach;` cannot pick among
// overloads: a program names the type it wants, as below, or uses a lambda.)
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kupclient.hpp"

namespace {

using kup::Client;
using kup::Session;
using kup::Watch;

// Each is a pointer to a member function of exactly this type; taking
// `&Class::name` as one fails to compile when no overload has the type.
template <class T>
struct Has {
    constexpr explicit Has(T p) : ptr(p) {}
    T ptr;
};

// ---- Client, as first released (e122b31)
[[maybe_unused]] constexpr Has<const std::string& (Client::*)() const> client_path{&Client::path};
[[maybe_unused]] constexpr Has<const std::string& (Client::*)() const> client_caller{
    &Client::caller};
[[maybe_unused]] constexpr Has<void (Client::*)()> client_close{&Client::close};
[[maybe_unused]] constexpr Has<std::vector<kup::DeviceInfo> (Client::*)(std::string_view)>
    list_devices{&Client::list_devices};
[[maybe_unused]] constexpr Has<std::string (Client::*)(std::string_view)> health{&Client::health};
[[maybe_unused]] constexpr Has<kup::CallReply (Client::*)(std::string_view, std::string_view,
                                                           std::optional<kup::ms>)>
    call{&Client::call};
[[maybe_unused]] constexpr Has<Session (Client::*)(std::string_view, std::optional<std::uint32_t>)>
    open{&Client::open};
[[maybe_unused]] constexpr Has<Watch (Client::*)(std::string_view, bool)> watch{&Client::watch};
[[maybe_unused]] constexpr Has<kup::Lease (Client::*)(std::string_view,
                                                      std::optional<std::uint32_t>)>
    attach{&Client::attach};
[[maybe_unused]] constexpr Has<void (Client::*)(std::string_view, std::string_view)> lease_send{
    &Client::lease_send};
[[maybe_unused]] constexpr Has<void (Client::*)(std::string_view)> lease_pass{&Client::lease_pass};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Client::*)(std::string_view,
                                                                       kup::Timeout)>
    lease_receive{&Client::lease_receive};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Client::*)(
    std::string_view, std::string_view, kup::Timeout)>
    lease_exchange{&Client::lease_exchange};
[[maybe_unused]] constexpr Has<void (Client::*)(std::string_view)> release{&Client::release};

// ---- Client, added since
// attach's timeout (2d105cd)
[[maybe_unused]] constexpr Has<kup::Lease (Client::*)(
    std::string_view, std::optional<std::uint32_t>, std::optional<kup::ms>)>
    attach_timeout{&Client::attach};
// kup::ReceiveNames (2d105cd)
[[maybe_unused]] constexpr Has<void (Client::*)(std::string_view, std::string_view,
                                                const kup::ReceiveNames&)>
    lease_send_names{&Client::lease_send};
[[maybe_unused]] constexpr Has<void (Client::*)(std::string_view, const kup::ReceiveNames&)>
    lease_pass_names{&Client::lease_pass};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Client::*)(
    std::string_view, kup::Timeout, const kup::ReceiveNames&)>
    lease_receive_names{&Client::lease_receive};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Client::*)(
    std::string_view, std::string_view, kup::Timeout, const kup::ReceiveNames&)>
    lease_exchange_names{&Client::lease_exchange};

// ---- Session, as first released
[[maybe_unused]] constexpr Has<const kup::Lease& (Session::*)() const> session_lease{
    &Session::lease};
[[maybe_unused]] constexpr Has<std::uint32_t (Session::*)() const> session_channel{
    &Session::channel};
[[maybe_unused]] constexpr Has<const std::string& (Session::*)() const> session_device{
    &Session::device};
[[maybe_unused]] constexpr Has<std::uint64_t (Session::*)() const> session_max{
    &Session::max_message_bytes};
[[maybe_unused]] constexpr Has<void (Session::*)(std::string_view)> session_send{&Session::send};
[[maybe_unused]] constexpr Has<void (Session::*)()> session_pass{&Session::pass};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Session::*)(kup::Timeout)>
    session_receive{&Session::receive};
[[maybe_unused]] constexpr Has<std::optional<kup::Message> (Session::*)(std::string_view,
                                                                        kup::Timeout)>
    session_exchange{&Session::exchange};
[[maybe_unused]] constexpr Has<void (Session::*)()> session_close{&Session::close};

// ---- Watch, as first released
[[maybe_unused]] constexpr Has<std::optional<kup::WatchEvent> (Watch::*)()> watch_next{
    &Watch::next};
[[maybe_unused]] constexpr Has<void (Watch::*)()> watch_cancel{&Watch::cancel};

// ---- the calls the default arguments allow, as first released
void calls(Client& c) {
    c.list_devices();
    c.health();
    c.call("echo", "ping");
    c.open("echo");
    c.watch();
    c.watch("echo");
    kup::Lease l = c.attach("echo");
    c.attach("echo", 1);
    c.attach("echo", std::nullopt, kup::ms(2000));
    c.lease_receive(l.lease_id);
    c.lease_exchange(l.lease_id, "x");
}

}  // namespace

// Referenced, so that -Wunused-function has nothing to say.
void (*kup_api_compat_calls)(Client&) = calls;
