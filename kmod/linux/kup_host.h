/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_host.h -- the Linux kernel host's half of kmod/core/kup_os.h: types
 * and memory-ordering primitives for the OS-neutral core.  Everything else
 * of the host lives in kup_linux.c.
 */
#ifndef KUP_HOST_H
#define KUP_HOST_H

#include <linux/types.h>
#include <linux/errno.h>
#include <linux/string.h>
#include <linux/mutex.h>
#include <linux/sched.h>
#include <linux/sched/task.h>
#include <linux/wait.h>
#include <linux/compiler.h>
#include <linux/atomic.h>
#include <linux/timekeeping.h>
#include <asm/barrier.h>
#include <asm/processor.h>

#include "kup_abi.h"

typedef struct mutex kup_lock_t;

/* Host state embedded in every device (struct kupdev_softc). */
struct kup_os_dev {
	struct kupdev_softc *sc;      /* back pointer, set at publish */
	char name[KUP_NAME_MAX];      /* the device's name (for open) */
	int registered;               /* its node (kup_linux.c) was added */
	int withdrawn;                /* unload began: no new opens */
	int wq_ready;                 /* the wait queues below are initialised */
	wait_queue_head_t wq;         /* kernel-side sleepers (wait_channel) */
	wait_queue_head_t poll_wq;    /* user space: device events */
};

/* kup_os.h: one kupdev_receive_any sleeper's wake-up object */
struct kup_os_any {
	wait_queue_head_t wq;
};

/* Host state embedded in every channel (struct kup_chan). */
struct kup_os_chan {
	struct kup_chan *ch;          /* back pointer, set at mem alloc */
	void *mem;                    /* vmalloc_user() area */
	size_t bytes;
	wait_queue_head_t wq;         /* kernel-side sleepers */
	spinlock_t user_lock;         /* user_wq */
	wait_queue_head_t *user_wq;   /* the attached file's pollers (turn /
	                               * shutdown), NULL while unattached */
	atomic_t wake_pending;        /* a user wake-up not yet read(2) */
};

#define KUP_LOAD_ACQ32(p)      smp_load_acquire((const uint32_t *)(p))
#define KUP_STORE_REL32(p, v)  smp_store_release((uint32_t *)(p), (uint32_t)(v))
#define KUP_READ_ONCE32(p)     READ_ONCE(*(const uint32_t *)(p))
#define KUP_READ_ONCE64(p)     READ_ONCE(*(const uint64_t *)(p))
#define KUP_WRITE_ONCE32(p, v) WRITE_ONCE(*(uint32_t *)(p), (uint32_t)(v))
#define KUP_WRITE_ONCE64(p, v) WRITE_ONCE(*(uint64_t *)(p), (uint64_t)(v))
#define KUP_FENCE()            smp_mb()
#define KUP_CPU_RELAX()        cpu_relax()
/* optional in kup_os.h: a cheap monotonic clock for the core's adaptive
 * spin-before-sleep budget */
#define KUP_NOW_NS()           ((uint64_t)ktime_get_ns())
/* optional: let a user thread sharing this CPU run while the module spins
 * for its answer; the spin runs under ch->lock, a mutex, where
 * cond_resched() is allowed */
#define KUP_SPIN_YIELD()       cond_resched()
/* kup_os.h: the calling thread's identity: its task_struct, pinned while
 * ch->holder keeps it -- a holder that exits without unlocking (a module
 * bug) would otherwise leave freed memory there, which the next task may
 * get, and that task's receive was refused as re-entry and its unlock
 * taken for the dead holder's (kup_mutex in kup_linux.c: the same fix).
 * Unpinned by the holder's unlock, or, for a holder that exited holding
 * it, when the channel is freed with its device. */
#define KUP_CURTHREAD()        ((const void *)current)
#define KUP_CURTHREAD_PIN()    get_task_struct(current)
#define KUP_THREAD_UNPIN(id)   put_task_struct((struct task_struct *)(uintptr_t)(id))
/* kup_os.h: take a kup_lock_t (a mutex) only if free; an attach tries
 * ch->lock with it rather than sleeping unkillably in mutex_lock */
#define KUP_LOCK_TRY(l)        (mutex_trylock(l) != 0)

#endif /* KUP_HOST_H */
