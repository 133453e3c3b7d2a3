/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_turn.pml -- Promela model of the KUP turn protocol, checked with SPIN.
 *
 * MIRRORS: kup_abi.h, KUP_ABI_VERSION 1, the sections
 *   "The turn protocol"     (hand-over order: payload, descriptor,
 *                            STORE-RELEASE turn; receiver reads the
 *                            descriptor once and checks kind/len/seq),
 *   "Sleeping and waking"   (the Dekker pair: waiting flag, full fence,
 *                            re-check; passer: release turn, full fence,
 *                            look at the peer's waiting flag, wake;
 *                            counting wake-up objects),
 *   "Shutdown and departure" (ctrl->state written by the kernel side,
 *                            unconditional wake-up of the user side;
 *                            CLOSE on departure; death = host detaches and
 *                            wakes kernel-side waiters with an error),
 * and docs/DESIGN.md "Turn semantics" (kernel owns a fresh channel, one
 * message per hand-over, sequence numbers from 1 per direction, counting
 * PASS and CLOSE).  Names below are the header's names; values are the
 * header's values written in decimal (Promela has no hex literals).
 * tests/model/test_turn_model.py checks that every KUP_* name defined here
 * exists in kup_abi.h with the same value, so a rename or renumbering in
 * the header breaks the test until this model follows.
 *
 * What is modelled.  Processes:
 *   Kernel  -- a module thread: kupdev_send/kupdev_pass, then
 *              kupdev_receive_msg, until it receives CLOSE or an error.
 *              Its view of ownership and of shutdown/detach is PRIVATE
 *              (kturn, kstop), as in kup_core.c: it never trusts the page.
 *   User    -- libkup: receive, reply (DATA or PASS), and after NMSG
 *              messages send CLOSE and leave.
 *   Host    -- the host's release path (kup_core_detach): once the user's
 *              descriptor is closed (exit or death) it marks the channel
 *              PEER_GONE under the channel lock and wakes kernel waiters.
 *   Killer  -- (-DDEATH) kills the user process at an arbitrary point,
 *              including in the middle of writing a message.
 *   Unload  -- (-DSHUTDOWN) kupdev_unload at an arbitrary point: SHUTDOWN
 *              in the core's private state and in ctrl->state, then an
 *              unconditional wake-up of the user side and of kernel waiters.
 *
 * Memory model.  Promela statements are sequentially consistent, so the
 * full fences (KUP_FENCE) are modelled by statement order, and an
 * acquire/release pair by the order of the stores before the turn store.
 * The weaker orders that the fences and the release forbid are modelled
 * explicitly by the BROKEN_* variants below, which move a store after a
 * load (the store-buffer effect a missing fence allows) or the turn store
 * before the data stores (a missing release).  The test suite requires SPIN
 * to FIND the resulting lost wake-up / overlap in each of them: that is the
 * proof that the checks are not vacuous.
 *
 * Sleeps have no timeout here (KUPDEV_FOREVER, libkup blocking receive):
 * a lost wake-up is then a process asleep forever, which SPIN reports as
 * an invalid end state and as a violation of the liveness formulas.  A
 * timeout is only a spurious wake-up, modelled by -DSPURIOUS.
 *
 * Configuration (spin -D...):
 *   NMSG=n        messages the kernel sends (default 3); the user answers
 *                 n-1 of them and closes with CLOSE
 *   SPINS=n       spin iterations before a side sleeps (default 1)
 *   DEATH         the user process may die at any point
 *   SHUTDOWN      the device may be unloaded at any point
 *   SPURIOUS      sleeps may return without a wake-up (2 in all)
 *   NO_CS_ASSERT  no assert() for mutual exclusion: only "ltl mutex" checks it
 *   ANYKIND       each message is DATA or PASS at random (default:
 *                 alternating, kernel starts with DATA, user with PASS)
 *   BROKEN_WAITER_NO_FENCE   waiter: re-check load overtakes the flag store
 *   BROKEN_PASSER_NO_FENCE   passer: waiting-flag load overtakes the turn store
 *   BROKEN_EARLY_WAKE_LOST   a wake-up sent before the sleep is dropped
 *   BROKEN_NO_RELEASE        turn store visible before payload/descriptor
 *   BROKEN_SHUTDOWN_NO_WAKE  unload does not wake the user side
 *   BROKEN_DETACH_NO_WAKE    detach does not wake kernel-side waiters
 *   BROKEN_DETACH_NO_LOCK    detach does not take the channel lock
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
#define STOP_BITS  6          /* KUP_STATE_SHUTDOWN | KUP_STATE_PEER_GONE */

/* results (kernel: -errno, user: KUP_E_*) */
#define R_OK        0
#define R_SHUTDOWN  1         /* -ESHUTDOWN / KUP_E_SHUTDOWN */
#define R_PEER      2         /* -EPIPE     / KUP_E_PEER */
#define R_PROTO     3         /* -EPROTO    / KUP_E_PROTO */
#define R_NOTTURN   4         /* -EAGAIN    / KUP_E_NOTTURN */

/* kernel's private view of the turn (kup_core_priv.h KUP_KT_*) */
#define KT_KERNEL   0
#define KT_USER     1

/* ---- the control page (struct kup_ctrl) and data areas --------------- */
typedef kup_msg_desc { byte mlen; byte kind; byte seq }  /* len: "len" is a Promela keyword */
int  turn = KUP_TURN_KERNEL;           /* a fresh channel: kernel owns it */
byte state = KUP_STATE_ATTACHED;       /* kernel-written */
kup_msg_desc k2u;                      /* kernel-written */
kup_msg_desc u2k;                      /* user-written */
bit  kernel_waiting;
bit  user_waiting;
byte k2u_data;                         /* payload: stamped with its seq */
byte u2k_data;

/* ---- wake-up objects (eventfd / wait queue + condition): counting ----- */
bit  kwake;                            /* wakes the kernel side */
bit  uwake;                            /* wakes the user side */
bit  kasleep;                          /* ghost: blocked in the sleep */
bit  uasleep;

/* ---- kernel private state (struct kup_chan) ---------------------------- */
bit  chan_lock;                        /* kup_chan.lock */
byte kstop;                            /* SHUTDOWN / PEER_GONE, private */
byte kturn = KT_KERNEL;                /* kup_chan.kturn */

/* ---- ghosts for the properties ----------------------------------------- */
bit  k_cs;                             /* kernel touching a data area */
bit  u_cs;                             /* user touching a data area */
byte k_sent, u_sent;                   /* hand-overs made (turn stores) */
byte k_recv, u_recv;                   /* messages accepted by the receiver */
bit  k_done, u_left, host_done;        /* ended */
bit  k_stopped, u_stopped;             /* ended on an error / death */
bit  kill_user;                        /* DEATH: the user is killed now */
#ifdef SHUTDOWN
bit  unload_done;
#else
bit  unload_done = 1;
#endif

#ifdef SPURIOUS
byte spurious = 2;                     /* timeouts / signals, in all */
#endif

/* Entering a data area: the other side must not be in one.  -DNO_CS_ASSERT
 * leaves the judgement to the LTL formula "mutex" alone (the tests use it
 * to show that the formula, too, sees an overlap). */
#ifdef NO_CS_ASSERT
#define CS_ASSERT(c) skip
#else
#define CS_ASSERT(c) assert(c)
#endif

#define ALL_DONE (k_done && u_left && host_done && unload_done)

/* ---- properties --------------------------------------------------------- */
/* (1) the two sides never touch the data areas at the same time */
ltl mutex     { [] !(k_cs && u_cs) }
/* (2) every hand-over is eventually received, unless the receiver stopped
 *     (died / saw shutdown / saw the peer gone) */
ltl k2u_recv  { [] ((k_sent > u_recv) -> <> ((u_recv == k_sent) || u_stopped)) }
ltl u2k_recv  { [] ((u_sent > k_recv) -> <> ((k_recv == u_sent) || k_stopped)) }
/* (2)+(3) every process ends: nobody sleeps forever */
ltl terminate { <> ALL_DONE }

/* ---- building blocks ----------------------------------------------------- */
inline lock()   { atomic { chan_lock == 0 -> chan_lock = 1 } }
inline unlock() { chan_lock = 0 }

/* Wake a sleeper.  The object keeps a wake-up issued before the sleep
 * (eventfd counter, or a wait queue whose sleeper re-evaluates its
 * condition after arming).  A sleeper consumes all pending wake-ups at
 * once (eventfd read without EFD_SEMAPHORE), so counts above 1 are
 * indistinguishable from 1 for it: the counter saturates at 1, which keeps
 * the state space small without losing any behaviour. */
inline wake(W, ASLEEP)
{
#ifdef BROKEN_EARLY_WAKE_LOST
	if
	:: ASLEEP -> W = 1
	:: else -> skip                 /* nobody asleep yet: dropped */
	fi
#else
	W = 1  /* @reach:wake */
#endif
}

/* Sleep on the wake-up object until a wake-up is counted; consume all
 * pending ones (eventfd read / condition re-armed). */
inline sleep_on(W, ASLEEP)
{
	ASLEEP = 1;
#ifdef SPURIOUS
	if
	:: atomic { W > 0 -> W = 0; ASLEEP = 0 }  /* @reach:sleep_sp */
	:: atomic { spurious > 0 -> spurious--; ASLEEP = 0 }  /* timeout; @reach:timeout */
	fi
#else
	atomic { W > 0 -> W = 0; ASLEEP = 0 }  /* @reach:sleep */
#endif
}

/*
 * The waiter: spin a little on LOAD-ACQUIRE turn, then
 *   STORE waiting = 1; FULL FENCE; re-check turn (and the stop bits);
 *   sleep; waiting = 0; loop.
 * STOPSRC is where this side learns about shutdown/departure: the kernel's
 * private kstop, the user's ctrl->state.  SHUTDOWN wins over the turn (a
 * side told the device is going away reports it); PEER_GONE is checked
 * under the lock by the kernel's receive.
 */
inline wait_turn(ME, WAITING, W, ASLEEP, STOPSRC, r)
{
	spins = 0;
	do
	:: s = STOPSRC;
	   if
	   :: (s & KUP_STATE_SHUTDOWN) != 0 -> r = R_SHUTDOWN; break  /* @reach:wait_shutdown */
	   :: (s & STOP_BITS) == KUP_STATE_PEER_GONE -> r = R_PEER; break  /* @reach:wait_peer */
	   :: else -> skip
	   fi;
	   t = turn;                            /* LOAD-ACQUIRE */
	   if
	   :: t == ME -> r = R_OK; break
	   :: else -> skip
	   fi;
	   if
	   :: spins < SPINS -> spins++          /* KUP_CPU_RELAX */
	   :: else ->
#ifdef BROKEN_WAITER_NO_FENCE
		/* no fence: the loads complete while the flag store still
		 * sits in the store buffer */
		t = turn;
		s = STOPSRC;
		WAITING = 1;
#else
		WAITING = 1;                    /* STORE my_waiting = 1 */
		/* KUP_FENCE(): statement order */
		t = turn;                       /* LOAD-ACQUIRE turn */
		s = STOPSRC;
#endif
		if
		:: t == ME || (s & STOP_BITS) != 0 -> WAITING = 0  /* loop top takes it; @reach:recheck */
		:: else ->
			sleep_on(W, ASLEEP);
			WAITING = 0;
			spins = 0
		fi
	   fi
	od
}

/*
 * The passer's second half: STORE-RELEASE turn = peer; FULL FENCE;
 * if peer_waiting: wake the peer.  SENT counts the hand-over (ghost,
 * updated in the same step as the turn store).
 */
inline hand_over(PEER, PEER_WAITING, W, ASLEEP, SENT)
{
#ifdef BROKEN_PASSER_NO_FENCE
	w = PEER_WAITING;                       /* load overtakes the store */
	atomic { turn = PEER; SENT++ };
#else
#ifndef BROKEN_NO_RELEASE
	atomic { turn = PEER; SENT++ };         /* STORE-RELEASE */
#endif
	/* KUP_FENCE(): statement order */
	w = PEER_WAITING;
#endif
	if
	:: w -> wake(W, ASLEEP)
	:: else -> skip
	fi
}

/* DATA or PASS for the next message: any (-DANYKIND), or alternating so
 * that both kinds travel both ways without doubling the state space per
 * message (the kind only decides whether a payload byte is written). */
inline pick_kind(KIND, DATA_IF)
{
#ifdef ANYKIND
	if
	:: KIND = KUP_KIND_DATA
	:: KIND = KUP_KIND_PASS
	fi
#else
	if
	:: DATA_IF -> KIND = KUP_KIND_DATA
	:: else -> KIND = KUP_KIND_PASS
	fi
#endif
}

/* ---- kernel side (kup_core.c) ------------------------------------------- */

/* kupdev_send (KIND == DATA) / kupdev_pass (KIND == PASS) */
inline k_send(KIND, r)
{
	lock();
	s = kstop;
	if
	:: (s & KUP_STATE_SHUTDOWN) != 0 -> r = R_SHUTDOWN  /* @reach:send_shutdown */
	:: (s & STOP_BITS) == KUP_STATE_PEER_GONE -> r = R_PEER  /* @reach:send_peer */
	:: s == 0 && kturn != KT_KERNEL -> r = R_NOTTURN
	:: s == 0 && kturn == KT_KERNEL ->
#ifdef BROKEN_NO_RELEASE
		atomic { turn = KUP_TURN_USER; k_sent++ };
#endif
		/* enter: nobody touches data after the peer is gone */
		atomic { k_cs = 1; CS_ASSERT(!u_cs); assert((kstop & STOP_BITS) == 0) };
		d_step {                 /* payload, then descriptor {len, kind, seq} */
			if
			:: KIND == KUP_KIND_DATA -> k2u_data = kseq + 1; k2u.mlen = 1
			:: else -> k2u.mlen = 0
			fi;
			k2u.kind = KIND;
			k2u.seq = kseq + 1;
			kseq++;
			kturn = KT_USER
		};
		k_cs = 0;
		hand_over(KUP_TURN_USER, user_waiting, uwake, uasleep, k_sent);
		r = R_OK
	fi;
	unlock()
}

/* kupdev_receive_msg + kupdev_unlock_channel */
inline k_receive(r)
{
	do
	:: wait_turn(KUP_TURN_KERNEL, kernel_waiting, kwake, kasleep, kstop, r);
	   if
	   :: r != R_OK -> break
	   :: else -> skip
	   fi;
	   lock();
	   s = kstop;
	   if
	   :: (s & KUP_STATE_SHUTDOWN) != 0 -> r = R_SHUTDOWN; unlock(); break  /* @reach:locked_shutdown */
	   :: (s & STOP_BITS) == KUP_STATE_PEER_GONE -> r = R_PEER; unlock(); break  /* @reach:locked_peer */
	   :: s == 0 ->
		atomic { k_cs = 1; CS_ASSERT(!u_cs); assert((kstop & STOP_BITS) == 0) };
		/* read the descriptor ONCE into locals, validate the locals,
		 * read the payload only when they are valid */
		d_step {
			dlen = u2k.mlen;
			dkind = u2k.kind;
			dseq = u2k.seq;
			if
			:: dkind < KUP_KIND_DATA || dkind > KUP_KIND_CLOSE ||
			   dlen > DATA_SIZE || dseq != klast + 1 ->
				r = R_PROTO              /* no payload byte read */
			:: else ->
				if
				:: dlen > 0 ->
					stamp = u2k_data;
					assert(stamp == dseq)  /* the payload is this message's */
				:: else -> skip
				fi;
				klast = dseq;
				k_recv++;
				kturn = KT_KERNEL;
				r = R_OK
			fi;
			stamp = 0
		};
		k_cs = 0;
		unlock();                            /* kupdev_unlock_channel */
		break
	   fi
	od
}

proctype Kernel()
{
	byte spins, s, dlen, dkind, dseq, stamp, kind, r, r2;
	byte kseq, klast;
	int t;
	bit w;

	do
	:: pick_kind(kind, kseq % 2 == 0);
	   k_send(kind, r);
	   if
	   :: r != R_OK -> break
	   :: else -> skip
	   fi;
	   k_receive(r);
	   if
	   :: r != R_OK -> break
	   :: r == R_OK && dkind == KUP_KIND_CLOSE -> break  /* @reach:close */
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
#if !defined(DEATH) && !defined(SHUTDOWN)
	/* normal run: all messages before CLOSE were received; the CLOSE
	 * itself may be reported as the peer's departure (-EPIPE) when the
	 * detach comes first -- KUP_E_PEER covers both */
	assert(klast >= NMSG - 1);
	assert(r == R_OK || r == R_PEER);
#endif
	k_done = 1
}

/* ---- user side (libkup) ------------------------------------------------- */

inline u_read(r)
{
	atomic { u_cs = 1; CS_ASSERT(!k_cs) };
	d_step {
		dlen = k2u.mlen;
		dkind = k2u.kind;
		dseq = k2u.seq;
		if
		:: dkind < KUP_KIND_DATA || dkind > KUP_KIND_CLOSE ||
		   dlen > DATA_SIZE || dseq != ulast + 1 ->
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

inline u_send(KIND, r)
{
	s = state;
	if
	:: (s & KUP_STATE_SHUTDOWN) != 0 -> r = R_SHUTDOWN  /* @reach:user_send_shutdown */
	:: else ->
#ifdef BROKEN_NO_RELEASE
		atomic { turn = KUP_TURN_KERNEL; u_sent++ };
#endif
		atomic { u_cs = 1; CS_ASSERT(!k_cs) };
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
		hand_over(KUP_TURN_KERNEL, kernel_waiting, kwake, kasleep, u_sent);
		r = R_OK
	fi
}

proctype User()
{
	byte spins, s, dlen, dkind, dseq, stamp, kind, r;
	byte useq, ulast;
	int t;
	bit w;

	{
		do
		:: wait_turn(KUP_TURN_USER, user_waiting, uwake, uasleep, state, r);
		   if
		   :: r != R_OK -> u_stopped = 1; break  /* @reach:user_wait_stop */
		   :: else -> skip
		   fi;
		   u_read(r);
		   assert(r == R_OK);               /* honest kernel */
		   if
		   :: r != R_OK -> u_stopped = 1; break   /* KUP_E_PROTO */
		   :: else -> skip
		   fi;
		   /* (4) the receiver sees 1, 2, 3, ... */
		   assert(ulast == u_recv);
		   if
		   :: u_recv == NMSG ->
			u_send(KUP_KIND_CLOSE, r);   /* leaving while holding the turn */
			break
		   :: else ->
			pick_kind(kind, useq % 2 == 1);
			u_send(kind, r);
			if
			:: r != R_OK -> u_stopped = 1; break
			:: else -> skip
			fi
		   fi
		od
	} unless {
		kill_user -> u_cs = 0; u_stopped = 1      /* process death; @reach:death */
	};
#if !defined(DEATH) && !defined(SHUTDOWN)
	assert(!u_stopped && ulast == NMSG);
#endif
	u_left = 1                                     /* descriptor closed */
}

/* ---- host: kup_core_detach on the release path --------------------------- */
proctype Host()
{
	u_left;
	/* under the channel lock (one step: the lock is taken, both stores
	 * made and the lock dropped with nothing else running) */
#ifdef BROKEN_DETACH_NO_LOCK
	kstop = kstop | KUP_STATE_PEER_GONE;
#else
	atomic {
		chan_lock == 0 ->
		kstop = kstop | KUP_STATE_PEER_GONE;
#endif
		state = (state & ~KUP_STATE_ATTACHED) | KUP_STATE_PEER_GONE
#ifndef BROKEN_DETACH_NO_LOCK
	};
#else
	;
#endif
	/* KUP_FENCE(), then wake every kernel-side waiter with the error */
	atomic {
#ifndef BROKEN_DETACH_NO_WAKE
		wake(kwake, kasleep);
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

#ifdef SHUTDOWN
/* kupdev_unload */
proctype Unload()
{
	atomic {                  /* under the channel lock, as in Host */
		chan_lock == 0 ->
		kstop = kstop | KUP_STATE_SHUTDOWN;
		state = state | KUP_STATE_SHUTDOWN
	};
	/* KUP_FENCE(), then wake both sides unconditionally */
#ifndef BROKEN_SHUTDOWN_NO_WAKE
	wake(uwake, uasleep);
#endif
	atomic { wake(kwake, kasleep); unload_done = 1 }
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
#ifdef SHUTDOWN
		run Unload();
#endif
	}
}
