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
 * EPOLLHUP / EOF and calls kup_core_detach(), then kupsim_chan_renew_try():
 * the next attachment of the channel gets a new memfd and new eventfds,
 * and the fds this one was given lead nowhere.  No pid polling.  The
 * channels' user->kernel eventfds are NOT watched here: a module thread
 * sleeping on a channel polls that eventfd itself (kupsim_glue.c), so a
 * user's wake-up is one hop.
 *
 * This thread never waits for a module thread.  It serves every device, and
 * a module thread is in its channel while it waits in its receive and from
 * its receive until kupdev_unlock_channel -- for as long as the module
 * computes, seconds if it likes.  Waiting there (as the renewal once did)
 * stalled every attach, detach and info of every device for that long.  So
 * a renewal only tries, and a channel it found in use is "pending renewal"
 * (struct listener's renew[]): it is never handed out with the old
 * objects, and
 *   - the renewal is tried again whenever the module lets go of the channel
 *     (the core's KUP_CHAN_UNLOCKED hook kicks ctl_efd while a renewal
 *     waits: usually microseconds after the detach, the time a worker
 *     asleep in its receive takes to see -EPIPE) and every RENEW_RETRY_MS
 *     while any waits (a kick the hook missed; it is a hint, unfenced);
 *   - an ATTACH of that id, or of any channel when every free one is
 *     pending, waits (the connection is parked, this thread goes on
 *     serving everyone else) up to PARK_MS for the renewal, so that a user
 *     who re-attaches the channel it just left is not refused because the
 *     module had not woken up yet; then KUP_E_RELEASING ("retry later"),
 *     the answer for a channel the module genuinely still holds (a
 *     channel another user holds is KUP_E_BUSY at once);
 *   - an ATTACH of any channel gets a free, renewed one if there is one.
 * A channel whose departed user handed over a message the module has not
 * received yet is "deferred" instead (kupdev.h: the module's next receive
 * still delivers it, and fresh memory would lose it): it keeps its objects
 * until the module has taken it (the receive's let-go kicks us, as for a
 * pending one) or an ATTACH needs the channel -- that one renews it at once
 * (the message is then lost, as on the kernel hosts when the next user
 * attaches first); ANY prefers a renewed channel to a deferred one.
 * kup_core_attach itself takes the channel lock too (to reset the page),
 * which is why a pending channel is never passed to it: a channel whose
 * renewal ran was detached while we held its lock, so any module call on
 * it since sees it detached and lets go at once.
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
#include <time.h>
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
	/* RENEW_*: whether each channel's objects are its own, i.e. whether
	 * it may be handed out; only a detached channel is ever not DONE */
	uint8_t renew[KUP_MAX_CHANNELS];
	uint32_t npending;         /* renew[] entries RENEW_PENDING */
	uint32_t nfailed;          /* renew[] entries RENEW_FAILED */
	uint32_t ndeferred;        /* renew[] entries RENEW_DEFERRED */
	struct etag t_lis, t_ev;
	char name[KUP_NAME_MAX];
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	struct listener *next;
};

#define RENEW_DONE    0   /* fresh objects, or never attached */
#define RENEW_PENDING 1   /* a module thread held the lock: retried here */
#define RENEW_FAILED  2   /* the renewal failed (e.g. EMFILE): tried again
                           * by the next ATTACH that wants the channel */
#define RENEW_DEFERRED 3  /* the module has yet to receive what the user
                           * left: retried when it lets go (no timer),
                           * forced by an ATTACH that wants the channel */

/* How often a pending renewal is retried without a kick (ms), and how long
 * an ATTACH waits for one before it is refused with KUP_E_BUSY (ms). */
#define RENEW_RETRY_MS 10
#define PARK_MS        500

#define CONN_PLAIN    0
#define CONN_ATTACHED 1
#define CONN_WATCHER  2

struct conn {
	int fd;
	int kind;
	int dead;                  /* closed; freed after the batch */
	int parked;                /* an ATTACH (pq) waits for a renewal; not
	                            * polled for input meanwhile */
	int64_t park_until;        /* then it is refused (monotonic ms) */
	uint64_t park_pass;        /* the renew_service pass that last tried it */
	struct kupsim_req pq;
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
	uint32_t nparked;          /* connections with parked set */
	int publish_errors;        /* devices whose socket path cannot be
	                            * bound (__atomic: main reads it) */
	struct etag t_ctl;
} S = { .ctl_efd = -1, .ep = -1, .lock_fd = -1 };

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

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

/* Watch fd for input (EPOLLIN) or, events 0, only for its hang-up
 * (EPOLLHUP / EPOLLERR are always reported). */
static void
ep_mod(int fd, struct etag *t, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = t };

	if (epoll_ctl(S.ep, EPOLL_CTL_MOD, fd, &ev) != 0)
		kup_os_log("kupsim: epoll_ctl(MOD %d): %s", fd, strerror(errno));
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

void
kupsim_server_kick(void)
{
	/* ctl_efd is set before the first module thread exists and closed
	 * after the last is joined; atomic for the sanitizers' sake */
	int fd = __atomic_load_n(&S.ctl_efd, __ATOMIC_ACQUIRE);

	if (fd >= 0)
		kick(fd);
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
	if (n < 0 || (size_t)n >= sizeof(l->path) ||
	    (size_t)n >= sizeof(sa.sun_path)) {
		kup_os_log("kupsim: device %s: its socket path %s/%s.sock is too "
		    "long for a unix socket (sun_path holds %zu bytes): use a "
		    "shorter run directory (-d)", name, S.rundir, name,
		    sizeof(sa.sun_path) - 1);
		__atomic_add_fetch(&S.publish_errors, 1, __ATOMIC_RELAXED);
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

int
kupsim_server_publish_errors(void)
{
	return __atomic_load_n(&S.publish_errors, __ATOMIC_RELAXED);
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

/* Under S.mu: record channel id's renewal state in l. */
static void
renew_set(struct listener *l, uint32_t id, uint8_t st)
{
	if (id >= KUP_MAX_CHANNELS || l->renew[id] == st)
		return;
	if (l->renew[id] == RENEW_PENDING)
		l->npending--;
	else if (l->renew[id] == RENEW_FAILED)
		l->nfailed--;
	else if (l->renew[id] == RENEW_DEFERRED)
		l->ndeferred--;
	if (st == RENEW_PENDING)
		l->npending++;
	else if (st == RENEW_FAILED)
		l->nfailed++;
	else if (st == RENEW_DEFERRED)
		l->ndeferred++;
	l->renew[id] = st;
}

/* Under S.mu, ch detached: try to give it fresh objects for its next
 * attachment (never waiting for the module) and remember the outcome in l
 * (NULL: the device is withdrawn, no attach can succeed any more).  0 when
 * the channel is fresh, -EBUSY when a module thread is in it (pending),
 * -EAGAIN when its departed user left a message for the module (deferred;
 * never when force: an ATTACH needs the channel), another -errno when the
 * renewal failed. */
static int
chan_renew_in(struct listener *l, struct kup_chan *ch, int force)
{
	int r = kupsim_chan_renew_try(ch, force);

	if (l != NULL)
		renew_set(l, kup_core_chan_id(ch), r == 0 ? RENEW_DONE :
		    r == -EBUSY ? RENEW_PENDING :
		    r == -EAGAIN ? RENEW_DEFERRED : RENEW_FAILED);
	return r;
}

static int
chan_renew(struct kupdev_softc *sc, struct kup_chan *ch)
{
	return chan_renew_in(listener_of(sc), ch, 0);
}

/* Under S.mu: try the pending and deferred renewals of l again (l not
 * withdrawn, so l->sc holds the module's reference).  The tries cost
 * nothing when the module is still in the channel or has not received
 * what was left; a renewal that runs takes what a detach took. */
static void
renew_retry(struct listener *l)
{
	uint32_t id;

	for (id = 0; id < KUP_MAX_CHANNELS &&
	    l->npending + l->ndeferred != 0; id++) {
		struct kup_chan *ch;

		if (l->renew[id] != RENEW_PENDING &&
		    l->renew[id] != RENEW_DEFERRED)
			continue;
		ch = kup_core_chan_at(l->sc, id);
		if (ch != NULL)
			(void)chan_renew_in(l, ch, 0);
		else
			renew_set(l, id, RENEW_DONE);   /* no such channel */
	}
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
	if (c->parked) {
		c->parked = 0;
		S.nparked--;
	}
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

/* What do_attach may pass to kup_core_attach for a request of want */
#define PICK_OK    0   /* *id: a channel (or ANY) that is not pending */
#define PICK_WAIT  1   /* only a pending channel would do: wait for it */
#define PICK_BUSY  2   /* none free */
#define PICK_SYS   3   /* only channels whose renewal fails would do */

/*
 * Under S.mu: the channel id to pass to kup_core_attach for a request of
 * want, such that the core is never handed a channel whose renewal has
 * not run (it would wait for the module's lock, and the channel still has
 * the previous user's objects).  info is a snapshot taken now; only this
 * thread attaches or detaches, so its attached[] is current.  A failed
 * renewal is tried again here, for the channel the request would get.
 */
/* pick_channel's last resort: renew the first free channel of the first n
 * whose renewal state is ``state`` (*id, 1), else 0; a channel still busy
 * sets *waiting, one that cannot be renewed sets *failed. */
static int
renew_one(struct listener *l, const struct kup_ioc_info *info, uint32_t n,
    int state, uint32_t *id, int *waiting, int *failed)
{
	struct kup_chan *ch;
	uint32_t i;
	int r;

	for (i = 0; i < n; i++) {
		if ((info->attached[i] & KUP_INFO_ATTACHED) || l->renew[i] != state)
			continue;
		ch = kup_core_chan_at(l->sc, i);
		r = ch != NULL ? chan_renew_in(l, ch, 1) : -ENOENT;
		if (r == 0) {
			*id = i;
			return 1;
		}
		if (r == -EBUSY)
			*waiting = 1;
		else
			*failed = 1;
	}
	return 0;
}

static int
pick_channel(struct listener *l, const struct kup_ioc_info *info,
    uint32_t want, uint32_t *id)
{
	struct kup_chan *ch;
	uint32_t i, n = info->announced;
	int waiting = 0, failed = 0, deferred = 0, r;

	*id = want;
	if (l->npending == 0 && l->nfailed == 0 && l->ndeferred == 0)
		return PICK_OK;   /* every free channel is fresh */
	if (want != KUP_CHAN_ANY) {
		if (want >= KUP_MAX_CHANNELS || (info->attached[want] & KUP_INFO_ATTACHED))
			return PICK_OK;   /* the core says what is wrong */
		if (l->renew[want] == RENEW_PENDING)
			return PICK_WAIT;
		if (l->renew[want] == RENEW_FAILED ||
		    l->renew[want] == RENEW_DEFERRED) {
			ch = kup_core_chan_at(l->sc, want);
			r = ch != NULL ? chan_renew_in(l, ch, 1) : 0;
			if (r == -EBUSY)
				return PICK_WAIT;
			if (r != 0)
				return PICK_SYS;
		}
		return PICK_OK;
	}
	if (n > info->chan_count)
		n = info->chan_count;
	if (n > KUP_MAX_CHANNELS)
		n = KUP_MAX_CHANNELS;
	if (n == 0)
		return PICK_OK;   /* the core: not announced yet */
	for (i = 0; i < n; i++) {
		if (info->attached[i] & KUP_INFO_ATTACHED)
			continue;
		if (l->renew[i] == RENEW_DONE) {
			*id = i;
			return PICK_OK;
		}
		if (l->renew[i] == RENEW_PENDING)
			waiting = 1;
		else if (l->renew[i] == RENEW_DEFERRED)
			deferred = 1;
		else
			failed = 1;
	}
	/* no fresh free channel: one whose user left a message the module
	 * has not taken renews now (losing it: the next user comes first) */
	if (deferred && renew_one(l, info, n, RENEW_DEFERRED, id, &waiting, &failed))
		return PICK_OK;
	/* one whose renewal failed may renew now */
	if (failed && renew_one(l, info, n, RENEW_FAILED, id, &waiting, &failed))
		return PICK_OK;
	return waiting ? PICK_WAIT : failed ? PICK_SYS : PICK_BUSY;
}

/*
 * ATTACH.  0 (answered), -1 (close the connection: detaches), or
 * ATTACH_WAIT: the channel it wants is pending renewal and may_wait is
 * set -- the caller parks the request and asks again after the next
 * renewal (may_wait 0 once the wait is over: KUP_E_RELEASING).
 */
#define ATTACH_WAIT 1

static int
do_attach(struct conn *c, const struct kupsim_req *q, int may_wait)
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
	int fds[3], e, pick, tries;
	uint32_t pages, id;

	if (c->kind != CONN_PLAIN)
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_INVAL);
	info = malloc(sizeof(*info));
	if (info == NULL)
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_SYS);
	kup_core_info(c->sc, info);
	pages = info->pages;
	if (q->pages != 0 && q->pages != pages) {
		free(info);
		return reply_status(c, KUPSIM_OP_ATTACH, KUP_E_INVAL);
	}
	for (tries = 0;; tries++) {
		/* A wrong ABI version or a device shutting down (for good: the
		 * flag never clears) is refused by the core before it looks at
		 * any channel; withdrawn (l NULL) implies shutting down. */
		l = listener_of(c->sc);
		id = q->chan_id;
		pick = PICK_OK;
		if (l != NULL && q->abi_version == KUP_ABI_VERSION &&
		    !info->shutting_down) {
			renew_retry(l);
			pick = pick_channel(l, info, q->chan_id, &id);
		}
		if (pick != PICK_OK)
			break;
		e = kup_core_attach(c->sc, id, q->abi_version, &ch);
		/* a holder that hung up further down the ready list: close it
		 * and look again (its channel may now be pending renewal) */
		if (e == -EBUSY && tries == 0 && reap_departed(c->sc) != 0) {
			kup_core_info(c->sc, info);
			continue;
		}
		break;
	}
	free(info);
	/* -EINPROGRESS: a renewed channel's lock taken for a moment by a
	 * worker of an earlier attachment (KUP_ATTACH_LETGO_MS is 0 here):
	 * park as for a pending renewal; the worker letting go kicks us */
	if (pick == PICK_OK && e == -EINPROGRESS) {
		pick = PICK_WAIT;
		if ((ch = kup_core_chan_at(c->sc, id)) != NULL)
			kupsim_chan_want_lock(ch);
		ch = NULL;
	}
	if (pick == PICK_WAIT && may_wait)
		return ATTACH_WAIT;
	/* PICK_WAIT here: parked PARK_MS already, the module still holds
	 * it -- not "another user has it" (KUP_E_BUSY) */
	if (pick != PICK_OK)
		return reply_status(c, KUPSIM_OP_ATTACH,
		    pick == PICK_SYS ? KUP_E_SYS :
		    pick == PICK_WAIT ? KUP_E_RELEASING : KUP_E_BUSY);
	if (e != 0)
		return reply_status(c, KUPSIM_OP_ATTACH, kup_core_errno_to_kup(e));
	/* pick_channel never lets the core choose a channel that is not
	 * fresh; should that ever change, undo rather than hand it out */
	l = listener_of(c->sc);
	if (l != NULL && l->renew[kup_core_chan_id(ch)] != RENEW_DONE) {
		kup_os_log("kupsim: %s/%u: attached before its renewal; undone",
		    l->name, kup_core_chan_id(ch));
		kup_core_detach(ch);
		(void)chan_renew_in(l, ch, 1);
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

/* Under S.mu: c's ATTACH q waits for a renewal (no input read from c
 * meanwhile: its requests are answered in order). */
static void
park(struct conn *c, const struct kupsim_req *q)
{
	if (c->parked)
		return;
	c->parked = 1;
	c->pq = *q;
	c->park_until = now_ms() + PARK_MS;
	S.nparked++;
	ep_mod(c->fd, &c->t, 0);
}

static void
unpark(struct conn *c)
{
	if (!c->parked)
		return;
	c->parked = 0;
	S.nparked--;
	ep_mod(c->fd, &c->t, EPOLLIN);
}

/* Under S.mu, after a batch: retry the pending renewals, then the parked
 * ATTACHes (answered once their channel is renewed or their wait is
 * over).  Returns the epoll timeout for the next wait: RENEW_RETRY_MS
 * while anything waits, else -1. */
static int
renew_service(void)
{
	static uint64_t pass;
	struct listener *l;
	struct conn *c, *next;
	int64_t now;
	int waiting = 0, r;

	for (l = S.ls; l != NULL; l = l->next)
		if (!l->withdrawn && l->npending + l->ndeferred != 0)
			renew_retry(l);
	if (S.nparked != 0) {
		now = now_ms();
		pass++;
		for (c = S.cs; c != NULL; c = next) {
			next = c->next;
			if (c->dead || !c->parked || c->park_pass == pass)
				continue;
			c->park_pass = pass;
			r = do_attach(c, &c->pq, now < c->park_until);
			if (r != ATTACH_WAIT) {
				unpark(c);
				if (r != 0)
					conn_close(c);
			}
			/* do_attach may close other connections (reap_departed),
			 * and conn_close moves a connection to the graveyard:
			 * a closed next leads there, not on through S.cs.  Start
			 * over; park_pass skips those already tried. */
			if (next != NULL && next->dead)
				next = S.cs;
		}
	}
	for (l = S.ls; l != NULL; l = l->next)
		if (!l->withdrawn && l->npending != 0)
			waiting = 1;
	return waiting || S.nparked != 0 ? RENEW_RETRY_MS : -1;
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
	int r;

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
		r = do_attach(c, &u.q, 1);
		if (r == ATTACH_WAIT) {
			park(c, &u.q);
			r = 0;
		}
		return r;
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
	int wait_ms = -1;   /* RENEW_RETRY_MS while a renewal or ATTACH waits */

	(void)arg;
	pthread_mutex_lock(&S.mu);
	register_listeners();
	pthread_mutex_unlock(&S.mu);
	for (;;) {
		int n, i, ctl = 0;

		n = epoll_wait(S.ep, evs, EP_BATCH, wait_ms);
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
		/* renewals the module let go of (its unlock kicked ctl_efd) or
		 * that the retry period is up for, and the ATTACHes they hold */
		wait_ms = renew_service();
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

	/* every device's socket is RUNDIR/<name>.sock (kupsim_server_publish),
	 * bound through sun_path: refuse now a RUNDIR that leaves no room for
	 * any name at all.  (A longer name that does not fit is refused when
	 * its device is published, naming it.)  errno ENAMETOOLONG tells
	 * kupsim_main it is the command line's fault. */
	if (strlen(rundir) + sizeof("/x.sock") >
	    sizeof(((struct sockaddr_un *)0)->sun_path)) {
		fprintf(stderr, "kupsim: run directory path too long for the "
		    "devices' unix sockets: %s (%zu characters; %s/<name>.sock "
		    "must fit sun_path's %zu bytes)\n", rundir, strlen(rundir),
		    rundir, sizeof(((struct sockaddr_un *)0)->sun_path));
		errno = ENAMETOOLONG;
		return -1;
	}
	snprintf(S.rundir, sizeof(S.rundir), "%s", rundir);
	/* 0700: whoever can reach a device socket attaches channels directly,
	 * past kupd's policy (docs/security.md); a directory kupsim makes is
	 * its user's alone.  One that exists is used as it is. */
	if (mkdir(rundir, 0700) != 0 && errno != EEXIST) {
		fprintf(stderr, "kupsim: cannot create run directory %s: %s\n",
		    rundir, strerror(errno));
		return -1;
	}
	n = snprintf(lockpath, sizeof(lockpath), "%s/kupsim.lock", rundir);
	if (n < 0 || (size_t)n >= sizeof(lockpath))
		return -1;
	/* O_NOFOLLOW: a link planted at the name in a run directory others
	 * can write must not make kupsim create a file where it points */
	S.lock_fd = open(lockpath, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0644);
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
	__atomic_store_n(&S.ctl_efd, eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
	    __ATOMIC_RELEASE);
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
	__atomic_store_n(&S.ctl_efd, -1, __ATOMIC_RELEASE);
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
	__atomic_store_n(&S.ctl_efd, -1, __ATOMIC_RELEASE);
	S.running = 0;
	close(S.lock_fd);
	S.lock_fd = -1;
}
