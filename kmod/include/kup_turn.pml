/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_turn.pml -- Promela model of the KUP turn protocol, checked with SPIN
 * (tests/model/test_turn_model.py runs it; `make test`).
 *
 * MIRRORS: kup_abi.h, KUP_ABI_VERSION 1, the sections
 *   "The turn protocol"     hand-over order: payload, descriptor,
 *                           STORE-RELEASE turn; the receiver reads the
 *                           descriptor once and checks kind/len/seq;
 *   "Sleeping and waking"   the Dekker pair: waiting flag, full fence,
 *                           re-check; passer: release turn, full fence,
 *                           look at the peer's waiting flag, wake;
 *                           wake-up objects that keep early wake-ups;
 *   "Shutdown and departure" ctrl->state written by the kernel side and an
 *                           unconditional wake-up of the user side; CLOSE on
 *                           departure; a dead user is detached by the host,
 *                           which wakes kernel-side waiters with an error;
 * docs/DESIGN.md "Turn semantics" (the kernel owns a fresh channel, one
 * message per hand-over, sequence numbers from 1 per direction, PASS and
 * CLOSE included), and the code as written in kmod/core/kup_core.c
 * (kup_wait_turn, kupdev_receive_msg, kup_send_common/kup_handover,
 * kup_core_detach, kup_core_attach/kup_page_reset, kupdev_shutdown) and
 * kmod/libkup/kup.c (wait_turn, take_kernel_msg, handover, chan_state,
 * kernproxy_fd and the poll-mode receive).
 * Names are the header's; values are the header's, in decimal (Promela has
 * no hex literals).  The test checks every KUP_* value here against
 * kup_abi.h, so a rename or renumbering there breaks it until this follows.
 *
 * Processes
 *   Kernel  a module thread: kupdev_send/kupdev_pass, then
 *           kupdev_receive_msg, until it receives CLOSE or an error; after an
 *           error it sends once more and must be refused.  Like kup_core.c
 *           it trusts only PRIVATE state for ownership (kturn), shutdown
 *           (kshut), attachment (kattached, kgen): never the page.  A
 *           receive whose turn has not come back waits with the channel
 *           lock released, marked as the channel's receiver (krx:
 *           ch->rx_waiter), and takes the lock again to look at the
 *           result.  A message the user handed over before it left is
 *           still received (kup_chan_left_msg), unless the page has been
 *           reset for a newer attachment since (kpage: ch->page_gen).
 *   User    libkup: receive, answer (DATA or PASS), and after NMSG messages
 *           send CLOSE (it holds the turn) and leave.
 *   Host    the host's release path, kup_core_detach: once the user's
 *           descriptor is closed (exit or death): attached = 0, clear
 *           KUP_STATE_ATTACHED, fence, wake kernel-side waiters.
 *   Killer  (-DDEATH) kills the user at an arbitrary point, including
 *           half-way through writing a message.
 *   Attach  (-DREATTACH) after the detach, a new user attaches the channel
 *           (kup_core_attach): reserve it (attached = 1, generation 2), then
 *           under the channel lock, with no receive waiting (krx), reset
 *           the control page for generation 2; or, while the kernel side
 *           still holds the lock or waits in its receive, give up
 *           (KUP_ATTACH_LETGO_MS passed: -EINPROGRESS): attached = 0 again,
 *           the generation stays bumped.
 *   Unload  (-DSHUTDOWN) kupdev_unload at an arbitrary point: shutdown in
 *           the private state and KUP_STATE_SHUTDOWN in ctrl->state, fence,
 *           wake the user side unconditionally and kernel-side waiters.
 *   Disconnect (-DDISCONNECT) kupdev_disconnect at an arbitrary point: under
 *           the channel lock, if the session is the module's and not ended
 *           yet, mark it ended in the private state (kended:
 *           ch->ended_gen) and KUP_STATE_PEER_GONE in ctrl->state, fence,
 *           wake the user side unconditionally; after the lock, wake
 *           kernel-side waiters.  The turn word is not touched: the user
 *           learns it from the state (EKU_PEER), the kernel from its
 *           private state (-EPIPE, nothing the user left is taken).
 *
 * Memory model.  Promela statements are sequentially consistent, so a full
 * fence (KUP_FENCE) is modelled by statement order, and a release/acquire
 * pair by the order of the stores before the turn store.  The weaker
 * orders that the fences and the release forbid are modelled explicitly by
 * the BROKEN_* variants, which move a load before a store (the
 * store-buffer effect a missing fence allows) or the turn store before the
 * data stores (a missing release).  The tests require SPIN to FIND the
 * resulting lost wake-up or overlap in each: proof the checks are not
 * vacuous.
 *
 * Wake-up objects.  Kernel side (kup_os_chan_sleep): arm (prepare_to_wait,
 * or drain, or take the mutex), THEN evaluate the condition, then block
 * until woken; a wake-up issued before arming is forgotten, and harmless,
 * because the waker changed the condition first.  User side (libkup):
 * poll() the eventfd, then drain it; the eventfd keeps a count, so a
 * wake-up before the poll is not lost.  The count is modelled as a bit:
 * the drain consumes all pending wake-ups at once, so counts above 1 are
 * indistinguishable from 1.
 *
 * Sleeps have no timeout here (KUPDEV_FOREVER; libkup's poll slice is a
 * backstop the protocol must not need): a lost wake-up is then a process
 * asleep forever, which SPIN reports as an invalid end state and as a
 * violation of the liveness formulas.  -DSPURIOUS adds early returns
 * (slice expiry, spurious wake-ups).  Not modelled: hostile peers
 * (tests/c and kupsim's hostile module cover those), several kernel
 * threads on one channel, and the new user's own session after a re-attach.
 * One kernel thread on several channels (kupdev_receive_any) is
 * kup_any.pml's, next to this file.
 *
 * A statement tagged @reach:<name> stands alone on its line (not on the
 * line of an if's first option, which SPIN also gives the if's guards):
 * the tests require the configurations meant to exercise it to reach it.
 *
 * Every execution of this model is finite (spins are bounded, every sleep
 * consumes a wake-up and wake-ups come from a bounded number of
 * hand-overs), so there are no cycles: weak fairness (pan -f) is requested
 * by the tests but the liveness results do not depend on it.
 *
 * Configuration (spin -D...):
 *   NMSG=n        messages the kernel sends (default 3); the user answers
 *                 n-1 of them and closes with CLOSE
 *   SPINS=n       spin iterations before a side sleeps (default 1)
 *   DEATH         the user process may die at any point
 *   REATTACH      a new user attaches the channel after the detach
 *   SHUTDOWN      the device may be unloaded at any point
 *   DISCONNECT    the module may end the user's session at any point
 *   SPURIOUS      sleeps may return without a wake-up (2 in all)
 *   ANYKIND       each message is DATA or PASS at random (default:
 *                 alternating, kernel starts with DATA, user with PASS)
 *   POLL_MODE     the user runs libkup's poll mode: kernproxy_fd() (waiting
 *                 flag kept at 1, self wake-up), an event loop polling the
 *                 fd and non-blocking receives
 *   QUIET_SPIN    with POLL_MODE: each send may be libkup's KP_SPIN_NEXT
 *                 send (try_exchange): user_waiting written 0 before the
 *                 hand-over, one look at the turn (the spin), and on a miss
 *                 user_waiting set again, fence, one more look, then the
 *                 event loop's poll
 *   NO_CS_ASSERT  no assert() for mutual exclusion: only "ltl mutex" checks
 *   BROKEN_WAITER_NO_FENCE   waiters: the re-check overtakes the flag store
 *   BROKEN_PASSER_NO_FENCE   passers: the waiting-flag load overtakes the
 *                            turn store
 *   BROKEN_EARLY_WAKE_LOST   kernel: condition checked before arming;
 *                            user: eventfd drained before the poll
 *   BROKEN_NO_RELEASE        turn store visible before payload/descriptor
 *   BROKEN_SHUTDOWN_NO_WAKE  unload does not wake the user side
 *   BROKEN_DETACH_NO_WAKE    detach does not wake kernel-side waiters
 *   BROKEN_DISCONNECT_NO_WAKE kupdev_disconnect does not wake the user side
 *   BROKEN_ATTACH_NO_LOCK    attach resets the page without the channel lock
 *   BROKEN_NO_GEN_CHECK      the kernel ignores the attach generation
 *   BROKEN_LEFT_IGNORES_RESET the kernel takes a message the departed user
 *                            left without checking that the page was not
 *                            reset for a new attachment since
 *   BROKEN_POLL_NO_SELF_WAKE poll mode: kernproxy_fd() without self wake-up
 *   BROKEN_POLL_LATE_DRAIN   poll mode: drain after looking at the turn
 *   BROKEN_QUIET_NO_UNQUIET  QUIET_SPIN: a spin that missed goes to the poll
 *                            with user_waiting still 0
 */

/* ---- kup_abi.h constants (decimal) ---------------------------------- */
#define KUP_ABI_VERSION      1
#define KUP_TURN_KERNEL      1262834254   /* 0x4b45524e "KERN" */
#define KUP_TURN_USER        1431520594   /* 0x55534552 "USER" */
#define KUP_KIND_DATA        1
#define KUP_KIND_PASS        2
#define KUP_KIND_CLOSE       3
#define KUP_STATE_ATTACHED   1
#define KUP_STATE_SHUTDOWN   2
#define KUP_STATE_PEER_GONE  4

/* ---- model parameters -------------------------------------------------- */
#ifndef NMSG
#define NMSG 3
#endif
#ifndef SPINS
#define SPINS 1
#endif
#define DATA_SIZE  1          /* the data area holds one payload "byte" */
#define SESSION    1          /* the attach generation of the modelled user */

/* results (kernel: -errno, user: KUP_E_*) */
#define R_OK        0
#define R_SHUTDOWN  1         /* -ESHUTDOWN / KUP_E_SHUTDOWN */
#define R_PEER      2         /* -EPIPE     / KUP_E_PEER */
#define R_PROTO     3         /* -EPROTO    / KUP_E_PROTO */
#define R_NOTTURN   4         /* -EAGAIN    / KUP_E_NOTTURN */

/* the kernel's private view of the turn (kup_core_priv.h KUP_KT_*) */
#define KT_KERNEL   0         /* KUP_KT_KERNEL_CONSUMED */
#define KT_USER     1         /* KUP_KT_USER */

/* ---- the control page (struct kup_ctrl) and the data areas ------------- */
typedef kup_msg_desc { byte mlen; byte kind; byte seq }   /* "len" is a Promela keyword */
int  turn = KUP_TURN_KERNEL;           /* a fresh channel: the kernel owns it */
byte state = KUP_STATE_ATTACHED;       /* kernel-written */
byte attach_gen = SESSION;             /* ctrl->attach_gen */
kup_msg_desc k2u;                      /* kernel-written */
kup_msg_desc u2k;                      /* user-written */
bit  kernel_waiting;
bit  user_waiting;
byte k2u_data;                         /* payload: stamped with its seq */
byte u2k_data;

/* ---- wake-up objects ---------------------------------------------------- */
bit  kwake;                            /* kernel side: a wake-up since arming */
bit  uwake;                            /* user side: the eventfd is readable */

/* ---- kernel private state (struct kup_chan, sc->shutdown) ---------------- */
bit  chan_lock;                        /* ch->lock */
bit  krx;                              /* ch->rx_waiter: a receive waits,
                                        * lock released */
bit  kshut;                            /* sc->shutdown */
bit  kattached = 1;                    /* ch->attached */
byte kgen = SESSION;                   /* ch->gen (the module was told SESSION) */
byte kturn = KT_KERNEL;                /* ch->kturn */
byte kpage = SESSION;                  /* ch->page_gen: the page's attachment */
bit  kended;                           /* ch->ended_gen == SESSION:
                                        * kupdev_disconnect ended it */

/* ---- ghosts for the properties ----------------------------------------- */
bit  k_cs;                             /* kernel inside a data area */
bit  u_cs;                             /* user inside a data area */
byte k_sent, u_sent;                   /* hand-overs made (turn stores) */
byte k_recv, u_recv;                   /* messages accepted by the receiver */
bit  k_done, u_left, host_done;        /* ended */
bit  k_stopped, u_stopped;             /* ended on an error / died */
bit  kill_user;                        /* DEATH: the user is killed now */
#ifdef SHUTDOWN
bit  unload_done;
#else
bit  unload_done = 1;
#endif
#ifdef REATTACH
bit  attach_done;
#else
bit  attach_done = 1;
#endif
#ifdef DISCONNECT
bit  disc_done;
#else
bit  disc_done = 1;
#endif
#ifdef SPURIOUS
byte spurious = 2;                     /* early returns from sleeps, in all */
#endif

/* Entering a data area: the other side must not be in one.  -DNO_CS_ASSERT
 * leaves the judgement to the formula "mutex" alone (the tests use it to
 * show that the formula, too, sees an overlap). */
#ifdef NO_CS_ASSERT
#define CS_ASSERT(c) skip
#else
#define CS_ASSERT(c) assert(c)
#endif

#define ALL_DONE (k_done && u_left && host_done && unload_done && attach_done && disc_done)

/* ---- properties --------------------------------------------------------- */
/* (1) the two sides never touch the data areas at the same time */
ltl mutex     { [] !(k_cs && u_cs) }
/* (2) every hand-over is eventually received, unless the receiver stopped
 *     (died, saw shutdown, saw the peer gone) */
ltl k2u_recv  { [] ((k_sent > u_recv) -> <> ((u_recv == k_sent) || u_stopped)) }
ltl u2k_recv  { [] ((u_sent > k_recv) -> <> ((k_recv == u_sent) || k_stopped)) }
/* (2)+(3) every process ends: nobody sleeps forever */
ltl terminate { <> ALL_DONE }

/* ---- the orders the fences and the wake-up objects guarantee -------------
 * (macros, not #ifdef inside the inlines: SPIN's line numbers, which the
 * tests use, go wrong after conditional blocks inside an inline) */

/* waiter: STORE my_waiting = 1; KUP_FENCE(); LOAD turn (statement order) */
#ifdef BROKEN_WAITER_NO_FENCE
#define FLAG_THEN_LOOK(FLAG, LOOK)  LOOK; FLAG = 1     /* the load overtakes the store */
#else
#define FLAG_THEN_LOOK(FLAG, LOOK)  FLAG = 1; LOOK
#endif

/* kernel sleep (kup_os_chan_sleep): arm, then evaluate the condition */
#ifdef BROKEN_EARLY_WAKE_LOST
#define ARM_THEN_CHECK(W, CHECK)  CHECK; W = 0         /* armed after the check */
#else
#define ARM_THEN_CHECK(W, CHECK)  W = 0; CHECK         /* older wake-ups are gone */
#endif

/* block until woken (or, -DSPURIOUS, return early) */
#ifdef SPURIOUS
#define BLOCK_ON(W)  if :: W == 1 :: atomic { spurious > 0 -> spurious-- } fi
#else
#define BLOCK_ON(W)  W == 1
#endif

/* user sleep (libkup wait_turn): poll() the eventfd, then drain it */
#ifdef BROKEN_EARLY_WAKE_LOST
#define POLL_THEN_DRAIN(W)  W = 0; BLOCK_ON(W); W = 0  /* drained before the poll */
#else
#define POLL_THEN_DRAIN(W)  BLOCK_ON(W); W = 0
#endif

/* passer: STORE-RELEASE turn; KUP_FENCE(); LOAD peer_waiting.  SENT counts
 * the hand-over (ghost, same step as the turn store); nobody hands over in
 * a page that has been reset for a newer attachment. */
#define RELEASE_TURN(T, SENT)  atomic { assert(attach_gen == SESSION); turn = T; SENT++ }
#if defined(BROKEN_NO_RELEASE)
/* no release: the turn store becomes visible before the payload and the
 * descriptor (made at the start of the write, EARLY_TURN) */
#define EARLY_TURN(T, SENT)  turn = T; SENT++;
#define PASS_AND_LOOK(T, SENT, LOOK)  LOOK
#elif defined(BROKEN_PASSER_NO_FENCE)
#define EARLY_TURN(T, SENT)
#define PASS_AND_LOOK(T, SENT, LOOK)  LOOK; RELEASE_TURN(T, SENT)   /* load overtakes the store */
#else
#define EARLY_TURN(T, SENT)
#define PASS_AND_LOOK(T, SENT, LOOK)  RELEASE_TURN(T, SENT); LOOK
#endif

/* DATA or PASS for the next message: any (-DANYKIND), or alternating so
 * that both kinds travel both ways without doubling the state space per
 * message (the kind only decides whether a payload byte is written). */
#ifdef ANYKIND
#define PICK_KIND(KIND, DATA_IF)  if :: KIND = KUP_KIND_DATA :: KIND = KUP_KIND_PASS fi
#else
#define PICK_KIND(KIND, DATA_IF)  if :: DATA_IF -> KIND = KUP_KIND_DATA :: else -> KIND = KUP_KIND_PASS fi
#endif

/* libkup poll mode (kernproxy_fd, -DPOLL_MODE): user_waiting stays 1, an
 * event loop polls the fd and calls the non-blocking receive */
#ifdef POLL_MODE
#define U_SETUP()       u_poll_setup()
#define U_WAIT(r)       u_poll_wait(r)
#define U_AFTER_TAKE    uwake = 0;      /* drain again after taking it */
#else
#define U_SETUP()       skip
#define U_WAIT(r)       u_wait_turn(r)
#define U_AFTER_TAKE
#endif
#ifdef BROKEN_POLL_NO_SELF_WAKE
#define SELF_WAKE()     skip            /* forgets a hand-over made before */
#else
#define SELF_WAKE()     uwake = 1       /* ops->self_wake */
#endif
/* KP_SPIN_NEXT (-DQUIET_SPIN): a poll-mode hand-over writes user_waiting
 * first, 0 for a quiet send (the kernel then writes no wake-up for a reply
 * the spin catches) and 1 otherwise; the wait after a quiet send spins,
 * then sets the flag and looks again before it polls (libkup unquiet()) */
#if defined(QUIET_SPIN) && !defined(POLL_MODE)
#error QUIET_SPIN models a poll-mode send: use it with POLL_MODE
#endif
#ifdef QUIET_SPIN
#undef U_WAIT
#define U_WAIT(r)          u_quiet_wait(r)
#define U_FLAG_FOR_SEND()  if :: quiet = 1; user_waiting = 0 :: quiet = 0; user_waiting = 1 fi
#else
#define U_FLAG_FOR_SEND()  skip
#endif
#ifdef BROKEN_QUIET_NO_UNQUIET
#define UNQUIET_THEN_LOOK(LOOK)  LOOK           /* the flag stays 0 */
#else
#define UNQUIET_THEN_LOOK(LOOK)  FLAG_THEN_LOOK(user_waiting, LOOK)
#endif
#ifdef BROKEN_POLL_LATE_DRAIN
#define DRAIN_THEN_LOOK(LOOK)  LOOK; uwake = 0    /* drains the wake-up it did not see */
#else
#define DRAIN_THEN_LOOK(LOOK)  uwake = 0; LOOK
#endif

/* ---- building blocks ----------------------------------------------------- */
inline lock()   { atomic { chan_lock == 0 -> chan_lock = 1 } }
inline unlock() { chan_lock = 0 }

inline wake(W)
{
	W = 1  /* @reach:wake */
}

/* The passer's second half: STORE-RELEASE turn = peer; FULL FENCE; if the
 * peer's waiting flag is set, wake it.  SENT counts the hand-over (ghost,
 * same step as the turn store).  Nobody hands over in a page that has been
 * reset for a newer attachment. */
inline hand_over(PEER, PEER_WAITING, W, SENT)
{
	PASS_AND_LOOK(PEER, SENT, w = PEER_WAITING);
	if
	:: w -> wake(W)
	:: else -> skip
	fi
}

/* ---- kernel side (kup_core.c) ------------------------------------------- */

#ifdef BROKEN_NO_GEN_CHECK
#define K_GONE (!kattached || kended)
#else
#define K_GONE (!kattached || kgen != SESSION || kended)
#endif
/* kup_recv_cond: the page turn is no longer USER, or shutdown, or departure */
#define K_COND (turn != KUP_TURN_USER || kshut || K_GONE)

/* kup_chan_left_msg: the departed user handed over a message the kernel
 * has not taken, in a page not reset since (kpage: ch->page_gen, private) */
#ifdef BROKEN_LEFT_IGNORES_RESET
#define K_LEFT (kturn == KT_USER && turn == KUP_TURN_KERNEL && !kended)
#else
#define K_LEFT (kturn == KT_USER && turn == KUP_TURN_KERNEL && kpage == SESSION && !kended)
#endif

/* kup_chan_enter, under the channel lock; a send (RX 0) or a receive
 * (RX 1), which may still take what the departed user left */
inline k_enter(r, RX)
{
	if
	:: kshut ->
		r = R_SHUTDOWN  /* @reach:enter_shutdown */
	:: !kshut && K_GONE && RX && K_LEFT ->
		r = R_OK  /* @reach:left_msg */
	:: !kshut && K_GONE && !(RX && K_LEFT) ->
		r = R_PEER  /* @reach:enter_peer */
	:: else -> r = R_OK
	fi
}

/* kup_wait_turn (under the channel lock) with kup_os_chan_sleep */
inline k_wait_turn()
{
	spins = 0;
	do
	:: K_COND -> break
	:: !K_COND && spins < SPINS -> spins++          /* KUP_CPU_RELAX */
	:: !K_COND && spins >= SPINS ->
		FLAG_THEN_LOOK(kernel_waiting, c = K_COND);
		if
		:: c ->
			kernel_waiting = 0;  /* @reach:krecheck */
			break
		:: else -> skip
		fi;
		/* kup_os_chan_sleep(cond): arm, evaluate cond, block; repeat */
		do
		:: ARM_THEN_CHECK(kwake, c = K_COND);
		   if
		   :: c -> break
		   :: else -> BLOCK_ON(kwake)  /* @reach:ksleep */
		   fi
		od;
		kernel_waiting = 0;
		break
	od
}

/* kupdev_send (KIND == DATA) / kupdev_pass (KIND == PASS) */
inline k_send(KIND, r)
{
	lock();
	k_enter(r, 0);
	if
	:: r == R_OK && kturn != KT_KERNEL -> r = R_NOTTURN   /* never here */
	:: r == R_OK && kturn == KT_KERNEL ->
		atomic { EARLY_TURN(KUP_TURN_USER, k_sent) k_cs = 1; CS_ASSERT(!u_cs); assert(attach_gen == SESSION) };
		if
		:: KIND == KUP_KIND_DATA -> k2u_data = kseq + 1     /* memcpy */
		:: else -> skip
		fi;
		d_step {                              /* descriptor {len, kind, seq} */
			if
			:: KIND == KUP_KIND_DATA -> k2u.mlen = 1
			:: else -> k2u.mlen = 0
			fi;
			k2u.kind = KIND;
			k2u.seq = kseq + 1;
			kseq++;
			kturn = KT_USER
		};
		atomic { assert(attach_gen == SESSION); k_cs = 0 };
		hand_over(KUP_TURN_USER, user_waiting, uwake, k_sent)
	:: else -> skip
	fi;
	unlock()
}

/* kupdev_receive_msg; the payload is used and the lock released at once
 * (kupdev_unlock_channel) */
inline k_receive(r)
{
	lock();
	k_enter(r, 1);
	if
	:: r == R_OK ->
		assert(kturn == KT_USER);          /* else -EAGAIN: never here */
		if
		:: K_COND -> skip                  /* the turn is back already */
		:: else ->
			/* wait with the lock released, marked as the receiver */
			krx = 1;  /* @reach:krx_wait */
			unlock();
			k_wait_turn();
			lock();
			krx = 0
		fi;
		k_enter(r, 1);                     /* shutdown / departure meanwhile */
		if
		:: r == R_OK ->
			t = turn;                      /* LOAD-ACQUIRE */
			if
			:: t != KUP_TURN_KERNEL -> r = R_PROTO   /* garbage in the turn word */
			:: else ->
				atomic { k_cs = 1; CS_ASSERT(!u_cs); assert(attach_gen == SESSION) };
				/* read the descriptor ONCE into locals, validate the
				 * locals, read the payload only when they are valid */
				d_step {
					dlen = u2k.mlen;
					dkind = u2k.kind;
					dseq = u2k.seq;
					if
					:: dkind < KUP_KIND_DATA || dkind > KUP_KIND_CLOSE ||
					   dlen > DATA_SIZE || (dkind != KUP_KIND_DATA && dlen != 0) ||
					   dseq != klast + 1 ->
						r = R_PROTO          /* no payload byte read */
					:: else ->
						if
						:: dlen > 0 ->
							stamp = u2k_data;
							assert(stamp == dseq)   /* the payload is this message's */
						:: else -> skip
						fi;
						klast = dseq;
						k_recv++;
						kturn = KT_KERNEL;
						r = R_OK
					fi;
					stamp = 0
				};
				atomic { assert(attach_gen == SESSION); k_cs = 0 }
			fi
		:: else -> skip
		fi
	:: else -> skip
	fi;
	unlock()
}

proctype Kernel()
{
	byte spins, dlen, dkind, dseq, stamp, kind, r, r2;
	byte kseq, klast;
	int t;
	bit w, c;

	do
	:: PICK_KIND(kind, kseq % 2 == 0);
	   k_send(kind, r);
	   if
	   :: r != R_OK -> break
	   :: else -> skip
	   fi;
	   k_receive(r);
	   if
	   :: r != R_OK -> break
	   :: r == R_OK && dkind == KUP_KIND_CLOSE ->
		skip;  /* @reach:close */
		break
	   :: else -> skip
	   fi
	od;
	/* an honest user never breaks the protocol */
	assert(r != R_PROTO && r != R_NOTTURN);
	if
	:: r != R_OK ->
		k_stopped = 1;
		/* a module that ignores the error and sends again is refused
		 * without touching the data area */
		k_send(KUP_KIND_PASS, r2);
		assert(r2 == R_SHUTDOWN || r2 == R_PEER)
	:: else -> skip
	fi;
#if !defined(DEATH) && !defined(SHUTDOWN) && !defined(REATTACH) && !defined(DISCONNECT)
	/* normal run: every message was received, the CLOSE included: the
	 * user's departure right after it does not hide it (kup_chan_left_msg) */
	assert(klast == NMSG && r == R_OK);
#elif !defined(DEATH) && !defined(SHUTDOWN) && !defined(DISCONNECT)
	/* ... unless a new user attached before the kernel looked: the page
	 * was reset, the CLOSE is gone and the departure (-EPIPE) says it */
	assert(klast >= NMSG - 1);
	assert(r == R_OK || r == R_PEER);
#elif !defined(DEATH) && !defined(SHUTDOWN)
	/* the module ended the session (or the user closed it first) */
	assert(r == R_OK || r == R_PEER);
#endif
	k_done = 1
}

/* ---- user side (libkup kup.c) --------------------------------------------- */

/* chan_state(): shutdown first, then a newer attachment / PEER_GONE */
inline u_state(r)
{
	s = state;
	if
	:: (s & KUP_STATE_SHUTDOWN) != 0 -> r = R_SHUTDOWN
	:: (s & KUP_STATE_SHUTDOWN) == 0 && ((s & KUP_STATE_PEER_GONE) != 0 || attach_gen != SESSION) ->
		r = R_PEER
	:: else -> r = R_OK
	fi
}

/* wait_turn(): until the page turn is not KERNEL */
inline u_wait_turn(r)
{
	t = turn;
	if
	:: t != KUP_TURN_KERNEL -> r = R_OK
	:: else ->
		u_state(r);
		if
		:: r == R_OK ->
			spins = 0;
			do
			:: spins < SPINS ->
				t = turn;
				if
				:: t != KUP_TURN_KERNEL -> break
				:: else -> spins++       /* CPU_RELAX */
				fi
			:: else -> break
			od;
			if
			:: t != KUP_TURN_KERNEL -> skip
			:: else ->
				do
				:: true ->
					FLAG_THEN_LOOK(user_waiting, t = turn);
					if
					:: t != KUP_TURN_KERNEL ->
						r = R_OK;  /* @reach:urecheck */
						break
					:: else -> skip
					fi;
					u_state(r);
					if
					:: r != R_OK -> break
					:: else -> skip
					fi;
					POLL_THEN_DRAIN(uwake)  /* @reach:usleep */
				od;
				user_waiting = 0
			fi
		:: else -> skip
		fi
	fi
}

/* kernproxy_fd(): from now on the kernel always wakes us; a hand-over (or
 * shutdown) that came before gets its wake-up from us */
inline u_poll_setup()
{
	FLAG_THEN_LOOK(user_waiting, t = turn);
	u_state(r);
	if
	:: t != KUP_TURN_KERNEL || r != R_OK ->
		SELF_WAKE()  /* @reach:self_wake */
	:: else -> skip
	fi
}

/* the event loop: poll() the fd, then kernproxy_receive_msg(.., 0) until
 * it stops saying KUP_E_NOTREADY */
inline u_poll_wait(r)
{
	do
	:: BLOCK_ON(uwake);  /* @reach:upoll */
	   u_state(r);
	   if
	   :: r != R_OK -> break
	   :: else -> skip
	   fi;
	   DRAIN_THEN_LOOK(t = turn);          /* drain, then LOAD-ACQUIRE turn */
	   if
	   :: t != KUP_TURN_KERNEL -> r = R_OK; break
	   :: else -> skip
	   fi;
	   u_state(r);                         /* wait_turn(c, 0) */
	   if
	   :: r != R_OK -> break
	   :: else -> skip                     /* KUP_E_NOTREADY: poll again */
	   fi
	od
}

#ifdef QUIET_SPIN
/* after a send: kernproxy_receive_spin (quiet) or the event loop's wait */
inline u_quiet_wait(r)
{
	if
	:: quiet ->
		quiet = 0;
		t = turn;                               /* the spin's look */
		if
		:: t != KUP_TURN_KERNEL ->
			r = R_OK  /* @reach:quiet_hit */
		:: else ->
			UNQUIET_THEN_LOOK(t = turn);    /* flag, fence, look */
			if
			:: t != KUP_TURN_KERNEL ->
				r = R_OK  /* @reach:quiet_late */
			:: else ->
				skip;  /* @reach:quiet_miss */
				u_poll_wait(r)
			fi
		fi
	:: else -> u_poll_wait(r)
	fi
}
#endif

/* take_kernel_msg(), after wait_turn() saw the turn */
inline u_read(r)
{
	t = turn;                                      /* LOAD-ACQUIRE */
	assert(t == KUP_TURN_USER);
	atomic { u_cs = 1; CS_ASSERT(!k_cs) };
	d_step {
		dlen = k2u.mlen;
		dkind = k2u.kind;
		dseq = k2u.seq;
		if
		:: dkind < KUP_KIND_DATA || dkind > KUP_KIND_CLOSE ||
		   dlen > DATA_SIZE || (dkind != KUP_KIND_DATA && dlen != 0) ||
		   dseq != ulast + 1 ->
			r = R_PROTO
		:: else ->
			if
			:: dlen > 0 ->
				stamp = k2u_data;
				assert(stamp == dseq)
			:: else -> skip
			fi;
			ulast = dseq;
			u_recv++;
			r = R_OK
		fi;
		stamp = 0
	};
	u_cs = 0
}

/* handover(): chan_state, payload, descriptor, release, fence, wake */
inline u_send(KIND, r)
{
	u_state(r);
	if
	:: r == R_SHUTDOWN ->
		skip  /* @reach:user_send_shutdown */
	:: r == R_PEER -> skip
	:: r == R_OK ->
		atomic { EARLY_TURN(KUP_TURN_KERNEL, u_sent) u_cs = 1; CS_ASSERT(!k_cs) };
		/* two steps, so that a death between payload and descriptor
		 * leaves a half-written message behind */
		if
		:: KIND == KUP_KIND_DATA -> u2k_data = useq + 1
		:: else -> skip
		fi;
		d_step {
			if
			:: KIND == KUP_KIND_DATA -> u2k.mlen = 1
			:: else -> u2k.mlen = 0
			fi;
			u2k.kind = KIND;
			u2k.seq = useq + 1;
			useq++
		};
		u_cs = 0;
		U_FLAG_FOR_SEND();
		hand_over(KUP_TURN_KERNEL, kernel_waiting, kwake, u_sent)
	fi
}

proctype User()
{
	byte spins, s, dlen, dkind, dseq, stamp, kind, r;
	byte useq, ulast;
	int t;
	bit w;
#ifdef QUIET_SPIN
	bit quiet;
#endif

	U_SETUP();
	{
		do
		:: U_WAIT(r);
		   if
		   :: r != R_OK ->
			u_stopped = 1;  /* @reach:user_wait_stop */
			break
		   :: else -> skip
		   fi;
		   u_read(r);
		   U_AFTER_TAKE
		   assert(r == R_OK);               /* honest kernel */
		   if
		   :: r != R_OK -> u_stopped = 1; break
		   :: else -> skip
		   fi;
		   /* (4) the receiver sees 1, 2, 3, ... */
		   assert(ulast == u_recv);
		   if
		   :: u_recv == NMSG ->
			u_send(KUP_KIND_CLOSE, r);   /* leaving, holding the turn */
			break
		   :: else ->
			PICK_KIND(kind, useq % 2 == 1);
			u_send(kind, r);
			if
			:: r != R_OK -> u_stopped = 1; break
			:: else -> skip
			fi
		   fi
		od
	} unless {
		kill_user ->                               /* process death */
		u_cs = 0;  /* @reach:death */
		u_stopped = 1
	};
#if !defined(DEATH) && !defined(SHUTDOWN) && !defined(DISCONNECT)
	assert(!u_stopped && ulast == NMSG);
#endif
	u_left = 1                                     /* descriptor closed */
}

/* ---- host release path: kup_core_detach ---------------------------------- */
proctype Host()
{
	u_left;
	/* under sc->lock (not the channel lock: the detach must not wait for
	 * a kernel-side call) */
	atomic { kattached = 0; state = state & ~KUP_STATE_ATTACHED };
	/* KUP_FENCE(), then wake every kernel-side waiter */
	atomic {
#ifndef BROKEN_DETACH_NO_WAKE
		wake(kwake);
#endif
		host_done = 1
	}
}

#ifdef DEATH
proctype Killer()
{
	kill_user = 1
}
#endif

#ifdef REATTACH
/* kup_core_attach by a new user, after the detach */
proctype Attach()
{
	host_done;
	if
	:: atomic { kshut -> attach_done = 1 }        /* -ESHUTDOWN */
	:: atomic { !kshut -> kattached = 1; kgen = SESSION + 1 };   /* reserve, sc->lock */
#ifndef BROKEN_ATTACH_NO_LOCK
		if
		/* kup_chan_take_free: the lock, and no receive waiting */
		:: atomic { chan_lock == 0 && krx == 0 -> chan_lock = 1 }
		/* the previous session's caller is still in the channel: give
		 * up (-EINPROGRESS), under sc->lock */
		:: atomic { (chan_lock == 1 || krx == 1) -> kattached = 0 };
			attach_done = 1;   /* @reach:attach_gave_up */
			goto attach_end
		fi;
#endif
		d_step {             /* kup_page_reset; @reach:attach_reset */
			k2u.mlen = 0; k2u.kind = 0; k2u.seq = 0;
			u2k.mlen = 0; u2k.kind = 0; u2k.seq = 0;
			kernel_waiting = 0;
			user_waiting = 0;
			attach_gen = SESSION + 1;
			kpage = SESSION + 1;
			state = KUP_STATE_ATTACHED;
			turn = KUP_TURN_KERNEL
		};
#ifndef BROKEN_ATTACH_NO_LOCK
		unlock();
#endif
		attach_done = 1
	fi;
attach_end:
	skip
}
#endif

#ifdef SHUTDOWN
/* kupdev_unload -> kupdev_shutdown */
proctype Unload()
{
	atomic { kshut = 1; state = state | KUP_STATE_SHUTDOWN };   /* sc->lock */
	/* KUP_FENCE(), then wake both sides unconditionally */
#ifndef BROKEN_SHUTDOWN_NO_WAKE
	wake(uwake);
#endif
	atomic { wake(kwake); unload_done = 1 }
}
#endif

#ifdef DISCONNECT
#ifdef BROKEN_DISCONNECT_NO_WAKE
#define DISC_WAKE_USER()  skip
#else
#define DISC_WAKE_USER()  wake(uwake)
#endif
/* kupdev_disconnect */
proctype Disconnect()
{
	lock();
	if
	:: atomic { !kshut && kattached && kgen == SESSION && !kended ->
		kended = 1; state = state | KUP_STATE_PEER_GONE };   /* sc->lock */
		skip;  /* @reach:disconnect */
		/* KUP_FENCE(), then wake the user side unconditionally */
		DISC_WAKE_USER();
		unlock();
		wake(kwake)
	:: else -> unlock()     /* -EPIPE / -ESHUTDOWN: no session to end */
	fi;
	disc_done = 1
}
#endif

init
{
	atomic {
		run Kernel();
		run User();
		run Host();
#ifdef DEATH
		run Killer();
#endif
#ifdef REATTACH
		run Attach();
#endif
#ifdef SHUTDOWN
		run Unload();
#endif
#ifdef DISCONNECT
		run Disconnect();
#endif
	}
}
