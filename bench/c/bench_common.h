/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * bench_common.h -- shared bits of the C ping-pong benchmarks.
 *
 * Every program takes the same options and prints the same output: one
 * round-trip time in nanoseconds per line, for the measured iterations
 * only (the warm-up is done and discarded first).  The Python harness
 * (bench/kupbench) computes the statistics.
 *
 *   -n N   measured round trips (default 2000)
 *   -w W   warm-up round trips, not printed (default 200)
 *   -s S   payload bytes (default 64)
 *   -S     serve only, where the program has a server side (uds_pingpong:
 *          print "ready", echo one connection until it closes, exit)
 *   -i MS  arrival mode, where the program has one (kup_floor): each
 *          sample is one message that arrives MS ms after the request,
 *          timed from the sender's hand-over to the receive returning
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct bench_opts {
	long n;
	long warmup;
	long size;
	const char *target; /* -d: device name / socket path, program-specific */
	int serve;          /* -S: serve only (programs that have a server side) */
	long idle_ms;       /* -i: arrival mode after this idle time, 0: off */
};

static inline uint64_t
bench_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline int
bench_parse_long(const char *what, const char *s, long lo, long hi, long *out)
{
	char *end = NULL;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0' || v < lo || v > hi) {
		fprintf(stderr, "bad %s %s: want an integer in [%ld, %ld]\n",
		    what, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

static inline int
bench_parse(int argc, char **argv, struct bench_opts *o)
{
	int c;

	o->n = 2000;
	o->warmup = 200;
	o->size = 64;
	o->target = NULL;
	o->serve = 0;
	o->idle_ms = 0;
	while ((c = getopt(argc, argv, "n:w:s:d:Si:")) != -1) {
		switch (c) {
		case 'n':
			if (bench_parse_long("-n (round trips)", optarg, 1,
			    100000000L, &o->n) != 0)
				return -1;
			break;
		case 'w':
			if (bench_parse_long("-w (warm-up round trips)", optarg,
			    0, 100000000L, &o->warmup) != 0)
				return -1;
			break;
		case 's':
			if (bench_parse_long("-s (payload bytes)", optarg, 1,
			    64L << 20, &o->size) != 0)
				return -1;
			break;
		case 'd':
			o->target = optarg;
			break;
		case 'S':
			o->serve = 1;
			break;
		case 'i':
			if (bench_parse_long("-i (idle ms)", optarg, 1, 10000L,
			    &o->idle_ms) != 0)
				return -1;
			break;
		default:
			fprintf(stderr, "usage: %s [-n rounds] [-w warmup] "
			    "[-s bytes] [-i idle_ms] -d target\n", argv[0]);
			return -1;
		}
	}
	if (o->target == NULL) {
		fprintf(stderr, "%s: -d target is required\n", argv[0]);
		return -1;
	}
	return 0;
}

/* Print the samples, one per line; 0 or -1 (stdout failed). */
static inline int
bench_print(const uint64_t *ns, long n)
{
	long i;

	for (i = 0; i < n; i++) {
		if (printf("%llu\n", (unsigned long long)ns[i]) < 0)
			return -1;
	}
	return fflush(stdout) == 0 ? 0 : -1;
}

#endif /* BENCH_COMMON_H */
