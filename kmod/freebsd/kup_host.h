/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_host.h -- the FreeBSD kernel host's half of the kup_os.h contract:
 * the types and memory-ordering macros the OS-neutral core is compiled
 * against when it is built into kupdev.ko.
 *
 * Everything here is a thin mapping onto FreeBSD primitives:
 *   kup_lock_t           sx(9): a sleepable lock, because module code runs
 *                        between kupdev_receive and kupdev_unlock_channel
 *                        and may sleep (malloc M_WAITOK, copyout, ...).
 *   acquire/release      atomic(9) (atomic_load_acq_32 / atomic_store_rel_32,
 *                        atomic_thread_fence_seq_cst).
 *   struct kup_os_dev    the cdev, the list of open files, the sleep
 *                        interlock of kupdev_wait_channel.
 *   struct kup_os_chan   the channel's wired kernel pages, the sleep
 *                        interlock of the kernel side, and the open file
 *                        (if any) the channel is attached to.
 * The functions live in kup_freebsd.c.
 */
#ifndef KUP_HOST_H
#define KUP_HOST_H

#if !defined(_KERNEL)
#error "kmod/freebsd/kup_host.h is for the FreeBSD kernel (-D_KERNEL)"
#endif

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/errno.h>
#include <sys/lock.h>
#include <sys/mutex.h>
#include <sys/sx.h>
#include <sys/queue.h>
#include <sys/time.h>
#include <sys/proc.h>
#include <machine/atomic.h>
#include <machine/cpu.h>
#include <vm/vm.h>

/* A sleepable mutex. */
typedef struct sx kup_lock_t;

struct kup_fb_file;                 /* one open of /dev/kup/<name> */
LIST_HEAD(kup_fb_file_list, kup_fb_file);

struct kup_os_dev {
	struct cdev             *cdev;      /* /dev/kup/<name>, NULL if not published */
	struct mtx               mtx;       /* files list, dev sleep interlock */
	struct kup_fb_file_list  files;     /* every open file of this device */
	int                      wchan;     /* address slept on by wait_channel */
	int                      inited;    /* mtx initialised (publish ran) */
	/* copies for poll/kqueue filters, which run under a mutex and so
	 * cannot take the core's sx lock; refreshed by kup_os_dev_wake_user */
	volatile uint64_t        notify_gen;
	volatile u_int           shutdown;
};

/* kup_os.h: one kupdev_receive_any sleeper's wake-up object: its address
 * is the wait channel it sleeps on (the device mutex interlocks) */
struct kup_os_any {
	int                      wchan;
};

struct kup_os_chan {
	void                    *mem;       /* the pages: kmem_malloc, wired */
	size_t                   bytes;     /* their size */
	struct mtx               mtx;       /* sleep interlock; protects file */
	struct kup_fb_file      *file;      /* attached open file, or NULL */
	int                      wchan;     /* address slept on by the kernel side */
	int                      inited;    /* mtx initialised (mem_alloc ran) */
};

/*
 * Memory ordering on the shared page.  The core may pass const pointers
 * for loads; atomic(9) takes non-const volatile pointers, so loads strip
 * the qualifier with __DEQUALIFY (a load never writes).
 */
#define KUP_LOAD_ACQ32(p) \
	atomic_load_acq_32(__DEQUALIFY(volatile uint32_t *, (p)))
#define KUP_STORE_REL32(p, v) \
	atomic_store_rel_32((volatile uint32_t *)(p), (uint32_t)(v))
#define KUP_READ_ONCE32(p)     (*(const volatile uint32_t *)(p))
#define KUP_READ_ONCE64(p)     (*(const volatile uint64_t *)(p))
#define KUP_WRITE_ONCE32(p, v) \
	(*(volatile uint32_t *)(p) = (uint32_t)(v))
#define KUP_WRITE_ONCE64(p, v) \
	(*(volatile uint64_t *)(p) = (uint64_t)(v))
#define KUP_FENCE()            atomic_thread_fence_seq_cst()
#define KUP_CPU_RELAX()        cpu_spinwait()
/*
 * Optional in kup_os.h: with a clock the core's spin before sleeping is the
 * adaptive time budget kupsim uses (not a fixed loop count, whose length
 * would depend on the CPU), and maybe_yield() lets a user thread that
 * shares this CPU run while the module spins for its answer (the spin
 * runs under ch->lock, an sx lock, where yielding is allowed).
 * sbinuptime() reads the timecounter: cheap with the TSC.
 */
#define KUP_NOW_NS()           ((uint64_t)sbttons(sbinuptime()))
#define KUP_SPIN_YIELD()       maybe_yield()
/* kup_os.h: the calling thread's identity -- a serial number kept in the
 * thread's osd(9) slot (kup_freebsd.c, kup_fb_curthread), never reused.
 * Not curthread: FreeBSD cannot pin a struct thread, whose memory goes
 * back to the thread zone at exit and is handed to the next thread
 * created, so a holder that exited holding a channel (a module bug) left
 * an identity a new thread could have: its receive was refused as
 * re-entry and its unlock taken for the dead holder's.  The slot is
 * cleared when the thread is freed (thread_dtor's osd_thread_exit), so a
 * new thread in the same memory gets a new number. */
const void *kup_fb_curthread(void);
#define KUP_CURTHREAD()        kup_fb_curthread()
/* kup_os.h: take a kup_lock_t (an sx lock) only if free; an attach tries
 * ch->lock with it rather than sleeping uninterruptibly in sx_xlock */
#define KUP_LOCK_TRY(l)        (sx_try_xlock(l) != 0)

#endif /* KUP_HOST_H */
