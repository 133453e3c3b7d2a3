/* SPDX-License-Identifier: BSD-2-Clause */
/* testutil.h -- tiny check macros for the C tests (fail loudly, exit 1). */
#ifndef TESTUTIL_H
#define TESTUTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define CHECK(c) do {                                                       \
	if (!(c)) {                                                         \
		fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__,      \
		    __LINE__, #c);                                          \
		exit(1);                                                    \
	}                                                                   \
} while (0)

#define CHECK_EQ(a, b) do {                                                 \
	long long _a = (long long)(a), _b = (long long)(b);                 \
	if (_a != _b) {                                                     \
		fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %lld, "      \
		    "expected %s == %lld\n", __FILE__, __LINE__, #a, _a,    \
		    #b, _b);                                                \
		exit(1);                                                    \
	}                                                                   \
} while (0)

static inline long long
mono_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

#endif
