// SPDX-License-Identifier: BSD-2-Clause
//
// kupd's error taxonomy on the client side: gRPC status -> kup::Error
// subclass, in one place (kupclient/_errors.py is the reference).
#include <grpcpp/grpcpp.h>

#include <map>

#include "internal.hpp"

namespace kup {

Error::Error(const std::string& message, std::optional<StatusCode> grpc_code, bool from_kupd,
             std::optional<std::chrono::milliseconds> retry_after)
    : std::runtime_error(message), grpc_code_(grpc_code), from_kupd_(from_kupd),
      retry_after_(retry_after) {}

bool Error::is_connection_failure() const noexcept {
    return dynamic_cast<const Unavailable*>(this) != nullptr && !from_kupd_ &&
           grpc_code_.has_value();
}

namespace detail {
namespace {

using Make = std::exception_ptr (*)(const std::string&, std::optional<StatusCode>, bool,
                                    std::optional<ms>);

template <class E>
std::exception_ptr make(const std::string& m, std::optional<StatusCode> c, bool k,
                        std::optional<ms> r) {
    return std::make_exception_ptr(E(m, c, k, r));
}

// Every class by its name on the wire (kupd.errors.error_class).
const std::map<std::string, Make, std::less<>>& by_name() {
    static const std::map<std::string, Make, std::less<>> table = {
        {"KupError", make<Error>},
        {"Shutdown", make<Shutdown>},
        {"NotReady", make<NotReady>},
        {"NotYourTurn", make<NotYourTurn>},
        {"TooBig", make<TooBig>},
        {"DeadlineExceeded", make<DeadlineExceeded>},
        {"ProtocolError", make<ProtocolError>},
        {"VersionMismatch", make<VersionMismatch>},
        {"Busy", make<Busy>},
        {"Releasing", make<Releasing>},
        {"NotFound", make<NotFound>},
        {"PeerGone", make<PeerGone>},
        {"InvalidArgument", make<InvalidArgument>},
        {"SystemFailure", make<SystemFailure>},
        {"PermissionDenied", make<PermissionDenied>},
        {"ResourceExhausted", make<ResourceExhausted>},
        {"Unavailable", make<Unavailable>},
    };
    return table;
}

// A status without kup-error: the class its code stands for.
const char* kind_by_status(StatusCode code) {
    switch (code) {
    case StatusCode::NOT_FOUND: return "NotFound";
    case StatusCode::FAILED_PRECONDITION: return "NotYourTurn";
    case StatusCode::INVALID_ARGUMENT: return "InvalidArgument";
    case StatusCode::DEADLINE_EXCEEDED: return "DeadlineExceeded";
    case StatusCode::UNAVAILABLE: return "Unavailable";
    case StatusCode::PERMISSION_DENIED: return "PermissionDenied";
    case StatusCode::RESOURCE_EXHAUSTED: return "ResourceExhausted";
    case StatusCode::ABORTED: return "PeerGone";
    // gRPC's own "Method not found!": not served on this socket
    case StatusCode::UNIMPLEMENTED: return "NotFound";
    default: return "SystemFailure";
    }
}

const char* status_name(StatusCode code) {
    static const char* const names[] = {
        "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED"};
    int i = static_cast<int>(code);
    return i >= 0 && i <= 16 ? names[i] : "UNKNOWN";
}

bool contains(const std::string& s, const char* what) { return s.find(what) != std::string::npos; }

}  // namespace

std::exception_ptr error_of_kind(std::string_view kind, const std::string& message,
                                 std::optional<StatusCode> code, bool from_kupd,
                                 std::optional<ms> retry_after) {
    auto it = by_name().find(kind);
    if (it == by_name().end()) return nullptr;
    return it->second(message, code, from_kupd, retry_after);
}

std::optional<ms> retry_after_of(std::string_view value) {
    if (value.empty() || value.size() > 16) return std::nullopt;  // 2^53 - 1 has 16 digits
    std::uint64_t n = 0;
    for (char ch : value) {
        if (ch < '0' || ch > '9') return std::nullopt;
        n = n * 10 + static_cast<std::uint64_t>(ch - '0');
    }
    return retry_after_of(n);
}

std::optional<ms> retry_after_of(std::uint64_t value) {
    if (value == 0 || value > static_cast<std::uint64_t>(RETRY_AFTER_MAX_MS)) return std::nullopt;
    return ms(static_cast<std::int64_t>(value));
}

std::exception_ptr error_from_status(StatusCode code, std::string details, const std::string& kind_in,
                                     std::optional<ms> retry_after) {
    std::string kind = kind_in;
    const bool from_kupd = !kind.empty();
    if (details.empty()) details = status_name(code);
    if (!from_kupd) {
        if (code == StatusCode::UNAVAILABLE && contains(details, "EKU_SHUTDOWN")) {
            kind = "Shutdown";
        } else if (code == StatusCode::UNAVAILABLE && contains(details, "failed to connect") &&
                   (contains(details, "Connection reset by peer") ||
                    contains(details, "Broken pipe") || contains(details, "Socket closed"))) {
            // gRPC's connection cap (kupd's max_connections) closes one more that way
            details += " (the connection was closed as it was made: a kupd socket with "
                       "max_connections set closes connections beyond it -- other clients of it "
                       "must close theirs first)";
        } else if (code == StatusCode::UNAVAILABLE && details == "ping timeout") {
            // gRPC's bare words when either side dropped the connection for
            // a ping not answered in time (kupclient._errors.PING_TIMEOUT)
            details += " (the connection was closed because a keepalive ping went unanswered: "
                       "kupd drops a client that does not answer within its keepalive_timeout "
                       "while the connection is quiet -- a stopped process, or one too busy to "
                       "answer -- and this client drops a kupd that does not answer within " +
                       std::to_string(KEEPALIVE_TIMEOUT_MS / 1000) + " s)";
        } else if (code == StatusCode::DEADLINE_EXCEEDED && details == "Deadline Exceeded") {
            // gRPC's own deadline: kupd gets the timeout and answers it itself
            details = "kupd did not answer within the RPC's deadline (the operation's timeout "
                      "plus the client's grace, or the fixed deadline of a short RPC): Deadline "
                      "Exceeded";
        } else if (code == StatusCode::UNIMPLEMENTED) {
            details = "the server on this socket does not serve that method (" + details +
                      "): an Admin call needs kupd's admin_socket; otherwise the kupd is older "
                      "than this client";
        } else if (code == StatusCode::RESOURCE_EXHAUSTED && contains(details, "larger than max")) {
            // gRPC's receive limit, met before kupd saw the request
            kind = "TooBig";
            details = "the message is larger than this socket accepts (" + details +
                      "): the tenant's max_message_bytes (ListDevices, the lease) is the limit "
                      "to keep to";
        }
    }
    // only kupd's own answer says when to retry
    if (!from_kupd) retry_after.reset();
    std::exception_ptr e;
    if (!kind.empty()) e = error_of_kind(kind, details, code, from_kupd, retry_after);
    if (!e) e = error_of_kind(kind_by_status(code), details, code, from_kupd, retry_after);
    return e;
}

void throw_status(const grpc::Status& status, const grpc::ClientContext& ctx) {
    std::string kind;
    std::optional<ms> retry_after;
    const auto& trailing = ctx.GetServerTrailingMetadata();
    auto it = trailing.find("kup-error");
    if (it != trailing.end()) kind.assign(it->second.data(), it->second.size());
    auto ra = trailing.find("kup-retry-after-ms");
    if (ra != trailing.end()) retry_after = retry_after_of({ra->second.data(), ra->second.size()});
    std::rethrow_exception(error_from_status(static_cast<StatusCode>(status.error_code()),
                                             status.error_message(), kind, retry_after));
}

void throw_invalid(const std::string& message) {
    throw InvalidArgument(message, std::nullopt, false);
}

void throw_too_big(const std::string& message) { throw TooBig(message, std::nullopt, false); }

std::exception_ptr session_ended(const std::string& what, const std::exception_ptr& exc) {
    try {
        std::rethrow_exception(exc);
    } catch (const Error& e) {
        std::string msg = what + " is closed: the session already ended with " + e.kind() +
                          ": " + e.what();
        return error_of_kind(e.kind(), msg, e.grpc_code(), e.from_kupd(), e.retry_after());
    } catch (...) {
        return std::current_exception();
    }
}

}  // namespace detail
}  // namespace kup
