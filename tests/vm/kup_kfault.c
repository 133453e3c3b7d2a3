/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_kfault.c -- kernel-side tests of kup.ko + kup_echo.ko, run inside the
 * test VM (tests/vm/test_vm.py).  Talks to /dev/kup/echo with the raw
 * ioctl ABI (kup_ioctl.h) and its own minimal user side of the turn
 * protocol, so it can also break the protocol on purpose.
 *
 *   kup_kfault basic | mmap | sigkill | hostile | abuse | siege |
 *              unload-hold DIR | unload-waiters DIR | reload-race DIR |
 *              traffic DIR CHAN | chans NAME | deadholder DIR | anyherd
 *
 * Exit status 0 = pass; every failure prints "FAIL: <what>" and exits 1.
 * Every wait is bounded (poll with a timeout); nothing asserts on time.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sched.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/futex.h>
#include <linux/io_uring.h>
#include <linux/userfaultfd.h>

#include "kup_abi.h"
#include "kup_ioctl.h"

#define DEV "/dev/kup/echo"
#define WAIT_MS 20000   /* generous: the VM runs under TCG */

static const char *g_test = "?";
static const char *g_dev = DEV;   /* what open_dev opens */

static void __attribute__((noreturn, format(printf, 1, 2)))
fail(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "FAIL: %s: ", g_test);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, " (errno %d %s)\n", errno, strerror(errno));
	exit(1);
}

#define CHECK(c, ...) do { if (!(c)) fail(__VA_ARGS__); } while (0)

struct chan {
	int fd;
	struct kup_ioc_attach a;
	uint8_t *mem;
	struct kup_ctrl *ctrl;
	uint64_t u2k_seq;      /* last sent */
	uint64_t k2u_seq;      /* last received */
};

static int
open_dev(void)
{
	int fd = open(g_dev, O_RDWR | O_CLOEXEC);

	CHECK(fd >= 0, "open %s", g_dev);
	return fd;
}

static int
attach_raw(int fd, uint32_t chan_id, uint32_t abi, struct kup_ioc_attach *a)
{
	memset(a, 0, sizeof(*a));
	a->abi_version = abi;
	a->chan_id = chan_id;
	return ioctl(fd, KUP_IOC_ATTACH, a);
}

/* retry: a channel its last user has just left may still have its
 * module's worker in it, on its way out (EINPROGRESS after the attach's
 * 500 ms); wait for it, bounded, instead of failing -- under a loaded TCG
 * host the worker's way out can take that long. */
static void
chan_open_how(struct chan *c, uint32_t chan_id, int retry)
{
	int i;

	memset(c, 0, sizeof(*c));
	c->fd = open_dev();
	for (i = 0; retry && i < WAIT_MS / 50; i++) {
		if (attach_raw(c->fd, chan_id, KUP_ABI_VERSION, &c->a) == 0)
			break;
		CHECK(errno == EINPROGRESS, "attach chan %u", chan_id);
		usleep(50 * 1000);
	}
	CHECK(retry ? i < WAIT_MS / 50 :
	    attach_raw(c->fd, chan_id, KUP_ABI_VERSION, &c->a) == 0,
	    "attach chan %u", chan_id);
	CHECK(c->a.chan_id == chan_id, "attach returned chan %u", c->a.chan_id);
	c->mem = mmap(NULL, c->a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
	    c->fd, (off_t)c->a.map_offset);
	CHECK(c->mem != MAP_FAILED, "mmap %llu bytes",
	    (unsigned long long)c->a.map_size);
	c->ctrl = (struct kup_ctrl *)c->mem;
	CHECK(c->ctrl->magic == KUP_MAGIC && c->ctrl->abi_version == KUP_ABI_VERSION,
	    "control page identity");
	CHECK(c->ctrl->chan_id == chan_id, "control page chan_id %u", c->ctrl->chan_id);
	CHECK((uint64_t)c->ctrl->u2k_off + c->ctrl->u2k_size <= c->a.map_size,
	    "u2k area inside the mapping");
}

static void
chan_open(struct chan *c, uint32_t chan_id)
{
	chan_open_how(c, chan_id, 0);
}

static void
chan_close(struct chan *c)
{
	munmap(c->mem, c->a.map_size);
	close(c->fd);
	c->fd = -1;
}

static uint32_t
turn(struct chan *c)
{
	return __atomic_load_n(&c->ctrl->turn, __ATOMIC_ACQUIRE);
}

/* Consume pending wake-ups (read(2) never blocks: EAGAIN when none). */
static void
drain(struct chan *c)
{
	uint64_t v;
	ssize_t n = read(c->fd, &v, sizeof(v));

	CHECK((n == (ssize_t)sizeof(v) && v >= 1) || (n == -1 && errno == EAGAIN),
	    "read on the channel fd: %zd", n);
}

/* Wait until the turn is ours (poll on the fd, as libkup does). */
static short
wait_user_turn(struct chan *c)
{
	struct pollfd p = { .fd = c->fd, .events = POLLIN };
	int n;

	for (;;) {
		if (turn(c) == KUP_TURN_USER)
			return POLLIN;
		__atomic_store_n(&c->ctrl->user_waiting, 1, __ATOMIC_SEQ_CST);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (turn(c) == KUP_TURN_USER) {
			c->ctrl->user_waiting = 0;
			return POLLIN;
		}
		n = poll(&p, 1, WAIT_MS);
		c->ctrl->user_waiting = 0;
		drain(c);
		CHECK(n >= 0, "poll");
		CHECK(n == 1, "the kernel never handed the turn back (state 0x%x)",
		    c->ctrl->state);
		if (p.revents & (POLLHUP | POLLERR))
			return p.revents;
	}
}

/* Receive the kernel's message (checks seq), returns its kind. */
static uint32_t
recv_msg(struct chan *c, void *buf, size_t cap, size_t *lenp)
{
	uint32_t len, kind;
	uint64_t seq;
	short ev = wait_user_turn(c);

	CHECK(ev == POLLIN, "unexpected poll events 0x%x", ev);
	len = c->ctrl->k2u.len;
	kind = c->ctrl->k2u.kind;
	seq = c->ctrl->k2u.seq;
	CHECK(seq == c->k2u_seq + 1, "k2u seq %llu after %llu",
	    (unsigned long long)seq, (unsigned long long)c->k2u_seq);
	CHECK(len <= c->ctrl->k2u_size && len <= cap, "k2u len %u", len);
	c->k2u_seq = seq;
	memcpy(buf, c->mem + c->a.page_size, len);
	if (lenp != NULL)
		*lenp = len;
	return kind;
}

static void
handover(struct chan *c)
{
	__atomic_store_n(&c->ctrl->turn, KUP_TURN_KERNEL, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (__atomic_load_n(&c->ctrl->kernel_waiting, __ATOMIC_RELAXED))
		CHECK(ioctl(c->fd, KUP_IOC_WAKE) == 0, "wake ioctl");
}

static void
send_msg(struct chan *c, uint32_t kind, const void *data, uint32_t len)
{
	uint8_t *u2k = c->mem + c->ctrl->u2k_off;

	CHECK(turn(c) == KUP_TURN_USER, "send without the turn");
	if (len != 0)
		memcpy(u2k, data, len);
	c->ctrl->u2k.len = len;
	c->ctrl->u2k.kind = kind;
	c->ctrl->u2k.seq = ++c->u2k_seq;
	handover(c);
}

/* PASS from the echo worker, then one DATA round trip. */
static void
echo_round(struct chan *c, const char *msg, const char *expect)
{
	char buf[256];
	size_t len;

	CHECK(recv_msg(c, buf, sizeof(buf), &len) == KUP_KIND_PASS && len == 0,
	    "first message is not the worker's PASS");
	send_msg(c, KUP_KIND_DATA, msg, (uint32_t)strlen(msg));
	CHECK(recv_msg(c, buf, sizeof(buf), &len) == KUP_KIND_DATA,
	    "echo reply is not DATA");
	CHECK(len == strlen(expect) && memcmp(buf, expect, len) == 0,
	    "echo reply '%.*s' != '%s'", (int)len, buf, expect);
}

/* ------------------------------------------------------------------ */

static void
test_basic(void)
{
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	struct kup_ioc_attach a;
	struct chan c, c1;
	struct stat st;
	int fd, fd2;

	g_test = "basic";
	CHECK(ii != NULL, "calloc");
	CHECK(stat(DEV, &st) == 0, "stat %s", DEV);
	CHECK(S_ISCHR(st.st_mode) && (st.st_mode & 0777) == 0600 && st.st_uid == 0,
	    "%s is not a root-only (0600) character device: mode %o uid %u", DEV,
	    st.st_mode, st.st_uid);
	fd = open_dev();
	CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
	CHECK(strcmp(ii->name, "echo") == 0, "info name '%s'", ii->name);
	CHECK(ii->abi_version == KUP_ABI_VERSION && ii->chan_count >= 8 &&
	    ii->announced == ii->chan_count && ii->pages >= 1 &&
	    ii->max_msg == ii->pages * ii->page_size && !ii->shutting_down &&
	    ii->attached_chan == KUP_IOC_CHAN_ANY,
	    "info facts (chans %u announced %u pages %u max %u)", ii->chan_count,
	    ii->announced, ii->pages, ii->max_msg);

	/* a device fd with no news: not readable, nothing to read; writing
	 * (a channel's self-wake) needs a channel */
	{
		struct pollfd p = { .fd = fd, .events = POLLIN };
		uint64_t v = 1;

		CHECK(poll(&p, 1, 0) == 0, "device fd readable without an event (0x%x)",
		    p.revents);
		errno = 0;
		CHECK(read(fd, &v, sizeof(v)) == -1 && errno == EAGAIN, "device fd read");
		errno = 0;
		CHECK(write(fd, &v, sizeof(v)) == -1 && errno == EINVAL, "device fd write");
	}
	/* refusals, each with its errno */
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_WAKE) == -1 && errno == EINVAL, "WAKE unattached");
	errno = 0;
	CHECK(ioctl(fd, _IO(KUP_IOC_MAGIC, 0xbf)) == -1 && errno == ENOTTY,
	    "unknown ioctl");
	errno = 0;
	CHECK(attach_raw(fd, 0, KUP_ABI_VERSION + 1, &a) == -1 &&
	    errno == EPROTONOSUPPORT, "ABI version mismatch refused");
	errno = 0;
	CHECK(attach_raw(fd, 1000000, KUP_ABI_VERSION, &a) == -1 && errno == ENOENT,
	    "channel out of range");
	memset(&a, 0, sizeof(a));
	a.abi_version = KUP_ABI_VERSION;
	a.reserved[3] = 1;
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_ATTACH, &a) == -1 && errno == EINVAL,
	    "non-zero reserved field");
	/* bad pointers are EFAULT, never a crash */
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_ATTACH, NULL) == -1 && errno == EFAULT, "ATTACH NULL");
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_INFO, (void *)16) == -1 && errno == EFAULT, "INFO bad ptr");
	/* every other request of our ioctl type is ENOTTY, whatever the
	 * encoded direction and size (deterministic pseudo-random sweep) */
	{
		static unsigned char junk[16384];
		uint32_t x = 12345;
		int k;

		for (k = 0; k < 4000; k++) {
			unsigned long cmd;

			x = x * 1103515245U + 12345U;
			cmd = _IOC((x >> 4) & 3U, KUP_IOC_MAGIC, (x >> 8) & 0xffU,
			    (x >> 16) & 0x1fffU);
			if (cmd == KUP_IOC_ATTACH || cmd == KUP_IOC_INFO ||
			    cmd == KUP_IOC_WAKE)
				continue;
			memset(junk, (int)(x & 0xff), sizeof(junk));
			errno = 0;
			CHECK(ioctl(fd, cmd, junk) == -1 && errno == ENOTTY,
			    "ioctl 0x%lx was not refused with ENOTTY", cmd);
		}
	}
	/* a file opened read-only may ask INFO, never take a channel */
	{
		int ro = open(DEV, O_RDONLY | O_CLOEXEC);

		CHECK(ro >= 0, "open %s read-only", DEV);
		CHECK(ioctl(ro, KUP_IOC_INFO, ii) == 0, "INFO on a read-only file");
		errno = 0;
		CHECK(attach_raw(ro, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &a) == -1 &&
		    errno == EBADF, "ATTACH on a read-only file");
		errno = 0;
		CHECK(ioctl(ro, KUP_IOC_WAKE) == -1 && errno == EBADF,
		    "WAKE on a read-only file");
		close(ro);
	}
	memset(&a, 0, sizeof(a));
	a.abi_version = KUP_ABI_VERSION;
	a.pages = ii->pages + 1;
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_ATTACH, &a) == -1 && errno == EINVAL,
	    "wrong page count");
	close(fd);

	/* even channel echoes, odd channel upper-cases */
	chan_open(&c, 0);
	CHECK(c.a.map_size == (uint64_t)c.a.page_size * (1 + 2 * c.a.dev_pages),
	    "map size");
	echo_round(&c, "hello kernel", "hello kernel");
	{
		struct pollfd p = { .fd = c.fd, .events = POLLIN };
		char buf[64];
		size_t len;

		/* a reply that comes later wakes the sleeping poller */
		send_msg(&c, KUP_KIND_DATA, "!delay", 6);
		CHECK(recv_msg(&c, buf, sizeof(buf), &len) == KUP_KIND_DATA &&
		    len == 6 && memcmp(buf, "!delay", 6) == 0, "delayed echo");
		/* a kernel that keeps the turn: the fd is not readable, and
		 * read has nothing to give */
		send_msg(&c, KUP_KIND_DATA, "!hold", 5);
		CHECK(poll(&p, 1, 0) == 0, "readable while the kernel holds the turn "
		    "(revents 0x%x)", p.revents);
		errno = 0;
		CHECK(read(c.fd, buf, 8) == -1 && errno == EAGAIN, "read with nothing pending");
		errno = 0;
		CHECK(read(c.fd, buf, 4) == -1 && errno == EINVAL, "read of 4 bytes");
	}
	chan_open(&c1, 1);
	echo_round(&c1, "hello kernel", "HELLO KERNEL");

	/* one channel per fd; one fd per channel */
	errno = 0;
	CHECK(attach_raw(c.fd, 2, KUP_ABI_VERSION, &a) == -1 && errno == EBUSY,
	    "second attach on one fd");
	fd2 = open_dev();
	errno = 0;
	CHECK(attach_raw(fd2, 0, KUP_ABI_VERSION, &a) == -1 && errno == EBUSY,
	    "attach of a busy channel");
	CHECK(ioctl(fd2, KUP_IOC_INFO, ii) == 0 &&
	    (ii->attached[0] & KUP_INFO_ATTACHED) &&
	    (ii->attached[1] & KUP_INFO_ATTACHED), "info shows the attachments");
	CHECK(attach_raw(fd2, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &a) == 0 &&
	    a.chan_id == 2, "ANY picks the first free channel (got %u)", a.chan_id);
	close(fd2);
	chan_close(&c);
	chan_close(&c1);

	/* after close the channel is free again and starts from scratch */
	chan_open(&c, 0);
	echo_round(&c, "again", "again");
	chan_close(&c);
	free(ii);
	printf("basic: ok\n");
}

static void
expect_mmap_einval(int fd, size_t len, off_t off, int flags, const char *what)
{
	void *p;

	errno = 0;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, fd, off);
	if (p != MAP_FAILED)
		munmap(p, len);
	CHECK(p == MAP_FAILED && errno == EINVAL, "mmap %s was not refused", what);
}

/* The VmFlags line of /proc/self/smaps for the mapping that starts at
 * addr, into buf ("" if there is none).  The flags the module sets through
 * its version branch (vm_flags_mod from 6.3, vma->vm_flags before) show
 * there as two-letter names. */
static void
vm_flags_of(const void *addr, char *buf, size_t size)
{
	char line[512], perms[8];
	unsigned long start, end;
	size_t n;
	int here = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	CHECK(f != NULL, "open /proc/self/smaps");
	buf[0] = '\0';
	while (fgets(line, sizeof(line), f) != NULL) {
		/* a mapping's header: "start-end perms offset dev inode path" */
		if (sscanf(line, "%lx-%lx %7s", &start, &end, perms) == 3) {
			here = start == (unsigned long)addr;
			continue;
		}
		if (here && strncmp(line, "VmFlags:", 8) == 0) {
			n = strlen(line + 8);
			if (n >= size)
				n = size - 1;
			memcpy(buf, line + 8, n);
			buf[n] = '\0';
			break;
		}
	}
	fclose(f);
}

/* flags: the VmFlags text; name: a two-letter flag */
static int
has_vm_flag(const char *flags, const char *name)
{
	const char *p = flags;
	size_t n = strlen(name);

	while ((p = strstr(p, name)) != NULL) {
		if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n' || p[n] == '\0'))
			return 1;
		p += n;
	}
	return 0;
}

static void
test_mmap(void)
{
	struct chan c;
	size_t bytes, pg;
	int fd;
	void *p;

	g_test = "mmap";
	fd = open_dev();
	expect_mmap_einval(fd, 4096, 0, MAP_SHARED, "before attach");
	close(fd);

	chan_open(&c, 4);
	bytes = c.a.map_size;
	pg = c.a.page_size;
	expect_mmap_einval(c.fd, bytes + pg, 0, MAP_SHARED, "one page too long");
	expect_mmap_einval(c.fd, pg, (off_t)bytes, MAP_SHARED, "offset at the end");
	expect_mmap_einval(c.fd, bytes, (off_t)pg, MAP_SHARED, "window sliding past the end");
	expect_mmap_einval(c.fd, pg, (off_t)1 << 40, MAP_SHARED, "huge offset");
	expect_mmap_einval(c.fd, pg, (off_t)(((uint64_t)1 << 52) - pg), MAP_SHARED,
	    "offset near overflow");
	expect_mmap_einval(c.fd, bytes, 0, MAP_PRIVATE, "MAP_PRIVATE");
	errno = 0;
	p = mmap(NULL, pg, PROT_READ | PROT_EXEC, MAP_SHARED, c.fd, 0);
	CHECK(p == MAP_FAILED && errno == EINVAL, "PROT_EXEC mapping was not refused");
	errno = 0;
	CHECK(mprotect(c.mem, pg, PROT_READ | PROT_EXEC) == -1 && errno == EACCES,
	    "mprotect made the channel executable");
	/* what the kernel recorded: never expandable ("de"), never in a core
	 * dump ("dd"), never executable later ("me" gone) */
	{
		char flags[256];

		vm_flags_of(c.mem, flags, sizeof(flags));
		CHECK(flags[0] != '\0', "no VmFlags for the channel mapping in smaps");
		CHECK(has_vm_flag(flags, "de") && has_vm_flag(flags, "dd") &&
		    !has_vm_flag(flags, "me") && has_vm_flag(flags, "sh") &&
		    has_vm_flag(flags, "pf"),
		    "channel mapping VmFlags:%s want de dd sh pf, no me", flags);
		printf("mmap: VmFlags:%s", flags);
	}

	/* no page of the channel can be pinned: a pin (vmsplice into a pipe,
	 * an io_uring buffer, O_DIRECT) would outlive this attachment and
	 * show the next user's messages -- the pages are reused */
	{
		struct iovec iov = { .iov_base = c.mem, .iov_len = pg };
		int pfd[2];
		ssize_t n;

		CHECK(pipe(pfd) == 0, "pipe");
		errno = 0;
		n = vmsplice(pfd[1], &iov, 1, 0);
		CHECK(n == -1 && errno == EFAULT,
		    "vmsplice pinned the channel's pages (returned %zd)", n);
		close(pfd[0]);
		close(pfd[1]);
	}

	/* a window inside the channel is fine, and shows the same bytes */
	p = mmap(NULL, pg, PROT_READ, MAP_SHARED, c.fd, (off_t)pg);
	CHECK(p != MAP_FAILED, "mmap of the k2u page alone");
	c.mem[pg] = 0x5a;
	CHECK(((volatile uint8_t *)p)[0] == 0x5a, "the two mappings share pages");
	munmap(p, pg);

	/* the mapping cannot be grown past the channel */
	errno = 0;
	p = mremap(c.mem, bytes, bytes + pg, MREMAP_MAYMOVE);
	CHECK(p == MAP_FAILED, "mremap grew the channel mapping");
	chan_close(&c);
	printf("mmap: ok\n");
}

/* The child attaches, takes the worker's PASS, waits until the kernel
 * sleeps in receive (kernel_waiting), tells the parent and blocks; the
 * parent SIGKILLs it.  The kernel waiter must get -EPIPE (echo logs
 * "peer gone"), the channel must be free again, and a new user must be
 * served by a new worker (echo joins the old one first: if the old worker
 * were still stuck, the new round trip would never complete). */
static void
test_sigkill(void)
{
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	int pfd[2], st, fd, i;
	char b;
	pid_t pid;
	struct chan c;

	g_test = "sigkill";
	CHECK(ii != NULL && pipe(pfd) == 0, "pipe");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		char buf[64];

		close(pfd[0]);
		chan_open(&c, 24);
		CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
		/* the worker sleeps once it has given up spinning */
		for (i = 0; i < WAIT_MS / 10 &&
		    !__atomic_load_n(&c.ctrl->kernel_waiting, __ATOMIC_ACQUIRE); i++)
			usleep(10000);
		b = c.ctrl->kernel_waiting ? 'w' : 'n';
		CHECK(write(pfd[1], &b, 1) == 1, "write");
		for (;;)
			pause();
	}
	close(pfd[1]);
	CHECK(read(pfd[0], &b, 1) == 1, "child did not report");
	CHECK(b == 'w', "the kernel never went to sleep waiting for the user");
	CHECK(kill(pid, SIGKILL) == 0, "kill");
	CHECK(waitpid(pid, &st, 0) == pid && WIFSIGNALED(st), "waitpid");
	close(pfd[0]);

	fd = open_dev();
	for (i = 0; i < WAIT_MS / 10; i++) {
		CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
		if (!ii->attached[24])
			break;
		usleep(10000);
	}
	CHECK(!ii->attached[24], "channel 24 still attached after its user died");
	close(fd);
	chan_open(&c, 24);
	echo_round(&c, "after the kill", "after the kill");
	chan_close(&c);
	free(ii);
	printf("sigkill: ok\n");
}

/* A user that writes garbage into the control area: the kernel must
 * refuse it (-EPROTO inside; user sees PEER_GONE + POLLERR), read no
 * payload, and the channel must work again for the next user. */
static void
hostile_case(uint32_t chan_id, const char *what, uint32_t len, uint32_t kind,
    uint64_t seq_delta, uint32_t turn_value)
{
	struct pollfd p;
	struct chan c;
	char buf[64];
	int n, i;

	chan_open(&c, chan_id);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "%s: PASS", what);
	c.ctrl->u2k.len = len;
	c.ctrl->u2k.kind = kind;
	c.ctrl->u2k.seq = c.u2k_seq + 1 + seq_delta;
	__atomic_store_n(&c.ctrl->turn, turn_value, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	CHECK(ioctl(c.fd, KUP_IOC_WAKE) == 0, "%s: wake", what);
	p.fd = c.fd;
	p.events = POLLIN;
	for (i = 0; i < 100; i++) {
		p.revents = 0;
		n = poll(&p, 1, WAIT_MS);
		CHECK(n == 1, "%s: no reaction from the kernel", what);
		if (p.revents & POLLERR)
			break;
		drain(&c);   /* some other wake-up: wait for the next one */
	}
	CHECK(p.revents & POLLERR, "%s: poll never reported POLLERR (revents 0x%x)",
	    what, p.revents);
	CHECK(c.ctrl->state & KUP_STATE_PEER_GONE, "%s: state 0x%x lacks PEER_GONE",
	    what, c.ctrl->state);
	CHECK(c.ctrl->k2u.seq == 1, "%s: the kernel answered garbage", what);
	chan_close(&c);

	chan_open(&c, chan_id);
	echo_round(&c, "sane again", chan_id & 1 ? "SANE AGAIN" : "sane again");
	chan_close(&c);
	printf("hostile %s: refused\n", what);
}

static void
test_hostile(void)
{
	struct chan c;

	g_test = "hostile";
	chan_open(&c, 6);
	hostile_case(8, "length 0xffffffff", 0xffffffffU, KUP_KIND_DATA, 0,
	    KUP_TURN_KERNEL);
	hostile_case(10, "length one past the area", c.ctrl->u2k_size + 1,
	    KUP_KIND_DATA, 0, KUP_TURN_KERNEL);
	chan_close(&c);
	hostile_case(12, "kind 77", 4, 77, 0, KUP_TURN_KERNEL);
	hostile_case(14, "sequence gap", 4, KUP_KIND_DATA, 5, KUP_TURN_KERNEL);
	hostile_case(16, "repeated sequence", 4, KUP_KIND_DATA, (uint64_t)-1,
	    KUP_TURN_KERNEL);
	hostile_case(18, "PASS with a length", 4, KUP_KIND_PASS, 0, KUP_TURN_KERNEL);
	hostile_case(20, "garbage turn word", 4, KUP_KIND_DATA, 0, 0x12345678U);

	/* the boundary itself is legal: a full-size message echoes back */
	{
		size_t max, len;
		char *big, *back;

		chan_open(&c, 22);
		max = c.ctrl->u2k_size;
		big = malloc(max);
		back = malloc(max);
		CHECK(big != NULL && back != NULL, "malloc");
		memset(big, 'x', max);
		CHECK(recv_msg(&c, back, max, NULL) == KUP_KIND_PASS, "PASS");
		send_msg(&c, KUP_KIND_DATA, big, (uint32_t)max);
		CHECK(recv_msg(&c, back, max, &len) == KUP_KIND_DATA && len == max &&
		    memcmp(big, back, max) == 0, "full-size echo");
		chan_close(&c);
		free(big);
		free(back);
	}
	printf("hostile: ok\n");
}

/* ------------------------------------------------------------------ */
/* abuse: what a hostile user of a channel fd can do besides scribbling on
 * the descriptor (hostile): bad buffers, races on one fd, the fd and the
 * mapping handed to other processes, memory-management calls on the
 * mapping, wake-up storms, a descriptor that changes while the kernel
 * reads it, close during poll.  Every case ends by checking that the
 * channel still works. */

/* Bounded wait until INFO no longer shows chan_id attached. */
static void
wait_chan_free(uint32_t chan_id, const char *what)
{
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	int fd = open_dev(), i;

	CHECK(ii != NULL, "calloc");
	for (i = 0; i < WAIT_MS / 10; i++) {
		CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
		if (!(ii->attached[chan_id] & KUP_INFO_ATTACHED))
			break;
		usleep(10000);
	}
	CHECK(!(ii->attached[chan_id] & KUP_INFO_ATTACHED),
	    "%s: channel %u still attached (0x%x)", what, chan_id,
	    ii->attached[chan_id]);
	close(fd);
	free(ii);
}

/* The channel is free and serves a new user. */
static void
chan_usable(uint32_t chan_id, const char *what)
{
	struct chan c;

	wait_chan_free(chan_id, what);
	chan_open_how(&c, chan_id, 1);
	echo_round(&c, "still usable", chan_id & 1 ? "STILL USABLE" : "still usable");
	chan_close(&c);
}

static int
fd_readable(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & POLLIN);
}

/* An address nothing is mapped at (volatile: the compiler must not see
 * through it and refuse the call). */
static void *volatile g_bad_addr = (void *)16;

/* A page mapped read-only: a buffer the kernel can read but not write. */
static void *
ro_page(const void *content, size_t n)
{
	void *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	CHECK(p != MAP_FAILED, "mmap anonymous");
	memcpy(p, content, n);
	CHECK(mprotect(p, 4096, PROT_READ) == 0, "mprotect read-only");
	return p;
}

/* read(2) into a bad buffer is EFAULT, and the wake-up it could not
 * deliver stays pending: poll still says readable, a good read gets it. */
static void
abuse_read_efault(void)
{
	struct chan c;
	uint64_t v = 1;
	void *ro;

	chan_open_how(&c, 60, 1);
	CHECK(write(c.fd, &v, sizeof(v)) == sizeof(v), "self-wake write");
	CHECK(fd_readable(c.fd), "not readable after a self-wake");
	errno = 0;
	CHECK(read(c.fd, g_bad_addr, sizeof(v)) == -1 && errno == EFAULT,
	    "read into a bad address");
	CHECK(fd_readable(c.fd), "a read that failed with EFAULT consumed the "
	    "pending wake-up");
	ro = ro_page("x", 1);
	errno = 0;
	CHECK(read(c.fd, ro, sizeof(v)) == -1 && errno == EFAULT,
	    "read into a read-only page");
	CHECK(fd_readable(c.fd), "a read into a read-only page consumed the "
	    "pending wake-up");
	v = 0;
	CHECK(read(c.fd, &v, sizeof(v)) == sizeof(v) && v == 1, "good read");
	CHECK(!fd_readable(c.fd), "still readable after the good read");
	/* a write from a bad buffer or of a zero count is refused and wakes
	 * nobody */
	errno = 0;
	CHECK(write(c.fd, g_bad_addr, 8) == -1 && errno == EFAULT, "write bad address");
	v = 0;
	errno = 0;
	CHECK(write(c.fd, &v, sizeof(v)) == -1 && errno == EINVAL, "write of 0");
	CHECK(!fd_readable(c.fd), "a refused write made the fd readable");
	echo_round(&c, "after efault", "after efault");
	chan_close(&c);
	munmap(ro, 4096);
	printf("abuse read-efault: ok\n");
}

/* ATTACH whose answer cannot be copied out (the argument lies in a
 * read-only page: copied in fine, copied out EFAULT) must not leave the
 * channel taken by nobody: the fd stays unattached, the channel free. */
static void
abuse_attach_efault(void)
{
	struct kup_ioc_attach a;
	void *ro;
	int fd, i;

	memset(&a, 0, sizeof(a));
	a.abi_version = KUP_ABI_VERSION;
	a.chan_id = 62;
	ro = ro_page(&a, sizeof(a));
	fd = open_dev();
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_ATTACH, ro) == -1 && errno == EFAULT,
	    "ATTACH with a read-only argument");
	errno = 0;
	CHECK(ioctl(fd, KUP_IOC_WAKE) == -1 && errno == EINVAL,
	    "the fd is attached after a failed ATTACH");
	wait_chan_free(62, "attach-efault");
	/* the same fd may try again (EINPROGRESS: the worker the failed
	 * ATTACH started is on its way out) */
	for (i = 0; i < WAIT_MS / 50; i++) {
		if (attach_raw(fd, 62, KUP_ABI_VERSION, &a) == 0)
			break;
		CHECK(errno == EINPROGRESS, "ATTACH again on the same fd");
		usleep(50 * 1000);
	}
	CHECK(i < WAIT_MS / 50 && a.chan_id == 62, "ATTACH again on the same fd");
	close(fd);
	chan_usable(62, "attach-efault");
	errno = 0;
	fd = open_dev();
	{
		struct kup_ioc_info *ii = ro_page("", 0);

		CHECK(ioctl(fd, KUP_IOC_INFO, ii) == -1 && errno == EFAULT,
		    "INFO into a read-only page");
		munmap(ii, 4096);
	}
	close(fd);
	munmap(ro, 4096);
	printf("abuse attach-efault: ok\n");
}

/* Several threads ATTACH on one fd at once: exactly one gets a channel,
 * every other EBUSY; the winner's channel works. */
#define AB_THREADS 4
struct ab_attach {
	int fd;
	uint32_t chan;
	int r, err;
	struct kup_ioc_attach a;
	pthread_barrier_t *go;
};

static void *
ab_attach_main(void *p)
{
	struct ab_attach *t = p;

	pthread_barrier_wait(t->go);
	t->r = attach_raw(t->fd, t->chan, KUP_ABI_VERSION, &t->a);
	t->err = errno;
	return NULL;
}

static void
abuse_attach_race(void)
{
	struct ab_attach t[AB_THREADS];
	pthread_t th[AB_THREADS];
	pthread_barrier_t go;
	struct chan c;
	int fd, i, won = -1, round, retries = 0;

	for (round = 0; round < 20; round++) {
		fd = open_dev();
		CHECK(pthread_barrier_init(&go, NULL, AB_THREADS) == 0, "barrier");
		for (i = 0; i < AB_THREADS; i++) {
			t[i].fd = fd;
			t[i].chan = 64 + (uint32_t)(i % 2) * 2;   /* 64 or 66 */
			t[i].go = &go;
			CHECK(pthread_create(&th[i], NULL, ab_attach_main, &t[i]) == 0,
			    "pthread_create");
		}
		won = -1;
		for (i = 0; i < AB_THREADS; i++) {
			CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
			if (t[i].r == 0) {
				CHECK(won < 0, "round %d: two ATTACHes on one fd succeeded",
				    round);
				won = i;
			} else {
				/* EBUSY: the fd was taken, or being taken;
				 * EINPROGRESS: this one got to try, but the
				 * channel's previous worker was still in it */
				CHECK(t[i].err == EBUSY || t[i].err == EINPROGRESS,
				    "round %d: a losing ATTACH failed with %d", round,
				    t[i].err);
			}
		}
		pthread_barrier_destroy(&go);
		if (won < 0) {
			/* every try met a worker on its way out: again */
			CHECK(++retries < 100, "round %d: no ATTACH ever succeeded",
			    round);
			close(fd);
			round--;
			continue;
		}
		memset(&c, 0, sizeof(c));
		c.fd = fd;
		c.a = t[won].a;
		c.mem = mmap(NULL, c.a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		    fd, 0);
		CHECK(c.mem != MAP_FAILED, "mmap");
		c.ctrl = (struct kup_ctrl *)c.mem;
		CHECK(c.ctrl->chan_id == t[won].chan, "page says chan %u, ATTACH %u",
		    c.ctrl->chan_id, t[won].chan);
		echo_round(&c, "race", "race");
		chan_close(&c);
		/* the loser's channel was never taken */
		wait_chan_free(t[won].chan == 64 ? 66 : 64, "attach-race");
		wait_chan_free(t[won].chan, "attach-race");
	}
	printf("abuse attach-race: ok\n");
}

/* Continue a conversation in c from another process (its page, its fd). */
static void
echo_continue(struct chan *c, const char *msg)
{
	char buf[64];
	size_t len;

	send_msg(c, KUP_KIND_DATA, msg, (uint32_t)strlen(msg));
	CHECK(recv_msg(c, buf, sizeof(buf), &len) == KUP_KIND_DATA &&
	    len == strlen(msg) && memcmp(buf, msg, len) == 0,
	    "reply to '%s'", msg);
}

/* INFO's bits for one channel of the echo device. */
static uint8_t
chan_info_bits(uint32_t chan_id)
{
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	int fd = open_dev();
	uint8_t bits;

	CHECK(ii != NULL && ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
	bits = ii->attached[chan_id];
	close(fd);
	free(ii);
	return bits;
}

/* The mapping inherited by fork, the fd dup'ed and handed over
 * SCM_RIGHTS: the channel stays attached while any fd or mapping of the
 * file is left -- also after the process that attached it has exited --
 * and is free once the last one is gone. */
static void
abuse_fork_pass(void)
{
	struct chan c;
	char buf[64], b;
	int sv[2], pfd[2], st;
	pid_t pid;

	/* fork: the parent lets go first, then the child goes on talking */
	chan_open_how(&c, 68, 1);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	CHECK(pipe(pfd) == 0, "pipe");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		close(pfd[1]);
		CHECK(read(pfd[0], &b, 1) == 1, "the parent never let go");
		/* the child's copies of the mapping and the fd hold the file */
		echo_continue(&c, "child of fork");
		_exit(0);
	}
	close(pfd[0]);
	chan_close(&c);
	CHECK(chan_info_bits(68) & KUP_INFO_ATTACHED,
	    "the parent's close let go of a channel its child still maps");
	CHECK(write(pfd[1], "g", 1) == 1, "write");
	close(pfd[1]);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	    "fork child failed (status 0x%x)", st);
	chan_usable(68, "fork");

	/* SCM_RIGHTS: a child attaches, passes a dup of its fd and exits;
	 * the fd in flight holds the file, and its receiver maps it */
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		char cm[CMSG_SPACE(sizeof(int))];
		uint64_t seqs[4];   /* u2k_seq, k2u_seq, page size, map size */
		struct iovec iov = { .iov_base = seqs, .iov_len = sizeof(seqs) };
		struct msghdr mh;
		struct cmsghdr *h;
		int dupfd;

		close(sv[0]);
		chan_open_how(&c, 70, 1);
		CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
		seqs[0] = c.u2k_seq;
		seqs[1] = c.k2u_seq;
		seqs[2] = c.a.page_size;
		seqs[3] = c.a.map_size;
		memset(&mh, 0, sizeof(mh));
		memset(cm, 0, sizeof(cm));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cm;
		mh.msg_controllen = sizeof(cm);
		h = CMSG_FIRSTHDR(&mh);
		h->cmsg_level = SOL_SOCKET;
		h->cmsg_type = SCM_RIGHTS;
		h->cmsg_len = CMSG_LEN(sizeof(int));
		dupfd = dup(c.fd);
		CHECK(dupfd >= 0, "dup");
		memcpy(CMSG_DATA(h), &dupfd, sizeof(int));
		CHECK(sendmsg(sv[1], &mh, 0) == sizeof(seqs), "sendmsg");
		_exit(0);   /* its fds and mapping go with it */
	}
	close(sv[1]);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	    "SCM_RIGHTS child failed (status 0x%x)", st);
	CHECK(chan_info_bits(70) & KUP_INFO_ATTACHED,
	    "the channel was let go while its fd was in flight");
	{
		char cm[CMSG_SPACE(sizeof(int))];
		uint64_t seqs[4];
		struct iovec iov = { .iov_base = seqs, .iov_len = sizeof(seqs) };
		struct msghdr mh;
		struct cmsghdr *h;

		memset(&mh, 0, sizeof(mh));
		mh.msg_iov = &iov;
		mh.msg_iovlen = 1;
		mh.msg_control = cm;
		mh.msg_controllen = sizeof(cm);
		CHECK(recvmsg(sv[0], &mh, 0) == sizeof(seqs), "recvmsg");
		h = CMSG_FIRSTHDR(&mh);
		CHECK(h != NULL && h->cmsg_type == SCM_RIGHTS, "no fd passed");
		memset(&c, 0, sizeof(c));
		memcpy(&c.fd, CMSG_DATA(h), sizeof(int));
		c.u2k_seq = seqs[0];
		c.k2u_seq = seqs[1];
		c.a.page_size = (uint32_t)seqs[2];
		c.a.map_size = seqs[3];
	}
	close(sv[0]);
	c.mem = mmap(NULL, c.a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd, 0);
	CHECK(c.mem != MAP_FAILED, "mmap of a passed fd");
	c.ctrl = (struct kup_ctrl *)c.mem;
	CHECK(c.ctrl->chan_id == 70, "passed fd maps chan %u", c.ctrl->chan_id);
	echo_continue(&c, "passed over a socket");
	chan_close(&c);
	chan_usable(70, "scm_rights");
	printf("abuse fork-pass: ok\n");
}

/* Memory-management calls on the mapping: none may pin, drop or expose
 * the channel's pages, and the channel goes on working. */
static void
abuse_mm(void)
{
	struct chan c;
	size_t pg, bytes;
	uint8_t *p;
	int fd;
	char buf[64];

	chan_open_how(&c, 72, 1);
	pg = c.a.page_size;
	bytes = c.a.map_size;
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	memset(c.mem + c.ctrl->u2k_off, 0x77, 64);

	/* a page of raw frames cannot be dropped, freed or given to KSM */
	errno = 0;
	CHECK(madvise(c.mem, bytes, MADV_DONTNEED) == -1 && errno == EINVAL,
	    "madvise(MADV_DONTNEED) on the channel");
	errno = 0;
	CHECK(madvise(c.mem, bytes, MADV_FREE) == -1 && errno == EINVAL,
	    "madvise(MADV_FREE) on the channel");
	errno = 0;
	CHECK(madvise(c.mem, bytes, MADV_REMOVE) == -1,
	    "madvise(MADV_REMOVE) on the channel");
	CHECK(c.ctrl->magic == KUP_MAGIC && c.mem[c.ctrl->u2k_off + 63] == 0x77,
	    "the page changed under madvise");

	/* nobody reads the pages through the process's memory file or
	 * process_vm_readv (both pin pages, which a PFNMAP mapping refuses) */
	{
		struct iovec local = { .iov_base = buf, .iov_len = 16 };
		struct iovec remote = { .iov_base = c.mem, .iov_len = 16 };
		ssize_t n;

		errno = 0;
		n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
		CHECK(n == -1 && errno == EFAULT,
		    "process_vm_readv read the channel (%zd)", n);
		fd = open("/proc/self/mem", O_RDONLY);
		CHECK(fd >= 0, "open /proc/self/mem");
		errno = 0;
		n = pread(fd, buf, 16, (off_t)(uintptr_t)c.mem);
		CHECK(n <= 0, "/proc/self/mem read the channel (%zd)", n);
		close(fd);
	}

	/* moving the mapping is fine (same pages); keeping the old range
	 * mapped as well (MREMAP_DONTUNMAP) is not, nor is growing it */
	errno = 0;
	p = mremap(c.mem, bytes, bytes, MREMAP_MAYMOVE | MREMAP_DONTUNMAP);
	CHECK(p == MAP_FAILED, "mremap(MREMAP_DONTUNMAP) kept the channel twice");
	{
		uint8_t *hole = mmap(NULL, 2 * bytes, PROT_NONE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		CHECK(hole != MAP_FAILED, "mmap a hole");
		p = mremap(c.mem, bytes, bytes, MREMAP_MAYMOVE | MREMAP_FIXED,
		    hole + bytes);
		CHECK(p == hole + bytes, "mremap move of the channel");
		munmap(hole, bytes);
		c.mem = p;
		c.ctrl = (struct kup_ctrl *)p;
	}
	CHECK(c.ctrl->magic == KUP_MAGIC && c.mem[c.ctrl->u2k_off + 63] == 0x77,
	    "the moved mapping shows other pages");
	echo_continue(&c, "moved");
	memset(c.mem + c.ctrl->u2k_off, 0x77, 64);

	/* a second mapping of the same fd; the first one and the fd go: the
	 * second still holds the attachment */
	p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd, 0);
	CHECK(p != MAP_FAILED, "second mmap of the fd");
	/* punch the middle out of the first: the rest stays mapped */
	CHECK(munmap(c.mem + pg, pg) == 0, "munmap of one page of the channel");
	CHECK(c.ctrl->magic == KUP_MAGIC, "the control page went with the hole");
	munmap(c.mem, pg);
	munmap(c.mem + 2 * pg, bytes - 2 * pg);
	close(c.fd);
	c.fd = -1;
	c.mem = p;
	c.ctrl = (struct kup_ctrl *)p;
	/* (no hand-over without an fd: a kernel side asleep in its receive
	 * is woken by KUP_IOC_WAKE only) */
	CHECK(c.ctrl->magic == KUP_MAGIC && c.mem[c.ctrl->u2k_off + 63] == 0x77,
	    "the second mapping shows other pages");
	CHECK(chan_info_bits(72) & KUP_INFO_ATTACHED,
	    "the channel was let go while a mapping is left");
	munmap(p, bytes);
	chan_usable(72, "mm");
	printf("abuse mm: ok\n");
}

/* KUP_IOC_WAKE and write(2) storms from other threads while the channel
 * carries traffic: wake-ups are hints, the conversation stays exact. */
struct ab_storm {
	int fd;
	volatile int stop;
	unsigned long n;
};

static void *
ab_storm_main(void *p)
{
	struct ab_storm *s = p;
	uint64_t v = 1;

	while (!__atomic_load_n(&s->stop, __ATOMIC_RELAXED)) {
		CHECK(ioctl(s->fd, KUP_IOC_WAKE) == 0, "WAKE in the storm");
		CHECK(write(s->fd, &v, sizeof(v)) == sizeof(v), "write in the storm");
		__atomic_add_fetch(&s->n, 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void
abuse_wake_storm(void)
{
	struct ab_storm s[2];
	pthread_t th[2];
	struct chan c;
	char msg[32];
	int i, rounds;

	chan_open_how(&c, 74, 1);
	echo_round(&c, "storm", "storm");
	for (i = 0; i < 2; i++) {
		memset(&s[i], 0, sizeof(s[i]));
		s[i].fd = c.fd;
		CHECK(pthread_create(&th[i], NULL, ab_storm_main, &s[i]) == 0,
		    "pthread_create");
	}
	/* at least 300 round trips, and on until each storm thread has made
	 * 2000 wake-ups meanwhile (a scheduler may starve them at first) */
	for (i = 0; i < 300 || __atomic_load_n(&s[0].n, __ATOMIC_RELAXED) < 2000 ||
	    __atomic_load_n(&s[1].n, __ATOMIC_RELAXED) < 2000; i++) {
		CHECK(i < 1000000, "the storm threads never ran");
		snprintf(msg, sizeof(msg), "storm %d", i);
		echo_continue(&c, msg);
	}
	rounds = i;
	for (i = 0; i < 2; i++) {
		__atomic_store_n(&s[i].stop, 1, __ATOMIC_RELAXED);
		CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
	}
	chan_close(&c);
	chan_usable(74, "wake storm");
	printf("abuse wake-storm: ok (%d round trips, %lu + %lu wakes)\n", rounds,
	    s[0].n, s[1].n);
}

/* A thread flips the descriptor while the kernel takes it: the length
 * between a small one and one far past the data area, the kind between
 * DATA and garbage.  The kernel reads each word once: it either takes a
 * consistent message (the echo comes back with the length it read, which
 * must be the small one) or refuses the user (POLLERR); it never reads
 * past the area (that would oops on the vmalloc guard page). */
struct ab_flip {
	struct kup_ctrl *ctrl;
	volatile int stop;
	int what;     /* 0: len, 1: kind */
	unsigned long n;   /* flips so far */
};

static void *
ab_flip_main(void *p)
{
	struct ab_flip *f = p;
	unsigned long i;

	for (i = 0; !__atomic_load_n(&f->stop, __ATOMIC_RELAXED); i++) {
		if (f->what == 0)
			__atomic_store_n(&f->ctrl->u2k.len, i & 1 ? 0xfffff000U : 4U,
			    __ATOMIC_RELAXED);
		else
			__atomic_store_n(&f->ctrl->u2k.kind, i & 1 ? 77U : KUP_KIND_DATA,
			    __ATOMIC_RELAXED);
		__atomic_store_n(&f->n, i + 1, __ATOMIC_RELAXED);
	}
	return NULL;
}

static void
abuse_flip(int what)
{
	struct ab_flip f;
	pthread_t th;
	struct chan c;
	char buf[64];
	int round, took = 0, refused = 0, i;

	for (round = 0; round < 300; round++) {
		struct pollfd p;
		short ev;

		chan_open_how(&c, 76, 1);
		CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
		memcpy(c.mem + c.ctrl->u2k_off, "flip", 4);
		c.ctrl->u2k.len = 4;
		c.ctrl->u2k.kind = KUP_KIND_DATA;
		c.ctrl->u2k.seq = ++c.u2k_seq;
		memset(&f, 0, sizeof(f));
		f.ctrl = c.ctrl;
		f.what = what;
		CHECK(pthread_create(&th, NULL, ab_flip_main, &f) == 0, "pthread_create");
		/* hand over only once the flipper is flipping (bounded) */
		for (i = 0; i < 1000000 &&
		    __atomic_load_n(&f.n, __ATOMIC_RELAXED) < 1000; i++)
			sched_yield();
		CHECK(__atomic_load_n(&f.n, __ATOMIC_RELAXED) >= 1000,
		    "the flipper never ran");
		handover(&c);
		/* the reply, or the refusal */
		ev = wait_user_turn(&c);
		__atomic_store_n(&f.stop, 1, __ATOMIC_RELAXED);
		CHECK(pthread_join(th, NULL) == 0, "pthread_join");
		if (ev & POLLERR) {
			CHECK(c.ctrl->state & KUP_STATE_PEER_GONE, "POLLERR without PEER_GONE");
			refused++;
		} else {
			CHECK(ev == POLLIN, "poll events 0x%x", ev);
			CHECK(c.ctrl->k2u.kind == KUP_KIND_DATA && c.ctrl->k2u.len == 4 &&
			    memcmp(c.mem + c.a.page_size, "flip", 4) == 0,
			    "round %d: the kernel took a message it should not have "
			    "(kind %u len %u)", round, c.ctrl->k2u.kind, c.ctrl->k2u.len);
			took++;
		}
		(void)p;
		chan_close(&c);
		wait_chan_free(76, "flip");
	}
	chan_usable(76, "flip");
	printf("abuse flip-%s: ok (%d taken, %d refused)\n", what ? "kind" : "len",
	    took, refused);
}

/* close(2) and munmap while another thread sleeps in poll on the fd: the
 * poll's wait entries hold the file (and its wait queue), the reply still
 * wakes the poller, and the channel is let go when the poll is over. */
struct ab_poll {
	int fd;
	int n;
	short revents;
	pid_t tid;
};

static void *
ab_poll_main(void *p)
{
	struct ab_poll *a = p;
	struct pollfd pf = { .fd = a->fd, .events = POLLIN };

	__atomic_store_n(&a->tid, gettid(), __ATOMIC_RELEASE);

	a->n = poll(&pf, 1, WAIT_MS);
	a->revents = pf.revents;
	return NULL;
}

static void
abuse_close_in_poll(void)
{
	struct ab_poll a;
	pthread_t th;
	struct chan c;
	char buf[64];
	int i;

	chan_open_how(&c, 78, 1);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	send_msg(&c, KUP_KIND_DATA, "!delay", 6);   /* answered 300 ms later */
	__atomic_store_n(&c.ctrl->user_waiting, 1, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	drain(&c);
	memset(&a, 0, sizeof(a));
	a.fd = c.fd;
	CHECK(pthread_create(&th, NULL, ab_poll_main, &a) == 0, "pthread_create");
	/* bounded wait until the thread sleeps in its poll (the kernel
	 * names the function it sleeps in) */
	for (i = 0; i < WAIT_MS / 10; i++) {
		char path[64], wchan[64] = "";
		pid_t tid = __atomic_load_n(&a.tid, __ATOMIC_ACQUIRE);
		FILE *f;

		if (tid != 0) {
			snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", (int)tid);
			f = fopen(path, "r");
			CHECK(f != NULL, "open %s", path);
			if (fgets(wchan, sizeof(wchan), f) == NULL)
				wchan[0] = '\0';
			fclose(f);
			if (strstr(wchan, "poll") != NULL)
				break;
		}
		usleep(10000);
	}
	CHECK(i < WAIT_MS / 10, "the thread never slept in poll");
	chan_close(&c);
	CHECK(pthread_join(th, NULL) == 0, "pthread_join");
	/* the poll's wait entries hold the file across the close: the reply
	 * still woke it (a closed fd never does), and its second look found
	 * the fd gone (POLLNVAL: poll looks fds up again after each wake-up) */
	CHECK(a.n == 1 && (a.revents & (POLLIN | POLLNVAL)),
	    "poll across the close: n %d revents 0x%x", a.n, a.revents);
	chan_usable(78, "close-in-poll");
	printf("abuse close-in-poll: ok (revents 0x%x)\n", a.revents);
}

static void
test_abuse(void)
{
	g_test = "abuse";
	abuse_read_efault();
	abuse_attach_efault();
	abuse_attach_race();
	abuse_fork_pass();
	abuse_mm();
	abuse_wake_storm();
	abuse_flip(0);
	abuse_flip(1);
	abuse_close_in_poll();
	printf("abuse: ok\n");
}

/* ------------------------------------------------------------------ */
/* siege: more of a hostile user's tools, beyond abuse -- close racing
 * ATTACH on one fd, the mapping as the buffer of other system calls and
 * under the rarer memory-management calls, a user the module ended that
 * goes on handing over, a signal storm at an ATTACH
 * that waits for a channel its module still holds, and many processes
 * taking every channel and dying at once.  Each case ends by checking that
 * what it touched still works; the dmesg stage checks that none of it
 * made the kernel warn. */

/* close(2) of the fd while other threads ATTACH, mmap, INFO and poll on
 * it: the file lives until the last of them returns, and its release
 * lets go of whatever the ATTACH took -- the channel is free afterwards,
 * whoever won. */
struct sg_race {
	int fd;
	int what;                 /* 0 ATTACH, 1 mmap, 2 INFO, 3 poll */
	uint32_t chan;
	pthread_barrier_t *go;
};

static void *
sg_race_main(void *p)
{
	struct sg_race *t = p;
	struct kup_ioc_attach a;
	struct kup_ioc_info *ii;
	struct pollfd pf;
	void *m;
	int i;

	pthread_barrier_wait(t->go);
	for (i = 0; i < 50; i++) {
		switch (t->what) {
		case 0:
			(void)attach_raw(t->fd, t->chan, KUP_ABI_VERSION, &a);
			break;
		case 1:
			m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
			if (m != MAP_FAILED)
				munmap(m, 4096);
			break;
		case 2:
			ii = malloc(sizeof(*ii));
			CHECK(ii != NULL, "malloc");
			(void)ioctl(t->fd, KUP_IOC_INFO, ii);
			free(ii);
			break;
		default:
			pf.fd = t->fd;
			pf.events = POLLIN;
			(void)poll(&pf, 1, 0);
			break;
		}
	}
	return NULL;
}

static void
siege_close_race(void)
{
	struct sg_race t[4];
	pthread_t th[4];
	pthread_barrier_t go;
	int round, i, fd;

	for (round = 0; round < 40; round++) {
		fd = open_dev();
		CHECK(pthread_barrier_init(&go, NULL, 5) == 0, "barrier");
		for (i = 0; i < 4; i++) {
			t[i].fd = fd;
			t[i].what = i;
			t[i].chan = 100;
			t[i].go = &go;
			CHECK(pthread_create(&th[i], NULL, sg_race_main, &t[i]) == 0,
			    "pthread_create");
		}
		pthread_barrier_wait(&go);
		if (round & 1)
			sched_yield();
		close(fd);       /* the threads' calls hold the file meanwhile */
		for (i = 0; i < 4; i++)
			CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
		pthread_barrier_destroy(&go);
		wait_chan_free(100, "close-race");
	}
	chan_usable(100, "close-race");
	printf("siege close-race: ok\n");
}

/* The channel mapping as the buffer of other system calls: plain copies
 * (read/write of a pipe, readv, the kup fd's own read/write and ioctls
 * with their arguments in the mapping) work as on any memory; anything
 * that would pin a page (a shared futex, process_vm_writev, an io_uring
 * fixed buffer) fails instead, as does a userfaultfd registration;
 * splice/sendfile/lseek on the kup fd are refused. */
static void
siege_buffers(void)
{
	struct chan c, d;
	size_t pg, bytes;
	uint8_t *u2k, *k2u;
	int pfd[2];
	ssize_t n;
	uint64_t v;
	char buf[64];

	chan_open_how(&c, 102, 1);
	pg = c.a.page_size;
	bytes = c.a.map_size;
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	u2k = c.mem + c.ctrl->u2k_off;
	k2u = c.mem + pg;

	/* a pipe's bytes into the u2k area, and out of it again */
	CHECK(pipe(pfd) == 0, "pipe");
	CHECK(write(pfd[1], "from a pipe", 11) == 11, "write pipe");
	CHECK(read(pfd[0], u2k, 11) == 11, "read(pipe) into the channel mapping");
	CHECK(write(pfd[1], u2k, 11) == 11, "write(pipe) from the channel mapping");
	CHECK(read(pfd[0], buf, 11) == 11 && memcmp(buf, "from a pipe", 11) == 0,
	    "the pipe round trip through the mapping");
	/* vmsplice from the mapping would pin: refused (mmap checks it
	 * too); splice from the kup fd: it has no splice_read */
	errno = 0;
	n = splice(c.fd, NULL, pfd[1], NULL, 8, SPLICE_F_NONBLOCK);
	CHECK(n == -1, "splice from the kup fd returned %zd", n);
	errno = 0;
	n = sendfile(pfd[1], c.fd, NULL, 8);
	CHECK(n == -1, "sendfile from the kup fd returned %zd", n);
	errno = 0;
	CHECK(lseek(c.fd, 0, SEEK_SET) == -1 && errno == ESPIPE, "lseek on the kup fd");
	errno = 0;
	CHECK(pread(c.fd, buf, 8, 0) == -1 && errno == ESPIPE, "pread on the kup fd");
	close(pfd[0]);
	close(pfd[1]);

	/* the kup fd's own read/write with the buffer in its own mapping */
	v = 1;
	memcpy(k2u + pg - 8, &v, 8);
	CHECK(write(c.fd, k2u + pg - 8, 8) == 8, "self-wake from the mapping");
	CHECK(read(c.fd, k2u + pg - 16, 8) == 8, "read into the mapping");
	memcpy(&v, k2u + pg - 16, 8);
	CHECK(v == 1, "read into the mapping gave %llu", (unsigned long long)v);
	/* INFO with its answer in the mapping (it fits in the data area) */
	if (sizeof(struct kup_ioc_info) <= c.ctrl->u2k_size) {
		CHECK(ioctl(c.fd, KUP_IOC_INFO, u2k) == 0, "INFO into the mapping");
		CHECK(((struct kup_ioc_info *)u2k)->attached_chan == 102,
		    "INFO in the mapping names chan %u",
		    ((struct kup_ioc_info *)u2k)->attached_chan);
	}
	/* another fd's ATTACH with its argument in this channel's mapping */
	{
		struct kup_ioc_attach *a = (struct kup_ioc_attach *)(u2k + 512);
		int i;

		memset(&d, 0, sizeof(d));
		d.fd = open_dev();
		for (i = 0; i < WAIT_MS / 50; i++) {
			memset(a, 0, sizeof(*a));
			a->abi_version = KUP_ABI_VERSION;
			a->chan_id = 104;
			if (ioctl(d.fd, KUP_IOC_ATTACH, a) == 0)
				break;
			CHECK(errno == EINPROGRESS, "ATTACH with its argument in a mapping");
			usleep(50 * 1000);
		}
		CHECK(i < WAIT_MS / 50 && a->chan_id == 104 && a->map_size == bytes,
		    "ATTACH with its argument in a mapping");
		d.a = *a;
		d.mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, d.fd, 0);
		CHECK(d.mem != MAP_FAILED, "mmap");
		d.ctrl = (struct kup_ctrl *)d.mem;
		echo_round(&d, "arg in a mapping", "arg in a mapping");
		chan_close(&d);
	}

	/* a shared futex keys on the page, so it pins: refused; a private
	 * one keys on the address: a plain wait that times out */
	{
		struct timespec ts = { 0, 1000 * 1000 };
		uint32_t *word = (uint32_t *)(k2u + 64);
		long r;

		*word = 7;
		errno = 0;
		r = syscall(SYS_futex, word, FUTEX_WAIT, 7, &ts, NULL, 0);
		CHECK(r == -1 && (errno == EFAULT || errno == ETIMEDOUT),
		    "shared futex on the mapping: %ld", r);
		errno = 0;
		r = syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, 7, &ts, NULL, 0);
		CHECK(r == -1 && (errno == ETIMEDOUT || errno == EFAULT),
		    "private futex on the mapping: %ld", r);
		(void)syscall(SYS_futex, word, FUTEX_WAKE, 1, NULL, NULL, 0);
	}
	/* nobody writes into the channel from outside by process_vm_writev */
	{
		struct iovec local = { .iov_base = buf, .iov_len = 16 };
		struct iovec remote = { .iov_base = u2k, .iov_len = 16 };

		memset(u2k, 0x11, 16);
		memset(buf, 0x22, 16);
		errno = 0;
		n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
		CHECK(n == -1 && errno == EFAULT, "process_vm_writev wrote the channel (%zd)", n);
		CHECK(u2k[15] == 0x11, "process_vm_writev changed the channel");
	}
	/* an io_uring fixed buffer is a long-term pin: refused (EFAULT);
	 * a kernel without io_uring (or with it disabled) has nothing to pin */
	{
		struct io_uring_params up;
		struct iovec iov = { .iov_base = u2k, .iov_len = pg };
		int ring;

		memset(&up, 0, sizeof(up));
		ring = (int)syscall(SYS_io_uring_setup, 4, &up);
		if (ring >= 0) {
			errno = 0;
			n = syscall(SYS_io_uring_register, ring, IORING_REGISTER_BUFFERS,
			    &iov, 1);
			CHECK(n == -1 && errno == EFAULT,
			    "io_uring registered the channel as a fixed buffer (%zd)", n);
			close(ring);
			printf("siege buffers: io_uring fixed buffer refused\n");
		} else {
			CHECK(errno == ENOSYS || errno == EPERM, "io_uring_setup");
			printf("siege buffers: no io_uring here (errno %d)\n", errno);
		}
	}
	/* userfaultfd cannot take over the channel's page faults */
	{
		struct uffdio_api api = { .api = UFFD_API };
		struct uffdio_register reg;
		int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

		if (uffd >= 0) {
			CHECK(ioctl(uffd, UFFDIO_API, &api) == 0, "UFFDIO_API");
			memset(&reg, 0, sizeof(reg));
			reg.range.start = (uintptr_t)c.mem;
			reg.range.len = bytes;
			reg.mode = UFFDIO_REGISTER_MODE_MISSING;
			errno = 0;
			CHECK(ioctl(uffd, UFFDIO_REGISTER, &reg) == -1 && errno == EINVAL,
			    "userfaultfd registered the channel mapping");
			close(uffd);
			printf("siege buffers: userfaultfd registration refused\n");
		} else {
			CHECK(errno == ENOSYS || errno == EPERM, "userfaultfd");
			printf("siege buffers: no userfaultfd here (errno %d)\n", errno);
		}
	}
	echo_continue(&c, "after the buffers");
	chan_close(&c);
	chan_usable(102, "buffers");
	printf("siege buffers: ok\n");
}

/* The rarer memory-management calls on the mapping: each is refused or
 * harmless, the pages stay the channel's.  A window of one page (one
 * remap_pfn_range covers the whole VMA) inherited by fork and moved by
 * mremap in both processes; remap_file_pages to an offset past the
 * channel (its mmap bounds apply) and inside it; MAP_FIXED over part of
 * the mapping from the same fd; madvise's populate/cold/pageout; mlock,
 * msync, mincore. */
static void
siege_mm(void)
{
	struct chan c;
	size_t pg, bytes;
	uint8_t *w, *p, *hole;
	unsigned char vec[64];
	int st;
	pid_t pid;
	char buf[64];

	chan_open_how(&c, 106, 1);
	pg = c.a.page_size;
	bytes = c.a.map_size;
	CHECK(bytes / pg <= sizeof(vec), "channel of %zu pages", bytes / pg);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	memset(c.mem + c.ctrl->u2k_off, 0x66, 64);

	/* the u2k page alone, forked, then moved in parent and child */
	w = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd,
	    (off_t)c.ctrl->u2k_off);
	CHECK(w != MAP_FAILED, "mmap of the u2k page alone");
	CHECK(w[63] == 0x66, "the window shows other bytes");
	hole = mmap(NULL, 4 * pg, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(hole != MAP_FAILED, "mmap a hole");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		p = mremap(w, pg, pg, MREMAP_MAYMOVE | MREMAP_FIXED, hole + pg);
		if (p != hole + pg || p[63] != 0x66)
			_exit(3);
		p[62] = 0x67;
		_exit(0);
	}
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	    "forked window child (status 0x%x)", st);
	CHECK(w[62] == 0x67, "the child's write through its moved window is lost");
	p = mremap(w, pg, pg, MREMAP_MAYMOVE | MREMAP_FIXED, hole + 2 * pg);
	CHECK(p == hole + 2 * pg, "mremap of the one-page window");
	errno = 0;
	CHECK(mremap(p, pg, 2 * pg, 0) == MAP_FAILED, "the window grew in place");
	munmap(hole, 4 * pg);

	/* remap_file_pages: its mmap of the same file is bounds-checked too */
	p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd, 0);
	CHECK(p != MAP_FAILED, "second mapping");
	if (remap_file_pages(p, pg, 0, c.ctrl->u2k_off / pg, 0) == 0)
		CHECK(p[63] == 0x66, "remap_file_pages shows another page");
	/* (a refused one leaves a hole: its MAP_FIXED unmapped the page) */
	errno = 0;
	CHECK(remap_file_pages(p, pg, 0, bytes / pg + 5, 0) == -1,
	    "remap_file_pages to a page past the channel");
	/* MAP_FIXED over the middle of the mapping, from the same fd at a
	 * bad and at a good offset */
	errno = 0;
	w = mmap(p + pg, pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, c.fd,
	    (off_t)bytes);
	CHECK(w == MAP_FAILED, "MAP_FIXED past the channel");
	w = mmap(p + pg, pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, c.fd,
	    (off_t)c.ctrl->u2k_off);
	CHECK(w == p + pg && w[63] == 0x66, "MAP_FIXED over the mapping");
	munmap(p, bytes);

	/* advice that would fault in, page out or age the pages: refused or
	 * nothing to do on raw frames */
#ifndef MADV_COLD
#define MADV_COLD 20
#endif
#ifndef MADV_PAGEOUT
#define MADV_PAGEOUT 21
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
	(void)madvise(c.mem, bytes, MADV_COLD);
	(void)madvise(c.mem, bytes, MADV_PAGEOUT);
	(void)madvise(c.mem, bytes, MADV_POPULATE_READ);
	(void)madvise(c.mem, bytes, MADV_POPULATE_WRITE);
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif
	(void)madvise(c.mem, bytes, MADV_HUGEPAGE);
	(void)madvise(c.mem, bytes, MADV_COLLAPSE);
	(void)madvise(c.mem, bytes, MADV_MERGEABLE);
	(void)madvise(c.mem, bytes, MADV_UNMERGEABLE);
	(void)madvise(c.mem, bytes, MADV_WILLNEED);
	(void)madvise(c.mem, bytes, MADV_SEQUENTIAL);
	/* MADV_DONTFORK on a window: a child does not get it (and, the
	 * mapping being VM_IO, MADV_DOFORK cannot undo it) */
	w = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd, 0);
	CHECK(w != MAP_FAILED, "mmap of the control page alone");
	CHECK(madvise(w, pg, MADV_DONTFORK) == 0, "MADV_DONTFORK");
	errno = 0;
	CHECK(madvise(w, pg, MADV_DOFORK) == -1 && errno == EINVAL, "MADV_DOFORK");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0)
		_exit(mincore(w, pg, vec) == -1 && errno == ENOMEM ? 0 : 3);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	    "a MADV_DONTFORK window was inherited (status 0x%x)", st);
	munmap(w, pg);
	(void)mlock(c.mem, bytes);
	(void)munlock(c.mem, bytes);
	(void)msync(c.mem, bytes, MS_SYNC);
	(void)msync(c.mem, bytes, MS_INVALIDATE | MS_ASYNC);
	CHECK(mincore(c.mem, bytes, vec) == 0 || errno == ENOMEM || errno == EINVAL,
	    "mincore");
	CHECK(c.ctrl->magic == KUP_MAGIC && c.mem[c.ctrl->u2k_off + 63] == 0x66,
	    "the pages changed under madvise/mlock/msync");
	echo_continue(&c, "after mm");
	chan_close(&c);
	chan_usable(106, "siege mm");
	printf("siege mm: ok\n");
}

/* A user the module ended (echo's "!kick": kupdev_disconnect) that
 * goes on as if nothing happened: hands over message after message with
 * KUP_IOC_WAKE, polls, and hands its mapping to a child before closing.
 * The kernel takes nothing more from it (POLLERR stays, the turn is never
 * handed back), and the channel is attached by nobody else until the
 * last mapping of the ended user is gone -- its pages are the next
 * user's too. */
static void
siege_kicked(void)
{
	struct chan c;
	struct pollfd p;
	struct kup_ioc_attach a;
	char buf[64];
	int i, fd, st, pfd[2];
	pid_t pid;
	char b;

	chan_open_how(&c, 112, 1);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	send_msg(&c, KUP_KIND_DATA, "!kick", 5);
	CHECK((wait_user_turn(&c) & POLLERR) && (c.ctrl->state & KUP_STATE_PEER_GONE),
	    "no POLLERR after the module ended the session (state 0x%x)",
	    c.ctrl->state);
	/* hand over anyway, with and without sense */
	for (i = 0; i < 200; i++) {
		c.ctrl->u2k.len = (uint32_t)(i & 1 ? 4 : 0xffffffffU);
		c.ctrl->u2k.kind = KUP_KIND_DATA;
		c.ctrl->u2k.seq = ++c.u2k_seq;
		memcpy(c.mem + c.ctrl->u2k_off, "more", 4);
		__atomic_store_n(&c.ctrl->turn, i % 3 ? KUP_TURN_KERNEL : 0x5a5a5a5aU,
		    __ATOMIC_RELEASE);
		CHECK(ioctl(c.fd, KUP_IOC_WAKE) == 0, "WAKE after the disconnect");
	}
	__atomic_store_n(&c.ctrl->turn, KUP_TURN_KERNEL, __ATOMIC_RELEASE);
	CHECK(ioctl(c.fd, KUP_IOC_WAKE) == 0, "WAKE after the disconnect");
	p.fd = c.fd;
	p.events = POLLIN;
	CHECK(poll(&p, 1, 0) == 1 && (p.revents & POLLERR), "POLLERR is final "
	    "(revents 0x%x)", p.revents);
	CHECK(c.ctrl->k2u.seq == c.k2u_seq, "the kernel answered an ended user "
	    "(k2u seq %llu after %llu)", (unsigned long long)c.ctrl->k2u.seq,
	    (unsigned long long)c.k2u_seq);
	/* a child keeps the mapping; the parent closes: still attached */
	CHECK(pipe(pfd) == 0, "pipe");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		close(pfd[1]);
		close(c.fd);
		CHECK(read(pfd[0], &b, 1) == 1, "the parent never said go");
		memset(c.mem + c.ctrl->u2k_off, 0x42, 64);   /* still its pages */
		_exit(0);
	}
	close(pfd[0]);
	chan_close(&c);
	CHECK(chan_info_bits(112) & KUP_INFO_ATTACHED,
	    "an ended user's child maps the channel, yet it was let go");
	fd = open_dev();
	errno = 0;
	CHECK(attach_raw(fd, 112, KUP_ABI_VERSION, &a) == -1 && errno == EBUSY,
	    "a channel still mapped by an ended user's child was attached");
	close(fd);
	CHECK(write(pfd[1], "g", 1) == 1, "write");
	close(pfd[1]);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && WEXITSTATUS(st) == 0,
	    "child (status 0x%x)", st);
	chan_usable(112, "kicked");
	printf("siege kicked: ok\n");
}

/* An ATTACH that waits for a channel its module still holds (echo's
 * "!lockhold": the last user left while its worker keeps the channel
 * locked) pauses interruptibly: under a storm of signals every ATTACH
 * returns, EINTR or EINPROGRESS, and gives its reservation back (INFO
 * never shows the channel attached meanwhile); once the module lets go
 * the channel attaches and serves. */
static volatile sig_atomic_t g_sigs;

static void
sg_on_sig(int sig)
{
	(void)sig;
	g_sigs++;
}

struct sg_storm {
	pid_t tid;
	volatile int stop;
	unsigned long sent;
};

static void *
sg_storm_main(void *p)
{
	struct sg_storm *s = p;

	while (!__atomic_load_n(&s->stop, __ATOMIC_RELAXED)) {
		CHECK(syscall(SYS_tgkill, getpid(), s->tid, SIGUSR1) == 0, "tgkill");
		s->sent++;
		usleep(200);
	}
	return NULL;
}

/* Hold chan_id: a user leaves it while its worker keeps it locked. */
static void
sg_lockhold(uint32_t chan_id, const char *msg)
{
	struct chan c;
	char buf[64];
	int i;

	chan_open_how(&c, chan_id, 1);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	send_msg(&c, KUP_KIND_DATA, msg, (uint32_t)strlen(msg));
	/* the worker has taken it once the turn is no longer the user's
	 * page-wise and INFO shows the module's hold */
	for (i = 0; i < WAIT_MS / 10; i++) {
		if (chan_info_bits(chan_id) & KUP_INFO_MODULE_HOLDS)
			break;
		usleep(10000);
	}
	CHECK(i < WAIT_MS / 10, "chan %u: the worker never held the channel", chan_id);
	chan_close(&c);
	for (i = 0; i < WAIT_MS / 10; i++) {
		if (chan_info_bits(chan_id) == KUP_INFO_MODULE_HOLDS)
			break;
		usleep(10000);
	}
	CHECK(chan_info_bits(chan_id) == KUP_INFO_MODULE_HOLDS,
	    "chan %u: not held by the module alone (0x%x)", chan_id,
	    chan_info_bits(chan_id));
}

/* Make every "!lockhold" of echo let go: "!lockfree" on another channel. */
static void
sg_lockfree(uint32_t chan_id)
{
	struct chan c;

	chan_open_how(&c, chan_id, 1);
	echo_round(&c, "!lockfree", chan_id & 1 ? "!LOCKFREE" : "!lockfree");
	chan_close(&c);
}

static void
siege_sigstorm(void)
{
	struct sigaction sa;
	struct sg_storm s;
	pthread_t th;
	struct kup_ioc_attach a;
	unsigned long eintr = 0, eprog = 0, tries;
	uint8_t bits;
	int fd, r;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = sg_on_sig;   /* no SA_RESTART: EINTR reaches us */
	CHECK(sigaction(SIGUSR1, &sa, NULL) == 0, "sigaction");
	sg_lockhold(108, "!lockhold60000");
	memset(&s, 0, sizeof(s));
	s.tid = gettid();
	CHECK(pthread_create(&th, NULL, sg_storm_main, &s) == 0, "pthread_create");
	fd = open_dev();
	/* bounded by tries, not by time: 20 interrupted ATTACHes of at most
	 * 100 (each pause is a signal away from its end; an ATTACH that did
	 * not hear the signals would sit out its 500 ms instead) */
	for (tries = 0; tries < 100 && eintr < 20; tries++) {
		errno = 0;
		r = attach_raw(fd, 108, KUP_ABI_VERSION, &a);
		CHECK(r == -1 && (errno == EINTR || errno == EINPROGRESS),
		    "ATTACH of a held channel under signals: %d", r);
		if (errno == EINTR)
			eintr++;
		else
			eprog++;
		bits = chan_info_bits(108);
		CHECK(bits == KUP_INFO_MODULE_HOLDS,
		    "after a failed ATTACH the channel shows 0x%x", bits);
	}
	__atomic_store_n(&s.stop, 1, __ATOMIC_RELAXED);
	CHECK(pthread_join(th, NULL) == 0, "pthread_join");
	CHECK(eintr >= 20, "only %lu of %lu ATTACHes were interrupted (%lu signals)",
	    eintr, tries, s.sent);
	/* the same fd attaches once the module lets go */
	sg_lockfree(110);
	for (tries = 0; tries < WAIT_MS / 50; tries++) {
		if (attach_raw(fd, 108, KUP_ABI_VERSION, &a) == 0)
			break;
		CHECK(errno == EINPROGRESS || errno == EINTR, "ATTACH after the hold");
		usleep(50 * 1000);
	}
	CHECK(tries < WAIT_MS / 50, "chan 108 never came back");
	close(fd);
	signal(SIGUSR1, SIG_DFL);
	chan_usable(108, "sigstorm");
	printf("siege sigstorm: ok (%lu EINTR, %lu EINPROGRESS, %lu signals)\n",
	    eintr, eprog, s.sent);
}

/* Many processes take every channel of the device (ATTACH of any
 * channel until EBUSY), each channel left in another state -- the
 * worker's PASS unread, a message handed over and not answered yet, a
 * "!delay" being computed, a poller asleep -- and all of them are
 * SIGKILLed at once.  Every channel comes back and serves a new user;
 * nothing was attached twice. */
#define SG_PROCS 8

static void
sg_taker(int out, int ready_fd)
{
	struct chan c[KUP_MAX_CHANNELS];
	uint32_t ids[KUP_MAX_CHANNELS];
	int n = 0, i, r;
	char buf[64];

	g_test = "mass-death child";
	for (;;) {
		memset(&c[n], 0, sizeof(c[n]));
		c[n].fd = open_dev();
		r = attach_raw(c[n].fd, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &c[n].a);
		if (r != 0) {
			CHECK(errno == EBUSY || errno == EINPROGRESS, "ATTACH any");
			close(c[n].fd);
			if (errno == EBUSY)
				break;
			usleep(10000);
			continue;
		}
		c[n].mem = mmap(NULL, c[n].a.map_size, PROT_READ | PROT_WRITE,
		    MAP_SHARED, c[n].fd, 0);
		CHECK(c[n].mem != MAP_FAILED, "mmap");
		c[n].ctrl = (struct kup_ctrl *)c[n].mem;
		ids[n] = c[n].a.chan_id;
		n++;
		CHECK(n < (int)KUP_MAX_CHANNELS, "more channels than a device has");
	}
	/* leave each channel in a state of its own */
	for (i = 0; i < n; i++) {
		switch (i % 4) {
		case 0:
			break;                        /* PASS unread */
		case 1:
			CHECK(recv_msg(&c[i], buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
			send_msg(&c[i], KUP_KIND_DATA, "unanswered", 10);
			break;
		case 2:
			CHECK(recv_msg(&c[i], buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
			send_msg(&c[i], KUP_KIND_DATA, "!delay", 6);
			break;
		default:
			CHECK(recv_msg(&c[i], buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
			send_msg(&c[i], KUP_KIND_DATA, "!hold", 5);  /* never answered */
			break;
		}
	}
	CHECK(write(out, &n, sizeof(n)) == sizeof(n), "report");
	CHECK(write(out, ids, (size_t)n * sizeof(ids[0])) ==
	    (ssize_t)((size_t)n * sizeof(ids[0])), "report");
	/* sleep in poll on the last channel until killed */
	{
		struct pollfd p = { .fd = n > 0 ? c[n - 1].fd : ready_fd, .events = POLLIN };

		for (;;)
			(void)poll(&p, 1, -1);
	}
}

static void
siege_mass_death(void)
{
	pid_t pids[SG_PROCS];
	uint8_t seen[KUP_MAX_CHANNELS];
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	struct kup_ioc_attach a;
	struct chan *c;
	uint32_t ids[KUP_MAX_CHANNELS], chans, i;
	int pfd[2], k, n, total = 0, st, fd;

	CHECK(ii != NULL, "calloc");
	fd = open_dev();
	CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
	chans = ii->announced;
	for (i = 0; i < chans; i++)
		CHECK(!(ii->attached[i] & KUP_INFO_ATTACHED),
		    "channel %u attached before the siege", i);
	memset(seen, 0, sizeof(seen));
	CHECK(pipe(pfd) == 0, "pipe");
	for (k = 0; k < SG_PROCS; k++) {
		pids[k] = fork();
		CHECK(pids[k] >= 0, "fork");
		if (pids[k] == 0) {
			close(pfd[0]);
			sg_taker(pfd[1], fd);
		}
	}
	close(pfd[1]);
	for (k = 0; k < SG_PROCS; k++) {
		CHECK(read(pfd[0], &n, sizeof(n)) == sizeof(n), "a taker never reported");
		CHECK(n >= 0 && n <= (int)chans, "a taker took %d channels", n);
		CHECK(read(pfd[0], ids, (size_t)n * sizeof(ids[0])) ==
		    (ssize_t)((size_t)n * sizeof(ids[0])), "a taker's list");
		for (i = 0; i < (uint32_t)n; i++) {
			CHECK(ids[i] < chans && !seen[ids[i]],
			    "channel %u attached twice (or out of range)", ids[i]);
			seen[ids[i]] = 1;
		}
		total += n;
	}
	close(pfd[0]);
	CHECK(total == (int)chans, "the takers hold %d of %u channels", total, chans);
	errno = 0;
	CHECK(attach_raw(fd, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &a) == -1 &&
	    errno == EBUSY, "ATTACH any with every channel taken");
	for (k = 0; k < SG_PROCS; k++)
		CHECK(kill(pids[k], SIGKILL) == 0, "kill");
	for (k = 0; k < SG_PROCS; k++)
		CHECK(waitpid(pids[k], &st, 0) == pids[k] && WIFSIGNALED(st),
		    "taker %d (status 0x%x)", k, st);
	close(fd);
	for (i = 0; i < chans; i++)
		wait_chan_free(i, "mass-death");
	/* every channel serves again: all at once, from one process */
	c = calloc(chans, sizeof(*c));
	CHECK(c != NULL, "calloc");
	for (i = 0; i < chans; i++)
		chan_open_how(&c[i], i, 1);
	for (i = 0; i < chans; i++)
		echo_round(&c[i], "back", i & 1 ? "BACK" : "back");
	for (i = 0; i < chans; i++)
		chan_close(&c[i]);
	free(c);
	free(ii);
	printf("siege mass-death: ok (%d processes held all %u channels)\n",
	    SG_PROCS, chans);
}

static void
test_siege(void)
{
	g_test = "siege";
	siege_close_race();
	siege_buffers();
	siege_mm();
	siege_kicked();
	siege_sigstorm();
	siege_mass_death();
	printf("siege: ok\n");
}

/* reload-race DIR: threads open /dev/kup/echo and use what they got --
 * INFO, ATTACH of any channel, mmap, a round trip, poll, close -- in a
 * loop while the script unloads and reloads kup_echo.ko again and again,
 * so opens race the node's withdrawal and publication, and every call
 * races the shutdown.  Each call's answer must be one the ABI names for
 * it; DIR/running says the loops run, DIR/stop ends them. */
#define RR_THREADS 3

struct rr {
	const char *dir;
	unsigned long opens, attaches, rounds, gone;
};

static int
rr_stopped(const char *dir)
{
	char path[512];

	snprintf(path, sizeof(path), "%s/stop", dir);
	return access(path, F_OK) == 0;
}

static void *
rr_main(void *p)
{
	struct rr *r = p;
	struct kup_ioc_info *ii = malloc(sizeof(*ii));
	struct kup_ioc_attach a;
	unsigned long i;

	CHECK(ii != NULL, "malloc");
	for (i = 0; !rr_stopped(r->dir); i++) {
		struct pollfd pf;
		struct chan c;
		int fd = open(DEV, O_RDWR | O_CLOEXEC);

		if (fd < 0) {
			/* between the unload and the reload: no node, or a
			 * node whose device is gone */
			CHECK(errno == ENOENT || errno == ENODEV || errno == ENXIO,
			    "open %s", DEV);
			r->gone++;
			usleep(1000);
			continue;
		}
		r->opens++;
		if (ioctl(fd, KUP_IOC_INFO, ii) != 0)
			CHECK(errno == ESHUTDOWN, "INFO");
		if (attach_raw(fd, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &a) != 0) {
			CHECK(errno == ESHUTDOWN || errno == EBUSY || errno == EAGAIN ||
			    errno == EINPROGRESS, "ATTACH any");
			close(fd);
			continue;
		}
		r->attaches++;
		memset(&c, 0, sizeof(c));
		c.fd = fd;
		c.a = a;
		c.mem = mmap(NULL, a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		CHECK(c.mem != MAP_FAILED, "mmap of an attached channel");
		c.ctrl = (struct kup_ctrl *)c.mem;
		pf.fd = fd;
		pf.events = POLLIN;
		/* one round trip unless the device goes meanwhile: the
		 * worker's PASS, then the echo (every 4th: leave at once) */
		if (i % 4 != 0 && wait_user_turn(&c) == POLLIN &&
		    c.ctrl->k2u.kind == KUP_KIND_PASS) {
			c.k2u_seq = c.ctrl->k2u.seq;
			send_msg(&c, KUP_KIND_DATA, "race", 4);
			if (wait_user_turn(&c) == POLLIN) {
				CHECK(c.ctrl->k2u.kind == KUP_KIND_DATA &&
				    c.ctrl->k2u.len == 4, "the echo of 'race'");
				r->rounds++;
			}
		}
		CHECK(poll(&pf, 1, 0) >= 0, "poll");
		chan_close(&c);
	}
	free(ii);
	return NULL;
}

static void
test_reload_race(const char *dir)
{
	struct rr r[RR_THREADS];
	pthread_t th[RR_THREADS];
	unsigned long opens = 0, attaches = 0, rounds = 0, gone = 0;
	char path[512];
	int i, fd;

	g_test = "reload-race";
	for (i = 0; i < RR_THREADS; i++) {
		memset(&r[i], 0, sizeof(r[i]));
		r[i].dir = dir;
		CHECK(pthread_create(&th[i], NULL, rr_main, &r[i]) == 0, "pthread_create");
	}
	snprintf(path, sizeof(path), "%s/running", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	CHECK(fd >= 0, "create %s", path);
	close(fd);
	for (i = 0; i < RR_THREADS; i++) {
		CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
		opens += r[i].opens;
		attaches += r[i].attaches;
		rounds += r[i].rounds;
		gone += r[i].gone;
	}
	CHECK(attaches > 0 && rounds > 0, "no channel was ever used (%lu opens)", opens);
	printf("reload-race: ok (%lu opens, %lu attaches, %lu round trips, "
	    "%lu opens with no device)\n", opens, attaches, rounds, gone);
}

/* unload-waiters DIR: users blocked in every kind of wait while the
 * script unloads kup_echo.ko (the unload stage): poll on an unattached
 * device fd; epoll on an unattached fd and on a channel whose kernel
 * keeps the turn ("!hold"); an ATTACH pausing for a channel its module
 * holds ("!lockhold" after its user left); a thread running every other
 * call on an attached fd in a loop.  DIR/waiting says they are in place;
 * then each must end by itself: POLLHUP / EPOLLHUP, ESHUTDOWN, and the
 * calls' answers after the unload (INFO ESHUTDOWN, the others harmless). */
struct uw {
	int fd;                 /* poll: unattached; attach: its fd */
	int ep;                 /* epoll, watching fds[0] and fds[1] */
	int fds[2];
	struct chan *c;         /* ops: the attached channel */
	pid_t tid;
	unsigned long n;        /* attach tries / op rounds */
	int ok;
};

/* How long a waiter sleeps at most: the unload must wake it well before
 * (a sleep that runs out means nobody woke it). */
#define UW_SLEEP_MS (3 * WAIT_MS)

static void *
uw_poll_main(void *p)
{
	struct uw *u = p;
	struct pollfd pf = { .fd = u->fd, .events = POLLIN };
	int n;

	__atomic_store_n(&u->tid, gettid(), __ATOMIC_RELEASE);
	do {
		pf.revents = 0;
		n = poll(&pf, 1, UW_SLEEP_MS);
		CHECK(n >= 0, "poll on the device fd");
		CHECK(n == 1, "nothing woke the poll on an unattached fd");
		CHECK(!(pf.revents & POLLIN) || (pf.revents & POLLHUP) ||
		    read(u->fd, &(uint64_t){ 0 }, 8) == 8,
		    "readable, with nothing to read");
	} while (!(pf.revents & POLLHUP));
	u->ok = 1;
	return NULL;
}

static void *
uw_epoll_main(void *p)
{
	struct uw *u = p;
	struct epoll_event ev[4];
	int i, j, n, hups = 0, seen[2] = { 0, 0 };

	__atomic_store_n(&u->tid, gettid(), __ATOMIC_RELEASE);
	for (i = 0; i < 100 && hups < 2; i++) {
		n = epoll_wait(u->ep, ev, 4, UW_SLEEP_MS);
		CHECK(n >= 0, "epoll_wait");
		CHECK(n > 0, "nothing woke the epoll_wait");
		for (j = 0; j < n; j++) {
			uint32_t k = ev[j].data.u32;

			CHECK(k < 2, "epoll data %u", k);
			if ((ev[j].events & EPOLLHUP) && !seen[k]) {
				/* reported: out of the set, or level-triggered
				 * HUP would end every later wait at once */
				CHECK(epoll_ctl(u->ep, EPOLL_CTL_DEL, u->fds[k], NULL) == 0,
				    "EPOLL_CTL_DEL");
				seen[k] = 1;
				hups++;
			}
		}
	}
	u->ok = hups == 2;
	return NULL;
}

static void *
uw_attach_main(void *p)
{
	struct uw *u = p;
	struct kup_ioc_attach a;
	int r;

	__atomic_store_n(&u->tid, gettid(), __ATOMIC_RELEASE);
	for (u->n = 0; u->n < 600; ) {
		errno = 0;
		r = attach_raw(u->fd, 45, KUP_ABI_VERSION, &a);
		CHECK(r == -1, "ATTACH of a channel its module holds succeeded");
		__atomic_add_fetch(&u->n, 1, __ATOMIC_RELEASE);
		if (errno == ESHUTDOWN)
			break;
		CHECK(errno == EINPROGRESS || errno == EINTR,
		    "ATTACH of a held channel during the unload");
	}
	u->ok = errno == ESHUTDOWN;
	return NULL;
}

static void *
uw_ops_main(void *p)
{
	struct uw *u = p;
	struct kup_ioc_info *ii = malloc(sizeof(*ii));
	struct pollfd pf = { .fd = u->c->fd, .events = POLLIN };
	unsigned long after = 0;
	uint64_t v = 1;
	void *m;

	CHECK(ii != NULL, "malloc");
	__atomic_store_n(&u->tid, gettid(), __ATOMIC_RELEASE);
	/* every call until INFO says the device is gone, then 100 more
	 * rounds of them */
	for (;;) {
		errno = 0;
		if (ioctl(u->c->fd, KUP_IOC_INFO, ii) != 0) {
			CHECK(errno == ESHUTDOWN, "INFO during the unload");
			if (++after > 100)
				break;
		}
		CHECK(ioctl(u->c->fd, KUP_IOC_WAKE) == 0, "WAKE during the unload");
		CHECK(write(u->c->fd, &v, sizeof(v)) == sizeof(v), "write during the unload");
		drain(u->c);
		CHECK(poll(&pf, 1, 0) >= 0, "poll during the unload");
		m = mmap(NULL, u->c->a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
		    u->c->fd, 0);
		CHECK(m != MAP_FAILED, "mmap during the unload");
		munmap(m, u->c->a.map_size);
		__atomic_add_fetch(&u->n, 1, __ATOMIC_RELEASE);
		CHECK(__atomic_load_n(&u->n, __ATOMIC_RELAXED) < 100000000UL,
		    "the device never went away");
	}
	u->ok = 1;
	free(ii);
	return NULL;
}

/* Bounded wait until thread tid sleeps in a function whose name holds
 * what (/proc/self/task/TID/wchan). */
static void
wait_wchan(struct uw *u, const char *what)
{
	char path[64], wchan[64];
	pid_t tid;
	FILE *f;
	int i;

	for (i = 0; i < WAIT_MS / 10; i++) {
		tid = __atomic_load_n(&u->tid, __ATOMIC_ACQUIRE);
		if (tid != 0) {
			snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", (int)tid);
			f = fopen(path, "r");
			CHECK(f != NULL, "open %s", path);
			if (fgets(wchan, sizeof(wchan), f) == NULL)
				wchan[0] = '\0';
			fclose(f);
			if (strstr(wchan, what) != NULL)
				return;
		}
		usleep(10000);
	}
	fail("a waiter never slept in %s", what);
}

static void
test_unload_waiters(const char *dir)
{
	struct uw u[4];
	pthread_t th[4];
	struct chan hold, ops;
	struct epoll_event ev;
	char path[512], buf[64];
	int i, fd;

	g_test = "unload-waiters";
	memset(u, 0, sizeof(u));
	/* 0: poll on an unattached fd */
	u[0].fd = open_dev();
	/* 1: epoll on an unattached fd and on chan 44, whose kernel keeps
	 * the turn */
	chan_open_how(&hold, 44, 1);
	CHECK(recv_msg(&hold, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	send_msg(&hold, KUP_KIND_DATA, "!hold", 5);
	drain(&hold);
	u[1].fd = open_dev();
	u[1].ep = epoll_create1(EPOLL_CLOEXEC);
	CHECK(u[1].ep >= 0, "epoll_create1");
	ev.events = EPOLLIN;
	ev.data.u64 = 0;
	ev.data.u32 = 0;
	CHECK(epoll_ctl(u[1].ep, EPOLL_CTL_ADD, u[1].fd, &ev) == 0, "epoll_ctl");
	ev.data.u32 = 1;
	CHECK(epoll_ctl(u[1].ep, EPOLL_CTL_ADD, hold.fd, &ev) == 0, "epoll_ctl");
	u[1].fds[0] = u[1].fd;
	u[1].fds[1] = hold.fd;
	/* 2: ATTACH of chan 45, which its module holds */
	sg_lockhold(45, "!lockhold60000");
	u[2].fd = open_dev();
	/* 3: the other calls on attached chan 46 */
	chan_open_how(&ops, 46, 1);
	CHECK(recv_msg(&ops, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	u[3].c = &ops;
	CHECK(pthread_create(&th[0], NULL, uw_poll_main, &u[0]) == 0, "pthread_create");
	CHECK(pthread_create(&th[1], NULL, uw_epoll_main, &u[1]) == 0, "pthread_create");
	CHECK(pthread_create(&th[2], NULL, uw_attach_main, &u[2]) == 0, "pthread_create");
	CHECK(pthread_create(&th[3], NULL, uw_ops_main, &u[3]) == 0, "pthread_create");
	wait_wchan(&u[0], "poll");
	wait_wchan(&u[1], "poll");
	for (i = 0; i < WAIT_MS / 10; i++) {
		if (__atomic_load_n(&u[2].n, __ATOMIC_ACQUIRE) >= 1 &&
		    __atomic_load_n(&u[3].n, __ATOMIC_ACQUIRE) >= 100)
			break;
		usleep(10000);
	}
	CHECK(i < WAIT_MS / 10, "the ATTACH and the calls never got going");
	snprintf(path, sizeof(path), "%s/waiting", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	CHECK(fd >= 0, "create %s", path);
	close(fd);
	printf("unload-waiters: waiting\n");
	for (i = 0; i < 4; i++)
		CHECK(pthread_join(th[i], NULL) == 0, "pthread_join");
	CHECK(u[0].ok, "poll on an unattached fd never saw POLLHUP");
	CHECK(u[1].ok, "epoll never saw EPOLLHUP on both fds");
	CHECK(u[2].ok, "the ATTACH pausing for a held channel never got ESHUTDOWN");
	CHECK(u[3].ok, "the calls during the unload");
	CHECK(hold.ctrl->state & KUP_STATE_SHUTDOWN, "chan 44 state 0x%x", hold.ctrl->state);
	close(u[1].ep);
	close(u[0].fd);
	close(u[1].fd);
	close(u[2].fd);
	chan_close(&hold);
	chan_close(&ops);
	printf("unload-waiters: ok (%lu ATTACH tries, %lu call rounds)\n", u[2].n, u[3].n);
}

/* Attach, take the PASS (the kernel now waits for us), create DIR/attached
 * and wait: the test script unloads kup_echo.ko meanwhile.  We must see
 * POLLHUP and KUP_STATE_SHUTDOWN, the pages must stay usable (no fault),
 * a new open must fail; then wait for DIR/go before letting go of the
 * mapping (the script checks that kup.ko cannot be unloaded before). */
static void
test_unload_hold(const char *dir)
{
	char path[512], buf[64];
	struct pollfd p;
	struct chan c;
	int fd, n, i, spare;

	g_test = "unload-hold";
	spare = open_dev();   /* opened before the unload, never attached */
	chan_open(&c, 0);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	send_msg(&c, KUP_KIND_PASS, NULL, 0);   /* kernel passes back, then waits */
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS back");
	snprintf(path, sizeof(path), "%s/attached", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	CHECK(fd >= 0, "create %s", path);
	close(fd);

	p.fd = c.fd;
	p.events = POLLIN;
	p.revents = 0;
	for (i = 0; i < 60 && !(p.revents & POLLHUP); i++) {
		n = poll(&p, 1, 1000);
		CHECK(n >= 0, "poll");
		if (n == 1 && !(p.revents & POLLHUP))
			drain(&c);   /* an earlier wake-up: not yet HUP */
	}
	CHECK(p.revents & POLLHUP, "no POLLHUP after unload (revents 0x%x)", p.revents);
	CHECK(c.ctrl->state & KUP_STATE_SHUTDOWN, "state 0x%x lacks SHUTDOWN",
	    c.ctrl->state);
	/* the pages outlive the device: still readable and writable */
	memset(c.mem + c.ctrl->u2k_off, 0xa5, 64);
	CHECK(c.mem[c.ctrl->u2k_off + 63] == 0xa5, "mapping after unload");
	send_msg(&c, KUP_KIND_DATA, "anyone?", 7);   /* nobody listens: harmless */
	printf("unload-hold: saw shutdown\n");
	fflush(stdout);

	/* "go" comes after rmmod returned: the device is gone by now */
	snprintf(path, sizeof(path), "%s/go", dir);
	for (i = 0; i < 600 && access(path, F_OK) != 0; i++)
		usleep(100000);
	CHECK(access(path, F_OK) == 0, "the script never said go");
	errno = 0;
	fd = open(DEV, O_RDWR);
	CHECK(fd < 0, "%s still opens after unload", DEV);
	{
		struct kup_ioc_info *ii = calloc(1, sizeof(*ii));

		CHECK(ii != NULL, "calloc");
		errno = 0;
		CHECK(ioctl(c.fd, KUP_IOC_INFO, ii) == -1 && errno == ESHUTDOWN,
		    "INFO on an unloaded device must say ESHUTDOWN");
		free(ii);
	}
	CHECK(c.mem[c.ctrl->u2k_off + 63] == 0xa5, "mapping after unload");
	/* what the files can still do: a fd opened before the unload cannot
	 * attach and polls HUP; the attached one may WAKE (nobody listens),
	 * self-wake, and map its channel again (the pages live on) */
	{
		struct kup_ioc_attach a;
		struct pollfd sp = { .fd = spare, .events = POLLIN };
		uint64_t v = 1;
		uint8_t *m2;

		errno = 0;
		CHECK(attach_raw(spare, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &a) == -1 &&
		    errno == ESHUTDOWN, "ATTACH after the unload");
		CHECK(poll(&sp, 1, 0) == 1 && (sp.revents & POLLHUP),
		    "unattached fd after the unload: revents 0x%x", sp.revents);
		CHECK(ioctl(c.fd, KUP_IOC_WAKE) == 0, "WAKE after the unload");
		CHECK(write(c.fd, &v, sizeof(v)) == sizeof(v), "self-wake after the unload");
		drain(&c);
		m2 = mmap(NULL, c.a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, c.fd, 0);
		CHECK(m2 != MAP_FAILED, "mmap again after the unload");
		CHECK(m2[c.ctrl->u2k_off + 63] == 0xa5 &&
		    (((struct kup_ctrl *)m2)->state & KUP_STATE_SHUTDOWN),
		    "a new mapping after the unload shows other pages");
		munmap(m2, c.a.map_size);
		close(spare);
	}
	chan_close(&c);
	printf("unload-hold: ok\n");
}

/* Echo round trips on one channel as fast as possible until the device
 * shuts down under us (the script unloads the module meanwhile); then the
 * shutdown must be visible (POLLHUP, KUP_STATE_SHUTDOWN) and nothing may
 * have been corrupted on the way.  DIR/running-<chan> tells the script
 * that traffic flows. */
static void
test_traffic(const char *dir, uint32_t chan_id)
{
	char path[512], msg[64], buf[64];
	struct chan c;
	unsigned long i;
	size_t len;
	short ev;
	int fd;

	g_test = "traffic";
	chan_open(&c, chan_id);
	CHECK(recv_msg(&c, buf, sizeof(buf), NULL) == KUP_KIND_PASS, "PASS");
	for (i = 0;; i++) {
		int n = snprintf(msg, sizeof(msg), "%lu", i);  /* digits: any channel */

		send_msg(&c, KUP_KIND_DATA, msg, (uint32_t)n);
		ev = wait_user_turn(&c);
		if (ev & POLLHUP)
			break;
		CHECK(ev == POLLIN, "poll events 0x%x", ev);
		len = c.ctrl->k2u.len;
		CHECK(c.ctrl->k2u.seq == c.k2u_seq + 1 && len == (size_t)n &&
		    memcmp(c.mem + c.a.page_size, msg, len) == 0,
		    "round %lu: wrong reply (seq %llu len %zu)", i,
		    (unsigned long long)c.ctrl->k2u.seq, len);
		c.k2u_seq++;
		if (i == 100) {
			snprintf(path, sizeof(path), "%s/running-%u", dir, chan_id);
			fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			CHECK(fd >= 0, "create %s", path);
			close(fd);
		}
		CHECK(i < 100000000UL, "the device never shut down");
	}
	CHECK(c.ctrl->state & KUP_STATE_SHUTDOWN, "POLLHUP without SHUTDOWN (0x%x)",
	    c.ctrl->state);
	chan_close(&c);
	printf("traffic %u: %lu round trips, then shutdown\n", chan_id, i);
}

/* Bounded wait for a line of the kernel log (the module says what it did). */
static void
wait_dmesg(const char *needle)
{
	char line[512];
	int i, found = 0;

	for (i = 0; i < 200 && !found; i++) {
		FILE *f = popen("dmesg", "r");

		CHECK(f != NULL, "popen dmesg");
		while (fgets(line, sizeof(line), f) != NULL)
			if (strstr(line, needle) != NULL)
				found = 1;
		pclose(f);
		if (!found)
			usleep(50 * 1000);
	}
	CHECK(found, "no '%s' in dmesg", needle);
}

static int
all_zero(const uint8_t *p, size_t n)
{
	size_t i;

	for (i = 0; i < n; i++)
		if (p[i] != 0)
			return 0;
	return 1;
}

/* What a channel's next user finds, and how it is woken:
 *   - nothing of the previous user's conversation is left in the data
 *     areas (the core cleared only the control area);
 *   - a file added to epoll BEFORE its ATTACH hears of its channel (epoll
 *     registers a file's wait queues once, at EPOLL_CTL_ADD);
 *   - ATTACH of "any channel" passes over a channel whose module still
 *     holds it (it waited, and gave up with EINPROGRESS, while others
 *     were free). */
static void
test_release(void)
{
	static const char secret[] = "PREVIOUS-USER-SECRET-PAYLOAD";
	struct kup_ioc_attach a;
	struct epoll_event ev = { .events = EPOLLIN };
	struct chan c, held, any;
	char buf[64];
	size_t len;
	int efd, n;

	g_test = "release";
	chan_open(&c, 50);
	echo_round(&c, secret, secret);
	chan_close(&c);
	chan_open(&c, 50);
	CHECK(all_zero(c.mem + c.ctrl->u2k_off, c.ctrl->u2k_size),
	    "the previous user's message is still in the u2k area");
	CHECK(all_zero(c.mem + c.ctrl->k2u_off, c.ctrl->k2u_size),
	    "the previous reply is still in the k2u area");
	echo_round(&c, "fresh", "fresh");
	chan_close(&c);

	/* epoll first, ATTACH after */
	memset(&c, 0, sizeof(c));
	c.fd = open_dev();
	efd = epoll_create1(EPOLL_CLOEXEC);
	CHECK(efd >= 0, "epoll_create1");
	ev.data.fd = c.fd;
	CHECK(epoll_ctl(efd, EPOLL_CTL_ADD, c.fd, &ev) == 0, "EPOLL_CTL_ADD");
	CHECK(attach_raw(c.fd, 52, KUP_ABI_VERSION, &c.a) == 0, "attach chan 52");
	c.mem = mmap(NULL, c.a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
	    c.fd, (off_t)c.a.map_offset);
	CHECK(c.mem != MAP_FAILED, "mmap");
	c.ctrl = (struct kup_ctrl *)c.mem;
	CHECK(recv_msg(&c, buf, sizeof(buf), &len) == KUP_KIND_PASS, "first PASS");
	send_msg(&c, KUP_KIND_DATA, "!delay", 6);   /* answered after 300 ms */
	__atomic_store_n(&c.ctrl->user_waiting, 1, __ATOMIC_SEQ_CST);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	n = epoll_wait(efd, &ev, 1, WAIT_MS);
	c.ctrl->user_waiting = 0;
	CHECK(n == 1 && (ev.events & EPOLLIN), "epoll registered before ATTACH "
	    "never heard of the reply (n %d, turn %u)", n, turn(&c));
	CHECK(turn(&c) == KUP_TURN_USER, "woken before the reply");
	CHECK(recv_msg(&c, buf, sizeof(buf), &len) == KUP_KIND_DATA && len == 6,
	    "delayed reply");
	close(efd);
	chan_close(&c);

	/* channel 0 left while echo holds it locked; "any" takes another */
	chan_open(&held, 0);
	CHECK(recv_msg(&held, buf, sizeof(buf), &len) == KUP_KIND_PASS, "PASS on 0");
	send_msg(&held, KUP_KIND_DATA, "!lockhold20000", 14);
	wait_dmesg("echo: chan 0: holding the channel locked");
	chan_close(&held);
	memset(&any, 0, sizeof(any));
	any.fd = open_dev();
	errno = 0;
	CHECK(attach_raw(any.fd, KUP_IOC_CHAN_ANY, KUP_ABI_VERSION, &any.a) == 0,
	    "ATTACH any with channel 0 still the module's");
	CHECK(any.a.chan_id != 0, "ATTACH any chose channel 0, which its module holds");
	any.mem = mmap(NULL, any.a.map_size, PROT_READ | PROT_WRITE, MAP_SHARED,
	    any.fd, (off_t)any.a.map_offset);
	CHECK(any.mem != MAP_FAILED, "mmap");
	any.ctrl = (struct kup_ctrl *)any.mem;
	CHECK(recv_msg(&any, buf, sizeof(buf), &len) == KUP_KIND_PASS, "PASS");
	send_msg(&any, KUP_KIND_DATA, "!lockfree", 9);   /* ends the hold */
	CHECK(recv_msg(&any, buf, sizeof(buf), &len) == KUP_KIND_DATA, "!lockfree");
	chan_close(&any);
	/* and channel 0 comes back once echo has let go */
	for (n = 0;; n++) {
		int fd = open_dev();

		if (attach_raw(fd, 0, KUP_ABI_VERSION, &a) == 0) {
			close(fd);
			break;
		}
		CHECK((errno == EINPROGRESS || errno == EBUSY) && n < 100,
		    "channel 0 never came back");
		close(fd);
		usleep(50 * 1000);
	}
	printf("release: ok\n");
}

/* The user of tests/vm/kup_holdtest.c's test=channel (the kholder stage):
 * once the module made /dev/kup/holdtest, attaches its channels 0 and 1 in
 * turn, takes each one's PASS and sends the message the module's holder
 * thread receives and never lets go of (it exits holding it); says "sent"
 * in DIR and stays attached until DIR/go (the module's other threads
 * meanwhile find channel 0 held by someone else).  Then the device still
 * reports both channels held by its module, and after this user closed,
 * channel 0 is not handed to a new one: an attach gives up with
 * EINPROGRESS (the holder never lets go).  Closes everything before it
 * exits, so that the module's rmmod frees the device. */
static void
test_deadholder(const char *dir)
{
	struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
	struct kup_ioc_attach a;
	char path[512], buf[64];
	struct chan c[2];
	int fd, i;

	g_test = "deadholder";
	g_dev = KUP_DEV_DIR "/holdtest";
	CHECK(ii != NULL, "calloc");
	for (i = 0; i < 1200 && access(g_dev, F_OK) != 0; i++)
		usleep(50 * 1000);
	for (i = 0; i < 2; i++) {
		chan_open(&c[i], (uint32_t)i);
		CHECK(recv_msg(&c[i], buf, sizeof(buf), NULL) == KUP_KIND_PASS,
		    "PASS on %d", i);
		send_msg(&c[i], KUP_KIND_DATA, "hold this", 9);
	}
	snprintf(path, sizeof(path), "%s/sent", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	CHECK(fd >= 0, "create %s", path);
	close(fd);
	printf("deadholder: sent\n");

	snprintf(path, sizeof(path), "%s/go", dir);
	for (i = 0; i < 3000 && access(path, F_OK) != 0; i++)
		usleep(100000);
	CHECK(access(path, F_OK) == 0, "the script never said go");
	CHECK(ioctl(c[0].fd, KUP_IOC_INFO, ii) == 0, "INFO");
	for (i = 0; i < 2; i++) {
		CHECK(turn(&c[i]) == KUP_TURN_KERNEL,
		    "the turn of %d came back (%u): the hold was let go", i, turn(&c[i]));
		CHECK(ii->attached[i] == (KUP_INFO_ATTACHED | KUP_INFO_MODULE_HOLDS),
		    "channel %d is 0x%x in INFO, not attached and held by its module",
		    i, ii->attached[i]);
	}
	chan_close(&c[0]);
	chan_close(&c[1]);

	fd = open_dev();
	errno = 0;
	CHECK(attach_raw(fd, 0, KUP_ABI_VERSION, &a) == -1 && errno == EINPROGRESS,
	    "an attach of the channel its dead holder holds did not give up "
	    "with EINPROGRESS");
	CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO");
	CHECK(ii->attached[0] == KUP_INFO_MODULE_HOLDS,
	    "channel 0 is 0x%x in INFO after its user left, not held by its module",
	    ii->attached[0]);
	close(fd);
	free(ii);
	printf("deadholder: ok\n");
}

/* Bounded wait until the kernel side says it sleeps on c's page. */
static void
wait_kernel_waiting(struct chan *c)
{
	int i;

	for (i = 0; i < WAIT_MS && !__atomic_load_n(&c->ctrl->kernel_waiting,
	    __ATOMIC_ACQUIRE); i++)
		usleep(1000);
	CHECK(__atomic_load_n(&c->ctrl->kernel_waiting, __ATOMIC_ACQUIRE),
	    "the module never slept on chan %u", c->a.chan_id);
}

/* anyherd: the user of kup_anyherd.ko (tests/vm/kup_anyherd.c), whose
 * threads wait in kupdev_receive_any on disjoint sets of AH_PER channels.
 * Attaches every channel, takes each first pass, waits until every
 * thread sleeps, then talks to thread 0 alone (channels 0 and 1): each
 * message handed over while thread 0 sleeps, so that each makes its
 * KUP_IOC_WAKE.  The other threads must not have been woken by any of
 * it: the module logs their counts at rmmod. */
#define AH_CHANS  8
#define AH_ROUNDS 24
static void
test_anyherd(void)
{
	struct chan c[AH_CHANS];
	char buf[64], msg[32];
	size_t len;
	int i;

	g_test = "anyherd";
	g_dev = KUP_DEV_DIR "/anyherd";
	for (i = 0; i < 1200 && access(g_dev, F_OK) != 0; i++)
		usleep(50 * 1000);
	for (i = 0; i < AH_CHANS; i++) {
		chan_open(&c[i], (uint32_t)i);
		CHECK(recv_msg(&c[i], buf, sizeof(buf), NULL) == KUP_KIND_PASS,
		    "PASS on %d", i);
	}
	for (i = 0; i < AH_CHANS; i++)
		wait_kernel_waiting(&c[i]);
	for (i = 0; i < AH_ROUNDS; i++) {
		struct chan *t = &c[i % 2];

		wait_kernel_waiting(t);
		snprintf(msg, sizeof(msg), "herd %d", i);
		send_msg(t, KUP_KIND_DATA, msg, (uint32_t)strlen(msg));
		CHECK(recv_msg(t, buf, sizeof(buf), &len) == KUP_KIND_DATA,
		    "reply %d is not DATA", i);
		CHECK(len == strlen(msg) && memcmp(buf, msg, len) == 0,
		    "reply %d is '%.*s'", i, (int)len, buf);
	}
	for (i = 0; i < AH_CHANS; i++)
		chan_close(&c[i]);
	printf("anyherd: ok %d messages to thread 0\n", AH_ROUNDS);
}

int
main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 2 && strcmp(argv[1], "basic") == 0)
		test_basic();
	else if (argc == 2 && strcmp(argv[1], "mmap") == 0)
		test_mmap();
	else if (argc == 2 && strcmp(argv[1], "sigkill") == 0)
		test_sigkill();
	else if (argc == 2 && strcmp(argv[1], "hostile") == 0)
		test_hostile();
	else if (argc == 2 && strcmp(argv[1], "release") == 0)
		test_release();
	else if (argc == 2 && strcmp(argv[1], "abuse") == 0)
		test_abuse();
	else if (argc == 2 && strcmp(argv[1], "siege") == 0)
		test_siege();
	else if (argc == 3 && strcmp(argv[1], "unload-hold") == 0)
		test_unload_hold(argv[2]);
	else if (argc == 3 && strcmp(argv[1], "unload-waiters") == 0)
		test_unload_waiters(argv[2]);
	else if (argc == 3 && strcmp(argv[1], "reload-race") == 0)
		test_reload_race(argv[2]);
	else if (argc == 3 && strcmp(argv[1], "chans") == 0) {
		/* print a device's channel count (the load stage checks params) */
		struct kup_ioc_info *ii = calloc(1, sizeof(*ii));
		char path[128];
		int fd;

		g_test = "chans";
		snprintf(path, sizeof(path), KUP_DEV_DIR "/%s", argv[2]);
		fd = open(path, O_RDWR | O_CLOEXEC);
		CHECK(ii != NULL && fd >= 0, "open %s", path);
		CHECK(ioctl(fd, KUP_IOC_INFO, ii) == 0, "INFO %s", path);
		printf("%u\n", ii->chan_count);
		close(fd);
		free(ii);
	} else if (argc == 4 && strcmp(argv[1], "traffic") == 0)
		test_traffic(argv[2], (uint32_t)strtoul(argv[3], NULL, 10));
	else if (argc == 3 && strcmp(argv[1], "deadholder") == 0)
		test_deadholder(argv[2]);
	else if (argc == 2 && strcmp(argv[1], "anyherd") == 0)
		test_anyherd();
	else {
		fprintf(stderr,
		    "usage: kup_kfault basic|mmap|sigkill|hostile|release|abuse|siege|unload-hold DIR|"
		    "unload-waiters DIR|reload-race DIR|"
		    "traffic DIR CHAN|chans NAME|deadholder DIR|anyherd\n");
		return 2;
	}
	return 0;
}
