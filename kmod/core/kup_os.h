/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_os.h -- the contract between the OS-neutral core (kup_core.c) and a
 * kernel host (kmod/linux, kmod/freebsd, kmod/kupsim).
 *
 * Why this split (the netmap pattern): the turn protocol, every bounds
 * check and every state transition live once, in kup_core.c, and are
 * tested in user space under sanitizers through kupsim.  A host only
 * supplies what genuinely differs between kernels: sleeping locks,
 * sleeping until a condition holds, waking the user side, allocating
 * shareable zeroed memory, and publishing a device node.  If a host file
 * grows logic about turns, lengths or sequence numbers, it belongs here.
 *
 * Each host provides a header "kup_host.h" (found on its include path)
 * that must define, before this file's prototypes are used:
 *
 *   types
 *     kup_lock_t            a SLEEPABLE mutex (held for short sections,
 *                           which may copy a whole message or fault in
 *                           pages, never across module code or a wait);
 *                           kup_lock_init gives it its role's lock class
 *                           (below, "locks")
 *     struct kup_os_dev     host state embedded in every device
 *     struct kup_os_chan    host state embedded in every channel
 *     struct kup_os_any     the wake-up object of one kupdev_receive_any
 *                           sleeper (kup_os_any_sleep below)
 *   memory ordering on shared-memory words (uint32_t / uint64_t *)
 *     KUP_LOAD_ACQ32(p)     load-acquire
 *     KUP_STORE_REL32(p,v)  store-release
 *     KUP_READ_ONCE32(p)    single, untorn load (no acquire)
 *     KUP_READ_ONCE64(p)
 *     KUP_WRITE_ONCE32(p,v) single, untorn store
 *     KUP_WRITE_ONCE64(p,v)
 *     KUP_FENCE()           full (seq_cst) fence
 *     KUP_CPU_RELAX()       spin-loop hint
 *     KUP_CURTHREAD()       the calling thread's identity, a non-NULL
 *                           pointer (or a number cast to one) that no
 *                           other thread shares: lets the core refuse,
 *                           instead of deadlocking, a module thread that
 *                           calls back into a channel it still holds from
 *                           its own receive, and lets only that thread
 *                           unlock it.  Not reused by a thread created
 *                           after this one exits, as long as ch->holder
 *                           keeps it: a module thread that exits holding
 *                           a channel (a module bug) leaves its identity
 *                           there, and a new thread that got it would
 *                           have its receive refused as re-entry and its
 *                           unlock taken for the dead holder's.  kupsim
 *                           and FreeBSD hand every thread a serial number
 *                           that is never reused (thread-local / osd(9));
 *                           a host whose identity is the thread's memory
 *                           (Linux: current) pins it for as long as the
 *                           core keeps it (KUP_CURTHREAD_PIN below)
 *     KUP_LOCK_TRY(l)       take kup_lock_t *l only if that needs no
 *                           wait: non-zero when taken (pthread trylock,
 *                           mutex_trylock, sx_try_xlock).  An attach
 *                           never waits for a channel a module thread is
 *                           in (kup_core_attach says why), and it lets
 *                           the core offer kup_core_chan_exclusive_try
 *   optionally
 *     KUP_CURTHREAD_PIN()   keep the calling thread's identity from being
 *     KUP_THREAD_UNPIN(id)  reused until the matching UNPIN of that
 *                           identity (a KUP_CURTHREAD() value; Linux:
 *                           get_task_struct of current / put_task_struct
 *                           of id); the core pins when it stores the
 *                           identity in ch->holder and unpins when the
 *                           holder unlocks.  A holder that exits holding
 *                           the channel stays pinned (one task_struct
 *                           kept, with the channel the module lost:
 *                           kupdev_unload names it) until the channel is
 *                           freed with its device, which unpins it from
 *                           whichever thread drops the last reference
 *     KUP_NOW_NS()          cheap monotonic clock, uint64_t nanoseconds:
 *                           when defined, kernel-side waits spin for an
 *                           adaptive time budget before sleeping; when
 *                           not, for a fixed number of KUP_CPU_RELAX()
 *     KUP_SPIN_YIELD()      let another runnable thread have this CPU
 *                           (kupsim: sched_yield(); a kernel: its
 *                           cond_resched()/maybe_yield()); called from
 *                           inside that spin (no core lock held) at
 *                           most every KUP_SPIN_YIELD_NS, so that
 *                           a spinning module thread does not keep the
 *                           user it waits for off a shared CPU
 *     KUP_ATTACH_LETGO_MS   how long, in ms, an attach waits for the module
 *                           to let go of a channel whose last user left
 *                           (default 500; kupsim: 0, its server thread
 *                           parks the request itself and must never wait)
 *     KUP_CHAN_MEM_FRESH    define when every attachment gets new, zeroed
 *                           channel memory (kupsim: a fresh memfd); the
 *                           core then does not clear the data areas at
 *                           attach (which would fault in every page)
 *     KUP_CHAN_UNLOCKED(ch) called by the core right after a kernel-side
 *                           call of ch (a module thread's receive, send,
 *                           pass or kupdev_unlock_channel) lets go of
 *                           ch->lock, with no core lock held; must not
 *                           sleep.  For a host that waits for a module
 *                           thread to leave a channel without blocking
 *                           (kupsim's server retries a channel renewal
 *                           kup_core_chan_exclusive_try found busy): a
 *                           cheap hint, not a guarantee (no fence orders
 *                           it with the try)
 *   plus memcpy, memset, strlen/strnlen, size_t, uint32_t/uint64_t and the
 *   errno names EINVAL EAGAIN EBUSY ENOENT ENOMEM EPIPE EPROTO EMSGSIZE
 *   ETIMEDOUT ESHUTDOWN EINTR EEXIST EPROTONOSUPPORT EDEADLK EINPROGRESS
 *   ECANCELED.
 */
#ifndef KUP_OS_H
#define KUP_OS_H

#include "kup_host.h"
#include "kupdev.h"
#include "kup_ioctl.h"   /* struct kup_ioc_info (data only here) */

struct kup_chan;

/* ---- locks (sleepable) ----------------------------------------------
 * The core's locks play three roles, and the host must give each role a
 * lock class of its own in the kernel's lock checker (Linux lockdep: one
 * lock_class_key per role; FreeBSD WITNESS: one name per role): the core
 * nests them, and a checker that sees one class for all would report the
 * first nesting (an attach takes sc->lock inside ch->lock) as recursive
 * locking -- lockdep then turns itself off for the rest of the boot.
 *
 * Lock order, outer to inner (kup_core.c's header says where each is
 * taken):
 *     KUP_LOCK_CHANNEL   ch->lock: one channel's kernel callers, for short
 *                        sections (a module thread waiting in its receive
 *                        or holding the message it received is "in" the
 *                        channel without holding its lock: kup_core.c)
 *     KUP_LOCK_REGISTRY  kup_reg_lock: the device registry
 *     KUP_LOCK_DEVICE    sc->lock: device state
 * None is held across a sleep or module code.  A lock is never taken
 * while one of a later role is held, except with KUP_LOCK_TRY (which
 * cannot deadlock: an attach tries a channel's lock under sc->lock), and
 * never while another lock of the same role is held: two channel locks are
 * never held at once (a module thread relaying between two channels holds
 * neither lock), so FreeBSD's WITNESS and Linux lockdep may report any
 * such nesting as the bug it is.  kupsim checks this order at run time
 * (kupsim_glue.c). */
enum kup_lock_role {
	KUP_LOCK_CHANNEL = 0,
	KUP_LOCK_REGISTRY,
	KUP_LOCK_DEVICE,
	KUP_LOCK_NROLES
};
void kup_lock_init(kup_lock_t *l, enum kup_lock_role role);
void kup_lock_destroy(kup_lock_t *l);
void kup_lock(kup_lock_t *l);
void kup_unlock(kup_lock_t *l);

/* ---- memory ----------------------------------------------------------- */
/* void *kup_os_zalloc(size_t bytes);  zeroed, may sleep; NULL on failure
 * void  kup_os_free(void *p, size_t bytes);
 * (declared in kup_module.h, included below: modules use them too) */

/* Allocate the shareable, zeroed, page-aligned memory of one channel
 * (bytes = KUP_CHAN_BYTES(page, pages)) and return its kernel address;
 * the host keeps whatever it needs to map it into a user process (memfd,
 * vmalloc area, VM object) in ch's struct kup_os_chan.  NULL on failure. */
void *kup_os_chan_mem_alloc(struct kupdev_softc *sc, struct kup_chan *ch, size_t bytes);
void  kup_os_chan_mem_free(struct kupdev_softc *sc, struct kup_chan *ch);

/* The page size the host maps with. */
uint32_t kup_os_page_size(void);

/* ---- sleeping and waking ----------------------------------------------
 * kup_os_chan_sleep: sleep until cond(ch) returns non-zero, the timeout
 * expires, or the sleep is interrupted.  Returns 0 when cond held,
 * -ETIMEDOUT, or -EINTR.  timeout_ms < 0 means no timeout (the core passes
 * only KUPDEV_FOREVER, -1: it refuses other negative values).  The host must
 * evaluate cond after arming its wake-up (prepare_to_wait / under the
 * sleep mutex / after draining the eventfd), so that a kup_os_chan_wake
 * issued between the caller's last check and the sleep is never lost.
 * The core calls this only after setting kernel_waiting and fencing, with
 * no core lock held, and for one thread per channel at a time (the one
 * receive that waits: kup_core.c's ch->rx_waiter). */
int  kup_os_chan_sleep(struct kup_chan *ch, int (*cond)(struct kup_chan *),
         int timeout_ms);
/* Wake every kernel-side sleeper of ch in kup_os_chan_sleep (user asked
 * for a wake-up, user detached, device shutting down).  A
 * kupdev_receive_any whose set holds ch is the core's to wake: it calls
 * kup_os_any_wake on that sleeper's own object (kup_core.c, ch->any_w). */
void kup_os_chan_wake(struct kup_chan *ch);
/* kupdev_receive_any's sleep.  One sleeper, one wake-up object: the core
 * embeds a struct kup_os_any (the host's type, in kup_host.h) in each
 * kupdev_receive_any call that may sleep and brackets its use with
 * kup_os_any_init (0, or a negative errno the call then returns: -EINTR
 * when the host could not make one, logged) and kup_os_any_fini, which
 * the core calls only once no waker can reach the object any more.
 * Between the two the core records the object on every channel of the
 * caller's set (ch->any_w, under ch->lock) and on the device's list
 * (under sc->lock), and kup_os_any_wake(sc, w) is how it wakes that
 * sleeper alone: on a hand-over, detach, wake_channel... of one of its
 * channels (under ch->lock), and every sleeper of the device on
 * kupdev_wake_any or the shutdown (under sc->lock).  So a wake-up of one
 * channel reaches the one thread whose set holds it, not every
 * receive_any of the device.  kup_os_any_wake must not sleep (its
 * caller holds a core lock).
 *
 * kup_os_any_sleep(sc, w, ids, n, cond, arg, timeout_ms): sleep on w
 * until cond(arg) returns non-zero (0), the timeout expires (-ETIMEDOUT)
 * or the sleep is interrupted (-EINTR).  ids[0..n) are channels of sc,
 * each with the calling thread as its one kernel-side waiter (kup_core.c's
 * ch->rx_waiter), their kernel_waiting flags set.  Armed before cond is
 * evaluated, as for kup_os_chan_sleep, so that no kup_os_any_wake between
 * the caller's last look and the sleep is lost.  cond is evaluated once
 * after arming and once after every wake-up (the core counts the looks
 * that find nothing: kup_core_priv.h, ch->any_idle_wakes).  A host whose
 * user side wakes the kernel without the core (kupsim: the user writes
 * its channel's eventfd) must also end the sleep on that wake-up of any of
 * ids (kupsim polls those eventfds too: one sleeper per channel, so that
 * is no herd either).  Called with no core lock held; cond takes none. */
int  kup_os_any_init(struct kupdev_softc *sc, struct kup_os_any *w);
void kup_os_any_fini(struct kupdev_softc *sc, struct kup_os_any *w);
int  kup_os_any_sleep(struct kupdev_softc *sc, struct kup_os_any *w,
         const int *ids, int n, int (*cond)(void *), void *arg,
         int timeout_ms);
void kup_os_any_wake(struct kupdev_softc *sc, struct kup_os_any *w);
/* Wake the user side of ch: make its pollable fd readable (eventfd write,
 * wake_up of the poll queue, selwakeup + KNOTE).  Both wakes must not
 * sleep: the core may call them with ch->lock or sc->lock held. */
void kup_os_chan_wake_user(struct kup_chan *ch);

/* The same pair for the device: kupdev_wait_channel sleeps here, and
 * kup_os_dev_wake_user tells device watchers (announce, shutdown). */
int  kup_os_dev_sleep(struct kupdev_softc *sc,
         int (*cond)(struct kupdev_softc *), int timeout_ms);
void kup_os_dev_wake(struct kupdev_softc *sc);
void kup_os_dev_wake_user(struct kupdev_softc *sc);

/* Sleep about a millisecond in a user's attach, interruptibly: 0, or
 * -EINTR when a signal is pending for the caller (the attach then fails
 * with -EINTR; the signal's handler runs and libkup asks again).  Called
 * with no core lock held. */
int  kup_os_attach_pause(void);

/* ---- device node ------------------------------------------------------
 * Publish / withdraw the device for user space (Linux: a character
 * device on kup.ko's major; FreeBSD: make_dev_s; kupsim: a socket).
 * Publish is called after the softc is fully built;
 * withdraw at the start of unload (no new opens) and must not wait for
 * existing users.  kup_os_dev_release is called once, when the last
 * reference is gone, for the host to free what remains. */
int  kup_os_dev_publish(struct kupdev_softc *sc);
void kup_os_dev_withdraw(struct kupdev_softc *sc);
void kup_os_dev_release(struct kupdev_softc *sc);

/* ---- diagnostics ------------------------------------------------------ */
/* void kup_os_log(const char *fmt, ...);  printf-like, one line
 * (declared in kup_module.h) */

/* ---- for modules (declared in kup_module.h) ----------------------------
 * void kup_os_msleep(unsigned int ms);
 * int  kup_os_param_int(const char *module, const char *name, int defval);
 * struct kup_thread *kup_os_thread_start(int (*fn)(void *), void *arg,
 *                                        const char *name);
 * int  kup_os_thread_join(struct kup_thread *t);
 * See kmod/include/kup_module.h for their contract. */
#include "kup_module.h"   /* kup_os_zalloc/free/log and the above */

/* ======================================================================
 * What the core offers the host (implemented in kup_core.c)
 * ====================================================================== */

/* Host load / unload: the core's device registry (its lock).  Call
 * kup_core_init() once before any kupdev_create() and kup_core_fini() after
 * the last device is gone.  0 or a negative errno. */
int  kup_core_init(void);
void kup_core_fini(void);

/* kupdev_shutdown() every registered device (a host going away: users of
 * every device are told at once, before the modules' fini run). */
void kup_core_shutdown_all(void);

/* Find a device by name and take a reference (NULL: no such device or
 * shutting down). */
struct kupdev_softc *kup_core_dev_get(const char *name);
void kup_core_dev_ref(struct kupdev_softc *sc);
void kup_core_dev_put(struct kupdev_softc *sc);   /* last put frees */

/* A user side attaches channel chan_id (KUP_CHAN_ANY: first free announced
 * one) and states the ABI version it was built for.  On success the channel
 * page is reset (identity written, turn = kernel, sequences 0, attach_gen
 * bumped), wait_channel waiters are woken and *out is the channel.
 * Errors: -ENOENT (id out of range), -EAGAIN (not announced yet:
 * EKU_NOTREADY), -EBUSY (attached elsewhere, or none free for ANY),
 * -EINPROGRESS (its last user left and the module still holds it after
 * KUP_ATTACH_LETGO_MS: EKU_RELEASING), -EINTR (a signal during that
 * wait), -ESHUTDOWN, -EPROTONOSUPPORT (version: EKU_VERSION). */
#define KUP_CHAN_ANY 0xffffffffU
int  kup_core_attach(struct kupdev_softc *sc, uint32_t chan_id,
         uint32_t abi_version, struct kup_chan **out);
/* The user side is gone (fd closed, process died): the channel is marked
 * free, kernel-side waiters are woken and get -EPIPE.  Safe to call from
 * the host's release/close path; never fails.  Takes sc->lock and, when a
 * kupdev_receive_any waits on ch, ch->lock: call it holding no core lock
 * (as kup_core_user_wake). */
void kup_core_detach(struct kup_chan *ch);
/* The user side asks the kernel side to wake (it handed over the turn and
 * saw kernel_waiting set): the thread waiting on ch, and no other.  No
 * core lock held (it takes ch->lock when a kupdev_receive_any waits on
 * ch). */
void kup_core_user_wake(struct kup_chan *ch);
/* Run fn(ch) with ch's channel lock and its device's lock held and return
 * its result, if no module thread is in ch: no kernel-side operation of ch
 * runs meanwhile, and no attach, detach or shutdown writes ch's page.  For
 * a host whose user-visible objects outlive an attachment (kupsim: memfd
 * and eventfds) and that gives a detached channel fresh ones, so that
 * nothing of the previous attachment touches them half-way.  Never waits
 * for the module: -EBUSY (fn not run) when a kernel-side call holds
 * ch->lock or a module thread is in the channel -- waiting in its receive,
 * or between its receive and kupdev_unlock_channel, for as long as the
 * module computes.  Waits only for sc->lock, which no one holds across
 * module code.  For a host whose one service thread must not stall on a
 * single channel (kupsim); fn must not call into the core nor return
 * -EBUSY or -EAGAIN itself. */
int  kup_core_chan_exclusive_try(struct kup_chan *ch,
         int (*fn)(struct kup_chan *), unsigned int flags);
/* flags: KUP_EXCL_KEEP_LEFT -- do not run fn (-EAGAIN) while the channel's
 * page still holds a message its departed user handed over that the
 * module has not received yet (kupdev.h: the next receive delivers it;
 * fn is taken to replace the channel's memory, which would lose it).  A
 * host that renews a channel at its detach passes it, and renews without
 * it when a new attachment needs the channel. */
#define KUP_EXCL_KEEP_LEFT 0x1U

/* Geometry and facts the host needs for mmap bounds and ioctl replies. */
size_t   kup_core_chan_bytes(const struct kup_chan *ch);
void    *kup_core_chan_mem(const struct kup_chan *ch);
uint32_t kup_core_chan_id(const struct kup_chan *ch);
struct kupdev_softc *kup_core_chan_dev(const struct kup_chan *ch);
struct kup_os_chan  *kup_core_chan_os(struct kup_chan *ch);
struct kup_os_dev   *kup_core_dev_os(struct kupdev_softc *sc);
struct kup_chan     *kup_core_chan_at(struct kupdev_softc *sc, uint32_t chan_id);
const char          *kup_core_dev_name(const struct kupdev_softc *sc);

/* A consistent snapshot for the host's "device info" request, in the
 * shape of the ioctl ABI (kup_ioctl.h): the Linux and FreeBSD hosts copy it
 * out as it is, kupsim sends the same fields on its wire.  attached_chan
 * is set to KUP_IOC_CHAN_ANY; a host whose fd holds a channel sets it. */
void kup_core_info(struct kupdev_softc *sc, struct kup_ioc_info *out);

/* kup_os_param_int's value, parsed by the one rule of kup_module.h: v is
 * the raw value (NULL when unset; at most len bytes read, a NUL ends it
 * earlier), src says where it came from for the log line (kupsim:
 * "KUP_PARAM_ECHO_CHANNELS", Linux: "kup.params", FreeBSD: the kenv
 * name).  Returns the int, or defval (logged when v was malformed or out of
 * range). */
int kup_core_param_value(const char *module, const char *name, const char *src,
    const char *v, size_t len, int defval);

/* Map a negative errno from the core to the KUP_E_* code user space sees. */
int kup_core_errno_to_kup(int neg_errno);

#endif /* KUP_OS_H */
