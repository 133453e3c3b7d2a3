/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * tally.c -- example module: device "tally", a running total that every
 * channel shares, served by ONE thread with kupdev_receive_any, and a
 * message the module answers only when something happens elsewhere.
 *
 * What it shows beyond README's one-channel module (and in far fewer lines
 * than echo.c, which is also the test bench of the core):
 *   - several channels, one serving thread: an acceptor thread hears of
 *     each new user (kupdev_wait_channel) and hands the channel over with
 *     kupdev_wake_any; the server starts the session (its first pass,
 *     once more on -EPIPE: kupdev.h, "Sessions") and keeps the set of
 *     channels whose user holds the turn.  The acceptor does not pass
 *     itself: the waiting server is "in" every channel of its set -- also
 *     one whose last user just left -- and another thread's pass there
 *     fails with -EAGAIN (kupdev.h, "Conventions");
 *   - state every channel shares without a lock: only the server touches
 *     the total, so only the acceptor's hand-over needs a mutex;
 *   - an asynchronous answer: "watch T" is not answered while the total
 *     is T; another channel's change answers it.  The module keeps that
 *     channel's turn meanwhile (the channel is out of the receive set:
 *     there is nothing to receive), and its user waits in a receive -- as
 *     long as it likes, or with a timeout, after which the answer is still
 *     owed.  The user says which total it has seen: a change that came
 *     before the module read its "watch" is not missed (it is answered at
 *     once);
 *   - a user that leaves while the module holds its turn sends nothing
 *     the module could receive: a 0 ms kupdev_receive_msg tells (-EPIPE),
 *     looked at once a second while the server is idle;
 *   - bad input answered as data ("error: ..."): a module has no other way
 *     to tell its user what was wrong (kupdev_disconnect only ends the
 *     session).
 *
 * Messages (text, no terminating NUL):
 *   "+N", "-N" or "N" (decimal, up to 15 digits)  ->  "total T"
 *   "?"                                           ->  "total T"
 *   "watch T" -> "total X" as soon as the total X is not T (at once if it
 *                already is not)
 *   anything else -> "error: ..." naming what was wrong
 * The total stays within +-10^15 ("error: adding ... would pass ..."
 * otherwise).
 *
 * Parameter `channels` (default 4; kupsim: KUP_PARAM_TALLY_CHANNELS,
 * Linux: kup.params=tally.channels=N, FreeBSD: kup.tally.channels).  Only kupdev.h and kup_module.h are
 * used: the same source builds for kupsim, Linux and FreeBSD.
 * Tested by tests/kmod/test_kupsim_tally.py, and on Linux (kup_tally.ko,
 * through kupd) by tests/vm/guest_kupd.py.
 */
#include "kup_module.h"

#define TALLY_IDLE_MS   1000                    /* look for gone watchers */
#define TALLY_LIMIT     1000000000000000LL      /* |total| <= 10^15 */
#define TALLY_MAX_IN    32                      /* longest message looked at */

static struct kupdev_softc *tally_sc;
static struct kup_thread *tally_acceptor, *tally_server;
static int tally_nchan;

/* The acceptor's hand-over to the server, under tally_mtx. */
static struct kup_mutex *tally_mtx;
static int *tally_fresh;        /* [chan]: a user the server has not started */
static int tally_any_fresh;     /* some tally_fresh[] is set */

/* The server's own (no other thread reads them): */
static int *tally_set, tally_nset;   /* channels whose user holds the turn */
static int *tally_in_set;            /* [chan]: in tally_set */
static int *tally_watching;          /* [chan]: the module holds its turn,
                                      * owing "total T" at the next change */
static long long tally_total;

static void
set_add(int c)
{
	if (tally_in_set[c])
		return;
	tally_in_set[c] = 1;
	tally_set[tally_nset++] = c;
}

static void
set_del(int c)
{
	int i;

	if (!tally_in_set[c])
		return;
	tally_in_set[c] = 0;
	for (i = 0; i < tally_nset; i++) {
		if (tally_set[i] == c) {
			tally_set[i] = tally_set[--tally_nset];
			return;
		}
	}
}

/* Send the text kup_os_snprintf(buf, size, ...) made, which returned len
 * -- the length the whole text NEEDS: never send past the buffer on a cut.
 * On success the user holds the turn: receive from it again.  Anything
 * else ends what the module does with that session (-EPIPE: its user
 * left; -ESHUTDOWN: unloading). */
static int
reply(int c, const char *buf, size_t size, int len)
{
	size_t n = len < 0 ? 0 : (size_t)len < size ? (size_t)len : size - 1;
	int r = kupdev_send(tally_sc, buf, n, c);

	if (r == 0)
		set_add(c);
	else
		set_del(c);
	return r;
}

static int
reply_total(int c)
{
	char buf[32];

	return reply(c, buf, sizeof(buf), kup_os_snprintf(buf, sizeof(buf),
	    "total %lld", tally_total));
}

/* "+N", "-N", "N": 0 and *out, or -1 */
static int
parse_number(const char *s, size_t n, long long *out)
{
	long long v = 0;
	size_t i = 0;
	int neg = 0;

	if (n > 0 && (s[0] == '+' || s[0] == '-'))
		neg = s[i++] == '-';
	if (i == n || n - i > 15)
		return -1;
	for (; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return -1;
		v = v * 10 + (s[i] - '0');
	}
	*out = neg ? -v : v;
	return 0;
}

/* Answer every watcher: the module holds their turn, so it may send. */
static void
notify_watchers(void)
{
	int c;

	for (c = 0; c < tally_nchan; c++) {
		if (!tally_watching[c])
			continue;
		tally_watching[c] = 0;
		(void)reply_total(c);   /* -EPIPE: that watcher has left */
	}
}

/* The server holds a message of channel c: answer it.  Returns
 * -ESHUTDOWN when the module is unloading, else 0. */
static int
answer(int c, const struct kupdev_msg *m)
{
	char in[TALLY_MAX_IN], buf[96];   /* the longest reply is 70 bytes */
	size_t len = m->len, n = len < sizeof(in) ? len : sizeof(in);
	uint32_t kind = m->kind;
	long long v;
	int r;

	/* copy, then let go: m->data is the user's to write (kupdev.h) */
	kup_memcpy(in, m->data, n);
	kupdev_unlock_channel(tally_sc, c);

	if (kind == KUP_KIND_CLOSE) {          /* the user left holding the turn */
		set_del(c);
		return 0;
	}
	if (kind == KUP_KIND_PASS) {           /* nothing to answer: pass back */
		r = kupdev_pass(tally_sc, c);
		if (r != 0)
			set_del(c);
		return r == -ESHUTDOWN ? r : 0;
	}
	if (len > 6 && len <= sizeof(in) && kup_memcmp(in, "watch ", 6) == 0 &&
	    parse_number(in + 6, len - 6, &v) == 0) {
		if (v != tally_total) {
			r = reply_total(c);      /* it has not seen this total yet */
			return r == -ESHUTDOWN ? r : 0;
		}
		/* keep the turn: nothing to receive on c until we answer */
		tally_watching[c] = 1;
		set_del(c);
		return 0;
	}
	if (len == 1 && in[0] == '?')
		r = reply_total(c);
	else if (len > sizeof(in) || parse_number(in, n, &v) != 0)
		r = reply(c, buf, sizeof(buf), kup_os_snprintf(buf, sizeof(buf),
		    "error: not a number, ? or watch N (%zu byte%s)", len,
		    len == 1 ? "" : "s"));
	else if ((v > 0 && tally_total > TALLY_LIMIT - v) ||
	    (v < 0 && tally_total < -TALLY_LIMIT - v))
		r = reply(c, buf, sizeof(buf), kup_os_snprintf(buf, sizeof(buf),
		    "error: adding %lld to %lld would pass +-10^15", v,
		    tally_total));
	else {
		tally_total += v;
		r = reply_total(c);
		if (v != 0)
			notify_watchers();
	}
	return r == -ESHUTDOWN ? r : 0;
}

/* Start the session of every channel the acceptor handed over: its first
 * pass, once more on -EPIPE (kupdev.h, "Sessions": the first -EPIPE may
 * end the channel's previous session, e.g. a watcher that left). */
static int
start_fresh(void)
{
	int c, any, fresh, r;

	kup_os_mutex_lock(tally_mtx);
	any = tally_any_fresh;
	tally_any_fresh = 0;
	kup_os_mutex_unlock(tally_mtx);
	for (c = 0; any && c < tally_nchan; c++) {
		kup_os_mutex_lock(tally_mtx);
		fresh = tally_fresh[c];
		tally_fresh[c] = 0;
		kup_os_mutex_unlock(tally_mtx);
		if (!fresh)
			continue;
		tally_watching[c] = 0;   /* owed to a user who has left */
		r = kupdev_pass(tally_sc, c);
		if (r == -EPIPE)
			r = kupdev_pass(tally_sc, c);
		if (r == -ESHUTDOWN)
			return r;
		if (r == 0)
			set_add(c);
		else
			set_del(c);      /* -EPIPE again: that user is gone too */
	}
	return 0;
}

/* While idle: a watcher that left while the module held its turn. */
static void
forget_gone_watchers(void)
{
	struct kupdev_msg m;
	int c, r;

	for (c = 0; c < tally_nchan; c++) {
		if (!tally_watching[c])
			continue;
		r = kupdev_receive_msg(tally_sc, c, &m, 0);  /* -EAGAIN: still there */
		if (r == 0)
			kupdev_unlock_channel(tally_sc, c);  /* cannot happen: we hold the turn */
		else if (r == -EPIPE || r == -EPROTO)
			tally_watching[c] = 0;
	}
}

static int
tally_serve(void *arg)
{
	struct kupdev_msg m;
	int r, c;

	(void)arg;
	for (;;) {
		if (start_fresh() == -ESHUTDOWN)
			break;
		/* n may be 0: then only kupdev_wake_any (or the timeout) ends it */
		r = kupdev_receive_any(tally_sc, tally_set, tally_nset, &m,
		    TALLY_IDLE_MS, &c);
		if (r >= 0) {
			if (answer(r, &m) == -ESHUTDOWN)
				break;
		} else if (r == -ESHUTDOWN) {
			break;
		} else if (r == -ETIMEDOUT) {
			forget_gone_watchers();
		} else if (c >= 0 && r != -ECANCELED) {
			set_del(c);      /* that session is over: -EPIPE, -EPROTO */
		}
		/* c < 0: a kupdev_wake_any from the acceptor (-ECANCELED) */
	}
	return 0;
}

static int
tally_accept(void *arg)
{
	int c;

	(void)arg;
	while ((c = kupdev_wait_channel(tally_sc)) != -ESHUTDOWN) {
		if (c < 0)
			continue;
		kup_os_mutex_lock(tally_mtx);
		tally_fresh[c] = 1;
		tally_any_fresh = 1;
		kup_os_mutex_unlock(tally_mtx);
		(void)kupdev_wake_any(tally_sc);   /* the server takes it */
	}
	return 0;
}

static void
tally_free(void)
{
	size_t bytes = (size_t)tally_nchan * sizeof(int);

	kup_os_free(tally_fresh, bytes);
	kup_os_free(tally_set, bytes);
	kup_os_free(tally_in_set, bytes);
	kup_os_free(tally_watching, bytes);
	kup_os_mutex_free(tally_mtx);
}

int
kup_module_init(void)
{
	size_t bytes;

	tally_nchan = kup_os_param_int("tally", "channels", 4);
	if (tally_nchan < 1 || tally_nchan > (int)KUP_MAX_CHANNELS) {
		kup_os_log("tally: channels=%d: must be 1..%d", tally_nchan,
		    (int)KUP_MAX_CHANNELS);
		return -EINVAL;
	}
	bytes = (size_t)tally_nchan * sizeof(int);
	tally_fresh = kup_os_zalloc(bytes);
	tally_set = kup_os_zalloc(bytes);
	tally_in_set = kup_os_zalloc(bytes);
	tally_watching = kup_os_zalloc(bytes);
	tally_mtx = kup_os_mutex_new("tally");
	if (!tally_fresh || !tally_set || !tally_in_set || !tally_watching ||
	    !tally_mtx)
		goto fail;
	tally_sc = kupdev_create("tally", 1, (size_t)tally_nchan);
	if (tally_sc == NULL)
		goto fail;
	tally_server = kup_os_thread_start(tally_serve, NULL, "tally-serve");
	if (tally_server == NULL)
		goto fail_dev;
	tally_acceptor = kup_os_thread_start(tally_accept, NULL, "tally-accept");
	if (tally_acceptor == NULL) {
		kupdev_shutdown(tally_sc);
		kup_os_thread_join(tally_server);
		goto fail_dev;
	}
	kupdev_notify(tally_sc);
	kup_os_log("tally: device tally ready (%d channels)", tally_nchan);
	return 0;

fail_dev:
	kupdev_unload(tally_sc);
fail:
	tally_free();   /* kup_os_free(NULL) and kup_os_mutex_free(NULL) are no-ops */
	return -ENOMEM;
}

void
kup_module_fini(void)
{
	kupdev_shutdown(tally_sc);   /* every wait returns -ESHUTDOWN */
	kup_os_thread_join(tally_acceptor);
	kup_os_thread_join(tally_server);
	kupdev_unload(tally_sc);
	tally_free();
	kup_os_log("tally: device tally unloaded");
}
