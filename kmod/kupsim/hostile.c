/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * hostile.c -- a kupsim-only test module whose kernel side misbehaves on
 * command, for testing that user sides (libkup, kupd) reject garbage in
 * the control page.  Device "hostile" (KUP_PARAM_HOSTILE_CHANNELS, default
 * 4, one page).  Per attached channel it passes the turn, then answers
 * every DATA message:
 *   "seqgap"   PASS with sequence last+2
 *   "seqrep"   PASS repeating the last sequence number
 *   "badlen"   DATA with len = data area + 1
 *   "badkind"  descriptor kind 77
 *   "badturn"  turn word set to garbage (0x12345678)
 *   "leaklock" the worker ends without kupdev_unlock_channel (the channel
 *              stays held: kupdev_unload logs it)
 *   "slowexit" echoed; when the module later unloads, its accept thread
 *              takes 3 s to end after kupdev_shutdown, so the device
 *              stays in its shutting-down state that long (a user can
 *              watch it there; a slow module's unload does the same)
 *   "nap"      echoed; then the worker sleeps 500 ms before its next
 *              receive, neither in a receive nor holding anything: a user
 *              that hands over a message and leaves meanwhile leaves it
 *              for that receive (kupdev.h; kupsim must keep it)
 *   "tell..."  echoed, and logged: "hostile: chan N: told <the rest>"
 *              (what the worker received, for a test to see)
 *   "oversize" answered with one byte more than the channel holds:
 *              kupdev_send refuses it (-EMSGSIZE) and the worker gives up
 *              on the session, which the core still counts as in progress
 *              (logged: "hostile: chan N: worker ends (-90)"); the next
 *              session's first pass ends it (h_serve)
 *   anything else: echoed unchanged
 * PASS is answered with PASS.  Uses the core's private test hook, so it is
 * built against kmod/core (never a model for a real module).
 *
 * With KUP_PARAM_HOSTILE_MUTEX_MISUSE=1 its init also misuses a kup_mutex
 * the three ways kupsim's error-checking mutex reports (kup_module.h): a
 * second lock by its holder, an unlock of an unlocked mutex, and a free
 * of a locked one -- each a hang or a panic in a kernel.
 */
#include "kup_core_priv.h"

static struct kupdev_softc *h_sc;
static size_t h_nchan;
static struct kup_thread *h_acc;
static struct kup_thread **h_thr;
static int *h_ids;
/* Per channel, under h_mtx: its worker has not decided to exit, and an
 * attach came meanwhile.  The accept thread never joins a running worker:
 * it may be serving the very attachment the accept thread just heard of
 * (kupdev.h, "Sessions"); the worker serves again instead (echo.c, struct
 * echo_slot, says more). */
static struct kup_mutex *h_mtx;
static unsigned char *h_running, *h_again;
static int h_slowexit;	/* "slowexit" seen: the accept thread ends late */

static int
h_is(const struct kupdev_msg *m, const char *s)
{
	size_t n = strlen(s);

	return m->len == n && memcmp(m->data, s, n) == 0;
}

/* After a bad hand-over: keep out of the channel (a receive would only
 * trip over our own garbage) until this user leaves or the device unloads. */
static int
h_linger(int c)
{
	struct kup_chan *ch = &h_sc->chans[c];
	uint64_t gen = KUP_READ_ONCE64(&ch->kgen);

	while (!KUP_READ_ONCE32(&h_sc->shutdown) &&
	    KUP_READ_ONCE32(&ch->attached) && KUP_READ_ONCE64(&ch->gen) == gen)
		kup_os_msleep(10);
	/* let the core end the session (it answers -EPIPE/-ESHUTDOWN): a
	 * session dropped silently would cost the next user's first call */
	return kupdev_pass(h_sc, c);
}

/* One session of channel c (buf: max bytes); returns the call's result
 * that ended it.  again: a session served before by this worker (its
 * first pass finding no user is expected then: not logged). */
static int
h_serve(int c, unsigned char *buf, size_t max, int again)
{
	struct kupdev_msg m;
	int r;

	int nap = 0;

	r = kupdev_pass(h_sc, c);
	if (r == -EPIPE) {
		/* Maybe no user, maybe the end of an earlier session: one that
		 * ended on an error other than -EPIPE, -EPROTO or CLOSE
		 * ("oversize") is still in progress for the core, and the next
		 * call on the channel answers -EPIPE for it (kupdev.h,
		 * "Sessions"), which ends it.  The call after it starts the
		 * session of the user the accept thread was told about, who
		 * would otherwise wait for its first PASS for ever (echo.c's
		 * echo_serve: the same).  A second -EPIPE: nobody there. */
		r = kupdev_pass(h_sc, c);
	}
	if (again && r == -EPIPE)
		return r;
	while (r == 0) {
		size_t len;
		int bad = 1;

		if (nap) {
			kup_os_msleep(500);
			nap = 0;
		}
		r = kupdev_receive_msg(h_sc, c, &m, KUPDEV_FOREVER);
		if (r != 0)
			break;
		if (m.kind != KUP_KIND_DATA) {
			kupdev_unlock_channel(h_sc, c);
			r = m.kind == KUP_KIND_PASS ? kupdev_pass(h_sc, c) : -EPIPE;
			continue;
		}
		if (h_is(&m, "leaklock")) {
			/* the bug on purpose: the worker ends holding the
			 * channel (no kupdev_unlock_channel); kupdev_unload
			 * names it */
			kup_os_log("hostile: chan %d: worker ends holding the channel", c);
			return -EDEADLK;   /* no further session: it holds ch */
		}
		if (h_is(&m, "slowexit"))
			__atomic_store_n(&h_slowexit, 1, __ATOMIC_RELEASE);
		nap = h_is(&m, "nap");
		if (m.len >= 4 && memcmp(m.data, "tell", 4) == 0) {
			len = m.len - 4 < 64 ? m.len - 4 : 64;
			memcpy(buf, (const unsigned char *)m.data + 4, len);
			kup_os_log("hostile: chan %d: told %.*s", c, (int)len,
			    (const char *)buf);
		}
		if (h_is(&m, "oversize")) {
			bad = 0;
			kupdev_unlock_channel(h_sc, c);
			/* refused before a byte is read: buf is big enough */
			r = kupdev_send(h_sc, buf, max + 1, c);
		} else if (h_is(&m, "seqgap")) {
			kupdev_unlock_channel(h_sc, c);
			r = kup_core_test_handover(h_sc, c, 0, KUP_KIND_PASS, 1,
			    KUP_TURN_USER);
		} else if (h_is(&m, "seqrep")) {
			kupdev_unlock_channel(h_sc, c);
			r = kup_core_test_handover(h_sc, c, 0, KUP_KIND_PASS, -1,
			    KUP_TURN_USER);
		} else if (h_is(&m, "badlen")) {
			kupdev_unlock_channel(h_sc, c);
			r = kup_core_test_handover(h_sc, c, (uint32_t)max + 1,
			    KUP_KIND_DATA, 0, KUP_TURN_USER);
		} else if (h_is(&m, "badkind")) {
			kupdev_unlock_channel(h_sc, c);
			r = kup_core_test_handover(h_sc, c, 0, 77, 0, KUP_TURN_USER);
		} else if (h_is(&m, "badturn")) {
			kupdev_unlock_channel(h_sc, c);
			r = kup_core_test_handover(h_sc, c, 0, KUP_KIND_PASS, 0,
			    0x12345678U);
		} else {
			bad = 0;
			len = m.len < max ? m.len : max;
			memcpy(buf, m.data, len);
			kupdev_unlock_channel(h_sc, c);
			r = kupdev_send(h_sc, buf, len, c);
		}
		if (r == 0 && bad) {
			kup_os_log("hostile: chan %d: misbehaved", c);
			r = h_linger(c);
		}
	}
	if (r != -ESHUTDOWN)
		kup_os_log("hostile: chan %d: worker ends (%d)", c, r);
	return r;
}

static int
h_worker(void *arg)
{
	int c = *(int *)arg;
	size_t max = kupdev_data_size(h_sc);
	unsigned char *buf = kup_os_zalloc(max);
	int again = 0, r = -ENOMEM;

	for (;;) {
		if (buf != NULL)
			r = h_serve(c, buf, max, again);
		kup_os_mutex_lock(h_mtx);
		if (buf == NULL || r == -ESHUTDOWN || r == -EDEADLK ||
		    !h_again[c]) {
			h_running[c] = 0;
			kup_os_mutex_unlock(h_mtx);
			break;
		}
		h_again[c] = 0;
		kup_os_mutex_unlock(h_mtx);
		again = 1;
	}
	if (buf != NULL)
		kup_os_free(buf, max);
	return 0;
}

static int
h_accept(void *arg)
{
	int c;

	(void)arg;
	while ((c = kupdev_wait_channel(h_sc)) != -ESHUTDOWN) {
		if (c < 0 || (size_t)c >= h_nchan)
			continue;
		kup_os_mutex_lock(h_mtx);
		if (h_running[c]) {
			h_again[c] = 1;   /* served when its session is over */
			kup_os_mutex_unlock(h_mtx);
			continue;
		}
		h_running[c] = 1;
		h_again[c] = 0;
		kup_os_mutex_unlock(h_mtx);
		if (h_thr[c] != NULL)
			kup_os_thread_join(h_thr[c]);   /* it has decided to exit */
		h_thr[c] = kup_os_thread_start(h_worker, &h_ids[c], "hostile-w");
		if (h_thr[c] == NULL) {
			kup_os_mutex_lock(h_mtx);
			h_running[c] = 0;
			kup_os_mutex_unlock(h_mtx);
		}
	}
	if (__atomic_load_n(&h_slowexit, __ATOMIC_ACQUIRE)) {
		kup_os_log("hostile: slow exit: the accept thread ends in 3 s");
		kup_os_msleep(3000);
	}
	return 0;
}

static int
h_lock_and_exit(void *arg)
{
	kup_os_mutex_lock(arg);   /* and never unlocked */
	return 0;
}

static void
h_mutex_misuse(void)
{
	struct kup_mutex *m = kup_os_mutex_new("hostile-m");
	struct kup_mutex *d = kup_os_mutex_new("hostile-dead");
	struct kup_thread *t;

	if (m == NULL || d == NULL)
		return;
	kup_os_mutex_lock(m);
	kup_os_mutex_lock(m);     /* its holder again */
	kup_os_mutex_unlock(m);
	kup_os_mutex_unlock(m);   /* not locked any more */
	kup_os_mutex_lock(m);
	kup_os_mutex_free(m);     /* still locked */
	/* a thread that exits holding it: the next locker is told, not hung */
	t = kup_os_thread_start(h_lock_and_exit, d, "hostile-dead");
	if (t != NULL)
		(void)kup_os_thread_join(t);
	kup_os_mutex_lock(d);
	kup_os_mutex_unlock(d);
	kup_os_mutex_free(d);
}

/* Free what init allocated for the channels (each may be NULL). */
static void
h_free_slots(void)
{
	kup_os_free(h_thr, h_nchan * sizeof(*h_thr));
	kup_os_free(h_ids, h_nchan * sizeof(*h_ids));
	kup_os_free(h_running, h_nchan);
	kup_os_free(h_again, h_nchan);
	kup_os_mutex_free(h_mtx);
	h_thr = NULL;
	h_ids = NULL;
	h_running = h_again = NULL;
	h_mtx = NULL;
}

int
kup_module_init(void)
{
	int n = kup_os_param_int("hostile", "channels", 4);
	size_t i;

	if (kup_os_param_int("hostile", "mutex_misuse", 0) != 0)
		h_mutex_misuse();

	if (n < 1 || n > (int)KUP_MAX_CHANNELS)
		return -EINVAL;
	h_sc = kupdev_create("hostile", 1, (size_t)n);
	if (h_sc == NULL)
		return -ENOMEM;
	h_nchan = (size_t)n;
	h_thr = kup_os_zalloc(h_nchan * sizeof(*h_thr));
	h_ids = kup_os_zalloc(h_nchan * sizeof(*h_ids));
	h_running = kup_os_zalloc(h_nchan);
	h_again = kup_os_zalloc(h_nchan);
	h_mtx = kup_os_mutex_new("hostile-slots");
	if (h_thr == NULL || h_ids == NULL || h_running == NULL ||
	    h_again == NULL || h_mtx == NULL)
		goto fail;
	for (i = 0; i < h_nchan; i++)
		h_ids[i] = (int)i;
	h_acc = kup_os_thread_start(h_accept, NULL, "hostile-acc");
	if (h_acc == NULL)
		goto fail;
	kupdev_notify(h_sc);
	return 0;
fail:
	h_free_slots();
	kupdev_unload(h_sc);
	h_sc = NULL;
	return -ENOMEM;
}

void
kup_module_fini(void)
{
	size_t i;

	if (h_sc == NULL)
		return;
	kupdev_shutdown(h_sc);
	kup_os_thread_join(h_acc);
	for (i = 0; i < h_nchan; i++)
		if (h_thr[i] != NULL)
			kup_os_thread_join(h_thr[i]);
	kupdev_unload(h_sc);
	h_free_slots();
	h_sc = NULL;
}
