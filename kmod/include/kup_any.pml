/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_any.pml -- Promela model of kupdev_receive_any's wait: kernel
 * threads each waiting on a set of channels at once (disjoint sets, the
 * documented use; an overlapping set gets -EBUSY for a channel another
 * thread waits in, so a channel has at most one waiter: modelled as
 * disjoint), each channel with its own user that hands the turn back with
 * the single-channel handshake of kup_abi.h ("Sleeping and waking"),
 * unchanged.  Checked with SPIN by tests/model/test_any_model.py;
 * kup_turn.pml is the model of one channel's handshake with everything
 * else (death, re-attach, shutdown, poll mode) and stays the reference for
 * the user side.
 *
 * MIRRORS kmod/core/kup_core.c as written:
 *   kup_any_look    one round over the set from a round-robin start; each
 *                   channel looked at under its lock (an atomic step here):
 *                   the first whose turn came back is taken; a channel
 *                   with nothing keeps the thread as its waiter and, once
 *                   the call is armed, names its wake-up object (any_w);
 *   kup_any_arm     before the call's first sleep: the thread's own
 *                   wake-up object, named on every channel of the set
 *                   (each under its lock);
 *   kup_any_wait    full fence, kernel_waiting := 1 on EVERY channel of
 *                   the set, full fence (statement order: Promela is
 *                   sequentially consistent), then kup_os_any_sleep: arm
 *                   the object (drain), evaluate the condition (any
 *                   channel's turn back), block until woken; then every
 *                   flag := 0;
 *   kup_any_release every channel let go (any_w := 0), each under its lock;
 *   the user        kup_abi.h's passer: STORE-RELEASE turn = kernel, full
 *                   fence, LOAD kernel_waiting, and if set the wake-up:
 *                   KUP_IOC_WAKE -> kup_chan_wake, which reads any_w
 *                   (after a fence) and, when set, wakes THAT waiter's
 *                   object under the channel's lock -- not every waiter
 *                   of the device (kupsim's users write the channel's
 *                   eventfd, which only its waiter polls: the same).
 * The user side's own sleep is not the subject (kup_turn.pml checks it):
 * a user waits for its turn with a guard.
 *
 * What SPIN checks: every hand-over is received exactly once and in order
 * (assert), and the run ends with every message received -- a lost
 * wake-up leaves a kernel thread asleep with a message waiting: an invalid
 * end state.  Each BROKEN_* variant below must be reported (the tests
 * require it), so the checks cannot pass vacuously.
 *
 * Configuration (spin -D...):
 *   NWAIT=n        kernel threads, each with its own set (default 1, at
 *                  most 2)
 *   NCHAN=n        channels in each set (default 2, at most 3)
 *   NMSG=n         hand-overs per channel (default 2)
 *   BROKEN_ANY_NO_RECHECK   the waiter sleeps right after setting the
 *                           flags, without looking at the channels again
 *   BROKEN_ANY_ONE_FLAG     kernel_waiting set on the first channel only
 *   BROKEN_ANY_CHAN_WAKE_ONLY a user's wake-up reaches only its channel's
 *                           own sleep object, not the waiter's
 *   BROKEN_ANY_LATE_DRAIN   the wake-up object is drained after the look
 *   BROKEN_ANY_NO_ARM       the first sleep's object is not named on the
 *                           channels (only later looks name it)
 *   BROKEN_ANY_LATE_NAME    the object is named on the channels only after
 *                           the flags and the look
 */

#define KUP_TURN_KERNEL      1262834254   /* 0x4b45524e "KERN" */
#define KUP_TURN_USER        1431520594   /* 0x55534552 "USER" */

#ifndef NWAIT
#define NWAIT 1
#endif
#ifndef NCHAN
#define NCHAN 2
#endif
#ifndef NMSG
#define NMSG 2
#endif
#define NTOT (NWAIT * NCHAN)
#define NONE 255

int  turn[NTOT];                /* every channel: the kernel passed first */
bit  kernel_waiting[NTOT];
byte sent[NTOT];                /* hand-overs by the user */
byte got[NTOT];                 /* messages the kernel took */
byte anyw[NTOT];                /* ch->any_w: 0, or the waiter w + 1 */
bit  dwake[NWAIT];              /* each waiter's own wake-up object */
bit  chwake[NTOT];              /* BROKEN_ANY_CHAN_WAKE_ONLY: per channel */
bit  asleep[NWAIT];             /* that kernel thread blocks in its sleep */

proctype User(byte c)
{
	byte i, w;

	for (i : 1 .. NMSG) {
		turn[c] == KUP_TURN_USER;       /* the kernel's reply (or pass) */
		sent[c]++;                      /* payload and descriptor */
		turn[c] = KUP_TURN_KERNEL;      /* STORE-RELEASE */
		/* KUP_FENCE(), then LOAD kernel_waiting */
		if
		:: kernel_waiting[c] ->
#ifdef BROKEN_ANY_CHAN_WAKE_ONLY
			chwake[c] = 1
#else
			/* kup_chan_wake: fence, any_w without the lock, then
			 * again under it, and that waiter's object */
			w = anyw[c];
			if
			:: w != 0 ->
				atomic {
					if
					:: anyw[c] != 0 ->
						dwake[anyw[c] - 1] = 1   /* @reach:uwake */
					:: else -> skip
					fi
				}
			:: else -> skip
			fi
#endif
		:: else -> skip
		fi
	}
}

proctype Kernel(byte w)
{
	byte total, start, k, i, r;
	bit back, armed;

	do
	:: total == NCHAN * NMSG -> break
	:: else ->
		/* kup_any_look: a round from start, each channel under its lock */
		r = NONE;
		for (k : 0 .. NCHAN - 1) {
			atomic {
				i = w * NCHAN + (start + k) % NCHAN;
				if
				:: r == NONE && turn[i] == KUP_TURN_KERNEL -> r = i
#ifndef BROKEN_ANY_LATE_NAME
				:: r == NONE && turn[i] != KUP_TURN_KERNEL && armed ->
					anyw[i] = w + 1
#endif
				:: else -> skip
				fi
			}
		}
		if
		:: r != NONE ->
			/* kup_recv_take: the message, exactly the next one */
			got[r]++;
			assert(got[r] == sent[r]);
			total++;
			start = (r - w * NCHAN + 1) % NCHAN;
			/* kup_any_release: the others let go */
			for (k : 0 .. NCHAN - 1) {
				anyw[w * NCHAN + k] = 0
			}
			/* unlock, answer: the turn goes back to the user */
			turn[r] = KUP_TURN_USER
		:: else ->
			/* kup_any_arm, before the first sleep */
			if
			:: !armed ->
				armed = 1;
#if !defined(BROKEN_ANY_NO_ARM) && !defined(BROKEN_ANY_LATE_NAME)
				for (k : 0 .. NCHAN - 1) {
					anyw[w * NCHAN + k] = w + 1
				}
#endif
			:: else -> skip
			fi;
			/* kup_any_wait: fence, every flag, then the fence */
			for (k : 0 .. NCHAN - 1) {
#ifdef BROKEN_ANY_ONE_FLAG
				if
				:: k == 0 -> kernel_waiting[w * NCHAN + k] = 1
				:: else -> skip
				fi
#else
				kernel_waiting[w * NCHAN + k] = 1
#endif
			}
			/* kup_os_any_sleep: arm, look, block */
#ifndef BROKEN_ANY_LATE_DRAIN
			dwake[w] = 0;
#endif
			back = 0;
#ifndef BROKEN_ANY_NO_RECHECK
			for (k : 0 .. NCHAN - 1) {
				back = back || turn[w * NCHAN + k] == KUP_TURN_KERNEL
			}
#endif
#ifdef BROKEN_ANY_LATE_DRAIN
			dwake[w] = 0;
#endif
#ifdef BROKEN_ANY_LATE_NAME
			for (k : 0 .. NCHAN - 1) {
				anyw[w * NCHAN + k] = w + 1
			}
#endif
			if
			:: back -> skip             /* @reach:krecheck */
			:: else ->
				asleep[w] = 1;
				dwake[w] == 1;      /* @reach:ksleep */
				asleep[w] = 0
			fi;
			for (k : 0 .. NCHAN - 1) {
				kernel_waiting[w * NCHAN + k] = 0
			}
			/* kup_any_release */
			for (k : 0 .. NCHAN - 1) {
				anyw[w * NCHAN + k] = 0
			}
		fi
	od;
	/* every hand-over received once, in order */
	for (k : 0 .. NCHAN - 1) {
		assert(got[w * NCHAN + k] == NMSG && sent[w * NCHAN + k] == NMSG)
	}
}

init {
	byte c;

	atomic {
		for (c : 0 .. NTOT - 1) {
			turn[c] = KUP_TURN_USER
		}
		for (c : 0 .. NTOT - 1) {
			run User(c)
		}
		for (c : 0 .. NWAIT - 1) {
			run Kernel(c)
		}
	}
}
