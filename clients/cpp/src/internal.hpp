// SPDX-License-Identifier: BSD-2-Clause
//
// Internals of the C++ client shared by its sources (not installed).
#pragma once

#include <cstdint>
#include <exception>
#include <optional>
#include <string>
#include <string_view>

#include "kupclient.hpp"

namespace grpc {
class ClientContext;
class Status;
}  // namespace grpc

namespace kup::detail {

// kupclient._types: keepalive settings (why: see there).  The timeout is
// also named by the error of a connection dropped for an unanswered ping.
constexpr int KEEPALIVE_TIME_MS = 30000;
constexpr int KEEPALIVE_TIMEOUT_MS = 10000;

// The largest kup-retry-after-ms kupd sends (kupapi.errors.RETRY_AFTER_MAX_MS).
constexpr std::int64_t RETRY_AFTER_MAX_MS = (std::int64_t{1} << 53) - 1;

// THE mapping of a status to kupd's taxonomy (as kupclient/_errors.py's
// error_from_status): `kind` is the kup-error trailing metadata (or an
// in-band Error's kind), "" when the status did not carry it (gRPC's own
// failure), which is then mapped by code; `retry_after` the
// kup-retry-after-ms metadata (retry_after_of), kept for kupd's answers only.
std::exception_ptr error_from_status(StatusCode code, std::string details, const std::string& kind,
                                     std::optional<ms> retry_after = std::nullopt);
// A kup-retry-after-ms value ("340") as milliseconds (> 0, at most
// RETRY_AFTER_MAX_MS); std::nullopt for anything else (ignored, as
// kupclient._errors.retry_after_ms does).
std::optional<ms> retry_after_of(std::string_view value);
// The same for a Session's in-band Error.retry_after_ms (the number kupd
// would have sent as kup-retry-after-ms).
std::optional<ms> retry_after_of(std::uint64_t value);
// A status of an RPC on `ctx`: its trailing metadata names the class.
[[noreturn]] void throw_status(const grpc::Status& status, const grpc::ClientContext& ctx);
// The error of class `kind` (kupd's class name); std::nullopt for a name
// the client does not know.
std::exception_ptr error_of_kind(std::string_view kind, const std::string& message,
                                 std::optional<StatusCode> code, bool from_kupd,
                                 std::optional<ms> retry_after = std::nullopt);
// The client's own errors (no status: grpc_code std::nullopt).
[[noreturn]] void throw_invalid(const std::string& message);
[[noreturn]] void throw_too_big(const std::string& message);

// ---- text (text.cpp)
// The code point of the UTF-8 character at s[i] and its length in bytes;
// len 0 when no character starts there (a byte that starts none, one cut
// short, an overlong form, a surrogate, past U+10FFFF).
struct Utf8Char {
    char32_t cp;
    std::size_t len;
};
Utf8Char utf8_at(std::string_view s, std::size_t i);
bool valid_utf8(std::string_view s);
// How many characters `s` has: code points, and one for each byte that is
// no UTF-8 character (as Python's len() of it decoded with surrogateescape).
std::size_t characters(std::string_view s);
// `s` quoted for an error message as Python's repr() of a str (and the
// Node client's quote()): in single quotes, double ones when it has a '
// and no "; \\, \t, \n, \r, the quote, and what is not printable
// escaped (\xNN, \uNNNN, \UNNNNNNNN).  A byte of no UTF-8 character is
// \udcNN, as Python shows it decoded with surrogateescape (sys.argv,
// os.fsdecode).  docs/gateway.md, "C++ client", says where it differs.
std::string quote(std::string_view s);

// `exc` again, its class and code, with message "`what` is closed: the
// session already ended with CLASS: MESSAGE" (Python's session_ended).
std::exception_ptr session_ended(const std::string& what, const std::exception_ptr& exc);

}  // namespace kup::detail
