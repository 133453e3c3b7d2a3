/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_any.pml -- Promela model of kupdev_receive_any's wait: ONE kernel
 * thread waiting on several channels at once, each with its own user that
 * hands the turn back with the single-channel handshake of kup_abi.h
 * ("Sleeping and waking"), unchanged.  Checked with SPIN by
 * tests/model/test_any_model.py; kup_turn.pml is the model of one
 * channel's handshake with everything else (death, re-attach, shutdown,
 * poll mode) and stays the reference for the user side.
 *
 * MIRRORS kmod/core/kup_core.c as written:
 *   kup_any_look    one round over the set from a round-robin start; each
 *                   channel looked at under its lock (an atomic step here):
 *                   the first whose turn came back is taken;
 *   kup_any_wait    kernel_waiting := 1 on EVERY channel of the set, full
 *                   fence (statement order: Promela is sequentially
 *                   consistent), then kup_os_any_sleep: arm the wake-up
 *                   object (drain), evaluate the condition (any channel's
 *                   turn back), block until woken; then every flag := 0;
 *   the user        kup_abi.h's passer: STORE-RELEASE turn = kernel, full
 *                   fence, LOAD kernel_waiting, and if set the wake-up
 *                   (Linux/FreeBSD KUP_IOC_WAKE -> kup_os_chan_wake, which
 *                   also wakes the device's receive_any queue; kupsim: the
 *                   channel's eventfd, which the any-sleeper polls).  Both
 *                   are one wake-up object the sleeper armed: `dwake`.
 * The user side's own sleep is not the subject (kup_turn.pml checks it):
 * a user waits for its turn with a guard.
 *
 * What SPIN checks: every hand-over is received exactly once and in order
 * (assert), and the run ends with every message received -- a lost
 * wake-up leaves the kernel asleep with a message waiting: an invalid end
 * state.  Each BROKEN_* variant below must be reported (the tests require
 * it), so the checks cannot pass vacuously.
 *
 * Configuration (spin -D...):
 *   NCHAN=n        channels in the set (default 2, at most 3)
 *   NMSG=n         hand-overs per channel (default 2)
 *   BROKEN_ANY_NO_RECHECK   the waiter sleeps right after setting the
 *                           flags, without looking at the channels again
 *   BROKEN_ANY_ONE_FLAG     kernel_waiting set on the first channel only
 *   BROKEN_ANY_CHAN_WAKE_ONLY a user's wake-up reaches only its channel's
 *                           own sleep object, not the device-level sleeper
 *   BROKEN_ANY_LATE_DRAIN   the wake-up object is drained after the look
 */

#define KUP_TURN_KERNEL      1262834254   /* 0x4b45524e "KERN" */
#define KUP_TURN_USER        1431520594   /* 0x55534552 "USER" */

#ifndef NCHAN
#define NCHAN 2
#endif
#ifndef NMSG
#define NMSG 2
#endif
#define NONE 255

int  turn[NCHAN];               /* every channel: the kernel passed first */
bit  kernel_waiting[NCHAN];
byte sent[NCHAN];               /* hand-overs by the user */
byte got[NCHAN];                /* messages the kernel took */
bit  dwake;                     /* the sleeper's armed wake-up object */
bit  chwake[NCHAN];             /* BROKEN_ANY_CHAN_WAKE_ONLY: per channel */
bit  asleep;                    /* the kernel blocks in its sleep */

proctype User(byte c)
{
	byte i;

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
			dwake = 1               /* @reach:uwake */
#endif
		:: else -> skip
		fi
	}
}

proctype Kernel()
{
	byte total, start, k, i, r;
	bit back;

	do
	:: total == NCHAN * NMSG -> break
	:: else ->
		/* kup_any_look: a round from start, each channel under its lock */
		r = NONE;
		for (k : 0 .. NCHAN - 1) {
			atomic {
				i = (start + k) % NCHAN;
				if
				:: r == NONE && turn[i] == KUP_TURN_KERNEL -> r = i
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
			start = (r + 1) % NCHAN;
			/* unlock, answer: the turn goes back to the user */
			turn[r] = KUP_TURN_USER
		:: else ->
			/* kup_any_wait: every flag, then the fence */
			for (k : 0 .. NCHAN - 1) {
#ifdef BROKEN_ANY_ONE_FLAG
				if
				:: k == 0 -> kernel_waiting[k] = 1
				:: else -> skip
				fi
#else
				kernel_waiting[k] = 1
#endif
			}
			/* kup_os_any_sleep: arm, look, block */
#ifndef BROKEN_ANY_LATE_DRAIN
			dwake = 0;
#endif
			back = 0;
#ifndef BROKEN_ANY_NO_RECHECK
			for (k : 0 .. NCHAN - 1) {
				back = back || turn[k] == KUP_TURN_KERNEL
			}
#endif
#ifdef BROKEN_ANY_LATE_DRAIN
			dwake = 0;
#endif
			if
			:: back -> skip             /* @reach:krecheck */
			:: else ->
				asleep = 1;
				dwake == 1;         /* @reach:ksleep */
				asleep = 0
			fi;
			for (k : 0 .. NCHAN - 1) {
				kernel_waiting[k] = 0
			}
		fi
	od;
	/* every hand-over received once, in order */
	for (k : 0 .. NCHAN - 1) {
		assert(got[k] == NMSG && sent[k] == NMSG)
	}
}

init {
	byte c;

	atomic {
		for (c : 0 .. NCHAN - 1) {
			turn[c] = KUP_TURN_USER
		}
		for (c : 0 .. NCHAN - 1) {
			run User(c)
		}
		run Kernel()
	}
}
