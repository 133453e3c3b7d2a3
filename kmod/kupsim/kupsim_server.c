/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kupsim_server.c -- publishes each device as RUNDIR/<name>.sock and serves
 * the wire protocol of kupsim_proto.h from one poll thread.
 *
 * One thread waits in epoll on: a control eventfd, every listening socket,
 * every device's event eventfd and every connection; each fd is registered
 * once (when its listener / connection appears), so a wake-up costs the
 * same with 1000 idle attachments as with none.  A connection's lifetime
 * is its attachment: when the peer closes it (or dies) the thread sees
 * EPOLLHUP / EOF and calls kup_core_detach(), then kupsim_chan_renew():
 * the next attachment of the channel gets a new memfd and new eventfds,
 * and the fds this one was given lead nowhere.  No pid polling.  The
 * channels' user->kernel eventfds are NOT watched here: a module thread
 * sleeping on a channel polls that eventfd itself (kupsim_glue.c), so a
 * user's wake-up is one hop.
 *
 * S.mu (recursive) protects the lists; the poll thread holds it while it
 * handles events, and module threads take it in publish/withdraw/release.
 * Objects an event may point at are freed only between batches: a closed
 * connection is unlinked and marked dead at once and freed after the
 * batch; withdrawn listeners are reaped after the batch.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "kup_os.h"
#include "kupsim.h"
#include "kupsim_proto.h"

/* what an epoll event points at */
#define TAG_CTL  0
#define TAG_LIS  1
#define TAG_EV   2
#define TAG_CONN 3

struct etag {
	int tag;
	void *p;
};

struct listener {
	struct kupdev_softc *sc;   /* valid until withdrawn */
	int fd;
	int ev_fd;
	int withdrawn;
	int registered;            /* fd and ev_fd are in S.ep */
	/* 1: the channel still has objects a previous user may hold (their
	 * renewal failed): it is not handed out until a renewal succeeds */
	uint8_t stale[KUP_MAX_CHANNELS];
	struct etag t_lis, t_ev;
	char name[KUP_NAME_MAX];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct listener *next;
};

#define CONN_PLAIN    0
#define CONN_ATTACHED 1
#define CONN_WATCHER  2

struct conn {
	int fd;
	int kind;
	int dead;                  /* closed; freed after the batch */
	struct kupdev_softc *sc;   /* referenced */
	struct kup_chan *ch;       /* CONN_ATTACHED */
	struct etag t;
	struct conn *next;
};

static struct {
	pthread_mutex_t mu;
	int mu_ready;
	int running;
	int stop;
	int ctl_efd;
	int ep;                    /* epoll: every fd the thread serves */
	int lock_fd;
	pthread_t thr;
	char rundir[PATH_MAX];
	struct listener *ls;
	struct conn *cs;
	struct conn *graveyard;    /* closed during a batch */
	struct etag t_ctl;
} S = { .ctl_efd = -1, .ep = -1, .lock_fd = -1 };

static int
ep_add(int fd, struct etag *t)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = t };

	if (epoll_ctl(S.ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
		kup_os_log("kupsim: epoll_ctl(ADD %d): %s", fd, strerror(errno));
		return -1;
	}
	return 0;
}

static void
ep_del(int fd)
{
	if (fd >= 0 && S.ep >= 0)
		(void)epoll_ctl(S.ep, EPOLL_CTL_DEL, fd, NULL);
}

static void
kick(int fd)
{
	uint64_t one = 1;

	if (write(fd, &one, sizeof(one)) < 0 && errno != EAGAIN)
		kup_os_log("kupsim: eventfd write: %s", strerror(errno));
}

static void
drain(int fd)
{
	uint64_t v;

	while (read(fd, &v, sizeof(v)) == (ssize_t)sizeof(v))
		;
}

/* ---- publish / withdraw ------------------------------------------------ */

int
kupsim_server_publish(struct kupdev_softc *sc)
{
	struct sockaddr_un sa;
	struct listener *l;
	const char *name = kup_core_dev_name(sc);
	int n;

	if (!S.running)
		return 0;
	l = calloc(1, sizeof(*l));
	if (l == NULL)
		return -1;
	l->sc = sc;
	l->ev_fd = kup_core_dev_os(sc)->ev_fd;
	snprintf(l->name, sizeof(l->name), "%s", name);
	n = snprintf(l->path, sizeof(l->path), "%s/%s.sock", S.rundir, name);
	if (n < 0 || (size_t)n >= sizeof(l->path)) {
		kup_os_log("kupsim: socket path for %s too long", name);
		goto fail;
	}
	l->fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (l->fd < 0)
		goto fail_errno;
	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	memcpy(sa.sun_path, l->path, strlen(l->path) + 1);
	(void)unlink(l->path);   /* stale: we hold the rundir lock */
	if (bind(l->fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 ||
	    listen(l->fd, 128) != 0)
		goto fail_sock;
	(void)chmod(l->path, 0666);
	pthread_mutex_lock(&S.mu);
	l->next = S.ls;
	S.ls = l;
	pthread_mutex_unlock(&S.mu);
	kup_core_dev_os(sc)->srv = l;
	kick(S.ctl_efd);
	return 0;

fail_sock:
	close(l->fd);
fail_errno:
	kup_os_log("kupsim: publishing %s at %s: %s", name, l->path,
	    strerror(errno));
fail:
	free(l);
	return -1;
}

void
kupsim_server_withdraw(struct kupdev_softc *sc)
{
	struct listener *l;

	if (!S.running)
		return;
	pthread_mutex_lock(&S.mu);
	for (l = S.ls; l != NULL; l = l->next) {
		if (l->sc == sc && !l->withdrawn) {
			l->withdrawn = 1;
			(void)unlink(l->path);
		}
	}
	pthread_mutex_unlock(&S.mu);
	kick(S.ctl_efd);
}

static void send_event(struct kupdev_softc *sc, struct conn *only);

/* Under S.mu: drop withdrawn listeners; watchers get a final event. */
static void
reap_listeners(void)
{
	struct listener **pp = &S.ls, *l;

	while ((l = *pp) != NULL) {
		if (!l->withdrawn) {
			pp = &l->next;
			continue;
		}
		*pp = l->next;
		send_event(l->sc, NULL);   /* only touches sc via watchers' refs */
		if (l->registered) {
			ep_del(l->fd);
			ep_del(l->ev_fd);   /* -1 once released (deregistered there) */
		}
		close(l->fd);
		free(l);
	}
}

/* Under S.mu, poll thread: put listeners published since into the set. */
static void
register_listeners(void)
{
	struct listener *l;

	for (l = S.ls; l != NULL; l = l->next) {
		if (l->registered || l->withdrawn)
			continue;
		l->t_lis = (struct etag){ TAG_LIS, l };
		l->t_ev = (struct etag){ TAG_EV, l };
		if (ep_add(l->fd, &l->t_lis) != 0)
			continue;
		if (ep_add(l->ev_fd, &l->t_ev) != 0) {
			ep_del(l->fd);
			continue;
		}
		l->registered = 1;
	}
}

void
kupsim_server_release(struct kupdev_softc *sc)
{
	struct listener *l;

	if (!S.mu_ready)
		return;
	pthread_mutex_lock(&S.mu);
	for (l = S.ls; l != NULL; l = l->next) {
		if (l->sc == sc) {
			l->withdrawn = 1;
			l->sc = NULL;
			/* the caller closes ev_fd next: out of the epoll set first,
			 * so that a reused fd number is never deregistered by us */
			if (l->registered)
				ep_del(l->ev_fd);
			l->ev_fd = -1;
		}
	}
	pthread_mutex_unlock(&S.mu);
}

void
kupsim_server_names(char *buf, size_t len)
{
	struct listener *l;
	size_t off = 0;

	if (len == 0)
		return;
	buf[0] = '\0';
	if (!S.mu_ready)
		return;
	pthread_mutex_lock(&S.mu);
	for (l = S.ls; l != NULL; l = l->next) {
		int n;

		if (l->withdrawn)
			continue;
		n = snprintf(buf + off, len - off, "%s%s", off ? " " : "", l->name);
		if (n < 0 || (size_t)n >= len - off)
			break;
		off += (size_t)n;
	}
	pthread_mutex_unlock(&S.mu);
}

/* ---- connections ------------------------------------------------------ */

/* Under S.mu: the published listener of sc (NULL once withdrawn: the
 * device is unloading and no attach can succeed any more). */
static struct listener *
listener_of(struct kupdev_softc *sc)
{
	struct listener *l;

	for (l = S.ls; l != NULL; l = l->next)
		if (l->sc == sc && !l->withdrawn)
			return l;
	return NULL;
}

/* Under S.mu, ch detached: give it fresh objects for its next attachment
 * and remember whether that worked.  0 when the channel is fresh. */
static int
chan_renew(struct kupdev_softc *sc, struct kup_chan *ch)
{
	struct listener *l = listener_of(sc);
	uint32_t id = kup_core_chan_id(ch);
	int r = kupsim_chan_renew(ch);

	if (l != NULL && id < KUP_MAX_CHANNELS)
		l->stale[id] = r != 0;
	return r;
}

/* Under S.mu: detach and close now; the struct is freed by
 * free_graveyard() once no event of the current batch can point at it.
 * Every attachment's end renews the channel's objects (kupsim.h), so the
 * next user gets its own and this one's copies lead nowhere. */
static void
conn_close(struct conn *c)
{
	struct conn **pp;

	if (c->dead)
		return;
	for (pp = &S.cs; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == c) {
			*pp = c->next;
			break;
		}
	}
	c->dead = 1;
	if (c->kind == CONN_ATTACHED && c->ch != NULL) {
		kup_core_detach(c->ch);
		(void)chan_renew(c->sc, c->ch);
	}
	ep_del(c->fd);
	close(c->fd);
	c->fd = -1;
	kup_core_dev_put(c->sc);
	c->sc = NULL;
	c->next = S.graveyard;
	S.graveyard = c;
}

static void
free_graveyard(void)
{
	struct conn *c;

	while ((c = S.graveyard) != NULL) {
		S.graveyard = c->next;
		free(c);
	}
}

/* Under S.mu: close the attachments of sc whose peer has already hung up
 * but whose EPOLLHUP this thread has not handled yet (it may be further
 * down the ready list than the new ATTACH that wants the channel). */
static int
reap_departed(struct kupdev_softc *sc)
{
	struct conn *c, *next;
	int n = 0;

	for (c = S.cs; c != NULL; c = next) {
		struct pollfd pf = { .fd = c->fd, .events = POLLIN };

		next = c->next;
		if (c->kind != CONN_ATTACHED || c->sc != sc)
			continue;
		if (poll(&pf, 1, 0) == 1 &&
		    (pf.revents & (POLLHUP | POLLERR | POLLNVAL))) {
			conn_close(c);
			n++;
		}
	}
	return n;
}

static int
reply(struct conn *c, const void *buf, size_t len)
{
	ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);

	return n == (ssize_t)len ? 0 : -1;
}

static int
reply_status(struct conn *c, uint32_t op, int status)
{
	struct kupsim_hdr h = { .op = op, .status = status };

	return reply(c, &h, sizeof(h));
}

static void
send_event(struct kupdev_softc *sc, struct conn *only)
{
	struct kupsim_event ev;
	struct kup_ioc_info *info = NULL;
	struct conn *c;

	if (sc == NULL)
		return;
	for (c = S.cs; c != NULL; c = c->next) {
		if (c->kind != CONN_WATCHER || c->sc != sc ||
		    (only != NULL && c != only))
			continue;
		if (info == NULL) {
			info = malloc(sizeof(*info));
			if (info == NULL)
				return;
			kup_core_info(sc, info);   /* c holds a reference */
		}
		memset(&ev, 0, sizeof(ev));
		ev.hdr.op = KUPSIM_OP_EVENT;
		ev.what = (info->shutting_down ? KUPSIM_EV_SHUTDOWN : 0) |
		    (info->announced ? KUPSIM_EV_ANNOUNCE : 0);
		ev.announced = info->announced;
		ev.notify_gen = info->notify_gen;
		(void)send(c->fd, &ev, sizeof(ev), MSG_NOSIGNAL | MSG_DONTWAIT);
	}
	free(info);
}

static int
do_info(struct conn *c)
{
	struct kupsim_info_reply *r = calloc(1, sizeof(*r));
	struct kup_ioc_info *info = calloc(1, sizeof(*info));
	int ret = -1;

	if (r == NULL || info == NULL)
		goto out;
	kup_core_info(c->sc, info);
	r->hdr.op = KUPSIM_OP_INFO;
	r->hdr.status = KUP_E_OK;
	memcpy(r->name, info->name, sizeof(r->name));
	r->abi_version = info->abi_version;
	r->page_size = info->page_size;
	r->chan_count = info->chan_count;
	r->announced = info->announced;
	r->pages = info->pages;
	r->max_msg = info->max_msg;
	r->shutting_down = info->shutting_down;
	r->notify_gen = info->notify_gen;
	memcpy(r->attached, info->attached, sizeof(r->attached));
	ret = reply(c, r, sizeof(*r));
out:
	free(r);
	free(info);
	return ret;
}

static int
do_attach(struct conn *c, const struct kupsim_req *q)
{
	struct kupsim_attach_reply r;
	struct kup_ioc_info *info;
	struct kup_chan *ch = NULL;
	struct kup_os_chan *os;
	struct listener *l;
	struct msghdr mh;
	struct iovec iov;
	union {
		char buf[CMSG_SPACE(3 * sizeof(int))];
		struct cmsghdr align;
	} cm;
	struct cmsghdr *cmh;
	int fds[3], e;
	uint32_t pages;

	if (c->kind != CONN_PLAIN)
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_INVAL);
	info = malloc(sizeof(*info));
	if (info == NULL)
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_SYS);
	kup_core_info(c->sc, info);
	pages = info->pages;
	free(info);
	if (q->pages != 0 && q->pages != pages)
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_INVAL);
	e = kup_core_attach(c->sc, q->chan_id, q->abi_version, &ch);
	if (e == -EBUSY && reap_departed(c->sc) != 0)
		e = kup_core_attach(c->sc, q->chan_id, q->abi_version, &ch);
	if (e != 0)
		return reply_status(c, KUPSIM_OP_ATTACH, kup_core_errno_to_kup(e));
	/* Objects a previous user may still hold are never handed out: undo
	 * the attachment (the module sees it end: -EPIPE), try the renewal
	 * again for the next request, and say a system call failed. */
	l = listener_of(c->sc);
	if (l != NULL && l->stale[kup_core_chan_id(ch)]) {
		kup_core_detach(ch);
		(void)chan_renew(c->sc, ch);
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_SYS);
	}
	os = kup_core_chan_os(ch);
	memset(&r, 0, sizeof(r));
	r.hdr.op = KUPSIM_OP_ATTACH;
	r.hdr.status = KUP_E_OK;
	r.chan_id = kup_core_chan_id(ch);
	r.pages = pages;
	r.page_size = kup_os_page_size();
	r.bytes = kup_core_chan_bytes(ch);
	fds[0] = os->memfd;
	fds[1] = os->k2u_efd;
	fds[2] = os->u2k_efd;
	/* fresh objects: no wake-up of a previous user is left in them */
	memset(&mh, 0, sizeof(mh));
	memset(&cm, 0, sizeof(cm));
	iov.iov_base = &r;
	iov.iov_len = sizeof(r);
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cm.buf;
	mh.msg_controllen = sizeof(cm.buf);
	cmh = CMSG_FIRSTHDR(&mh);
	cmh->cmsg_level = SOL_SOCKET;
	cmh->cmsg_type = SCM_RIGHTS;
	cmh->cmsg_len = CMSG_LEN(sizeof(fds));
	memcpy(CMSG_DATA(cmh), fds, sizeof(fds));
	c->kind = CONN_ATTACHED;
	c->ch = ch;
	if (sendmsg(c->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT) != (ssize_t)sizeof(r))
		return -1;   /* caller closes: detaches */
	return 0;
}

/* Handle one readable connection.  -1: close it. */
static int
conn_input(struct conn *c)
{
	union {
		struct kupsim_req q;
		char raw[256];
	} u;
	ssize_t n = recv(c->fd, &u, sizeof(u), MSG_DONTWAIT);

	if (n == 0)
		return -1;
	if (n < 0)
		return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
	if ((size_t)n != sizeof(u.q) || u.q.proto != KUPSIM_PROTO_VERSION ||
	    u.q.reserved[0] || u.q.reserved[1] || u.q.reserved[2]) {
		uint32_t op = (size_t)n >= sizeof(uint32_t) ? u.q.op : 0;
		return reply_status(c, op, (size_t)n == sizeof(u.q) &&
		    u.q.proto != KUPSIM_PROTO_VERSION ? KUP_E_VERSION : KUP_E_INVAL);
	}
	switch (u.q.op) {
	case KUPSIM_OP_INFO:
		return do_info(c);
	case KUPSIM_OP_ATTACH:
		return do_attach(c, &u.q);
	case KUPSIM_OP_WATCH:
		if (c->kind != CONN_PLAIN)
			return reply_status(c, KUPSIM_OP_WATCH, KUP_E_INVAL);
		c->kind = CONN_WATCHER;
		return reply_status(c, KUPSIM_OP_WATCH, KUP_E_OK);
	default:
		return reply_status(c, u.q.op, KUP_E_INVAL);
	}
}

static void
accept_on(struct listener *l)
{
	struct conn *c;
	int fd;

	while ((fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK)) >= 0) {
		c = calloc(1, sizeof(*c));
		if (c == NULL) {
			close(fd);
			return;
		}
		c->fd = fd;
		c->kind = CONN_PLAIN;
		c->t = (struct etag){ TAG_CONN, c };
		if (ep_add(fd, &c->t) != 0) {
			close(fd);
			free(c);
			return;
		}
		c->sc = l->sc;
		kup_core_dev_ref(c->sc);
		c->next = S.cs;
		S.cs = c;
	}
}

/* ---- the poll thread --------------------------------------------------- */

#define EP_BATCH 256

static void *
poll_main(void *arg)
{
	struct epoll_event evs[EP_BATCH];

	(void)arg;
	pthread_mutex_lock(&S.mu);
	register_listeners();
	pthread_mutex_unlock(&S.mu);
	for (;;) {
		int n, i, ctl = 0;

		n = epoll_wait(S.ep, evs, EP_BATCH, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			kup_os_log("kupsim: epoll_wait: %s", strerror(errno));
			break;
		}
		pthread_mutex_lock(&S.mu);
		if (S.stop) {
			pthread_mutex_unlock(&S.mu);
			break;
		}
		/* Departures first: a process that closed one attachment and
		 * then asked for the channel again on a new connection must
		 * find it free, whatever order the two show up in (one further
		 * down the ready list is caught by do_attach's reap_departed). */
		for (i = 0; i < n; i++) {
			struct etag *t = evs[i].data.ptr;

			if (t->tag == TAG_CONN &&
			    (evs[i].events & (EPOLLHUP | EPOLLERR))) {
				conn_close(t->p);
				evs[i].events = 0;
			}
		}
		for (i = 0; i < n; i++) {
			struct etag *t = evs[i].data.ptr;
			struct listener *l;
			struct conn *c;

			if (evs[i].events == 0)
				continue;
			switch (t->tag) {
			case TAG_CTL:
				ctl = 1;
				break;
			case TAG_LIS:
				l = t->p;
				if (!l->withdrawn)
					accept_on(l);
				else
					ctl = 1;   /* reap it: level-triggered */
				break;
			case TAG_EV:
				l = t->p;
				if (!l->withdrawn && l->ev_fd >= 0) {
					drain(l->ev_fd);
					send_event(l->sc, NULL);
				} else {
					ctl = 1;
				}
				break;
			case TAG_CONN:
				c = t->p;
				if (!c->dead && (evs[i].events & EPOLLIN) &&
				    conn_input(c) != 0)
					conn_close(c);
				break;
			}
		}
		/* publish / withdraw kick the control eventfd; listeners are
		 * freed only here, after every event that may point at them */
		if (ctl) {
			drain(S.ctl_efd);
			reap_listeners();
			register_listeners();
		}
		free_graveyard();
		pthread_mutex_unlock(&S.mu);
	}
	return NULL;
}

int
kupsim_server_start(const char *rundir)
{
	pthread_mutexattr_t a;
	char lockpath[PATH_MAX + 16];
	int n;

	if (strlen(rundir) >= sizeof(S.rundir) - KUP_NAME_MAX - 8) {
		fprintf(stderr, "kupsim: run directory path too long: %s\n", rundir);
		return -1;
	}
	snprintf(S.rundir, sizeof(S.rundir), "%s", rundir);
	if (mkdir(rundir, 0755) != 0 && errno != EEXIST) {
		fprintf(stderr, "kupsim: cannot create run directory %s: %s\n",
		    rundir, strerror(errno));
		return -1;
	}
	n = snprintf(lockpath, sizeof(lockpath), "%s/kupsim.lock", rundir);
	if (n < 0 || (size_t)n >= sizeof(lockpath))
		return -1;
	S.lock_fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (S.lock_fd < 0) {
		fprintf(stderr, "kupsim: cannot open lock file %s: %s\n", lockpath,
		    strerror(errno));
		return -1;
	}
	if (flock(S.lock_fd, LOCK_EX | LOCK_NB) != 0) {
		fprintf(stderr, "kupsim: run directory %s is held by another "
		    "running kupsim (lock %s): refusing to take over its sockets\n",
		    rundir, lockpath);
		close(S.lock_fd);
		S.lock_fd = -1;
		return -1;
	}
	S.ctl_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (S.ctl_efd < 0)
		goto fail_lock;
	S.ep = epoll_create1(EPOLL_CLOEXEC);
	if (S.ep < 0)
		goto fail_efd;
	S.t_ctl = (struct etag){ TAG_CTL, NULL };
	if (ep_add(S.ctl_efd, &S.t_ctl) != 0)
		goto fail_efd;
	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_init(&S.mu, &a);
	pthread_mutexattr_destroy(&a);
	S.mu_ready = 1;
	S.running = 1;
	if (pthread_create(&S.thr, NULL, poll_main, NULL) != 0)
		goto fail_efd;
	return 0;

fail_efd:
	S.running = 0;
	if (S.ep >= 0)
		close(S.ep);
	S.ep = -1;
	close(S.ctl_efd);
	S.ctl_efd = -1;
fail_lock:
	fprintf(stderr, "kupsim: starting the server: %s\n", strerror(errno));
	close(S.lock_fd);
	S.lock_fd = -1;
	return -1;
}

void
kupsim_server_stop(void)
{
	struct listener *l;

	if (!S.running)
		return;
	pthread_mutex_lock(&S.mu);
	S.stop = 1;
	pthread_mutex_unlock(&S.mu);
	kick(S.ctl_efd);
	pthread_join(S.thr, NULL);
	pthread_mutex_lock(&S.mu);
	while (S.cs != NULL)
		conn_close(S.cs);
	while ((l = S.ls) != NULL) {
		S.ls = l->next;
		if (!l->withdrawn)
			(void)unlink(l->path);
		close(l->fd);
		free(l);
	}
	free_graveyard();
	pthread_mutex_unlock(&S.mu);
	close(S.ep);
	S.ep = -1;
	close(S.ctl_efd);
	S.ctl_efd = -1;
	S.running = 0;
	close(S.lock_fd);
	S.lock_fd = -1;
}
