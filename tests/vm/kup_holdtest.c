// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_holdtest.c -- a test-only Linux module, built and loaded by the VM
 * test (tests/vm/test_vm.py builds it against kup.ko's Module.symvers as
 * docs/linux.md's own modules are; guest_tests.sh loads it): what kup.ko
 * does when a module thread exits holding something (a module bug).  Two
 * things have a holder, and the parameter test= picks one:
 *
 *   test=mutex    a kup_mutex (the kmutex stage)
 *   test=channel  a channel's message, from kupdev_receive_msg to the
 *                 kupdev_unlock_channel that never comes (the kholder
 *                 stage; its user is `kup_kfault deadholder`)
 *
 * kup.ko keeps the holder to refuse a call by the holder that would
 * deadlock on itself (a second lock; a receive, send or pass on the
 * channel it holds: kup_reentered, -EDEADLK) and an unlock by another
 * thread.  On Linux a thread's identity is its task_struct, and a bare
 * pointer goes stale once the holder exits: its memory is freed and
 * reused for a new task, whose `current` then equals the stale holder --
 * that thread's unlock was taken for the holder's (it released a hold it
 * never took) and its lock or receive for a re-entry by the holder.  So
 * kup.ko pins the holder's task_struct for as long as it names it.  The
 * test: one thread takes the thing and exits; then batches of threads
 * (alive at the same time, so that a batch takes several freed
 * task_structs, the dead holder's among them if it is free) each act on
 * it as a stranger must be treated, and the module logs how many of them
 * ran in the dead holder's memory (0 while kup.ko pins it) and how many
 * were answered wrongly.  Init returns 0 (the verdict is the log's) unless
 * the setup itself failed.
 *
 * test=mutex: each thread calls kup_os_mutex_unlock, which must be
 * refused every time ("unlock: not held by this thread"; guest_tests.sh
 * counts the lines), and the final kup_os_mutex_free must find the mutex
 * still locked.  The mutex and the dead holder's task_struct stay
 * allocated, as they do for any module with this bug.
 *
 * test=channel: device "holdtest", two channels, a holder thread for
 * each: it passes the turn, receives the user's message and returns
 * without unlocking.  On holder A's channel each other thread must get
 * -EBUSY (another thread is in the channel), never -EDEADLK, from a
 * receive and a send; its kupdev_unlock_channel must be refused, which the
 * receive after it shows (-EAGAIN: the hold was let go).  Holder B is for
 * the count: the module keeps a reference of its own to B's task_struct
 * (so not A's: that would keep A's memory from reuse too) and logs the
 * count: 2 once B is gone (the module's and kup.ko's pin), and at rmmod,
 * after kupdev_unload freed the device (its user closed before), 1 -- the
 * pin went with the channel, the task_struct is not leaked.
 */
#include <linux/module.h>
#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/errno.h>
#include <linux/rcupdate.h>
#include <linux/refcount.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/string.h>
#include "kupdev.h"
#include "kup_module.h"

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("KUP test (tests/vm): a holder that exits holding a kup_mutex or a channel");
MODULE_SOFTDEP("pre: kup");

static char *test = "mutex";
module_param(test, charp, 0444);
MODULE_PARM_DESC(test, "mutex or channel");

#define HT_BATCH  8
#define HT_ROUNDS 32
#define HT_WAIT_MS 60000   /* for the user; generous: the VM runs under TCG */

static const void *ht_holder;          /* the dead holder: compared, never read */
static struct completion ht_go;        /* a batch may exit */

struct ht_other {
	int (*probe)(void);             /* what a stranger does: 0 answered right */
	struct completion ready;        /* its probe is done */
	int reused;                     /* it ran in the dead holder's memory */
	int wrong;
};

static int ht_other(void *arg)
{
	struct ht_other *o = arg;

	o->reused = (const void *)current == READ_ONCE(ht_holder);
	/* not the holder, whatever memory it runs in */
	o->wrong = o->probe();
	complete(&o->ready);
	wait_for_completion(&ht_go);
	return 0;
}

/* HT_ROUNDS batches of HT_BATCH threads running probe; *n: how many ran,
 * *reused: how many in the dead holder's memory, *wrong: answered wrong. */
static void ht_strangers(int (*probe)(void), int *n, int *reused, int *wrong)
{
	static struct ht_other o[HT_BATCH];
	struct kup_thread *t[HT_BATCH];
	int round, i;

	*n = *reused = *wrong = 0;
	init_completion(&ht_go);
	for (round = 0; round < HT_ROUNDS; round++) {
		/* the exited threads' task_structs are freed after a grace
		 * period, once their exit is complete */
		msleep(20);
		rcu_barrier();
		reinit_completion(&ht_go);
		for (i = 0; i < HT_BATCH; i++) {
			init_completion(&o[i].ready);
			o[i].probe = probe;
			o[i].reused = o[i].wrong = 0;
			t[i] = kup_os_thread_start(ht_other, &o[i], "ht-other");
			if (t[i] == NULL)
				break;
		}
		while (i < HT_BATCH)
			t[i++] = NULL;
		for (i = 0; i < HT_BATCH; i++)
			if (t[i] != NULL)
				wait_for_completion(&o[i].ready);
		complete_all(&ht_go);
		for (i = 0; i < HT_BATCH; i++) {
			if (t[i] == NULL)
				continue;
			kup_os_thread_join(t[i]);
			(*n)++;
			*reused += o[i].reused;
			*wrong += o[i].wrong;
		}
	}
}

/* ---- test=mutex ------------------------------------------------------ */

static struct kup_mutex *ht_mutex;

static int ht_mutex_hold_and_exit(void *arg)
{
	(void)arg;
	WRITE_ONCE(ht_holder, current);
	kup_os_mutex_lock(ht_mutex);     /* never unlocked: the bug on purpose */
	return 0;
}

static int ht_mutex_probe(void)
{
	kup_os_mutex_unlock(ht_mutex);   /* must be refused: the log says */
	return 0;
}

static int ht_mutex_test(void)
{
	struct kup_thread *t;
	int n, reused, wrong;

	ht_mutex = kup_os_mutex_new("kup-holdtest");
	if (ht_mutex == NULL)
		return -ENOMEM;
	t = kup_os_thread_start(ht_mutex_hold_and_exit, NULL, "ht-holder");
	if (t == NULL)
		return -ENOMEM;   /* (ht_mutex leaks: a test module) */
	kup_os_thread_join(t);
	ht_strangers(ht_mutex_probe, &n, &reused, &wrong);
	pr_info("kup_holdtest: mutex: %d unlocks by other threads, %d of them in the dead holder's memory\n",
	    n, reused);
	/* must find it still locked (by the dead holder) and leave it */
	kup_os_mutex_free(ht_mutex);
	pr_info("kup_holdtest: mutex: done\n");
	return 0;
}

/* ---- test=channel ---------------------------------------------------- */

static struct kupdev_softc *ht_sc;
static int ht_chan = -1;               /* the strangers' channel (holder A's) */
static struct task_struct *ht_task;    /* holder B, with our reference */
static atomic_t ht_first_wrong = ATOMIC_INIT(0);
static int ht_wrong_r[3];              /* the first wrong answers */

/* A holder: takes the channel its user attaches next, passes the turn,
 * receives the user's message and returns without unlocking.  A (observe
 * 0) is the strangers' dead holder: nothing but kup.ko keeps its
 * task_struct.  B (observe 1) takes a reference of ours first, to count
 * kup.ko's (which keeps B from being reused: only for the count). */
static int ht_chan_hold_and_exit(void *arg)
{
	int observe = (int)(uintptr_t)arg;
	struct kupdev_msg m;
	int ch, r;

	ch = kupdev_wait_channel_timeout(ht_sc, HT_WAIT_MS);
	if (ch < 0) {
		pr_info("kup_holdtest: channel: no user attached: %d\n", ch);
		return ch;
	}
	r = kupdev_pass(ht_sc, ch);
	if (r == 0)
		r = kupdev_receive_msg(ht_sc, ch, &m, HT_WAIT_MS);
	if (r != 0) {
		pr_info("kup_holdtest: channel: chan %d: no message from the user: %d\n",
		    ch, r);
		return r;
	}
	if (observe) {
		get_task_struct(current);
		WRITE_ONCE(ht_task, current);
	} else {
		WRITE_ONCE(ht_holder, current);
		WRITE_ONCE(ht_chan, ch);
	}
	pr_info("kup_holdtest: channel: chan %d: holding the user's message (%zu bytes); exiting\n",
	    ch, m.len);
	return 0;                       /* no kupdev_unlock_channel: the bug */
}

static int ht_chan_probe(void)
{
	struct kupdev_msg m;
	int r[3];

	/* another thread holds the channel: -EBUSY, not -EDEADLK (taken
	 * for the holder re-entering) */
	r[0] = kupdev_receive_msg(ht_sc, ht_chan, &m, 0);
	r[1] = kupdev_send(ht_sc, "x", 1, ht_chan);
	/* refused (logged); a receive then still finds the hold, not
	 * -EAGAIN (let go: the kernel's turn, its message consumed) */
	kupdev_unlock_channel(ht_sc, ht_chan);
	r[2] = kupdev_receive_msg(ht_sc, ht_chan, &m, 0);
	if (r[0] == -EBUSY && r[1] == -EBUSY && r[2] == -EBUSY)
		return 0;
	if (atomic_cmpxchg(&ht_first_wrong, 0, 1) == 0)
		memcpy(ht_wrong_r, r, sizeof(r));
	return 1;
}

/* Holder B's references: bounded wait for want (its own go after a grace
 * period, once its exit is complete; kup.ko's with the device). */
static int ht_task_refs(int want)
{
	int i, n = 0;

	for (i = 0; i < 500; i++) {
		rcu_barrier();
		n = refcount_read(&ht_task->usage);
		if (n == want)
			break;
		msleep(20);
	}
	return n;
}

static int ht_chan_holder(int observe)
{
	struct kup_thread *t;

	t = kup_os_thread_start(ht_chan_hold_and_exit, (void *)(uintptr_t)observe,
	    "ht-holder");
	if (t == NULL)
		return -ENOMEM;
	return kup_os_thread_join(t);
}

static int ht_chan_test(void)
{
	int n, reused, wrong;

	ht_sc = kupdev_create("holdtest", 1, 2);
	if (ht_sc == NULL)
		return -ENOMEM;
	kupdev_notify(ht_sc);
	pr_info("kup_holdtest: channel: device holdtest ready\n");
	if (ht_chan_holder(0) != 0 || ht_chan < 0 ||
	    ht_chan_holder(1) != 0 || ht_task == NULL) {
		kupdev_unload(ht_sc);
		ht_sc = NULL;
		if (ht_task != NULL)
			put_task_struct(ht_task);
		return -EIO;
	}
	pr_info("kup_holdtest: channel: holder task_struct references once it exited: %d (ours and the pin)\n",
	    ht_task_refs(2));
	ht_strangers(ht_chan_probe, &n, &reused, &wrong);
	pr_info("kup_holdtest: channel: %d other threads, %d of them in the dead holder's memory, %d answered wrong\n",
	    n, reused, wrong);
	if (wrong != 0)
		pr_info("kup_holdtest: channel: first wrong answers: receive %d, send %d, receive after unlock %d (want -EBUSY = %d)\n",
		    ht_wrong_r[0], ht_wrong_r[1], ht_wrong_r[2], -EBUSY);
	pr_info("kup_holdtest: channel: done\n");
	return 0;
}

static void ht_chan_fini(void)
{
	if (ht_sc == NULL)
		return;
	/* names the held channels; frees the device if its user has closed */
	kupdev_unload(ht_sc);
	pr_info("kup_holdtest: channel: holder task_struct references after unload: %d (ours)\n",
	    ht_task_refs(1));
	put_task_struct(ht_task);
}

static int __init ht_init(void)
{
	if (strcmp(test, "mutex") == 0)
		return ht_mutex_test();
	if (strcmp(test, "channel") == 0)
		return ht_chan_test();
	pr_err("kup_holdtest: test=%s: want mutex or channel\n", test);
	return -EINVAL;
}

static void __exit ht_exit(void)
{
	ht_chan_fini();
}

module_init(ht_init);
module_exit(ht_exit);
