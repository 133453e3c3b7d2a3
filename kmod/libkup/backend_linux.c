/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * backend_linux.c -- libkup's backend for the Linux kernel host (kup.ko):
 * the device is /dev/kup/<name>, ABI in kmod/include/kup_ioctl.h.
 *
 * One open file per device handle (info, device events) and one more per
 * attached channel: the channel's fd is also its wait fd.  Like kupsim's
 * eventfd, it polls readable while a wake-up from the kernel side is
 * pending (a hand-over seen with user_waiting set, shutdown, the kernel
 * giving up on us) until read(2) consumes it (drain); shutdown also gives
 * POLLHUP for good.  Closing the channel fd after munmap detaches it; a
 * process that dies detaches the same way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kup_backend.h"
#include "kup_ioctl.h"

struct kl_dev {
	int  fd;                      /* the device handle's own open file */
	char path[sizeof(KUP_DEV_DIR) + KUP_NAME_MAX + 256];
};

struct kl_chan {
	int fd;
};

/* errno of a failed open/ioctl -> KUP_E_* (see kup_ioctl.h). */
static int
kl_err(int e)
{
	switch (e) {
	case ENOENT:          return KUP_E_NOENT;
	case EAGAIN:          return KUP_E_NOTREADY;
	case EBUSY:           return KUP_E_BUSY;
	case EPROTONOSUPPORT: return KUP_E_VERSION;
	case ENOTTY:          return KUP_E_VERSION;
	case ESHUTDOWN:       return KUP_E_SHUTDOWN;
	case EINVAL:          return KUP_E_INVAL;
	default:              errno = e; return KUP_E_SYS;
	}
}

static int
kl_open_path(const char *path, int *fdp)
{
	struct stat st;
	int fd;

	/* only a character device can be a KUP device: anything else (a
	 * kupsim socket path, a regular file) is "not ours", so that libkup
	 * falls back to the next backend */
	if (stat(path, &st) != 0)
		return kl_err(errno);
	if (!S_ISCHR(st.st_mode))
		return KUP_E_NOENT;
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		int e = errno;
		/* the node exists but the device is being unloaded */
		if (e == ENODEV || e == ENXIO)
			return KUP_E_SHUTDOWN;
		return kl_err(e);
	}
	*fdp = fd;
	return KUP_E_OK;
}

static int
kl_info_raw(int fd, struct kup_ioc_info *ii)
{
	memset(ii, 0, sizeof(*ii));
	if (ioctl(fd, KUP_IOC_INFO, ii) != 0)
		return -1;
	ii->name[sizeof(ii->name) - 1] = '\0';
	return 0;
}

static int
kl_open(const char *name, void **devp)
{
	struct kl_dev *d;
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
	r = kl_open_path(d->path, &d->fd);
	if (r != KUP_E_OK)
		goto fail;
	/* a KUP device answers INFO; anything else is not one */
	if (kl_info_raw(d->fd, &ii) != 0) {
		r = errno == ENOTTY || errno == EINVAL ? KUP_E_NOENT : kl_err(errno);
		goto fail;
	}
	*devp = d;
	return KUP_E_OK;
fail:
	if (d->fd >= 0)
		close(d->fd);
	free(d);
	return r;
}

static int
kl_info(void *dev, struct kernproxy_info *out)
{
	struct kl_dev *d = dev;
	struct kup_ioc_info ii;

	if (kl_info_raw(d->fd, &ii) != 0)
		return kl_err(errno);
	memset(out, 0, sizeof(*out));
	_Static_assert(sizeof(out->name) == sizeof(ii.name), "name size");
	_Static_assert(sizeof(out->attached) == sizeof(ii.attached), "attached size");
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
kl_attach(void *dev, uint32_t chan_id, uint32_t abi_version, uint32_t pages,
    struct kup_backend_chan *out)
{
	struct kl_dev *d = dev;
	struct kl_chan *c;
	struct kup_ioc_attach a;
	void *mem;
	long psz = sysconf(_SC_PAGESIZE);
	int fd = -1, r;

	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return KUP_E_SYS;
	r = kl_open_path(d->path, &fd);
	if (r != KUP_E_OK)
		goto fail;
	memset(&a, 0, sizeof(a));
	a.abi_version = abi_version;
	a.chan_id = chan_id == KUP_CHAN_ANY_WIRE ? KUP_IOC_CHAN_ANY : chan_id;
	a.pages = pages;
	if (ioctl(fd, KUP_IOC_ATTACH, &a) != 0) {
		r = kl_err(errno);
		goto fail;
	}
	/* what the kernel says is checked before it is used */
	if (a.map_size == 0 || a.map_size > (uint64_t)SIZE_MAX || psz <= 0 ||
	    a.map_size % (uint64_t)psz != 0 || a.map_offset % (uint64_t)psz != 0 ||
	    a.map_size < KUP_CTRL_SIZE) {
		r = KUP_E_PROTO;
		goto fail;
	}
	mem = mmap(NULL, (size_t)a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
	    fd, (off_t)a.map_offset);
	if (mem == MAP_FAILED) {
		r = kl_err(errno);
		goto fail;
	}
	c->fd = fd;
	out->mem = mem;
	out->bytes = (size_t)a.map_size;
	out->chan_id = a.chan_id;
	out->wait_fd = fd;
	out->hup_fd = -1;
	out->priv = c;
	return KUP_E_OK;
fail:
	if (fd >= 0) {
		int e = errno;
		close(fd);
		errno = e;
	}
	free(c);
	return r;
}

static int
kl_wake(struct kup_backend_chan *ch)
{
	struct kl_chan *c = ch->priv;

	if (ioctl(c->fd, KUP_IOC_WAKE) != 0)
		return kl_err(errno);
	return KUP_E_OK;
}

static void
kl_drain(struct kup_backend_chan *ch)
{
	struct kl_chan *c = ch->priv;
	uint64_t v;

	/* read(2) consumes the pending wake-up (never blocks: EAGAIN when
	 * there is none); errors are harmless here, the page is the truth */
	if (c != NULL)
		(void)!read(c->fd, &v, sizeof(v));
}

/* Make wait_fd readable now: write(2) on a channel fd makes the user's
 * own wake-up pending, as on an eventfd. */
static int
kl_self_wake(struct kup_backend_chan *ch)
{
	struct kl_chan *c = ch->priv;
	uint64_t one = 1;

	if (write(c->fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
		return kl_err(errno);
	return KUP_E_OK;
}

static void
kl_detach(struct kup_backend_chan *ch)
{
	struct kl_chan *c = ch->priv;

	if (ch->mem != NULL)
		munmap(ch->mem, ch->bytes);
	ch->mem = NULL;
	if (c != NULL) {
		close(c->fd);     /* the last reference: the module detaches */
		free(c);
	}
	ch->priv = NULL;
	ch->wait_fd = -1;
}

static int
kl_dev_fd(void *dev)
{
	struct kl_dev *d = dev;

	return d->fd;
}

static void
kl_dev_drain(void *dev)
{
	struct kl_dev *d = dev;
	struct kup_ioc_info ii;

	/* INFO records the notify generation this fd has seen */
	(void)kl_info_raw(d->fd, &ii);
}

static void
kl_close(void *dev)
{
	struct kl_dev *d = dev;

	if (d == NULL)
		return;
	close(d->fd);
	free(d);
}

const struct kup_backend_ops kup_backend_linux = {
	.name = "linux",
	.open = kl_open,
	.info = kl_info,
	.attach = kl_attach,
	.wake = kl_wake,
	.drain = kl_drain,
	.detach = kl_detach,
	.dev_fd = kl_dev_fd,
	.dev_drain = kl_dev_drain,
	.close = kl_close,
	.self_wake = kl_self_wake,
};
