// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_anyherd.c -- a test-only Linux module, built and loaded by the VM
 * test (tests/vm/test_vm.py builds it as it builds kup_holdtest.ko;
 * guest_tests.sh's anyherd stage loads it): several threads in
 * kupdev_receive_any on disjoint sets of one device, the documented way
 * to serve many channels with a few threads.  A user's hand-over on one
 * thread's channel must wake that thread only: the others must not wake,
 * look at their sets, find nothing and sleep again (a thundering herd).
 *
 * Device "anyherd", AH_THREADS * AH_PER channels; thread t serves
 * channels t*AH_PER .. t*AH_PER+AH_PER-1 and echoes every message (its
 * user is `kup_kfault anyherd`, which talks to thread 0 only).  A thread
 * stops at its first answer that is not a message (its user left:
 * -EPIPE; rmmod: -ESHUTDOWN).  At rmmod the module logs, per thread, the
 * messages it served and the core's count of its wake-ups that found
 * nothing on its set (kup_core_priv.h, ch->any_idle_wakes: the same on
 * every channel of the set), which guest_tests.sh checks: 0 for the
 * threads whose users sent nothing.
 */
#include <linux/module.h>
#include <linux/errno.h>
#include "kupdev.h"
#include "kup_module.h"
#include "kup_core_priv.h"   /* ch->any_idle_wakes: a test reads it */

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("KUP test (tests/vm): receive_any threads on disjoint sets wake for their own channels only");
MODULE_SOFTDEP("pre: kup");

#define AH_THREADS 4
#define AH_PER     2
#define AH_CHANS   (AH_THREADS * AH_PER)
#define AH_WAIT_MS 60000   /* for the user; generous: the VM runs under TCG */

static struct kupdev_softc *ah_sc;
static struct kup_thread *ah_ctl;
static struct kup_thread *ah_thr[AH_THREADS];

struct ah_worker {
	int ids[AH_PER];
	int served;
	int ended;          /* the answer that stopped it */
	int which;
};
static struct ah_worker ah_w[AH_THREADS];

static int
ah_worker_main(void *arg)
{
	struct ah_worker *w = arg;
	struct kupdev_msg m;
	char buf[64];
	int r, which;

	for (;;) {
		r = kupdev_receive_any(ah_sc, w->ids, AH_PER, &m,
		    KUPDEV_FOREVER, &which);
		if (r < 0)
			break;
		if (m.len > sizeof(buf) || m.kind != KUP_KIND_DATA) {
			kupdev_unlock_channel(ah_sc, r);
			r = -EPROTO;
			break;
		}
		memcpy(buf, m.data, m.len);
		kupdev_unlock_channel(ah_sc, r);
		r = kupdev_send(ah_sc, buf, m.len, r);
		if (r != 0)
			break;
		w->served++;
	}
	w->ended = r;
	w->which = which;
	return 0;
}

/* Every channel's first pass (the user then holds its turn: only then may
 * it join a set), then the serving threads. */
static int
ah_ctl_main(void *arg)
{
	int i, c, t;

	(void)arg;
	for (i = 0; i < AH_CHANS; i++) {
		c = kupdev_wait_channel_timeout(ah_sc, AH_WAIT_MS);
		if (c < 0) {
			kup_os_log("kup_anyherd: no user attached (%d)", c);
			return c;
		}
		if (kupdev_pass(ah_sc, c) != 0) {
			kup_os_log("kup_anyherd: first pass of chan %d failed", c);
			return -EPIPE;
		}
	}
	for (t = 0; t < AH_THREADS; t++) {
		for (i = 0; i < AH_PER; i++)
			ah_w[t].ids[i] = t * AH_PER + i;
		ah_thr[t] = kup_os_thread_start(ah_worker_main, &ah_w[t],
		    "kup-anyherd");
		if (ah_thr[t] == NULL) {
			kup_os_log("kup_anyherd: thread %d did not start", t);
			return -ENOMEM;
		}
	}
	kup_os_log("kup_anyherd: %d receive_any threads serving %d channels",
	    AH_THREADS, AH_CHANS);
	return 0;
}

static int __init
ah_init(void)
{
	ah_sc = kupdev_create("anyherd", 1, AH_CHANS);
	if (ah_sc == NULL)
		return -ENOMEM;
	kupdev_notify(ah_sc);
	ah_ctl = kup_os_thread_start(ah_ctl_main, NULL, "kup-anyherd-ctl");
	if (ah_ctl == NULL) {
		kupdev_unload(ah_sc);
		return -ENOMEM;
	}
	return 0;
}

static void __exit
ah_exit(void)
{
	int t;

	kupdev_shutdown(ah_sc);   /* every wait answers -ESHUTDOWN */
	kup_os_thread_join(ah_ctl);
	for (t = 0; t < AH_THREADS; t++) {
		if (ah_thr[t] == NULL)
			continue;
		kup_os_thread_join(ah_thr[t]);
		kup_os_log("kup_anyherd: thread %d: served %d, idle wake-ups %u, "
		    "ended %d (chan %d)", t, ah_w[t].served,
		    ah_sc->chans[ah_w[t].ids[0]].any_idle_wakes,
		    ah_w[t].ended, ah_w[t].which);
	}
	kupdev_unload(ah_sc);
}

module_init(ah_init);
module_exit(ah_exit);
