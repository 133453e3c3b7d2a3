/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_compat32.c -- a 32-bit (i386) user of /dev/kup/echo, run inside the
 * test VM (the kfault_compat stage): kup.ko's ioctls reach a 32-bit
 * process through .compat_ioctl, its mmap through the compat mmap2, and
 * nothing else tests that path.  The ABI header itself is compiled for
 * i386 here, so its _Static_asserts check that every struct has the
 * x86_64 layout there too (uint64_t is 4-byte aligned in i386 structs).
 *
 * Built without a C library (the build host has no 32-bit one): -m32
 * -nostdlib -ffreestanding, system calls through int $0x80, and
 * tests/vm/compat32/sys/ioctl.h for the request macros.
 *
 * Exit status 0 = pass; a failure prints "FAIL: compat32: <what>" and
 * exits 1.  Every wait is bounded (poll with a timeout).
 */
#include <stdint.h>

#include "kup_abi.h"
#include "kup_ioctl.h"

/* i386 system call numbers and flags (arch/x86/entry/syscalls/syscall_32.tbl) */
#define NR_exit     1
#define NR_read     3
#define NR_write    4
#define NR_open     5
#define NR_close    6
#define NR_ioctl    54
#define NR_munmap   91
#define NR_poll     168
#define NR_mmap2    192

#define O_RDWR      2
#define O_CLOEXEC   02000000
#define PROT_READ   1
#define PROT_WRITE  2
#define MAP_SHARED  1
#define POLLIN      1
#define POLLERR     8
#define POLLHUP     16
#define EINTR       4
#define EFAULT      14
#define ENOTTY      25
#define EINPROGRESS 115

#define WAIT_MS 20000
#define CHAN    114U

/* a system call's address result that is an error: -4095..-1 */
#define IS_ERR(r) ((unsigned long)(r) >= (unsigned long)-4095L)

struct pollfd32 {
	int fd;
	short events;
	short revents;
};

static long
sys3(long nr, long a, long b, long c)
{
	long r;

	__asm__ volatile ("int $0x80"
	    : "=a" (r)
	    : "0" (nr), "b" (a), "c" (b), "d" (c)
	    : "memory");
	return r;
}

static long
sys6(long nr, long a, long b, long c, long d, long e, long f)
{
	long args[2] = { a, f };
	long *ap = args;
	long r;

	/* the sixth argument goes in ebp, the frame pointer when there is
	 * one: saved by hand, and loaded through ebx (not from an
	 * esp-relative operand, which the push would have moved) */
	__asm__ volatile (
	    "push %%ebp\n\t"
	    "mov 4(%%ebx), %%ebp\n\t"
	    "mov 0(%%ebx), %%ebx\n\t"
	    "int $0x80\n\t"
	    "pop %%ebp"
	    : "=a" (r), "+b" (ap)
	    : "0" (nr), "c" (b), "d" (c), "S" (d), "D" (e)
	    : "memory");
	return r;
}

static unsigned long
slen(const char *s)
{
	unsigned long n = 0;

	while (s[n] != '\0')
		n++;
	return n;
}

static void
say(const char *s)
{
	(void)sys3(NR_write, 1, (long)s, (long)slen(s));
}

static void __attribute__((noreturn))
fail(const char *what)
{
	say("FAIL: compat32: ");
	say(what);
	say("\n");
	(void)sys3(NR_exit, 1, 0, 0);
	for (;;)
		;
}

#define CHECK(c, what) do { if (!(c)) fail(what); } while (0)

static void
zero(void *p, unsigned long n)
{
	volatile unsigned char *b = p;

	while (n-- > 0)
		*b++ = 0;
}

static struct kup_ioc_info g_info;
static struct kup_ioc_attach g_att;

static uint32_t
turn(volatile struct kup_ctrl *c)
{
	return __atomic_load_n(&c->turn, __ATOMIC_ACQUIRE);
}

/* Wait until the turn is ours, as libkup does: flag, fence, look, poll. */
static void
wait_user_turn(int fd, volatile struct kup_ctrl *c)
{
	struct pollfd32 p;
	uint32_t v[2];
	long n;
	int i;

	for (i = 0; i < 10; i++) {
		if (turn(c) == KUP_TURN_USER)
			return;
		__atomic_store_n(&c->user_waiting, 1, __ATOMIC_SEQ_CST);
		__atomic_thread_fence(__ATOMIC_SEQ_CST);
		if (turn(c) == KUP_TURN_USER) {
			c->user_waiting = 0;
			return;
		}
		p.fd = fd;
		p.events = POLLIN;
		p.revents = 0;
		n = sys3(NR_poll, (long)&p, 1, WAIT_MS);
		c->user_waiting = 0;
		(void)sys3(NR_read, fd, (long)v, 8);   /* drain (8 bytes, or EAGAIN) */
		CHECK(n == 1, "the kernel never handed the turn back");
		CHECK(!(p.revents & (POLLHUP | POLLERR)), "POLLHUP/POLLERR on the channel");
	}
	fail("the turn never came back");
}

static int
compat_main(void)
{
	volatile struct kup_ctrl *c;
	uint8_t *mem;
	long fd, r;
	int i;

	fd = sys3(NR_open, (long)KUP_DEV_DIR "/echo", O_RDWR | O_CLOEXEC, 0);
	CHECK(fd >= 0, "open /dev/kup/echo");

	/* INFO through the compat ioctl: the same struct, the same bytes */
	r = sys3(NR_ioctl, fd, (long)KUP_IOC_INFO, (long)&g_info);
	CHECK(r == 0, "INFO");
	CHECK(g_info.abi_version == KUP_ABI_VERSION && g_info.name[0] == 'e' &&
	    g_info.name[4] == '\0' && g_info.chan_count > CHAN &&
	    g_info.attached_chan == KUP_IOC_CHAN_ANY, "INFO's answer");
	/* bad pointers and a request of another size are refused */
	CHECK(sys3(NR_ioctl, fd, (long)KUP_IOC_INFO, 16) == -EFAULT, "INFO to a bad pointer");
	CHECK(sys3(NR_ioctl, fd, (long)KUP_IOC_ATTACH, 0) == -EFAULT, "ATTACH from NULL");
	CHECK(sys3(NR_ioctl, fd, (long)_IOR(KUP_IOC_MAGIC, 0xb2, uint32_t),
	    (long)&g_info) == -ENOTTY, "INFO's number with another size");

	/* ATTACH: its 64-bit fields come back whole */
	for (i = 0; i < WAIT_MS / 50; i++) {
		struct pollfd32 none = { -1, 0, 0 };

		zero(&g_att, sizeof(g_att));
		g_att.abi_version = KUP_ABI_VERSION;
		g_att.chan_id = CHAN;
		r = sys3(NR_ioctl, fd, (long)KUP_IOC_ATTACH, (long)&g_att);
		if (r == 0)
			break;
		CHECK(r == -EINPROGRESS || r == -EINTR, "ATTACH");
		(void)sys3(NR_poll, (long)&none, 1, 50);   /* a 50 ms pause */
	}
	CHECK(r == 0, "ATTACH never succeeded");
	CHECK(g_att.chan_id == CHAN && g_att.map_offset == 0 &&
	    g_att.map_size == (uint64_t)g_att.page_size * (1 + 2 * g_att.dev_pages) &&
	    g_att.attach_gen != 0, "ATTACH's answer");

	r = sys6(NR_mmap2, 0, (long)g_att.map_size, PROT_READ | PROT_WRITE,
	    MAP_SHARED, fd, 0);
	CHECK(!IS_ERR(r), "mmap2 of the channel");
	mem = (uint8_t *)r;
	c = (volatile struct kup_ctrl *)mem;
	CHECK(c->magic == KUP_MAGIC && c->chan_id == CHAN &&
	    c->attach_gen == g_att.attach_gen, "the control page");
	/* a window past the channel is refused there too */
	r = sys6(NR_mmap2, 0, (long)g_att.page_size, PROT_READ, MAP_SHARED, fd,
	    (long)(1 + 2 * g_att.dev_pages));   /* mmap2's offset is in pages */
	CHECK(IS_ERR(r), "mmap2 past the channel was not refused");

	/* the worker's PASS, then one echo round trip */
	wait_user_turn((int)fd, c);
	CHECK(c->k2u.kind == KUP_KIND_PASS && c->k2u.seq == 1, "the worker's PASS");
	for (i = 0; i < 8; i++)
		mem[c->u2k_off + i] = (uint8_t)"compat32"[i];
	c->u2k.len = 8;
	c->u2k.kind = KUP_KIND_DATA;
	c->u2k.seq = 1;
	__atomic_store_n(&c->turn, KUP_TURN_KERNEL, __ATOMIC_RELEASE);
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
	if (c->kernel_waiting)
		CHECK(sys3(NR_ioctl, fd, (long)KUP_IOC_WAKE, 0) == 0, "WAKE");
	wait_user_turn((int)fd, c);
	CHECK(c->k2u.kind == KUP_KIND_DATA && c->k2u.len == 8 && c->k2u.seq == 2,
	    "the echo's descriptor");
	for (i = 0; i < 8; i++)
		CHECK(mem[g_att.page_size + i] == (uint8_t)"compat32"[i], "the echo's bytes");

	/* INFO on the attached fd names its channel */
	CHECK(sys3(NR_ioctl, fd, (long)KUP_IOC_INFO, (long)&g_info) == 0 &&
	    g_info.attached_chan == CHAN &&
	    (g_info.attached[CHAN] & KUP_INFO_ATTACHED), "INFO on the attached fd");
	CHECK(sys3(NR_munmap, (long)mem, (long)g_att.map_size, 0) == 0, "munmap");
	CHECK(sys3(NR_close, fd, 0, 0) == 0, "close");
	say("compat32: ok (INFO, ATTACH, mmap2 and a round trip from an i386 process)\n");
	return 0;
}

/* No C library: the entry point calls compat_main and exits with its
 * status.  The stack is 16-byte aligned at _start on i386 Linux. */
void __attribute__((noreturn, used))
kup_compat32_start(void)
{
	(void)sys3(NR_exit, compat_main(), 0, 0);
	for (;;)
		;
}

__asm__(
    ".globl _start\n"
    "_start:\n"
    "\txor %ebp, %ebp\n"
    "\tand $-16, %esp\n"
    "\tcall kup_compat32_start\n"
    "\thlt\n");
