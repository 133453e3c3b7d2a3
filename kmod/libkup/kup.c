/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup.c -- libkup: the user side of the KUP turn protocol (kup_abi.h),
 * the same for every backend (kup_backend.h).
 *
 * The user side trusts nothing in the shared page: the identity is checked
 * once at attach (magic, version, geometry against the mapping length,
 * reserved words zero), the sizes are kept privately, and every kernel->
 * user descriptor is read ONCE into locals and validated (length against
 * the private size, kind, sequence = last + 1) before a payload byte is
 * handed to the caller.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kup.h"
#include "kup_backend.h"

__thread int kernproxy_errno;

#define KP_MAGIC_DEV  0x4b504456U   /* "VDPK" */
#define KP_MAGIC_CHAN 0x4b504348U   /* "HCPK" */
#define KP_MAGIC_DEAD 0xdeadbeefU

/*
 * Spin-then-sleep, adaptive per channel.  Before sleeping, a waiter spins
 * for a time budget, checking the clock every KP_SPIN_CHECK relax hints
 * (a pause is ~25 ns, a vDSO clock read ~20-100 ns on the development VM).
 * The budget is twice a running average (1/8 weight) of how long recent
 * waits took, counting only waits short enough that a spin could have
 * caught them (<= KP_SPIN_MAX_NS); a wait that outlasted that (an idle or
 * slow peer) counts as 0, so a channel whose peer answers late quickly
 * stops burning CPU, and one that answers fast spins just long enough.
 * The budget stays within [KP_SPIN_MIN_NS, KP_SPIN_MAX_NS].  Idle costs
 * nothing either way: a blocked receive spins once, then sleeps.  (The
 * old fixed 2000 pauses were ~50 us on the development VM, but ~8 us on
 * CPUs whose pause is 10 cycles: a time budget means the same everywhere.)
 * While spinning, the waiter yields the CPU every KP_SPIN_YIELD_NS (at once
 * when the previous yield showed that another thread shares it): when the
 * scheduler has put the kernel-side thread on our CPU, a spin that does not
 * yield only delays the answer it waits for.
 */
#ifndef KP_SPIN_MIN_NS
#define KP_SPIN_MIN_NS 2000U
#endif
#ifndef KP_SPIN_MAX_NS
#define KP_SPIN_MAX_NS 20000U
#endif
#ifndef KP_SPIN_INIT_NS
#define KP_SPIN_INIT_NS 10000U      /* average before any wait: budget 20 us */
#endif
#define KP_SPIN_CHECK    16
#ifndef KP_SPIN_YIELD_NS
#define KP_SPIN_YIELD_NS 1000U       /* sched_yield() this often while spinning */
#endif
#define KP_SLEEP_SLICE_MS 1000       /* bounded sleeps: re-check at least this often */
#define KP_WAKE_TRIES    3           /* a wake-up interrupted (EINTR): made again */

/* user side's private view of the turn */
#define UT_KERNEL        0  /* handed to the kernel (or fresh: kernel first) */
#define UT_USER_CONSUMED 1  /* we hold it and have read the kernel's message */

#define LOAD_ACQ32(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE_REL32(p, v)  __atomic_store_n((p), (uint32_t)(v), __ATOMIC_RELEASE)
#define READ32(p)          __atomic_load_n((p), __ATOMIC_RELAXED)
#define READ64(p)          __atomic_load_n((p), __ATOMIC_RELAXED)
#define WRITE32(p, v)      __atomic_store_n((p), (uint32_t)(v), __ATOMIC_RELAXED)
#define WRITE64(p, v)      __atomic_store_n((p), (uint64_t)(v), __ATOMIC_RELAXED)
#define FENCE()            __atomic_thread_fence(__ATOMIC_SEQ_CST)
#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX()        __builtin_ia32_pause()
#else
#define CPU_RELAX()        do { } while (0)
#endif

struct kp_hdr {
	uint32_t magic;
	int      err;
};

/* A device handle may be shared by threads (each attaching its own
 * channels): err is accessed atomically and mu serialises the backend's
 * device calls (info / event fd share one connection). */
struct kp_dev {
	struct kp_hdr h;
	const struct kup_backend_ops *ops;
	void *b;
	pthread_mutex_t mu;
};

struct kp_chan {
	struct kp_hdr h;
	const struct kup_backend_ops *ops;
	struct kup_backend_chan b;
	struct kup_ctrl *ctrl;
	uint8_t *k2u;
	uint8_t *u2k;
	uint32_t k2u_size;      /* private copies, validated at attach */
	uint32_t u2k_size;
	uint32_t id;
	uint64_t gen;
	uint64_t k2u_seq;       /* last received */
	uint64_t u2k_seq;       /* last sent */
	int      uturn;
	int      poll_mode;     /* kernproxy_fd() was called */
	int      broken;        /* KUP_E_PROTO seen: refuse further use */
	int      host_gone;     /* the host side vanished (kupsim died) */
	uint32_t spin_avg_ns;   /* running average of catchable waits */
	int      yield_now;     /* the last spin yield let another thread run */
	int      learn_pending; /* a spin-only receive missed: learn at the take */
	uint64_t learn_t0;      /* ... from when that wait started */
	int      quiet;         /* the last send was KP_SPIN_NEXT: poll mode's
	                         * user_waiting left 0 until the next receive */
	int      keep_unread;   /* kernproxy_keep_unread: a send or pass
	                         * refuses to drop an unread DATA message */
	int      wake_owed;     /* the last hand-over's wake-up of the kernel
	                         * side failed: made again before this side
	                         * waits (pay_owed_wake) */
};

static int
fail(struct kp_hdr *h, int code)
{
	if (h != NULL)
		__atomic_store_n(&h->err, code, __ATOMIC_RELAXED);
	kernproxy_errno = code;
	return -1;
}

static void *
fail_null(struct kp_hdr *h, int code)
{
	(void)fail(h, code);
	return NULL;
}

static struct kp_chan *
as_chan(void *p)
{
	struct kp_chan *c = p;

	if (c == NULL || c->h.magic != KP_MAGIC_CHAN) {
		kernproxy_errno = KUP_E_INVAL;
		return NULL;
	}
	return c;
}

static struct kp_dev *
as_dev(void *p)
{
	struct kp_dev *d = p;

	if (d == NULL || d->h.magic != KP_MAGIC_DEV) {
		kernproxy_errno = KUP_E_INVAL;
		return NULL;
	}
	return d;
}

/* ---- backends ---------------------------------------------------------- */

static const struct kup_backend_ops *const kp_os_backend =
#if defined(KUP_HAVE_BACKEND_LINUX)
    &kup_backend_linux;
#elif defined(KUP_HAVE_BACKEND_FREEBSD)
    &kup_backend_freebsd;
#else
    NULL;
#endif

static const struct kup_backend_ops *
backend_by_name(const char *n)
{
	if (strcmp(n, "sim") == 0)
		return &kup_backend_sim;
#if defined(KUP_HAVE_BACKEND_LINUX)
	if (strcmp(n, "linux") == 0)
		return &kup_backend_linux;
#endif
#if defined(KUP_HAVE_BACKEND_FREEBSD)
	if (strcmp(n, "freebsd") == 0)
		return &kup_backend_freebsd;
#endif
	return NULL;
}

void *
kernproxy_open(char const *name)
{
	const struct kup_backend_ops *ops = NULL;
	const char *force = getenv("KUP_BACKEND");
	struct kp_dev *d;
	void *b = NULL;
	int r;

	if (name == NULL || *name == '\0')
		return fail_null(NULL, KUP_E_INVAL);
	d = calloc(1, sizeof(*d));
	if (d == NULL)
		return fail_null(NULL, KUP_E_SYS);
	if (force != NULL && *force != '\0') {
		ops = backend_by_name(force);
		if (ops == NULL) {
			free(d);
			/* unknown or not built into this libkup */
			return fail_null(NULL, KUP_E_INVAL);
		}
		r = ops->open(name, &b);
	} else {
		r = KUP_E_NOENT;
		if (kp_os_backend != NULL) {
			ops = kp_os_backend;
			r = ops->open(name, &b);
		}
		if (r == KUP_E_NOENT) {
			ops = &kup_backend_sim;
			r = ops->open(name, &b);
		}
	}
	if (r != KUP_E_OK) {
		int e = errno;
		free(d);
		errno = e;
		return fail_null(NULL, r);
	}
	d->h.magic = KP_MAGIC_DEV;
	d->ops = ops;
	d->b = b;
	pthread_mutex_init(&d->mu, NULL);
	return d;
}

int
kernproxy_info(void *handle, struct kernproxy_info *info)
{
	struct kp_dev *d = as_dev(handle);
	int r;

	if (d == NULL)
		return -1;
	if (info == NULL)
		return fail(&d->h, KUP_E_INVAL);
	pthread_mutex_lock(&d->mu);
	if (d->ops->dev_drain != NULL)
		d->ops->dev_drain(d->b);
	r = d->ops->info(d->b, info);
	pthread_mutex_unlock(&d->mu);
	if (r != KUP_E_OK)
		return fail(&d->h, r);
	return 0;
}

int
kernproxy_dev_fd(void *handle)
{
	struct kp_dev *d = as_dev(handle);
	int fd;

	if (d == NULL)
		return -1;
	pthread_mutex_lock(&d->mu);
	fd = d->ops->dev_fd(d->b);
	pthread_mutex_unlock(&d->mu);
	if (fd < 0)   /* ESHUTDOWN: the device (kupsim) has gone */
		return fail(&d->h, errno == ESHUTDOWN ? KUP_E_SHUTDOWN : KUP_E_SYS);
	return fd;
}

/* ---- attach ----------------------------------------------------------- */

static int
test_abi_version(void)
{
	const char *v = getenv("KUP_TEST_ABI_VERSION");
	char *end;
	unsigned long x;

	if (v == NULL || *v == '\0')
		return (int)KUP_ABI_VERSION;
	errno = 0;
	x = strtoul(v, &end, 10);
	if (errno != 0 || *end != '\0' || x > 0xffffffffUL)
		return (int)KUP_ABI_VERSION;
	return (int)x;
}

/* Check the identity the kernel wrote, against the mapping we really
 * have; keep private copies of the geometry. */
static int
check_identity(struct kp_chan *c)
{
	const struct kup_ctrl *k = c->ctrl;
	uint64_t bytes = c->b.bytes;
	uint32_t psz, k2u_off, k2u_size, u2k_off, u2k_size;
	size_t i;

	if (bytes < KUP_CTRL_SIZE)
		return KUP_E_VERSION;
	if (READ32(&k->magic) != KUP_MAGIC ||
	    READ32(&k->abi_version) != KUP_ABI_VERSION ||
	    READ32(&k->ctrl_size) != KUP_CTRL_SIZE)
		return KUP_E_VERSION;
	for (i = 0; i < sizeof(k->reserved0) / sizeof(k->reserved0[0]); i++)
		if (READ32(&k->reserved0[i]) != 0)
			return KUP_E_VERSION;
	for (i = 0; i < sizeof(k->reserved1) / sizeof(k->reserved1[0]); i++)
		if (READ32(&k->reserved1[i]) != 0)
			return KUP_E_VERSION;
	for (i = 0; i < sizeof(k->reserved2) / sizeof(k->reserved2[0]); i++)
		if (READ32(&k->reserved2[i]) != 0)
			return KUP_E_VERSION;
	for (i = 0; i < sizeof(k->reserved3) / sizeof(k->reserved3[0]); i++)
		if (READ32(&k->reserved3[i]) != 0)
			return KUP_E_VERSION;
	psz = READ32(&k->page_size);
	k2u_off = READ32(&k->k2u_off);
	k2u_size = READ32(&k->k2u_size);
	u2k_off = READ32(&k->u2k_off);
	u2k_size = READ32(&k->u2k_size);
	if (psz < KUP_CTRL_SIZE || (psz & (psz - 1)) != 0)
		return KUP_E_PROTO;
	if (k2u_off < KUP_CTRL_SIZE || (uint64_t)k2u_off + k2u_size > bytes ||
	    u2k_off < (uint64_t)k2u_off + k2u_size ||
	    (uint64_t)u2k_off + u2k_size > bytes || k2u_size == 0 ||
	    u2k_size == 0)
		return KUP_E_PROTO;
	if (READ32(&k->chan_id) != c->b.chan_id)
		return KUP_E_PROTO;
	c->k2u_size = k2u_size;
	c->u2k_size = u2k_size;
	c->k2u = (uint8_t *)c->b.mem + k2u_off;
	c->u2k = (uint8_t *)c->b.mem + u2k_off;
	c->gen = READ64(&k->attach_gen);
	if (READ32(&k->state) & KUP_STATE_SHUTDOWN)
		return KUP_E_SHUTDOWN;
	return KUP_E_OK;
}

void *
kernproxy_channel(void *handle, size_t chan_id, size_t size)
{
	struct kp_dev *d = as_dev(handle);
	struct kp_chan *c;
	uint32_t id;
	int r;

	if (d == NULL)
		return NULL;
	if (chan_id == KP_CHAN_ANY)
		id = KUP_CHAN_ANY_WIRE;
	else if (chan_id >= KUP_MAX_CHANNELS)
		return fail_null(&d->h, KUP_E_NOENT);
	else
		id = (uint32_t)chan_id;
	if (size > KUP_MAX_PAGES)
		return fail_null(&d->h, KUP_E_INVAL);
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return fail_null(&d->h, KUP_E_SYS);
	c->ops = d->ops;
	r = d->ops->attach(d->b, id, (uint32_t)test_abi_version(),
	    (uint32_t)size, &c->b);
	if (r != KUP_E_OK) {
		free(c);
		return fail_null(&d->h, r);
	}
	c->ctrl = c->b.mem;
	c->id = c->b.chan_id;
	r = check_identity(c);
	if (r != KUP_E_OK) {
		c->ops->detach(&c->b);
		free(c);
		return fail_null(&d->h, r);
	}
	c->uturn = UT_KERNEL;
	c->spin_avg_ns = KP_SPIN_INIT_NS;
	c->h.magic = KP_MAGIC_CHAN;
	__atomic_store_n(&d->h.err, KUP_E_OK, __ATOMIC_RELAXED);
	return c;
}

/* ---- the turn protocol ------------------------------------------------- */

static int
chan_state(struct kp_chan *c)
{
	uint32_t st = READ32(&c->ctrl->state);

	if ((st & KUP_STATE_SHUTDOWN) || c->host_gone)
		return KUP_E_SHUTDOWN;
	if (c->broken)
		return KUP_E_PROTO;
	if (READ64(&c->ctrl->attach_gen) != c->gen || (st & KUP_STATE_PEER_GONE))
		return KUP_E_PEER;
	return KUP_E_OK;
}

/* The page says the kernel handed us the turn: take its descriptor, read
 * once, validated against the private size and the sequence.  keep_data:
 * leave a DATA message where it is (EKU_NOTTURN), judged by the same read
 * of kind as the take (a kernel side rewriting it meanwhile must not get a
 * kept message dropped). */
static int
take_kernel_msg(struct kp_chan *c, struct kernproxy_msg *msg, int keep_data)
{
	uint32_t len = READ32(&c->ctrl->k2u.len);
	uint32_t kind = READ32(&c->ctrl->k2u.kind);
	uint64_t seq = READ64(&c->ctrl->k2u.seq);

	if (keep_data && kind == KUP_KIND_DATA)
		return KUP_E_NOTTURN;
	if ((kind != KUP_KIND_DATA && kind != KUP_KIND_PASS &&
	    kind != KUP_KIND_CLOSE) || len > c->k2u_size ||
	    (kind != KUP_KIND_DATA && len != 0) || seq != c->k2u_seq + 1) {
		c->broken = 1;
		return KUP_E_PROTO;
	}
	c->k2u_seq = seq;
	c->uturn = UT_USER_CONSUMED;
	if (msg != NULL) {
		msg->data = c->k2u;
		msg->len = len;
		msg->kind = kind;
		msg->seq = seq;
	}
	return KUP_E_OK;
}

/* kup_backend.h: the monotonic clock in ms, for this file and the backends */
int64_t
kup_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Spin for the channel's budget.  1 when the turn came back meanwhile. */
static int
spin_turn(struct kp_chan *c, uint64_t t0)
{
	uint64_t budget = 2ULL * c->spin_avg_ns, now;
#if KP_SPIN_YIELD_NS > 0
	uint64_t ynext = t0 + (c->yield_now ? 0 : KP_SPIN_YIELD_NS), after;
#endif
	int i;

	if (budget < KP_SPIN_MIN_NS)
		budget = KP_SPIN_MIN_NS;
	if (budget > KP_SPIN_MAX_NS)
		budget = KP_SPIN_MAX_NS;
	for (;;) {
		for (i = 0; i < KP_SPIN_CHECK; i++) {
			if (LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL)
				return 1;
			CPU_RELAX();
		}
		now = now_ns();
		if (now - t0 >= budget)
			return 0;
#if KP_SPIN_YIELD_NS > 0
		/* The kernel side may be waiting for this very CPU.  A yield
		 * that took long let another thread run here: we share the CPU
		 * (likely with the kernel thread), so yield at every check from
		 * now on, also in later waits, until a yield comes straight
		 * back.  (User and kupsim pinned to one CPU, same run: C
		 * round trip 6.5 us without yields, 4.1 us with.) */
		if (now >= ynext) {
			sched_yield();
			after = now_ns();
			c->yield_now = after - now >= KP_SPIN_YIELD_NS;
			ynext = after + (c->yield_now ? 0 : KP_SPIN_YIELD_NS);
		}
#endif
	}
}

/* A wait that started at t0 ended now: feed the running average. */
static void
spin_learn(struct kp_chan *c, uint64_t t0)
{
	uint64_t took = now_ns() - t0;
	int64_t sample = took <= KP_SPIN_MAX_NS ? (int64_t)took : 0;
	int64_t avg = (int64_t)c->spin_avg_ns;

	avg += (sample - avg) / 8;
	c->spin_avg_ns = (uint32_t)(avg < 0 ? 0 : avg);
}

/* The turn came back: a spin-only receive that missed it earlier learns
 * now how long the wait really took (at least its budget; a wait beyond
 * what a spin can catch counts as 0, as always). */
static void
learn_late(struct kp_chan *c)
{
	if (c->learn_pending) {
		c->learn_pending = 0;
		spin_learn(c, c->learn_t0);
	}
}

/* Wait until the page turn is not KERNEL.  KUP_E_OK, or an error.
 * spin_only: spin for the budget, then KUP_E_NOTREADY; never sleep. */
/* After a KP_SPIN_NEXT send (poll mode): ask for the kernel's wake-up
 * again, then look at the turn (the kernel stores the turn, fences, then
 * reads user_waiting: one of the two sides sees the other). */
static void
unquiet(struct kp_chan *c)
{
	c->quiet = 0;
	WRITE32(&c->ctrl->user_waiting, 1);
	FENCE();
}

/* quiet: the hand-over was made with user_waiting 0 (poll mode, a
 * KP_SPIN_NEXT send).  A spin-only wait spins with it 0, so a reply caught
 * by the spin costs the kernel no wake-up and leaves no late one on the fd;
 * on a miss it sets user_waiting again and looks once more.  Any other
 * wait sets it first. */
static int
wait_turn(struct kp_chan *c, int timeout_ms, int spin_only, int quiet)
{
	int64_t deadline = timeout_ms > 0 ? kup_now_ms() + timeout_ms : 0;
	uint64_t t0;
	int r;

	if (quiet && !spin_only) {
		unquiet(c);
		quiet = 0;
	}
	if (LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL) {
		/* quiet: keep user_waiting 0 while we hold the turn (setting
		 * it now could still draw a late wake-up for this hand-over);
		 * the next hand-over sets it again */
		learn_late(c);
		return KUP_E_OK;
	}
	if (quiet && (r = chan_state(c)) != KUP_E_OK) {
		unquiet(c);
		return r;
	}
	if ((r = chan_state(c)) != KUP_E_OK)
		return r;
	if (timeout_ms == 0 && !spin_only)
		return KUP_E_NOTREADY;
	t0 = c->learn_pending ? c->learn_t0 : now_ns();
	c->learn_pending = 0;
	if (spin_turn(c, t0)) {
		spin_learn(c, t0);
		return KUP_E_OK;
	}
	if (quiet) {
		unquiet(c);
		if (LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL) {
			spin_learn(c, t0);
			return KUP_E_OK;
		}
	}
	if (spin_only) {
		c->learn_pending = 1;
		c->learn_t0 = t0;
		return KUP_E_NOTREADY;
	}
	for (;;) {
		struct pollfd pf[2];
		int slice = KP_SLEEP_SLICE_MS, n = 1;

		WRITE32(&c->ctrl->user_waiting, 1);
		FENCE();
		if (LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL) {
			r = KUP_E_OK;
			break;
		}
		if ((r = chan_state(c)) != KUP_E_OK)
			break;
		if (timeout_ms > 0) {
			int64_t left = deadline - kup_now_ms();
			if (left <= 0) {
				r = KUP_E_TIMEDOUT;
				break;
			}
			if (left < slice)
				slice = (int)left;
		}
		pf[0].fd = c->b.wait_fd;
		pf[0].events = POLLIN;
		pf[0].revents = 0;
		if (c->b.hup_fd >= 0) {
			pf[1].fd = c->b.hup_fd;
			pf[1].events = 0;
			pf[1].revents = 0;
			n = 2;
		}
		if (poll(pf, (nfds_t)n, slice) < 0 && errno != EINTR) {
			r = KUP_E_SYS;
			break;
		}
		(void)c->ops->drain(&c->b);
		if (n == 2 && (pf[1].revents & (POLLHUP | POLLERR | POLLNVAL))) {
			/* the host is gone without a word: shutdown, for good */
			c->host_gone = 1;
			r = KUP_E_SHUTDOWN;
			break;
		}
	}
	if (!c->poll_mode)
		WRITE32(&c->ctrl->user_waiting, 0);
	if (r == KUP_E_OK)
		spin_learn(c, t0);
	return r;
}

/* Wake the kernel side (it set kernel_waiting); a wake-up interrupted by a
 * signal is made again at once.  KUP_E_OK or the backend's error (errno
 * set for KUP_E_SYS). */
static int
wake_kernel(struct kp_chan *c)
{
	int r, tries = 0;

	do
		r = c->ops->wake(&c->b);
	while (r == KUP_E_SYS && errno == EINTR && ++tries < KP_WAKE_TRIES);
	return r;
}

/* The wake-up a hand-over could not make (handover): make it now, unless
 * it is no longer needed -- the kernel side handed the turn back (it woke),
 * or it is not waiting (it finds the turn when it next looks: it sets
 * kernel_waiting, fences and looks at the turn before it sleeps, as we
 * store the turn, fence and read kernel_waiting).  KUP_E_OK, or the
 * wake-up's error, still owed (the next call tries again). */
static int
pay_owed_wake(struct kp_chan *c)
{
	int r;

	if (!c->wake_owed)
		return KUP_E_OK;
	if (LOAD_ACQ32(&c->ctrl->turn) == KUP_TURN_KERNEL &&
	    READ32(&c->ctrl->kernel_waiting) != 0 &&
	    (r = wake_kernel(c)) != KUP_E_OK)
		return r;
	c->wake_owed = 0;
	return KUP_E_OK;
}

/* The kernel side handed us a message that we have not taken yet, on this
 * attachment's page: readable even once the device is shutting down (the
 * kernel sent it before its unload; nothing sent is lost).  The page stays
 * mapped until we close the channel. */
static int
unread_after_shutdown(struct kp_chan *c)
{
	return c->uturn == UT_KERNEL && !c->broken &&
	    READ64(&c->ctrl->attach_gen) == c->gen &&
	    LOAD_ACQ32(&c->ctrl->turn) == KUP_TURN_USER;
}

static int
receive_common(void *chan, struct kernproxy_msg *msg, int timeout_ms,
    int spin_only)
{
	struct kp_chan *c = as_chan(chan);
	uint32_t turn;
	int r, quiet, woke = 0, looked;

	if (c == NULL)
		return -1;
	/* kup.h defines -1 (forever), 0 and > 0 only: any other negative
	 * value would wait forever, which a caller who computed a deadline
	 * that has passed (or overflowed) never meant */
	if (msg == NULL || timeout_ms < -1)
		return fail(&c->h, KUP_E_INVAL);
	quiet = c->quiet;
	/* poll mode: consume the wake-ups that made the fd readable before
	 * looking at anything (a later hand-over wakes us again), so that the
	 * fd does not stay readable after a spurious or late wake-up, whatever
	 * this call answers (an event loop would spin otherwise) */
	if (c->poll_mode)
		woke = c->ops->drain(&c->b);
	if ((r = chan_state(c)) != KUP_E_OK &&
	    !(r == KUP_E_SHUTDOWN && unread_after_shutdown(c))) {
		if (quiet)
			unquiet(c);
		return fail(&c->h, r);
	}
	if (c->uturn == UT_USER_CONSUMED)
		return fail(&c->h, KUP_E_NOTTURN);
	/* a wake-up our last hand-over owes the kernel: made before we wait
	 * for an answer it would never give without it; when it fails again,
	 * say so instead of waiting (the message stays the kernel's) */
	if ((r = pay_owed_wake(c)) != KUP_E_OK) {
		if (quiet)
			unquiet(c);
		return fail(&c->h, r);
	}
	/* the turn already ours before any wait: the wake-up drained above
	 * was (all but always) this hand-over's own */
	looked = LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL;
	r = wait_turn(c, timeout_ms, spin_only, quiet);
	/* still quiet only after a hit with user_waiting 0: no wake-up was
	 * asked for this hand-over, none can come late */
	quiet = c->quiet;
	c->quiet = 0;
	if (r != KUP_E_OK)
		return fail(&c->h, r);
	turn = LOAD_ACQ32(&c->ctrl->turn);
	if (turn != KUP_TURN_USER) {
		c->broken = 1;
		return fail(&c->h, KUP_E_PROTO);
	}
	r = take_kernel_msg(c, msg, 0);
	if (r != KUP_E_OK)
		return fail(&c->h, r);
	/* poll mode: a wake-up for this hand-over may land after the drain
	 * above; none can come for a later one before we hand over again.
	 * Not needed when that drain took one and the turn was already ours:
	 * the kernel writes the wake-up after storing the turn, so the one
	 * drained is this hand-over's, but for a late one of the hand-over
	 * before (landing after its receive's drain) -- then this one is
	 * still to come, and costs the loop one spurious wake-up, which the
	 * page-is-the-truth rule makes harmless.  The common case, an event
	 * loop woken by the fd, saves a read(2) per message. */
	if (c->poll_mode && !quiet && !(woke && looked))
		(void)c->ops->drain(&c->b);
	c->h.err = KUP_E_OK;
	return 0;
}

int
kernproxy_receive_msg(void *chan, struct kernproxy_msg *msg, int timeout_ms)
{
	return receive_common(chan, msg, timeout_ms, 0);
}

int
kernproxy_receive_spin(void *chan, struct kernproxy_msg *msg)
{
	return receive_common(chan, msg, 0, 1);
}

void *
kernproxy_receive(void *chan, int flags)
{
	struct kernproxy_msg m;

	if (kernproxy_receive_msg(chan, &m, (flags & KP_NB) ? 0 : -1) != 0)
		return NULL;
	return (void *)(uintptr_t)m.data;
}

/* Make sure we hold the turn; an unread kernel message is validated and
 * dropped (the caller chose to answer without reading it) -- unless it
 * carries data and the channel keeps unread messages (EKU_NOTTURN, the
 * message left for a receive: kernproxy_keep_unread). */
static int
own_turn(struct kp_chan *c)
{
	uint32_t turn;

	if (c->uturn == UT_USER_CONSUMED)
		return KUP_E_OK;
	turn = LOAD_ACQ32(&c->ctrl->turn);
	if (turn == KUP_TURN_KERNEL)
		return KUP_E_NOTTURN;
	if (turn != KUP_TURN_USER) {
		c->broken = 1;
		return KUP_E_PROTO;
	}
	return take_kernel_msg(c, NULL, c->keep_unread);
}

static int
handover(struct kp_chan *c, const void *data, size_t len, uint32_t kind,
    int quiet)
{
	int r;

	if ((r = chan_state(c)) != KUP_E_OK)
		return r;
	if ((r = own_turn(c)) != KUP_E_OK)
		return r;
	/* the kernel handed the turn back: it woke, nothing is owed */
	c->wake_owed = 0;
	if (len != 0)
		memcpy(c->u2k, data, len);
	c->u2k_seq++;
	WRITE32(&c->ctrl->u2k.len, (uint32_t)len);
	WRITE32(&c->ctrl->u2k.kind, kind);
	WRITE64(&c->ctrl->u2k.seq, c->u2k_seq);
	c->uturn = UT_KERNEL;
	c->learn_pending = 0;
	c->quiet = quiet && c->poll_mode;
	if (c->poll_mode)
		WRITE32(&c->ctrl->user_waiting, c->quiet ? 0 : 1);
	STORE_REL32(&c->ctrl->turn, KUP_TURN_KERNEL);
	FENCE();
	/* From here on the message is the kernel's: delivered, whatever the
	 * wake-up below does.  Failing the send now would tell the caller it
	 * was not sent -- and a caller that sends it again would have it
	 * twice, or (the kernel still holding the turn) get EKU_NOTTURN for a
	 * message it believes lost.  A wake-up that fails is owed instead: the
	 * next receive makes it again before it waits and reports the error
	 * if it fails again (kup.h, kernproxy_send); an event loop waiting on
	 * kernproxy_fd() is woken for that receive. */
	if (READ32(&c->ctrl->kernel_waiting) != 0 &&
	    wake_kernel(c) != KUP_E_OK) {
		c->wake_owed = 1;
		if (c->poll_mode && c->ops->self_wake != NULL)
			(void)c->ops->self_wake(&c->b);
	}
	return KUP_E_OK;
}

int
kernproxy_send(void *chan, const void *data, size_t len, int flags)
{
	struct kp_chan *c = as_chan(chan);
	int r;

	if (c == NULL)
		return -1;
	if (len != 0 && data == NULL)
		return fail(&c->h, KUP_E_INVAL);
	if (len > c->u2k_size)
		return fail(&c->h, KUP_E_TOOBIG);
	r = handover(c, data, len, KUP_KIND_DATA, (flags & KP_SPIN_NEXT) != 0);
	if (r != KUP_E_OK)
		return fail(&c->h, r);
	c->h.err = KUP_E_OK;
	return 0;
}

int
kernproxy_pass(void *chan)
{
	struct kp_chan *c = as_chan(chan);
	int r;

	if (c == NULL)
		return -1;
	r = handover(c, NULL, 0, KUP_KIND_PASS, 0);
	if (r != KUP_E_OK)
		return fail(&c->h, r);
	c->h.err = KUP_E_OK;
	return 0;
}

int
kernproxy_fd(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return -1;
	/* from now on the kernel always wakes us on a hand-over; a hand-over
	 * (or shutdown) that came before gets its wake-up from us */
	if (!c->poll_mode) {
		c->poll_mode = 1;
		WRITE32(&c->ctrl->user_waiting, 1);
		FENCE();
		if ((LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_KERNEL ||
		    chan_state(c) != KUP_E_OK || c->wake_owed) &&
		    c->ops->self_wake != NULL &&
		    c->ops->self_wake(&c->b) != KUP_E_OK)
			return fail(&c->h, KUP_E_SYS);
	}
	return c->b.wait_fd;
}

int
kernproxy_my_turn(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return -1;
	if (c->uturn == UT_USER_CONSUMED)
		return 1;
	return LOAD_ACQ32(&c->ctrl->turn) == KUP_TURN_USER ? 1 : 0;
}

int
kernproxy_unread(void *chan)
{
	struct kp_chan *c = as_chan(chan);
	uint32_t kind;

	if (c == NULL)
		return -1;
	if (c->uturn == UT_USER_CONSUMED ||
	    LOAD_ACQ32(&c->ctrl->turn) != KUP_TURN_USER)
		return 0;
	/* read once; a bad kind is the take's to report (EKU_PROTO) */
	kind = READ32(&c->ctrl->k2u.kind);
	return (kind == KUP_KIND_DATA || kind == KUP_KIND_PASS ||
	    kind == KUP_KIND_CLOSE) ? (int)kind : 0;
}

int
kernproxy_state(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return -1;
	return chan_state(c);
}

int
kernproxy_keep_unread(void *chan, int on)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return -1;
	c->keep_unread = on != 0;
	return 0;
}

size_t
kernproxy_max_msg(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	return c != NULL ? c->u2k_size : 0;
}

uint32_t
kernproxy_chan_id(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	return c != NULL ? c->id : 0xffffffffU;
}

void
kernproxy_close(void *handle)
{
	struct kp_hdr *h = handle;

	if (h == NULL)
		return;
	if (h->magic == KP_MAGIC_CHAN) {
		struct kp_chan *c = handle;

		/* leave politely if we can: CLOSE when holding the turn */
		if (chan_state(c) == KUP_E_OK && own_turn(c) == KUP_E_OK)
			(void)handover(c, NULL, 0, KUP_KIND_CLOSE, 0);
		c->ops->detach(&c->b);
		c->h.magic = KP_MAGIC_DEAD;
		free(c);
	} else if (h->magic == KP_MAGIC_DEV) {
		struct kp_dev *d = handle;

		d->ops->close(d->b);
		d->h.magic = KP_MAGIC_DEAD;
		pthread_mutex_destroy(&d->mu);
		free(d);
	} else {
		kernproxy_errno = KUP_E_INVAL;
	}
}

int
kernproxy_error(void *handle)
{
	struct kp_hdr *h = handle;

	if (h == NULL || (h->magic != KP_MAGIC_CHAN && h->magic != KP_MAGIC_DEV))
		return kernproxy_errno;
	return __atomic_load_n(&h->err, __ATOMIC_RELAXED);
}

const char *
kernproxy_strerror(int code)
{
	switch (code) {
	case KUP_E_OK:       return "success";
	case KUP_E_SHUTDOWN: return "EKU_SHUTDOWN: the device is shutting down";
	case KUP_E_NOTREADY: return "EKU_NOTREADY: not ready";
	case KUP_E_NOTTURN:  return "EKU_NOTTURN: the turn is on the wrong side for this operation";
	case KUP_E_TOOBIG:   return "EKU_TOOBIG: message larger than the data area";
	case KUP_E_TIMEDOUT: return "EKU_TIMEDOUT: deadline passed";
	case KUP_E_PROTO:    return "EKU_PROTO: the peer broke the protocol";
	case KUP_E_VERSION:  return "EKU_VERSION: ABI version mismatch";
	case KUP_E_BUSY:     return "EKU_BUSY: channel held by another user";
	case KUP_E_NOENT:    return "EKU_NOENT: no such device or channel";
	case KUP_E_PEER:     return "EKU_PEER: the peer left or ended the session";
	case KUP_E_INVAL:    return "EKU_INVAL: bad argument";
	case KUP_E_SYS:      return "EKU_SYS: system call failed (see errno)";
	case KUP_E_RELEASING:
		return "EKU_RELEASING: the channel's last user left and its kernel side "
		    "has not let go of it yet; retry shortly";
	default:             return "unknown KUP error";
	}
}

/* ---- test-only hooks --------------------------------------------------- */

void *
kup_test_raw_mapping(void *chan, size_t *bytes)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return NULL;
	if (bytes != NULL)
		*bytes = c->b.bytes;
	return c->b.mem;
}

int
kup_test_raw_wake(void *chan)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL)
		return -1;
	return c->ops->wake(&c->b) == KUP_E_OK ? 0 : -1;
}

int
kup_test_fail_wakes(void *chan, unsigned int n, int err)
{
	struct kp_chan *c = as_chan(chan);

	if (c == NULL || c->ops != &kup_backend_sim)
		return -1;
	kup_sim_test_fail_wakes(&c->b, n, err);
	return 0;
}
