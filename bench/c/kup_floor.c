/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_floor -- the floor: libkup <-> kupsim echo ping-pong over the
 * shared-page ABI, no Python, no gRPC.  -d names the device (the kupsim
 * run directory comes from $KUPSIM_DIR, as for every libkup program).
 *
 * Each round trip: kernproxy_send(payload) then kernproxy_receive_msg()
 * of the echo, checked byte for byte.  Output: one round-trip time in ns
 * per line (bench_common.h).
 *
 * -i MS, arrival mode: each sample sends echo's "!stamp<MS>" (answered MS
 * ms later, its last 8 bytes the module's CLOCK_MONOTONIC at the
 * hand-over) and prints the time from that stamp to the blocking receive
 * returning: a message arriving on a channel idle for MS ms.  No warm-up.
 */
#include "bench_common.h"
#include "kup.h"

#define FLOOR_TIMEOUT_MS 10000

static void
kup_fail(const char *what, long i)
{
	fprintf(stderr, "kup_floor: %s failed at round %ld: %s\n", what, i,
	    kernproxy_strerror(kernproxy_errno));
}

int
main(int argc, char **argv)
{
	struct bench_opts o;
	struct kernproxy_msg m;
	void *dev = NULL, *ch = NULL;
	char *out = NULL;
	uint64_t *ns = NULL;
	int rc = 1;
	long i;

	if (bench_parse(argc, argv, &o) != 0)
		return 2;
	out = malloc((size_t)o.size);
	ns = calloc((size_t)o.n, sizeof(*ns));
	if (out == NULL || ns == NULL) {
		fprintf(stderr, "kup_floor: out of memory\n");
		goto out_mem;
	}
	for (i = 0; i < o.size; i++)
		out[i] = (char)(i % 96); /* no a-z: odd echo channels upper-case them */

	dev = kernproxy_open(o.target);
	if (dev == NULL) {
		fprintf(stderr, "kup_floor: open %s: %s\n", o.target,
		    kernproxy_strerror(kernproxy_errno));
		goto out_mem;
	}
	ch = kernproxy_channel(dev, KP_CHAN_ANY, 0);
	if (ch == NULL) {
		fprintf(stderr, "kup_floor: channel on %s: %s\n", o.target,
		    kernproxy_strerror(kernproxy_errno));
		goto out_dev;
	}
	if ((size_t)o.size > kernproxy_max_msg(ch)) {
		fprintf(stderr, "kup_floor: -s %ld exceeds the channel's %zu bytes\n",
		    o.size, kernproxy_max_msg(ch));
		goto out_ch;
	}
	/* A fresh channel belongs to the kernel: wait for it to hand over. */
	if (kernproxy_my_turn(ch) != 1 &&
	    kernproxy_receive_msg(ch, &m, FLOOR_TIMEOUT_MS) != 0) {
		kup_fail("initial receive", -1);
		goto out_ch;
	}
	if (o.idle_ms != 0) {
		if (o.size < 16) {
			fprintf(stderr, "kup_floor: -i needs -s 16 or more\n");
			goto out_ch;
		}
		memset(out, '.', (size_t)o.size);
		snprintf(out, (size_t)o.size, "!stamp%ld", o.idle_ms);
		out[strlen(out)] = '.';   /* no NUL inside the request */
		for (i = 0; i < o.n; i++) {
			uint64_t stamp, now;

			if (kernproxy_send(ch, out, (size_t)o.size, 0) != 0) {
				kup_fail("send", i);
				goto out_ch;
			}
			if (kernproxy_receive_msg(ch, &m, (int)o.idle_ms +
			    FLOOR_TIMEOUT_MS) != 0) {
				kup_fail("receive", i);
				goto out_ch;
			}
			now = bench_now_ns();
			if (m.kind != KUP_KIND_DATA || m.len != (size_t)o.size) {
				fprintf(stderr, "kup_floor: bad stamped reply at "
				    "round %ld (kind %u, len %zu)\n", i, m.kind, m.len);
				goto out_ch;
			}
			memcpy(&stamp, (const char *)m.data + m.len - 8, 8);
			if (stamp > now) {
				fprintf(stderr, "kup_floor: stamp from the future at "
				    "round %ld\n", i);
				goto out_ch;
			}
			ns[i] = now - stamp;
		}
		rc = 0;
		goto out_ch;
	}
	for (i = -o.warmup; i < o.n; i++) {
		uint64_t t0 = bench_now_ns();

		if (kernproxy_send(ch, out, (size_t)o.size, 0) != 0) {
			kup_fail("send", i);
			goto out_ch;
		}
		if (kernproxy_receive_msg(ch, &m, FLOOR_TIMEOUT_MS) != 0) {
			kup_fail("receive", i);
			goto out_ch;
		}
		if (i >= 0)
			ns[i] = bench_now_ns() - t0;
		if (m.kind != KUP_KIND_DATA || m.len != (size_t)o.size ||
		    memcmp(m.data, out, (size_t)o.size) != 0) {
			fprintf(stderr, "kup_floor: bad echo at round %ld "
			    "(kind %u, len %zu)\n", i, m.kind, m.len);
			goto out_ch;
		}
	}
	rc = 0;
out_ch:
	kernproxy_close(ch);
out_dev:
	kernproxy_close(dev);
out_mem:
	if (rc == 0 && bench_print(ns, o.n) != 0)
		rc = 1;
	free(ns);
	free(out);
	return rc;
}
