/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kupsim_glue.c -- kup_os.h and kup_module.h for kupsim.
 *
 * Kernel-side channel sleeps wait on eventfds, so that a user's wake-up
 * reaches the sleeping module thread in one hop: the sleeper polls the
 * channel's user->kernel eventfd (the user writes it after handing over
 * the turn and seeing kernel_waiting) and the channel's internal kwake
 * eventfd (kup_os_chan_wake: detach, shutdown, a new attachment, and
 * kup_core_user_wake from in-process tests).  No lost wake-up: the
 * sleeper drains both eventfds FIRST, then evaluates cond, then polls; a
 * wake-up written after the drain leaves the eventfd readable, one
 * written before it follows the state change cond looks at.  The core
 * lets one receive at a time wait on a channel (kup_os.h), so there is
 * one sleeper per channel and draining cannot steal another sleeper's
 * wake-up.  Device sleeps (kupdev_wait_channel) use a mutex + condition
 * variable: kup_os_dev_wake takes the mutex before broadcasting and the
 * sleeper evaluates cond under the same mutex.  User-side wake-ups: a
 * write to the channel's kernel->user eventfd (counting, so one that
 * arrives before the user polls is not lost either).
 *
 * Every attachment gets objects of its own: when one ends, the server
 * calls kupsim_chan_renew_try(), which (under the channel lock, if it is
 * free) maps a new memfd over the kernel side's mapping and puts new
 * eventfds behind the same descriptor numbers, so a previous holder that
 * kept its fds or its mapping can neither touch nor observe the next
 * user's channel (the Linux and FreeBSD hosts get the same by tying the
 * user's mapping to the attachment).  A channel whose lock a module
 * thread still holds is renewed when it lets go (kupsim_server.c).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kup_os.h"
#include "kupsim.h"

/* ---- locks ----------------------------------------------------------- */

/*
 * The core's lock order (kup_os.h: channel, then registry, then device),
 * checked at run time: a kernel checks it only with lockdep or WITNESS,
 * which the kernels the tests boot lack, and an inversion is a deadlock
 * waiting for the right interleaving.  Per thread, how many locks of each
 * role it holds; a waiting lock of a role while holding one of the same or
 * a later role is reported and aborts kupsim (a core bug).  That includes
 * a channel lock under another channel's: the core never nests them (a
 * module thread relaying between two channels holds neither lock), and
 * two channels' locks taken in opposite orders by two threads are the
 * deadlock a zero-copy relay once hit.  A try cannot deadlock and is not
 * checked, but counts as held.
 */
/* kup_host.h, kupsim_curthread: the last thread serial handed out, and
 * the calling thread's (0 until its first call) */
uint64_t kupsim_thread_serial;
__thread uint64_t kupsim_thread_id;

static __thread int kupsim_held[KUP_LOCK_NROLES];

static const char *const kupsim_lock_names[KUP_LOCK_NROLES] = {
	[KUP_LOCK_CHANNEL]  = "channel",
	[KUP_LOCK_REGISTRY] = "registry",
	[KUP_LOCK_DEVICE]   = "device",
};

static int
kupsim_role(const kup_lock_t *l)
{
	if (l->role < 0 || l->role >= KUP_LOCK_NROLES) {
		kup_os_log("kupsim: lock order: a lock of no role %d "
		    "(not initialised by kup_lock_init?)", l->role);
		abort();
	}
	return l->role;
}

static void
kupsim_lock_order(const kup_lock_t *l)
{
	int want = kupsim_role(l), r;

	for (r = want; r < KUP_LOCK_NROLES; r++) {
		if (kupsim_held[r] == 0)
			continue;
		kup_os_log("kupsim: lock order: taking a %s lock while holding "
		    "a %s lock (kup_os.h: channel, then registry, then device; "
		    "never two of one role)", kupsim_lock_names[want],
		    kupsim_lock_names[r]);
		abort();
	}
}

void
kup_lock_init(kup_lock_t *l, enum kup_lock_role role)
{
	pthread_mutex_init(&l->m, NULL);
	l->role = (int)role;
	(void)kupsim_role(l);
}

void
kup_lock_destroy(kup_lock_t *l)
{
	pthread_mutex_destroy(&l->m);
}

void
kup_lock(kup_lock_t *l)
{
	kupsim_lock_order(l);
	pthread_mutex_lock(&l->m);
	kupsim_held[l->role]++;
}

int
kupsim_lock_try(kup_lock_t *l)
{
	if (pthread_mutex_trylock(&l->m) != 0)
		return 0;
	kupsim_held[kupsim_role(l)]++;
	return 1;
}

void
kup_unlock(kup_lock_t *l)
{
	/* never below 0: a module thread that ended holding a channel
	 * (hostile's "leaklock") leaves its count behind with the thread */
	if (kupsim_held[l->role] > 0)
		kupsim_held[l->role]--;
	pthread_mutex_unlock(&l->m);
}

/* ---- memory ---------------------------------------------------------- */

void *
kup_os_zalloc(size_t bytes)
{
	return calloc(1, bytes != 0 ? bytes : 1);
}

void
kup_os_free(void *p, size_t bytes)
{
	(void)bytes;
	free(p);
}

uint32_t
kup_os_page_size(void)
{
	long p = sysconf(_SC_PAGESIZE);

	return p > 0 ? (uint32_t)p : 4096U;
}

static void
cond_init_mono(pthread_cond_t *cv)
{
	pthread_condattr_t a;

	pthread_condattr_init(&a);
	pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
	pthread_cond_init(cv, &a);
	pthread_condattr_destroy(&a);
}

/* A sealed memfd of bytes zeroed bytes for the pages of channel ch: a
 * user must not be able to shrink the file under us (SIGBUS) or grow it.
 * The descriptor, or -1 with errno set. */
static int
chan_memfd(struct kupdev_softc *sc, struct kup_chan *ch, size_t bytes)
{
	char name[64];
	int fd, e;

	snprintf(name, sizeof(name), "kup-%s-%u", kup_core_dev_name(sc),
	    kup_core_chan_id(ch));
	fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0)
		return -1;
	if (ftruncate(fd, (off_t)bytes) != 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
		e = errno;
		close(fd);
		errno = e;
		return -1;
	}
	return fd;
}

void *
kup_os_chan_mem_alloc(struct kupdev_softc *sc, struct kup_chan *ch, size_t bytes)
{
	struct kup_os_chan *os = kup_core_chan_os(ch);
	void *mem;

	os->memfd = os->k2u_efd = os->u2k_efd = os->kwake_efd = -1;
	os->memfd = chan_memfd(sc, ch, bytes);
	if (os->memfd < 0)
		goto fail;
	mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, os->memfd, 0);
	if (mem == MAP_FAILED)
		goto fail;
	os->k2u_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (os->k2u_efd < 0)
		goto fail_map;
	os->u2k_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (os->u2k_efd < 0)
		goto fail_map;
	os->kwake_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (os->kwake_efd < 0)
		goto fail_map;
	os->mem = mem;
	os->bytes = bytes;
	return mem;

fail_map:
	munmap(mem, bytes);
fail:
	kup_os_log("kupsim: channel memory for %s/%u: %s", kup_core_dev_name(sc),
	    kup_core_chan_id(ch), strerror(errno));
	if (os->memfd >= 0)
		close(os->memfd);
	if (os->k2u_efd >= 0)
		close(os->k2u_efd);
	if (os->u2k_efd >= 0)
		close(os->u2k_efd);
	if (os->kwake_efd >= 0)
		close(os->kwake_efd);
	os->memfd = os->k2u_efd = os->u2k_efd = os->kwake_efd = -1;
	return NULL;
}

void
kup_os_chan_mem_free(struct kupdev_softc *sc, struct kup_chan *ch)
{
	struct kup_os_chan *os = kup_core_chan_os(ch);

	(void)sc;
	if (os->mem == NULL)
		return;
	munmap(os->mem, os->bytes);
	close(os->memfd);
	close(os->k2u_efd);
	close(os->u2k_efd);
	close(os->kwake_efd);
	os->mem = NULL;
}

/* Put newfd's file on descriptor number oldfd (close-on-exec), dropping
 * what oldfd referred to, in one step: another thread using oldfd sees
 * either file, never a closed number.  EBUSY: Linux's answer when oldfd
 * is being opened concurrently; retried like EINTR.  0 or -1 (errno). */
static int
fd_replace(int newfd, int oldfd)
{
	int tries;

	for (tries = 0; tries < 100; tries++) {
		if (dup3(newfd, oldfd, O_CLOEXEC) == oldfd)
			return 0;
		if (errno != EINTR && errno != EBUSY)
			break;
	}
	return -1;
}

/*
 * Fresh user-visible objects for a channel (kupsim.h).  Runs under the
 * channel and device locks (kup_core_chan_exclusive_try; the device lock
 * orders the page's replacement with kupdev_shutdown's writes of the
 * state word), with the channel detached: no kernel-side operation is in
 * progress and any that starts sees the channel detached (-EPIPE) before
 * it touches the page, so nothing of the previous session reaches the
 * new objects, and no module thread is asleep in poll() on the old u2k
 * eventfd or spinning on the old page (a receive that waits is in the
 * channel, and kup_core_chan_exclusive_try does not run us then; the
 * detach woke it through kwake_efd).
 *
 * The objects change behind the same numbers and the same address:
 *   - the new memfd is mapped with MAP_FIXED over the old mapping (which
 *     that unmaps), so the core's ch->ctrl / k2u / u2k stay valid; its
 *     pages are zero, and kup_core_attach writes the control page of the
 *     next attachment into them (under the same lock) as it does on a
 *     channel that was never attached;
 *   - dup3() puts each new file on the old descriptor number (dropping
 *     our reference to the old file), so a descriptor number the core or
 *     a module thread holds on to never becomes closed or reused; the
 *     wake-ups themselves are serialised with this (kup_handover's under
 *     the channel lock, kupdev_shutdown's under the device lock).
 * The previous holder keeps only its own references: its mapping and
 * eventfds now lead nowhere the kernel side looks.  A failure leaves a
 * consistent channel (the kernel mapping is always the file of
 * os->memfd) but not a fresh one: -errno, and the caller must not hand
 * the channel out until a later renewal succeeds.
 */
static int
chan_renew_objects(struct kup_chan *ch)
{
	struct kup_os_chan *os = kup_core_chan_os(ch);
	struct kupdev_softc *sc = kup_core_chan_dev(ch);
	int mfd = -1, k2u = -1, u2k = -1, e = 0;

	if (os->mem == NULL)
		return -EINVAL;
	mfd = chan_memfd(sc, ch, os->bytes);
	if (mfd < 0)
		goto fail;
	k2u = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (k2u < 0)
		goto fail;
	u2k = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (u2k < 0)
		goto fail;
	if (fd_replace(k2u, os->k2u_efd) != 0 ||
	    fd_replace(u2k, os->u2k_efd) != 0)
		goto fail;
	if (mmap(os->mem, os->bytes, PROT_READ | PROT_WRITE,
	    MAP_SHARED | MAP_FIXED, mfd, 0) == MAP_FAILED)
		goto fail_remap;
	if (fd_replace(mfd, os->memfd) != 0)
		goto fail_remap;
	/* The new memfd's spare descriptor goes last: a second descriptor
	 * of a channel's memfd then means this renewal is still running,
	 * which is how a test (or an operator reading /proc) can tell a
	 * renewal under way from a leak. */
	close(k2u);
	close(u2k);
	close(mfd);
	return 0;

fail_remap:
	e = errno;
	/* A failed MAP_FIXED may already have unmapped the old range, and
	 * the core's pointers must never dangle: map os->memfd's file (the
	 * old one) there again.  Without that the process cannot go on. */
	if (mmap(os->mem, os->bytes, PROT_READ | PROT_WRITE,
	    MAP_SHARED | MAP_FIXED, os->memfd, 0) == MAP_FAILED) {
		kup_os_log("kupsim: %s/%u: channel mapping lost: %s",
		    kup_core_dev_name(sc), kup_core_chan_id(ch), strerror(errno));
		abort();
	}
	errno = e;
fail:
	e = errno != 0 ? errno : ENOMEM;
	kup_os_log("kupsim: %s/%u: fresh channel objects for the next "
	    "attachment: %s", kup_core_dev_name(sc), kup_core_chan_id(ch),
	    strerror(e));
	if (mfd >= 0)
		close(mfd);
	if (k2u >= 0)
		close(k2u);
	if (u2k >= 0)
		close(u2k);
	return -e;
}

static int
chan_renew_locked(struct kup_chan *ch)
{
	int r = chan_renew_objects(ch);

	/* -EBUSY and -EAGAIN mean "in use" and "deferred" to
	 * kupsim_chan_renew_try's caller; a failure that happens to be one of
	 * them is still a failure */
	return r == -EBUSY || r == -EAGAIN ? -EIO : r;
}

/*
 * The server's one thread must not wait for a module thread to leave a
 * channel (the module may compute for seconds between its receive and
 * kupdev_unlock_channel; every device's attach, detach and info would
 * wait with it), so the renewal only tries.  renew_wanted is set
 * first and cleared once the renewal ran: while it is set, a module thread
 * letting go of the channel kicks the server (KUP_CHAN_UNLOCKED, kup_host.h),
 * which tries again at once.  No fence pairs the flag with the try: a kick
 * missed that way costs the server's retry period (kupsim_server.c), not
 * the renewal.
 */
int
kupsim_chan_renew_try(struct kup_chan *ch, int force)
{
	struct kup_os_chan *os = kup_core_chan_os(ch);
	int r;

	__atomic_store_n(&os->renew_wanted, 1, __ATOMIC_RELAXED);
	r = kup_core_chan_exclusive_try(ch, chan_renew_locked,
	    force ? 0U : KUP_EXCL_KEEP_LEFT);
	/* -EAGAIN (deferred): the module's receive of what the user left
	 * lets go of the channel and kicks us, as a busy channel does */
	if (r != -EBUSY && r != -EAGAIN)
		__atomic_store_n(&os->renew_wanted, 0, __ATOMIC_RELAXED);
	return r;
}

void
kupsim_chan_want_lock(struct kup_chan *ch)
{
	/* cleared by the next renewal of ch, which runs after this
	 * attachment ends; until then an extra kick is harmless */
	__atomic_store_n(&kup_core_chan_os(ch)->renew_wanted, 1, __ATOMIC_RELAXED);
}

/* ---- sleeping and waking -------------------------------------------- */

static void efd_kick(int fd);

static void
deadline_after(struct timespec *ts, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	ts->tv_sec += ms / 1000;
	ts->tv_nsec += (long)(ms % 1000) * 1000000L;
	if (ts->tv_nsec >= 1000000000L) {
		ts->tv_sec++;
		ts->tv_nsec -= 1000000000L;
	}
}

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
efd_drain(int fd)
{
	uint64_t v;

	/* non-semaphore eventfd: one read takes the whole count */
	while (read(fd, &v, sizeof(v)) < 0 && errno == EINTR)
		;
}

int
kup_os_chan_sleep(struct kup_chan *ch, int (*cond)(struct kup_chan *),
    int timeout_ms)
{
	struct kup_os_chan *os = kup_core_chan_os(ch);
	int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;

	for (;;) {
		struct pollfd pf[2];
		int slice = -1;

		/* arm: consume old wake-ups, then look */
		efd_drain(os->u2k_efd);
		efd_drain(os->kwake_efd);
		if (cond(ch))
			return 0;
		if (timeout_ms == 0)
			return -ETIMEDOUT;
		if (timeout_ms > 0) {
			int64_t left = deadline - now_ms();

			if (left <= 0)
				return -ETIMEDOUT;
			slice = left > 0x7fffffff ? 0x7fffffff : (int)left;
		}
		pf[0] = (struct pollfd){ .fd = os->u2k_efd, .events = POLLIN };
		pf[1] = (struct pollfd){ .fd = os->kwake_efd, .events = POLLIN };
		if (poll(pf, 2, slice) < 0 && errno != EINTR) {
			kup_os_log("kupsim: kernel-side poll: %s", strerror(errno));
			return -EINTR;
		}
	}
}

/* kupdev_receive_any: the same sleep on every channel of the set at once
 * -- each channel's user->kernel eventfd (the user writes it itself,
 * without the core) and the sleeper's own eventfd (kup_os_any_wake: the
 * core's wake-ups of its channels, kupdev_wake_any, the shutdown), drained
 * first, then cond, then one poll of them all.  The thread is every one of
 * these channels' only kernel-side waiter (kup_os.h), so draining takes no
 * other sleeper's wake-up, and a wake-up of one channel reaches only the
 * thread whose set holds it. */
int
kup_os_any_init(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (w->efd < 0) {
		kup_os_log("kupsim: kupdev_receive_any: no eventfd to sleep on "
		    "(%s)", strerror(errno));
		return -EINTR;
	}
	return 0;
}

void
kup_os_any_fini(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	close(w->efd);
	w->efd = -1;
}

int
kup_os_any_sleep(struct kupdev_softc *sc, struct kup_os_any *w,
    const int *ids, int n, int (*cond)(void *), void *arg, int timeout_ms)
{
	int64_t deadline = timeout_ms > 0 ? now_ms() + timeout_ms : 0;
	struct pollfd *pf;
	int i, r;

	if (n < 0)
		return -EINVAL;
	pf = calloc((size_t)n + 1, sizeof(*pf));
	if (pf == NULL) {
		kup_os_log("kupsim: kupdev_receive_any: cannot sleep on %d "
		    "channels (no memory)", n);
		return -EINTR;
	}
	for (;;) {
		int slice = -1;

		efd_drain(w->efd);
		pf[n] = (struct pollfd){ .fd = w->efd, .events = POLLIN };
		for (i = 0; i < n; i++) {
			struct kup_os_chan *os =
			    kup_core_chan_os(kup_core_chan_at(sc, (uint32_t)ids[i]));

			efd_drain(os->u2k_efd);
			pf[i] = (struct pollfd){ .fd = os->u2k_efd,
			    .events = POLLIN };
		}
		if (cond(arg)) {
			r = 0;
			break;
		}
		if (timeout_ms == 0) {
			r = -ETIMEDOUT;
			break;
		}
		if (timeout_ms > 0) {
			int64_t left = deadline - now_ms();

			if (left <= 0) {
				r = -ETIMEDOUT;
				break;
			}
			slice = left > 0x7fffffff ? 0x7fffffff : (int)left;
		}
		if (poll(pf, (nfds_t)n + 1, slice) < 0 && errno != EINTR) {
			kup_os_log("kupsim: kernel-side poll: %s", strerror(errno));
			r = -EINTR;
			break;
		}
	}
	free(pf);
	return r;
}

void
kup_os_any_wake(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	efd_kick(w->efd);
}

void
kup_os_chan_wake(struct kup_chan *ch)
{
	efd_kick(kup_core_chan_os(ch)->kwake_efd);
}

static void
efd_kick(int fd)
{
	uint64_t one = 1;

	if (fd >= 0 && write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		kup_os_log("kupsim: eventfd write: %s", strerror(errno));
}

void
kup_os_chan_wake_user(struct kup_chan *ch)
{
	efd_kick(kup_core_chan_os(ch)->k2u_efd);
}

int
kup_os_dev_sleep(struct kupdev_softc *sc, int (*cond)(struct kupdev_softc *),
    int timeout_ms)
{
	struct kup_os_dev *os = kup_core_dev_os(sc);
	struct timespec dl;
	int r = 0;

	if (timeout_ms >= 0)
		deadline_after(&dl, timeout_ms);
	pthread_mutex_lock(&os->m);
	while (!cond(sc)) {
		if (timeout_ms < 0) {
			pthread_cond_wait(&os->cv, &os->m);
		} else if (pthread_cond_timedwait(&os->cv, &os->m, &dl) == ETIMEDOUT) {
			r = cond(sc) ? 0 : -ETIMEDOUT;
			break;
		}
	}
	pthread_mutex_unlock(&os->m);
	return r;
}

void
kup_os_dev_wake(struct kupdev_softc *sc)
{
	struct kup_os_dev *os = kup_core_dev_os(sc);

	pthread_mutex_lock(&os->m);
	pthread_cond_broadcast(&os->cv);
	pthread_mutex_unlock(&os->m);
}

void
kup_os_dev_wake_user(struct kupdev_softc *sc)
{
	efd_kick(kup_core_dev_os(sc)->ev_fd);
}

/* ---- device node: the server does the socket work ------------------- */

int
kup_os_dev_publish(struct kupdev_softc *sc)
{
	struct kup_os_dev *os = kup_core_dev_os(sc);

	pthread_mutex_init(&os->m, NULL);
	cond_init_mono(&os->cv);
	os->ev_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (os->ev_fd < 0)
		goto fail;
	if (kupsim_server_publish(sc) != 0)
		goto fail_fd;
	os->ready = 1;
	return 0;
fail_fd:
	close(os->ev_fd);
fail:
	os->ev_fd = -1;
	pthread_cond_destroy(&os->cv);
	pthread_mutex_destroy(&os->m);
	return -ENOMEM;
}

void
kup_os_dev_withdraw(struct kupdev_softc *sc)
{
	kupsim_server_withdraw(sc);
}

void
kup_os_dev_release(struct kupdev_softc *sc)
{
	struct kup_os_dev *os = kup_core_dev_os(sc);

	if (!os->ready)
		return;
	kupsim_server_release(sc);
	close(os->ev_fd);
	pthread_cond_destroy(&os->cv);
	pthread_mutex_destroy(&os->m);
	os->ready = 0;
}

/* ---- diagnostics and module helpers ---------------------------------- */

static pthread_mutex_t log_mu = PTHREAD_MUTEX_INITIALIZER;

void
kup_os_log(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&log_mu);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	fflush(stderr);
	pthread_mutex_unlock(&log_mu);
}

void
kup_os_msleep(unsigned int ms)
{
	struct timespec ts = { .tv_sec = ms / 1000,
	    .tv_nsec = (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* kup_os.h; never called here (KUP_ATTACH_LETGO_MS is 0: kup_host.h),
 * defined for the contract */
int
kup_os_attach_pause(void)
{
	kup_os_msleep(1);
	return 0;
}

uint64_t
kup_os_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/*
 * KUP_PARAM_<MODULE>_<NAME> (upper-cased), read by the one rule of
 * kup_module.h (kup_core_param_value): unset or empty is defval; a value
 * that is not a decimal int is logged and gives defval, as on the kernel
 * hosts -- kupsim used to refuse to start instead, which made a module
 * behave differently here than in a kernel.
 */
int
kup_os_param_int(const char *module, const char *name, int defval)
{
	char var[128];
	const char *v;
	size_t i;

	if (module == NULL || name == NULL)
		return defval;
	if (snprintf(var, sizeof(var), "KUP_PARAM_%s_%s", module, name) >=
	    (int)sizeof(var)) {
		kup_os_log("kupsim: module %s: parameter %s: name too long for "
		    "an environment variable: using the default %d", module,
		    name, defval);
		return defval;
	}
	for (i = 0; var[i] != '\0'; i++)
		var[i] = (char)toupper((unsigned char)var[i]);
	v = getenv(var);
	return kup_core_param_value(module, name, var, v,
	    v != NULL ? strlen(v) : 0, defval);
}

int
kup_os_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}

/* An error-checking mutex: where module authors test, a double lock or an
 * unlock by another thread is logged instead of hanging (a kernel would
 * hang or panic on it). */
struct kup_mutex {
	pthread_mutex_t mtx;
	char name[32];
};

struct kup_mutex *
kup_os_mutex_new(const char *name)
{
	struct kup_mutex *m = calloc(1, sizeof(*m));
	pthread_mutexattr_t attr;

	if (m == NULL)
		return NULL;
	snprintf(m->name, sizeof(m->name), "%s", name != NULL ? name : "?");
	pthread_mutexattr_init(&attr);
	pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
	/* robust: a thread that exits holding it is reported to the next
	 * locker (EOWNERDEAD), which would otherwise wait for ever -- and
	 * kupsim's unload with it, joining that waiter */
	pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
	if (pthread_mutex_init(&m->mtx, &attr) != 0) {
		pthread_mutexattr_destroy(&attr);
		free(m);
		return NULL;
	}
	pthread_mutexattr_destroy(&attr);
	return m;
}

void
kup_os_mutex_lock(struct kup_mutex *m)
{
	int e = pthread_mutex_lock(&m->mtx);

	if (e == EOWNERDEAD) {
		kup_os_log("kupsim: mutex %s: lock: the thread that held it exited "
		    "without unlocking it (a module bug: a kernel would hang here); "
		    "taken over", m->name);
		pthread_mutex_consistent(&m->mtx);
	} else if (e != 0)
		kup_os_log("kupsim: mutex %s: lock: %s (a module bug: a kernel "
		    "would hang here)", m->name, strerror(e));
}

void
kup_os_mutex_unlock(struct kup_mutex *m)
{
	int e = pthread_mutex_unlock(&m->mtx);

	if (e != 0)
		kup_os_log("kupsim: mutex %s: unlock: %s (a module bug: not "
		    "held by this thread)", m->name, strerror(e));
}

void
kup_os_mutex_free(struct kup_mutex *m)
{
	int e;

	if (m == NULL)
		return;
	/* a robust mutex's destroy does not check that it is unlocked: a
	 * trylock does (it fails EBUSY, EDEADLK for the holder itself, or
	 * EOWNERDEAD when a holder exited) */
	e = pthread_mutex_trylock(&m->mtx);
	if (e != 0) {
		/* left allocated: a held robust mutex is on its holder's robust
		 * list, which glibc (and the kernel, at the thread's exit) would
		 * go on writing through into freed memory */
		kup_os_log("kupsim: mutex %s: free: %s (a module bug: still "
		    "locked; not freed)", m->name, strerror(EBUSY));
		return;
	}
	pthread_mutex_unlock(&m->mtx);
	(void)pthread_mutex_destroy(&m->mtx);
	free(m);
}

struct kup_thread {
	pthread_t tid;
	int (*fn)(void *);
	void *arg;
	int ret;
};

static void *
thread_tramp(void *p)
{
	struct kup_thread *t = p;

	t->ret = t->fn(t->arg);
	return NULL;
}

struct kup_thread *
kup_os_thread_start(int (*fn)(void *), void *arg, const char *name)
{
	struct kup_thread *t = calloc(1, sizeof(*t));
	int e;

	if (t == NULL)
		return NULL;
	t->fn = fn;
	t->arg = arg;
	e = pthread_create(&t->tid, NULL, thread_tramp, t);
	if (e != 0) {
		kup_os_log("kupsim: thread %s: %s", name ? name : "?", strerror(e));
		free(t);
		return NULL;
	}
	if (name != NULL) {
		char n[16];
		snprintf(n, sizeof(n), "%s", name);
		pthread_setname_np(t->tid, n);
	}
	return t;
}

int
kup_os_thread_join(struct kup_thread *t)
{
	int r;

	if (t == NULL)
		return -EINVAL;
	pthread_join(t->tid, NULL);
	r = t->ret;
	free(t);
	return r;
}
