/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * backend_sim.c -- libkup's kupsim backend: a SOCK_SEQPACKET unix socket
 * per device ($KUPSIM_DIR, default /run/kupsim, "/<name>.sock"; a name
 * containing '/' is the socket path itself).  Wire format: kupsim_proto.h.
 * One connection per attached channel: closing it detaches.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "kup_backend.h"
#include "kupsim_proto.h"

#define SIM_RPC_TIMEOUT_S 30

struct sim_dev {
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	int  fd;         /* INFO connection */
	int  watch_fd;   /* WATCH connection, lazily */
};

struct sim_chan {
	int conn;        /* the attachment */
	int u2k_efd;
	unsigned int fail_wakes;   /* test hook: wake-ups still to fail
	                            * (kup_sim_test_fail_wakes) */
	int fail_wakes_errno;      /* ... with this errno */
};

/* How long a request waits for kupsim's answer: SIM_RPC_TIMEOUT_S, or
 * less for a test (KUP_TEST_SIM_RPC_TIMEOUT_MS: what kupd does when a
 * host stops answering, without waiting 30 s for it). */
static struct timeval
sim_rpc_timeout(void)
{
	struct timeval tv = { .tv_sec = SIM_RPC_TIMEOUT_S };
	const char *v = getenv("KUP_TEST_SIM_RPC_TIMEOUT_MS");
	char *end;
	long ms;
	int e = errno;

	if (v != NULL && *v != '\0') {
		errno = 0;
		ms = strtol(v, &end, 10);
		if (errno == 0 && *end == '\0' && ms > 0 && ms < SIM_RPC_TIMEOUT_S * 1000L) {
			tv.tv_sec = ms / 1000;
			tv.tv_usec = (ms % 1000) * 1000;
		}
	}
	errno = e;
	return tv;
}

static int
sim_connect(const char *path, int *out)
{
	struct sockaddr_un sa;
	struct timeval tv = sim_rpc_timeout();
	int fd, e;

	fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return KUP_E_SYS;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, path, strlen(path) + 1);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
		e = errno;
		close(fd);
		errno = e;
		return (e == ENOENT || e == ECONNREFUSED || e == ENOTDIR) ?
		    KUP_E_NOENT : KUP_E_SYS;
	}
	(void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	*out = fd;
	return KUP_E_OK;
}

static void
close_fds(int *fds, int n)
{
	int i;

	for (i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

/* Send q, receive one reply packet of exactly replen bytes (or a bare
 * header carrying an error), collecting up to maxfds passed fds. */
static int
sim_rpc(int fd, uint32_t op, uint32_t chan_id, uint32_t abi, uint32_t pages,
    void *rep, size_t replen, int *fds, int maxfds, int *nfds)
{
	struct kupsim_req q;
	struct kupsim_hdr *h = rep;
	struct msghdr mh;
	struct iovec iov;
	union {
		char buf[CMSG_SPACE(8 * sizeof(int))];
		struct cmsghdr align;
	} cm;
	struct cmsghdr *cmh;
	ssize_t n;

	*nfds = 0;
	memset(&q, 0, sizeof(q));
	q.op = op;
	q.proto = KUPSIM_PROTO_VERSION;
	q.chan_id = chan_id;
	q.abi_version = abi;
	q.pages = pages;
	if (send(fd, &q, sizeof(q), MSG_NOSIGNAL) != (ssize_t)sizeof(q))
		return (errno == EPIPE || errno == ECONNRESET) ? KUP_E_SHUTDOWN :
		    KUP_E_SYS;
	memset(&mh, 0, sizeof(mh));
	iov.iov_base = rep;
	iov.iov_len = replen;
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cm.buf;
	mh.msg_controllen = sizeof(cm.buf);
	for (;;) {
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
		if (n < 0 && errno == EINTR)
			continue;
		break;
	}
	for (cmh = CMSG_FIRSTHDR(&mh); n >= 0 && cmh != NULL;
	    cmh = CMSG_NXTHDR(&mh, cmh)) {
		if (cmh->cmsg_level == SOL_SOCKET && cmh->cmsg_type == SCM_RIGHTS) {
			int k = (int)((cmh->cmsg_len - CMSG_LEN(0)) / sizeof(int));
			int i, tmp;

			for (i = 0; i < k; i++) {
				memcpy(&tmp, CMSG_DATA(cmh) + (size_t)i * sizeof(int),
				    sizeof(int));
				if (*nfds < maxfds)
					fds[(*nfds)++] = tmp;
				else
					close(tmp);
			}
		}
	}
	if (n < 0)
		return (errno == ECONNRESET) ? KUP_E_SHUTDOWN :
		    (errno == EAGAIN ? KUP_E_TIMEDOUT : KUP_E_SYS);
	if (n == 0)
		return KUP_E_SHUTDOWN;   /* kupsim closed: device gone */
	if ((size_t)n < sizeof(*h) || h->op != op)
		goto proto;
	if (h->status != KUP_E_OK)
		return h->status;
	if (mh.msg_flags & MSG_CTRUNC) {
		/* The kernel could not install every descriptor kupsim passed
		 * (we are at RLIMIT_NOFILE, or the system at its file limit):
		 * our own shortage, not kupsim breaking the protocol. */
		close_fds(fds, *nfds);
		*nfds = 0;
		errno = EMFILE;
		return KUP_E_SYS;
	}
	if ((size_t)n != replen || (mh.msg_flags & MSG_TRUNC))
		goto proto;
	return KUP_E_OK;
proto:
	close_fds(fds, *nfds);
	*nfds = 0;
	return KUP_E_PROTO;
}

static int
sim_open(const char *name, void **devp)
{
	struct sim_dev *d;
	const char *dir;
	int n, r;

	d = calloc(1, sizeof(*d));
	if (d == NULL)
		return KUP_E_SYS;
	d->fd = d->watch_fd = -1;
	if (strchr(name, '/') != NULL) {
		n = snprintf(d->path, sizeof(d->path), "%s", name);
	} else {
		dir = getenv("KUPSIM_DIR");
		if (dir == NULL || *dir == '\0')
			dir = "/run/kupsim";
		n = snprintf(d->path, sizeof(d->path), "%s/%s.sock", dir, name);
	}
	if (n < 0 || (size_t)n >= sizeof(d->path)) {
		free(d);
		return KUP_E_INVAL;
	}
	r = sim_connect(d->path, &d->fd);
	if (r != KUP_E_OK) {
		int e = errno;
		free(d);
		errno = e;
		return r;
	}
	*devp = d;
	return KUP_E_OK;
}

static int
sim_info(void *dev, struct kernproxy_info *out)
{
	struct sim_dev *d = dev;
	struct kupsim_info_reply *rep = calloc(1, sizeof(*rep));
	int fds[1], nfds, r;

	if (rep == NULL)
		return KUP_E_SYS;
	r = sim_rpc(d->fd, KUPSIM_OP_INFO, 0, 0, 0, rep, sizeof(*rep), fds, 1,
	    &nfds);
	close_fds(fds, nfds);
	if (r == KUP_E_OK) {
		memset(out, 0, sizeof(*out));
		memcpy(out->name, rep->name, sizeof(out->name));
		out->name[sizeof(out->name) - 1] = '\0';
		out->abi_version = rep->abi_version;
		out->page_size = rep->page_size;
		out->chan_count = rep->chan_count;
		out->announced = rep->announced;
		out->pages = rep->pages;
		out->max_msg = rep->max_msg;
		out->notify_gen = rep->notify_gen;
		out->shutting_down = rep->shutting_down;
		memcpy(out->attached, rep->attached, sizeof(out->attached));
	}
	free(rep);
	return r;
}

/*
 * The kupsim this handle opened has gone (exited, or restarted: its INFO
 * connection hung up).  A handle is one device instance: INFO on it says
 * EKU_SHUTDOWN for good, so attach and the event fd must say the same
 * rather than reach a new kupsim through the same path (the caller opens
 * the device again for that).
 */
static int
sim_dev_gone(const struct sim_dev *d)
{
	struct pollfd p = { .fd = d->fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 &&
	    (p.revents & (POLLHUP | POLLERR | POLLNVAL)) != 0;
}

static int
sim_attach(void *dev, uint32_t chan_id, uint32_t abi, uint32_t pages,
    struct kup_backend_chan *out)
{
	struct sim_dev *d = dev;
	struct kupsim_attach_reply rep;
	struct sim_chan *sc;
	struct stat st;
	int fds[3] = { -1, -1, -1 }, nfds = 0, conn, r;
	void *mem;

	if (sim_dev_gone(d))
		return KUP_E_SHUTDOWN;
	r = sim_connect(d->path, &conn);
	if (r != KUP_E_OK)
		return r == KUP_E_NOENT ? KUP_E_SHUTDOWN : r;
	r = sim_rpc(conn, KUPSIM_OP_ATTACH, chan_id, abi, pages, &rep,
	    sizeof(rep), fds, 3, &nfds);
	if (r != KUP_E_OK)
		goto fail;
	if (nfds != 3 || rep.bytes < KUP_CTRL_SIZE || rep.bytes > (1ULL << 34)) {
		r = KUP_E_PROTO;
		goto fail;
	}
	if (fstat(fds[0], &st) != 0 || (uint64_t)st.st_size < rep.bytes) {
		r = KUP_E_PROTO;
		goto fail;
	}
	mem = mmap(NULL, (size_t)rep.bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
	    fds[0], 0);
	if (mem == MAP_FAILED) {
		r = KUP_E_SYS;
		goto fail;
	}
	sc = calloc(1, sizeof(*sc));
	if (sc == NULL) {
		munmap(mem, (size_t)rep.bytes);
		r = KUP_E_SYS;
		goto fail;
	}
	close(fds[0]);
	sc->conn = conn;
	sc->u2k_efd = fds[2];
	out->mem = mem;
	out->bytes = (size_t)rep.bytes;
	out->chan_id = rep.chan_id;
	out->wait_fd = fds[1];
	out->hup_fd = conn;
	out->priv = sc;
	return KUP_E_OK;
fail:
	{
		int e = errno;
		close_fds(fds, nfds);
		close(conn);
		errno = e;
	}
	return r;
}

static int
sim_wake(struct kup_backend_chan *ch)
{
	struct sim_chan *sc = ch->priv;
	uint64_t one = 1;

	if (sc->fail_wakes > 0) {
		/* injected: the eventfd write "failed", nothing written */
		sc->fail_wakes--;
		errno = sc->fail_wakes_errno;
		return KUP_E_SYS;
	}
	if (write(sc->u2k_efd, &one, sizeof(one)) == (ssize_t)sizeof(one) ||
	    errno == EAGAIN)
		return KUP_E_OK;
	return KUP_E_SYS;
}

/* kup_backend.h: the channel's next n wake-ups of the kernel side fail */
void
kup_sim_test_fail_wakes(struct kup_backend_chan *ch, unsigned int n, int err)
{
	struct sim_chan *sc = ch->priv;

	sc->fail_wakes = n;
	sc->fail_wakes_errno = err;
}

static int
sim_self_wake(struct kup_backend_chan *ch)
{
	uint64_t one = 1;

	if (write(ch->wait_fd, &one, sizeof(one)) == (ssize_t)sizeof(one) ||
	    errno == EAGAIN)
		return KUP_E_OK;
	return KUP_E_SYS;
}

static int
sim_drain(struct kup_backend_chan *ch)
{
	uint64_t v;

	/* an eventfd read returns the whole count and zeroes it: one read */
	return read(ch->wait_fd, &v, sizeof(v)) == (ssize_t)sizeof(v);
}

static void
sim_detach(struct kup_backend_chan *ch)
{
	struct sim_chan *sc = ch->priv;

	munmap(ch->mem, ch->bytes);
	close(ch->wait_fd);
	close(sc->u2k_efd);
	close(sc->conn);   /* this is the detach */
	free(sc);
	ch->priv = NULL;
}

static int
sim_dev_fd(void *dev)
{
	struct sim_dev *d = dev;
	struct kupsim_hdr h;
	int fds[1], nfds, r, fd;

	if (d->watch_fd >= 0)
		return d->watch_fd;
	if (sim_dev_gone(d)) {
		errno = ESHUTDOWN;
		return -1;
	}
	r = sim_connect(d->path, &fd);
	if (r != KUP_E_OK) {
		if (r == KUP_E_NOENT)
			errno = ESHUTDOWN;
		return -1;
	}
	r = sim_rpc(fd, KUPSIM_OP_WATCH, 0, 0, 0, &h, sizeof(h), fds, 1, &nfds);
	close_fds(fds, nfds);
	if (r != KUP_E_OK) {
		close(fd);
		errno = EPROTO;
		return -1;
	}
	d->watch_fd = fd;
	return fd;
}

static void
sim_dev_drain(void *dev)
{
	struct sim_dev *d = dev;
	struct kupsim_event ev;

	if (d->watch_fd < 0)
		return;
	while (recv(d->watch_fd, &ev, sizeof(ev), MSG_DONTWAIT) > 0)
		;
}

static void
sim_close(void *dev)
{
	struct sim_dev *d = dev;

	if (d->fd >= 0)
		close(d->fd);
	if (d->watch_fd >= 0)
		close(d->watch_fd);
	free(d);
}

const struct kup_backend_ops kup_backend_sim = {
	.name = "sim",
	.open = sim_open,
	.info = sim_info,
	.attach = sim_attach,
	.wake = sim_wake,
	.drain = sim_drain,
	.detach = sim_detach,
	.dev_fd = sim_dev_fd,
	.dev_drain = sim_dev_drain,
	.close = sim_close,
	.self_wake = sim_self_wake,
};
