/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * backend_kdev.c -- libkup's backend for a KUP kernel device node,
 * /dev/kup/<name>: Linux (kup.ko, kmod/linux; ops table kup_backend_linux)
 * and FreeBSD (kupdev.ko, kmod/freebsd; ops table kup_backend_freebsd).
 *
 * One file for both because both hosts implement the same ioctl ABI
 * (kmod/include/kup_ioctl.h) with the same file model, so the backend is
 * the same code; what differs is a handful of OS details, each marked
 * "OS:" below and fenced with #if __linux__ / __FreeBSD__ right where it
 * applies (a per-OS file plus a shared one would need hooks for three
 * small differences and hide them behind indirection):
 *   - errno after the device was destroyed (kd_err, kd_self_wake):
 *     Linux answers ESHUTDOWN from the module, which open files pin;
 *     FreeBSD's devfs answers ENXIO (and write(2) EIO) itself once
 *     destroy_dev ran;
 *   - FreeBSD maps the pages MAP_NOCORE (left out of core dumps);
 *   - which ops table this file defines (end of file).
 * Exactly one of them is built: kmod/Makefile and setup.py compile this
 * file with -DKUP_HAVE_BACKEND_LINUX on Linux, -DKUP_HAVE_BACKEND_FREEBSD
 * on FreeBSD (scripts/freebsd-check.sh cross-compiles the latter).
 *
 * Files: one open of the node per device handle (INFO, device events) and
 * one more per attached channel -- the kernel keeps per-open state (Linux
 * file->private_data, FreeBSD devfs_set_cdevpriv) and an open may attach
 * at most one channel.  The channel is detached when both its descriptor
 * is closed and its pages are unmapped (a dying process does both); detach
 * unmaps, then closes.
 *
 * Waiting: the channel descriptor is its own wait fd and behaves like an
 * eventfd (kup_ioctl.h): it polls readable while a wake-up from the kernel
 * side is pending (a hand-over seen with user_waiting set, shutdown, the
 * kernel giving up on us) until read(2) consumes it (drain); shutdown is
 * POLLHUP and the kernel giving up POLLERR, both for good.  write(2) makes
 * our own wake-up pending (self_wake: poll mode started while the turn is
 * already ours).  So kup.c's poll() works, and so does handing the fd
 * (kernproxy_fd) to an event loop: epoll on Linux, kqueue(2) EVFILT_READ
 * on FreeBSD (kupdev.ko's d_kqfilter; shutdown is EV_EOF there) -- without
 * the fd staying readable once the message is taken.  The device handle's
 * descriptor is readable when notify_gen moved past the one its last INFO
 * returned.
 */
#include <sys/types.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kup_backend.h"
#include "kup_ioctl.h"

#if !defined(__linux__) && !defined(__FreeBSD__)
#error "backend_kdev.c speaks to /dev/kup of the Linux or FreeBSD host only"
#endif

struct kd_dev {
	int  fd;              /* the device handle's own open file */
	char path[sizeof(KUP_DEV_DIR) + KUP_NAME_MAX + 256];
};

struct kd_chan {
	int fd;               /* the channel's open file (attach, mmap, wait) */
};

/* errno of a failed open/ioctl/mmap -> KUP_E_* (kup_ioctl.h's table). */
static int
kd_err(int e)
{
	switch (e) {
	case ENOENT:          return KUP_E_NOENT;
	case EAGAIN:          return KUP_E_NOTREADY;
	case EBUSY:           return KUP_E_BUSY;
	case EINPROGRESS:     return KUP_E_RELEASING;
	case EPROTONOSUPPORT: return KUP_E_VERSION;
	case ENOTTY:          return KUP_E_VERSION;
	case ESHUTDOWN:       return KUP_E_SHUTDOWN;
#if defined(__FreeBSD__)
	/* OS: devfs fails every call on a descriptor whose device was
	 * destroyed (module unloaded) with ENXIO, before the module sees it */
	case ENXIO:           return KUP_E_SHUTDOWN;
#endif
	case EINVAL:          return KUP_E_INVAL;
	default:              errno = e; return KUP_E_SYS;
	}
}

static int
kd_open_path(const char *path, int *fdp)
{
	struct stat st;
	int fd, e;

	/* Only a character device can be a KUP device.  Anything else -- a
	 * kupsim socket path (open(2) would fail), a FIFO (open would block),
	 * a regular file -- is "not ours", so that libkup falls back to its
	 * next backend. */
	if (stat(path, &st) != 0)
		return kd_err(errno);
	if (!S_ISCHR(st.st_mode))
		return KUP_E_NOENT;
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		e = errno;
		/* the node exists but the device is on its way out (Linux:
		 * ENODEV from kup.ko's open; ENXIO from a dead node) */
		if (e == ENODEV || e == ENXIO)
			return KUP_E_SHUTDOWN;
		return kd_err(e);
	}
	if (fstat(fd, &st) != 0) {
		e = errno;
		close(fd);
		return kd_err(e);
	}
	if (!S_ISCHR(st.st_mode)) {
		close(fd);
		return KUP_E_NOENT;   /* replaced since the stat */
	}
	*fdp = fd;
	return KUP_E_OK;
}

static int
kd_info_raw(int fd, struct kup_ioc_info *ii)
{
	memset(ii, 0, sizeof(*ii));
	if (ioctl(fd, KUP_IOC_INFO, ii) != 0)
		return -1;
	ii->name[sizeof(ii->name) - 1] = '\0';
	return 0;
}

static int
kd_open(const char *name, void **devp)
{
	struct kd_dev *d;
	struct kup_ioc_info ii;
	int r, n;

	if (name == NULL || name[0] == '\0')
		return KUP_E_INVAL;
	d = calloc(1, sizeof(*d));
	if (d == NULL)
		return KUP_E_SYS;
	d->fd = -1;
	if (strchr(name, '/') != NULL)
		n = snprintf(d->path, sizeof(d->path), "%s", name);
	else if (strlen(name) >= KUP_NAME_MAX)
		n = -1;
	else
		n = snprintf(d->path, sizeof(d->path), KUP_DEV_DIR "/%s", name);
	if (n < 0 || (size_t)n >= sizeof(d->path)) {
		r = KUP_E_NOENT;      /* no device can have such a name */
		goto fail;
	}
	r = kd_open_path(d->path, &d->fd);
	if (r != KUP_E_OK)
		goto fail;
	/* a KUP device answers INFO; any other character device does not */
	if (kd_info_raw(d->fd, &ii) != 0) {
		r = (errno == ENOTTY || errno == EINVAL) ? KUP_E_NOENT :
		    kd_err(errno);
		goto fail;
	}
	*devp = d;
	return KUP_E_OK;
fail:
	if (d->fd >= 0) {
		int e = errno;
		close(d->fd);
		errno = e;
	}
	free(d);
	return r;
}

static int
kd_info(void *dev, struct kernproxy_info *out)
{
	struct kd_dev *d = dev;
	struct kup_ioc_info ii;

	if (kd_info_raw(d->fd, &ii) != 0)
		return kd_err(errno);
	_Static_assert(sizeof(out->name) == sizeof(ii.name), "name size");
	_Static_assert(sizeof(out->attached) == sizeof(ii.attached),
	    "attached size");
	memset(out, 0, sizeof(*out));
	memcpy(out->name, ii.name, sizeof(out->name));
	out->abi_version = ii.abi_version;
	out->page_size = ii.page_size;
	out->chan_count = ii.chan_count;
	out->announced = ii.announced;
	out->pages = ii.pages;
	out->max_msg = ii.max_msg;
	out->notify_gen = ii.notify_gen;
	out->shutting_down = ii.shutting_down;
	memcpy(out->attached, ii.attached, sizeof(out->attached));
	return KUP_E_OK;
}

/* The device handle's device is gone or going (module unloaded or
 * unloading): its descriptor polls POLLHUP for good -- Linux kup.ko's poll
 * on an unattached file once the device is shutting down or gone; FreeBSD
 * kupdev.ko's the same while shutting down, and devfs's own (POLLHUP, or
 * POLLNVAL from our d_poll without cdevpriv) once destroy_dev ran.  Poll
 * has no side effect, unlike INFO (which takes the handle's device event).
 * An attach asks this because it opens the node by path again: after an
 * unload the path names nothing (ENOENT, "no such channel" to the caller)
 * or, once the module is loaded again, ANOTHER device -- neither is this
 * handle's, which says EKU_SHUTDOWN for good, as kupsim's does
 * (backend_sim.c, sim_dev_gone); the caller opens the device again. */
static int
kd_dev_gone(const struct kd_dev *d)
{
	struct pollfd p = { .fd = d->fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLNVAL)) != 0;
}

/* How long an attach asks again after signals interrupted the kernel's
 * wait for a module to let go of the channel: twice that wait (500 ms). */
#define KD_ATTACH_RETRY_MS 1000

static int
kd_attach(void *dev, uint32_t chan_id, uint32_t abi_version, uint32_t pages,
    struct kup_backend_chan *out)
{
	struct kd_dev *d = dev;
	struct kd_chan *c;
	struct kup_ioc_attach a;
	int64_t retry_until;
	long psz = sysconf(_SC_PAGESIZE);
	int map_flags = MAP_SHARED;
	void *mem;
	int fd = -1, r;

#if defined(__FreeBSD__)
	/* OS: a core dump of the process leaves the channel pages out */
	map_flags |= MAP_NOCORE;
#endif
	if (kd_dev_gone(d))
		return KUP_E_SHUTDOWN;
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return KUP_E_SYS;
	r = kd_open_path(d->path, &fd);
	if (r != KUP_E_OK) {
		/* the node went between the look above and the open: the
		 * unload it came from has made the handle hang up by now
		 * (Linux withdraws the node after marking the device gone;
		 * FreeBSD's destroy_dev does both) */
		if (r == KUP_E_NOENT && kd_dev_gone(d))
			r = KUP_E_SHUTDOWN;
		goto fail;
	}
	memset(&a, 0, sizeof(a));
	a.abi_version = abi_version;
	a.chan_id = chan_id == KUP_CHAN_ANY_WIRE ? KUP_IOC_CHAN_ANY : chan_id;
	a.pages = pages;
	/* EINTR: the wait for the kernel side to let go of the channel
	 * (bounded, interruptible) met a signal whose handler has run.  Each
	 * ioctl starts the kernel's wait afresh: a process signalled more
	 * often than that wait (a profiler's SIGPROF, a runtime's preemption
	 * signal) would ask for ever, so the retries share one deadline, past
	 * which the answer is the kernel's own: still releasing. */
	for (retry_until = 0; ioctl(fd, KUP_IOC_ATTACH, &a) != 0;) {
		if (errno == EINTR) {
			if (retry_until == 0)
				retry_until = kup_now_ms() + KD_ATTACH_RETRY_MS;
			else if (kup_now_ms() >= retry_until) {
				r = KUP_E_RELEASING;
				goto fail;
			}
			continue;
		}
		r = kd_err(errno);
		goto fail;
	}
	/* what the kernel answered is checked before it is used */
	if (psz <= 0 || a.map_size < KUP_CTRL_SIZE ||
	    a.map_size > (uint64_t)SIZE_MAX ||
	    a.map_size % (uint64_t)psz != 0 ||
	    a.map_offset % (uint64_t)psz != 0 ||
	    a.map_offset > (uint64_t)INT64_MAX - a.map_size ||
	    (chan_id != KUP_CHAN_ANY_WIRE && a.chan_id != chan_id)) {
		r = KUP_E_PROTO;
		goto fail;
	}
	mem = mmap(NULL, (size_t)a.map_size, PROT_READ | PROT_WRITE, map_flags,
	    fd, (off_t)a.map_offset);
	if (mem == MAP_FAILED) {
		r = kd_err(errno);
		goto fail;
	}
	c->fd = fd;
	out->mem = mem;
	out->bytes = (size_t)a.map_size;
	out->chan_id = a.chan_id;
	out->wait_fd = fd;
	out->hup_fd = -1;     /* shutdown arrives as POLLHUP on wait_fd */
	out->priv = c;
	return KUP_E_OK;
fail:
	if (fd >= 0) {
		int e = errno;
		close(fd);    /* detaches, if the attach had succeeded */
		errno = e;
	}
	free(c);
	return r;
}

static int
kd_wake(struct kup_backend_chan *ch)
{
	struct kd_chan *c = ch->priv;

	if (c == NULL)
		return KUP_E_INVAL;
	if (ioctl(c->fd, KUP_IOC_WAKE) != 0)
		return kd_err(errno);
	return KUP_E_OK;
}

static int
kd_drain(struct kup_backend_chan *ch)
{
	struct kd_chan *c = ch->priv;
	uint64_t v;

	/* read(2) consumes the pending wake-up (never blocks: EAGAIN when
	 * there is none); errors are harmless here, the page is the truth */
	return c != NULL && read(c->fd, &v, sizeof(v)) == (ssize_t)sizeof(v);
}

/* Make wait_fd readable now: write(2) of a non-zero count on the channel
 * descriptor makes our own wake-up pending, as on an eventfd. */
static int
kd_self_wake(struct kup_backend_chan *ch)
{
	struct kd_chan *c = ch->priv;
	uint64_t one = 1;
	ssize_t n;

	if (c == NULL)
		return KUP_E_INVAL;
	n = write(c->fd, &one, sizeof(one));
	if (n < 0) {
		int e = errno;
#if defined(__FreeBSD__)
		/* OS: the device was destroyed under us (module unloaded).
		 * devfs answers write itself (EIO from the dead vnode ops) and
		 * poll with POLLIN|POLLHUP for good, so the fd is readable
		 * already: not an error.  INFO, answered ENXIO by devfs then,
		 * tells that case apart.  (Linux needs no such case: the open
		 * file pins kup.ko, whose write keeps succeeding after
		 * shutdown.) */
		struct kup_ioc_info ii;

		if ((e == EIO || e == ENXIO) && kd_info_raw(c->fd, &ii) != 0 &&
		    errno == ENXIO)
			return KUP_E_OK;
#endif
		return kd_err(e);
	}
	if (n != (ssize_t)sizeof(one)) {
		errno = EIO;      /* the module takes all 8 bytes or fails */
		return KUP_E_SYS;
	}
	return KUP_E_OK;
}

static void
kd_detach(struct kup_backend_chan *ch)
{
	struct kd_chan *c = ch->priv;

	if (ch->mem != NULL)
		munmap(ch->mem, ch->bytes);
	ch->mem = NULL;
	if (c != NULL) {
		close(c->fd);   /* the last reference: the kernel detaches the
		                 * channel (Linux release, FreeBSD cdevpriv
		                 * destructor) */
		free(c);
	}
	ch->priv = NULL;
	ch->wait_fd = -1;
}

static int
kd_dev_fd(void *dev)
{
	struct kd_dev *d = dev;

	return d->fd;
}

static void
kd_dev_drain(void *dev)
{
	struct kd_dev *d = dev;
	struct kup_ioc_info ii;

	/* INFO records, per open file, the notify_gen this handle has seen:
	 * the device fd stops polling readable until the next announce */
	(void)kd_info_raw(d->fd, &ii);
}

static void
kd_close(void *dev)
{
	struct kd_dev *d = dev;

	if (d == NULL)
		return;
	if (d->fd >= 0)
		close(d->fd);
	free(d);
}

/* OS: the ops table, named after the host (kup.c picks it by that name,
 * and KUP_BACKEND=linux / freebsd forces it). */
#if defined(__linux__)
#define KD_OPS_TABLE kup_backend_linux
#define KD_OPS_NAME  "linux"
#else
#define KD_OPS_TABLE kup_backend_freebsd
#define KD_OPS_NAME  "freebsd"
#endif

const struct kup_backend_ops KD_OPS_TABLE = {
	.name = KD_OPS_NAME,
	.open = kd_open,
	.info = kd_info,
	.attach = kd_attach,
	.wake = kd_wake,
	.drain = kd_drain,
	.detach = kd_detach,
	.dev_fd = kd_dev_fd,
	.dev_drain = kd_dev_drain,
	.close = kd_close,
	.self_wake = kd_self_wake,
};
