/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_core_priv.h -- the core's private structures.  Included by
 * kup_core.c and by test code (kmod/kupsim/hostile.c, tests/c); hosts use
 * the accessors in kup_os.h instead.
 */
#ifndef KUP_CORE_PRIV_H
#define KUP_CORE_PRIV_H

#include "kup_os.h"

/* The kernel side's private view of the turn (never read from the page). */
#define KUP_KT_KERNEL_CONSUMED 0U  /* kernel holds the turn, nothing unread */
#define KUP_KT_USER            1U  /* handed to user space (page turn USER,
                                    * until the page says KERNEL again) */

struct kup_any;

struct kup_chan {
	struct kupdev_softc *sc;
	uint32_t id;
	kup_lock_t lock;          /* kernel callers: held for short sections
	                           * only, never across a sleep or module code
	                           * (kup_core.c, "Who is in a channel") */
	uint64_t holder;          /* KUP_CURTHREAD() of the thread that holds
	                           * the message it received, from its receive
	                           * to kupdev_unlock_channel, else 0; written
	                           * under lock, read without it */
	uint64_t rx_waiter;       /* KUP_CURTHREAD() of a receive that waits
	                           * for the user with lock released, else 0;
	                           * written under lock.  Its fields below
	                           * (spin_*) are that thread's meanwhile */

	void    *mem;             /* channel mapping, kernel address */
	size_t   bytes;           /* private copy: never read from the page */
	size_t   data_size;       /* private copy */
	struct kup_ctrl *ctrl;
	uint8_t *k2u;
	uint8_t *u2k;

	/* attachment state: written under sc->lock, read with READ_ONCE */
	uint32_t attached;        /* a user side holds the channel */
	uint32_t pending;         /* attached, module not told yet */
	uint64_t gen;             /* attachment generation */
	uint64_t kgen;            /* generation the module was told about */
	uint32_t state;           /* what ctrl->state was last set to: the page
	                           * is user-writable, so the core never reads
	                           * it back (kup_state_set) */
	uint64_t page_gen;        /* under lock: the attachment the page was
	                           * last reset for; 0 when the host may have
	                           * replaced the memory since
	                           * (kup_core_chan_exclusive_try) */

	/* kernel-side protocol state, under lock */
	uint64_t pgen;            /* generation this state belongs to */
	uint32_t kturn;           /* KUP_KT_* */
	uint32_t active;          /* an op of session pgen succeeded */
	uint32_t over;            /* session pgen ended for the module: it got
	                           * -EPIPE/-EPROTO or the user's CLOSE */
	uint32_t peer_bad;        /* user broke the protocol: -EPROTO */
	uint64_t ended_gen;       /* the attachment kupdev_disconnect ended
	                           * (0: none); written under lock, read with
	                           * READ_ONCE by a waiting receive's condition.
	                           * A generation, not a flag: it ends exactly
	                           * that user's session, and the next
	                           * attachment (a new generation) is not
	                           * touched by it */
	uint32_t wakes;           /* kupdev_wake_channel calls not yet answered
	                           * by a receive (-ECANCELED); under lock, read
	                           * with READ_ONCE by the waiting receive */
	uint64_t k2u_seq;         /* last seq sent */
	uint64_t u2k_seq;         /* last seq received */
	uint32_t spin_avg_ns;     /* the receiving thread's: running average of
	                           * waits a spin could catch (KUP_NOW_NS hosts) */
	uint32_t spin_waits;      /* the receiving thread's: waits that spun
	                           * before sleeping (statistics; the tests
	                           * read it: a 0 ms receive never spins) */
	int      spin_yield_now;  /* the receiving thread's: the last yield let another
	                           * thread run (it shares our CPU): yield at
	                           * once in the next spin */
	uint64_t any_stamp;       /* when kupdev_receive_any last answered for
	                           * this channel (sc->any_clock), 0: never;
	                           * written under lock, read with READ_ONCE:
	                           * its round robin starts after the channel
	                           * of its set answered for last */
	uint64_t any_w;           /* (uintptr_t) the struct kup_any of the
	                           * kupdev_receive_any that waits in the
	                           * channel (it is rx_waiter) and may sleep,
	                           * else 0: the one sleeper a wake-up of this
	                           * channel is for (kup_chan_wake).  Written
	                           * under lock, read with READ_ONCE (and
	                           * again under lock to use it) */
	uint32_t any_idle_wakes;  /* wake-ups of a kupdev_receive_any asleep
	                           * on this channel (among its set) after which
	                           * no channel of its set had changed: each
	                           * look of its sleep after the first that found
	                           * nothing (a timer or a signal counts too).
	                           * Written (WRITE_ONCE) by that waiter while it
	                           * is in the channel (rx_waiter); statistics,
	                           * the tests read it: a waiter is woken for its own
	                           * channels only, so on disjoint sets with no
	                           * timeout it stays 0 */

	struct kup_os_chan os;
};

struct kupdev_softc {
	char     name[KUP_NAME_MAX];
	uint32_t page_size;
	size_t   pages;
	size_t   chan_cnt;
	size_t   data_size;
	size_t   chan_bytes;

	kup_lock_t lock;          /* everything below */
	uint32_t refs;
	uint32_t shutdown;        /* also read with READ_ONCE */
	uint32_t unloaded;
	uint32_t npending;        /* channels with pending != 0 (READ_ONCE) */
	uint32_t announced;
	uint64_t notify_gen;
	uint32_t rr;              /* wait_channel round robin start */
	uint32_t wakes;           /* kupdev_wake calls not yet answered by a
	                           * kupdev_wait_channel (-ECANCELED); also
	                           * read with READ_ONCE by its sleep's
	                           * condition */
	uint32_t any_wakes;       /* kupdev_wake_any calls not yet answered by
	                           * a kupdev_receive_any (-ECANCELED); under
	                           * lock, read with READ_ONCE by its sleep */
	uint64_t any_clock;       /* kupdev_receive_any answers so far
	                           * (__atomic): the source of ch->any_stamp */
	struct kup_any *any_waiters; /* the kupdev_receive_any calls that may
	                           * sleep (their wake-up objects are live):
	                           * kupdev_wake_any and the shutdown wake
	                           * each one */
	/* protocol-error log lines: a hostile user must not flood the log */
	uint64_t perr_window;     /* start of the current window (ns, or count) */
	uint32_t perr_lines;      /* lines logged in it */
	uint32_t perr_dropped;    /* lines not logged since the last one */
	/* misuse of the API by the module (kup_core.c: KUP_MISUSE) */
	uint32_t misuse_lines;    /* lines logged in the window, up to the
	                           * budget + 1 */
	uint32_t misuse_dropped;  /* lines not logged since the last one */
	uint64_t misuse_window;   /* start of the current window (ns) */

	struct kup_chan *chans;
	struct kupdev_softc *next; /* registry */
	struct kup_os_dev os;
};

/*
 * Test hook for hostile-kernel tests (kupsim's hostile module): hand the
 * turn to user space with a descriptor the kernel chooses freely:
 * {len, kind, last_seq + 1 + seq_delta}, then store turn_value (normally
 * KUP_TURN_USER) and wake the user.  Nothing is copied.  Same errors as
 * kupdev_pass.  Never use in a real module.
 */
int kup_core_test_handover(struct kupdev_softc *sc, int chan_id, uint32_t len,
    uint32_t kind, int64_t seq_delta, uint32_t turn_value);

#endif /* KUP_CORE_PRIV_H */
