/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_backend.h -- how libkup reaches a KUP device.
 *
 * The turn protocol (kup.c) is the same for every host; a backend only
 * opens the device, answers "info", attaches a channel (giving back the
 * mapping of the channel pages, a pollable wait fd and a way to wake the
 * kernel side) and detaches.  Backends: sim (kupsim unix socket,
 * backend_sim.c), linux and freebsd (/dev/kup/<name>, both from
 * backend_kdev.c).
 *
 * All functions returning int return KUP_E_OK (0) or a KUP_E_* code from
 * kup_abi.h; KUP_E_SYS means errno says more (the backend leaves errno set).
 */
#ifndef KUP_BACKEND_H
#define KUP_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include "kup.h"

/* One attached channel, filled by ops->attach, owned by kup.c afterwards. */
struct kup_backend_chan {
	void    *mem;       /* start of the channel mapping (struct kup_ctrl) */
	size_t   bytes;     /* length of the mapping */
	uint32_t chan_id;   /* the channel actually attached (ANY resolved) */
	/* Polls readable when the kernel side woke us (turn handed over,
	 * shutdown).  kup.c polls it while user_waiting is set and hands it
	 * out as kernproxy_fd(); ops->drain consumes pending wake-ups. */
	int      wait_fd;
	/* Optional: polls readable/HUP when the host side of the attachment
	 * is gone (kupsim died).  -1 if the backend has none. */
	int      hup_fd;
	void    *priv;      /* backend state (fds, ...) */
};

struct kup_backend_ops {
	const char *name;   /* "sim", "linux", "freebsd" */
	/* Open the device `name` (a bare device name, or a path when it
	 * contains '/').  KUP_E_NOENT when there is no such device. */
	int  (*open)(const char *name, void **devp);
	/* Device facts.  KUP_E_SHUTDOWN if the device went away. */
	int  (*info)(void *dev, struct kernproxy_info *out);
	/* Attach chan_id (KP_CHAN_ANY -> KUP_CHAN_ANY_WIRE) stating the ABI
	 * version the caller was built for; pages 0 = any, else must match
	 * (KUP_E_INVAL).  On success fill *out (mem mapped, fds open). */
	int  (*attach)(void *dev, uint32_t chan_id, uint32_t abi_version,
	         uint32_t pages, struct kup_backend_chan *out);
	/* Wake the kernel side (it set kernel_waiting). */
	int  (*wake)(struct kup_backend_chan *ch);
	/* Consume pending wake-ups on wait_fd (non-blocking): one read(2),
	 * which takes them all (eventfd-like).  1 if any was pending. */
	int  (*drain)(struct kup_backend_chan *ch);
	/* Unmap and close everything of the channel (the host detaches). */
	void (*detach)(struct kup_backend_chan *ch);
	/* A fd that polls readable on device events (announce, shutdown);
	 * -1 with errno on failure.  Owned by the backend. */
	int  (*dev_fd)(void *dev);
	/* Consume pending device events on dev_fd (non-blocking). */
	void (*dev_drain)(void *dev);
	void (*close)(void *dev);
	/* Optional: make wait_fd readable now.  Every wait fd is
	 * eventfd-like (the sim's eventfd; the Linux and FreeBSD channel fds,
	 * see kup_ioctl.h): it turns readable only on a wake-up and goes quiet
	 * once drained, so when kernproxy_fd() starts poll mode while the turn
	 * is already ours, kup.c kicks it with this (an 8-byte write on all
	 * three hosts).  NULL only for a backend whose wait fd is
	 * level-triggered on the control page itself. */
	int  (*self_wake)(struct kup_backend_chan *ch);
};

/* CLOCK_MONOTONIC in milliseconds (kup.c; for the backends too) */
int64_t kup_now_ms(void);

/* wire value of "any channel" */
#define KUP_CHAN_ANY_WIRE 0xffffffffU

extern const struct kup_backend_ops kup_backend_sim;
#if defined(KUP_HAVE_BACKEND_LINUX)
extern const struct kup_backend_ops kup_backend_linux;
#endif
#if defined(KUP_HAVE_BACKEND_FREEBSD)
extern const struct kup_backend_ops kup_backend_freebsd;
#endif

/* ---- test-only hooks (exported by libkup, not part of kup.h) ---------
 * KUP_TEST_ABI_VERSION=<n> in the environment makes kernproxy_channel()
 * state ABI version n instead of KUP_ABI_VERSION (version-refusal test).
 * The two functions below let the hostile-user test scribble on the
 * control page and wake the kernel side. */
void *kup_test_raw_mapping(void *chan, size_t *bytes);
int   kup_test_raw_wake(void *chan);
/* The channel's next n wake-ups of the kernel side (ops->wake) fail with
 * KUP_E_SYS, errno err (EINTR: as a wake-up a signal interrupted),
 * writing nothing: the sim backend only (0; -1 for another backend, whose
 * wake-up a test makes fail in the kernel's call itself: tests/c/test_kup.c
 * fail_wakes).  kup_sim_test_fail_wakes is its backend half. */
int   kup_test_fail_wakes(void *chan, unsigned int n, int err);
void  kup_sim_test_fail_wakes(struct kup_backend_chan *ch, unsigned int n,
          int err);

#endif /* KUP_BACKEND_H */
