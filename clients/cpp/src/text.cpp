// SPDX-License-Identifier: BSD-2-Clause
//
// Text as the C++ client's messages show it: UTF-8 decoding, a value
// quoted as Python's repr() of a str quotes it (the Python client's
// messages say {value!r}, the Node client's quote() does the same), and a
// length in characters.
#include <cstdio>

#include "internal.hpp"

namespace kup::detail {
namespace {

// The code points Python's str.isprintable() calls not printable (Unicode
// categories Cc, Cf, Cs, Co, Zl, Zp, Zs other than ' '), as of Unicode 14
// (Python 3.11) and 17 (Node 20): the two differ only at U+13439..1343F, Cf
// in 17 and unassigned (so escaped as well) in 14.  Noncharacters, which
// are unassigned in every version, are escaped too (not_printable).  Other
// unassigned code points are shown as they are: which ones those are
// changes with each Unicode version (Python and Node disagree there).
struct Range {
    char32_t first, last;
};
constexpr Range NOT_PRINTABLE[] = {
    {0x0000, 0x001F},   {0x007F, 0x00A0},   {0x00AD, 0x00AD},   {0x0600, 0x0605},
    {0x061C, 0x061C},   {0x06DD, 0x06DD},   {0x070F, 0x070F},   {0x0890, 0x0891},
    {0x08E2, 0x08E2},   {0x1680, 0x1680},   {0x180E, 0x180E},   {0x2000, 0x200F},
    {0x2028, 0x202F},   {0x205F, 0x2064},   {0x2066, 0x206F},   {0x3000, 0x3000},
    {0xD800, 0xF8FF},   {0xFDD0, 0xFDEF},   {0xFEFF, 0xFEFF},   {0xFFF9, 0xFFFB},
    {0x110BD, 0x110BD}, {0x110CD, 0x110CD}, {0x13430, 0x1343F}, {0x1BCA0, 0x1BCA3},
    {0x1D173, 0x1D17A}, {0xE0001, 0xE0001}, {0xE0020, 0xE007F}, {0xF0000, 0x10FFFF},
};

bool not_printable(char32_t cp) {
    if ((cp & 0xFFFE) == 0xFFFE) return true;  // U+xFFFE, U+xFFFF: noncharacters
    for (const Range& r : NOT_PRINTABLE) {
        if (cp < r.first) return false;
        if (cp <= r.last) return true;
    }
    return false;
}

void append_hex(std::string& out, const char* prefix, unsigned long value, int digits) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%s%0*lx", prefix, digits, value);
    out += buf;
}

}  // namespace

Utf8Char utf8_at(std::string_view s, std::size_t i) {
    const std::size_t n = s.size();
    auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) return {c, 1};
    std::size_t len;
    char32_t cp;
    if ((c & 0xE0) == 0xC0) {
        len = 2;
        cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3;
        cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4;
        cp = c & 0x07;
    } else {
        return {0, 0};
    }
    if (n - i < len) return {0, 0};
    for (std::size_t k = 1; k < len; ++k) {
        auto d = static_cast<unsigned char>(s[i + k]);
        if ((d & 0xC0) != 0x80) return {0, 0};
        cp = (cp << 6) | (d & 0x3F);
    }
    // overlong forms, surrogates, beyond U+10FFFF
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        return {0, 0};
    return {cp, len};
}

bool valid_utf8(std::string_view s) {
    for (std::size_t i = 0; i < s.size();) {
        std::size_t len = utf8_at(s, i).len;
        if (len == 0) return false;
        i += len;
    }
    return true;
}

std::size_t characters(std::string_view s) {
    std::size_t count = 0;
    for (std::size_t i = 0; i < s.size(); ++count) {
        std::size_t len = utf8_at(s, i).len;
        i += len ? len : 1;
    }
    return count;
}

std::string quote(std::string_view s) {
    const bool single = s.find('\'') != std::string_view::npos;
    const char q = single && s.find('"') == std::string_view::npos ? '"' : '\'';
    std::string out(1, q);
    for (std::size_t i = 0; i < s.size();) {
        Utf8Char ch = utf8_at(s, i);
        if (ch.len == 0) {
            // a byte of no UTF-8 character: as Python shows it decoded with
            // surrogateescape (sys.argv, os.fsdecode), U+DC80..U+DCFF
            append_hex(out, "\\udc", static_cast<unsigned char>(s[i]), 2);
            ++i;
            continue;
        }
        const char32_t cp = ch.cp;
        if (cp == '\\')
            out += "\\\\";
        else if (cp == '\t')
            out += "\\t";
        else if (cp == '\n')
            out += "\\n";
        else if (cp == '\r')
            out += "\\r";
        else if (cp == static_cast<char32_t>(q))
            out += {'\\', q};
        else if (!not_printable(cp))
            out.append(s.substr(i, ch.len));
        else if (cp < 0x100)
            append_hex(out, "\\x", cp, 2);
        else if (cp < 0x10000)
            append_hex(out, "\\u", cp, 4);
        else
            append_hex(out, "\\U", cp, 8);
        i += ch.len;
    }
    out += q;
    return out;
}

}  // namespace kup::detail
