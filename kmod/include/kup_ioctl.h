/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_ioctl.h -- the ioctl ABI of a KUP kernel device node (/dev/kup/<name>),
 * shared by the Linux and FreeBSD hosts and by libkup's kernel backends.
 *
 * Model: one open file description = one device handle, which may attach
 * AT MOST ONE channel.  libkup opens the node once for the device handle
 * (info, device events) and once more per channel it attaches.
 *
 *   open("/dev/kup/<name>", O_RDWR | O_CLOEXEC)
 *   ioctl(fd, KUP_IOC_INFO, &info)          device facts; ESHUTDOWN once the
 *                                           device was unloaded (gone;
 *                                           FreeBSD: ENXIO from devfs)
 *   ioctl(fd, KUP_IOC_ATTACH, &att)         bind this fd to a channel; a
 *                                           channel whose last user left
 *                                           while its module still holds it
 *                                           (computing) is waited for up to
 *                                           KUP_ATTACH_LETGO_MS, in
 *                                           interruptible sleeps, then
 *                                           EINPROGRESS (never an
 *                                           unkillable wait)
 *   mmap(NULL, att.map_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
 *        att.map_offset)                    the channel pages (kup_abi.h)
 *   poll(fd, POLLIN)                        attached fd: readable while a
 *                                           wake-up of the user side is
 *                                           pending (like an eventfd: a
 *                                           hand-over, shutdown, the kernel
 *                                           giving up on the user), until
 *                                           read(2) consumes it; shutdown is
 *                                           POLLIN|POLLHUP, a user the kernel
 *                                           gave up on POLLIN|POLLERR, for
 *                                           good; unattached fd:
 *                                           readable when the device's
 *                                           notify_gen differs from the one
 *                                           this fd last saw (KUP_IOC_INFO or
 *                                           read(2)),
 *                                           POLLHUP once shutting down.
 *                                           The kernel wakes a channel's
 *                                           pollers on a hand-over only while
 *                                           ctrl->user_waiting is set (the
 *                                           kup_abi.h handshake; libkup's
 *                                           poll mode keeps it set); the
 *                                           page's turn is the truth
 *   read(fd, &u64, 8)                       consume pending wake-ups (attached
 *                                           fd) / the device event (unattached
 *                                           fd): 8 bytes, or EAGAIN if none;
 *                                           never blocks; EFAULT (a bad
 *                                           buffer) consumes nothing: the
 *                                           wake-up / event stays pending
 *   write(fd, &u64, 8)                      attached fd, u64 != 0: make the
 *                                           user's own wake-up pending (poll
 *                                           readable now), as on an eventfd
 *   ioctl(fd, KUP_IOC_WAKE)                 wake the kernel side (after a
 *                                           hand-over that saw kernel_waiting)
 *   close(fd), munmap                       detach once the last reference to
 *                                           the open file (fds AND mappings) is
 *                                           gone; process death does both
 *
 * mmap is bounds-checked: offset + length must lie within
 * [map_offset, map_offset + map_size) of the attached channel, offset a
 * multiple of the page size; anything else (or mmap before attach) is EINVAL.
 * MAP_PRIVATE and PROT_EXEC are refused (EINVAL): the pages exist only to
 * be shared, as data.  (Linux also refuses a later mprotect(PROT_EXEC);
 * FreeBSD cannot: devfs sets a device mapping's maximum protection and
 * gives the driver no say in it.)  ATTACH and WAKE need a file opened for
 * writing (EBADF); INFO, poll and read do not.
 *
 * Errors are returned the usual way (-1 and errno).  errno -> KUP_E_*:
 *   ENOENT          KUP_E_NOENT     (channel id out of range, no device)
 *   EAGAIN          KUP_E_NOTREADY  (channel not announced yet)
 *   EBUSY           KUP_E_BUSY      (channel attached elsewhere / none free,
 *                                    or this fd is already attached)
 *   EINPROGRESS     KUP_E_RELEASING (attach: its last user left, the module
 *                                    has not let go of it yet: retry)
 *   EINTR           (attach: a signal came during that wait; libkup asks
 *                                    again)
 *   EPROTONOSUPPORT KUP_E_VERSION   (abi_version != the module's)
 *   ESHUTDOWN       KUP_E_SHUTDOWN  (device going away)
 *   EINVAL          KUP_E_INVAL     (reserved field non-zero, bad request,
 *                                    KUP_IOC_WAKE on an unattached fd)
 *   ENOTTY          KUP_E_VERSION   (not a KUP device / unknown request)
 *   anything else   KUP_E_SYS
 *
 * Every struct has fixed-width fields, explicit padding, reserved words
 * that must be zero on input (EINVAL otherwise: room to grow), and a size
 * below 8 KiB (FreeBSD's IOCPARM_MAX limit for the encoded length).  The
 * request numbers use each OS's own _IO/_IOR/_IOWR macros, whose
 * direction bits differ between Linux and FreeBSD but mean the same.
 */
#ifndef KUP_IOCTL_H
#define KUP_IOCTL_H

#include "kup_abi.h"

#if defined(__linux__) || defined(__KERNEL__)
#  if defined(__KERNEL__)
#    include <linux/ioctl.h>
#  else
#    include <sys/ioctl.h>
#  endif
#else /* FreeBSD (kernel and user) */
#  include <sys/ioccom.h>
#endif

#define KUP_IOC_MAGIC  'k'          /* with numbers 0xb0..0xbf below */
#define KUP_DEV_DIR    "/dev/kup"   /* device nodes: KUP_DEV_DIR "/" name */

/* KUP_IOC_ATTACH: bind this fd to a channel. */
struct kup_ioc_attach {
	/* in */
	uint32_t abi_version;   /* KUP_ABI_VERSION the caller was built for */
	uint32_t chan_id;       /* channel id, or KUP_IOC_CHAN_ANY; out: the id */
	uint32_t pages;         /* 0: any; else must equal the device's (EINVAL) */
	uint32_t reserved_in;   /* zero */
	/* out */
	uint32_t page_size;     /* P */
	uint32_t chan_count;    /* channels on the device */
	uint64_t map_offset;    /* pass to mmap as the offset (0 today) */
	uint64_t map_size;      /* KUP_CHAN_BYTES(P, pages) */
	uint64_t attach_gen;    /* ctrl->attach_gen after this attach */
	uint32_t dev_pages;     /* pages per direction on the device */
	uint32_t reserved[7];   /* zero */
};
#define KUP_IOC_CHAN_ANY  0xffffffffU

/* KUP_IOC_INFO: device facts (mirrors struct kernproxy_info). */
struct kup_ioc_info {
	char     name[KUP_NAME_MAX];
	uint32_t abi_version;
	uint32_t page_size;
	uint32_t chan_count;
	uint32_t announced;
	uint32_t pages;
	uint32_t max_msg;
	uint64_t notify_gen;
	uint32_t shutting_down;
	uint32_t attached_chan;          /* this fd's channel, or KUP_IOC_CHAN_ANY */
	uint32_t reserved[6];            /* zero */
	uint8_t  attached[KUP_MAX_CHANNELS];   /* KUP_INFO_* bits per channel */
};

/*
 * attached[i] of KUP_IOC_INFO (and of kupsim's INFO, libkup's
 * kernproxy_info): bits, test them, do not compare the byte.
 *   KUP_INFO_ATTACHED      a user side holds the channel
 *   KUP_INFO_MODULE_HOLDS  a module thread holds it locked, between its
 *                          kupdev_receive and kupdev_unlock_channel: while
 *                          computing a reply (with ATTACHED), or after its
 *                          user left (without: an attach of it waits, then
 *                          EKU_RELEASING) -- for good if the thread exited
 *                          or hangs without unlocking, a module bug the
 *                          operator can only see this way.
 * The second bit came after ABI version 1's first release without a
 * version bump: a reader that tests the byte against 0 sees a channel its
 * module holds as attached, which is safe (it cannot be attached).
 */
/* KUP_INFO_ATTACHED, KUP_INFO_MODULE_HOLDS: in kup_abi.h (libkup's kup.h
 * reports the same bytes) */

#define KUP_IOC_ATTACH  _IOWR(KUP_IOC_MAGIC, 0xb0, struct kup_ioc_attach)
#define KUP_IOC_WAKE    _IO(KUP_IOC_MAGIC, 0xb1)
#define KUP_IOC_INFO    _IOR(KUP_IOC_MAGIC, 0xb2, struct kup_ioc_info)

#if !defined(__cplusplus)
_Static_assert(sizeof(struct kup_ioc_attach) == 80, "kup_ioc_attach size");
_Static_assert(sizeof(struct kup_ioc_info) == 32 + 6 * 4 + 8 + 8 * 4 + KUP_MAX_CHANNELS,
    "kup_ioc_info size");
_Static_assert(sizeof(struct kup_ioc_info) < 8192, "FreeBSD IOCPARM_MAX");
#endif

#endif /* KUP_IOCTL_H */
