/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kupdev.h -- the KUP kernel API, for kernel modules that talk to user space.
 *
 * This is the seed's API (kupdev_create, _wait_channel, _notify, _send,
 * _receive, _unlock_channel, _pass, _unload) with the same meaning, plus
 * what the seed lacked: the received length and kind, bounded waits, and
 * error returns instead of assertions.  The same source of a module builds
 * for every host: the Linux kernel, the FreeBSD kernel and kupsim.
 *
 * Conventions:
 *   - functions returning int return 0 (or a channel id) on success and a
 *     NEGATIVE errno value on failure (-EINVAL, -ETIMEDOUT, -ESHUTDOWN,
 *     -EPIPE, -EPROTO, -EMSGSIZE, -EBUSY, -EAGAIN, -ENOENT, -EINTR,
 *     -EDEADLK, -ECANCELED: kupdev_wake);
 *   - timeouts are in milliseconds; KUPDEV_FOREVER (-1) waits without
 *     bound (still interruptible by kupdev_unload and by peer departure);
 *     any other negative timeout is refused with -EINVAL (and a log line),
 *     never taken as "forever";
 *   - a channel is used by one kernel thread at a time per direction of
 *     the turn.  A thread is "in" a channel while it waits in its receive
 *     (or in a kupdev_receive_any whose set holds the channel), and from
 *     a successful receive until its kupdev_unlock_channel() (it holds
 *     the message; only that thread may unlock).  No call waits for
 *     another thread's use of a channel; it gets its answer at once:
 *       - while a thread waits in its receive, another thread's send or
 *         pass fails with -EAGAIN (the turn is the user's, or on its way
 *         back to that receive: the answer to any send while the user
 *         holds the turn) and its receive with -EBUSY;
 *       - while a thread holds a message, every other thread's receive,
 *         send or pass on that channel fails with -EBUSY;
 *       - the holder's own receive, send or pass on the channel before it
 *         unlocks fails with -EDEADLK (and a log line, each time, within
 *         the budget below);
 *     the user's departure (-EPIPE) and the shutdown (-ESHUTDOWN) are
 *     reported before -EAGAIN and -EBUSY.  Relaying between channels: a
 *     module thread may hold messages of several channels, and sending
 *     on channel B what it still holds from channel A (zero copy:
 *     kupdev_send(sc, m.data, m.len, B) before unlocking A) is allowed --
 *     but it fails with -EBUSY (or -EAGAIN) whenever another thread is in
 *     B, e.g. B's worker holding B's message while forwarding it to A:
 *     two such relays both get -EBUSY, never wait for each other.  Copy
 *     the payload, unlock, then send (retrying on -EAGAIN / -EBUSY), or
 *     forward only from a thread that holds nothing;
 *   - misuse of the API is logged so that the module's author can see
 *     which call was wrong: the line names the device, the channel, the
 *     call and the offending value or limit ("kup: <dev>: chan 0:
 *     kupdev_send: 5000 bytes do not fit the channel's 4096 ...").  Logged:
 *     a channel id out of range, a NULL msg or data pointer, -EMSGSIZE, a
 *     timeout below KUPDEV_FOREVER, an announce count out of range,
 *     -EDEADLK, an unlock without a receive, a call on a device that is not
 *     live (below), and an unread user message dropped by a send or pass
 *     (below).  Not logged: what happens in normal operation (-EPIPE,
 *     -EAGAIN, -EBUSY, -ETIMEDOUT, -ESHUTDOWN; -EPROTO is logged as the USER's
 *     error, rate-limited).  The volume is bounded: at most 16 such lines
 *     per device in 10 s, then one line saying further misuse is not
 *     logged for the rest of those 10 s; the first line after that counts
 *     the lines left out (calls naming no live device share one budget of
 *     16 per host, for its life).  -EAGAIN from a send while the user
 *     holds the turn is not logged: a module that answers twice without a
 *     receive in between sees it only in that return value;
 *   - a device pointer is live from kupdev_create until kupdev_unload.
 *     kupdev_unload, kupdev_shutdown, kupdev_announce/_notify and
 *     kupdev_wait_channel(_timeout) check that sc is a live device (by
 *     comparing pointers with the registry, never reading through a stale
 *     one) and refuse a stale or NULL one with -EINVAL and a log line
 *     ("kupdev_unload: not a live device (unloaded twice?)").  That is a
 *     diagnostic, not a licence: a device created after the unload may
 *     reuse the address and pass the check, and the per-message calls
 *     (send, receive, pass, unlock, the informational ones) do not check
 *     at all (it would put a global lock on every message).  Never use sc
 *     after kupdev_unload.
 *
 * Turn semantics (see kup_abi.h): the kernel side owns a fresh channel.
 * kupdev_send / kupdev_pass hand the turn to user space.  kupdev_receive
 * waits until user space hands it back and returns the user's message,
 * which the receiving thread holds until kupdev_unlock_channel.  Sending
 * while user space owns the turn is refused with -EAGAIN: it would
 * overwrite nothing, but it would silently drop the message user space is
 * writing.
 *
 * !! The payload is NOT stable while you hold it.  m.data points into the
 * !! user->kernel area, which the user has mapped writable: an honest user
 * !! (libkup) does not write it while the kernel holds the turn, but a
 * !! hostile or buggy one can, at any moment -- also between your check of
 * !! a byte and your use of it.  The core reads the descriptor (length,
 * !! kind, sequence) once and checks it; the payload bytes it cannot
 * !! protect.  Copy what you need out of m.data first (at most m.len
 * !! bytes), then validate and use the copy; never validate in place and
 * !! read again (a length, an index, a pointer read twice from the shared
 * !! area is a time-of-check-to-time-of-use hole in your module).
 *
 * !! A send or pass while an unread user message is waiting DROPS that
 * !! message.  The turn is one token: once user space has handed it back
 * !! with a message, the kernel's next send/pass takes the turn (the
 * !! message is validated and discarded) without the module having seen
 * !! it.  E.g. the module sends "first", the user answers "request", the
 * !! module sends "second" without a receive in between: "request" is
 * !! lost.  This is the seed's ping-pong semantics (a pass is how either
 * !! side skips its turn), kept as is; the core logs a line for each user
 * !! DATA message dropped this way, within the misuse budget (a dropped
 * !! PASS or CLOSE carries no data and is not logged).  To hear every
 * !! message, receive before each send after the first.
 */
#ifndef KUPDEV_H
#define KUPDEV_H

#include "kup_abi.h"

#if !defined(_KERNEL) && !defined(__KERNEL__)
#include <stddef.h>
#endif

#define KUPDEV_FOREVER   (-1)

struct kupdev_softc;

/* A received message, filled by kupdev_receive_msg(). */
struct kupdev_msg {
	const void *data;   /* payload in the channel's user->kernel area:
	                     * user-writable, copy before validating (above) */
	size_t      len;    /* payload bytes, already bounds-checked */
	uint32_t    kind;   /* KUP_KIND_DATA, KUP_KIND_PASS or KUP_KIND_CLOSE */
	uint64_t    seq;    /* sequence number, already checked */
};

/* Create /dev/<name> (or the host's equivalent) with chan_cnt channels of
 * size pages per direction.  Channels are not attachable by user space
 * until announced by kupdev_notify() / kupdev_announce(): an attach before
 * that fails with EKU_NOTREADY.  Returns NULL on failure (bad name,
 * size or count out of range, name taken, no memory). */
struct kupdev_softc *kupdev_create(const char *name, size_t size, size_t chan_cnt);

/* Sessions.  Calls on a channel are valid for the attachment the module
 * was last told about by kupdev_wait_channel().  A module thread that
 * served the previous user may still be between two calls when the next
 * user arrives; its next call gets -EPIPE instead of reaching the new user,
 * and the call after that -- by that thread or any other -- starts the new
 * session (fresh sequences, the kernel holds the turn).
 *
 * -EPIPE ends a session, not the channel.  After it, the module's
 * session on the channel is over; the channel itself is attachable again,
 * and may already be attached: the next user waits for the module's first
 * call of its session (the kernel holds a fresh channel's turn: typically a
 * kupdev_pass or a greeting kupdev_send), and its first receive times out
 * if nobody makes it.  So whoever serves the channel must make that call
 * for every attachment kupdev_wait_channel reports -- the thread that got
 * the -EPIPE (at once, if it knows of a new attachment: a second -EPIPE
 * then only means that user has come and gone too) or the one the
 * module's acceptor gives the channel to -- and a thread that got -EPIPE
 * must not keep the channel to itself and stop.  Likewise stop serving a
 * channel only once a call said the session is over (-EPIPE, -EPROTO, a
 * CLOSE message, -ESHUTDOWN): a session dropped silently costs the next
 * session's first call an -EPIPE (the core cannot tell a straggler from
 * the next session's thread: call again).
 *
 * A module cannot always end a session that way: a call that fails with
 * anything else (a reply that does not fit, -EMSGSIZE; a bug's -EDEADLK or
 * -EINVAL) leaves a module that gives up on its user with a session the
 * core still counts as in progress.  So the first call of a session -- by
 * whichever thread, however long after -- may get -EPIPE for an earlier
 * session, not for this one; a module that takes it for "no user" leaves
 * the user it was told about waiting for its first message for ever.  The
 * rule for the call that starts a session (typically its first
 * kupdev_pass): on -EPIPE, call once more.  That -EPIPE has ended the
 * earlier session, so the second call starts the session of the
 * attachment the module was last told about, or answers -EPIPE again:
 * there is no user now.  One retry is enough (every -EPIPE ends the
 * session it answers for), and costs nothing when there was no earlier
 * session to end.
 *
 * The pitfall of one acceptor thread plus a worker per channel: a worker
 * started for attachment A whose user left before the worker's first call
 * serves the NEXT attachment B with that call (nothing of A's session
 * happened, so there is no straggler to end).  When the acceptor then
 * hears of B from kupdev_wait_channel, the worker it would "replace" is
 * serving B, for as long as B's user likes: an acceptor that joins the old
 * worker before starting a new one blocks there (uninterruptibly, on
 * Linux), and every other channel's user waits for its first PASS
 * meanwhile.  Never wait in the acceptor for a worker that may be serving.
 * kmod/examples/echo/echo.c shows one way: per channel, "running" and
 * "again" under a mutex; the acceptor flags "again" when the worker runs,
 * and a worker whose session is over serves again (its first call then
 * may find no user, -EPIPE: not an error -- once it has called again, as
 * above: a first -EPIPE may be its own given-up session's) or marks itself
 * not running and exits; the acceptor joins only workers that are no
 * longer running.
 *
 * Wait until user space attaches a channel that the module has not yet
 * been told about; returns its id, or a negative errno (-ESHUTDOWN once
 * kupdev_unload has begun, -ETIMEDOUT; -EINVAL, logged, for a timeout
 * below KUPDEV_FOREVER or a device that is not live). */
int kupdev_wait_channel(struct kupdev_softc *sc);
int kupdev_wait_channel_timeout(struct kupdev_softc *sc, int timeout_ms);

/* Tell user space that new channels exist: announces every channel of the
 * device and wakes watchers.  kupdev_announce() announces channels
 * [0, count) only; count may only grow. */
void kupdev_notify(struct kupdev_softc *sc);
int  kupdev_announce(struct kupdev_softc *sc, size_t count);

/* Copy len bytes into the kernel->user area and hand the turn to user
 * space.  Requires the kernel to hold the turn (-EAGAIN otherwise, also
 * while another thread waits in its receive on the channel), no other
 * thread holding a message it received on the channel (-EBUSY; see
 * "Conventions"), and len <= the data area (-EMSGSIZE, nothing sent,
 * logged).  -EPIPE when the module has no session with a user on the
 * channel: the user left or died; or no user is attached; or a user is
 * attached that kupdev_wait_channel has not reported yet (the attachment
 * is pending: take it with kupdev_wait_channel first -- a fresh user is
 * never reached before that); or this call ended a straggler's session
 * ("Sessions": call again).  -ESHUTDOWN during unload, -EINVAL (logged)
 * for a channel out of range or data == NULL with len != 0.
 * DROPS an unread user message (see "Turn semantics" above; logged). */
int kupdev_send(struct kupdev_softc *sc, const void *data, size_t len, int chan_id);

/* The seed's receive: wait (without bound) for user space to hand back the
 * turn and return a pointer to its payload, channel locked; NULL on error
 * (shutdown, peer gone, protocol error).  Use kupdev_receive_msg() for the
 * length, kind and a timeout. */
void *kupdev_receive(struct kupdev_softc *sc, int chan_id);

/* Wait up to timeout_ms (>= 0, or KUPDEV_FOREVER; anything else: -EINVAL,
 * logged) for user space's next message.  On success the thread holds the
 * message until kupdev_unlock_channel().  timeout_ms 0 is a poll: one
 * look, -ETIMEDOUT at once if the user has not answered (no spin, no
 * sleep: a module may poll many channels in a loop).  Any other timeout
 * first spins for an adaptive budget of a few microseconds (at most
 * 10 us; it learns how fast this channel's user answers) and then sleeps:
 * a user that answers within the spin costs no wake-up.
 * Nothing the user handed over is lost to its departure: a message it
 * handed over before it left (its last request, or the CLOSE libkup sends
 * when it leaves holding the turn) is still returned by this receive, and
 * the call after it gets -EPIPE -- unless a call of the module saw the
 * departure first (a send or pass then returned -EPIPE and ended the
 * session), or the next user attached the channel before the module
 * looked (its page is reset for that user: -EPIPE).
 * Errors: -ETIMEDOUT,
 * -EPIPE (no session with a user: as for kupdev_send), -EPROTO
 * (bad length, kind or sequence in the control area: nothing was read
 * from the data area), -ESHUTDOWN, -EAGAIN (the kernel already holds the
 * turn and has consumed the last message: send or pass first), -EBUSY
 * (another thread waits in its receive on the channel, or holds a message
 * it received there: "Conventions").  The user's
 * departure and the device's shutdown are reported before -EAGAIN, so a
 * module holding the turn for long (computing a reply, waiting on
 * something else) learns that its user left with a 0 ms receive: -EPIPE
 * or -ESHUTDOWN, else -EAGAIN (echo.c: echo_hold, echo_wait_ms). */
int kupdev_receive_msg(struct kupdev_softc *sc, int chan_id,
    struct kupdev_msg *msg, int timeout_ms);

/* One thread, several channels: wait up to timeout_ms (as for
 * kupdev_receive_msg) for the first of the n channels chans[0..n) that
 * has an answer, and give it.  Returns that channel's id (>= 0, also in
 * *chan_out) when it is a message: the thread holds it, as after
 * kupdev_receive_msg, until kupdev_unlock_channel(sc, id).  Otherwise a
 * negative errno, and *chan_out says whose:
 *   - a channel's own answer, *chan_out = that channel: exactly what a
 *     0 ms kupdev_receive_msg on it would have answered -- -EPIPE (its
 *     session is over: its user left, or none), -EPROTO, -EAGAIN (the
 *     kernel holds its turn: send or pass first), -EBUSY (another thread
 *     is in it), -EDEADLK (this thread holds its message; logged),
 *     -ECANCELED (kupdev_wake_channel on it).  The set is the module's to
 *     keep: a channel whose session is over answers -EPIPE again at once
 *     in every call, so take it out until kupdev_wait_channel reports it
 *     again, and put a channel in only once the user holds its turn
 *     (after the session's first pass or a reply);
 *   - *chan_out = -1: -ETIMEDOUT, -ESHUTDOWN, -ECANCELED from
 *     kupdev_wake_any (below), -EINTR (the host's sleep was interrupted),
 *     -EINVAL (logged, nothing looked at: msg or chan_out NULL, chans
 *     NULL with n > 0, n outside 0..kupdev_channel_count(sc), a channel
 *     id out of range or twice, a timeout below KUPDEV_FOREVER).
 * n == 0 (chans may be NULL) waits for kupdev_wake_any alone (or the
 * shutdown, or the timeout): what a serving thread whose set is empty
 * does until its acceptor gives it a channel.
 * Order: the shutdown first, then a kupdev_wake_any, then the channels
 * in round-robin order -- starting after the channel of the set that was
 * answered for last, so that with an unchanged set a channel that has an
 * answer is given one within n calls, however busy the others are.  The
 * first channel with an answer ends the look; the others' answers wait
 * for the next call (nothing is lost: a message stays in its page).
 * While the thread waits it is "in" every channel of the set, as a
 * receive waiting on one ("Conventions"): another thread's send or pass
 * on one of them fails with -EAGAIN, its receive (or receive_any) with
 * -EBUSY.  Waiting costs what a receive's wait costs, once for all: a
 * short spin, then the kernel_waiting flag of kup_abi.h set on every
 * channel of the set and one sleep that a hand-over on ANY of them ends
 * -- while it sleeps, each of its users pays the wake-up syscall, as
 * with a sleeping receive; none loses its hand-over.  That wake-up, like
 * a detach or a kupdev_wake_channel of the channel, reaches only the
 * thread whose set holds the channel: threads serving disjoint sets of
 * one device sleep undisturbed by each other's traffic (kupdev_wake_any
 * and the shutdown reach them all).  timeout_ms 0 is a
 * poll of every channel (no spin, no sleep).  A message the user handed
 * over before it left is returned, as by kupdev_receive_msg. */
int kupdev_receive_any(struct kupdev_softc *sc, const int *chans, int n,
    struct kupdev_msg *msg, int timeout_ms, int *chan_out);

/* Let go of the message a successful receive took (its payload must not
 * be used afterwards: the user writes the area next).  A channel out of
 * range, or a thread that does not hold the channel, is a logged no-op. */
void kupdev_unlock_channel(struct kupdev_softc *sc, int chan_id);

/* Hand the turn to user space without data (the seed's dummy token).
 * Same errors as kupdev_send.  DROPS an unread user message (see "Turn
 * semantics" above; a dropped DATA message is logged). */
int kupdev_pass(struct kupdev_softc *sc, int chan_id);

/* End the session of the user attached to chan_id, from the kernel side
 * (the module is done with it, or will not serve it: an idle user, a
 * policy, a user that asked for something it must not have).  The user's
 * next operation on the channel, and one it is blocked in, fails with
 * EKU_PEER (libkup; kupd: PeerGone, gRPC ABORTED) -- the channel's page
 * says KUP_STATE_PEER_GONE, as when the user broke the protocol, and the
 * user is woken (Linux: its fd polls POLLERR).  For the module the session
 * is over at once, as after -EPIPE: every call of it on the channel gets
 * -EPIPE (a thread waiting in its receive there wakes with it; a message
 * the user handed over and the module has not received is dropped) until
 * kupdev_wait_channel reports the next attachment, whose session starts
 * as usual (the kernel holds a fresh channel's turn).  The channel is
 * attachable again once the ended user lets go of it -- libkup's close,
 * which kupd makes at once, or the user's death.  Why not at once: on
 * Linux and FreeBSD a user's mapping is the channel's own memory, and a
 * user that keeps it after being disconnected must not see (or write) the
 * next user's messages; a user that keeps a disconnected channel keeps
 * only that, with nothing to do on it but close.
 * Returns 0, -EPIPE (no user session to end: none attached, an attachment
 * kupdev_wait_channel has not reported yet, or already disconnected),
 * -ESHUTDOWN, -EINVAL (logged: a channel out of range).  Any thread may
 * call it, also one that holds the channel from its receive (it still
 * unlocks afterwards) or another channel's. */
int kupdev_disconnect(struct kupdev_softc *sc, int chan_id);

/* Wake a module thread out of its wait, so that it can stop without the
 * device being unloaded: the call it waits in returns -ECANCELED.
 * (kupdev_receive_any: kupdev_wake_channel of a channel of its set, or
 * kupdev_wake_any below.)
 * -ECANCELED and not -EINTR, because -EINTR is what a host's sleep answers
 * when it is interrupted otherwise (a signal sent to a kernel thread that
 * allows them): a module can tell "I was asked to stop" from that.
 *   kupdev_wake_channel: the thread waiting in kupdev_receive_msg (or
 *     kupdev_receive) on chan_id returns -ECANCELED; the channel is not
 *     held, the session goes on (a message the user handed over stays for
 *     the next receive).
 *   kupdev_wake: a thread waiting in kupdev_wait_channel(_timeout) on sc
 *     returns -ECANCELED (before taking an attachment: it stays for the
 *     next wait).
 * Each call is answered by exactly one such call: the one waiting now, or,
 * when none is, the next one (which returns -ECANCELED at once, also a 0 ms
 * poll) -- so a module that sets its own "stop" flag and then calls this
 * cannot lose the wake-up to a thread that checked the flag just before
 * it began to wait.  A pending wake belongs to the channel (or device), not
 * to a user's session: one left unanswered when a session ends is the
 * first receive's of the next session on that channel.  N calls answer N
 * waits (on a device, one each for N
 * acceptor threads).  Returns 0, -ESHUTDOWN (the device is shutting down:
 * every wait answers -ESHUTDOWN already; nothing is kept), -EINVAL
 * (logged: a channel out of range; for kupdev_wake a device that is not
 * live).  Never waits.  The shutdown is reported before -ECANCELED; for a
 * receive, -EBUSY / -EAGAIN (another thread is in the channel: the wake
 * is that thread's) before it, -EPIPE and everything else after it. */
int kupdev_wake_channel(struct kupdev_softc *sc, int chan_id);
int kupdev_wake(struct kupdev_softc *sc);
/*   kupdev_wake_any: a thread waiting in kupdev_receive_any on sc returns
 *     -ECANCELED with *chan_out = -1 (before any channel's answer), with
 *     the same rules: one call answers one such wait, the one waiting now
 *     or else the next (also a 0 ms one); not kupdev_wait_channel's (and
 *     kupdev_wake is not receive_any's).  For a thread that must learn
 *     that its set changed (the acceptor has a new channel for it: echo.c,
 *     "any" mode) or must stop.  With several receive_any threads on one
 *     device it reaches whichever waits (or calls) first; to reach a
 *     given one, kupdev_wake_channel a channel of its set: its
 *     receive_any returns -ECANCELED with *chan_out = that channel.
 *   Returns 0, -ESHUTDOWN, -EINVAL (logged: not a live device). */
int kupdev_wake_any(struct kupdev_softc *sc);

/* Shut the device down: mark every channel KUP_STATE_SHUTDOWN, wake every
 * waiter on both sides (user space sees EKU_SHUTDOWN, kernel callers
 * -ESHUTDOWN), remove the device node and free it once the last user
 * mapping is gone.  Returns 0, or -EBUSY where the host cannot force
 * users off (never leaves the device half torn down).  A module thread
 * still asleep in kupdev_wait_channel(_timeout) or in a receive's wait
 * when this is called keeps the device alive until it has returned
 * (-ESHUTDOWN): it does not wake up in freed memory.  That is a safety
 * net, not the way to unload (kup_module.h: shutdown, join, unload): sc
 * must not be used after kupdev_unload returns -- not by any thread, and
 * not for the call that follows a wait (it may already be freed).  A
 * second kupdev_unload of the same pointer is refused with -EINVAL and a
 * log line (see "live" above). */
int kupdev_unload(struct kupdev_softc *sc);

/* First half of kupdev_unload, for modules with threads: mark every channel
 * KUP_STATE_SHUTDOWN and wake every waiter on both sides; from now on every
 * kupdev_* call on sc fails with -ESHUTDOWN, but sc stays valid until
 * kupdev_unload().  Join your threads between the two calls.  Idempotent
 * until kupdev_unload (-EINVAL after it); kupdev_unload() calls it if the
 * module did not. */
int kupdev_shutdown(struct kupdev_softc *sc);

/* Informational. */
size_t kupdev_channel_count(const struct kupdev_softc *sc);
size_t kupdev_data_size(const struct kupdev_softc *sc);
int    kupdev_channel_attached(struct kupdev_softc *sc, int chan_id);

#endif /* KUPDEV_H */
