/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_freebsd.c -- kupdev.ko: the OS-neutral KUP core (kmod/core/kup_core.c)
 * hosted in the FreeBSD kernel.
 *
 * This file implements kup_os.h / kup_module.h with FreeBSD primitives and
 * exposes every KUP device as /dev/kup/<name> (root only, 0600) speaking the
 * ioctl ABI of kmod/include/kup_ioctl.h.  It is deliberately thin: turns,
 * lengths, sequence numbers, attach rules and shutdown ordering all live in
 * the core; what is here is only what differs between kernels.
 *
 * Objects and their locks (lock order left to right; never the reverse):
 *
 *   kup_os_dev.mtx   per device: the list of open files, the interlock of
 *                    kupdev_wait_channel's sleep, the cached notify_gen /
 *                    shutdown copy used by poll and kqueue filters
 *   kup_os_chan.mtx  per channel: the interlock of the kernel side's sleep,
 *                    and which open file the channel is attached to
 *   kup_fb_file.mtx  per open file: its knlist (kqueue) and selinfo (poll),
 *                    the attached channel, the notify_gen it last saw, the
 *                    user wake-up pending on it (read(2) consumes it)
 *
 * A device's mutex and a channel's mutex are never held together.  The
 * core's sx locks (kup_lock_t) are never taken while any of these mutexes
 * is held: condition callbacks run under a mutex and only read memory.
 *
 * Lifetime:
 *   - open takes a core reference on the device.  ATTACH creates an
 *     attachment (struct kup_fb_att) referenced by the open file and, once
 *     mapped, by the device-pager object of its mappings; the last of the
 *     two to go detaches the channel -- the cdevpriv destructor at the last
 *     close of the file (process death included: the kernel closes every
 *     descriptor of a dying process), the pager destructor at the last
 *     munmap.  There is no pid polling anywhere.
 *   - kupdev_unload -> kup_os_dev_withdraw -> destroy_dev(9): waits for the
 *     threads currently inside our cdevsw methods (none of which sleeps for
 *     long), then runs the destructor of every still-open file, so after it
 *     returns no file refers to the device any more.  Later calls on such a
 *     descriptor fail with ENXIO in devfs itself; kqueue notes are dropped
 *     (knlist_delete), poll(2) wakes up.  kupdev_shutdown, which runs
 *     first, has already woken every waiter on both sides (EV_EOF too).
 *   - a process that still maps a channel keeps that attachment, and so
 *     the device's memory, alive after the unload; the pages are freed with
 *     the device at the last munmap.  Because that last munmap runs our
 *     pager destructor, kupdev.ko refuses to unload (EBUSY) while any
 *     channel is mapped, and while a device created through it exists.
 */
#include <sys/param.h>
#include <sys/systm.h>
#include <sys/kernel.h>
#include <sys/module.h>
#include <sys/conf.h>
#include <sys/malloc.h>
#include <sys/lock.h>
#include <sys/mutex.h>
#include <sys/sx.h>
#include <sys/rwlock.h>
#include <sys/proc.h>
#include <sys/kthread.h>
#include <sys/osd.h>
#include <sys/poll.h>
#include <sys/selinfo.h>
#include <sys/event.h>
#include <sys/filio.h>
#include <sys/fcntl.h>
#include <sys/ioccom.h>
#include <sys/uio.h>
#include <sys/time.h>
#include <machine/stdarg.h>

#include <vm/vm.h>
#include <vm/vm_param.h>
#include <vm/pmap.h>
#include <vm/vm_object.h>
#include <vm/vm_page.h>
#include <vm/vm_pager.h>
#include <vm/vm_extern.h>
#include <vm/vm_kern.h>

#include "kup_os.h"
#include "kup_ioctl.h"

MALLOC_DEFINE(M_KUP, "kup", "KUP kernel-user proxy");

/* Devices published through this module and not yet released. */
static volatile u_int kup_fb_ndevs;
/* Kernel threads started with kup_os_thread_start and not yet joined. */
static volatile u_int kup_fb_nthreads;
/* Open-file destructors running: their last device reference may free a
 * device -- megabytes of kmem_free in this module's code -- after that
 * device has left kup_fb_ndevs. */
static volatile u_int kup_fb_ndtors;
/* Interlock of kup_os_thread_join (global: a per-thread mutex could be
 * freed by the joiner while the exiting thread is still unlocking it). */
static struct mtx kup_fb_thr_mtx;

/* One open of /dev/kup/<name>: a device handle with at most one channel. */
struct kup_fb_att;
struct kup_fb_file {
	struct kupdev_softc     *sc;        /* core reference held */
	struct mtx               mtx;       /* knlist lock; att, ch, seen_gen,
	                                     * wake_pending, attaching */
	struct kup_fb_att       *att;       /* our attachment (one reference) */
	struct kup_chan         *ch;        /* att->ch, or NULL */
	uint64_t                 seen_gen;  /* notify_gen last seen by INFO or
	                                     * read(2) */
	int                      wake_pending; /* a user wake-up of the attached
	                                     * channel not yet read(2) */
	int                      attaching; /* an ATTACH is in progress */
	int                      listed;    /* on kup_os_dev.files */
	struct selinfo           sel;       /* poll(2) and kqueue(2) */
	LIST_ENTRY(kup_fb_file)  link;      /* under kup_os_dev.mtx */
};

static d_open_t     kup_fb_open;
static d_close_t    kup_fb_close;
static d_read_t     kup_fb_read;
static d_write_t    kup_fb_write;
static d_ioctl_t    kup_fb_ioctl;
static d_poll_t     kup_fb_poll;
static d_kqfilter_t kup_fb_kqfilter;
static d_mmap_single_t kup_fb_mmap_single;

static struct cdevsw kup_fb_cdevsw = {
	.d_version =     D_VERSION,
	.d_name =        "kup",
	.d_open =        kup_fb_open,
	.d_close =       kup_fb_close,
	.d_read =        kup_fb_read,
	.d_write =       kup_fb_write,
	.d_ioctl =       kup_fb_ioctl,
	.d_poll =        kup_fb_poll,
	.d_kqfilter =    kup_fb_kqfilter,
	.d_mmap_single = kup_fb_mmap_single,
};

static int  kup_fb_kqread(struct knote *kn, long hint);
static void kup_fb_kqdetach(struct knote *kn);

static struct filterops kup_fb_read_filtops = {
	.f_isfd =   1,
	.f_detach = kup_fb_kqdetach,
	.f_event =  kup_fb_kqread,
};

/* ======================================================================
 * kup_os.h: locks, memory, logging
 * ====================================================================== */

/* WITNESS classes locks by name: one name per role (kup_os.h), so that it
 * checks the core's order (channel, then registry, then device) instead
 * of seeing one class.  None is DUPOK: the core never holds two locks of
 * one role (a module thread relaying between two channels holds neither
 * channel's lock: kup_core.c), so two held together are a core bug that
 * WITNESS should report. */
static const char *const kup_lock_names[KUP_LOCK_NROLES] = {
	[KUP_LOCK_CHANNEL]  = "kup channel",
	[KUP_LOCK_REGISTRY] = "kup registry",
	[KUP_LOCK_DEVICE]   = "kup device",
};

void
kup_lock_init(kup_lock_t *l, enum kup_lock_role role)
{
	if ((unsigned int)role >= KUP_LOCK_NROLES)
		role = KUP_LOCK_DEVICE;   /* never: the core passes its enum */
	sx_init_flags(l, kup_lock_names[role], 0);
}

void
kup_lock_destroy(kup_lock_t *l)
{
	sx_destroy(l);
}

void
kup_lock(kup_lock_t *l)
{
	sx_xlock(l);
}

void
kup_unlock(kup_lock_t *l)
{
	sx_xunlock(l);
}

void *
kup_os_zalloc(size_t bytes)
{
	if (bytes == 0)
		return (NULL);
	return (malloc(bytes, M_KUP, M_WAITOK | M_ZERO));
}

void
kup_os_free(void *p, size_t bytes)
{
	(void)bytes;
	free(p, M_KUP);
}

uint32_t
kup_os_page_size(void)
{
	return (PAGE_SIZE);
}

void
kup_os_log(const char *fmt, ...)
{
	char buf[256];
	va_list ap;

	/* One printf per line so concurrent lines do not interleave.  The
	 * callers' formats are checked as printf(3) formats (kup_os.h); the
	 * kernel's vsnprintf is declared with the kernel printf format, a
	 * superset for everything the core uses (%s %d %u %zu %llu %x %p). */
	va_start(ap, fmt);
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wformat"
	vsnprintf(buf, sizeof(buf), fmt, ap);
#pragma clang diagnostic pop
	va_end(ap);
	printf("%s\n", buf);
}

/* ======================================================================
 * Channel memory and user mappings
 *
 * The pages of a channel are wired kernel memory (kmem_malloc), mapped
 * once into the kernel; the core works on that mapping.  User space maps
 * them through d_mmap_single, which must hand the VM system an object.
 * Why a device-pager object (cdev_pager_allocate, OBJT_DEVICE) per
 * attachment, and not an object that owns the pages (OBJT_PHYS / SWAP):
 * kup_ioctl.h's contract is that an attachment ends when the last
 * reference to it is gone -- descriptors AND mappings -- so that no
 * process can keep writing into a channel that a later user has attached.
 * A device-pager object tells us exactly that: its destructor runs when
 * the last mapping of it is gone (munmap, exec, exit).  The object is
 * keyed by the attachment, so a second mmap of the same attachment shares
 * it, and a new attachment of the channel gets a new one.  Its fault
 * handler hands out the physical pages of the kernel memory as fictitious
 * pages (as the kernel's own d_mmap-based device pager does); the memory
 * outlives every mapping because each attachment holds a reference on
 * the device, and the core frees channel memory only with the device.
 * The price: the destructor is code of this module, so kupdev.ko refuses
 * to unload (EBUSY) while any such object exists.  Physical contiguity
 * (contigmalloc) is not needed and would make large channels (up to
 * 2 * 4 MiB + a page) fail on fragmented memory.
 * ====================================================================== */

void *
kup_os_chan_mem_alloc(struct kupdev_softc *sc, struct kup_chan *ch, size_t bytes)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);
	void *mem;

	(void)sc;
	if (bytes == 0 || (bytes & PAGE_MASK) != 0) {
		kup_os_log("kup: channel size %zu is not a multiple of the page size",
		    bytes);
		return (NULL);
	}
	/* page-aligned, wired, zeroed kernel memory */
	mem = kmem_malloc((vm_size_t)bytes, M_WAITOK | M_ZERO);
	if (mem == NULL) {
		kup_os_log("kup: no memory for a channel of %zu bytes", bytes);
		return (NULL);
	}
	oc->mem = mem;
	oc->bytes = bytes;
	oc->file = NULL;
	mtx_init(&oc->mtx, "kupchan", NULL, MTX_DEF);
	oc->inited = 1;
	return (mem);
}

void
kup_os_chan_mem_free(struct kupdev_softc *sc, struct kup_chan *ch)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	(void)sc;
	/* Called with the device's last reference: no attachment, and so
	 * no user mapping of these pages, exists any more. */
	if (oc->mem != NULL) {
		kmem_free(oc->mem, (vm_size_t)oc->bytes);
		oc->mem = NULL;
		oc->bytes = 0;
	}
	if (oc->inited) {
		KASSERT(oc->file == NULL, ("kup: channel freed while attached"));
		mtx_destroy(&oc->mtx);
		oc->inited = 0;
	}
}

/*
 * One attachment of a channel to user space.  References: the open file
 * that attached it (until its last close) and the device-pager object of
 * its mappings (until the last munmap).  The last one detaches.
 */
struct kup_fb_att {
	struct kupdev_softc *sc;        /* core reference */
	struct kup_chan     *ch;
	void                *mem;       /* the channel's kernel mapping */
	size_t               bytes;
	volatile u_int       refs;
};

static void
kup_fb_att_rele(struct kup_fb_att *att)
{
	if (atomic_fetchadd_int(&att->refs, -1) != 1)
		return;
	/* the core marks the channel free and wakes the kernel side, which
	 * sees -EPIPE */
	kup_core_detach(att->ch);
	kup_core_dev_put(att->sc);
	free(att, M_KUP);
}

/* Serialises the creation of mapping objects (see kup_fb_mmap_single). */
static struct sx kup_fb_map_sx;
/* Mapping objects alive: their destructor is our code. */
static volatile u_int kup_fb_nmaps;

static int
kup_fb_pg_ctor(void *handle, vm_ooffset_t size, vm_prot_t prot,
    vm_ooffset_t foff, struct ucred *cred, u_short *color)
{
	struct kup_fb_att *att = handle;

	(void)size;
	(void)prot;
	(void)foff;
	(void)cred;
	/* Called once per object: kup_fb_mmap_single only allocates when
	 * no live object of this attachment exists (under kup_fb_map_sx). */
	atomic_add_int(&att->refs, 1);
	atomic_add_int(&kup_fb_nmaps, 1);
	*color = 0;
	return (0);
}

static void
kup_fb_pg_dtor(void *handle)
{
	struct kup_fb_att *att = handle;

	/* the last mapping of this attachment is gone */
	kup_fb_att_rele(att);
	atomic_subtract_int(&kup_fb_nmaps, 1);
}

/* Object locked on entry and exit; may drop it to allocate. */
static int
kup_fb_pg_fault(vm_object_t object, vm_ooffset_t offset, int prot,
    vm_page_t *mres)
{
	struct kup_fb_att *att = object->handle;
	vm_paddr_t paddr;
	vm_page_t page;

	(void)prot;
	if (offset < 0 || (uint64_t)offset >= att->bytes)
		return (VM_PAGER_FAIL);
	paddr = pmap_kextract((vm_offset_t)att->mem + (vm_offset_t)offset);
	if (((*mres)->flags & PG_FICTITIOUS) != 0) {
		/* a fake page already: point it at our page */
		page = *mres;
		vm_page_updatefake(page, paddr, object->memattr);
	} else {
		/* replace the placeholder with a fake page for our page */
		VM_OBJECT_WUNLOCK(object);
		page = vm_page_getfake(paddr, object->memattr);
		VM_OBJECT_WLOCK(object);
		vm_page_replace(page, object, (*mres)->pindex, *mres);
		*mres = page;
	}
	vm_page_valid(page);
	return (VM_PAGER_OK);
}

static struct cdev_pager_ops kup_fb_pg_ops = {
	.cdev_pg_ctor =  kup_fb_pg_ctor,
	.cdev_pg_dtor =  kup_fb_pg_dtor,
	.cdev_pg_fault = kup_fb_pg_fault,
};

/* ======================================================================
 * Sleeping and waking
 *
 * The condition is evaluated with the sleep mutex held and msleep drops
 * that mutex atomically with going to sleep; wakers take the same mutex
 * before wakeup(9).  A wake-up issued between the caller's last look and
 * the sleep therefore either happens before we take the mutex (and the
 * condition already holds) or finds us asleep.
 * ====================================================================== */

static int
kup_fb_sleep(struct mtx *mtx, void *wchan, const char *wmesg,
    int (*cond)(void *), void *arg, int timeout_ms)
{
	sbintime_t deadline = 0, now;
	int error, rc;

	if (timeout_ms > 0)
		deadline = getsbinuptime() + SBT_1MS * (sbintime_t)timeout_ms;
	mtx_lock(mtx);
	for (;;) {
		if (cond(arg)) {
			rc = 0;
			break;
		}
		if (timeout_ms == 0) {
			rc = -ETIMEDOUT;
			break;
		}
		if (timeout_ms > 0) {
			now = getsbinuptime();
			if (now >= deadline) {
				rc = -ETIMEDOUT;
				break;
			}
			error = msleep_sbt(wchan, mtx, PCATCH, wmesg,
			    deadline - now, SBT_1MS, 0);
		} else {
			error = msleep(wchan, mtx, PCATCH, wmesg, 0);
		}
		if (error == EINTR || error == ERESTART) {
			rc = cond(arg) ? 0 : -EINTR;
			break;
		}
		/* 0 (woken) or EWOULDBLOCK (timer): look again */
	}
	mtx_unlock(mtx);
	return (rc);
}

struct kup_fb_chan_cond {
	int (*cond)(struct kup_chan *);
	struct kup_chan *ch;
};

static int
kup_fb_chan_cond_call(void *arg)
{
	struct kup_fb_chan_cond *c = arg;

	return (c->cond(c->ch));
}

int
kup_os_chan_sleep(struct kup_chan *ch, int (*cond)(struct kup_chan *),
    int timeout_ms)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);
	struct kup_fb_chan_cond c = { cond, ch };

	return (kup_fb_sleep(&oc->mtx, &oc->wchan, "kupchan",
	    kup_fb_chan_cond_call, &c, timeout_ms));
}

/* A kupdev_receive_any asleep on ch is the core's to wake (its own wait
 * channel: kup_os_any_wake). */
void
kup_os_chan_wake(struct kup_chan *ch)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);

	if (!oc->inited)
		return;
	mtx_lock(&oc->mtx);
	wakeup(&oc->wchan);
	mtx_unlock(&oc->mtx);
}

/* kupdev_receive_any sleeps on a wait channel of its own (kup_os.h): the
 * address of its struct kup_os_any, with the device mutex as interlock,
 * which the sleeper holds from its look at the condition until msleep
 * drops it and kup_os_any_wake takes: no wake-up between the two is lost.
 * The core wakes it for the channels of its set only -- the user's
 * KUP_IOC_WAKE included -- and for kupdev_wake_any and the shutdown. */
int
kup_os_any_init(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	w->wchan = 0;
	return (0);
}

void
kup_os_any_fini(struct kupdev_softc *sc, struct kup_os_any *w)
{
	(void)sc;
	(void)w;
}

int
kup_os_any_sleep(struct kupdev_softc *sc, struct kup_os_any *w,
    const int *ids, int n, int (*cond)(void *), void *arg, int timeout_ms)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	(void)ids;
	(void)n;
	if (!od->inited)
		return (cond(arg) ? 0 : -ETIMEDOUT);
	return (kup_fb_sleep(&od->mtx, &w->wchan, "kupany", cond, arg,
	    timeout_ms));
}

void
kup_os_any_wake(struct kupdev_softc *sc, struct kup_os_any *w)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	if (!od->inited)
		return;
	mtx_lock(&od->mtx);
	wakeup(&w->wchan);
	mtx_unlock(&od->mtx);
}

/* Tell poll(2)/kqueue(2) waiters of one open file; its mutex is held. */
static void
kup_fb_file_notify_locked(struct kup_fb_file *f)
{
	mtx_assert(&f->mtx, MA_OWNED);
	selwakeup(&f->sel);
	KNOTE_LOCKED(&f->sel.si_note, 0);
}

/*
 * Like an eventfd: the wake-up stays pending on the attached open file (its
 * descriptor polls readable) until user space consumes it with read(2) --
 * libkup's drain.  Set under the file's mutex, which poll and the kqueue
 * filter also hold, so a poller either sees it or is on the selinfo /
 * knlist before selwakeup / KNOTE run.  No file (not attached yet, or
 * closed while still mapped): nobody can poll, nothing to remember.
 */
void
kup_os_chan_wake_user(struct kup_chan *ch)
{
	struct kup_os_chan *oc = kup_core_chan_os(ch);
	struct kup_fb_file *f;

	if (!oc->inited)
		return;
	mtx_lock(&oc->mtx);
	f = oc->file;
	if (f != NULL) {
		mtx_lock(&f->mtx);
		f->wake_pending = 1;
		kup_fb_file_notify_locked(f);
		mtx_unlock(&f->mtx);
	}
	mtx_unlock(&oc->mtx);
}

struct kup_fb_dev_cond {
	int (*cond)(struct kupdev_softc *);
	struct kupdev_softc *sc;
};

static int
kup_fb_dev_cond_call(void *arg)
{
	struct kup_fb_dev_cond *c = arg;

	return (c->cond(c->sc));
}

int
kup_os_dev_sleep(struct kupdev_softc *sc, int (*cond)(struct kupdev_softc *),
    int timeout_ms)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct kup_fb_dev_cond c = { cond, sc };

	if (!od->inited)
		return (cond(sc) ? 0 : -ESHUTDOWN);
	return (kup_fb_sleep(&od->mtx, &od->wchan, "kupwait",
	    kup_fb_dev_cond_call, &c, timeout_ms));
}

void
kup_os_dev_wake(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	if (!od->inited)
		return;
	mtx_lock(&od->mtx);
	wakeup(&od->wchan);
	mtx_unlock(&od->mtx);
}

void
kup_os_dev_wake_user(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct kup_ioc_info *info;
	struct kup_fb_file *f;

	if (!od->inited)
		return;
	/* Refresh the copy of notify_gen / shutdown that the kqueue filter
	 * reads under a mutex (it cannot take the core's sx lock).  The
	 * core calls this after every change of either, so the copy is
	 * never older than the last wake-up a watcher received. */
	info = malloc(sizeof(*info), M_KUP, M_WAITOK | M_ZERO);
	kup_core_info(sc, info);
	mtx_lock(&od->mtx);
	/* Both only ever grow; two racing callers must not let the older
	 * snapshot win (a stale notify_gen would keep every watcher that
	 * already read the newer one readable). */
	if (info->notify_gen > od->notify_gen)
		atomic_store_64(&od->notify_gen, info->notify_gen);
	if (info->shutting_down != 0)
		atomic_store_int(&od->shutdown, 1);
	LIST_FOREACH(f, &od->files, link) {
		mtx_lock(&f->mtx);
		kup_fb_file_notify_locked(f);
		mtx_unlock(&f->mtx);
	}
	mtx_unlock(&od->mtx);
	free(info, M_KUP);
}

/* ======================================================================
 * Module services (kup_module.h)
 * ====================================================================== */

void
kup_os_msleep(unsigned int ms)
{
	if (ms == 0)
		return;
	(void)pause_sbt("kupslp", SBT_1MS * (sbintime_t)ms, 0, 0);
}

/* kup_os.h: in the attaching thread's ioctl; C_CATCH: a signal ends the
 * sleep with EINTR or ERESTART, the timeout with EWOULDBLOCK */
int
kup_os_attach_pause(void)
{
	int error;

	error = pause_sbt("kupatt", SBT_1MS, 0, C_CATCH);
	return ((error == EINTR || error == ERESTART) ? -EINTR : 0);
}

/* the uptime clock: what user space reads as CLOCK_MONOTONIC */
uint64_t
kup_os_now_ns(void)
{
	struct timespec ts;

	nanouptime(&ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Module parameters are loader tunables / kenv(1) variables named
 * kup.<module>.<name>, e.g. kup.echo.channels="4" in /boot/loader.conf.
 * The value is parsed by the core, by the one rule of kup_module.h
 * (decimal only; malformed or out of range: logged, defval) -- not
 * getenv_int(), which takes "0x10", "010" and "4k" and silently gives
 * the default for anything it cannot read. */
int
kup_os_param_int(const char *module, const char *name, int defval)
{
	char var[96];
	char *v;
	int r;

	if (module == NULL || name == NULL)
		return (defval);
	if (snprintf(var, sizeof(var), "kup.%s.%s", module, name) >=
	    (int)sizeof(var)) {
		kup_os_log("kup: module %s: parameter %s: name too long for a "
		    "kenv variable: using the default %d", module, name, defval);
		return (defval);
	}
	v = kern_getenv(var);   /* a copy, or NULL when unset */
	if (v == NULL)
		return (defval);
	r = kup_core_param_value(module, name, var, v, strlen(v), defval);
	freeenv(v);
	return (r);
}

int
kup_os_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	/* checked as a printf(3) format (kup_module.h), given to the kernel's
	 * vsnprintf: as kup_os_log, a superset of what kup_module.h allows */
	va_start(ap, fmt);
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wformat"
	n = vsnprintf(buf, size, fmt, ap);
#pragma clang diagnostic pop
	va_end(ap);
	return (n);
}

/* ---- thread identity (kup_host.h, KUP_CURTHREAD) ----------------------
 *
 * A serial number per thread, in an osd(9) thread slot: the thread's first
 * call takes the next number; thread_dtor's osd_thread_exit clears the
 * slot before the struct thread's memory can be another thread's, so a
 * number names one thread only, for ever (64 bits do not wrap).  The core
 * keeps it in ch->holder, kup_mutex in its owner, after the thread may
 * have exited. */
static u_int kup_fb_td_slot;      /* OSD_THREAD slot: MOD_LOAD to MOD_UNLOAD */
static uint64_t kup_fb_td_serial; /* the last number handed out */

const void *
kup_fb_curthread(void)
{
	struct thread *td = curthread;
	void *v, **rsv;
	uint64_t id;

	v = osd_thread_get(td, kup_fb_td_slot);
	if (v != NULL)
		return (v);
	id = atomic_fetchadd_64(&kup_fb_td_serial, 1) + 1;
	/* reserved first (M_WAITOK: every caller may sleep), so the set
	 * cannot fail for want of memory */
	rsv = osd_reserve(kup_fb_td_slot);
	(void)osd_thread_set_reserved(td, kup_fb_td_slot, rsv,
	    (void *)(uintptr_t)id);
	return ((const void *)(uintptr_t)id);
}

static uint64_t
kup_fb_self(void)
{
	return ((uint64_t)(uintptr_t)kup_fb_curthread());
}

/* sx(9): a sleepable lock (its holder may sleep, as kup_module.h allows;
 * a mtx(9) holder may not).  sx_init keeps the name pointer: a copy.
 *
 * owner: the holder's kup_fb_curthread number, 0 when unlocked; set after
 * sx_xlock and cleared before sx_xunlock, by the holder.  Why not
 * sx_xlocked() (sx_xholder(sx) == curthread): a holder that exits without
 * unlocking (a module bug) leaves its struct thread's address in the lock
 * word, and the next thread created in that memory was taken for the
 * holder -- its unlock released the dead holder's lock, its lock was
 * refused as a double lock and it went on without the lock.  A number is
 * never reused, so owner == kup_fb_self() holds only for the thread that
 * locked it and has not unlocked it, even when read without the lock
 * (kup_linux.c pins the task_struct for the same reason). */
struct kup_mutex {
	struct sx sx;
	uint64_t  owner;
	char      name[32];
};

struct kup_mutex *
kup_os_mutex_new(const char *name)
{
	struct kup_mutex *m;

	m = malloc(sizeof(*m), M_KUP, M_WAITOK | M_ZERO);
	strlcpy(m->name, name != NULL ? name : "kup module", sizeof(m->name));
	sx_init(&m->sx, m->name);
	return (m);
}

/* sx(9) checks its holder only under INVARIANTS (a release kernel would
 * hang on a double lock, or release another thread's hold): check here,
 * by owner (above), say so, and leave the lock as it is. */
void
kup_os_mutex_lock(struct kup_mutex *m)
{
	uint64_t self = kup_fb_self();

	if (atomic_load_acq_64(&m->owner) == self) {
		kup_os_log("kup: mutex %s: lock: already held by this thread "
		    "(a module bug: not recursive)", m->name);
		return;
	}
	sx_xlock(&m->sx);
	atomic_store_rel_64(&m->owner, self);
}

void
kup_os_mutex_unlock(struct kup_mutex *m)
{
	if (atomic_load_acq_64(&m->owner) != kup_fb_self()) {
		kup_os_log("kup: mutex %s: unlock: not held by this thread "
		    "(a module bug; left as it is)", m->name);
		return;
	}
	atomic_store_rel_64(&m->owner, 0);
	sx_xunlock(&m->sx);
}

void
kup_os_mutex_free(struct kup_mutex *m)
{
	if (m == NULL)
		return;
	if (atomic_load_acq_64(&m->owner) != 0 ||
	    sx_xholder(&m->sx) != NULL) {
		/* left allocated: sx_destroy of a held lock panics an
		 * INVARIANTS kernel, and its holder may still unlock it */
		kup_os_log("kup: mutex %s: free: still locked (a module bug; not freed)",
		    m->name);
		return;
	}
	sx_destroy(&m->sx);
	free(m, M_KUP);
}

struct kup_thread {
	int  (*fn)(void *);
	void  *arg;
	int    ret;
	int    done;          /* under kup_fb_thr_mtx */
	struct thread *td;
};

static void
kup_fb_thread_main(void *arg)
{
	struct kup_thread *t = arg;
	int ret;

	ret = t->fn(t->arg);
	mtx_lock(&kup_fb_thr_mtx);
	t->ret = ret;
	t->done = 1;
	wakeup(t);
	mtx_unlock(&kup_fb_thr_mtx);
	kthread_exit();
}

struct kup_thread *
kup_os_thread_start(int (*fn)(void *), void *arg, const char *name)
{
	struct kup_thread *t;
	int error;

	if (fn == NULL)
		return (NULL);
	t = malloc(sizeof(*t), M_KUP, M_WAITOK | M_ZERO);
	t->fn = fn;
	t->arg = arg;
	atomic_add_int(&kup_fb_nthreads, 1);
	error = kthread_add(kup_fb_thread_main, t, NULL, &t->td, 0, 0,
	    "kup %s", name != NULL ? name : "thread");
	if (error != 0) {
		atomic_subtract_int(&kup_fb_nthreads, 1);
		free(t, M_KUP);
		kup_os_log("kup: kthread_add(%s): error %d",
		    name != NULL ? name : "thread", error);
		return (NULL);
	}
	return (t);
}

int
kup_os_thread_join(struct kup_thread *t)
{
	int ret;

	if (t == NULL)
		return (-EINVAL);
	mtx_lock(&kup_fb_thr_mtx);
	while (!t->done)
		mtx_sleep(t, &kup_fb_thr_mtx, 0, "kupjoin", 0);
	ret = t->ret;
	mtx_unlock(&kup_fb_thr_mtx);
	free(t, M_KUP);
	atomic_subtract_int(&kup_fb_nthreads, 1);
	return (ret);
}

/* ======================================================================
 * The device node
 * ====================================================================== */

int
kup_os_dev_publish(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct make_dev_args args;
	int error;

	mtx_init(&od->mtx, "kupdev", NULL, MTX_DEF);
	LIST_INIT(&od->files);
	od->notify_gen = 0;
	od->shutdown = 0;
	od->inited = 1;

	make_dev_args_init(&args);
	args.mda_devsw = &kup_fb_cdevsw;
	args.mda_flags = MAKEDEV_WAITOK | MAKEDEV_CHECKNAME;
	args.mda_uid = UID_ROOT;
	args.mda_gid = GID_WHEEL;
	args.mda_mode = 0600;
	args.mda_si_drv1 = sc;
	error = make_dev_s(&args, &od->cdev, "kup/%s", kup_core_dev_name(sc));
	if (error != 0) {
		/* kupdev_create frees the softc without a release call */
		od->cdev = NULL;
		od->inited = 0;
		mtx_destroy(&od->mtx);
		kup_os_log("kup: make_dev_s(/dev/kup/%s): error %d",
		    kup_core_dev_name(sc), error);
		return (-error);
	}
	atomic_add_int(&kup_fb_ndevs, 1);
	return (0);
}

void
kup_os_dev_withdraw(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct cdev *cdev = od->cdev;

	if (cdev == NULL)
		return;
	/* No new opens; threads inside our methods drain (none sleeps);
	 * every open file's destructor runs (detach + reference drop).
	 * Existing mappings stay valid: they reference the VM objects. */
	destroy_dev(cdev);
	od->cdev = NULL;
}

void
kup_os_dev_release(struct kupdev_softc *sc)
{
	struct kup_os_dev *od = kup_core_dev_os(sc);

	if (od->cdev != NULL)
		kup_os_dev_withdraw(sc);
	if (od->inited) {
		KASSERT(LIST_EMPTY(&od->files), ("kup: device released while open"));
		mtx_destroy(&od->mtx);
		od->inited = 0;
		atomic_subtract_int(&kup_fb_ndevs, 1);
	}
}

/* ---- per-open state ---------------------------------------------------- */

static void
kup_fb_file_dtor(void *arg)
{
	struct kup_fb_file *f = arg;
	struct kupdev_softc *sc = f->sc;
	struct kup_os_dev *od = kup_core_dev_os(sc);
	struct kup_os_chan *oc;
	struct kup_fb_att *att;

	atomic_add_int(&kup_fb_ndtors, 1);
	mtx_lock(&f->mtx);
	att = f->att;
	f->att = NULL;
	f->ch = NULL;
	mtx_unlock(&f->mtx);
	if (att != NULL) {
		oc = kup_core_chan_os(att->ch);
		mtx_lock(&oc->mtx);
		if (oc->file == f)
			oc->file = NULL;
		mtx_unlock(&oc->mtx);
		/* detaches now, or at the last munmap if still mapped */
		kup_fb_att_rele(att);
	}
	if (f->listed) {
		mtx_lock(&od->mtx);
		LIST_REMOVE(f, link);
		mtx_unlock(&od->mtx);
	}
	/* kqueue notes still registered on this file (destroy_dev runs us
	 * while it is open; a close has removed them already) are dropped,
	 * not cleared: a cleared note stays on its kqueue pointing at
	 * kup_fb_read_filtops, which dangles once kupdev.ko unloads, and the
	 * kqueue reads it when it drops the note.  kupdev_shutdown, before
	 * destroy_dev, has fired them with EV_EOF. */
	knlist_delete(&f->sel.si_note, curthread, 0);
	seldrain(&f->sel);
	knlist_destroy(&f->sel.si_note);
	mtx_destroy(&f->mtx);
	free(f, M_KUP);
	kup_core_dev_put(sc);
	atomic_subtract_int(&kup_fb_ndtors, 1);
}

static int
kup_fb_open(struct cdev *cdev, int oflags, int devtype, struct thread *td)
{
	struct kupdev_softc *dsc = cdev->si_drv1, *sc;
	struct kup_os_dev *od;
	struct kup_fb_file *f;
	int error;

	(void)oflags;
	(void)devtype;
	(void)td;
	if (dsc == NULL)
		return (ENXIO);
	/* destroy_dev waits for us, so dsc is alive; take a reference by
	 * name, which also refuses a device that is shutting down */
	sc = kup_core_dev_get(kup_core_dev_name(dsc));
	if (sc == NULL)
		return (ESHUTDOWN);
	if (sc != dsc) {
		kup_core_dev_put(sc);
		return (ENXIO);
	}
	od = kup_core_dev_os(sc);
	f = malloc(sizeof(*f), M_KUP, M_WAITOK | M_ZERO);
	f->sc = sc;
	mtx_init(&f->mtx, "kupfile", NULL, MTX_DEF);
	knlist_init_mtx(&f->sel.si_note, &f->mtx);
	mtx_lock(&od->mtx);
	f->seen_gen = atomic_load_64(&od->notify_gen);
	LIST_INSERT_HEAD(&od->files, f, link);
	f->listed = 1;
	mtx_unlock(&od->mtx);
	error = devfs_set_cdevpriv(f, kup_fb_file_dtor);
	if (error != 0)
		kup_fb_file_dtor(f);
	return (error);
}

static int
kup_fb_close(struct cdev *cdev, int fflag, int devtype, struct thread *td)
{
	/* Called on the last close of the node by anyone; per-file state is
	 * torn down by the cdevpriv destructor, which also covers processes
	 * that die without closing. */
	(void)cdev;
	(void)fflag;
	(void)devtype;
	(void)td;
	return (0);
}

/* ---- ioctl ------------------------------------------------------------- */

static int
kup_fb_ioc_attach(struct kup_fb_file *f, struct kup_ioc_attach *a)
{
	struct kup_ioc_info *info = NULL;
	const struct kup_ctrl *ctrl;
	struct kup_os_chan *oc;
	struct kup_fb_att *att;
	struct kup_chan *ch;
	size_t i;
	int error, rc;

	if (a->reserved_in != 0)
		return (EINVAL);
	for (i = 0; i < nitems(a->reserved); i++)
		if (a->reserved[i] != 0)
			return (EINVAL);
	mtx_lock(&f->mtx);
	if (f->ch != NULL || f->attaching) {
		mtx_unlock(&f->mtx);
		return (EBUSY);           /* one channel per open file */
	}
	f->attaching = 1;
	mtx_unlock(&f->mtx);

	info = malloc(sizeof(*info), M_KUP, M_WAITOK | M_ZERO);
	kup_core_info(f->sc, info);
	if (info->shutting_down) {
		error = ESHUTDOWN;
		goto out;
	}
	if (a->pages != 0 && a->pages != info->pages) {
		error = EINVAL;
		goto out;
	}
	/* The core checks the ABI version, the id and the announce state. */
	rc = kup_core_attach(f->sc, a->chan_id, a->abi_version, &ch);
	if (rc != 0) {
		error = -rc;
		goto out;
	}
	att = malloc(sizeof(*att), M_KUP, M_WAITOK | M_ZERO);
	kup_core_dev_ref(f->sc);
	att->sc = f->sc;
	att->ch = ch;
	att->mem = kup_core_chan_mem(ch);
	att->bytes = kup_core_chan_bytes(ch);
	att->refs = 1;                    /* the file's */
	oc = kup_core_chan_os(ch);
	mtx_lock(&oc->mtx);
	oc->file = f;
	mtx_unlock(&oc->mtx);

	ctrl = kup_core_chan_mem(ch);
	a->chan_id = kup_core_chan_id(ch);
	a->page_size = info->page_size;
	a->chan_count = info->chan_count;
	a->dev_pages = info->pages;
	a->map_offset = 0;
	a->map_size = kup_core_chan_bytes(ch);
	a->attach_gen = KUP_READ_ONCE64(&ctrl->attach_gen);
	mtx_lock(&f->mtx);
	f->att = att;
	f->ch = ch;
	mtx_unlock(&f->mtx);
	error = 0;
out:
	mtx_lock(&f->mtx);
	f->attaching = 0;
	mtx_unlock(&f->mtx);
	free(info, M_KUP);
	return (error);
}

static int
kup_fb_ioc_info(struct kup_fb_file *f, struct kup_ioc_info *ui)
{
	kup_core_info(f->sc, ui);
	mtx_lock(&f->mtx);
	if (f->ch != NULL)
		ui->attached_chan = kup_core_chan_id(f->ch);
	if (ui->notify_gen > f->seen_gen)   /* only forward (read(2) too) */
		f->seen_gen = ui->notify_gen;
	mtx_unlock(&f->mtx);
	return (0);
}

static int
kup_fb_ioctl(struct cdev *cdev, u_long cmd, caddr_t data, int fflag,
    struct thread *td)
{
	struct kup_fb_file *f;
	struct kup_chan *ch;
	int error;

	(void)cdev;
	(void)td;
	error = devfs_get_cdevpriv((void **)&f);
	if (error != 0)
		return (error);
	/* Taking a channel means writing into it: only on files opened for
	 * writing.  data is the kernel copy ioctl(2) made from the size
	 * encoded in cmd (copied out again after we return). */
	if ((cmd == KUP_IOC_ATTACH || cmd == KUP_IOC_WAKE) &&
	    (fflag & FWRITE) == 0)
		return (EBADF);
	switch (cmd) {
	case KUP_IOC_ATTACH:
		return (kup_fb_ioc_attach(f, (struct kup_ioc_attach *)data));
	case KUP_IOC_INFO:
		return (kup_fb_ioc_info(f, (struct kup_ioc_info *)data));
	case KUP_IOC_WAKE:
		mtx_lock(&f->mtx);
		ch = f->ch;
		mtx_unlock(&f->mtx);
		if (ch == NULL)
			return (EINVAL);
		kup_core_user_wake(ch);
		return (0);
	case FIONBIO:
		return (0);               /* nothing here ever blocks */
	case FIOASYNC:
		return (*(int *)data != 0 ? EINVAL : 0);
	default:
		return (ENOTTY);
	}
}

/* ---- mmap -------------------------------------------------------------- */

static int
kup_fb_mmap_single(struct cdev *cdev, vm_ooffset_t *offset, vm_size_t size,
    struct vm_object **objp, int nprot)
{
	struct kup_fb_file *f;
	struct kup_fb_att *att;
	vm_ooffset_t off = *offset;
	vm_object_t obj;
	int error;

	(void)cdev;
	error = devfs_get_cdevpriv((void **)&f);
	if (error != 0)
		return (error);
	mtx_lock(&f->mtx);
	att = f->att;
	mtx_unlock(&f->mtx);
	if (att == NULL)
		return (EINVAL);          /* attach first */
	if ((nprot & VM_PROT_EXECUTE) != 0)
		return (EINVAL);          /* data pages, never code */
	/* (MAP_PRIVATE never reaches us: vm_mmap_cdev refuses private
	 * mappings of character devices.) */
	/* [off, off + size) within the channel, compared without overflow */
	if (off < 0 || (off & PAGE_MASK) != 0 || size == 0 ||
	    size > att->bytes || (uint64_t)off > att->bytes - size)
		return (EINVAL);
	/* One live object per attachment: reuse it (referenced by the
	 * lookup, which skips a dying one), or make it -- its constructor
	 * takes the attachment reference that its destructor drops. */
	sx_xlock(&kup_fb_map_sx);
	obj = cdev_pager_lookup(att);
	if (obj == NULL)
		obj = cdev_pager_allocate(att, OBJT_DEVICE, &kup_fb_pg_ops,
		    (vm_ooffset_t)att->bytes, VM_PROT_READ | VM_PROT_WRITE, 0,
		    curthread->td_ucred);
	sx_xunlock(&kup_fb_map_sx);
	if (obj == NULL)
		return (ENOMEM);
	*objp = obj;                      /* the mapping's reference */
	return (0);
}

/* ---- the descriptor as an event counter: read / write / poll / kqueue ----
 *
 * Like an eventfd (kup_ioctl.h).  Attached file: readable while a wake-up
 * of the user side is pending -- kup_os_chan_wake_user (a hand-over seen
 * with user_waiting set, shutdown, the kernel giving up on this user) or
 * the user's own write(2) -- until read(2) consumes it.  Shutdown
 * (POLLIN|POLLHUP, EV_EOF) and a user the kernel gave up on (POLLIN|POLLERR;
 * kqueue has no error bit for a filter, so it stays readable) are final
 * states, not consumed.  Unattached file: readable while the device's
 * notify_gen is newer than the one this file last saw (INFO or read(2)),
 * POLLHUP / EV_EOF once shutting down.  read(2) never blocks: 8 bytes, a
 * uint64_t 1, or EAGAIN.  The channel page is writable by the user, so a
 * user that scribbles on its state word only confuses its own poll.
 */

/* What read(2) would consume now; f->mtx held. */
static int
kup_fb_file_pending(struct kup_fb_file *f)
{
	struct kup_os_dev *od = kup_core_dev_os(f->sc);

	mtx_assert(&f->mtx, MA_OWNED);
	if (f->ch != NULL)
		return (f->wake_pending != 0);
	/* both only grow: "newer", so a file that saw a later value through
	 * INFO than the poll copy holds is not told about it again */
	return (atomic_load_64(&od->notify_gen) > f->seen_gen);
}

/* Readable (pending, or a final state); *hup shutting down, *err the
 * kernel gave up on this user.  f->mtx held. */
static int
kup_fb_file_ready(struct kup_fb_file *f, int *hup, int *err)
{
	struct kup_os_dev *od = kup_core_dev_os(f->sc);
	const struct kup_ctrl *ctrl;
	uint32_t state;

	mtx_assert(&f->mtx, MA_OWNED);
	*hup = atomic_load_int(&od->shutdown) != 0;
	*err = 0;
	if (f->ch != NULL) {
		ctrl = kup_core_chan_mem(f->ch);
		state = KUP_READ_ONCE32(&ctrl->state);
		if ((state & KUP_STATE_SHUTDOWN) != 0)
			*hup = 1;
		if ((state & KUP_STATE_PEER_GONE) != 0)
			*err = 1;
	}
	return (*hup || *err || kup_fb_file_pending(f));
}

static int
kup_fb_read(struct cdev *cdev, struct uio *uio, int ioflag)
{
	struct kup_fb_file *f;
	struct kup_os_dev *od;
	uint64_t v = 0, old_gen = 0, new_gen = 0;
	int error, chan = 0;

	(void)cdev;
	(void)ioflag;             /* never blocks, O_NONBLOCK or not */
	error = devfs_get_cdevpriv((void **)&f);
	if (error != 0)
		return (error);
	if (uio->uio_resid < (ssize_t)sizeof(v))
		return (EINVAL);
	od = kup_core_dev_os(f->sc);
	mtx_lock(&f->mtx);
	if (kup_fb_file_pending(f)) {
		v = 1;
		if (f->ch != NULL) {
			chan = 1;
			f->wake_pending = 0;
		} else {
			old_gen = f->seen_gen;
			new_gen = atomic_load_64(&od->notify_gen);
			f->seen_gen = new_gen;
		}
	}
	mtx_unlock(&f->mtx);
	if (v == 0)
		return (EAGAIN);
	/* outside the mutex: copyout may fault */
	error = uiomove(&v, sizeof(v), uio);
	if (error != 0) {
		/* the caller never got it (a bad buffer): it stays pending, as
		 * on Linux -- at worst one spurious wake-up, never a lost one */
		mtx_lock(&f->mtx);
		if (chan) {
			f->wake_pending = 1;
			kup_fb_file_notify_locked(f);
		} else if (f->seen_gen == new_gen) {
			f->seen_gen = old_gen;
		}
		mtx_unlock(&f->mtx);
	}
	return (error);
}

/* libkup's self_wake: poll mode started while the turn was already the
 * user's, so no hand-over will wake it.  8 bytes, a non-zero uint64_t, on
 * an attached file; it wakes this file's pollers only, never the kernel
 * side (that is KUP_IOC_WAKE).  devfs has already refused a file not
 * opened for writing (EBADF). */
static int
kup_fb_write(struct cdev *cdev, struct uio *uio, int ioflag)
{
	struct kup_fb_file *f;
	uint64_t v;
	int error;

	(void)cdev;
	(void)ioflag;
	error = devfs_get_cdevpriv((void **)&f);
	if (error != 0)
		return (error);
	if (uio->uio_resid < (ssize_t)sizeof(v))
		return (EINVAL);
	error = uiomove(&v, sizeof(v), uio);
	if (error != 0)
		return (error);
	if (v == 0)
		return (EINVAL);
	mtx_lock(&f->mtx);
	if (f->ch == NULL) {
		mtx_unlock(&f->mtx);
		return (EINVAL);          /* no channel, no wake-up to make */
	}
	f->wake_pending = 1;
	kup_fb_file_notify_locked(f);
	mtx_unlock(&f->mtx);
	return (0);
}

static int
kup_fb_poll(struct cdev *cdev, int events, struct thread *td)
{
	struct kup_fb_file *f;
	int revents = 0, hup, err;

	(void)cdev;
	if (devfs_get_cdevpriv((void **)&f) != 0)
		return (events & (POLLIN | POLLRDNORM | POLLHUP)) | POLLNVAL;
	mtx_lock(&f->mtx);
	if (kup_fb_file_ready(f, &hup, &err))
		revents |= events & (POLLIN | POLLRDNORM);
	/* write(2) (a self-wake) never blocks: always writable, as an
	 * eventfd is on Linux */
	revents |= events & (POLLOUT | POLLWRNORM);
	if (hup)
		revents |= POLLHUP;
	if (err)
		revents |= POLLERR;
	/* not ready: be on the selinfo before the mutex is dropped, so the
	 * next wake-up (taken under the same mutex) cannot be missed */
	if (revents == 0 && (events & (POLLIN | POLLRDNORM)) != 0)
		selrecord(td, &f->sel);
	mtx_unlock(&f->mtx);
	return (revents);
}

static int
kup_fb_kqfilter(struct cdev *cdev, struct knote *kn)
{
	struct kup_fb_file *f;
	int error;

	(void)cdev;
	error = devfs_get_cdevpriv((void **)&f);
	if (error != 0)
		return (error);
	if (kn->kn_filter != EVFILT_READ)
		return (EINVAL);
	kn->kn_fop = &kup_fb_read_filtops;
	kn->kn_hook = f;
	knlist_add(&f->sel.si_note, kn, 0);
	return (0);
}

/* Level-triggered through the filter: it runs under the knlist lock
 * (f->mtx) both from KNOTE_LOCKED and when kevent(2) collects, so once
 * read(2) consumed the wake-up the note is dropped at the next collection
 * (unless the watcher asked for EV_CLEAR). */
static int
kup_fb_kqread(struct knote *kn, long hint)
{
	struct kup_fb_file *f = kn->kn_hook;
	int ready, hup, err;

	(void)hint;
	ready = kup_fb_file_ready(f, &hup, &err);
	if (hup)
		kn->kn_flags |= EV_EOF;
	/* what read(2) would return: 1 pending wake-up, or nothing */
	kn->kn_data = kup_fb_file_pending(f) ? 1 : 0;
	return (ready);
}

static void
kup_fb_kqdetach(struct knote *kn)
{
	struct kup_fb_file *f = kn->kn_hook;

	knlist_remove(&f->sel.si_note, kn, 0);
}

/* ======================================================================
 * Module glue
 * ====================================================================== */

static int
kupdev_modevent(module_t mod, int what, void *arg)
{
	int rc;

	(void)mod;
	(void)arg;
	switch (what) {
	case MOD_LOAD:
		/* no destructor: the slot holds a number, nothing to free */
		kup_fb_td_slot = osd_thread_register(NULL);
		if (kup_fb_td_slot == 0)
			return (ENOMEM);
		mtx_init(&kup_fb_thr_mtx, "kupthr", NULL, MTX_DEF);
		sx_init(&kup_fb_map_sx, "kupmap");
		rc = kup_core_init();
		if (rc != 0) {
			sx_destroy(&kup_fb_map_sx);
			mtx_destroy(&kup_fb_thr_mtx);
			osd_thread_deregister(kup_fb_td_slot);
			return (-rc);
		}
		return (0);
	case MOD_QUIESCE:
	case MOD_UNLOAD:
		/* Client modules depend on us (MODULE_DEPEND), so the kernel
		 * only lets us go once they are gone.  A device they unloaded
		 * lives on while a process still maps one of its channels
		 * (the mapping's destructor is our code): refuse until the
		 * last munmap. */
		if (atomic_load_int(&kup_fb_ndevs) != 0 ||
		    atomic_load_int(&kup_fb_nmaps) != 0 ||
		    atomic_load_int(&kup_fb_nthreads) != 0 ||
		    atomic_load_int(&kup_fb_ndtors) != 0)
			return (EBUSY);
		if (what == MOD_QUIESCE)
			return (0);
		kup_core_fini();
		sx_destroy(&kup_fb_map_sx);
		mtx_destroy(&kup_fb_thr_mtx);
		osd_thread_deregister(kup_fb_td_slot);
		return (0);
	case MOD_SHUTDOWN:
		return (0);
	default:
		return (EOPNOTSUPP);
	}
}

static moduledata_t kupdev_mod = {
	"kupdev",
	kupdev_modevent,
	NULL
};

DECLARE_MODULE(kupdev, kupdev_mod, SI_SUB_DRIVERS, SI_ORDER_MIDDLE);
MODULE_VERSION(kupdev, 1);
