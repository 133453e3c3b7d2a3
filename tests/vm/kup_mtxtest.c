// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_mtxtest.c -- a test-only Linux module, built and loaded by the VM
 * test (tests/vm/test_vm.py builds it against kup.ko's Module.symvers as
 * docs/linux.md's own modules are; guest_tests.sh's kmutex stage loads
 * it): kup.ko's kup_mutex after its holder thread exits without unlocking
 * it (a module bug).
 *
 * kup_mutex keeps its holder to refuse a second lock by the holder and an
 * unlock by another thread.  A bare task_struct pointer goes stale once
 * the holder exits: its memory is freed and reused for a new task, whose
 * `current` then equals the stale holder, and that thread's unlock was
 * taken for the holder's -- it released a lock it never took.  So: one
 * thread locks the mutex and exits; then batches of threads (alive at the
 * same time, so that the batch takes several freed task_structs, the dead
 * holder's among them if it is free) each call kup_os_mutex_unlock, which
 * must be refused every time ("unlock: not held by this thread"), and the
 * final kup_os_mutex_free must find the mutex still locked.  The module
 * logs how many of those threads ran in the dead holder's memory (0 when
 * kup.ko keeps it from being reused); guest_tests.sh checks the log.
 * Init returns 0 (the verdict is the log's); the mutex and the dead
 * holder's task_struct stay allocated, as they do for any module with
 * this bug.
 */
#include <linux/module.h>
#include <linux/atomic.h>
#include <linux/completion.h>
#include <linux/delay.h>
#include <linux/rcupdate.h>
#include <linux/sched.h>
#include "kup_module.h"

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("kup_mutex test (tests/vm): a holder that exits holding it");
MODULE_SOFTDEP("pre: kup");

#define MT_BATCH  8
#define MT_ROUNDS 32

static struct kup_mutex *kmt_dead;
static const void *kmt_holder;       /* the dead holder: compared, never read */
static struct completion kmt_go;     /* a batch may exit */

struct kmt_other {
	struct completion ready;        /* its unlock is done */
	int reused;                     /* it ran in the dead holder's memory */
};

static int kmt_hold_and_exit(void *arg)
{
	(void)arg;
	WRITE_ONCE(kmt_holder, current);
	kup_os_mutex_lock(kmt_dead);     /* never unlocked: the bug on purpose */
	return 0;
}

static int kmt_other(void *arg)
{
	struct kmt_other *o = arg;

	o->reused = (const void *)current == READ_ONCE(kmt_holder);
	/* not the holder, whatever memory it runs in: must be refused */
	kup_os_mutex_unlock(kmt_dead);
	complete(&o->ready);
	wait_for_completion(&kmt_go);
	return 0;
}

static int __init kmt_init(void)
{
	static struct kmt_other o[MT_BATCH];
	struct kup_thread *t[MT_BATCH];
	int round, i, n = 0, reused = 0;

	kmt_dead = kup_os_mutex_new("kup-mtxtest");
	if (kmt_dead == NULL)
		return -ENOMEM;
	init_completion(&kmt_go);
	t[0] = kup_os_thread_start(kmt_hold_and_exit, NULL, "mtx-holder");
	if (t[0] == NULL)
		return -ENOMEM;   /* (kmt_dead leaks: a test module) */
	kup_os_thread_join(t[0]);
	for (round = 0; round < MT_ROUNDS; round++) {
		/* the exited threads' task_structs are freed after a grace
		 * period, once their exit is complete */
		msleep(20);
		rcu_barrier();
		reinit_completion(&kmt_go);
		for (i = 0; i < MT_BATCH; i++) {
			init_completion(&o[i].ready);
			o[i].reused = 0;
			t[i] = kup_os_thread_start(kmt_other, &o[i], "mtx-other");
			if (t[i] == NULL)
				break;
		}
		while (i < MT_BATCH)
			t[i++] = NULL;
		for (i = 0; i < MT_BATCH; i++)
			if (t[i] != NULL)
				wait_for_completion(&o[i].ready);
		complete_all(&kmt_go);
		for (i = 0; i < MT_BATCH; i++) {
			if (t[i] == NULL)
				continue;
			kup_os_thread_join(t[i]);
			n++;
			reused += o[i].reused;
		}
	}
	pr_info("kup_mtxtest: %d unlocks by other threads, %d of them in the dead holder's memory\n",
	    n, reused);
	/* must find it still locked (by the dead holder) and leave it */
	kup_os_mutex_free(kmt_dead);
	pr_info("kup_mtxtest: done\n");
	return 0;
}

static void __exit kmt_exit(void)
{
}

module_init(kmt_init);
module_exit(kmt_exit);
