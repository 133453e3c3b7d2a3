/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_core.c -- the OS-neutral kernel side of KUP: the seed's kernel API
 * (kupdev.h) and the turn protocol of kup_abi.h.  Everything here is
 * shared by the Linux, FreeBSD and kupsim hosts; the host supplies only
 * the primitives of kup_os.h.
 *
 * Locking (outer to inner: ch->lock before sc->lock, kup_reg_lock before
 * sc->lock, ch->lock before kup_reg_lock; the core never takes ch->lock
 * under kup_reg_lock, and never takes one channel's lock while holding
 * another's):
 *   ch->lock      sleepable; serialises kernel callers of one channel for
 *                 short sections only: never held across a sleep, a wait
 *                 for the user or module code (below)
 *   kup_reg_lock  the device registry
 *   sc->lock      device state: attachment flags, announce, refs, shutdown
 * Host callbacks that may sleep (kup_os_chan_sleep, kup_os_dev_sleep) are
 * never called with a core lock held.  Each of the three is initialised
 * with its role (kup_os.h, enum kup_lock_role), so that a kernel's lock
 * checker sees three classes and checks this order instead of reporting
 * the nesting as recursion.
 *
 * Who is in a channel.  A module thread is "in" a channel while it waits in
 * its receive (ch->rx_waiter) and from a successful receive until
 * kupdev_unlock_channel (ch->holder): states, not a held lock.  Why: a lock
 * held for those spells made every other caller of the channel wait for
 * the user (a send from a second thread while a worker waited in its
 * receive blocked until the user acted, though the answer is -EAGAIN) or
 * for module code -- and a zero-copy relay (the holder of channel A sends
 * on B while B's holder sends on A) deadlocked for good, unkillably.  Now
 * no call waits for another thread's use of a channel: it gets its answer
 * at once (kup_chan_busy: -EAGAIN for a send or pass while a receive
 * waits, -EBUSY otherwise, the user's departure or the shutdown first), so
 * no cycle of waits through channels can form.  The attach, and a host's
 * exclusive section (kup_core_chan_exclusive_try), take a channel only
 * when no module thread is in it, as they took its lock before.
 *
 * A kernel-side operation is valid only for the attachment the module has
 * been told about by kupdev_wait_channel(): once the user side detaches, or
 * a new user attaches that the module has not yet been told about, every
 * operation on the channel returns -EPIPE.
 *
 * Sessions: the kernel side's conversation with one attachment.  A thread
 * that served the previous user may still be between two calls (it took a
 * message and is computing the reply) when the next user attaches and the
 * module is told about it.  Its next call must not reach the new user: if
 * the previous session was active (some call succeeded) and has not ended
 * for the module (no -EPIPE, -EPROTO or CLOSE returned yet), the first call
 * after the switch gets -EPIPE and ends it; the call after that starts the
 * new session (fresh sequence numbers, kernel holds the turn).  A module
 * that stops using a channel after -EPIPE/-EPROTO/CLOSE (as echo does)
 * therefore never talks to the wrong user.
 */
#include "kup_core_priv.h"

/*
 * Kernel-side spin before sleeping in kupdev_receive.  Hosts that define
 * KUP_NOW_NS() (a cheap monotonic clock in ns; optional in kup_os.h's
 * contract; all three hosts define it) get the adaptive policy libkup uses: spin
 * for twice a running average (1/8 weight) of recent waits that a spin
 * could have caught (<= KUP_SPIN_MAX_NS; longer ones count as 0), within
 * [KUP_SPIN_MIN_NS, KUP_SPIN_MAX_NS], checking the clock every
 * KUP_SPIN_CHECK relax hints.  Other hosts spin KUP_SPIN_LOOPS hints.
 * The ceiling is kept short on purpose: on a 2-core machine a 50 us
 * kernel-side ceiling made the Python channel round trip 2.4-3x slower
 * (same-run A/B; the spinning module thread holds a CPU the user side
 * needs; that was before the spin yielded, see KUP_SPIN_YIELD).  It is
 * 10 us, not 5: a user that wakes the module pays an eventfd write of
 * 5-10 us on the VM, during which the module already answers, so the
 * module's next wait is that long; with a 5 us ceiling those waits counted
 * as uncatchable, the budget collapsed to the minimum and every round trip
 * kept paying the wake-up (C floor 7 us instead of 0.5; Python send +
 * receive 10 us instead of 4: bench FINDINGS, session 2).
 */
#ifndef KUP_SPIN_LOOPS
#define KUP_SPIN_LOOPS 256
#endif
#ifndef KUP_SPIN_MIN_NS
#define KUP_SPIN_MIN_NS 1000U
#endif
#ifndef KUP_SPIN_MAX_NS
#define KUP_SPIN_MAX_NS 10000U
#endif
#ifndef KUP_SPIN_INIT_NS
#define KUP_SPIN_INIT_NS 2500U
#endif
#define KUP_SPIN_CHECK   16
#ifndef KUP_SPIN_YIELD_NS
#define KUP_SPIN_YIELD_NS 1000U
#endif

static kup_lock_t kup_reg_lock;
static struct kupdev_softc *kup_reg_head;
static int kup_core_ready;
/* misuse lines about no device at all (NULL or not registered), under
 * kup_reg_lock: same budget as a device's (kup_misuse_admit) */
static uint32_t kup_nodev_misuse;

/* A kernel-side call lets go of ch->lock: the host may want to know
 * (KUP_CHAN_UNLOCKED, optional in kup_os.h). */
static inline void
kup_chan_unlock(struct kup_chan *ch)
{
	kup_unlock(&ch->lock);
#ifdef KUP_CHAN_UNLOCKED
	KUP_CHAN_UNLOCKED(ch);
#endif
}

int
kup_core_init(void)
{
	kup_lock_init(&kup_reg_lock, KUP_LOCK_REGISTRY);
	kup_reg_head = NULL;
	kup_core_ready = 1;
	return 0;
}

void
kup_core_fini(void)
{
	if (!kup_core_ready)
		return;
	if (kup_reg_head != NULL)
		kup_os_log("kup: core unloaded with device %s still registered",
		    kup_reg_head->name);
	kup_lock_destroy(&kup_reg_lock);
	kup_core_ready = 0;
}

/* ---- misuse of the API: log lines for the module's author ------------------
 *
 * A module that calls the API wrongly (channel id out of range, a NULL
 * pointer, a message larger than the channel, a timeout below
 * KUPDEV_FOREVER, a call on a device it has unloaded, re-entry while it
 * holds the channel) gets an error code -- and, so that its author can see
 * which call was wrong, a log line naming the device, the channel, the call
 * and the value.  Conditions of normal operation (-EPIPE, -EAGAIN while
 * polling, -ESHUTDOWN, -ETIMEDOUT) are never logged here.  Why a budget: a
 * buggy module repeats its mistake in a loop, and the kernel log must not
 * be flooded; the first KUP_MISUSE_BUDGET lines per device in a window of
 * KUP_MISUSE_WINDOW_NS are enough to find the bug, then one line says the
 * rest of the window is not logged.  A window, not a budget for the
 * device's life: a loop's mistake early on must not hide a different one
 * made later; the first line of a new window says how many were left out.
 * A host without a clock (KUP_NOW_NS) keeps one budget for the device.
 */
#define KUP_MISUSE_BUDGET 16U
#define KUP_MISUSE_WINDOW_NS 10000000000ULL

/* 1: log this line; *last set when it is the budget's last one in the
 * window, *dropped to the lines not logged before it.  Takes sc->lock
 * (callers hold no core lock but possibly ch->lock: ch before sc). */
static int
kup_misuse_admit(struct kupdev_softc *sc, int *last, uint32_t *dropped)
{
	uint32_t n;

	*dropped = 0;
	kup_lock(&sc->lock);
#ifdef KUP_NOW_NS
	{
		uint64_t now = KUP_NOW_NS();

		if (sc->misuse_lines == 0 ||
		    now - sc->misuse_window >= KUP_MISUSE_WINDOW_NS) {
			sc->misuse_window = now;
			sc->misuse_lines = 0;
		}
	}
#endif
	n = sc->misuse_lines;
	if (n <= KUP_MISUSE_BUDGET)
		sc->misuse_lines = n + 1;
	if (n >= KUP_MISUSE_BUDGET) {
		sc->misuse_dropped++;
	} else {
		*dropped = sc->misuse_dropped;
		sc->misuse_dropped = 0;
	}
	kup_unlock(&sc->lock);
	*last = n + 1 == KUP_MISUSE_BUDGET;
	return n < KUP_MISUSE_BUDGET;
}

#ifdef KUP_NOW_NS
#define KUP_MISUSE_REST " for 10 s"
#else
#define KUP_MISUSE_REST ""
#endif

#define KUP_MISUSE(sc, fmt, ...) do {                                       \
	int kup_last_;                                                      \
	uint32_t kup_dropped_;                                              \
	if (kup_misuse_admit((sc), &kup_last_, &kup_dropped_)) {            \
		if (kup_dropped_ != 0)                                      \
			kup_os_log("kup: %s: %u misuse lines not logged "   \
			    "(rate limit)", (sc)->name, kup_dropped_);      \
		kup_os_log("kup: %s: " fmt, (sc)->name, ##__VA_ARGS__);     \
		if (kup_last_)                                              \
			kup_os_log("kup: %s: further misuse of the kupdev API " \
			    "is not logged" KUP_MISUSE_REST, (sc)->name);   \
	}                                                                   \
} while (0)

/* The same for calls that name no usable device (NULL, or a pointer that
 * is not a registered device): one budget for the whole core. */
static int
kup_nodev_admit(int *last)
{
	uint32_t n;

	if (!kup_core_ready) {
		*last = 0;
		return 1;
	}
	kup_lock(&kup_reg_lock);
	n = kup_nodev_misuse;
	if (n <= KUP_MISUSE_BUDGET)
		kup_nodev_misuse = n + 1;
	kup_unlock(&kup_reg_lock);
	*last = n + 1 == KUP_MISUSE_BUDGET;
	return n < KUP_MISUSE_BUDGET;
}

#define KUP_NODEV_MISUSE(fmt, ...) do {                                     \
	int kup_last_;                                                      \
	if (kup_nodev_admit(&kup_last_)) {                                  \
		kup_os_log("kup: " fmt, ##__VA_ARGS__);                     \
		if (kup_last_)                                              \
			kup_os_log("kup: further kupdev calls without a live " \
			    "device are not logged");                       \
	}                                                                   \
} while (0)

/*
 * Is sc a device of the registry (created and not yet unloaded)?  Compares
 * pointers only: a pointer the module got from kupdev_create and has since
 * passed to kupdev_unload may point to freed memory (the device is freed
 * once its last user is gone), so it must not be dereferenced before it is
 * found here.  This catches a second unload, or a call after unload, as
 * long as no new device has been created at the same address; it is a
 * diagnostic, not a guarantee.  Takes kup_reg_lock: kept off the message
 * path (send/receive/pass/unlock), used by the calls a module makes once
 * per device or per session.
 */
static int
kup_dev_find(struct kupdev_softc *sc, const char *op, const char *hint,
    int take_ref)
{
	struct kupdev_softc *it;

	if (sc == NULL) {
		KUP_NODEV_MISUSE("%s: NULL device", op);
		return 0;
	}
	if (!kup_core_ready)
		return 0;
	kup_lock(&kup_reg_lock);
	for (it = kup_reg_head; it != NULL && it != sc; it = it->next)
		;
	if (it != NULL && take_ref) {
		kup_lock(&sc->lock);   /* registry before device */
		sc->refs++;
		kup_unlock(&sc->lock);
	}
	kup_unlock(&kup_reg_lock);
	if (it == NULL)
		KUP_NODEV_MISUSE("%s: not a live device (%s)", op, hint);
	return it != NULL;
}

static int
kup_dev_live(struct kupdev_softc *sc, const char *op, const char *hint)
{
	return kup_dev_find(sc, op, hint, 0);
}

/*
 * The same, and on success a reference on sc, taken while the registry
 * still holds sc (kup_core_dev_put drops it).  For the calls that sleep on
 * the device (kupdev_wait_channel): a module that unloads while its
 * threads wait there -- kupdev_unload wakes them with -ESHUTDOWN, but
 * frees sc at once when no user holds it -- must not have them wake up in
 * freed memory.  The last of them frees sc instead.
 */
static int
kup_dev_live_ref(struct kupdev_softc *sc, const char *op, const char *hint)
{
	return kup_dev_find(sc, op, hint, 1);
}

/* Look up chan_id for a call named op; logs the misuse when it is none. */
static struct kup_chan *
kup_chan_arg(struct kupdev_softc *sc, int chan_id, const char *op)
{
	if (sc == NULL) {
		KUP_NODEV_MISUSE("%s: NULL device", op);
		return NULL;
	}
	if (chan_id < 0 || (size_t)chan_id >= sc->chan_cnt) {
		KUP_MISUSE(sc, "%s: channel %d out of range 0..%zu", op,
		    chan_id, sc->chan_cnt - 1);
		return NULL;
	}
	return &sc->chans[chan_id];
}

/* ---- helpers ----------------------------------------------------------- */

/* NULL, or what is wrong with the name */
static const char *
kup_name_bad(const char *name)
{
	size_t i, n;

	if (name == NULL)
		return "NULL";
	n = strnlen(name, KUP_NAME_MAX);
	if (n == 0)
		return "empty";
	if (n >= KUP_NAME_MAX)
		return "too long";
	if (name[0] == '.')
		return "starts with '.'";
	for (i = 0; i < n; i++) {
		char c = name[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		    (c >= '0' && c <= '9') || c == '_' || c == '-' || c == '.'))
			return "a character outside [A-Za-z0-9_.-]";
	}
	return NULL;
}

/*
 * A string from the module or from an administrator, fit for a log line:
 * at most KUP_SHOW_MAX bytes of s (the rest is "..."), every byte that is
 * not printable ASCII (or is a quote) shown as '?'.  Why: the log line
 * must name what was wrong without letting a control character or an
 * unterminated buffer into the kernel log.  n bounds the bytes read.
 */
#define KUP_SHOW_MAX 40U

static const char *
kup_show(char out[KUP_SHOW_MAX + 4], const char *s, size_t n)
{
	size_t i, k = 0;

	if (s == NULL)
		return "(NULL)";
	for (i = 0; i < n && s[i] != '\0' && k < KUP_SHOW_MAX; i++) {
		unsigned char c = (unsigned char)s[i];
		out[k++] = (c >= 0x20 && c < 0x7f && c != '"') ? (char)c : '?';
	}
	if (i < n && s[i] != '\0') {
		memcpy(out + k, "...", 3);
		k += 3;
	}
	out[k] = '\0';
	return out;
}

static struct kup_chan *
kup_chan_lookup(struct kupdev_softc *sc, int chan_id)
{
	if (sc == NULL || chan_id < 0 || (size_t)chan_id >= sc->chan_cnt)
		return NULL;
	return &sc->chans[chan_id];
}

/* Under ch->lock: is a module thread in the channel (waiting in its
 * receive, or holding the message it received)? */
static int
kup_chan_in_use(const struct kup_chan *ch)
{
	return KUP_READ_ONCE64(&ch->holder) != 0 ||
	    KUP_READ_ONCE64(&ch->rx_waiter) != 0;
}

/* Page state bits are written under sc->lock only, from the private copy:
 * bits a user scribbled on its page are not kept. */
static void
kup_state_set(struct kup_chan *ch, uint32_t set, uint32_t clear)
{
	ch->state = (ch->state | set) & ~clear;
	KUP_WRITE_ONCE32(&ch->ctrl->state, ch->state);
}

/* Write the identity and a fresh protocol state into the control page. */
static void
kup_page_reset(struct kup_chan *ch, uint64_t gen)
{
	struct kupdev_softc *sc = ch->sc;
	struct kup_ctrl *c = ch->ctrl;

	memset(c, 0, KUP_CTRL_SIZE);
	c->magic = KUP_MAGIC;
	c->abi_version = KUP_ABI_VERSION;
	c->page_size = sc->page_size;
	c->ctrl_size = KUP_CTRL_SIZE;
	c->k2u_off = (uint32_t)KUP_CHAN_K2U_OFF(sc->page_size);
	c->k2u_size = (uint32_t)sc->data_size;
	c->u2k_off = (uint32_t)KUP_CHAN_U2K_OFF(sc->page_size, sc->pages);
	c->u2k_size = (uint32_t)sc->data_size;
	c->chan_id = ch->id;
	c->chan_count = (uint32_t)sc->chan_cnt;
	KUP_WRITE_ONCE64(&c->attach_gen, gen);
	ch->state = KUP_STATE_ATTACHED;
	KUP_WRITE_ONCE32(&c->state, ch->state);
	KUP_STORE_REL32(&c->turn, KUP_TURN_KERNEL);
	KUP_FENCE();
}

static void
kup_dev_free(struct kupdev_softc *sc)
{
	size_t i;

	for (i = 0; i < sc->chan_cnt; i++) {
		struct kup_chan *ch = &sc->chans[i];
		if (ch->mem != NULL)
			kup_os_chan_mem_free(sc, ch);
#ifdef KUP_THREAD_UNPIN
		/* a module thread that exited holding the channel (a module
		 * bug: kup_unload_report_held named it) left its identity
		 * pinned there; it goes with the channel, not with nothing */
		if (ch->holder != 0)
			KUP_THREAD_UNPIN(ch->holder);
#endif
		kup_lock_destroy(&ch->lock);
	}
	kup_os_free(sc->chans, sc->chan_cnt * sizeof(*sc->chans));
	kup_lock_destroy(&sc->lock);
	kup_os_free(sc, sizeof(*sc));
}

/* ---- device lifetime --------------------------------------------------- */

struct kupdev_softc *
kupdev_create(const char *name, size_t size, size_t chan_cnt)
{
	struct kupdev_softc *sc, *it;
	size_t i, made = 0;
	uint32_t page;
	const char *why;
	char shown[KUP_SHOW_MAX + 4];

	if (!kup_core_ready) {
		kup_os_log("kup: kupdev_create before kup_core_init");
		return NULL;
	}
	why = kup_name_bad(name);
	if (why != NULL) {
		kup_os_log("kup: kupdev_create: bad device name \"%s\": %s "
		    "(1..%u characters of [A-Za-z0-9_.-], not starting with '.')",
		    kup_show(shown, name, KUP_NAME_MAX + 1), why,
		    KUP_NAME_MAX - 1);
		return NULL;
	}
	if (size < 1 || size > KUP_MAX_PAGES) {
		kup_os_log("kup: kupdev_create(%s): pages %zu out of range 1..%u",
		    name, size, KUP_MAX_PAGES);
		return NULL;
	}
	if (chan_cnt < 1 || chan_cnt > KUP_MAX_CHANNELS) {
		kup_os_log("kup: kupdev_create(%s): channels %zu out of range 1..%u",
		    name, chan_cnt, KUP_MAX_CHANNELS);
		return NULL;
	}
	page = kup_os_page_size();
	if (page < KUP_CTRL_SIZE || KUP_CHAN_BYTES(page, size) > 0xffffffffULL) {
		kup_os_log("kup: kupdev_create(%s): unusable page size %u", name, page);
		return NULL;
	}

	sc = kup_os_zalloc(sizeof(*sc));
	if (sc == NULL)
		goto fail;
	memcpy(sc->name, name, strnlen(name, KUP_NAME_MAX - 1));
	sc->page_size = page;
	sc->pages = size;
	sc->chan_cnt = chan_cnt;
	sc->data_size = (size_t)KUP_CHAN_DATA_SIZE(page, size);
	sc->chan_bytes = (size_t)KUP_CHAN_BYTES(page, size);
	sc->refs = 1;
	kup_lock_init(&sc->lock, KUP_LOCK_DEVICE);
	sc->chans = kup_os_zalloc(chan_cnt * sizeof(*sc->chans));
	if (sc->chans == NULL)
		goto fail_lock;
	for (i = 0; i < chan_cnt; i++) {
		struct kup_chan *ch = &sc->chans[i];

		ch->sc = sc;
		ch->id = (uint32_t)i;
		ch->spin_avg_ns = KUP_SPIN_INIT_NS;
		kup_lock_init(&ch->lock, KUP_LOCK_CHANNEL);
		made = i + 1;
		ch->mem = kup_os_chan_mem_alloc(sc, ch, sc->chan_bytes);
		if (ch->mem == NULL)
			goto fail_chans;
		ch->bytes = sc->chan_bytes;
		ch->data_size = sc->data_size;
		ch->ctrl = ch->mem;
		ch->k2u = (uint8_t *)ch->mem + KUP_CHAN_K2U_OFF(page);
		ch->u2k = (uint8_t *)ch->mem + KUP_CHAN_U2K_OFF(page, size);
		kup_page_reset(ch, 0);
		ch->state = 0;
		KUP_WRITE_ONCE32(&ch->ctrl->state, 0);
	}

	kup_lock(&kup_reg_lock);
	for (it = kup_reg_head; it != NULL; it = it->next) {
		if (strncmp(it->name, sc->name, KUP_NAME_MAX) == 0) {
			kup_unlock(&kup_reg_lock);
			kup_os_log("kup: kupdev_create(%s): name taken", name);
			goto fail_chans;
		}
	}
	sc->next = kup_reg_head;
	kup_reg_head = sc;
	kup_unlock(&kup_reg_lock);

	if (kup_os_dev_publish(sc) != 0) {
		kup_os_log("kup: kupdev_create(%s): publishing the device failed", name);
		goto fail_reg;
	}
	return sc;

fail_reg:
	kup_lock(&kup_reg_lock);
	{
		struct kupdev_softc **pp;
		for (pp = &kup_reg_head; *pp != NULL; pp = &(*pp)->next) {
			if (*pp == sc) {
				*pp = sc->next;
				break;
			}
		}
	}
	kup_unlock(&kup_reg_lock);
fail_chans:
	sc->chan_cnt = made;   /* free only what was set up */
	kup_dev_free(sc);
	return NULL;
fail_lock:
	kup_lock_destroy(&sc->lock);
	kup_os_free(sc, sizeof(*sc));
fail:
	kup_os_log("kup: kupdev_create(%s): out of memory", name);
	return NULL;
}

static void kup_any_wake_all_locked(struct kupdev_softc *sc);

/* kup_chan_wake: wake ch's kernel-side waiter (the receive_any section) */
static void kup_chan_wake(struct kup_chan *ch);

/* kupdev_shutdown on a device known to be alive (registered, or held by a
 * reference) */
static void
kup_dev_shutdown(struct kupdev_softc *sc)
{
	size_t i;

	kup_lock(&sc->lock);
	if (sc->shutdown) {
		kup_unlock(&sc->lock);
		return;
	}
	KUP_WRITE_ONCE32(&sc->shutdown, 1);
	for (i = 0; i < sc->chan_cnt; i++)
		kup_state_set(&sc->chans[i], KUP_STATE_SHUTDOWN, 0);
	KUP_FENCE();
	/* The channel wake-ups too under sc->lock (they never sleep): a host
	 * that renews a detached channel's wake-up objects does so under it
	 * (kup_core_chan_exclusive), so a wake-up never meets an object
	 * half-replaced (kupsim: an eventfd number being dup3'd onto). */
	for (i = 0; i < sc->chan_cnt; i++) {
		kup_os_chan_wake_user(&sc->chans[i]);
		kup_os_chan_wake(&sc->chans[i]);
	}
	kup_any_wake_all_locked(sc);   /* also one on no channel */
	kup_unlock(&sc->lock);
	kup_os_dev_wake(sc);
	kup_os_dev_wake_user(sc);
}

int
kupdev_shutdown(struct kupdev_softc *sc)
{
	if (!kup_dev_live(sc, "kupdev_shutdown", "called after kupdev_unload?"))
		return -EINVAL;
	kup_dev_shutdown(sc);
	return 0;
}

/* Name the channels a module thread still holds at unload: a receive that
 * was never followed by kupdev_unlock_channel (the thread returned, or
 * hangs).  Nothing else shows it: such a channel was lost to its users for
 * good ("module" in kupd's ListDevices), and the unload itself goes on. */
static void
kup_unload_report_held(struct kupdev_softc *sc)
{
	size_t i, held = 0;

	for (i = 0; i < sc->chan_cnt; i++) {
		if (KUP_READ_ONCE64(&sc->chans[i].holder) == 0)
			continue;
		if (held++ < 8)
			kup_os_log("kup: %s: chan %zu: still held by a module thread at "
			    "unload (kupdev_receive without kupdev_unlock_channel: a module "
			    "bug; users could not attach it)", sc->name, i);
	}
	if (held > 8)
		kup_os_log("kup: %s: %zu channels in all still held at unload",
		    sc->name, held);
}

int
kupdev_unload(struct kupdev_softc *sc)
{
	struct kupdev_softc **pp;

	/* Why the registry first: the first unload drops the module's
	 * reference, and with no user attached that frees sc; a second
	 * unload must be refused before it reads anything through sc. */
	if (!kup_dev_live(sc, "kupdev_unload", "unloaded twice?"))
		return -EINVAL;
	kup_dev_shutdown(sc);
	kup_lock(&sc->lock);
	if (sc->unloaded) {
		kup_unlock(&sc->lock);
		return 0;
	}
	sc->unloaded = 1;
	kup_unlock(&sc->lock);
	kup_unload_report_held(sc);

	kup_os_dev_withdraw(sc);
	kup_lock(&kup_reg_lock);
	for (pp = &kup_reg_head; *pp != NULL; pp = &(*pp)->next) {
		if (*pp == sc) {
			*pp = sc->next;
			break;
		}
	}
	kup_unlock(&kup_reg_lock);
	kup_core_dev_put(sc);   /* the module's reference */
	return 0;
}

void
kup_core_shutdown_all(void)
{
	struct kupdev_softc *sc;

	if (!kup_core_ready)
		return;
	for (;;) {
		/* one at a time: kupdev_shutdown sleeps, the registry lock
		 * must not be held across it */
		kup_lock(&kup_reg_lock);
		for (sc = kup_reg_head; sc != NULL; sc = sc->next) {
			if (!KUP_READ_ONCE32(&sc->shutdown))
				break;
		}
		if (sc != NULL)
			kup_core_dev_ref(sc);
		kup_unlock(&kup_reg_lock);
		if (sc == NULL)
			return;
		/* our reference keeps sc alive even if its module unloads it
		 * meanwhile (it is then no longer registered) */
		kup_dev_shutdown(sc);
		kup_core_dev_put(sc);
	}
}

struct kupdev_softc *
kup_core_dev_get(const char *name)
{
	struct kupdev_softc *sc;

	if (name == NULL || !kup_core_ready)
		return NULL;
	kup_lock(&kup_reg_lock);
	for (sc = kup_reg_head; sc != NULL; sc = sc->next) {
		if (strncmp(sc->name, name, KUP_NAME_MAX) == 0)
			break;
	}
	if (sc != NULL) {
		kup_lock(&sc->lock);
		if (sc->shutdown) {
			kup_unlock(&sc->lock);
			sc = NULL;
		} else {
			sc->refs++;
			kup_unlock(&sc->lock);
		}
	}
	kup_unlock(&kup_reg_lock);
	return sc;
}

void
kup_core_dev_ref(struct kupdev_softc *sc)
{
	kup_lock(&sc->lock);
	sc->refs++;
	kup_unlock(&sc->lock);
}

void
kup_core_dev_put(struct kupdev_softc *sc)
{
	uint32_t left;

	if (sc == NULL)
		return;
	kup_lock(&sc->lock);
	left = --sc->refs;
	kup_unlock(&sc->lock);
	if (left == 0) {
		kup_os_dev_release(sc);
		kup_dev_free(sc);
	}
}

/* ---- announce and wait for attach ---------------------------------------- */

static int
kup_announce(struct kupdev_softc *sc, size_t count, const char *op)
{
	uint32_t had;

	if (count > sc->chan_cnt) {
		KUP_MISUSE(sc, "%s: count %zu beyond the %zu channels", op,
		    count, sc->chan_cnt);
		return -EINVAL;
	}
	kup_lock(&sc->lock);
	if (sc->shutdown) {
		kup_unlock(&sc->lock);
		return -ESHUTDOWN;
	}
	if (count < sc->announced) {
		had = sc->announced;
		kup_unlock(&sc->lock);
		KUP_MISUSE(sc, "%s: count %zu below the %u already announced "
		    "(it may only grow)", op, count, had);
		return -EINVAL;
	}
	sc->announced = (uint32_t)count;
	sc->notify_gen++;
	kup_unlock(&sc->lock);
	kup_os_dev_wake_user(sc);
	return 0;
}

int
kupdev_announce(struct kupdev_softc *sc, size_t count)
{
	if (!kup_dev_live(sc, "kupdev_announce", "called after kupdev_unload?"))
		return -EINVAL;
	return kup_announce(sc, count, "kupdev_announce");
}

void
kupdev_notify(struct kupdev_softc *sc)
{
	if (kup_dev_live(sc, "kupdev_notify", "called after kupdev_unload?"))
		(void)kup_announce(sc, sc->chan_cnt, "kupdev_notify");
}

static int
kup_dev_wait_cond(struct kupdev_softc *sc)
{
	return KUP_READ_ONCE32(&sc->npending) != 0 ||
	    KUP_READ_ONCE32(&sc->shutdown) != 0 ||
	    KUP_READ_ONCE32(&sc->wakes) != 0;
}

int
kupdev_wait_channel_timeout(struct kupdev_softc *sc, int timeout_ms)
{
	int r, left = timeout_ms;
#ifdef KUP_NOW_NS
	/* Another waiter can take the channel that woke us; the next sleep
	 * then gets what is left of timeout_ms, not all of it again. */
	uint64_t deadline = timeout_ms > 0 ?
	    KUP_NOW_NS() + (uint64_t)timeout_ms * 1000000ULL : 0;
#endif

	if (!kup_dev_live_ref(sc, "kupdev_wait_channel",
	    "called after kupdev_unload?"))
		return -EINVAL;
	if (timeout_ms < KUPDEV_FOREVER) {
		/* the hosts' sleeps take any negative value as "no bound":
		 * a computed timeout that went negative would wait forever */
		KUP_MISUSE(sc, "kupdev_wait_channel_timeout: timeout %d ms "
		    "(0 or more, or KUPDEV_FOREVER = -1)", timeout_ms);
		r = -EINVAL;
		goto out;
	}
	for (;;) {
		size_t k;

		kup_lock(&sc->lock);
		if (sc->shutdown) {
			kup_unlock(&sc->lock);
			r = -ESHUTDOWN;
			goto out;
		}
		if (sc->wakes != 0) {
			/* kupdev_wake: before taking an attachment, which a
			 * thread told to stop would not serve */
			KUP_WRITE_ONCE32(&sc->wakes, sc->wakes - 1);
			kup_unlock(&sc->lock);
			r = -ECANCELED;
			goto out;
		}
		for (k = 0; k < sc->chan_cnt && sc->npending != 0; k++) {
			size_t i = (sc->rr + k) % sc->chan_cnt;
			struct kup_chan *ch = &sc->chans[i];

			if (ch->pending) {
				KUP_WRITE_ONCE32(&ch->pending, 0);
				KUP_WRITE_ONCE32(&sc->npending, sc->npending - 1);
				KUP_WRITE_ONCE64(&ch->kgen, ch->gen);
				sc->rr = (uint32_t)((i + 1) % sc->chan_cnt);
				kup_unlock(&sc->lock);
				/* a thread of the previous attachment may sleep */
				kup_chan_wake(ch);
				r = (int)i;
				goto out;
			}
		}
		kup_unlock(&sc->lock);
		if (left == 0) {
			r = -ETIMEDOUT;
			goto out;
		}
		r = kup_os_dev_sleep(sc, kup_dev_wait_cond, left);
		if (r != 0)
			goto out;
#ifdef KUP_NOW_NS
		if (timeout_ms > 0) {
			uint64_t now = KUP_NOW_NS();

			/* rounded up: a sleep never ends before the deadline */
			left = now >= deadline ? 0 :
			    (int)((deadline - now + 999999ULL) / 1000000ULL);
		}
#endif
	}
out:
	kup_core_dev_put(sc);   /* may free sc: the module unloaded meanwhile */
	return r;
}

int
kupdev_wait_channel(struct kupdev_softc *sc)
{
	return kupdev_wait_channel_timeout(sc, KUPDEV_FOREVER);
}

/* ---- attach / detach (host side) ------------------------------------------ */

#ifndef KUP_ATTACH_LETGO_MS
#define KUP_ATTACH_LETGO_MS 500U
#endif

/* Take ch->lock if no module thread is in the channel: 1 (locked), else 0.
 * Never waits (a try: callable under sc->lock). */
static int
kup_chan_take_free(struct kup_chan *ch)
{
	if (!KUP_LOCK_TRY(&ch->lock))
		return 0;
	if (!kup_chan_in_use(ch))
		return 1;
	kup_unlock(&ch->lock);
	return 0;
}

/*
 * Take ch->lock for an attach, with no module thread in the channel.  Why
 * not wait for that: a module thread is in a channel from its receive to
 * kupdev_unlock_channel -- for as long as it computes, seconds if it likes
 * -- and a thread holding the message of a user who has left goes on
 * holding it until it next calls into the core.  An attach waiting for
 * that would sleep unkillably for that long (Linux: D state).  A worker
 * asleep in its receive leaves within microseconds of the detach, which
 * covers a user re-attaching the channel it has just left; so the attach
 * tries for up to KUP_ATTACH_LETGO_MS, pausing interruptibly, then gives
 * up with -EINPROGRESS (KUP_E_RELEASING: retry later), or -EINTR on a
 * signal.
 */
static int
kup_attach_lock(struct kup_chan *ch)
{
	unsigned int paused;
	int r;
#ifdef KUP_NOW_NS
	/* Why a deadline and not a count of pauses: a host's "about a
	 * millisecond" is a tick or two (Linux: msleep(1) is two jiffies, 8 ms
	 * at HZ=250), and 500 of them were 4 s, not the 500 ms documented. */
	uint64_t deadline = 0;
#endif

	for (paused = 0; !kup_chan_take_free(ch); paused++) {
#ifdef KUP_NOW_NS
		uint64_t now = KUP_NOW_NS();

		if (paused == 0)
			deadline = now + (uint64_t)KUP_ATTACH_LETGO_MS * 1000000ULL;
		if (now >= deadline)          /* at once when LETGO is 0 (kupsim) */
			return -EINPROGRESS;
#else
		if (paused == KUP_ATTACH_LETGO_MS)   /* no clock: count pauses */
			return -EINPROGRESS;
#endif
		r = kup_os_attach_pause();
		if (r != 0)
			return r;
	}
	return 0;
}

int
kup_core_attach(struct kupdev_softc *sc, uint32_t chan_id,
    uint32_t abi_version, struct kup_chan **out)
{
	struct kup_chan *ch = NULL;
	uint64_t gen;
	size_t i;
	int r;

	if (sc == NULL || out == NULL)
		return -EINVAL;
	if (abi_version != KUP_ABI_VERSION)
		return -EPROTONOSUPPORT;
	kup_lock(&sc->lock);
	if (sc->shutdown) {
		kup_unlock(&sc->lock);
		return -ESHUTDOWN;
	}
	if (chan_id == KUP_CHAN_ANY) {
		if (sc->announced == 0) {
			kup_unlock(&sc->lock);
			return -EAGAIN;
		}
		struct kup_chan *releasing = NULL;

		/* The first free channel no module thread is in now.  Why
		 * look: a channel whose last user left while its module still
		 * holds its message (computing) would make this attach wait and
		 * give up with RELEASING while others are free -- and a retry
		 * would pick it again.  Such a channel is the fallback when it
		 * is the only free one.  (A try under sc->lock cannot
		 * deadlock.) */
		for (i = 0; i < sc->announced; i++) {
			struct kup_chan *c = &sc->chans[i];

			if (c->attached)
				continue;
			if (kup_chan_take_free(c)) {
				kup_unlock(&c->lock);
				ch = c;
				break;
			}
			if (releasing == NULL)
				releasing = c;
		}
		if (ch == NULL)
			ch = releasing;
		if (ch == NULL) {
			kup_unlock(&sc->lock);
			return -EBUSY;
		}
	} else {
		if (chan_id >= sc->chan_cnt) {
			kup_unlock(&sc->lock);
			return -ENOENT;
		}
		if (chan_id >= sc->announced) {
			kup_unlock(&sc->lock);
			return -EAGAIN;
		}
		ch = &sc->chans[chan_id];
		if (ch->attached) {
			kup_unlock(&sc->lock);
			return -EBUSY;
		}
	}
	/* reserve it; nobody else can attach it now */
	KUP_WRITE_ONCE32(&ch->attached, 1);
	gen = ch->gen + 1;
	KUP_WRITE_ONCE64(&ch->gen, gen);
	kup_unlock(&sc->lock);

	/* Wait for a kernel caller of the previous attachment to leave (it
	 * was woken with -EPIPE by the detach), then reset the page -- under
	 * sc->lock too, as kupdev_shutdown writes every page's state word
	 * under it (a shutdown meanwhile is seen just below). */
	r = kup_attach_lock(ch);
	if (r != 0) {
		/* still the module's: give the reservation back (the bumped
		 * generation only tells its worker, once more, that the
		 * attachment it served is over) */
		kup_lock(&sc->lock);
		KUP_WRITE_ONCE32(&ch->attached, 0);
		kup_unlock(&sc->lock);
		return r;
	}
#ifndef KUP_CHAN_MEM_FRESH
	/* Nothing of the previous user's conversation reaches this one: the
	 * rest of the control page (mapped read/write, so a user may have
	 * written there) and the data areas are cleared too, not just the
	 * control area kup_page_reset writes (under ch->lock only:
	 * megabytes, on a big channel). */
	memset((uint8_t *)ch->ctrl + KUP_CTRL_SIZE, 0,
	    sc->page_size - KUP_CTRL_SIZE);
	memset((uint8_t *)ch->ctrl + KUP_CHAN_K2U_OFF(sc->page_size), 0,
	    sc->data_size);
	memset((uint8_t *)ch->ctrl + KUP_CHAN_U2K_OFF(sc->page_size, sc->pages),
	    0, sc->data_size);
#endif
	kup_lock(&sc->lock);
	kup_page_reset(ch, gen);
	ch->page_gen = gen;
	kup_unlock(&ch->lock);   /* sc->lock stays: ch before sc, as ever */
	if (sc->shutdown) {
		kup_state_set(ch, KUP_STATE_SHUTDOWN, KUP_STATE_ATTACHED);
		KUP_WRITE_ONCE32(&ch->attached, 0);
		kup_unlock(&sc->lock);
		return -ESHUTDOWN;
	}
	KUP_WRITE_ONCE32(&ch->pending, 1);
	KUP_WRITE_ONCE32(&sc->npending, sc->npending + 1);
	kup_unlock(&sc->lock);
	kup_os_dev_wake(sc);
	*out = ch;
	return 0;
}

void
kup_core_detach(struct kup_chan *ch)
{
	struct kupdev_softc *sc;

	if (ch == NULL)
		return;
	sc = ch->sc;
	kup_lock(&sc->lock);
	if (ch->attached) {
		if (ch->pending) {
			KUP_WRITE_ONCE32(&ch->pending, 0);
			KUP_WRITE_ONCE32(&sc->npending, sc->npending - 1);
		}
		KUP_WRITE_ONCE32(&ch->attached, 0);
		kup_state_set(ch, 0, KUP_STATE_ATTACHED);
	}
	kup_unlock(&sc->lock);
	KUP_FENCE();
	kup_chan_wake(ch);
}

void
kup_core_user_wake(struct kup_chan *ch)
{
	if (ch != NULL)
		kup_chan_wake(ch);
}

static int kup_chan_left_msg(struct kup_chan *ch);

int
kup_core_chan_exclusive_try(struct kup_chan *ch, int (*fn)(struct kup_chan *),
    unsigned int flags)
{
	int r;

	if (ch == NULL || fn == NULL)
		return -EINVAL;
	if (!kup_chan_take_free(ch))
		return -EBUSY;
	if ((flags & KUP_EXCL_KEEP_LEFT) && kup_chan_left_msg(ch)) {
		kup_unlock(&ch->lock);
		return -EAGAIN;
	}
	/* fn may replace the memory: the page no longer holds what the last
	 * user left there */
	ch->page_gen = 0;
	/* ch before sc; kupdev_shutdown writes every page under sc->lock */
	kup_lock(&ch->sc->lock);
	r = fn(ch);
	kup_unlock(&ch->sc->lock);
	kup_unlock(&ch->lock);
	return r;
}

/* ---- kernel-side protocol ---------------------------------------------- */

/*
 * Under ch->lock: did the user of the module's session hand over a message
 * that the module has not received yet, in a page still that session's?
 * Then a receive delivers it even though the user has left since (or a
 * new user is attaching): a user that sends its last request, or its
 * CLOSE, and leaves at once must not lose it to the race with its own
 * detach.  Not once the module has been told of a newer attachment, nor
 * once the page has been reset for one (or replaced by the host), nor
 * after a call of the module saw the session end (over: -EPIPE, CLOSE,
 * -EPROTO), nor after the module ended it with kupdev_disconnect (it said
 * it wants nothing more from that user).
 */
static int
kup_chan_left_msg(struct kup_chan *ch)
{
	uint64_t kgen = KUP_READ_ONCE64(&ch->kgen);

	return ch->pgen != 0 && ch->pgen == kgen && ch->page_gen == ch->pgen &&
	    KUP_READ_ONCE64(&ch->ended_gen) != kgen &&
	    ch->kturn == KUP_KT_USER && !ch->over && !ch->peer_bad &&
	    KUP_LOAD_ACQ32(&ch->ctrl->turn) == KUP_TURN_KERNEL;
}

/* Is the channel usable by the module right now?  Under ch->lock.
 * receiving: a receive, which may still take what the departed user left
 * (kup_chan_left_msg). */
static int
kup_chan_enter(struct kup_chan *ch, int receiving)
{
	uint64_t kgen;

	if (KUP_READ_ONCE32(&ch->sc->shutdown))
		return -ESHUTDOWN;
	kgen = KUP_READ_ONCE64(&ch->kgen);
	if (!KUP_READ_ONCE32(&ch->attached) ||
	    KUP_READ_ONCE64(&ch->gen) != kgen || kgen == 0 ||
	    KUP_READ_ONCE64(&ch->ended_gen) == kgen) {
		/* (kup_chan_left_msg is 0 once kupdev_disconnect ended kgen) */
		if (receiving && kup_chan_left_msg(ch))
			return 0;
		ch->over = 1;   /* the session in progress (pgen) has ended */
		return -EPIPE;
	}
	if (ch->pgen != kgen) {
		if (ch->pgen != 0 && ch->active && !ch->over) {
			/* a straggler of the previous session: end it */
			ch->over = 1;
			return -EPIPE;
		}
		ch->pgen = kgen;
		ch->kturn = KUP_KT_KERNEL_CONSUMED;
		ch->peer_bad = 0;
		ch->active = 0;
		ch->over = 0;
		ch->k2u_seq = 0;
		ch->u2k_seq = 0;
	}
	if (ch->peer_bad)
		return -EPROTO;
	return 0;
}

/*
 * Protocol-error lines are rate-limited per device: a hostile user can
 * break the protocol, re-attach and break it again as fast as it likes, and
 * each refusal would otherwise be a kernel log line.  At most
 * KUP_PERR_BURST lines per KUP_PERR_WINDOW_NS; the first line after a quiet
 * spell says how many were left out.  Hosts without a clock (KUP_NOW_NS is
 * optional) log the first KUP_PERR_BURST, then one in KUP_PERR_EVERY.
 * Called under sc->lock; returns how many lines were dropped before this
 * one, or -1 when this one is to be dropped too.
 */
#define KUP_PERR_BURST     10U
#define KUP_PERR_WINDOW_NS 5000000000ULL
#define KUP_PERR_EVERY     1000U

static int64_t
kup_perr_admit(struct kupdev_softc *sc)
{
	int64_t dropped;

#ifdef KUP_NOW_NS
	uint64_t now = KUP_NOW_NS();

	if (sc->perr_lines == 0 || now - sc->perr_window >= KUP_PERR_WINDOW_NS) {
		sc->perr_window = now;
		sc->perr_lines = 0;
	}
	if (sc->perr_lines >= KUP_PERR_BURST) {
		sc->perr_dropped++;
		return -1;
	}
	sc->perr_lines++;
#else
	sc->perr_window++;
	if (sc->perr_window > KUP_PERR_BURST &&
	    sc->perr_window % KUP_PERR_EVERY != 0) {
		sc->perr_dropped++;
		return -1;
	}
#endif
	dropped = sc->perr_dropped;
	sc->perr_dropped = 0;
	return dropped;
}

/* Stop talking to a user that broke the protocol. */
static int
kup_chan_poison(struct kup_chan *ch, const char *why, uint64_t a, uint64_t b)
{
	struct kupdev_softc *sc = ch->sc;
	int64_t dropped;

	ch->peer_bad = 1;
	ch->over = 1;
	kup_lock(&sc->lock);
	if (ch->attached && KUP_READ_ONCE64(&ch->gen) == ch->pgen)
		kup_state_set(ch, KUP_STATE_PEER_GONE, 0);
	dropped = kup_perr_admit(sc);
	kup_unlock(&sc->lock);
	KUP_FENCE();
	kup_os_chan_wake_user(ch);
	if (dropped > 0)
		kup_os_log("kup: %s: %llu protocol-error lines not logged (rate limit)",
		    sc->name, (unsigned long long)dropped);
	if (dropped >= 0)
		kup_os_log("kup: %s chan %u: protocol error from user: %s (%llu, limit/expected %llu)",
		    sc->name, ch->id, why, (unsigned long long)a, (unsigned long long)b);
	return -EPROTO;
}

/* The page says the user handed the turn back: read the descriptor ONCE,
 * validate it against the private sizes and sequence, and take it. */
static int
kup_take_user_msg(struct kup_chan *ch, struct kupdev_msg *msg)
{
	uint32_t len = KUP_READ_ONCE32(&ch->ctrl->u2k.len);
	uint32_t kind = KUP_READ_ONCE32(&ch->ctrl->u2k.kind);
	uint64_t seq = KUP_READ_ONCE64(&ch->ctrl->u2k.seq);

	if (kind != KUP_KIND_DATA && kind != KUP_KIND_PASS &&
	    kind != KUP_KIND_CLOSE)
		return kup_chan_poison(ch, "bad message kind", kind, KUP_KIND_CLOSE);
	if ((size_t)len > ch->data_size)
		return kup_chan_poison(ch, "length beyond the data area", len,
		    ch->data_size);
	if (kind != KUP_KIND_DATA && len != 0)
		return kup_chan_poison(ch, "non-empty PASS/CLOSE", len, 0);
	if (seq != ch->u2k_seq + 1)
		return kup_chan_poison(ch, seq <= ch->u2k_seq ?
		    "repeated sequence number" : "sequence gap", seq,
		    ch->u2k_seq + 1);
	ch->u2k_seq = seq;
	ch->kturn = KUP_KT_KERNEL_CONSUMED;
	if (msg != NULL) {
		msg->data = ch->u2k;
		msg->len = len;
		msg->kind = kind;
		msg->seq = seq;
	}
	return 0;
}

static int
kup_recv_cond(struct kup_chan *ch)
{
	uint64_t kgen = KUP_READ_ONCE64(&ch->kgen);

	return KUP_LOAD_ACQ32(&ch->ctrl->turn) != KUP_TURN_USER ||
	    KUP_READ_ONCE32(&ch->sc->shutdown) != 0 ||
	    KUP_READ_ONCE32(&ch->attached) == 0 ||
	    KUP_READ_ONCE64(&ch->gen) != kgen || kgen != ch->pgen ||
	    KUP_READ_ONCE64(&ch->ended_gen) == kgen ||
	    KUP_READ_ONCE32(&ch->wakes) != 0;
}

#ifdef KUP_NOW_NS
/* Spin for the channel's budget (the receiving thread: ch->rx_waiter).
 * 1 when cond held. */
static int
kup_spin(struct kup_chan *ch, uint64_t t0)
{
	uint64_t budget = 2ULL * ch->spin_avg_ns, now;
#if defined(KUP_SPIN_YIELD) && KUP_SPIN_YIELD_NS > 0
	uint64_t ynext = t0 + (ch->spin_yield_now ? 0 : KUP_SPIN_YIELD_NS), after;
#endif
	int i;

	if (budget < KUP_SPIN_MIN_NS)
		budget = KUP_SPIN_MIN_NS;
	if (budget > KUP_SPIN_MAX_NS)
		budget = KUP_SPIN_MAX_NS;
	for (;;) {
		for (i = 0; i < KUP_SPIN_CHECK; i++) {
			if (kup_recv_cond(ch))
				return 1;
			KUP_CPU_RELAX();
		}
		now = KUP_NOW_NS();
		if (now - t0 >= budget)
			return 0;
#if defined(KUP_SPIN_YIELD) && KUP_SPIN_YIELD_NS > 0
		/* The user may be waiting for this very CPU.  A yield that
		 * took long let another thread run here: the user (or someone)
		 * shares this CPU, so yield at every check from now on (also
		 * in the next waits) until a yield comes straight back. */
		if (now >= ynext) {
			KUP_SPIN_YIELD();
			after = KUP_NOW_NS();
			ch->spin_yield_now = after - now >= KUP_SPIN_YIELD_NS;
			ynext = after + (ch->spin_yield_now ? 0 : KUP_SPIN_YIELD_NS);
		}
#endif
	}
}

/* A wait that started at t0 ended now: feed the running average. */
static void
kup_spin_learn(struct kup_chan *ch, uint64_t t0)
{
	uint64_t took = KUP_NOW_NS() - t0;
	int64_t sample = took <= KUP_SPIN_MAX_NS ? (int64_t)took : 0;
	int64_t avg = (int64_t)ch->spin_avg_ns;

	avg += (sample - avg) / 8;
	ch->spin_avg_ns = (uint32_t)(avg < 0 ? 0 : avg);
}
#endif

/* Wait until the page turn is no longer USER (or the channel's state
 * changed: kup_recv_cond), timeout_ms != 0.  Spins first (the budget
 * above), then sleeps.  The caller is ch->rx_waiter and does NOT hold
 * ch->lock: no other kernel-side call of the channel touches its session
 * state meanwhile (kup_chan_busy), and no attach or host section resets
 * or replaces its page (kup_chan_take_free). */
static int
kup_wait_turn(struct kup_chan *ch, int timeout_ms)
{
	int r;
#ifdef KUP_NOW_NS
	uint64_t t0 = KUP_NOW_NS();

	ch->spin_waits++;
	if (kup_spin(ch, t0)) {
		kup_spin_learn(ch, t0);
		return 0;
	}
#else
	int i;

	ch->spin_waits++;
	for (i = 0; i < KUP_SPIN_LOOPS; i++) {
		if (kup_recv_cond(ch))
			return 0;
		KUP_CPU_RELAX();
	}
#endif
	KUP_WRITE_ONCE32(&ch->ctrl->kernel_waiting, 1);
	KUP_FENCE();
	if (kup_recv_cond(ch)) {
		KUP_WRITE_ONCE32(&ch->ctrl->kernel_waiting, 0);
		r = 0;
	} else {
		r = kup_os_chan_sleep(ch, kup_recv_cond, timeout_ms);
		KUP_WRITE_ONCE32(&ch->ctrl->kernel_waiting, 0);
	}
#ifdef KUP_NOW_NS
	if (r == 0)
		kup_spin_learn(ch, t0);
#endif
	return r;
}

/*
 * A module thread that still holds the channel from its own receive and
 * calls receive, send or pass on it again is a bug in the module (unlock
 * first: the payload it received lives in the area the user writes next,
 * so it must not stay in use across the hand-over anyway).  Refuse with
 * -EDEADLK (the answer since the hold was a held lock that the call would
 * have waited for forever), and log it (each time, within the device's
 * misuse budget: KUP_MISUSE).  Only the holder writes its identity into
 * ch->holder, so a thread reads its own identity there only while it is
 * the holder; any other thread reads 0 or someone else's and goes on to
 * kup_chan_busy.
 */
static uint64_t
kup_self(void)
{
	return (uint64_t)(uintptr_t)KUP_CURTHREAD();
}

static int
kup_reentered(struct kup_chan *ch, const char *op)
{
	uint64_t holder = KUP_READ_ONCE64(&ch->holder);

	/* no holder, the common case: no need to know who we are (on FreeBSD
	 * that is an osd(9) lookup, on every send, receive and pass) */
	if (holder == 0 || holder != kup_self())
		return 0;
	KUP_MISUSE(ch->sc, "chan %u: %s while this thread holds the channel "
	    "from its receive: call kupdev_unlock_channel first (-EDEADLK)",
	    ch->id, op);
	return 1;
}

/*
 * Under ch->lock: is another module thread in the channel (kup_core.c's
 * header, "Who is in a channel")?  Then this call neither waits for it nor
 * touches the session it is part of.  Its answer, at once: the shutdown
 * (-ESHUTDOWN) or the user's departure (-EPIPE), which every call reports
 * first; else -EAGAIN for a send or pass while a receive waits (the turn
 * is the user's, or on its way back to that receive: what a send gets
 * while the user holds the turn), -EBUSY otherwise (a receive while
 * another waits; any call while another thread holds its message).
 * 0: nobody else is in the channel.
 */
static int
kup_chan_busy(struct kup_chan *ch, int sending)
{
	uint64_t kgen;

	if (!kup_chan_in_use(ch))
		return 0;
	if (KUP_READ_ONCE32(&ch->sc->shutdown))
		return -ESHUTDOWN;
	kgen = KUP_READ_ONCE64(&ch->kgen);
	if (!KUP_READ_ONCE32(&ch->attached) ||
	    KUP_READ_ONCE64(&ch->gen) != kgen || kgen == 0 ||
	    KUP_READ_ONCE64(&ch->ended_gen) == kgen)
		return -EPIPE;
	return sending && KUP_READ_ONCE64(&ch->rx_waiter) != 0 ? -EAGAIN :
	    -EBUSY;
}

/*
 * Under ch->lock, for the thread that is to receive (nobody else is in the
 * channel): answer a kupdev_wake_channel with -ECANCELED, taking it.  The
 * shutdown comes first (-ESHUTDOWN: the wake is moot then, and kept).
 * Taken before the receive looks at the session or the turn: a thread told
 * to stop stops, whatever its user did meanwhile (a message waiting stays
 * for the receive after).
 */
static int
kup_take_wake(struct kup_chan *ch)
{
	if (ch->wakes == 0)
		return 0;
	if (KUP_READ_ONCE32(&ch->sc->shutdown))
		return -ESHUTDOWN;
	KUP_WRITE_ONCE32(&ch->wakes, ch->wakes - 1);
	return -ECANCELED;
}

/*
 * Under ch->lock, for the receiving thread, once kup_recv_cond held (or
 * the first look found the turn back): take the user's message and hold
 * it, or report why there is none.
 */
static int
kup_recv_take(struct kup_chan *ch, struct kupdev_msg *msg)
{
	uint32_t turn;
	int r;

	/* shutdown / departure while waiting, or since the first look: a
	 * condition that held for those reasons says nothing of the turn */
	r = kup_chan_enter(ch, 1);
	if (r != 0)
		return r;
	turn = KUP_LOAD_ACQ32(&ch->ctrl->turn);
	if (turn != KUP_TURN_KERNEL)
		return kup_chan_poison(ch, "garbage in the turn word", turn,
		    KUP_TURN_KERNEL);
	r = kup_take_user_msg(ch, msg);
	if (r != 0)
		return r;
	ch->active = 1;
	if (msg->kind == KUP_KIND_CLOSE)
		ch->over = 1;   /* the user said goodbye */
	/* the module holds the message until kupdev_unlock_channel; the
	 * identity stays valid (not reused by another thread) until then,
	 * even if this thread exits holding it (kup_os.h, KUP_CURTHREAD) */
#ifdef KUP_CURTHREAD_PIN
	KUP_CURTHREAD_PIN();
#endif
	KUP_WRITE_ONCE64(&ch->holder, kup_self());
	return 0;
}

int
kupdev_receive_msg(struct kupdev_softc *sc, int chan_id,
    struct kupdev_msg *msg, int timeout_ms)
{
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, "kupdev_receive_msg");
	int r, waited = 0;

	if (ch == NULL)
		return -EINVAL;
	if (msg == NULL) {
		KUP_MISUSE(sc, "chan %d: kupdev_receive_msg: NULL msg", chan_id);
		return -EINVAL;
	}
	if (timeout_ms < KUPDEV_FOREVER) {
		/* the hosts' sleeps take any negative value as "no bound" */
		KUP_MISUSE(sc, "chan %d: kupdev_receive_msg: timeout %d ms (0 or "
		    "more, or KUPDEV_FOREVER = -1)", chan_id, timeout_ms);
		return -EINVAL;
	}
	if (kup_reentered(ch, "receive"))
		return -EDEADLK;
	kup_lock(&ch->lock);
	r = kup_chan_busy(ch, 0);
	if (r != 0)
		goto out;
	r = kup_take_wake(ch);
	if (r != 0)
		goto out;
	r = kup_chan_enter(ch, 1);
	if (r != 0)
		goto out;
	if (ch->kturn == KUP_KT_KERNEL_CONSUMED) {
		r = -EAGAIN;
		goto out;
	}
	if (!kup_recv_cond(ch)) {
		/* A 0 ms receive is a poll: one look, no spin.  The spin is
		 * there to spare a sleep and its wake-up when the user answers
		 * within microseconds; a poll never sleeps, and a module that
		 * polls many channels (or polls while it holds the turn)
		 * would pay the whole budget on each one. */
		if (timeout_ms == 0) {
			r = -ETIMEDOUT;
			goto out;
		}
		/* Wait for the user with the lock released (kup_core.c's
		 * header says why); rx_waiter keeps everyone else out of the
		 * session meanwhile. */
		KUP_WRITE_ONCE64(&ch->rx_waiter, kup_self());
		kup_core_dev_ref(sc);   /* kup_dev_live_ref says why */
		waited = 1;
		kup_unlock(&ch->lock);
		r = kup_wait_turn(ch, timeout_ms);
		kup_lock(&ch->lock);
		KUP_WRITE_ONCE64(&ch->rx_waiter, 0);
		/* a kupdev_wake_channel meanwhile is this wait's answer, also
		 * when the timeout ran out at the same time */
		if (ch->wakes != 0) {
			r = kup_take_wake(ch);   /* or -ESHUTDOWN */
			goto out;
		}
		if (r != 0)
			goto out;
	}
	r = kup_recv_take(ch, msg);
out:
	kup_chan_unlock(ch);
	if (waited)
		kup_core_dev_put(sc);   /* may free sc (and ch) */
	return r;
}

void *
kupdev_receive(struct kupdev_softc *sc, int chan_id)
{
	struct kupdev_msg m;

	if (kupdev_receive_msg(sc, chan_id, &m, KUPDEV_FOREVER) != 0)
		return NULL;
	return (void *)(uintptr_t)m.data;
}

/* ---- kupdev_receive_any: one thread, several channels ------------------
 *
 * The thread is in every channel of its set while it waits (ch->rx_waiter
 * on each, as a waiting kupdev_receive_msg is in its one), so every other
 * thread's call on those channels gets the answers of "Conventions" at
 * once and nobody else touches their sessions.  A round (kup_any_look)
 * takes each channel's lock in turn -- never two at once -- and does there
 * what a 0 ms kupdev_receive_msg does: the first channel, in round-robin
 * order, whose answer is anything but "nothing yet" ends the call, with
 * that answer; every other channel keeps the thread as its rx_waiter.
 * When no channel answered, the thread waits for all of them at once.
 * Before its first sleep it gets a wake-up object of its own
 * (kup_any_arm: struct kup_os_any, on the device's list) and every
 * channel it waits in names it (ch->any_w, under the channel's lock; the
 * looks after that name it as they go).  Then a fence, kernel_waiting set
 * on each page, one full fence, every channel looked at again, then one
 * sleep on that object (kup_os_any_sleep) -- the single-channel handshake
 * of kup_abi.h, once per channel: a user handing over on any of them
 * either is seen by the second look or sees its kernel_waiting and asks
 * for its wake-up, which wakes the object its channel names
 * (kup_chan_wake; kupsim's users write the channel's eventfd, which the
 * sleeper polls too) -- that thread's alone: threads serving disjoint
 * sets of a device do not wake each other for nothing (ch->any_idle_wakes
 * counts such wake-ups).  After the sleep every channel is let go
 * (kup_any_release) and the next round takes whatever woke it.  A set of
 * no channel waits for kupdev_wake_any (sc->any_wakes, taken before any
 * channel's answer) or the shutdown alone: both wake every object on the
 * device's list.  The round robin's memory is per channel
 * (ch->any_stamp), so threads serving disjoint sets do not disturb each
 * other's.
 */

struct kup_any {
	struct kupdev_softc *sc;
	const int *ids;
	int n;
	int looks;          /* kup_any_sleep_cond's calls in this sleep */
	int armed;          /* os is live, on sc->any_waiters, named by
	                     * ch->any_w of every channel the call waits in;
	                     * it holds a reference on sc */
	struct kup_any *next;   /* sc->any_waiters, under sc->lock */
	struct kup_os_any os;   /* this sleeper's own wake-up object */
};

/*
 * Wake ch's kernel-side waiter, after a change kup_recv_cond looks at
 * (the user's hand-over, a detach, a new attachment reported, a
 * disconnect, a kupdev_wake_channel): a receive asleep on it (the host's
 * channel object) or the kupdev_receive_any whose set holds it -- that
 * one thread, on its own object (ch->any_w), not every receive_any of the
 * device, which would each wake, look at their sets, find nothing and
 * sleep again.  No core lock held.  No lost wake-up: the waiter names
 * itself in ch->any_w, then fences, then sets kernel_waiting and fences
 * again before its last look (kup_any_wait); a user that saw the flag,
 * or a caller whose change that look missed, fences here and so finds
 * it.  ch->lock, under which the waiter also lets go of ch, keeps its
 * object alive while it is woken (kup_any_disarm comes after).
 */
static void
kup_chan_wake(struct kup_chan *ch)
{
	struct kup_any *w;

	kup_os_chan_wake(ch);
	KUP_FENCE();
	if (KUP_READ_ONCE64(&ch->any_w) == 0)
		return;
	kup_lock(&ch->lock);
	w = (struct kup_any *)(uintptr_t)KUP_READ_ONCE64(&ch->any_w);
	if (w != NULL)
		kup_os_any_wake(ch->sc, &w->os);
	kup_chan_unlock(ch);
}

static int
kup_any_cond(void *arg)
{
	const struct kup_any *a = arg;
	int i;

	if (KUP_READ_ONCE32(&a->sc->any_wakes) != 0 ||
	    KUP_READ_ONCE32(&a->sc->shutdown) != 0)   /* also with no channel */
		return 1;
	for (i = 0; i < a->n; i++)
		if (kup_recv_cond(&a->sc->chans[a->ids[i]]))
			return 1;
	return 0;
}

/* The condition of the host's sleep (kup_os_any_sleep): as kup_any_cond,
 * and a look after the first that finds nothing -- the sleep was woken
 * for no channel of the set -- is counted on every channel of it
 * (ch->any_idle_wakes). */
static int
kup_any_sleep_cond(void *arg)
{
	struct kup_any *a = arg;
	int i;

	if (kup_any_cond(a))
		return 1;
	if (a->looks++ > 0)
		for (i = 0; i < a->n; i++) {
			struct kup_chan *ch = &a->sc->chans[a->ids[i]];

			KUP_WRITE_ONCE32(&ch->any_idle_wakes,
			    ch->any_idle_wakes + 1);
		}
	return 0;
}

/* Where the round robin starts: after the channel of the set that was
 * answered for last (by any receive_any on this device), so that a busy
 * channel cannot keep the others waiting: with an unchanged set, a
 * channel that has something is answered for within n calls. */
static int
kup_any_start(struct kupdev_softc *sc, const int *ids, int n)
{
	uint64_t best = 0, st;
	int i, at = -1;

	if (n == 0)
		return 0;
	for (i = 0; i < n; i++) {
		st = KUP_READ_ONCE64(&sc->chans[ids[i]].any_stamp);
		if (st > best) {
			best = st;
			at = i;
		}
	}
	return (at + 1) % n;
}

/* The thread leaves the first `cnt` channels of the round (from start)
 * that it waits in. */
static void
kup_any_release(struct kupdev_softc *sc, const int *ids, int n, int start,
    int cnt)
{
	int k;

	for (k = 0; k < cnt; k++) {
		struct kup_chan *ch = &sc->chans[ids[(start + k) % n]];

		kup_lock(&ch->lock);
		if (KUP_READ_ONCE64(&ch->rx_waiter) == kup_self()) {
			KUP_WRITE_ONCE64(&ch->rx_waiter, 0);
			KUP_WRITE_ONCE64(&ch->any_w, 0);
		}
		kup_chan_unlock(ch);
	}
}

/* A device-level kupdev_wake_any waiting: take it (-ECANCELED); the
 * shutdown first (-ESHUTDOWN); else 0. */
static int
kup_any_take_dev_wake(struct kupdev_softc *sc)
{
	int r = 0;

	if (KUP_READ_ONCE32(&sc->shutdown))
		return -ESHUTDOWN;
	if (KUP_READ_ONCE32(&sc->any_wakes) == 0)
		return 0;
	kup_lock(&sc->lock);
	if (sc->shutdown) {
		r = -ESHUTDOWN;
	} else if (sc->any_wakes != 0) {
		KUP_WRITE_ONCE32(&sc->any_wakes, sc->any_wakes - 1);
		r = -ECANCELED;
	}
	kup_unlock(&sc->lock);
	return r;
}

#define KUP_ANY_NONE 1   /* kup_any_look: no channel has an answer */

/*
 * One round over the set, from start: for each channel, under its lock,
 * the answer of a 0 ms kupdev_receive_msg.  The first answer ends the
 * round (*which: its channel, or -1 for -ESHUTDOWN / a kupdev_wake_any);
 * the channels before it are let go.  KUP_ANY_NONE: no channel had one,
 * and the thread now waits in every channel of the set (rx_waiter).
 */
static int
kup_any_look(struct kup_any *a, int start, struct kupdev_msg *msg,
    int *which)
{
	struct kupdev_softc *sc = a->sc;
	const int *ids = a->ids;
	int k, r, n = a->n;

	r = kup_any_take_dev_wake(sc);
	if (r != 0) {
		*which = -1;
		return r;
	}
	for (k = 0; k < n; k++) {
		struct kup_chan *ch = &sc->chans[ids[(start + k) % n]];

		if (kup_reentered(ch, "receive_any")) {
			r = -EDEADLK;
			goto answer_unlocked;
		}
		kup_lock(&ch->lock);
		r = kup_chan_busy(ch, 0);
		if (r == 0)
			r = kup_take_wake(ch);
		if (r == 0)
			r = kup_chan_enter(ch, 1);
		if (r == 0 && ch->kturn == KUP_KT_KERNEL_CONSUMED)
			r = -EAGAIN;
		if (r == 0) {
			if (kup_recv_cond(ch)) {
				r = kup_recv_take(ch, msg);
			} else {
				KUP_WRITE_ONCE64(&ch->rx_waiter, kup_self());
				if (a->armed)
					KUP_WRITE_ONCE64(&ch->any_w,
					    (uintptr_t)a);
				kup_chan_unlock(ch);
				continue;
			}
		}
		KUP_WRITE_ONCE64(&ch->any_stamp,
		    __atomic_add_fetch(&sc->any_clock, 1, __ATOMIC_RELAXED));
		kup_chan_unlock(ch);
answer_unlocked:
		kup_any_release(sc, ids, n, start, k);
		*which = r == -ESHUTDOWN ? -1 : (int)ch->id;
		return r;
	}
	return KUP_ANY_NONE;
}

/* Every channel of the set has this thread as its rx_waiter and no
 * answer: wait for one (timeout_ms != 0).  Spins a little first, then
 * the handshake of kup_abi.h on every page, then one sleep. */
static int
kup_any_wait(struct kup_any *a, int timeout_ms)
{
	int i, r;
#ifdef KUP_NOW_NS
	uint64_t t0 = KUP_NOW_NS();

	do {
		for (i = 0; i < KUP_SPIN_CHECK; i++) {
			if (kup_any_cond(a))
				return 0;
			KUP_CPU_RELAX();
		}
	} while (KUP_NOW_NS() - t0 < KUP_SPIN_INIT_NS);
#else
	for (i = 0; i < KUP_SPIN_LOOPS; i++) {
		if (kup_any_cond(a))
			return 0;
		KUP_CPU_RELAX();
	}
#endif
	/* ch->any_w (kup_any_look, kup_any_arm) before any flag: a user
	 * that sees a flag and asks for its wake-up must find this sleeper
	 * there (kup_chan_wake's fence pairs with this one) */
	KUP_FENCE();
	for (i = 0; i < a->n; i++)
		KUP_WRITE_ONCE32(&a->sc->chans[a->ids[i]].ctrl->kernel_waiting, 1);
	KUP_FENCE();
	if (kup_any_cond(a)) {
		r = 0;
	} else {
		a->looks = 0;
		r = kup_os_any_sleep(a->sc, &a->os, a->ids, a->n,
		    kup_any_sleep_cond, a, timeout_ms);
	}
	for (i = 0; i < a->n; i++)
		KUP_WRITE_ONCE32(&a->sc->chans[a->ids[i]].ctrl->kernel_waiting, 0);
	return r;
}

/* Before the call's first sleep: its own wake-up object, on the device's
 * list (kupdev_wake_any, the shutdown) and named by every channel of the
 * set, in all of which it waits now (kup_any_look found nothing): from
 * here on a wake-up of one of them reaches this thread, and no other
 * receive_any of the device.  A reference on sc too (kup_dev_live_ref
 * says why).  0, or the host's error (the channels are the caller's to
 * let go). */
static int
kup_any_arm(struct kup_any *a)
{
	struct kupdev_softc *sc = a->sc;
	int i, r;

	r = kup_os_any_init(sc, &a->os);
	if (r != 0)
		return r;
	kup_lock(&sc->lock);
	sc->refs++;
	a->next = sc->any_waiters;
	sc->any_waiters = a;
	kup_unlock(&sc->lock);
	a->armed = 1;
	for (i = 0; i < a->n; i++) {
		struct kup_chan *ch = &sc->chans[a->ids[i]];

		kup_lock(&ch->lock);
		if (KUP_READ_ONCE64(&ch->rx_waiter) == kup_self())
			KUP_WRITE_ONCE64(&ch->any_w, (uintptr_t)a);
		kup_chan_unlock(ch);
	}
	return 0;
}

/* After the call let go of every channel (no ch->any_w names it): off the
 * device's list, so no waker can reach the object any more; then the
 * object and the reference go.  May free sc. */
static void
kup_any_disarm(struct kup_any *a)
{
	struct kupdev_softc *sc = a->sc;
	struct kup_any **pp;

	kup_lock(&sc->lock);
	for (pp = &sc->any_waiters; *pp != a; pp = &(*pp)->next)
		;
	*pp = a->next;
	kup_unlock(&sc->lock);
	kup_os_any_fini(sc, &a->os);
	a->armed = 0;
	kup_core_dev_put(sc);
}

/* Under sc->lock: wake every receive_any of sc that may sleep
 * (kupdev_wake_any, the shutdown: each looks, one takes a wake_any). */
static void
kup_any_wake_all_locked(struct kupdev_softc *sc)
{
	struct kup_any *w;

	for (w = sc->any_waiters; w != NULL; w = w->next)
		kup_os_any_wake(sc, &w->os);
}

/* The set is usable: 0..channels ids, each in range, none twice.  Logs
 * what is wrong (misuse) and returns 0 otherwise. */
static int
kup_any_args_ok(struct kupdev_softc *sc, const int *ids, int n)
{
	uint8_t seen[KUP_MAX_CHANNELS / 8];
	int i;

	if (n < 0 || (size_t)n > sc->chan_cnt) {
		KUP_MISUSE(sc, "kupdev_receive_any: %d channels (0..%zu, the "
		    "device's)", n, sc->chan_cnt);
		return 0;
	}
	if (ids == NULL && n != 0) {
		KUP_MISUSE(sc, "kupdev_receive_any: NULL channel list");
		return 0;
	}
	memset(seen, 0, sizeof(seen));
	for (i = 0; i < n; i++) {
		int id = ids[i];

		if (id < 0 || (size_t)id >= sc->chan_cnt) {
			KUP_MISUSE(sc, "kupdev_receive_any: channel %d (entry %d) "
			    "out of range 0..%zu", id, i, sc->chan_cnt - 1);
			return 0;
		}
		if (seen[id / 8] & (1U << (id % 8))) {
			KUP_MISUSE(sc, "kupdev_receive_any: channel %d twice (entry "
			    "%d)", id, i);
			return 0;
		}
		seen[id / 8] |= (uint8_t)(1U << (id % 8));
	}
	return 1;
}

int
kupdev_receive_any(struct kupdev_softc *sc, const int *chans, int n,
    struct kupdev_msg *msg, int timeout_ms, int *chan_out)
{
	struct kup_any a;
	int r, start, which = -1, left = timeout_ms;
#ifdef KUP_NOW_NS
	uint64_t deadline = 0;
#endif

	if (chan_out != NULL)
		*chan_out = -1;
	if (sc == NULL) {
		KUP_NODEV_MISUSE("kupdev_receive_any: NULL device");
		return -EINVAL;
	}
	if (msg == NULL || chan_out == NULL) {
		KUP_MISUSE(sc, "kupdev_receive_any: NULL %s", msg == NULL ?
		    "msg" : "chan_out");
		return -EINVAL;
	}
	if (timeout_ms < KUPDEV_FOREVER) {
		KUP_MISUSE(sc, "kupdev_receive_any: timeout %d ms (0 or more, or "
		    "KUPDEV_FOREVER = -1)", timeout_ms);
		return -EINVAL;
	}
	if (!kup_any_args_ok(sc, chans, n))
		return -EINVAL;
	memset(&a, 0, sizeof(a));
	a.sc = sc;
	a.ids = chans;
	a.n = n;
	start = kup_any_start(sc, chans, n);
	for (;;) {
		r = kup_any_look(&a, start, msg, &which);
		if (r != KUP_ANY_NONE)
			break;
		/* the thread is in every channel now */
		if (left == 0) {
			kup_any_release(sc, chans, n, start, n);
			r = -ETIMEDOUT;
			break;
		}
		if (!a.armed) {
			r = kup_any_arm(&a);
			if (r != 0) {
				kup_any_release(sc, chans, n, start, n);
				which = -1;
				break;
			}
#ifdef KUP_NOW_NS
			if (timeout_ms > 0)
				deadline = KUP_NOW_NS() +
				    (uint64_t)timeout_ms * 1000000ULL;
#endif
		}
		r = kup_any_wait(&a, left);
		kup_any_release(sc, chans, n, start, n);
		if (r == -EINTR)
			break;
		/* r == 0: the next round takes what woke us; -ETIMEDOUT: one
		 * last round (a wake or a message at the deadline is the
		 * answer, as for kupdev_receive_msg) */
		if (r == -ETIMEDOUT) {
			left = 0;
			continue;
		}
#ifdef KUP_NOW_NS
		if (timeout_ms > 0) {
			uint64_t now = KUP_NOW_NS();

			left = now >= deadline ? 0 :
			    (int)((deadline - now + 999999ULL) / 1000000ULL);
		}
#endif
	}
	*chan_out = which;
	if (a.armed)
		kup_any_disarm(&a);   /* may free sc */
	return r == 0 ? which : r;
}

/* One more device-level wake owed (kupdev_wake's sc->wakes, kupdev_wake_any's
 * sc->any_wakes), saturating: 0, or -ESHUTDOWN (nothing owed: every wait
 * answers that anyway).  The caller then wakes the sleepers it concerns. */
static int
kup_dev_count_wake(struct kupdev_softc *sc, uint32_t *owed)
{
	int r = 0;

	kup_lock(&sc->lock);
	if (sc->shutdown)
		r = -ESHUTDOWN;
	else if (*owed != 0xffffffffU)
		KUP_WRITE_ONCE32(owed, *owed + 1);
	kup_unlock(&sc->lock);
	return r;
}

int
kupdev_wake_any(struct kupdev_softc *sc)
{
	int r;

	if (!kup_dev_live(sc, "kupdev_wake_any", "called after kupdev_unload?"))
		return -EINVAL;
	r = kup_dev_count_wake(sc, &sc->any_wakes);
	if (r == 0) {
		kup_lock(&sc->lock);
		kup_any_wake_all_locked(sc);
		kup_unlock(&sc->lock);
	}
	return r;
}

void
kupdev_unlock_channel(struct kupdev_softc *sc, int chan_id)
{
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, "kupdev_unlock_channel");

	if (ch == NULL)
		return;
	/* only the thread that received may let go of the message: another
	 * thread's unlock would let the user overwrite the payload under the
	 * holder's feet */
	if (KUP_READ_ONCE64(&ch->holder) != kup_self()) {
		KUP_MISUSE(sc, "chan %d: kupdev_unlock_channel: unlock without a "
		    "receive by this thread", chan_id);
		return;
	}
	kup_lock(&ch->lock);
	KUP_WRITE_ONCE64(&ch->holder, 0);
#ifdef KUP_THREAD_UNPIN
	KUP_THREAD_UNPIN(kup_self());   /* never the last reference: this thread runs */
#endif
	kup_chan_unlock(ch);
}

/* Under ch->lock, after kup_chan_enter: make sure the kernel holds the
 * turn.  An unread user message is validated and dropped (kupdev.h: the
 * seed's semantics); a dropped DATA message is logged, within the misuse
 * budget, since the module then never saw what its user sent. */
static int
kup_own_turn(struct kup_chan *ch, const char *op)
{
	uint32_t turn;

	if (ch->kturn == KUP_KT_KERNEL_CONSUMED)
		return 0;
	turn = KUP_LOAD_ACQ32(&ch->ctrl->turn);
	if (turn == KUP_TURN_USER)
		return -EAGAIN;
	if (turn != KUP_TURN_KERNEL)
		return kup_chan_poison(ch, "garbage in the turn word", turn,
		    KUP_TURN_KERNEL);
	{
		struct kupdev_msg dropped;
		int r = kup_take_user_msg(ch, &dropped);

		if (r == 0 && dropped.kind == KUP_KIND_CLOSE)
			ch->over = 1;
		if (r == 0 && dropped.kind == KUP_KIND_DATA)
			KUP_MISUSE(ch->sc, "chan %u: %s dropped the user's unread "
			    "message (seq %llu, %zu bytes): receive before "
			    "sending again", ch->id, op,
			    (unsigned long long)dropped.seq, dropped.len);
		return r;
	}
}

static void
kup_handover(struct kup_chan *ch, uint32_t len, uint32_t kind, uint64_t seq,
    uint32_t turn_value)
{
	KUP_WRITE_ONCE32(&ch->ctrl->k2u.len, len);
	KUP_WRITE_ONCE32(&ch->ctrl->k2u.kind, kind);
	KUP_WRITE_ONCE64(&ch->ctrl->k2u.seq, seq);
	ch->kturn = KUP_KT_USER;
	KUP_STORE_REL32(&ch->ctrl->turn, turn_value);
	KUP_FENCE();
	if (KUP_READ_ONCE32(&ch->ctrl->user_waiting) != 0)
		kup_os_chan_wake_user(ch);
}

static int
kup_send_common(struct kupdev_softc *sc, int chan_id, const void *data,
    size_t len, uint32_t kind)
{
	const char *op = kind == KUP_KIND_PASS ? "kupdev_pass" : "kupdev_send";
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, op);
	int r;

	if (ch == NULL)
		return -EINVAL;
	if (len != 0 && data == NULL) {
		KUP_MISUSE(sc, "chan %d: %s: NULL data with length %zu", chan_id,
		    op, len);
		return -EINVAL;
	}
	if (len > ch->data_size) {
		KUP_MISUSE(sc, "chan %d: %s: %zu bytes do not fit the channel's "
		    "%zu (nothing sent)", chan_id, op, len, ch->data_size);
		return -EMSGSIZE;
	}
	if (kup_reentered(ch, kind == KUP_KIND_PASS ? "pass" : "send"))
		return -EDEADLK;
	kup_lock(&ch->lock);
	r = kup_chan_busy(ch, 1);
	if (r != 0)
		goto out;
	r = kup_chan_enter(ch, 0);
	if (r != 0)
		goto out;
	r = kup_own_turn(ch, op);
	if (r != 0)
		goto out;
	if (len != 0)
		memcpy(ch->k2u, data, len);
	ch->k2u_seq++;
	ch->active = 1;
	kup_handover(ch, (uint32_t)len, kind, ch->k2u_seq, KUP_TURN_USER);
out:
	kup_chan_unlock(ch);
	return r;
}

int
kupdev_send(struct kupdev_softc *sc, const void *data, size_t len, int chan_id)
{
	return kup_send_common(sc, chan_id, data, len, KUP_KIND_DATA);
}

int
kupdev_pass(struct kupdev_softc *sc, int chan_id)
{
	return kup_send_common(sc, chan_id, NULL, 0, KUP_KIND_PASS);
}

/*
 * kupdev_disconnect: end the user's session from the kernel side.  Why
 * the user keeps the channel until it lets go: on Linux and FreeBSD its
 * mapping IS the channel's memory (one vmalloc area / VM object for every
 * attachment), so handing the channel to the next user while the ended
 * one still maps it would let it read and write the next user's pages --
 * the very thing kupsim's fresh memfds and the attach's page reset
 * exist to prevent.  So the core does what it does for a user that broke
 * the protocol: KUP_STATE_PEER_GONE on the page ("kernel side gave up on
 * this user", in ABI version 1 from the start: every libkup already
 * reports it as EKU_PEER, so no new state, no new ABI version), a
 * wake-up of the user (a blocked receive, a poller: Linux POLLERR), and
 * ended_gen, which makes every module call of that session -EPIPE and
 * wakes a module receive waiting for that user.  The user's next or
 * blocked operation fails with EKU_PEER, libkup's close then detaches
 * without a CLOSE (the state is not OK), and the channel is free for the
 * next attach.  Not under the turn protocol: the turn word is not
 * touched, so neither side's view of the turn changes; kup_turn.pml
 * -DDISCONNECT checks that nobody sleeps for ever and nothing is read
 * from the other side's area meanwhile.
 */
int
kupdev_disconnect(struct kupdev_softc *sc, int chan_id)
{
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, "kupdev_disconnect");
	uint64_t kgen;
	int r;

	if (ch == NULL)
		return -EINVAL;
	kup_lock(&ch->lock);
	if (KUP_READ_ONCE32(&sc->shutdown)) {
		r = -ESHUTDOWN;
		goto out;
	}
	kgen = KUP_READ_ONCE64(&ch->kgen);
	kup_lock(&sc->lock);   /* ch before sc; the page state under sc */
	if (!ch->attached || ch->gen != kgen || kgen == 0 ||
	    ch->ended_gen == kgen) {
		/* no session with a user: it left, or it has not been
		 * reported by kupdev_wait_channel yet, or it was ended
		 * already */
		kup_unlock(&sc->lock);
		r = -EPIPE;
		goto out;
	}
	KUP_WRITE_ONCE64(&ch->ended_gen, kgen);
	kup_state_set(ch, KUP_STATE_PEER_GONE, 0);
	kup_unlock(&sc->lock);
	/* over for the core too, as after an -EPIPE the module got: the next
	 * attachment's first call must not be taken for a straggler's (the
	 * module said it is done; it need not call again to end it) */
	if (ch->pgen == kgen)
		ch->over = 1;
	KUP_FENCE();
	kup_os_chan_wake_user(ch);   /* under ch->lock: as kup_chan_poison */
	r = 0;
out:
	kup_chan_unlock(ch);
	if (r == 0)
		kup_chan_wake(ch);   /* a module receive waiting for it */
	return r;
}

int
kupdev_wake_channel(struct kupdev_softc *sc, int chan_id)
{
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, "kupdev_wake_channel");
	int r = 0;

	if (ch == NULL)
		return -EINVAL;
	kup_lock(&ch->lock);
	if (KUP_READ_ONCE32(&sc->shutdown))
		r = -ESHUTDOWN;   /* every receive answers that now */
	else if (ch->wakes != 0xffffffffU)
		KUP_WRITE_ONCE32(&ch->wakes, ch->wakes + 1);
	kup_chan_unlock(ch);
	if (r == 0)
		kup_chan_wake(ch);
	return r;
}

int
kupdev_wake(struct kupdev_softc *sc)
{
	int r;

	if (!kup_dev_live(sc, "kupdev_wake", "called after kupdev_unload?"))
		return -EINVAL;
	r = kup_dev_count_wake(sc, &sc->wakes);
	if (r == 0)
		kup_os_dev_wake(sc);
	return r;
}

int
kup_core_test_handover(struct kupdev_softc *sc, int chan_id, uint32_t len,
    uint32_t kind, int64_t seq_delta, uint32_t turn_value)
{
	struct kup_chan *ch = kup_chan_lookup(sc, chan_id);
	int r;

	if (ch == NULL)
		return -EINVAL;
	kup_lock(&ch->lock);
	r = kup_chan_busy(ch, 1);
	if (r == 0)
		r = kup_chan_enter(ch, 0);
	if (r == 0)
		r = kup_own_turn(ch, "test hand-over");
	if (r == 0) {
		ch->k2u_seq = ch->k2u_seq + 1 + (uint64_t)seq_delta;
		kup_handover(ch, len, kind, ch->k2u_seq, turn_value);
	}
	kup_chan_unlock(ch);
	return r;
}

/* ---- informational --------------------------------------------------- */

size_t
kupdev_channel_count(const struct kupdev_softc *sc)
{
	return sc != NULL ? sc->chan_cnt : 0;
}

size_t
kupdev_data_size(const struct kupdev_softc *sc)
{
	return sc != NULL ? sc->data_size : 0;
}

int
kupdev_channel_attached(struct kupdev_softc *sc, int chan_id)
{
	struct kup_chan *ch = kup_chan_arg(sc, chan_id, "kupdev_channel_attached");

	if (ch == NULL)
		return -EINVAL;
	return KUP_READ_ONCE32(&ch->attached) != 0;
}

size_t
kup_core_chan_bytes(const struct kup_chan *ch)
{
	return ch->bytes;
}

void *
kup_core_chan_mem(const struct kup_chan *ch)
{
	return ch->mem;
}

uint32_t
kup_core_chan_id(const struct kup_chan *ch)
{
	return ch->id;
}

struct kupdev_softc *
kup_core_chan_dev(const struct kup_chan *ch)
{
	return ch->sc;
}

struct kup_os_chan *
kup_core_chan_os(struct kup_chan *ch)
{
	return &ch->os;
}

struct kup_os_dev *
kup_core_dev_os(struct kupdev_softc *sc)
{
	return &sc->os;
}

struct kup_chan *
kup_core_chan_at(struct kupdev_softc *sc, uint32_t chan_id)
{
	if (sc == NULL || chan_id >= sc->chan_cnt)
		return NULL;
	return &sc->chans[chan_id];
}

const char *
kup_core_dev_name(const struct kupdev_softc *sc)
{
	return sc->name;
}

void
kup_core_info(struct kupdev_softc *sc, struct kup_ioc_info *out)
{
	size_t i;

	memset(out, 0, sizeof(*out));
	kup_lock(&sc->lock);
	memcpy(out->name, sc->name, sizeof(out->name));
	out->abi_version = KUP_ABI_VERSION;
	out->page_size = sc->page_size;
	out->chan_count = (uint32_t)sc->chan_cnt;
	out->announced = sc->announced;
	out->pages = (uint32_t)sc->pages;
	out->max_msg = (uint32_t)sc->data_size;
	out->notify_gen = sc->notify_gen;
	out->shutting_down = sc->shutdown != 0;
	out->attached_chan = KUP_IOC_CHAN_ANY;
	for (i = 0; i < sc->chan_cnt; i++)
		out->attached[i] = (uint8_t)((sc->chans[i].attached ?
		    KUP_INFO_ATTACHED : 0) |
		    (KUP_READ_ONCE64(&sc->chans[i].holder) != 0 ?
		    KUP_INFO_MODULE_HOLDS : 0));
	kup_unlock(&sc->lock);
}

/*
 * kup_ratelimit_admit (kup_module.h): a module's own per-event log lines,
 * limited the way the core limits its protocol-error lines, but reusable
 * (any number of limiters, static ones included: no init call, no lock
 * to create, hence atomics on the limiter's fields).  One thread opens a
 * window (the compare-exchange of start_ns); the others count into it.
 * At a window's edge a racing thread may count into the old window's
 * `used` before the opener resets it, and lose its line: an approximation
 * a log limiter can afford, and no lock for modules to get wrong.
 */
int
kup_ratelimit_admit(struct kup_ratelimit *rl)
{
	uint64_t now, start, win;
	unsigned int n, missed;

	if (rl == NULL)
		return 1;
	now = kup_os_now_ns();
	if (now == 0)
		now = 1;   /* 0 is "no window yet" */
	win = (uint64_t)(rl->window_ms != 0 ? rl->window_ms : 1U) * 1000000ULL;
	start = __atomic_load_n(&rl->start_ns, __ATOMIC_ACQUIRE);
	/* signed: a thread that read the clock before another opened the
	 * window sees "now" slightly before start -- still that window */
	if (start == 0 || (int64_t)(now - start) >= (int64_t)win) {
		if (__atomic_compare_exchange_n(&rl->start_ns, &start, now, 0,
		    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
			__atomic_store_n(&rl->used, 0U, __ATOMIC_RELEASE);
			missed = __atomic_exchange_n(&rl->missed, 0U,
			    __ATOMIC_ACQ_REL);
			if (missed != 0)
				kup_os_log("%s: %u lines not logged", rl->name,
				    missed);
		}
	}
	n = __atomic_add_fetch(&rl->used, 1U, __ATOMIC_ACQ_REL);
	if (n <= rl->burst)
		return 1;
	__atomic_add_fetch(&rl->missed, 1U, __ATOMIC_ACQ_REL);
	if (n == rl->burst + 1U)
		kup_os_log("%s: further lines not logged for up to %u ms",
		    rl->name, rl->window_ms);
	return 0;
}

/*
 * kup_os_param_int's one rule for every host (kup_module.h): no value, or
 * an empty one, is defval; otherwise an optional sign and decimal digits,
 * nothing else (no blanks, no 0x or leading-0 octal, no trailing text),
 * within int.  Anything else is logged, naming the module, the parameter,
 * where it came from and the value, and gives defval.  Why here and not in
 * each host: kstrtoint(base 0), getenv_int and strtol each accept a
 * different set ("0x10", "010", " 5", "5k"), and a module must read the
 * same value on every host.  v need not be NUL-terminated: at most len
 * bytes are read.
 */
int
kup_core_param_value(const char *module, const char *name, const char *src,
    const char *v, size_t len, int defval)
{
	char shown[KUP_SHOW_MAX + 4];
	int64_t x = 0, limit = 2147483647LL;
	size_t i = 0;
	int neg = 0, digits = 0, big = 0;

	if (v == NULL || len == 0 || v[0] == '\0')
		return defval;
	if (v[0] == '+' || v[0] == '-') {
		neg = v[0] == '-';
		limit += neg;   /* -2147483648 fits, +2147483648 does not */
		i = 1;
	}
	for (; i < len && v[i] >= '0' && v[i] <= '9'; i++, digits++) {
		/* stop accumulating once past the limit: no overflow */
		if (!big)
			x = x * 10 + (v[i] - '0');
		if (x > limit)
			big = 1;
	}
	if (digits == 0 || (i < len && v[i] != '\0')) {
		kup_os_log("kup: module %s: parameter %s (%s) = \"%s\" is not a "
		    "decimal integer: using the default %d", module, name, src,
		    kup_show(shown, v, len), defval);
		return defval;
	}
	if (big) {
		kup_os_log("kup: module %s: parameter %s (%s) = \"%s\" is out of "
		    "range (an int: -2147483648 to 2147483647): using the "
		    "default %d", module, name, src, kup_show(shown, v, len),
		    defval);
		return defval;
	}
	return (int)(neg ? -x : x);
}

int
kup_core_errno_to_kup(int neg_errno)
{
	switch (neg_errno) {
	case 0:                 return KUP_E_OK;
	case -ESHUTDOWN:        return KUP_E_SHUTDOWN;
	case -EAGAIN:           return KUP_E_NOTREADY;
	case -EMSGSIZE:         return KUP_E_TOOBIG;
	case -ETIMEDOUT:        return KUP_E_TIMEDOUT;
	case -EPROTO:           return KUP_E_PROTO;
	case -EPROTONOSUPPORT:  return KUP_E_VERSION;
	case -EBUSY:            return KUP_E_BUSY;
	case -EINPROGRESS:      return KUP_E_RELEASING;
	case -ENOENT:           return KUP_E_NOENT;
	case -EPIPE:            return KUP_E_PEER;
	case -EINVAL:           return KUP_E_INVAL;
	default:                return KUP_E_SYS;
	}
}
