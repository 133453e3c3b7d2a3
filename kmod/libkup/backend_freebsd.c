/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * backend_freebsd.c -- libkup's backend for the FreeBSD kernel host
 * (kupdev.ko, kmod/freebsd): the device is /dev/kup/<name>, spoken to with
 * the ioctl ABI of kmod/include/kup_ioctl.h (shared with Linux).
 *
 * Files: one open of the node per device handle (INFO, device events) and
 * one more per attached channel -- the kernel keeps per-open state with
 * devfs_set_cdevpriv, and an open may attach at most one channel.  The
 * channel is detached when both its descriptor is closed and its pages
 * are unmapped (a dying process does both); detach unmaps, then closes.
 *
 * Waiting: the channel descriptor is its own wait fd, and behaves like an
 * eventfd (kup_ioctl.h): kupdev.ko's d_poll / d_kqfilter report it readable
 * while a wake-up from the kernel side is pending (a hand-over seen with
 * user_waiting set, shutdown, the kernel giving up on us) until read(2)
 * consumes it (drain); shutdown is POLLHUP / EV_EOF and the kernel giving
 * up POLLERR, both for good.  write(2) makes our own wake-up pending
 * (self_wake: poll mode started while the turn is already ours).  So
 * kup.c's poll() works, and so does handing the fd (kernproxy_fd) to
 * kqueue(2) with EVFILT_READ -- which is what kupd's event loop does on
 * FreeBSD -- without the fd staying readable once the message is taken.
 * The device handle's descriptor is readable when notify_gen moved past
 * the one its last INFO returned.
 *
 * After the module unloads the device (destroy_dev), every further call on
 * an old descriptor fails with ENXIO in devfs: reported as EKU_SHUTDOWN.
 */
#include <sys/types.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kup_backend.h"
#include "kup_ioctl.h"

#if !defined(__FreeBSD__)
#error "backend_freebsd.c is FreeBSD userland (MAP_NOCORE, devfs semantics)"
#endif

struct kfb_dev {
	int  fd;              /* the device handle's own open file */
	char path[sizeof(KUP_DEV_DIR) + KUP_NAME_MAX + 256];
};

struct kfb_chan {
	int fd;               /* the channel's open file (attach, mmap, wait) */
};

/* errno of a failed open/ioctl/mmap -> KUP_E_* (kup_ioctl.h's table, plus
 * FreeBSD's ENXIO for a device destroyed under an open descriptor). */
static int
kfb_err(int e)
{
	switch (e) {
	case ENOENT:          return KUP_E_NOENT;
	case EAGAIN:          return KUP_E_NOTREADY;
	case EBUSY:           return KUP_E_BUSY;
	case EPROTONOSUPPORT: return KUP_E_VERSION;
	case ENOTTY:          return KUP_E_VERSION;
	case ESHUTDOWN:       return KUP_E_SHUTDOWN;
	case ENXIO:           return KUP_E_SHUTDOWN;
	case EINVAL:          return KUP_E_INVAL;
	default:              errno = e; return KUP_E_SYS;
	}
}

static int
kfb_open_path(const char *path, int *fdp)
{
	struct stat st;
	int fd, e;

	/* Only a character device can be a KUP device.  Anything else -- a
	 * kupsim socket path (open(2) would fail with EOPNOTSUPP), a FIFO
	 * (open would block), a regular file -- is "not ours", so that
	 * libkup falls back to its next backend. */
	if (stat(path, &st) != 0)
		return kfb_err(errno);
	if (!S_ISCHR(st.st_mode))
		return KUP_E_NOENT;
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return kfb_err(errno);
	if (fstat(fd, &st) != 0) {
		e = errno;
		close(fd);
		return kfb_err(e);
	}
	if (!S_ISCHR(st.st_mode)) {
		close(fd);
		return KUP_E_NOENT;   /* replaced since the stat */
	}
	*fdp = fd;
	return KUP_E_OK;
}

static int
kfb_info_raw(int fd, struct kup_ioc_info *ii)
{
	memset(ii, 0, sizeof(*ii));
	if (ioctl(fd, KUP_IOC_INFO, ii) != 0)
		return -1;
	ii->name[sizeof(ii->name) - 1] = '\0';
	return 0;
}

static int
kfb_open(const char *name, void **devp)
{
	struct kfb_dev *d;
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
	r = kfb_open_path(d->path, &d->fd);
	if (r != KUP_E_OK)
		goto fail;
	/* a KUP device answers INFO; any other character device does not */
	if (kfb_info_raw(d->fd, &ii) != 0) {
		r = (errno == ENOTTY || errno == EINVAL) ? KUP_E_NOENT :
		    kfb_err(errno);
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
kfb_info(void *dev, struct kernproxy_info *out)
{
	struct kfb_dev *d = dev;
	struct kup_ioc_info ii;

	if (kfb_info_raw(d->fd, &ii) != 0)
		return kfb_err(errno);
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

static int
kfb_attach(void *dev, uint32_t chan_id, uint32_t abi_version, uint32_t pages,
    struct kup_backend_chan *out)
{
	struct kfb_dev *d = dev;
	struct kfb_chan *c;
	struct kup_ioc_attach a;
	long psz = sysconf(_SC_PAGESIZE);
	void *mem;
	int fd = -1, r;

	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return KUP_E_SYS;
	r = kfb_open_path(d->path, &fd);
	if (r != KUP_E_OK)
		goto fail;
	memset(&a, 0, sizeof(a));
	a.abi_version = abi_version;
	a.chan_id = chan_id == KUP_CHAN_ANY_WIRE ? KUP_IOC_CHAN_ANY : chan_id;
	a.pages = pages;
	if (ioctl(fd, KUP_IOC_ATTACH, &a) != 0) {
		r = kfb_err(errno);
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
	/* MAP_NOCORE: a core dump of the process leaves the pages out */
	mem = mmap(NULL, (size_t)a.map_size, PROT_READ | PROT_WRITE,
	    MAP_SHARED | MAP_NOCORE, fd, (off_t)a.map_offset);
	if (mem == MAP_FAILED) {
		r = kfb_err(errno);
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
kfb_wake(struct kup_backend_chan *ch)
{
	struct kfb_chan *c = ch->priv;

	if (c == NULL)
		return KUP_E_INVAL;
	if (ioctl(c->fd, KUP_IOC_WAKE) != 0)
		return kfb_err(errno);
	return KUP_E_OK;
}

static void
kfb_drain(struct kup_backend_chan *ch)
{
	struct kfb_chan *c = ch->priv;
	uint64_t v;

	/* read(2) consumes the pending wake-up (never blocks: EAGAIN when
	 * there is none); errors are harmless here, the page is the truth */
	if (c != NULL)
		(void)!read(c->fd, &v, sizeof(v));
}

/* Make wait_fd readable now: write(2) of a non-zero count on the channel
 * descriptor makes our own wake-up pending, as on an eventfd. */
static int
kfb_self_wake(struct kup_backend_chan *ch)
{
	struct kfb_chan *c = ch->priv;
	struct kup_ioc_info ii;
	uint64_t one = 1;
	ssize_t n;
	int e;

	if (c == NULL)
		return KUP_E_INVAL;
	n = write(c->fd, &one, sizeof(one));
	if (n < 0) {
		e = errno;
		/* Device destroyed under us (module unloaded): devfs answers
		 * write itself (EIO from the dead vnode ops) and poll with
		 * POLLIN|POLLHUP for good, so the fd is readable already.
		 * INFO, answered ENXIO by devfs then, tells that case apart. */
		if ((e == EIO || e == ENXIO) && kfb_info_raw(c->fd, &ii) != 0 &&
		    errno == ENXIO)
			return KUP_E_OK;
		return kfb_err(e);
	}
	if (n != (ssize_t)sizeof(one)) {
		errno = EIO;      /* the module takes all 8 bytes or fails */
		return KUP_E_SYS;
	}
	return KUP_E_OK;
}

static void
kfb_detach(struct kup_backend_chan *ch)
{
	struct kfb_chan *c = ch->priv;

	if (ch->mem != NULL)
		munmap(ch->mem, ch->bytes);
	ch->mem = NULL;
	if (c != NULL) {
		close(c->fd);   /* last reference: the cdevpriv destructor
		                 * detaches the channel in the kernel */
		free(c);
	}
	ch->priv = NULL;
	ch->wait_fd = -1;
}

static int
kfb_dev_fd(void *dev)
{
	struct kfb_dev *d = dev;

	return d->fd;
}

static void
kfb_dev_drain(void *dev)
{
	struct kfb_dev *d = dev;
	struct kup_ioc_info ii;

	/* INFO records, per open file, the notify_gen this handle has seen:
	 * the device fd stops polling readable until the next announce */
	(void)kfb_info_raw(d->fd, &ii);
}

static void
kfb_close(void *dev)
{
	struct kfb_dev *d = dev;

	if (d == NULL)
		return;
	if (d->fd >= 0)
		close(d->fd);
	free(d);
}

const struct kup_backend_ops kup_backend_freebsd = {
	.name = "freebsd",
	.open = kfb_open,
	.info = kfb_info,
	.attach = kfb_attach,
	.wake = kfb_wake,
	.drain = kfb_drain,
	.detach = kfb_detach,
	.dev_fd = kfb_dev_fd,
	.dev_drain = kfb_dev_drain,
	.close = kfb_close,
	.self_wake = kfb_self_wake,
};
