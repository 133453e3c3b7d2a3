/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_host.h -- kupsim's side of the kup_os.h contract: the core runs in
 * an ordinary process, with pthread mutexes as sleepable locks, condition
 * variables for kernel-side sleeps, memfd for shareable channel memory and
 * eventfds for waking the user side.
 */
#ifndef KUP_HOST_H
#define KUP_HOST_H

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* The core's lock, with its role (kup_os.h, enum kup_lock_role): kupsim
 * checks the core's lock order at run time with it (kupsim_glue.c,
 * kup_lock), the check a kernel's lockdep or WITNESS makes. */
typedef struct {
	pthread_mutex_t m;
	int             role;
} kup_lock_t;
int kupsim_lock_try(kup_lock_t *l);

struct kup_os_dev {
	pthread_mutex_t m;      /* sleep mutex for kupdev_wait_channel */
	pthread_cond_t  cv;
	int             ready;  /* m/cv initialised (by publish) */
	int             ev_fd;  /* eventfd: device event for the server */
	void           *srv;    /* kupsim server's listener record */
};

struct kup_os_chan {
	int             memfd;  /* the channel pages */
	int             k2u_efd;/* kernel -> user wake-up */
	int             u2k_efd;/* user -> kernel wake-up (the user writes it;
	                         * kernel-side sleepers poll it) */
	int             kwake_efd;/* kup_os_chan_wake: detach, shutdown, new
	                         * attachment (never handed to a user) */
	void           *mem;
	size_t          bytes;
	int             renew_wanted;/* the server wants ch->lock to renew the
	                         * channel (kupsim_chan_renew_try found it
	                         * held) or to attach it (kupsim_chan_want_lock:
	                         * a parked ATTACH): a module thread letting go
	                         * of it kicks the server (__atomic) */
};

/* kup_os.h: one kupdev_receive_any sleeper's wake-up object, an eventfd
 * of its own (kupsim_glue.c, kup_os_any_sleep) */
struct kup_os_any {
	int             efd;
};

#define KUP_LOAD_ACQ32(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define KUP_STORE_REL32(p, v)  __atomic_store_n((p), (uint32_t)(v), __ATOMIC_RELEASE)
#define KUP_READ_ONCE32(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define KUP_READ_ONCE64(p)     __atomic_load_n((p), __ATOMIC_RELAXED)
#define KUP_WRITE_ONCE32(p, v) __atomic_store_n((p), (uint32_t)(v), __ATOMIC_RELAXED)
#define KUP_WRITE_ONCE64(p, v) __atomic_store_n((p), (uint64_t)(v), __ATOMIC_RELAXED)
#define KUP_FENCE()            __atomic_thread_fence(__ATOMIC_SEQ_CST)
#if defined(__x86_64__) || defined(__i386__)
#define KUP_CPU_RELAX()        __builtin_ia32_pause()
#elif defined(__aarch64__)
#define KUP_CPU_RELAX()        __asm__ __volatile__("yield" ::: "memory")
#else
#define KUP_CPU_RELAX()        do { } while (0)
#endif

/* Optional (kup_os.h): a cheap monotonic clock in ns; the core then spins
 * adaptively before a kernel-side sleep (kup_core.c). */
static inline uint64_t
kupsim_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
#define KUP_NOW_NS()           kupsim_now_ns()
/* Optional (kup_os.h): give the CPU to another runnable thread from inside
 * that spin.  When the scheduler has put the module thread on the CPU of
 * the user it waits for, spinning without yielding only delays the user
 * (kupsim echo pinned to one CPU with its C user, same run: round trip
 * 6.5 us without yields, 4.1 us with). */
#define KUP_SPIN_YIELD()       ((void)sched_yield())
/* kup_os.h: the calling thread's identity.  A serial number, taken on the
 * thread's first call from one counter (kupsim_glue.c) and kept in a
 * thread-local word: never 0, never reused.  Not the address of a
 * thread-local byte, as it was: glibc hands an exited thread's stack, and
 * its thread-local block with it, to the next thread it creates, so a
 * module thread that exited holding a channel left an identity a new
 * thread then had -- its receive was refused as re-entry (-EDEADLK) and
 * its unlock taken for the dead holder's. */
extern uint64_t kupsim_thread_serial;
/* One word per thread for the whole program (kupsim_glue.c), not a static
 * in this inline function: that would be one per file including this
 * header, and a thread would have another identity in each. */
extern __thread uint64_t kupsim_thread_id;

static inline const void *
kupsim_curthread(void)
{
	if (kupsim_thread_id == 0)
		kupsim_thread_id =
		    __atomic_add_fetch(&kupsim_thread_serial, 1, __ATOMIC_RELAXED);
	return (const void *)(uintptr_t)kupsim_thread_id;
}
#define KUP_CURTHREAD()        kupsim_curthread()

/* kup_os.h: the server thread renews a detached channel only if it can
 * take the channel lock at once and no module thread is in the channel
 * (it serves every device and must not wait for a module thread:
 * kupsim.h). */
#define KUP_LOCK_TRY(l)        kupsim_lock_try(l)
/* kup_os.h: an attach never waits in the server thread, which serves every
 * device.  It attaches only channels it has renewed and parks an ATTACH of
 * one still pending renewal; a renewed channel's lock may still be taken
 * for a moment by a worker of an earlier attachment calling into the core
 * (it sees the detach and lets go at once): the core's -EINPROGRESS then
 * parks the ATTACH the same way (kupsim_server.c do_attach) */
#define KUP_ATTACH_LETGO_MS    0U
/* kup_os.h: every attachment maps a fresh memfd (kupsim_chan_renew), all
 * zeroes: nothing of the previous user is left to clear.  The core's unit
 * test is also built with KUPSIM_REUSE_CHAN_MEM (no server, so no renewal:
 * the memory is reused), to run the core's clearing that the Linux and
 * FreeBSD hosts rely on. */
#ifndef KUPSIM_REUSE_CHAN_MEM
#define KUP_CHAN_MEM_FRESH     1
#endif
/* Optional (kup_os.h): a module thread let go of ch->lock; if the server
 * waits for it, wake the server.  Inline (one relaxed load when no renewal
 * waits: it runs on every receive, send and unlock); expanded only in
 * kup_core.c, where struct kup_chan is complete. */
void kupsim_server_kick(void);
static inline void
kupsim_chan_unlocked(struct kup_os_chan *os)
{
	if (__atomic_load_n(&os->renew_wanted, __ATOMIC_RELAXED))
		kupsim_server_kick();
}
#define KUP_CHAN_UNLOCKED(ch)  kupsim_chan_unlocked(&(ch)->os)

#endif /* KUP_HOST_H */
