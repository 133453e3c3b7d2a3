/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * echo.c -- example KUP kernel module, one source for every host.
 *
 * Device "echo" (ECHO_NAME) with `channels` channels (default 128) of
 * `pages` pages per direction (default 1).  Parameters: kupsim reads
 * KUP_PARAM_ECHO_CHANNELS / KUP_PARAM_ECHO_PAGES (for the rot13 build:
 * KUP_PARAM_ROT13_*).  `announce_delay_ms` (default 0) announces the
 * channels that long after init instead of at once, from a thread (lets
 * tests see EKU_NOTREADY and the announce event).  `start_delay_ms`
 * (default 0, at most 10000) makes a newly started worker sleep that long
 * before its first call: a slow thread start on a loaded machine, made
 * certain, so that a test can attach, leave and attach again before the
 * worker's first call (tests/kmod/test_kupsim_echo_acceptor.py).
 *
 * What it does with a channel, once a user attaches it:
 *   - hands the turn to the user at once (PASS), so the user's first
 *     receive returns a PASS and it may send;
 *   - every DATA message is answered with one DATA message of the same
 *     length, transformed by channel:
 *         even channel id: unchanged (echo)
 *         odd channel id:  ASCII a-z upper-cased
 *     (the rot13 build, -DECHO_ROT13: every channel rot13s ASCII letters);
 *     even channels copy with memcpy, odd ones transform 8 bytes at a
 *     time, so large messages cost what the copy costs;
 *     a message starting with "!delay" is answered after 300 ms (lets a
 *     test observe the kernel holding the turn); a message starting with
 *     "!hold" is never answered: the kernel keeps the turn until the user
 *     leaves or the device unloads (an idle channel for tests);
 *     a message starting with "!reenter" makes the worker call send and
 *     receive on the channel it still holds (a module bug on purpose):
 *     the answer is "!reenter ok" when the core refused both with
 *     -EDEADLK, "!reenter bad" otherwise;
 *     a message starting with "!lockhold" and optional decimal digits N
 *     (milliseconds, default 10000, at most 60000) makes the worker keep
 *     the channel locked -- between its receive and kupdev_unlock_channel,
 *     as a module computing a long reply does -- until "!lockfree" arrives
 *     on another channel of the device, N ms have passed, or the module
 *     unloads; then it unlocks and answers as an even/odd channel does.
 *     It logs "echo: chan N: holding the channel locked" when the hold
 *     starts and "echo: chan N: lock hold ended (released|timed out|
 *     unloading)" when it ends, so a test can tell what the host did
 *     while the module held the channel (kupsim's server must go on
 *     serving every other request; tests/kmod/
 *     test_kupsim_renew_nonblocking.py); "!lockfree" is answered like any
 *     DATA message;
 *     a message of at least 16 bytes starting with "!stamp" and optional
 *     decimal digits N (milliseconds, default 1000, at most 10000) is
 *     answered N ms later, its last 8 bytes replaced by kup_os_now_ns()
 *     (host byte order) read just before the hand-over: the user's clock
 *     at its receive minus that stamp is how long a message arriving on
 *     an idle channel takes to reach it (the benchmark's wake-up figure);
 *     a message starting with "!relay" and decimal digits C makes the
 *     worker forward that very message, still holding it (zero copy), to
 *     channel C of the device, then unlock and answer "!relay R", R what
 *     kupdev_send returned: 0 when C's user got it, -EAGAIN / -EBUSY at
 *     once when another thread is in channel C (its worker waiting in its
 *     receive, or holding a message -- e.g. relaying to this channel:
 *     kupdev.h, "Conventions"), -EPIPE when C has no session, -EINVAL
 *     (logged) for no such channel;
 *     a message starting with "!count" and optional decimal digits N
 *     (milliseconds, default 0, at most 100) is answered with the text
 *     "!count K prev C" (not the same length): K counts the "!count"
 *     messages of every channel of the device since it loaded, C is the
 *     channel of the one before (-1: none) -- state all the workers share,
 *     read, then (after sleeping N ms: a long critical section, so that a
 *     test sees the mutex at work) updated under one kup_mutex, and
 *     formatted with kup_os_snprintf: the pattern of a module that keeps
 *     state across channels;
 *     a message starting with "!oversize" and optional decimal digits N
 *     (milliseconds, default 0, at most 10000) is answered N ms later
 *     (slept, not watching the user) with one byte more than the channel
 *     holds: kupdev_send refuses it (-EMSGSIZE, nothing sent, logged) and
 *     the session ends there, on an error that does not end it for the
 *     core -- a module bug on purpose, the worker giving up on a user
 *     whose session is not over (echo_serve says what the next session's
 *     first call makes of it).  It logs "echo: chan N: oversize reply in
 *     N ms" once it has taken the message (so that a test knows when the
 *     user may leave) and "echo: chan N: oversize reply: -90" (what the
 *     send returned) after, on a log budget of their own;
 *     a message starting with "!kick" and optional decimal digits N
 *     (milliseconds, default 0, at most 10000) is never answered: N ms
 *     later (slept, so that the user is by then waiting for the answer)
 *     the worker ends the user's session with kupdev_disconnect -- the
 *     user's receive fails with EKU_PEER (kupd: PeerGone) and the channel
 *     is attachable again once it lets go; logs "echo: chan N:
 *     disconnected the user (R)", R what kupdev_disconnect returned (0);
 *     a message starting with "!wake" and optional decimal digits N
 *     (milliseconds, default 50, at most 10000) is answered at once with
 *     "!wake armed"; then a helper thread calls kupdev_wake_channel on the
 *     channel N ms later, while the worker waits in its receive for the
 *     user's next message: that receive returns -ECANCELED (logged:
 *     "echo: chan N: receive woken (-125) while waiting"), the worker
 *     waits again, and answers the user's next message, whatever it is,
 *     with "!wake R" (R: -125 when the wake reached a waiting receive or,
 *     when the user's message came first, the receive after it: "echo:
 *     chan N: receive woken (-125) after a message");
 *   - PASS is answered with PASS;
 *   - CLOSE: the user is leaving; the worker stops;
 *   - -EPIPE (user left or died), -EPROTO (user broke the protocol): the
 *     worker logs it and its session ends; the channel is attachable
 *     again.  The worker then stops, or, when the next user attached
 *     meanwhile, serves that one (struct echo_slot says why the acceptor
 *     never waits for a running worker);
 *   - any other error (a reply that failed, a receive that failed): the
 *     worker logs it and gives up on the session, which the core does not
 *     count as ended; the channel's next session starts all the same
 *     (echo_serve);
 *   - -ECANCELED (a kupdev_wake_channel nobody asked for, which echo
 *     never makes but for "!wake"): the worker waits again;
 *   - -ESHUTDOWN: module unload, everything stops.
 * Log lines (kupsim: stderr) "echo: chan N: ..." make the kernel side
 * observable to tests.  The ones a user can cause at will (a session's
 * end, a failed first pass, the "!lockhold" lines) are rate-limited with
 * kup_log_limited (kup_module.h): the first ECHO_LOG_BURST of a burst are
 * logged, then that many per ECHO_LOG_WINDOW_MS at most (lock holds:
 * ECHO_LOCKHOLD_LOG_BURST), with a line saying how many were left out.
 *
 * Threads: one acceptor in kupdev_wait_channel(), at most one worker per
 * channel, serving its sessions one after the other.  Only kupdev.h and kup_module.h are used.
 *
 * "any" mode (parameter `any` = 1; kupsim: KUP_PARAM_ECHO_ANY=1, Linux:
 * kup.params=echo.any=1): no worker threads; ONE thread serves every
 * channel with kupdev_receive_any (echo_any_server).  The acceptor only
 * flags the channel it was told about ("fresh") and calls
 * kupdev_wake_any; the server makes each fresh channel's first pass (with
 * the one retry of kupdev.h, "Sessions") and adds it to its set, answers
 * DATA and PASS as above (plain echo / upper-case / rot13: none of the
 * "!" commands, which sleep or hold the channel, and would stall every
 * other channel of a one-thread server), and takes a channel out of its
 * set when its session ends (-EPIPE, -EPROTO, CLOSE, a failed reply).
 * Log lines: "echo: any: serving N channels" when the set grows, and the
 * session lines of the worker mode ("echo: chan N: peer gone (-EPIPE)").
 */
#include "kup_module.h"

#ifndef ECHO_NAME
#define ECHO_NAME "echo"
#endif
#ifndef ECHO_PARAM
#define ECHO_PARAM "echo"
#endif

#define ECHO_DELAY_MS 300

#define ECHO_LOCKHOLD_DEFAULT 10000U
#define ECHO_LOCKHOLD_MAX_MS  60000U

/* "!lockfree" messages seen (any channel) and the module unloading: read
 * by a worker holding its channel locked ("!lockhold") every 20 ms */
static unsigned int echo_lockfree_gen;
static int echo_unloading;

/* "!count": the device's count and the channel of the last one, read and
 * updated together by any channel's worker -- the two under one mutex */
static struct kup_mutex *echo_count_mtx;
static unsigned long echo_count;
static int echo_count_prev = -1;

/*
 * One slot per channel.  Why running/again and not "join the old worker,
 * start a new one" in the acceptor: a worker may serve a session the
 * acceptor has not heard of yet.  A worker started for attachment A whose
 * user left before the worker's first call serves the NEXT attachment B
 * with that call (kupdev.h, "Sessions"); when the acceptor then hears of
 * B, joining that worker would wait for as long as B's user stays, and the
 * one acceptor would serve no other channel meanwhile.  So the acceptor
 * never waits for a running worker: it flags "again", and the worker,
 * once its session is over, serves the next one instead of exiting.
 */
struct echo_slot {
	int               chan;
	unsigned char    *buf;
	struct kup_thread *thr;      /* the acceptor's (and fini's) only */
	int               running;   /* echo_slot_mtx: thr has not decided to exit */
	int               again;     /* echo_slot_mtx: an attach came while running */
	unsigned int      wake_ms;   /* "!wake": the helper's delay */
	int               fresh;     /* "any" mode, echo_slot_mtx: an attachment
	                              * the server has not started yet */
	int               in_set;    /* "any" mode, the server's: in its set */
};

/* Per-session log lines (a session's end, a failed first pass, ...) and the
 * "!lockhold" lines: a user decides how many sessions and messages there
 * are, so these go through limiters (kup_module.h): the first
 * ECHO_LOG_BURST lines of a burst, then at most that many per
 * ECHO_LOG_WINDOW_MS, each kind on its own budget so that a flood of one
 * does not hide the other. */
#define ECHO_LOG_BURST     20U
#define ECHO_LOG_WINDOW_MS 5000U
/* tests wait for the "holding the channel locked" line before they end a
 * hold: a larger budget, so that no test that holds a few times a second
 * ever misses it, still bounding a user's "!lockhold1" loop */
#define ECHO_LOCKHOLD_LOG_BURST 100U
static struct kup_ratelimit echo_session_rl =
    KUP_RATELIMIT_INIT("echo", ECHO_LOG_BURST, ECHO_LOG_WINDOW_MS);
static struct kup_ratelimit echo_lockhold_rl =
    KUP_RATELIMIT_INIT("echo (lock holds)", ECHO_LOCKHOLD_LOG_BURST,
	ECHO_LOG_WINDOW_MS);
/* "!oversize": tests wait for its lines too, also after a burst of session
 * ends has used up echo_session_rl -- the same budget as lock holds */
static struct kup_ratelimit echo_oversize_rl =
    KUP_RATELIMIT_INIT("echo (oversize replies)", ECHO_LOCKHOLD_LOG_BURST,
	ECHO_LOG_WINDOW_MS);
/* "!kick" and "!wake": tests wait for their lines too, whatever the
 * sessions before them logged -- a budget of their own */
static struct kup_ratelimit echo_trigger_rl =
    KUP_RATELIMIT_INIT("echo (kick and wake)", ECHO_LOCKHOLD_LOG_BURST,
	ECHO_LOG_WINDOW_MS);

static struct kupdev_softc *echo_sc;
static struct kup_mutex *echo_slot_mtx;   /* every slot's running/again */
static struct echo_slot *echo_slots;
static size_t echo_nchan;
static size_t echo_max;
static struct kup_thread *echo_acceptor;
static struct kup_thread *echo_announcer;
static int echo_any_mode;                 /* parameter `any` */
static int echo_any_fresh;                /* echo_slot_mtx: some slot is fresh */
static struct kup_thread *echo_any_thr;  /* "any" mode: the one server */
static int echo_announce_delay;
static unsigned int echo_start_delay;   /* ms; start_delay_ms */

#define ECHO_MEMCPY(d, s, n) kup_memcpy((d), (s), (n))

#ifdef ECHO_ROT13
static unsigned char
echo_rot13(unsigned char c)
{
	if (c >= 'a' && c <= 'z')
		return (unsigned char)('a' + (c - 'a' + 13) % 26);
	if (c >= 'A' && c <= 'Z')
		return (unsigned char)('A' + (c - 'A' + 13) % 26);
	return c;
}
#else
/* Upper-case ASCII a-z in one 8-byte word: for every byte b < 0x80, the
 * top bit of (b + 0x80 - 'a') says b >= 'a' and that of (b + 0x80 - 'z' -
 * 1) says b > 'z' (no carry crosses a byte: both sums stay below 0x100);
 * bytes >= 0x80 are masked out by ~w.  Clearing 0x20 in the selected
 * bytes upper-cases them. */
static uint64_t
echo_upper_word(uint64_t w)
{
	const uint64_t ones = 0x0101010101010101ULL;
	uint64_t low7 = w & (0x7f * ones);
	uint64_t ge_a = low7 + (0x80 - 'a') * ones;
	uint64_t gt_z = low7 + (0x80 - 'z' - 1) * ones;
	uint64_t sel = ge_a & ~gt_z & ~w & (0x80 * ones);

	return w ^ (sel >> 2);
}
#endif

/* Copy len bytes of a DATA message into the reply, transformed by channel:
 * even channels are the identity (one memcpy), odd ones upper-case a-z a
 * word at a time; the rot13 build rot13s every byte. */
static void
echo_transform(int chan, unsigned char *dst, const unsigned char *src,
    size_t len)
{
	size_t i = 0;

#ifdef ECHO_ROT13
	(void)chan;
	for (; i < len; i++)
		dst[i] = echo_rot13(src[i]);
#else
	if ((chan & 1) == 0) {
		ECHO_MEMCPY(dst, src, len);
		return;
	}
	for (; i + 8 <= len; i += 8) {
		uint64_t w;

		ECHO_MEMCPY(&w, src + i, 8);
		w = echo_upper_word(w);
		ECHO_MEMCPY(dst + i, &w, 8);
	}
	for (; i < len; i++) {
		unsigned char c = src[i];

		dst[i] = (c >= 'a' && c <= 'z') ? (unsigned char)(c - 'a' + 'A') : c;
	}
#endif
}

/* Does the message start with tag? */
static int
echo_has_prefix(const unsigned char *p, size_t len, const char *tag)
{
	size_t i;

	for (i = 0; tag[i] != '\0'; i++)
		if (i >= len || p[i] != (unsigned char)tag[i])
			return 0;
	return 1;
}

#define ECHO_STAMP_MIN_LEN  16
#define ECHO_STAMP_DEFAULT  1000U
#define ECHO_STAMP_MAX_MS   10000U

/* How many bytes of a number a command's argument may have: the digits
 * are parsed from a copy of at most this many (kupdev.h: the user may
 * rewrite the payload while the module holds it, so a byte checked as a
 * digit in place could be another byte when it is used). */
#define ECHO_ARG_MAX 24

/* The decimal milliseconds at p[from..to) (digits only, stopping at the
 * first other byte, at most ECHO_ARG_MAX of them): dflt when there are
 * none or they say 0, at most max. */
static unsigned int
echo_ms_arg(const unsigned char *p, size_t from, size_t to, unsigned int dflt,
    unsigned int max)
{
	unsigned char d[ECHO_ARG_MAX];
	unsigned int ms = 0;
	size_t i, n = to > from ? to - from : 0;

	if (n > sizeof(d))
		n = sizeof(d);
	ECHO_MEMCPY(d, p + from, n);
	for (i = 0; i < n && d[i] >= '0' && d[i] <= '9'; i++)
		if (ms <= max)
			ms = ms * 10U + (unsigned int)(d[i] - '0');
	if (ms == 0)
		ms = dflt;
	return ms > max ? max : ms;
}

/* "!stamp[N]": 0 if not one, else the delay in ms (N, bounded); the last
 * 8 bytes are the stamp's, not digits. */
static unsigned int
echo_stamp_ms(const unsigned char *p, size_t len)
{
	static const char tag[] = "!stamp";

	if (len < ECHO_STAMP_MIN_LEN || !echo_has_prefix(p, len, tag))
		return 0;
	return echo_ms_arg(p, sizeof(tag) - 1, len - 8, ECHO_STAMP_DEFAULT,
	    ECHO_STAMP_MAX_MS);
}

/* "!lockhold[N]": the hold's bound in ms (N, bounded; default 10 s). */
static unsigned int
echo_lockhold_ms(const unsigned char *p, size_t len)
{
	return echo_ms_arg(p, sizeof("!lockhold") - 1, len, ECHO_LOCKHOLD_DEFAULT,
	    ECHO_LOCKHOLD_MAX_MS);
}

#define ECHO_COUNT_MAX_MS 100U

/* "!oversize[N]": the bound on N */
#define ECHO_OVERSIZE_MAX_MS 10000U

/* "!count[N]": count it, and write the reply text into the slot's buffer;
 * returns its length (without the NUL).  The read and the update are one
 * step under the mutex, however long it takes (ms: slept in between; the
 * holder of a kup_mutex may sleep): two workers counting at once each see
 * the other's count, never the same one. */
static size_t
echo_counted(struct echo_slot *s, unsigned int ms)
{
	unsigned long n;
	int prev, len;

	kup_os_mutex_lock(echo_count_mtx);
	n = echo_count + 1;
	prev = echo_count_prev;
	if (ms != 0)
		kup_os_msleep(ms);
	echo_count = n;
	echo_count_prev = s->chan;
	kup_os_mutex_unlock(echo_count_mtx);
	len = kup_os_snprintf((char *)s->buf, echo_max, "!count %lu prev %d", n,
	    prev);
	if (len < 0)
		return 0;
	return (size_t)len < echo_max ? (size_t)len : echo_max - 1;
}

/* Keep the channel locked (the caller holds it from its receive and
 * unlocks after) until a "!lockfree" on another channel, ms milliseconds,
 * or unload.  No core call on this channel meanwhile: it would be the
 * re-entry the core refuses (-EDEADLK). */
static void
echo_lock_hold(struct echo_slot *s, unsigned int ms)
{
	unsigned int gen = __atomic_load_n(&echo_lockfree_gen, __ATOMIC_ACQUIRE);
	const char *why = "timed out";

	kup_log_limited(&echo_lockhold_rl,
	    "echo: chan %d: holding the channel locked (up to %u ms)",
	    s->chan, ms);
	while (ms > 0) {
		unsigned int step = ms < 20U ? ms : 20U;

		if (__atomic_load_n(&echo_lockfree_gen, __ATOMIC_ACQUIRE) != gen) {
			why = "released";
			break;
		}
		if (__atomic_load_n(&echo_unloading, __ATOMIC_ACQUIRE)) {
			why = "unloading";
			break;
		}
		kup_os_msleep(step);
		ms -= step;
	}
	kup_log_limited(&echo_lockhold_rl, "echo: chan %d: lock hold ended (%s)",
	    s->chan, why);
}

/* "!reenter": the module bug the core refuses, on purpose.  While still
 * holding the channel from its receive, the worker calls send and receive
 * on it again; both must fail with -EDEADLK instead of blocking the worker
 * forever.  Then it unlocks and answers "!reenter ok" (or "!reenter bad"),
 * so a test on any host sees the core's answer. */
static size_t
echo_reenter(struct echo_slot *s)
{
	static const char ok[] = "!reenter ok", bad[] = "!reenter bad";
	struct kupdev_msg again;
	int rs, rr;

	rs = kupdev_send(echo_sc, "x", 1, s->chan);
	rr = kupdev_receive_msg(echo_sc, s->chan, &again, 0);
	kupdev_unlock_channel(echo_sc, s->chan);
	if (rs == -EDEADLK && rr == -EDEADLK) {
		ECHO_MEMCPY(s->buf, ok, sizeof(ok) - 1);
		return sizeof(ok) - 1;
	}
	kup_log_limited(&echo_session_rl,
	    "echo: chan %d: re-entry not refused (send %d, receive %d)",
	    s->chan, rs, rr);
	ECHO_MEMCPY(s->buf, bad, sizeof(bad) - 1);
	return sizeof(bad) - 1;
}

/* "!relayC": forward the message the worker holds, as it is, to channel
 * C before unlocking it (what a zero-copy relay does), then unlock; the
 * reply text "!relay R" (R: kupdev_send's result) goes into the slot's
 * buffer, its length is returned.  Never waits for C's worker: the core
 * answers at once when another thread is in C, so two relays forwarding
 * to each other cannot deadlock. */
static size_t
echo_relay(struct echo_slot *s, const struct kupdev_msg *m)
{
	unsigned char d[ECHO_ARG_MAX];
	size_t i, n = m->len - (sizeof("!relay") - 1);   /* the caller saw the tag */
	int to = 0, digits = 0, r, len;

	/* parsed from a copy, as echo_ms_arg's */
	if (n > sizeof(d))
		n = sizeof(d);
	ECHO_MEMCPY(d, (const unsigned char *)m->data + sizeof("!relay") - 1, n);
	for (i = 0; i < n && d[i] >= '0' && d[i] <= '9' && to < 100000; i++) {
		to = to * 10 + (d[i] - '0');
		digits++;
	}
	r = digits != 0 ? kupdev_send(echo_sc, m->data, m->len, to) : -EINVAL;
	kupdev_unlock_channel(echo_sc, s->chan);
	len = kup_os_snprintf((char *)s->buf, echo_max, "!relay %d", r);
	if (len < 0)
		return 0;
	return (size_t)len < echo_max ? (size_t)len : echo_max - 1;
}

/* "!wake": the helper thread.  Sleeps, then wakes the worker's receive. */
static int
echo_waker(void *arg)
{
	struct echo_slot *s = arg;

	kup_os_msleep(s->wake_ms);
	return kupdev_wake_channel(echo_sc, s->chan);
}

#define ECHO_WAKE_DEFAULT_MS 50U
#define ECHO_WAKE_MAX_MS     10000U
#define ECHO_KICK_MAX_MS     10000U

/* "!wake[N]" (the message already unlocked): answer "!wake armed", let a
 * helper thread wake this worker's receive N ms later, and answer the
 * user's next message with "!wake R", R what the wake made a receive
 * return.  Returns what the last call returned (0: answered). */
static int
echo_wake(struct echo_slot *s, unsigned int ms)
{
	static const char armed[] = "!wake armed";
	struct kup_thread *t;
	struct kupdev_msg m;
	int r, woke = 0, len, got = 0;

	ECHO_MEMCPY(s->buf, armed, sizeof(armed) - 1);
	r = kupdev_send(echo_sc, s->buf, sizeof(armed) - 1, s->chan);
	if (r != 0)
		return r;
	s->wake_ms = ms;
	t = kup_os_thread_start(echo_waker, s, ECHO_NAME "-wk");
	if (t == NULL) {
		kup_log_limited(&echo_trigger_rl,
		    "echo: chan %d: cannot start a waker", s->chan);
		woke = -ENOMEM;
	}
	while (t != NULL) {
		r = kupdev_receive_msg(echo_sc, s->chan, &m, KUPDEV_FOREVER);
		if (r == -ECANCELED && woke == 0) {
			woke = r;
			kup_log_limited(&echo_trigger_rl,
			    "echo: chan %d: receive woken (%d) while waiting",
			    s->chan, r);
			continue;
		}
		if (r == 0) {
			kupdev_unlock_channel(echo_sc, s->chan);
			got = 1;
		}
		break;
	}
	if (t != NULL)
		(void)kup_os_thread_join(t);   /* it has woken us, or will not */
	if (r != 0 && r != -ECANCELED)
		return r;   /* the session is over (-EPIPE, -ESHUTDOWN, ...) */
	if (woke == 0 && t != NULL) {
		/* the user's message came first: the wake is kept for the
		 * next receive, which takes it before anything else */
		woke = kupdev_receive_msg(echo_sc, s->chan, &m, 0);
		kup_log_limited(&echo_trigger_rl,
		    "echo: chan %d: receive woken (%d) after a message",
		    s->chan, woke);
	}
	if (!got) {
		r = kupdev_receive_msg(echo_sc, s->chan, &m, KUPDEV_FOREVER);
		if (r != 0)
			return r;
		kupdev_unlock_channel(echo_sc, s->chan);
	}
	len = kup_os_snprintf((char *)s->buf, echo_max, "!wake %d", woke);
	if (len < 0)
		len = 0;
	if ((size_t)len >= echo_max)
		len = (int)echo_max - 1;
	return kupdev_send(echo_sc, s->buf, (size_t)len, s->chan);
}

/* Hold the turn for ms milliseconds, looking every 20 ms whether the user
 * left or the device is unloading (then that error, as echo_hold). */
static int
echo_wait_ms(struct echo_slot *s, unsigned int ms)
{
	struct kupdev_msg m;
	int r;

	while (ms > 0) {
		unsigned int step = ms < 20U ? ms : 20U;

		kup_os_msleep(step);
		ms -= step;
		r = kupdev_receive_msg(echo_sc, s->chan, &m, 0);
		if (r != -EAGAIN)
			return r == 0 ? -EPROTO : r;
	}
	return 0;
}

/* Keep the turn until the user leaves (-EPIPE) or unload (-ESHUTDOWN). */
static int
echo_hold(struct echo_slot *s)
{
	struct kupdev_msg m;
	int r;

	for (;;) {
		r = kupdev_receive_msg(echo_sc, s->chan, &m, 0);
		if (r != -EAGAIN)
			return r == 0 ? -EPROTO : r;
		kup_os_msleep(20);
	}
}

/* Serve one session of the slot's channel, from the first pass to the
 * call that says it is over.  again: this worker already served a session
 * and was asked for another; a first pass that finds no user (-EPIPE) is
 * then expected (the attach it was asked for may be the one it has just
 * served, or one whose user has come and gone) and not logged.  Otherwise
 * it is logged as a user gone, never as a failure.  A session
 * may also end on an error that does not end it for the core (returned
 * as is, non-zero); the first pass of the next one takes care of that. */
static int
echo_serve(struct echo_slot *s, int again)
{
	struct kupdev_msg m;
	size_t n;
	int r, delay;
	unsigned int stamp_ms;

	r = kupdev_pass(echo_sc, s->chan);
	if (r == -EPIPE) {
		/* Maybe no user, maybe the end of an earlier session: one that
		 * ended on an error other than -EPIPE, -EPROTO or CLOSE (a
		 * reply that failed: "!oversize") is still in progress for the
		 * core, and the next call on the channel -- this one, by a new
		 * worker or by this worker serving again -- answers -EPIPE for
		 * it (kupdev.h, "Sessions").  That -EPIPE has ended it; the
		 * call after it starts the session of the user the acceptor
		 * was told about, who would otherwise wait for its first PASS
		 * for ever.  A second -EPIPE: nobody there, really. */
		r = kupdev_pass(echo_sc, s->chan);
	}
	if (r != 0) {
		/* -EPIPE twice: the user the acceptor was told of came and
		 * went before this pass (a worker slow to start, a loaded
		 * machine), not a failure; said only when it was not the
		 * worker's own last session (again) */
		if (r != -EPIPE)
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: first pass failed (%d)", s->chan, r);
		else if (!again)
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: user gone before its first pass",
			    s->chan);
		return r;
	}
	for (;;) {
		r = kupdev_receive_msg(echo_sc, s->chan, &m, KUPDEV_FOREVER);
		if (r == -EINTR || r == -ETIMEDOUT || r == -ECANCELED)
			continue;
		if (r == -EPIPE) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: peer gone (-EPIPE)", s->chan);
			return 0;
		}
		if (r == -EPROTO) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: protocol error (-EPROTO)", s->chan);
			return 0;
		}
		if (r == -ESHUTDOWN)
			return r;   /* the worker exits */
		if (r != 0) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: receive failed (%d)", s->chan, r);
			return r;
		}
		switch (m.kind) {
		case KUP_KIND_DATA:
			if (echo_has_prefix(m.data, m.len, "!reenter")) {
				n = echo_reenter(s);   /* unlocks */
				r = kupdev_send(echo_sc, s->buf, n, s->chan);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!relay")) {
				n = echo_relay(s, &m);   /* unlocks */
				r = kupdev_send(echo_sc, s->buf, n, s->chan);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!count")) {
				unsigned int ms = echo_ms_arg(m.data,
				    sizeof("!count") - 1, m.len, 0,
				    ECHO_COUNT_MAX_MS);

				kupdev_unlock_channel(echo_sc, s->chan);
				n = echo_counted(s, ms);
				r = kupdev_send(echo_sc, s->buf, n, s->chan);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!oversize")) {
				unsigned int ms = echo_ms_arg(m.data,
				    sizeof("!oversize") - 1, m.len, 0,
				    ECHO_OVERSIZE_MAX_MS);

				kupdev_unlock_channel(echo_sc, s->chan);
				kup_log_limited(&echo_oversize_rl,
				    "echo: chan %d: oversize reply in %u ms",
				    s->chan, ms);
				if (ms != 0)
					kup_os_msleep(ms);
				/* the core refuses a length beyond the data
				 * area before it reads a byte of the data */
				r = kupdev_send(echo_sc, s->buf, echo_max + 1,
				    s->chan);
				kup_log_limited(&echo_oversize_rl,
				    "echo: chan %d: oversize reply: %d", s->chan,
				    r);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!kick")) {
				unsigned int ms = echo_ms_arg(m.data,
				    sizeof("!kick") - 1, m.len, 0,
				    ECHO_KICK_MAX_MS);

				kupdev_unlock_channel(echo_sc, s->chan);
				if (ms != 0)
					kup_os_msleep(ms);
				r = kupdev_disconnect(echo_sc, s->chan);
				kup_log_limited(&echo_trigger_rl,
				    "echo: chan %d: disconnected the user (%d)",
				    s->chan, r);
				return r == -ESHUTDOWN ? r : 0;   /* over */
			}
			if (echo_has_prefix(m.data, m.len, "!wake")) {
				unsigned int ms = echo_ms_arg(m.data,
				    sizeof("!wake") - 1, m.len,
				    ECHO_WAKE_DEFAULT_MS, ECHO_WAKE_MAX_MS);

				kupdev_unlock_channel(echo_sc, s->chan);
				r = echo_wake(s, ms);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!hold")) {
				kupdev_unlock_channel(echo_sc, s->chan);
				r = echo_hold(s);
				break;
			}
			if (echo_has_prefix(m.data, m.len, "!lockfree"))
				__atomic_add_fetch(&echo_lockfree_gen, 1U,
				    __ATOMIC_RELEASE);
			delay = echo_has_prefix(m.data, m.len, "!delay");
			n = m.len < echo_max ? m.len : echo_max;
			stamp_ms = echo_stamp_ms(m.data, n);
			echo_transform(s->chan, s->buf, m.data, n);
			if (echo_has_prefix(m.data, n, "!lockhold"))
				echo_lock_hold(s, echo_lockhold_ms(m.data, n));
			kupdev_unlock_channel(echo_sc, s->chan);
			if (delay)
				kup_os_msleep(ECHO_DELAY_MS);
			if (stamp_ms != 0) {
				uint64_t now;

				r = echo_wait_ms(s, stamp_ms);
				if (r != 0)
					break;
				now = kup_os_now_ns();
				ECHO_MEMCPY(s->buf + n - 8, &now, 8);
			}
			r = kupdev_send(echo_sc, s->buf, n, s->chan);
			break;
		case KUP_KIND_PASS:
			kupdev_unlock_channel(echo_sc, s->chan);
			r = kupdev_pass(echo_sc, s->chan);
			break;
		default:
			kupdev_unlock_channel(echo_sc, s->chan);
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: user closed", s->chan);
			return 0;
		}
		if (r == -EPIPE) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: peer gone (-EPIPE)", s->chan);
			return 0;
		}
		if (r == -ESHUTDOWN)
			return r;   /* the worker exits */
		if (r != 0) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: reply failed (%d)", s->chan, r);
			return r;
		}
	}
}

/* A channel's worker: serves sessions until one ends with no further
 * attach flagged by the acceptor.  Deciding to exit and the acceptor's
 * flag are one step each under echo_slot_mtx, so every attach the
 * acceptor hears of is served: either the flag comes first and this
 * worker serves again, or running = 0 comes first and the acceptor starts
 * a new worker. */
static int
echo_worker(void *arg)
{
	struct echo_slot *s = arg;
	int again = 0, r;

	if (echo_start_delay != 0)
		kup_os_msleep(echo_start_delay);
	for (;;) {
		r = echo_serve(s, again);
		kup_os_mutex_lock(echo_slot_mtx);
		if (r == -ESHUTDOWN || !s->again) {
			s->running = 0;
			kup_os_mutex_unlock(echo_slot_mtx);
			return 0;
		}
		s->again = 0;
		kup_os_mutex_unlock(echo_slot_mtx);
		again = 1;
	}
}

/* "any" mode: the server's set.  set[0..n) are channels whose user holds
 * the turn (the server passed or replied last); s->in_set says who. */
struct echo_any_set {
	int   *ids;
	int    n;
};

static void
echo_any_add(struct echo_any_set *set, int c)
{
	if (echo_slots[c].in_set)
		return;
	echo_slots[c].in_set = 1;
	set->ids[set->n++] = c;
	kup_log_limited(&echo_session_rl, "echo: any: serving %d channels",
	    set->n);
}

static void
echo_any_remove(struct echo_any_set *set, int c)
{
	int i;

	if (!echo_slots[c].in_set)
		return;
	echo_slots[c].in_set = 0;
	for (i = 0; i < set->n; i++) {
		if (set->ids[i] == c) {
			set->ids[i] = set->ids[--set->n];
			return;
		}
	}
}

/* Start the session of every channel the acceptor flagged: its first
 * pass, called once more on -EPIPE (kupdev.h, "Sessions": that -EPIPE may
 * end an earlier session of the channel, still in the set or not). */
static int
echo_any_take_fresh(struct echo_any_set *set)
{
	size_t i;
	int r, any;

	/* one look per message while no channel is new */
	kup_os_mutex_lock(echo_slot_mtx);
	any = echo_any_fresh;
	echo_any_fresh = 0;
	kup_os_mutex_unlock(echo_slot_mtx);
	for (i = 0; any && i < echo_nchan; i++) {
		struct echo_slot *s = &echo_slots[i];
		int fresh;

		kup_os_mutex_lock(echo_slot_mtx);
		fresh = s->fresh;
		s->fresh = 0;
		kup_os_mutex_unlock(echo_slot_mtx);
		if (!fresh)
			continue;
		r = kupdev_pass(echo_sc, s->chan);
		if (r == -EPIPE)
			r = kupdev_pass(echo_sc, s->chan);
		if (r == -ESHUTDOWN)
			return r;
		if (r == 0) {
			echo_any_add(set, s->chan);
			continue;
		}
		echo_any_remove(set, s->chan);
		if (r != -EPIPE)
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: first pass failed (%d)", s->chan, r);
	}
	return 0;
}

/* Answer the message the server holds on channel c (and let go of it);
 * 0, or the error that ends the channel's session (logged). */
static int
echo_any_answer(struct echo_slot *s, const struct kupdev_msg *m)
{
	size_t n;
	int r;

	switch (m->kind) {
	case KUP_KIND_DATA:
		n = m->len < echo_max ? m->len : echo_max;
		echo_transform(s->chan, s->buf, m->data, n);
		kupdev_unlock_channel(echo_sc, s->chan);
		r = kupdev_send(echo_sc, s->buf, n, s->chan);
		break;
	case KUP_KIND_PASS:
		kupdev_unlock_channel(echo_sc, s->chan);
		r = kupdev_pass(echo_sc, s->chan);
		break;
	default:
		kupdev_unlock_channel(echo_sc, s->chan);
		kup_log_limited(&echo_session_rl, "echo: chan %d: user closed",
		    s->chan);
		return -EPIPE;
	}
	if (r == -EPIPE)
		kup_log_limited(&echo_session_rl,
		    "echo: chan %d: peer gone (-EPIPE)", s->chan);
	else if (r != 0 && r != -ESHUTDOWN)
		kup_log_limited(&echo_session_rl,
		    "echo: chan %d: reply failed (%d)", s->chan, r);
	return r;
}

/* "any" mode: one thread, every channel.  Waits in kupdev_receive_any on
 * its set (on no channel while it has none: then only the acceptor's
 * kupdev_wake_any ends the wait). */
static int
echo_any_server(void *arg)
{
	struct echo_any_set set;
	struct kupdev_msg m;
	int r, c;

	(void)arg;
	set.n = 0;
	set.ids = kup_os_zalloc(echo_nchan * sizeof(*set.ids));
	if (set.ids == NULL) {
		kup_os_log("echo: any: no memory for the set");
		return -ENOMEM;
	}
	for (;;) {
		if (echo_any_take_fresh(&set) == -ESHUTDOWN)
			break;
		r = kupdev_receive_any(echo_sc, set.ids, set.n, &m,
		    KUPDEV_FOREVER, &c);
		if (r == -ESHUTDOWN)
			break;
		if (r >= 0) {
			r = echo_any_answer(&echo_slots[r], &m);
			if (r == -ESHUTDOWN)
				break;
			if (r != 0)
				echo_any_remove(&set, c);
			continue;
		}
		if (c < 0 || r == -ECANCELED)
			continue;   /* a wake (fresh channels), -EINTR, -ETIMEDOUT */
		/* that channel's session is over (-EPIPE, -EPROTO) or it is
		 * not usable (a bug: -EAGAIN, -EBUSY): out of the set */
		if (r == -EPIPE || r == -EPROTO)
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: %s", c, r == -EPIPE ?
			    "peer gone (-EPIPE)" : "protocol error (-EPROTO)");
		else
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: receive failed (%d)", c, r);
		echo_any_remove(&set, c);
	}
	kup_os_free(set.ids, echo_nchan * sizeof(*set.ids));
	return 0;
}

static int
echo_accept(void *arg)
{
	struct echo_slot *s;
	int c;

	(void)arg;
	for (;;) {
		c = kupdev_wait_channel(echo_sc);
		if (c == -ESHUTDOWN)
			return 0;
		if (c < 0)
			continue;   /* -EINTR / -ETIMEDOUT */
		if ((size_t)c >= echo_nchan)
			continue;
		s = &echo_slots[c];
		if (echo_any_mode) {
			/* the server starts it: flag it, wake the server */
			kup_os_mutex_lock(echo_slot_mtx);
			s->fresh = 1;
			echo_any_fresh = 1;
			kup_os_mutex_unlock(echo_slot_mtx);
			(void)kupdev_wake_any(echo_sc);
			continue;
		}
		kup_os_mutex_lock(echo_slot_mtx);
		if (s->running) {
			/* never join a running worker: it may be serving
			 * this very attachment, for as long as its user
			 * likes (see struct echo_slot).  It serves again
			 * once its session is over. */
			s->again = 1;
			kup_os_mutex_unlock(echo_slot_mtx);
			continue;
		}
		s->running = 1;
		s->again = 0;
		kup_os_mutex_unlock(echo_slot_mtx);
		/* the previous worker has decided to exit: joins at once */
		if (s->thr != NULL)
			kup_os_thread_join(s->thr);
		s->thr = kup_os_thread_start(echo_worker, s, ECHO_NAME "-w");
		if (s->thr == NULL) {
			kup_log_limited(&echo_session_rl,
			    "echo: chan %d: cannot start a worker", c);
			kup_os_mutex_lock(echo_slot_mtx);
			s->running = 0;
			kup_os_mutex_unlock(echo_slot_mtx);
		}
	}
}

static int
echo_announce(void *arg)
{
	int left = echo_announce_delay;

	(void)arg;
	/* sleep in slices so that an unload does not wait for the delay; the
	 * zero-timeout wait_channel only probes for shutdown: nothing can be
	 * attached (so nothing is taken from the acceptor) before announce */
	while (left > 0) {
		if (kupdev_wait_channel_timeout(echo_sc, 0) == -ESHUTDOWN)
			return 0;
		kup_os_msleep(left < 20 ? (unsigned int)left : 20U);
		left -= 20;
	}
	kupdev_notify(echo_sc);
	kup_os_log("echo: device %s announced", ECHO_NAME);
	return 0;
}

static void
echo_free_slots(void)
{
	size_t i;

	for (i = 0; i < echo_nchan; i++)
		if (echo_slots[i].buf != NULL)
			kup_os_free(echo_slots[i].buf, echo_max);
	kup_os_free(echo_slots, echo_nchan * sizeof(*echo_slots));
	echo_slots = NULL;
}

int
kup_module_init(void)
{
	int nchan = kup_os_param_int(ECHO_PARAM, "channels", 128);
	int pages = kup_os_param_int(ECHO_PARAM, "pages", 1);
	int start_delay = kup_os_param_int(ECHO_PARAM, "start_delay_ms", 0);
	size_t i;

	echo_announce_delay = kup_os_param_int(ECHO_PARAM, "announce_delay_ms", 0);
	echo_any_mode = kup_os_param_int(ECHO_PARAM, "any", 0) != 0;
	echo_start_delay = start_delay < 0 ? 0U :
	    start_delay > 10000 ? 10000U : (unsigned int)start_delay;

	if (nchan < 1 || nchan > (int)KUP_MAX_CHANNELS || pages < 1 ||
	    pages > (int)KUP_MAX_PAGES) {
		kup_os_log("echo: bad parameters channels=%d pages=%d", nchan,
		    pages);
		return -EINVAL;
	}
	echo_count_mtx = kup_os_mutex_new(ECHO_NAME "-count");
	if (echo_count_mtx == NULL)
		return -ENOMEM;
	echo_slot_mtx = kup_os_mutex_new(ECHO_NAME "-slots");
	if (echo_slot_mtx == NULL)
		goto fail_mtx;
	echo_sc = kupdev_create(ECHO_NAME, (size_t)pages, (size_t)nchan);
	if (echo_sc == NULL)
		goto fail_slot_mtx;
	echo_nchan = (size_t)nchan;
	echo_max = kupdev_data_size(echo_sc);
	echo_slots = kup_os_zalloc(echo_nchan * sizeof(*echo_slots));
	if (echo_slots == NULL)
		goto fail_dev;
	for (i = 0; i < echo_nchan; i++) {
		echo_slots[i].chan = (int)i;
		echo_slots[i].buf = kup_os_zalloc(echo_max);
		if (echo_slots[i].buf == NULL)
			goto fail_slots;
	}
	if (echo_any_mode) {
		echo_any_thr = kup_os_thread_start(echo_any_server, NULL,
		    ECHO_NAME "-any");
		if (echo_any_thr == NULL)
			goto fail_slots;
	}
	echo_acceptor = kup_os_thread_start(echo_accept, NULL, ECHO_NAME "-acc");
	if (echo_acceptor == NULL)
		goto fail_any;
	if (echo_announce_delay > 0) {
		echo_announcer = kup_os_thread_start(echo_announce, NULL,
		    ECHO_NAME "-ann");
		if (echo_announcer == NULL)
			goto fail_acceptor;
	} else {
		kupdev_notify(echo_sc);
	}
	kup_os_log("echo: device %s ready (%d channels, %d pages%s)", ECHO_NAME,
	    nchan, pages, echo_any_mode ? ", one receive_any thread" : "");
	return 0;

fail_acceptor:
	kupdev_shutdown(echo_sc);
	kup_os_thread_join(echo_acceptor);
fail_any:
	if (echo_any_thr != NULL) {
		kupdev_shutdown(echo_sc);
		kup_os_thread_join(echo_any_thr);
		echo_any_thr = NULL;
	}

fail_slots:
	echo_free_slots();
fail_dev:
	kupdev_unload(echo_sc);
	echo_sc = NULL;
fail_slot_mtx:
	kup_os_mutex_free(echo_slot_mtx);
	echo_slot_mtx = NULL;
fail_mtx:
	kup_os_mutex_free(echo_count_mtx);
	echo_count_mtx = NULL;
	return -ENOMEM;
}

void
kup_module_fini(void)
{
	size_t i;

	if (echo_sc == NULL)
		return;
	kupdev_shutdown(echo_sc);
	__atomic_store_n(&echo_unloading, 1, __ATOMIC_RELEASE);
	kup_os_thread_join(echo_acceptor);
	if (echo_announcer != NULL)
		kup_os_thread_join(echo_announcer);
	echo_announcer = NULL;
	if (echo_any_thr != NULL)
		kup_os_thread_join(echo_any_thr);
	echo_any_thr = NULL;
	for (i = 0; i < echo_nchan; i++) {
		if (echo_slots[i].thr != NULL)
			kup_os_thread_join(echo_slots[i].thr);
		echo_slots[i].thr = NULL;
	}
	kupdev_unload(echo_sc);
	echo_sc = NULL;
	echo_free_slots();
	kup_os_mutex_free(echo_count_mtx);   /* every worker is joined */
	echo_count_mtx = NULL;
	kup_os_mutex_free(echo_slot_mtx);
	echo_slot_mtx = NULL;
	kup_os_log("echo: device %s unloaded", ECHO_NAME);
}
