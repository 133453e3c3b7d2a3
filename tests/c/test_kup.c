/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * test_kup.c -- libkup scenarios against a running kupsim (KUPSIM_DIR set
 * by the pytest driver tests/kmod/test_c_kup.py, which also starts kupsim
 * with echo.so, rot13.so and hostile.so).
 *
 *   test_kup <scenario> [args]
 *
 * Every scenario exits 0 on success and prints "FAIL ..." / a CHECK line
 * and exits 1 otherwise.  Scenarios that need the driver's help (kill a
 * process, SIGTERM kupsim, read kupsim's log) print marker lines on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#if defined(__linux__)
#include <stddef.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include "kup_ioctl.h"
#endif

#include "kup.h"
#include "kup_backend.h"
#include "testutil.h"

static void *
open_dev(const char *name)
{
	void *d = kernproxy_open(name);

	if (d == NULL) {
		fprintf(stderr, "kernproxy_open(%s): %s\n", name,
		    kernproxy_strerror(kernproxy_errno));
		exit(1);
	}
	return d;
}

/*
 * Attach channel id (or KP_CHAN_ANY).  EKU_RELEASING and EKU_BUSY are
 * retried, bounded (30 s): right after a user of the channel left, the host
 * may still be renewing it -- kupsim waits only 0.5 s for the module's
 * worker to let go of it before it answers "releasing, retry later", and a
 * worker not scheduled for that long on a loaded machine is not a bug; and
 * the host may not have seen the last user's hang-up yet (busy).  Any
 * other error, or a channel still held after the bound, fails the
 * scenario.
 */
static void *
attach(void *d, size_t id)
{
	void *c;
	int i;

	for (i = 0;; i++) {
		c = kernproxy_channel(d, id, 0);
		if (c != NULL)
			return c;
		if ((kernproxy_errno != EKU_BUSY &&
		    kernproxy_errno != EKU_RELEASING) || i >= 3000)
			break;
		usleep(10000);
	}
	fprintf(stderr, "kernproxy_channel(%zu): %s\n", id,
	    kernproxy_strerror(kernproxy_errno));
	exit(1);
}

/* The first message on a fresh echo channel is the kernel's PASS. */
static void
expect_pass(void *c)
{
	struct kernproxy_msg m;

	if (kernproxy_receive_msg(c, &m, 10000) != 0) {
		fprintf(stderr, "receive PASS: %s\n",
		    kernproxy_strerror(kernproxy_errno));
		exit(1);
	}
	CHECK_EQ(m.kind, KUP_KIND_PASS);
	CHECK_EQ(m.len, 0);
}

static char
upper(char ch)
{
	return (ch >= 'a' && ch <= 'z') ? (char)(ch - 'a' + 'A') : ch;
}

static char
rot13(char ch)
{
	if (ch >= 'a' && ch <= 'z')
		return (char)('a' + (ch - 'a' + 13) % 26);
	if (ch >= 'A' && ch <= 'Z')
		return (char)('A' + (ch - 'A' + 13) % 26);
	return ch;
}

/* send buf, receive the reply, compare with the expected transform */
static void
round_trip(void *c, const char *buf, size_t len, char (*xf)(char))
{
	struct kernproxy_msg m;
	size_t i;

	if (kernproxy_send(c, buf, len, 0) != 0) {
		fprintf(stderr, "send: %s\n", kernproxy_strerror(kernproxy_errno));
		exit(1);
	}
	if (kernproxy_receive_msg(c, &m, 10000) != 0) {
		fprintf(stderr, "receive: %s\n",
		    kernproxy_strerror(kernproxy_errno));
		exit(1);
	}
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, len);
	for (i = 0; i < len; i++) {
		char want = xf != NULL ? xf(buf[i]) : buf[i];
		if (((const char *)m.data)[i] != want) {
			fprintf(stderr, "byte %zu: got 0x%02x want 0x%02x\n", i,
			    ((const unsigned char *)m.data)[i], (unsigned char)want);
			exit(1);
		}
	}
}

static void
fill(char *buf, size_t len, unsigned seed)
{
	size_t i;

	for (i = 0; i < len; i++)
		buf[i] = (char)('a' + (seed + i * 7) % 26);
}

/* ---- scenarios ------------------------------------------------------- */

static int
sc_blocking(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 0);
	struct kernproxy_msg m;
	uint64_t seq_prev;
	char buf[4096];
	int i;

	CHECK_EQ(kernproxy_chan_id(c), 0);
	CHECK_EQ(kernproxy_max_msg(c), 4096);
	/* a second attach of the same channel is refused */
	CHECK(kernproxy_channel(d, 0, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_BUSY);
	/* wrong size is refused */
	CHECK(kernproxy_channel(d, 1, 3) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_INVAL);
	/* no such channel */
	CHECK(kernproxy_channel(d, 500, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_NOENT);

	expect_pass(c);
	CHECK_EQ(kernproxy_my_turn(c), 1);
	/* holding the turn with the message consumed: receive would wait
	 * forever */
	CHECK_EQ(kernproxy_receive_msg(c, &m, -1), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	seq_prev = 1;
	for (i = 0; i < 200; i++) {
		size_t len = (size_t)(i * 37) % sizeof(buf) + 1;

		fill(buf, len, (unsigned)i);
		CHECK_EQ(kernproxy_send(c, buf, len, 0), 0);
		CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
		CHECK_EQ(m.kind, KUP_KIND_DATA);
		CHECK_EQ(m.len, len);
		CHECK(memcmp(m.data, buf, len) == 0);
		CHECK_EQ(m.seq, seq_prev + 1);
		seq_prev = m.seq;
	}
	/* PASS is answered with PASS; seed-style receive returns the area */
	CHECK_EQ(kernproxy_pass(c), 0);
	CHECK(kernproxy_receive(c, 0) != NULL);
	CHECK_EQ(kernproxy_my_turn(c), 1);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK blocking\n");
	return 0;
}

static int
sc_nonblocking(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 2);
	struct kernproxy_msg m;
	struct pollfd pf;
	int i, fd;

	/* wait (bounded) until the kernel's PASS is there, unread */
	for (i = 0; i < 10000 && kernproxy_my_turn(c) != 1; i++)
		usleep(1000);
	CHECK_EQ(kernproxy_my_turn(c), 1);
	/* poll mode started after the hand-over: the fd is readable anyway */
	fd = kernproxy_fd(c);
	CHECK(fd >= 0);
	pf.fd = fd;
	pf.events = POLLIN;
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK(kernproxy_receive(c, KP_NB) != NULL);
	/* the kernel keeps the turn for 300 ms after "!delay" */
	CHECK_EQ(kernproxy_send(c, "!delay ab", 9, 0), 0);
	CHECK(kernproxy_receive(c, KP_NB) == NULL);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	CHECK_EQ(kernproxy_error(c), EKU_NOTREADY);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	/* sending while the kernel holds the turn: refused, never waits */
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	CHECK_EQ(kernproxy_pass(c), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	CHECK_EQ(kernproxy_my_turn(c), 0);
	/* asynchronous mode: the fd polls readable when the turn is back
	 * (and not before: the kernel holds the turn for 300 ms) */
	CHECK_EQ(kernproxy_fd(c), fd);
	CHECK_EQ(poll(&pf, 1, 0), 0);
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), 0);
	CHECK_EQ(m.len, 9);
	CHECK(memcmp(m.data, "!delay ab", 9) == 0);
	/* once more through the fd, with a short timeout receive too */
	CHECK_EQ(kernproxy_send(c, "!delay", 6, 0), 0);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 20), -1);
	CHECK_EQ(kernproxy_errno, EKU_TIMEDOUT);
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), 0);
	CHECK_EQ(m.len, 6);
	/* holding the turn, message taken: the fd is quiet, and a late
	 * wake-up is consumed by the (NOTTURN) receive it provokes */
	CHECK_EQ(poll(&pf, 1, 0), 0);
	{
		uint64_t one = 1;
		CHECK_EQ(write(fd, &one, sizeof(one)), (ssize_t)sizeof(one));
	}
	CHECK_EQ(poll(&pf, 1, 0), 1);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	CHECK_EQ(poll(&pf, 1, 0), 0);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK nonblocking\n");
	return 0;
}

/* kernproxy_receive_spin: never sleeps; NOTREADY (the reply owed to a later
 * receive) when the kernel is slow, the reply when it is fast; the same
 * refusals as kernproxy_receive_msg; works in poll mode. */
static int
sc_spin(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 4);
	struct kernproxy_msg m;
	struct pollfd pf;
	char buf[64];
	int i, caught = 0, fd;

	expect_pass(c);
	/* holding the turn, message taken: nothing to wait for */
	CHECK_EQ(kernproxy_receive_spin(c, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	CHECK_EQ(kernproxy_receive_spin(c, NULL), -1);
	CHECK_EQ(kernproxy_errno, EKU_INVAL);
	CHECK_EQ(kernproxy_receive_spin(NULL, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_INVAL);
	/* the kernel keeps the turn 300 ms: the spin gives up, repeatedly */
	CHECK_EQ(kernproxy_send(c, "!delay", 6, 0), 0);
	CHECK_EQ(kernproxy_receive_spin(c, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	CHECK_EQ(kernproxy_receive_spin(c, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
	CHECK_EQ(m.len, 6);
	CHECK(memcmp(m.data, "!delay", 6) == 0);
	/* fast replies: taken by the spin or, when it missed, by a receive */
	for (i = 0; i < 2000; i++) {
		fill(buf, sizeof(buf), (unsigned)i);
		CHECK_EQ(kernproxy_send(c, buf, sizeof(buf), 0), 0);
		if (kernproxy_receive_spin(c, &m) == 0) {
			caught++;
		} else {
			CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
			CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
		}
		CHECK_EQ(m.kind, KUP_KIND_DATA);
		CHECK_EQ(m.len, sizeof(buf));
		CHECK(memcmp(m.data, buf, sizeof(buf)) == 0);
	}
	printf("spin caught %d of 2000\n", caught);
	/* poll mode: a miss leaves the fd to say when the reply is there */
	fd = kernproxy_fd(c);
	CHECK(fd >= 0);
	pf.fd = fd;
	pf.events = POLLIN;
	CHECK_EQ(kernproxy_send(c, "!delay", 6, 0), 0);
	CHECK_EQ(kernproxy_receive_spin(c, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK_EQ(kernproxy_receive_spin(c, &m), 0);
	CHECK_EQ(m.len, 6);
	CHECK_EQ(kernproxy_send(c, "y", 1, 0), 0);
	for (i = 0; i < 10000 && kernproxy_receive_spin(c, &m) != 0; i++) {
		CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
		CHECK(poll(&pf, 1, 1000) >= 0);
	}
	CHECK_EQ(m.len, 1);
	/* KP_SPIN_NEXT (poll mode): no wake-up asked while the spin looks;
	 * every miss must still make the fd readable */
	CHECK_EQ(kernproxy_send(c, "!delay", 6, KP_SPIN_NEXT), 0);
	CHECK_EQ(kernproxy_receive_spin(c, &m), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK_EQ(kernproxy_receive_spin(c, &m), 0);
	CHECK_EQ(m.len, 6);
	caught = 0;
	for (i = 0; i < 2000; i++) {
		fill(buf, sizeof(buf), (unsigned)i);
		CHECK_EQ(kernproxy_send(c, buf, sizeof(buf), KP_SPIN_NEXT), 0);
		if (kernproxy_receive_spin(c, &m) == 0) {
			caught++;
		} else {
			CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
			CHECK_EQ(poll(&pf, 1, 10000), 1);   /* not lost */
			CHECK_EQ(kernproxy_receive_msg(c, &m, 0), 0);
		}
		CHECK_EQ(m.len, sizeof(buf));
		CHECK(memcmp(m.data, buf, sizeof(buf)) == 0);
	}
	printf("spin (KP_SPIN_NEXT) caught %d of 2000\n", caught);
	/* a blocking receive after a KP_SPIN_NEXT send asks for the wake-up */
	CHECK_EQ(kernproxy_send(c, "!delay", 6, KP_SPIN_NEXT), 0);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
	CHECK_EQ(m.len, 6);
	/* a plain send after a quiet hit asks for it again too */
	CHECK_EQ(kernproxy_send(c, "!delay", 6, 0), 0);
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), 0);
	CHECK_EQ(m.len, 6);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK spin\n");
	return 0;
}

static int
sc_transforms(void)
{
	void *d = open_dev("echo");
	void *c0 = attach(d, 10), *c1 = attach(d, 11);
	const char *s = "Hello, World! abc xyz 123";

	expect_pass(c0);
	expect_pass(c1);
	round_trip(c0, s, strlen(s), NULL);    /* even: echo */
	round_trip(c1, s, strlen(s), upper);   /* odd: upper-case */
	round_trip(c0, s, strlen(s), NULL);
	round_trip(c1, s, strlen(s), upper);
	kernproxy_close(c0);
	kernproxy_close(c1);
	kernproxy_close(d);
	printf("OK transforms\n");
	return 0;
}

static int
sc_many(void)
{
	void *d = open_dev("echo");
	void *c[128];
	struct kernproxy_info *info = calloc(1, sizeof(*info));
	int seen[128] = { 0 };
	char buf[64];
	int i, round;

	CHECK(info != NULL);
	CHECK_EQ(kernproxy_info(d, info), 0);
	CHECK_EQ(info->chan_count, 128);
	CHECK_EQ(info->announced, 128);
	for (i = 0; i < 128; i++) {
		c[i] = kernproxy_channel(d, KP_CHAN_ANY, 0);
		if (c[i] == NULL) {
			fprintf(stderr, "attach #%d: %s\n", i,
			    kernproxy_strerror(kernproxy_error(d)));
			return 1;
		}
		CHECK(kernproxy_chan_id(c[i]) < 128);
		CHECK(!seen[kernproxy_chan_id(c[i])]);
		seen[kernproxy_chan_id(c[i])] = 1;
	}
	CHECK(kernproxy_channel(d, KP_CHAN_ANY, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_BUSY);
	CHECK_EQ(kernproxy_info(d, info), 0);
	for (i = 0; i < 128; i++)   /* echo's workers may be in a receive */
		CHECK(info->attached[i] & KUP_INFO_ATTACHED);
	for (i = 0; i < 128; i++)
		expect_pass(c[i]);
	for (round = 0; round < 3; round++) {
		for (i = 0; i < 128; i++) {
			uint32_t id = kernproxy_chan_id(c[i]);
			int n = snprintf(buf, sizeof(buf), "chan %u round %d", id,
			    round);
			round_trip(c[i], buf, (size_t)n, (id & 1) ? upper : NULL);
		}
	}
	for (i = 0; i < 128; i++)
		kernproxy_close(c[i]);
	free(info);
	kernproxy_close(d);
	printf("OK many\n");
	return 0;
}

struct thr_arg {
	void *c;
	int odd;
	int iters;
	int ok;
};

static void *
thr_main(void *p)
{
	struct thr_arg *a = p;
	char buf[512];
	int i;

	expect_pass(a->c);
	for (i = 0; i < a->iters; i++) {
		size_t len = (size_t)(i % (int)sizeof(buf)) + 1;
		fill(buf, len, (unsigned)i + (unsigned)a->odd);
		round_trip(a->c, buf, len, a->odd ? upper : NULL);
	}
	a->ok = 1;
	return NULL;
}

static int
sc_threads(void)
{
	void *d = open_dev("echo");
	struct thr_arg a = { attach(d, 20), 0, 3000, 0 };
	struct thr_arg b = { attach(d, 21), 1, 3000, 0 };
	pthread_t ta, tb;

	CHECK_EQ(pthread_create(&ta, NULL, thr_main, &a), 0);
	CHECK_EQ(pthread_create(&tb, NULL, thr_main, &b), 0);
	pthread_join(ta, NULL);
	pthread_join(tb, NULL);
	CHECK(a.ok && b.ok);
	kernproxy_close(a.c);
	kernproxy_close(b.c);
	kernproxy_close(d);
	printf("OK threads\n");
	return 0;
}

static int
sc_twodev(void)
{
	void *e = open_dev("echo"), *r = open_dev("rot13");
	void *ce = attach(e, 30), *cr = attach(r, 30);
	struct kernproxy_info info;
	const char *s = "Why did the chicken cross the road?";
	int i;

	CHECK_EQ(kernproxy_info(r, &info), 0);
	CHECK(strcmp(info.name, "rot13") == 0);
	CHECK_EQ(kernproxy_info(e, &info), 0);
	CHECK(strcmp(info.name, "echo") == 0);
	CHECK(info.attached[30] & KUP_INFO_ATTACHED);
	expect_pass(ce);
	expect_pass(cr);
	for (i = 0; i < 50; i++) {
		round_trip(ce, s, strlen(s), NULL);
		round_trip(cr, s, strlen(s), rot13);
	}
	kernproxy_close(ce);
	kernproxy_close(cr);
	kernproxy_close(e);
	kernproxy_close(r);
	CHECK(kernproxy_open("nosuchdev") == NULL);
	CHECK_EQ(kernproxy_errno, EKU_NOENT);
	/* a name with a '/' is the socket path itself */
	{
		char path[512];
		const char *dir = getenv("KUPSIM_DIR");
		void *p, *pc;

		CHECK(dir != NULL);
		snprintf(path, sizeof(path), "%s/rot13.sock", dir);
		p = open_dev(path);
		pc = attach(p, 31);
		expect_pass(pc);
		round_trip(pc, s, strlen(s), rot13);
		kernproxy_close(pc);
		kernproxy_close(p);
		snprintf(path, sizeof(path), "%s/nosuch.sock", dir);
		CHECK(kernproxy_open(path) == NULL);
		CHECK_EQ(kernproxy_errno, EKU_NOENT);
	}
	printf("OK twodev\n");
	return 0;
}

static int
sc_sizes(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 40);
	size_t max = kernproxy_max_msg(c);
	char *buf = malloc(max + 1);
	struct kernproxy_msg m;

	CHECK(buf != NULL);
	expect_pass(c);
	fill(buf, max + 1, 3);
	/* one byte over: refused, nothing sent, still our turn */
	CHECK_EQ(kernproxy_send(c, buf, max + 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_TOOBIG);
	CHECK_EQ(kernproxy_error(c), EKU_TOOBIG);
	CHECK_EQ(kernproxy_my_turn(c), 1);
	/* exactly the data area */
	round_trip(c, buf, max, NULL);
	/* empty message: a DATA message of length 0 comes back */
	CHECK_EQ(kernproxy_send(c, buf, 0, 0), 0);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, 0);
	round_trip(c, "x", 1, NULL);
	free(buf);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK sizes\n");
	return 0;
}

static int
sc_version(void)
{
	void *d = open_dev("echo");
	void *c;

	setenv("KUP_TEST_ABI_VERSION", "2", 1);
	CHECK(kernproxy_channel(d, 50, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_VERSION);
	CHECK_EQ(kernproxy_errno, EKU_VERSION);
	setenv("KUP_TEST_ABI_VERSION", "0", 1);
	CHECK(kernproxy_channel(d, 50, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_VERSION);
	unsetenv("KUP_TEST_ABI_VERSION");
	/* refused before anything moved: the channel is still free */
	c = attach(d, 50);
	expect_pass(c);
	round_trip(c, "ok", 2, NULL);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK version\n");
	return 0;
}

/* Attach, take the PASS, announce and block until killed. */
static int
sc_hold(const char *id)
{
	void *d = open_dev("echo");
	void *c = attach(d, (size_t)atoi(id));

	expect_pass(c);
	printf("ATTACHED %s\n", id);
	fflush(stdout);
	for (;;)
		pause();
	return 1;
}

/* After the holder was SIGKILLed: the channel is attachable again. */
static int
sc_reattach(const char *id)
{
	void *d = open_dev("echo");
	void *c = NULL;
	int i;

	/* the host detaches asynchronously: allow a bounded wait */
	for (i = 0; i < 1000 && c == NULL; i++) {
		c = kernproxy_channel(d, (size_t)atoi(id), 0);
		if (c == NULL) {
			/* not seen gone yet, or its module not yet let go */
			CHECK(kernproxy_error(d) == EKU_BUSY ||
			    kernproxy_error(d) == EKU_RELEASING);
			usleep(10000);
		}
	}
	CHECK(c != NULL);
	expect_pass(c);
	round_trip(c, "again", 5, (atoi(id) & 1) ? upper : NULL);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK reattach\n");
	return 0;
}

/* Scribble on the control page like a hostile user and hand the turn to
 * the kernel; the kernel side must refuse (-EPROTO, logged by echo and the
 * core) and mark the channel PEER_GONE. */
static int
sc_hostile_user(const char *variant, const char *id)
{
	void *d = open_dev("echo");
	void *c = attach(d, (size_t)atoi(id));
	size_t bytes;
	struct kup_ctrl *k;
	uint32_t st = 0;
	int i;

	expect_pass(c);
	k = kup_test_raw_mapping(c, &bytes);
	CHECK(k != NULL && bytes >= 3 * 4096);
	if (strcmp(variant, "seqrep") == 0) {
		/* one good message first, then repeat its sequence number */
		round_trip(c, "good", 4, NULL);
		k->u2k.len = 4;
		k->u2k.kind = KUP_KIND_DATA;
		k->u2k.seq = 1;
	} else if (strcmp(variant, "seqgap") == 0) {
		k->u2k.len = 4;
		k->u2k.kind = KUP_KIND_DATA;
		k->u2k.seq = 3;
	} else if (strcmp(variant, "badlen") == 0) {
		k->u2k.len = 0xfffffff0U;
		k->u2k.kind = KUP_KIND_DATA;
		k->u2k.seq = 1;
	} else if (strcmp(variant, "badlen1") == 0) {
		k->u2k.len = 4097;   /* one byte over the data area */
		k->u2k.kind = KUP_KIND_DATA;
		k->u2k.seq = 1;
	} else if (strcmp(variant, "badkind") == 0) {
		k->u2k.len = 0;
		k->u2k.kind = 99;
		k->u2k.seq = 1;
	} else if (strcmp(variant, "badturn") == 0) {
		k->u2k.len = 1;
		k->u2k.kind = KUP_KIND_DATA;
		k->u2k.seq = 1;
		__atomic_store_n(&k->turn, 0x41414141U, __ATOMIC_RELEASE);
		goto wake;
	} else {
		fprintf(stderr, "unknown variant %s\n", variant);
		return 2;
	}
	__atomic_store_n(&k->turn, KUP_TURN_KERNEL, __ATOMIC_RELEASE);
wake:
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	CHECK_EQ(kup_test_raw_wake(c), 0);
	for (i = 0; i < 1000; i++) {
		st = __atomic_load_n(&k->state, __ATOMIC_ACQUIRE);
		if (st & KUP_STATE_PEER_GONE)
			break;
		usleep(10000);
	}
	CHECK(st & KUP_STATE_PEER_GONE);
	/* libkup now reports the channel as given up on by the kernel */
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_PEER);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK hostile_user %s\n", variant);
	return 0;
}

/* A hostile kernel (hostile.so): libkup must report EKU_PROTO. */
static int
sc_hostile_kernel(void)
{
	static const char *cmds[] = { "seqgap", "seqrep", "badlen", "badkind",
	    "badturn" };
	void *d = open_dev("hostile");
	struct kernproxy_msg m;
	size_t i;

	for (i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		void *c = attach(d, i % 4);

		expect_pass(c);
		round_trip(c, "fine", 4, NULL);   /* a good exchange first */
		CHECK_EQ(kernproxy_send(c, cmds[i], strlen(cmds[i]), 0), 0);
		if (kernproxy_receive_msg(c, &m, 10000) == 0) {
			fprintf(stderr, "%s: accepted kind %u len %zu seq %llu\n",
			    cmds[i], m.kind, m.len, (unsigned long long)m.seq);
			return 1;
		}
		if (kernproxy_errno != EKU_PROTO) {
			fprintf(stderr, "%s: got %s, expected EKU_PROTO\n", cmds[i],
			    kernproxy_strerror(kernproxy_errno));
			return 1;
		}
		/* and it stays refused */
		CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
		CHECK_EQ(kernproxy_errno, EKU_PROTO);
		kernproxy_close(c);
		printf("refused %s\n", cmds[i]);
	}
	kernproxy_close(d);
	printf("OK hostile_kernel\n");
	return 0;
}

/* Block in receive on a channel whose kernel keeps the turn; the driver
 * SIGTERMs kupsim; report when we saw EKU_SHUTDOWN. */
static int
sc_shutdown_wait(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 60);
	struct kernproxy_msg m;
	struct kernproxy_info info;
	struct pollfd pf;
	long long t;
	int r, devfd;

	devfd = kernproxy_dev_fd(d);
	CHECK(devfd >= 0);
	expect_pass(c);
	CHECK_EQ(kernproxy_send(c, "!hold", 5, 0), 0);
	printf("WAITING\n");
	fflush(stdout);
	r = kernproxy_receive_msg(c, &m, 30000);
	t = mono_ns();
	CHECK_EQ(r, -1);
	printf("RESULT %d %lld\n", kernproxy_errno, t);
	fflush(stdout);
	CHECK_EQ(kernproxy_errno, EKU_SHUTDOWN);
	/* and stays so */
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_SHUTDOWN);
	/* device watchers heard about it */
	pf.fd = devfd;
	pf.events = POLLIN;
	CHECK_EQ(poll(&pf, 1, 10000), 1);
	r = kernproxy_info(d, &info);
	CHECK(r != 0 || info.shutting_down == 1);
	if (r != 0)
		CHECK_EQ(kernproxy_error(d), EKU_SHUTDOWN);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK shutdown_wait\n");
	return 0;
}

/* The kernel's last message arrives, then the device shuts down before we
 * read it (the driver SIGTERMs kupsim after READY): the message is still
 * ours to read -- libkup used to look at the shutdown first and answer
 * EKU_SHUTDOWN while kernproxy_unread() said a DATA message was there --
 * and the receive after it is EKU_SHUTDOWN. */
static int
sc_shutdown_unread(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 62);
	struct kernproxy_msg m;
	struct kernproxy_info info;
	int i, r = 0;

	expect_pass(c);
	CHECK_EQ(kernproxy_send(c, "last", 4, 0), 0);
	for (i = 0; i < 30000 && kernproxy_unread(c) != KUP_KIND_DATA; i++)
		usleep(1000);
	CHECK_EQ(kernproxy_unread(c), KUP_KIND_DATA);
	printf("READY\n");
	fflush(stdout);
	/* until the device says it is shutting down (bounded) */
	for (i = 0; i < 600; i++) {
		r = kernproxy_info(d, &info);
		if (r != 0 || info.shutting_down)
			break;
		usleep(50000);
	}
	CHECK(r != 0 || info.shutting_down);
	CHECK_EQ(kernproxy_unread(c), KUP_KIND_DATA);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), 0);
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, 4);
	CHECK(memcmp(m.data, "last", 4) == 0);
	CHECK_EQ(kernproxy_unread(c), 0);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_SHUTDOWN);
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_SHUTDOWN);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK shutdown_unread\n");
	return 0;
}

/* A receiver blocked on an idle channel must sleep, not spin. */
static int
sc_idle(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 70);
	struct kernproxy_msg m;
	struct rusage r0, r1;
	long long t0, t1, cpu_us;
	double frac;

	expect_pass(c);
	CHECK_EQ(kernproxy_send(c, "!hold", 5, 0), 0);
	getrusage(RUSAGE_SELF, &r0);
	t0 = mono_ns();
	CHECK_EQ(kernproxy_receive_msg(c, &m, 1000), -1);
	CHECK_EQ(kernproxy_errno, EKU_TIMEDOUT);
	t1 = mono_ns();
	getrusage(RUSAGE_SELF, &r1);
	cpu_us = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) * 1000000LL +
	    (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec) +
	    (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) * 1000000LL +
	    (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec);
	frac = (double)cpu_us * 1000.0 / (double)(t1 - t0);
	printf("IDLE cpu_us=%lld wall_ms=%lld fraction=%.4f\n", cpu_us,
	    (t1 - t0) / 1000000, frac);
	CHECK((t1 - t0) >= 900000000LL);   /* it did wait */
	CHECK(frac < 0.05);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK idle\n");
	return 0;
}

/* kupsim runs echo with announce_delay_ms: attach before the announce is
 * EKU_NOTREADY; the device fd reports the announce. */
static int
sc_notready(void)
{
	void *d = open_dev("echo");
	struct kernproxy_info info;
	struct pollfd pf;
	void *c;
	int fd, i;

	CHECK_EQ(kernproxy_info(d, &info), 0);
	CHECK_EQ(info.announced, 0);
	CHECK_EQ(info.notify_gen, 0);
	fd = kernproxy_dev_fd(d);
	CHECK(fd >= 0);
	CHECK(kernproxy_channel(d, 0, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_NOTREADY);
	CHECK(kernproxy_channel(d, KP_CHAN_ANY, 0) == NULL);
	CHECK_EQ(kernproxy_error(d), EKU_NOTREADY);
	pf.fd = fd;
	pf.events = POLLIN;
	CHECK_EQ(poll(&pf, 1, 60000), 1);
	CHECK_EQ(kernproxy_info(d, &info), 0);
	CHECK_EQ(info.announced, 128);
	CHECK_EQ(info.notify_gen, 1);
	CHECK_EQ(info.shutting_down, 0);
	/* info drained the event: nothing more to read */
	CHECK_EQ(poll(&pf, 1, 0), 0);
	c = attach(d, 0);
	expect_pass(c);
	round_trip(c, "late", 4, NULL);
	for (i = 0; i < 2; i++)
		round_trip(c, "again", 5, NULL);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK notready\n");
	return 0;
}

/* Attach / detach the same channel over and over, in every state: the
 * module's worker of the previous user must notice each departure even
 * when the next user is already there. */
static int
sc_churn(void)
{
	void *d = open_dev("echo");
	char buf[32];
	int i;

	for (i = 0; i < 300; i++) {
		void *c = attach(d, 90);
		int n;

		switch (i % 3) {
		case 0:   /* leave at once, maybe before the kernel's PASS */
			break;
		case 1:   /* leave holding the turn: CLOSE */
			expect_pass(c);
			break;
		default:  /* a full exchange, leave while the kernel answers */
			expect_pass(c);
			n = snprintf(buf, sizeof(buf), "churn %d", i);
			round_trip(c, buf, (size_t)n, NULL);
			CHECK_EQ(kernproxy_send(c, buf, (size_t)n, 0), 0);
			break;
		}
		kernproxy_close(c);
	}
	/* leave while the kernel computes a (300 ms) reply; the next user
	 * must get a fresh conversation, never the previous user's reply */
	for (i = 0; i < 4; i++) {
		void *c = attach(d, 90);
		struct kernproxy_msg m;

		CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
		CHECK_EQ(m.kind, KUP_KIND_PASS);
		CHECK_EQ(m.seq, 1);
		CHECK_EQ(kernproxy_send(c, "!delay", 6, 0), 0);
		kernproxy_close(c);
	}
	{
		void *c = attach(d, 90);
		struct kernproxy_msg m;

		CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
		CHECK_EQ(m.kind, KUP_KIND_PASS);
		CHECK_EQ(m.seq, 1);
		round_trip(c, "settled", 7, NULL);
		kernproxy_close(c);
	}
	kernproxy_close(d);
	printf("OK churn\n");
	return 0;
}

struct stress_arg {
	void *d;
	int chan;
	int ok;
};

static void *
stress_main(void *p)
{
	struct stress_arg *a = p;
	char buf[64];
	int i, j;

	for (i = 0; i < 40; i++) {
		void *c = attach(a->d, (size_t)a->chan);

		if (i % 4 != 0) {
			expect_pass(c);
			for (j = 0; j < 25; j++) {
				int n = snprintf(buf, sizeof(buf), "s%d.%d.%d", a->chan,
				    i, j);
				round_trip(c, buf, (size_t)n, (a->chan & 1) ? upper : NULL);
			}
		}
		kernproxy_close(c);
	}
	a->ok = 1;
	return NULL;
}

/* Several threads, each attaching, talking and leaving its own channel
 * over and over, all at once (races in attach/detach/worker hand-off). */
static int
sc_stress(void)
{
	struct stress_arg a[6];
	pthread_t t[6];
	void *d = open_dev("echo");
	int i;

	for (i = 0; i < 6; i++) {
		a[i].d = d;
		a[i].chan = 100 + i;
		a[i].ok = 0;
		CHECK_EQ(pthread_create(&t[i], NULL, stress_main, &a[i]), 0);
	}
	for (i = 0; i < 6; i++) {
		pthread_join(t[i], NULL);
		CHECK(a[i].ok);
	}
	kernproxy_close(d);
	printf("OK stress\n");
	return 0;
}

/*
 * echo in "any" mode (KUP_PARAM_ECHO_ANY=1): ONE module thread serves
 * every channel with kupdev_receive_any.  ANYS_USERS threads, each with
 * ANYS_PER_USER channels: hand over on all of them at once, then take
 * every answer (a lost hand-over fails the 10 s receive; a duplicated or
 * reordered one, the content check), leaving and re-attaching one of
 * their channels now and then (the server's set shrinks and grows).
 * Then one hand-over at a time on every channel, after a pause in which
 * the server goes to sleep: each channel's wake-up alone must reach it.
 */
#define ANYS_USERS    8
#define ANYS_PER_USER 4
#define ANYS_ROUNDS   300

struct anys_arg {
	void *d;
	int first;
	void *c[ANYS_PER_USER];
	int ok;
};

static void *
anys_main(void *p)
{
	struct anys_arg *a = p;
	struct kernproxy_msg m;
	char buf[ANYS_PER_USER][64];
	int len[ANYS_PER_USER];
	int i, j, k;

	for (j = 0; j < ANYS_PER_USER; j++) {
		a->c[j] = attach(a->d, (size_t)(a->first + j));
		expect_pass(a->c[j]);
	}
	for (i = 0; i < ANYS_ROUNDS; i++) {
		if (i % 50 == 49) {
			j = (i / 50) % ANYS_PER_USER;
			kernproxy_close(a->c[j]);
			a->c[j] = attach(a->d, (size_t)(a->first + j));
			expect_pass(a->c[j]);
		}
		for (j = 0; j < ANYS_PER_USER; j++) {
			len[j] = snprintf(buf[j], sizeof(buf[j]), "any c%d r%d",
			    a->first + j, i);
			CHECK_EQ(kernproxy_send(a->c[j], buf[j], (size_t)len[j], 0), 0);
		}
		for (j = 0; j < ANYS_PER_USER; j++) {
			int odd = (a->first + j) & 1;

			if (kernproxy_receive_msg(a->c[j], &m, 10000) != 0) {
				fprintf(stderr, "chan %d round %d: %s\n",
				    a->first + j, i,
				    kernproxy_strerror(kernproxy_errno));
				exit(1);
			}
			CHECK_EQ(m.kind, KUP_KIND_DATA);
			CHECK_EQ(m.len, (size_t)len[j]);
			for (k = 0; k < len[j]; k++)
				CHECK_EQ(((const char *)m.data)[k],
				    odd ? upper(buf[j][k]) : buf[j][k]);
		}
	}
	a->ok = 1;
	return NULL;
}

static int
sc_anystress(void)
{
	struct anys_arg a[ANYS_USERS];
	pthread_t t[ANYS_USERS];
	void *d = open_dev("echo");
	char buf[32];
	int i, j, n;

	for (i = 0; i < ANYS_USERS; i++) {
		a[i].d = d;
		a[i].first = i * ANYS_PER_USER;
		a[i].ok = 0;
		CHECK_EQ(pthread_create(&t[i], NULL, anys_main, &a[i]), 0);
	}
	for (i = 0; i < ANYS_USERS; i++) {
		pthread_join(t[i], NULL);
		CHECK(a[i].ok);
	}
	for (i = 0; i < ANYS_USERS * ANYS_PER_USER; i++) {
		void *c = a[i / ANYS_PER_USER].c[i % ANYS_PER_USER];

		for (j = 0; j < 2; j++) {
			usleep(5000);   /* the server sleeps (not asserted) */
			n = snprintf(buf, sizeof(buf), "alone %d.%d", i, j);
			round_trip(c, buf, (size_t)n, (i & 1) ? upper : NULL);
		}
	}
	for (i = 0; i < ANYS_USERS; i++)
		for (j = 0; j < ANYS_PER_USER; j++)
			kernproxy_close(a[i].c[j]);
	kernproxy_close(d);
	printf("OK anystress %d messages\n",
	    ANYS_USERS * ANYS_PER_USER * (ANYS_ROUNDS + 2));
	return 0;
}

/* A timeout below -1 is EKU_INVAL at once (kup.h: -1 forever, 0 do not
 * wait, > 0 ms), whether or not a message is waiting, and consumes
 * nothing: it used to mean "forever" (or take what was there). */
static int
sc_badtimeout(void)
{
	static const int bad[] = { -2, -1000, INT_MIN };
	void *d = open_dev("echo");
	void *c = attach(d, 80);
	struct kernproxy_msg m;
	size_t i;

	/* the kernel's PASS is waiting (or about to be) */
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		CHECK_EQ(kernproxy_receive_msg(c, &m, bad[i]), -1);
		CHECK_EQ(kernproxy_errno, EKU_INVAL);
		CHECK_EQ(kernproxy_error(c), EKU_INVAL);
	}
	expect_pass(c);
	/* a reply on its way: still refused, and still there afterwards */
	CHECK_EQ(kernproxy_send(c, "abc", 3, 0), 0);
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		CHECK_EQ(kernproxy_receive_msg(c, &m, bad[i]), -1);
		CHECK_EQ(kernproxy_errno, EKU_INVAL);
	}
	CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, 3);
	CHECK(memcmp(m.data, "abc", 3) == 0);
	/* -1 is still "forever" */
	CHECK_EQ(kernproxy_pass(c), 0);
	CHECK_EQ(kernproxy_receive_msg(c, &m, -1), 0);
	CHECK_EQ(m.kind, KUP_KIND_PASS);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK badtimeout\n");
	return 0;
}

/* Wait (bounded: 10 s) until the kernel side sleeps for our hand-over,
 * so that the next send has to wake it (kernel_waiting, kup_abi.h).  The
 * flag is set before the kernel side's last look at the turn, so a moment
 * more (5 ms) lets it get past that look to its sleep; a kernel side held
 * up longer still finds the hand-over without a wake-up (callers that
 * need the wake-up check for that). */
static void
wait_kernel_waiting(void *c)
{
	struct kup_ctrl *ctrl = kup_test_raw_mapping(c, NULL);
	int i;

	CHECK(ctrl != NULL);
	for (i = 0; i < 10000; i++) {
		if (__atomic_load_n(&ctrl->kernel_waiting, __ATOMIC_ACQUIRE) != 0) {
			usleep(5000);
			return;
		}
		usleep(1000);
	}
	fprintf(stderr, "the kernel side never waited\n");
	exit(1);
}

/* The answer to the message just sent: one DATA message, its text, the
 * kernel's sequence number seq. */
static void
expect_echo(void *c, const char *text, uint64_t seq)
{
	struct kernproxy_msg m;

	CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, strlen(text));
	CHECK(memcmp(m.data, text, m.len) == 0);
	CHECK_EQ(m.seq, seq);
}

/*
 * Make the channel's next n wake-ups of the kernel side fail with errno
 * err (n = UINT_MAX: until told otherwise; fail_wakes(c, 0, 0) ends it).
 * kupsim: libkup's sim backend fails them (kup_test_fail_wakes).  A kernel
 * device (Linux kup.ko, libkup's kdev backend): the real KUP_IOC_WAKE
 * ioctl fails, in the kernel -- a seccomp filter on this thread hands every
 * KUP_IOC_WAKE to a supervisor thread (SECCOMP_RET_USER_NOTIF), which
 * answers the next n with -err and lets the others through to kup.ko
 * (SECCOMP_USER_NOTIF_FLAG_CONTINUE), counting both.
 */
#if defined(__linux__) && (defined(__x86_64__) || defined(__aarch64__))
#define KDEV_FAIL_WAKES 1
#if defined(__x86_64__)
#define KDEV_AUDIT_ARCH AUDIT_ARCH_X86_64
#else
#define KDEV_AUDIT_ARCH AUDIT_ARCH_AARCH64
#endif

static pthread_mutex_t kdev_fw_lock = PTHREAD_MUTEX_INITIALIZER;
static int kdev_fw_listener = -1;
static unsigned int kdev_fw_left;      /* wake-ups still to fail */
static int kdev_fw_errno;
static unsigned long kdev_fw_failed;   /* KUP_IOC_WAKEs answered -errno */
static unsigned long kdev_fw_passed;   /* KUP_IOC_WAKEs that reached kup.ko */

static void *
kdev_fw_supervise(void *arg)
{
	struct seccomp_notif req;
	struct seccomp_notif_resp resp;

	(void)arg;
	for (;;) {
		memset(&req, 0, sizeof(req));
		if (ioctl(kdev_fw_listener, SECCOMP_IOCTL_NOTIF_RECV, &req) != 0) {
			if (errno == EINTR || errno == ENOENT)
				continue;
			perror("SECCOMP_IOCTL_NOTIF_RECV");
			exit(1);
		}
		memset(&resp, 0, sizeof(resp));
		resp.id = req.id;
		pthread_mutex_lock(&kdev_fw_lock);
		if (kdev_fw_left > 0) {
			if (kdev_fw_left != UINT_MAX)
				kdev_fw_left--;
			resp.error = -kdev_fw_errno;
			kdev_fw_failed++;
		} else {
			resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
			kdev_fw_passed++;
		}
		pthread_mutex_unlock(&kdev_fw_lock);
		/* ENOENT: the caller is gone meanwhile (nothing to answer) */
		if (ioctl(kdev_fw_listener, SECCOMP_IOCTL_NOTIF_SEND, &resp) != 0 &&
		    errno != ENOENT) {
			perror("SECCOMP_IOCTL_NOTIF_SEND");
			exit(1);
		}
	}
	return NULL;
}

/* Install the filter on the calling thread (once) and start the supervisor
 * (after it: the filter is inherited, but the supervisor makes no
 * KUP_IOC_WAKE). */
static void
kdev_fw_install(void)
{
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, KDEV_AUDIT_ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		/* the request: an unsigned int to the kernel, the low word of
		 * args[1] (little-endian) */
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
		    offsetof(struct seccomp_data, args[1])),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)KUP_IOC_WAKE, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
	};
	struct sock_fprog prog = {
		.len = (unsigned short)(sizeof(f) / sizeof(f[0])),
		.filter = f,
	};
	pthread_t t;
	long fd;

	if (kdev_fw_listener >= 0)
		return;
	CHECK(prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0);
	fd = syscall(__NR_seccomp, SECCOMP_SET_MODE_FILTER,
	    SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (fd < 0) {
		perror("seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER)");
		exit(1);
	}
	kdev_fw_listener = (int)fd;
	CHECK_EQ(pthread_create(&t, NULL, kdev_fw_supervise, NULL), 0);
	CHECK_EQ(pthread_detach(t), 0);
}

/* KUP_IOC_WAKEs that reached kup.ko so far */
static unsigned long
kdev_wakes_passed(void)
{
	unsigned long n;

	pthread_mutex_lock(&kdev_fw_lock);
	n = kdev_fw_passed;
	pthread_mutex_unlock(&kdev_fw_lock);
	return n;
}
#endif

/* 1: the channel's wake-ups fail in the kernel (kdev), 0: in libkup (sim) */
static int
fail_wakes(void *c, unsigned int n, int err)
{
	if (kup_test_fail_wakes(c, n, err) == 0)
		return 0;
#ifdef KDEV_FAIL_WAKES
	kdev_fw_install();
	pthread_mutex_lock(&kdev_fw_lock);
	kdev_fw_left = n;
	kdev_fw_errno = err;
	pthread_mutex_unlock(&kdev_fw_lock);
	return 1;
#else
	fprintf(stderr, "no way to make this backend's wake-ups fail\n");
	exit(1);
#endif
}

/* A hand-over whose wake-up of the sleeping kernel side fails (fail_wakes:
 * in libkup's sim backend on kupsim, in the KUP_IOC_WAKE ioctl itself on
 * Linux).  The message is the kernel's from the hand-over on, so the send
 * succeeds (it used to fail with EKU_SYS: a caller sending again got
 * EKU_NOTTURN, or, once the kernel had answered, sent the message twice);
 * the next receive makes the owed wake-up and gets the one answer; a
 * wake-up that fails again is that receive's error, and a later receive
 * makes it again.  A wake-up a signal interrupted (EINTR) is made again at
 * once; one interrupted every time is owed the same way.  In poll mode the
 * fd turns readable for the receive that makes it.  Every message is
 * answered once, in sequence.  The kernel side waits without a bound (echo:
 * KUPDEV_FOREVER), so only the owed wake-up can wake it -- unless it finds
 * the hand-over in the look it takes after it set kernel_waiting and before
 * it sleeps (wait_kernel_waiting cannot tell that it is past it): then no
 * wake-up was needed or owed, and the case is made again, at most
 * WAKEFAIL_TRIES times. */
#define WAKEFAIL_TRIES 10
static int
sc_wakefail(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 12);
	struct kernproxy_msg m;
	struct pollfd pf;
	int i, fd, kdev, try;
	uint64_t kseq = 2;     /* the kernel's next sequence number */
#ifdef KDEV_FAIL_WAKES
	unsigned long passed = 0;
#define KDEV_PASSED_MARK() (passed = kdev ? kdev_wakes_passed() : 0)
	/* (kdev) the call just made sent the kernel a wake-up of its own */
#define KDEV_PASSED_MORE() (!kdev || kdev_wakes_passed() > passed)
#else
#define KDEV_PASSED_MARK() ((void)0)
#define KDEV_PASSED_MORE() 1
#endif

	expect_pass(c);
	/* one failed wake-up: owed, made by the receive */
	for (try = 0;; try++) {
		CHECK(try < WAKEFAIL_TRIES);
		wait_kernel_waiting(c);
		kdev = fail_wakes(c, 1, EIO);
		CHECK_EQ(kernproxy_send(c, "one", 3, 0), 0);
		CHECK_EQ(kernproxy_error(c), KUP_E_OK);
		CHECK_EQ(kernproxy_my_turn(c), 0);
		KDEV_PASSED_MARK();
		expect_echo(c, "one", kseq++);
		if (KDEV_PASSED_MORE())
			break;
		/* (kdev) no wake-up reached kup.ko: echo found the message
		 * in its last look before it slept; again */
	}

	/* it fails at the receive too: reported there, not a lost message */
	for (try = 0;; try++) {
		CHECK(try < WAKEFAIL_TRIES);
		wait_kernel_waiting(c);
		fail_wakes(c, 2, EIO);
		CHECK_EQ(kernproxy_pass(c), 0);
		if (kernproxy_receive_msg(c, &m, 10000) == 0) {
			/* echo found the PASS before it slept: nothing was
			 * owed (pay_owed_wake); again */
			CHECK_EQ(m.kind, KUP_KIND_PASS);
			CHECK_EQ(m.seq, kseq++);
			fail_wakes(c, 0, 0);
			continue;
		}
		CHECK_EQ(kernproxy_errno, EKU_SYS);
		CHECK_EQ(errno, EIO);
		CHECK_EQ(kernproxy_my_turn(c), 0);
		/* the PASS is the kernel's: nothing to send again */
		CHECK_EQ(kernproxy_send(c, "dup", 3, 0), -1);
		CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
		KDEV_PASSED_MARK();
		CHECK_EQ(kernproxy_receive_msg(c, &m, 10000), 0);
		CHECK(KDEV_PASSED_MORE());
		CHECK_EQ(m.kind, KUP_KIND_PASS);
		CHECK_EQ(m.seq, kseq++);
		break;
	}

	/* EINTR, a signal during the wake-up: made again at once */
	wait_kernel_waiting(c);
	fail_wakes(c, 1, EINTR);
	CHECK_EQ(kernproxy_send(c, "int1", 4, 0), 0);
	expect_echo(c, "int1", kseq++);
	/* interrupted every time: owed, the receive's error while it still
	 * fails, made by the next receive */
	for (try = 0;; try++) {
		CHECK(try < WAKEFAIL_TRIES);
		wait_kernel_waiting(c);
		fail_wakes(c, UINT_MAX, EINTR);
		CHECK_EQ(kernproxy_send(c, "int2", 4, 0), 0);
		if (kernproxy_receive_msg(c, &m, 10000) == 0) {
			/* echo found it before it slept; again */
			CHECK_EQ(m.kind, KUP_KIND_DATA);
			CHECK_EQ(m.seq, kseq++);
			fail_wakes(c, 0, 0);
			continue;
		}
		CHECK_EQ(kernproxy_errno, EKU_SYS);
		CHECK_EQ(errno, EINTR);
		CHECK_EQ(kernproxy_my_turn(c), 0);
		fail_wakes(c, 0, 0);
		KDEV_PASSED_MARK();
		expect_echo(c, "int2", kseq++);
		CHECK(KDEV_PASSED_MORE());
		break;
	}

	/* poll mode: an event loop hears of the owed wake-up */
	fd = kernproxy_fd(c);
	CHECK(fd >= 0);
	/* (consumes the wake-up kernproxy_fd made: the turn was ours) */
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_NOTTURN);
	wait_kernel_waiting(c);
	fail_wakes(c, 1, EIO);
	CHECK_EQ(kernproxy_send(c, "three", 5, 0), 0);
	for (i = 0;; i++) {
		CHECK(i < 1000);
		pf = (struct pollfd){ .fd = fd, .events = POLLIN };
		CHECK_EQ(poll(&pf, 1, 10000), 1);
		if (kernproxy_receive_msg(c, &m, 0) == 0)
			break;
		CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	}
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	CHECK_EQ(m.len, 5);
	CHECK(memcmp(m.data, "three", 5) == 0);
	CHECK_EQ(m.seq, kseq++);
	/* and the channel goes on as ever: every message once */
	CHECK_EQ(kernproxy_send(c, "four", 4, 0), 0);
	expect_echo(c, "four", kseq++);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK wakefail%s\n", kdev ? " (kernel device: KUP_IOC_WAKE failed in the kernel)" : "");
	return 0;
#undef KDEV_PASSED_MARK
#undef KDEV_PASSED_MORE
}

/* echo's "!kick": the module ends the session with kupdev_disconnect while
 * the user waits for its answer.  The blocked receive returns EKU_PEER
 * (well before its timeout), so does every later call, the close detaches,
 * and the channel serves the next user afresh; in poll mode the fd turns
 * readable for it. */
static int
sc_kick(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 14);
	struct kernproxy_msg m;
	struct pollfd pf;
	long long t0;
	int fd, i;

	expect_pass(c);
	round_trip(c, "hello", 5, NULL);
	CHECK_EQ(kernproxy_state(c), 0);
	CHECK_EQ(kernproxy_send(c, "!kick200", 8, 0), 0);
	t0 = mono_ns();
	CHECK_EQ(kernproxy_receive_msg(c, &m, 30000), -1);
	CHECK_EQ(kernproxy_errno, EKU_PEER);
	CHECK(mono_ns() - t0 < 20000000000LL);
	CHECK_EQ(kernproxy_error(c), EKU_PEER);
	CHECK_EQ(kernproxy_state(c), EKU_PEER);
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_PEER);
	CHECK_EQ(kernproxy_receive_msg(c, &m, 0), -1);
	CHECK_EQ(kernproxy_errno, EKU_PEER);
	kernproxy_close(c);
	/* free for the next user, whose session starts afresh */
	c = attach(d, 14);
	expect_pass(c);
	round_trip(c, "again", 5, NULL);
	/* poll mode */
	fd = kernproxy_fd(c);
	CHECK(fd >= 0);
	CHECK_EQ(kernproxy_send(c, "!kick", 5, 0), 0);
	for (i = 0;; i++) {
		CHECK(i < 1000);
		pf = (struct pollfd){ .fd = fd, .events = POLLIN };
		CHECK_EQ(poll(&pf, 1, 20000), 1);
		if (kernproxy_receive_msg(c, &m, 0) == -1 &&
		    kernproxy_errno == EKU_PEER)
			break;
		CHECK_EQ(kernproxy_errno, EKU_NOTREADY);
	}
	kernproxy_close(c);
	/* an idle user learns of the kick from its page, without waiting: the
	 * module disconnects 100 ms after the send returns */
	c = attach(d, 14);
	expect_pass(c);
	CHECK_EQ(kernproxy_send(c, "!kick100", 8, 0), 0);
	for (i = 0; kernproxy_state(c) == 0; i++) {
		CHECK(i < 2000);
		usleep(10000);
	}
	CHECK_EQ(kernproxy_state(c), EKU_PEER);
	kernproxy_close(c);
	c = attach(d, 14);
	expect_pass(c);
	round_trip(c, "third", 5, NULL);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK kick\n");
	return 0;
}

/* receive the DATA message text (exactly) */
static void
expect_text(void *c, const char *text)
{
	struct kernproxy_msg m;

	if (kernproxy_receive_msg(c, &m, 30000) != 0) {
		fprintf(stderr, "receive %s: %s\n", text,
		    kernproxy_strerror(kernproxy_errno));
		exit(1);
	}
	CHECK_EQ(m.kind, KUP_KIND_DATA);
	if (m.len != strlen(text) || memcmp(m.data, text, m.len) != 0) {
		fprintf(stderr, "got '%.*s', want '%s'\n", (int)m.len,
		    (const char *)m.data, text);
		exit(1);
	}
}

/* echo's "!wake": a module thread waiting in its receive (the user holds
 * the turn) is woken by kupdev_wake_channel from another thread: -ECANCELED
 * (-125), and the session goes on; a wake that comes after the user's
 * message is answered by the receive after it.  Once the first wake is
 * armed it prints "ARMED" and waits for a line on stdin before it sends:
 * the caller sends that line once echo has logged its receive woken while
 * waiting (a message sent before that would be the one the receive gets,
 * the wake kept for the receive after). */
static int
sc_wake(void)
{
	void *d = open_dev("echo");
	void *c = attach(d, 16);
	char line[16];

	expect_pass(c);
	CHECK_EQ(kernproxy_send(c, "!wake50", 7, 0), 0);
	expect_text(c, "!wake armed");
	printf("ARMED\n");
	fflush(stdout);
	CHECK(fgets(line, sizeof(line), stdin) != NULL);
	CHECK_EQ(kernproxy_send(c, "x", 1, 0), 0);
	expect_text(c, "!wake -125");
	CHECK_EQ(kernproxy_send(c, "!wake1500", 9, 0), 0);
	expect_text(c, "!wake armed");
	CHECK_EQ(kernproxy_send(c, "y", 1, 0), 0);   /* before the wake */
	expect_text(c, "!wake -125");
	round_trip(c, "after", 5, NULL);
	kernproxy_close(c);
	kernproxy_close(d);
	printf("OK wake\n");
	return 0;
}

int
main(int argc, char **argv)
{
	const char *s = argc > 1 ? argv[1] : "";

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (strcmp(s, "blocking") == 0)
		return sc_blocking();
	if (strcmp(s, "nonblocking") == 0)
		return sc_nonblocking();
	if (strcmp(s, "transforms") == 0)
		return sc_transforms();
	if (strcmp(s, "spin") == 0)
		return sc_spin();
	if (strcmp(s, "many") == 0)
		return sc_many();
	if (strcmp(s, "threads") == 0)
		return sc_threads();
	if (strcmp(s, "twodev") == 0)
		return sc_twodev();
	if (strcmp(s, "sizes") == 0)
		return sc_sizes();
	if (strcmp(s, "version") == 0)
		return sc_version();
	if (strcmp(s, "hold") == 0 && argc > 2)
		return sc_hold(argv[2]);
	if (strcmp(s, "reattach") == 0 && argc > 2)
		return sc_reattach(argv[2]);
	if (strcmp(s, "hostile_user") == 0 && argc > 3)
		return sc_hostile_user(argv[2], argv[3]);
	if (strcmp(s, "hostile_kernel") == 0)
		return sc_hostile_kernel();
	if (strcmp(s, "shutdown_wait") == 0)
		return sc_shutdown_wait();
	if (strcmp(s, "shutdown_unread") == 0)
		return sc_shutdown_unread();
	if (strcmp(s, "idle") == 0)
		return sc_idle();
	if (strcmp(s, "notready") == 0)
		return sc_notready();
	if (strcmp(s, "churn") == 0)
		return sc_churn();
	if (strcmp(s, "anystress") == 0)
		return sc_anystress();
	if (strcmp(s, "stress") == 0)
		return sc_stress();
	if (strcmp(s, "badtimeout") == 0)
		return sc_badtimeout();
	if (strcmp(s, "wakefail") == 0)
		return sc_wakefail();
	if (strcmp(s, "kick") == 0)
		return sc_kick();
	if (strcmp(s, "wake") == 0)
		return sc_wake();
	fprintf(stderr, "usage: test_kup <scenario> [args]\n");
	return 2;
}
