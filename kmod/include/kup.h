/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup.h -- libkup, the user-space side of KUP.
 *
 * The seed's API (kernproxy_open, _channel, _receive, _send, _close,
 * _error, kernproxy_errno) plus what it lacked: the received length and
 * kind, an explicit pass, deadlines, and a pollable fd per channel (the
 * seed's never-built asynchronous mode: poll/kqueue the fd, then call
 * kernproxy_receive(..., KP_NB)).
 *
 * Backends: the device is reached through a backend chosen at
 * kernproxy_open() time -- kupsim (a unix socket per device in
 * $KUPSIM_DIR, default /run/kupsim), Linux (/dev/kup/<name>) or FreeBSD
 * (/dev/kup/<name>).  KUP_BACKEND=sim|linux|freebsd forces one; by default
 * a name containing '/' is a path, otherwise the kernel device is tried
 * first and the kupsim socket second.  The turn protocol itself is the same
 * code for all of them: only attach, wake-up and detach differ.
 *
 * Errors: functions that fail return NULL or -1 and set kernproxy_errno
 * (thread-local) and the handle's error (kernproxy_error) to a KUP_E_* /
 * EKU_* code from kup_abi.h; EKU_SYS means errno says more.
 *
 * Threads: a channel handle is used by one thread at a time; different
 * channels may be used by different threads at once.  A device handle may
 * be shared by threads (kernproxy_error() on it then reports some thread's
 * last error: prefer the thread-local kernproxy_errno).
 */
#ifndef KUP_H
#define KUP_H

#include <stddef.h>
#include <stdint.h>
#include "kup_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The seed's names for the error codes. */
#define EKU_SHUTDOWN  KUP_E_SHUTDOWN
#define EKU_NOTREADY  KUP_E_NOTREADY
#define EKU_NOTTURN   KUP_E_NOTTURN
#define EKU_TOOBIG    KUP_E_TOOBIG
#define EKU_TIMEDOUT  KUP_E_TIMEDOUT
#define EKU_PROTO     KUP_E_PROTO
#define EKU_VERSION   KUP_E_VERSION
#define EKU_BUSY      KUP_E_BUSY
#define EKU_NOENT     KUP_E_NOENT
#define EKU_PEER      KUP_E_PEER
#define EKU_INVAL     KUP_E_INVAL
#define EKU_SYS       KUP_E_SYS
#define EKU_RELEASING KUP_E_RELEASING

/* flags for kernproxy_receive / kernproxy_send */
#define KP_NB         0x1   /* non-blocking: EKU_NOTREADY instead of waiting */
#define KP_SPIN_NEXT  0x2   /* kernproxy_send: a receive follows at once (in
                             * poll mode the kernel's wake-up is asked for
                             * only if that receive's spin misses) */

#define KP_CHAN_ANY   ((size_t)-1)  /* kernproxy_channel: first free channel */

extern __thread int kernproxy_errno;

/* Device information (kernproxy_info). */
struct kernproxy_info {
	char     name[KUP_NAME_MAX];
	uint32_t abi_version;
	uint32_t page_size;
	uint32_t chan_count;     /* channels on the device */
	uint32_t announced;      /* channels announced (attachable) */
	uint32_t pages;          /* pages per direction */
	uint32_t max_msg;        /* bytes per message (= pages * page_size) */
	uint64_t notify_gen;     /* bumped by every kupdev_notify/announce */
	uint32_t shutting_down;  /* 1 once kupdev_unload has begun */
	uint8_t  attached[KUP_MAX_CHANNELS]; /* KUP_INFO_ATTACHED: a user side
	                          * holds it; KUP_INFO_MODULE_HOLDS: its module
	                          * holds it locked (kup_ioctl.h) */
};

/* A received message. */
struct kernproxy_msg {
	const void *data;   /* in the kernel->user area; valid until the next
	                     * send/pass/close on this channel */
	size_t      len;
	uint32_t    kind;   /* KUP_KIND_DATA, _PASS or _CLOSE */
	uint64_t    seq;
};

/* Open a KUP device by name.  NULL on failure (EKU_NOENT: no such device). */
void *kernproxy_open(char const *name);

/* Attach channel chan_id (or KP_CHAN_ANY) of the device, of size pages per
 * direction (0: whatever the device has; otherwise must match, EKU_INVAL).
 * EKU_NOTREADY: not yet announced; EKU_BUSY: attached elsewhere;
 * EKU_RELEASING: its last user left and the kernel side has not let go of
 * it yet (the host waited up to ~0.5 s; retry later); EKU_VERSION: ABI
 * mismatch; EKU_SHUTDOWN: device going away. */
void *kernproxy_channel(void *handle, size_t chan_id, size_t size);

/* The seed's receive: returns the payload pointer or NULL (kernproxy_errno
 * says why: EKU_NOTREADY for a non-blocking call with nothing yet). */
void *kernproxy_receive(void *chan, int flags);

/* Receive with length/kind/seq and a timeout in ms (-1: forever, 0: do not
 * wait, > 0: at most that long, then EKU_TIMEDOUT); any other negative
 * value is EKU_INVAL, nothing done.  Returns 0 or -1.  Receiving while
 * this side already holds the turn and has consumed the last message is
 * EKU_NOTTURN (it would wait forever: send or pass first).  A wake-up the
 * last send or pass could not make is made first; when it fails again,
 * the receive fails with its error, the message still the kernel's
 * (kernproxy_send, "Delivery").  A message the kernel handed over before
 * its device began shutting down is still returned (whatever
 * kernproxy_unread() says is there can be read); the receive after it is
 * EKU_SHUTDOWN. */
int kernproxy_receive_msg(void *chan, struct kernproxy_msg *msg, int timeout_ms);

/* Like kernproxy_receive_msg(chan, msg, 0), but first spins for up to the
 * channel's adaptive spin budget (the one a blocking receive spins before
 * it sleeps: at most a few tens of microseconds) for the turn to come
 * back; never sleeps.  EKU_NOTREADY when it has not come back by then
 * (call again, or wait on kernproxy_fd).  For a reply expected within
 * microseconds: kernproxy_send() then kernproxy_receive_spin() answers it
 * without a wake-up when the kernel is fast, and costs one bounded spin
 * when it is not. */
int kernproxy_receive_spin(void *chan, struct kernproxy_msg *msg);

/* Send len bytes and hand the turn to the kernel.  Requires holding the
 * turn: EKU_NOTTURN otherwise (never waits: waiting could only drop the
 * message the kernel is writing).  EKU_TOOBIG, nothing sent, when
 * len > max_msg.  flags: 0, or KP_SPIN_NEXT when the caller calls
 * kernproxy_receive_spin() (or another receive) right after: in poll mode
 * the kernel then does not write the fd for a reply that the spin catches
 * (no wake-up to pay, none left late on the fd); a receive that does not
 * catch it asks for the wake-up before it returns or sleeps.  Do not wait
 * on kernproxy_fd() between such a send and that receive.
 *
 * Delivery: 0 means the message is the kernel's, once.  A send (or pass)
 * fails only BEFORE the hand-over (the errors above, EKU_PEER,
 * EKU_SHUTDOWN, EKU_PROTO), and then nothing was sent; once the turn is
 * handed over it returns 0 even when the system call that wakes a
 * sleeping kernel side fails -- the message is in the kernel's area and
 * its turn, and sending it again would either duplicate it or meet
 * EKU_NOTTURN.  That wake-up is owed instead: the channel's next receive
 * makes it again before it waits (a wake-up interrupted by a signal is
 * made again at once, in the send), and if it fails again that receive
 * fails with its error (EKU_SYS and errno, or EKU_SHUTDOWN...) instead of
 * waiting for an answer that could not come; the message is still the
 * kernel's (do not send it again: receive again, which tries the wake-up
 * again, or close).  In poll mode the channel's fd is made readable for
 * that receive.  A kernel side that waits with a timeout finds the
 * message at its next look without any wake-up. */
int kernproxy_send(void *chan, const void *data, size_t len, int flags);

/* Hand the turn to the kernel without data (PASS).  Fails only before the
 * hand-over, like kernproxy_send (its "Delivery"). */
int kernproxy_pass(void *chan);

/* A fd that polls readable when the turn may have come to this side or the
 * device is shutting down.  Level of truth is always the control page:
 * after it polls readable call kernproxy_receive_msg(chan, &m, 0). */
int kernproxy_fd(void *chan);

/* Who holds the turn right now: 1 this side, 0 the kernel, -1 error. */
int kernproxy_my_turn(void *chan);

/* The kind of the kernel's message this side holds the turn with and has
 * not received yet (KUP_KIND_DATA, _PASS, _CLOSE), 0 when there is none
 * (the kernel holds the turn, or the message was received), -1 error.
 * Never waits. */
int kernproxy_unread(void *chan);

/* What the channel's next operation would fail with, read from its page
 * without waiting or changing anything: 0 (KUP_E_OK) while it is usable,
 * else EKU_SHUTDOWN, EKU_PROTO or EKU_PEER (the kernel side ended this
 * user's session: kupdev_disconnect, or it gave up on the user).  For a
 * gateway holding idle channels: the kernel's end of a session wakes only
 * a user that waits, and one that holds a channel without using it learns
 * of it here.  -1 (EKU_INVAL) for a bad handle. */
int kernproxy_state(void *chan);

/* A send or pass while the kernel's last message is unread drops that
 * message (the caller chose to answer without reading it).  With on != 0,
 * one that would drop a DATA message fails with EKU_NOTTURN instead and
 * the message stays for a receive (an unread PASS is still dropped: it
 * carries nothing).  For a gateway that must lose no message of the
 * kernel's on a client's behalf.  0, or -1 (EKU_INVAL). */
int kernproxy_keep_unread(void *chan, int on);

/* Channel facts. */
size_t   kernproxy_max_msg(void *chan);
uint32_t kernproxy_chan_id(void *chan);

/* Device facts (handle from kernproxy_open). */
int kernproxy_info(void *handle, struct kernproxy_info *info);

/* A fd on the device that polls readable on device events (announce /
 * shutdown); kernproxy_info() tells what changed. */
int kernproxy_dev_fd(void *handle);

/* Close a channel (sends CLOSE if holding the turn) or a device handle.
 * The handle's memory is freed: like free(3), closing it a second time or
 * passing it to any kernproxy_* call afterwards is undefined behaviour
 * (not an error code) -- forget the pointer once closed. */
void kernproxy_close(void *handle);

/* Last error on a handle (channel or device). */
int kernproxy_error(void *handle);

/* Human-readable name of a KUP_E_* code. */
const char *kernproxy_strerror(int code);

#ifdef __cplusplus
}
#endif
#endif /* KUP_H */
