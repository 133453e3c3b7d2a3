// SPDX-License-Identifier: BSD-2-Clause
//
// kup_example -- a conversation with kupd from C++:
//
//   kup_example /run/kupd/kupd.sock [DEVICE]
//
// Lists the devices, makes a Call, then opens a Session on a channel of
// DEVICE (default echo) and exchanges a few messages.
#include <cstdio>
#include <exception>
#include <string>

#include "kupclient.hpp"

// "1 channel", "2 channels": a count and its noun, as kupctl prints them.
static std::string count(unsigned long long n, const char* noun) {
    return std::to_string(n) + " " + noun + (n == 1 ? "" : "s");
}

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s KUPD_SOCKET [DEVICE]\n", argv[0]);
        return 2;
    }
    const char* device = argc > 2 ? argv[2] : "echo";
    try {
        kup::Client client(argv[1]);
        for (const kup::DeviceInfo& d : client.list_devices())
            std::printf("device %s: %s, %s per message%s\n", d.name.c_str(),
                        count(d.channel_count, "channel").c_str(),
                        count(d.max_message_bytes, "byte").c_str(),
                        d.reachable ? "" : " (not reachable)");
        kup::CallReply r = client.call(device, "ping", kup::ms(5000));
        std::printf("call: %s (pool channel %u)\n", r.data.c_str(), r.channel);

        kup::Session s = client.open(device);
        std::printf("session on channel %u\n", s.channel());
        s.receive(kup::ms(10000));  // the kernel's opening hand-over (a PASS)
        for (const char* text : {"hello", "from", "c++"}) {
            auto m = s.exchange(text, kup::ms(5000));
            std::printf("%s -> %s (seq %llu)\n", text, m->data.c_str(),
                        static_cast<unsigned long long>(m->seq));
        }
        // the Session's destructor ends it: kupd lets go of the channel
    } catch (const kup::Error& e) {
        std::fprintf(stderr, "kup_example: %s: %s\n", e.kind(), e.what());
        return 1;
    }
    return 0;
}
