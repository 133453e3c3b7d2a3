/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_module.h -- what a KUP kernel module (e.g. kmod/examples/echo) may use
 * besides kupdev.h.  One module source builds for every host (kupsim,
 * Linux, FreeBSD); this header is the whole portable surface:
 *
 *   - the two entry points every module defines:
 *         int  kup_module_init(void);   0 or a negative errno
 *         void kup_module_fini(void);
 *     kupsim dlopen()s the module and calls them; the Linux host wraps
 *     them in module_init/module_exit, FreeBSD in a DECLARE_MODULE handler.
 *   - allocation, logging, formatting, sleeping, a monotonic clock, module
 *     parameters, kernel threads and a mutex,
 *     implemented by each host (kmod/kupsim/kupsim_glue.c, kmod/linux,
 *     kmod/freebsd).  No libc: a module must not call printf/malloc/pthread.
 *
 * Unload rule for modules with threads: call kupdev_shutdown() (every
 * blocked or future kupdev_* call on the device then fails with
 * -ESHUTDOWN), join your threads, THEN kupdev_unload() (which drops the
 * module's reference; the softc may be freed after it returns).
 */
#ifndef KUP_MODULE_H
#define KUP_MODULE_H

#include "kupdev.h"

/* errno names (EPIPE, ESHUTDOWN, ...) for the module's error checks */
#if defined(__KERNEL__)
#include <linux/errno.h>
#elif defined(_KERNEL)
#include <sys/param.h>   /* NULL */
#include <sys/errno.h>
#else
#include <errno.h>
#endif

int  kup_module_init(void);
void kup_module_fini(void);

/* Zeroed memory, may sleep; NULL on failure.  Free with the same size;
 * kup_os_free(NULL, n) does nothing (on every host), so an init that
 * failed half way may free all it allocated without checking each. */
void *kup_os_zalloc(size_t bytes);
void  kup_os_free(void *p, size_t bytes);

/* printf-like log line (kupsim: stderr; Linux: printk; FreeBSD: printf). */
void kup_os_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Sleep (interruptible by nothing; keep it short). */
void kup_os_msleep(unsigned int ms);

/* A monotonic clock in nanoseconds: the one user space reads as
 * CLOCK_MONOTONIC (Linux: ktime_get_ns; FreeBSD: the uptime clock, which is
 * its CLOCK_MONOTONIC; kupsim: clock_gettime), so a module can stamp a
 * message with the time it was handed over. */
uint64_t kup_os_now_ns(void);

/* An integer module parameter.  One rule on every host (the core parses
 * it: kup_core_param_value):
 *   - unset or empty: defval, silently;
 *   - otherwise the value must be decimal: an optional '+' or '-', then
 *     digits, nothing else (no blanks, no "0x", and "010" is ten, not
 *     octal eight), within int (-2147483648..2147483647);
 *   - anything else is malformed or out of range: a log line names the
 *     module, the parameter, where it came from and the value, and the
 *     call returns defval.  Nothing refuses to load: check the log.
 * Where the value comes from:
 *   kupsim:  environment variable KUP_PARAM_<MODULE>_<NAME> (upper-cased);
 *   Linux:   kup.ko's parameter params="<module>.<name>=<value>,..."
 *            (e.g. modprobe kup params=echo.channels=4,echo.pages=2);
 *   FreeBSD: kenv(1) / loader tunable kup.<module>.<name>. */
int kup_os_param_int(const char *module, const char *name, int defval);

/* Kernel threads.  kup_os_thread_start runs fn(arg) in a new kernel thread
 * and returns a handle (NULL on failure); kup_os_thread_join waits until fn
 * has returned, frees the handle and returns fn's value.  Every started
 * thread must be joined exactly once. */
struct kup_thread;
struct kup_thread *kup_os_thread_start(int (*fn)(void *), void *arg,
    const char *name);
int kup_os_thread_join(struct kup_thread *t);

/* Rate-limited log lines, for what a user can make a module log at will
 * (one line per session end: a user that attaches and leaves in a loop
 * would otherwise write thousands of kernel log lines a second).  One
 * limiter per kind of line (or per module), shared by every thread:
 *
 *     static struct kup_ratelimit rl = KUP_RATELIMIT_INIT("echo", 20, 5000);
 *     kup_log_limited(&rl, "echo: chan %d: peer gone (-EPIPE)", c);
 *
 * At most `burst` lines are logged per window of `window_ms` ms (the
 * window opens with the first line after the previous one closed): the
 * first lines of a burst are kept, and the first line left out is replaced
 * by "<name>: further lines not logged for up to <window_ms> ms"; the
 * first line logged in a later window is preceded by "<name>: <N> lines
 * not logged".  Lock-free (atomics; never sleeps, but reads the clock and
 * may log): call it from any thread that may call kup_os_log.  Counting is
 * exact for one thread; threads racing at a window's edge may see a line
 * or two attributed to the neighbouring window.  kup_ratelimit_admit
 * says whether to log (1) or not (0), for a caller that does more than
 * one kup_os_log per event.  Implemented once, in the core. */
struct kup_ratelimit {
	const char  *name;        /* prefix of the limiter's own lines */
	unsigned int burst;       /* lines per window (0: none) */
	unsigned int window_ms;   /* window length (0: 1 ms) */
	/* the limiter's state: zero before the first line */
	uint64_t     start_ns;    /* kup_os_now_ns() when the window opened */
	unsigned int used;        /* lines asked for in the window */
	unsigned int missed;      /* lines left out, not yet reported */
};
#define KUP_RATELIMIT_INIT(name, burst, window_ms) \
	{ (name), (burst), (window_ms), 0, 0, 0 }

int kup_ratelimit_admit(struct kup_ratelimit *rl);
#define kup_log_limited(rl, ...) do {				\
	if (kup_ratelimit_admit(rl))				\
		kup_os_log(__VA_ARGS__);			\
} while (0)

/* Memory: the compiler's builtins, on every host (inline code, or a call
 * to the memcpy/memset/memcmp that the Linux and FreeBSD kernels and libc
 * all provide).  No other C library function is available. */
#define kup_memcpy(d, s, n) __builtin_memcpy((d), (s), (n))
#define kup_memset(d, c, n) __builtin_memset((d), (c), (n))
#define kup_memcmp(a, b, n) __builtin_memcmp((a), (b), (n))

/* snprintf(3) into buf: what a module needs to build a text reply.  The
 * conversions every host's kernel printf has: %d %i %u %x %X %c %s %p and
 * %%, with the l, ll and z length modifiers, widths and precisions; no
 * floating point (kernels have none), and no j (Linux's printf warns and
 * stops there).  Always NUL-terminates when size >
 * 0; returns the length the whole text needs (>= size: it was cut --
 * then buf holds size - 1 bytes of it: a reply sent with the returned
 * length would read past buf; kmod/examples/tally/tally.c, reply()). */
int kup_os_snprintf(char *buf, size_t size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A mutex for state a module's threads share (e.g. what every channel's
 * worker reads and updates).  The holder may sleep and call kupdev_*
 * (Linux: struct mutex; FreeBSD: sx(9); kupsim: an error-checking, robust
 * pthread mutex).  Not recursive.  Every host logs a lock by its holder (and
 * goes on holding it, where it would deadlock), an unlock by a thread that
 * does not hold it (and leaves it as it is, where it would release another
 * thread's hold) and a free of a locked mutex (which it leaves allocated),
 * naming the mutex; kupsim also tells the next locker of a mutex whose
 * holder thread exited without unlocking it, and hands it over (a kernel
 * hangs that locker; Linux at least never takes a later thread that got
 * the dead holder's memory for the holder: kup_linux.c, struct kup_mutex).
 * Never hold one across a call that waits for a user (kupdev_receive with
 * a timeout) that another thread needs the same mutex to answer: that is a
 * deadlock no host detects.
 *   kup_os_mutex_new: NULL when out of memory; name (copied, at most 31
 *     bytes kept) shows in the kernel's lock debugging;
 *   kup_os_mutex_free: the mutex must be unlocked; NULL is ignored. */
struct kup_mutex;
struct kup_mutex *kup_os_mutex_new(const char *name);
void kup_os_mutex_lock(struct kup_mutex *m);
void kup_os_mutex_unlock(struct kup_mutex *m);
void kup_os_mutex_free(struct kup_mutex *m);

#endif /* KUP_MODULE_H */
