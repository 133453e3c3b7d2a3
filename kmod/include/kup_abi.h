/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_abi.h -- the KUP shared-page ABI, version 1.
 *
 * This header is the ONLY definition of the memory shared between a KUP
 * kernel module (the "kernel side") and a user process (the "user side").
 * It is included unchanged by the OS-neutral core (kmod/core), by every
 * kernel host (Linux, FreeBSD, kupsim), by libkup and, through a probe
 * program, by the test that checks kupd's Python mirror of these numbers.
 *
 * Rules that keep it an ABI rather than a struct:
 *   - fixed-width fields only, no pointers: the two sides map the pages at
 *     different addresses, so everything is an offset from the start of the
 *     channel mapping;
 *   - every field has a fixed offset, pinned by _Static_assert below;
 *   - reserved fields are written as zero and must be zero: a reader that
 *     sees a non-zero reserved field refuses the mapping (room to grow);
 *   - the version is checked when a channel is attached: a different
 *     KUP_ABI_VERSION is refused with KUP_E_VERSION, before any data moves.
 *
 * Layout of one channel mapping (all sizes in bytes, P = page size,
 * N = pages per direction as given to kupdev_create()):
 *
 *     offset 0        struct kup_ctrl   (one page: KUP_CTRL_SIZE <= P)
 *     offset P        kernel->user data area  (N * P bytes)
 *     offset P + N*P  user->kernel data area  (N * P bytes)
 *     total           P * (1 + 2N)
 *
 * The offsets and sizes are also written into the control page so that a
 * user side can find the areas without knowing P or N in advance; the
 * kernel side NEVER reads them back (user space may have scribbled on
 * them) -- it keeps its own private copy.
 *
 * ---------------------------------------------------------------------
 * The turn protocol
 * ---------------------------------------------------------------------
 * At any time exactly one side owns the channel: the side named by
 * ctrl->turn.  Only the owner may write its outgoing data area and its
 * outgoing message descriptor.  The kernel owns a fresh channel.
 *
 * A side hands over the turn by (in this order):
 *   1. writing the payload into its outgoing data area;
 *   2. writing its outgoing descriptor {len, kind, seq} (plain stores);
 *   3. STORE-RELEASE of ctrl->turn = the peer.
 * The release orders 1 and 2 before 3: a peer that observes the new turn
 * value with a LOAD-ACQUIRE is guaranteed to see the payload and the
 * descriptor.  Every hand-over carries exactly one message: DATA (len
 * payload bytes), PASS (the seed's "dummy token", len 0) or CLOSE (the
 * sender is leaving the channel, len 0).
 *
 * Receiving: LOAD-ACQUIRE ctrl->turn; when it names the receiver, read the
 * peer's descriptor ONCE into locals, then validate the locals:
 * len <= the size of that data area (the receiver's own private copy of
 * the size, never the one in the page), kind is one of KUP_KIND_*, and
 * seq == last seq seen in that direction + 1.  Anything else is a protocol
 * error (KUP_E_PROTO) and no payload byte is read.  Sequence numbers start
 * at 1 in each direction and count every hand-over, PASS and CLOSE
 * included.
 *
 * Sleeping and waking (no lost wake-up, no busy wait):
 *
 *   waiter                                  passer
 *   ------                                  ------
 *   spin a little on LOAD-ACQUIRE turn      STORE-RELEASE turn = peer
 *   STORE my_waiting = 1                    FULL FENCE (seq_cst)
 *   FULL FENCE (seq_cst)                    if LOAD peer_waiting != 0:
 *   if LOAD-ACQUIRE turn == me:                 wake the peer (eventfd /
 *       my_waiting = 0; done                    ioctl / wakeup(9))
 *   sleep on my wake-up object (bounded)
 *   my_waiting = 0; loop
 *
 * The two full fences make this a Dekker pair: either the waiter's second
 * look sees the new turn, or the passer's look sees waiting == 1 and
 * issues a wake-up.  Both may happen (a spurious wake-up, harmless: the
 * waiter re-checks the turn); neither can be missed.  The wake-up objects
 * are counting (eventfd, wait queue + condition) so a wake-up that arrives
 * before the sleep is not lost either.  The Promela model next to this
 * header (kup_turn.pml) checks exactly this handshake; keep them in step.
 *
 * Shutdown and departure are signalled out of band in ctrl->state (set by
 * the kernel side only, followed by a full fence and an unconditional
 * wake-up of the user side); a user side that sees KUP_STATE_SHUTDOWN
 * reports EKU_SHUTDOWN.  A user side leaving sends CLOSE if it holds the
 * turn; if it dies, the host notices the closed descriptor and detaches
 * the channel, waking kernel-side waiters with an error.
 */
#ifndef KUP_ABI_H
#define KUP_ABI_H

#if defined(_KERNEL) || defined(__KERNEL__)
#  if defined(__linux__) || defined(__KERNEL__)
#    include <linux/types.h>
#  else
#    include <sys/types.h>
#  endif
#else
#  include <stdint.h>
#endif

#define KUP_MAGIC          0x3150554bU   /* "KUP1" read as little-endian bytes */
#define KUP_ABI_VERSION    1U

#define KUP_CTRL_SIZE      256U          /* bytes of struct kup_ctrl */
#define KUP_CACHELINE      64U

/* Who owns the channel (ctrl->turn).  0 is never a valid owner, so a page
 * of zeroes (or garbage) is never mistaken for a hand-over. */
#define KUP_TURN_KERNEL    0x4b45524eU   /* "KERN" */
#define KUP_TURN_USER      0x55534552U   /* "USER" */

/* Message kinds (struct kup_msg_desc.kind). */
#define KUP_KIND_DATA      1U
#define KUP_KIND_PASS      2U
#define KUP_KIND_CLOSE     3U

/* Channel state bits (ctrl->state), written by the kernel side only. */
#define KUP_STATE_ATTACHED  0x1U   /* a user side holds the channel */
#define KUP_STATE_SHUTDOWN  0x2U   /* device is going away: EKU_SHUTDOWN */
#define KUP_STATE_PEER_GONE 0x4U   /* kernel side gave up on this user: it
                                    * broke the protocol, or the module
                                    * ended its session (kupdev_disconnect;
                                    * in version 1 from the start, so a
                                    * libkup of any version reports it as
                                    * KUP_E_PEER) */

/*
 * Error codes shared by every layer above the kernel API: libkup's
 * kernproxy_errno / kernproxy_error(), the wire replies of the kupsim
 * host, and kupd's Python error taxonomy.  Kernel-side functions return
 * negative errno values instead (kernel convention); the hosts translate
 * at their user boundary.
 */
#define KUP_E_OK         0
#define KUP_E_SHUTDOWN   1001  /* EKU_SHUTDOWN: the device is shutting down */
#define KUP_E_NOTREADY   1002  /* EKU_NOTREADY: not ready (device not yet
                                * announced, or non-blocking op would wait) */
#define KUP_E_NOTTURN    1003  /* wrong side of the turn: a send or pass while
                                * the other side holds it, or a receive of a
                                * message already taken (this side holds it) */
#define KUP_E_TOOBIG     1004  /* message larger than the data area */
#define KUP_E_TIMEDOUT   1005  /* deadline passed */
#define KUP_E_PROTO      1006  /* peer broke the protocol (len/kind/seq) */
#define KUP_E_VERSION    1007  /* ABI magic/version mismatch at attach */
#define KUP_E_BUSY       1008  /* channel held by another user side */
#define KUP_E_NOENT      1009  /* no such device or channel */
#define KUP_E_PEER       1010  /* the peer left (CLOSE, died, detached) or
                                * the kernel side ended the session */
#define KUP_E_INVAL      1011  /* bad argument */
#define KUP_E_SYS        1012  /* a system call failed: see errno */
#define KUP_E_RELEASING  1013  /* attach: the channel's last user has left,
                                * but its kernel side has not let go of it
                                * yet (still computing); retry shortly.
                                * KUP_E_BUSY is "another user holds it". */

/* One message descriptor per direction.  16 bytes. */
struct kup_msg_desc {
	uint32_t len;        /* payload bytes in the sender's data area */
	uint32_t kind;       /* KUP_KIND_* */
	uint64_t seq;        /* 1, 2, 3, ... per direction, every hand-over */
};

/*
 * The control area at offset 0 of every channel mapping.  Fields that one
 * side writes while the other polls live on separate cache lines so that a
 * spinning reader does not steal the line the writer is filling.
 */
struct kup_ctrl {
	/* line 0: identity, written once by the kernel side at attach */
	uint32_t magic;          /* KUP_MAGIC */
	uint32_t abi_version;    /* KUP_ABI_VERSION */
	uint32_t page_size;      /* P */
	uint32_t ctrl_size;      /* KUP_CTRL_SIZE */
	uint32_t k2u_off;        /* offset of kernel->user data area (= P) */
	uint32_t k2u_size;       /* its size (= N * P) */
	uint32_t u2k_off;        /* offset of user->kernel data area */
	uint32_t u2k_size;       /* its size (= N * P) */
	uint32_t chan_id;        /* this channel's index on its device */
	uint32_t chan_count;     /* channels on the device */
	uint32_t reserved0[6];   /* zero */

	/* line 1: the turn and the state */
	uint32_t turn;           /* KUP_TURN_KERNEL or KUP_TURN_USER */
	uint32_t state;          /* KUP_STATE_* bits, kernel-written */
	uint64_t attach_gen;     /* bumped on every attach; stale users see a
	                          * different generation and stop */
	uint32_t reserved1[12];  /* zero */

	/* line 2: kernel -> user descriptor and the kernel's waiting flag */
	struct kup_msg_desc k2u; /* written by the kernel side only */
	uint32_t kernel_waiting; /* 1 while the kernel side sleeps */
	uint32_t reserved2[11];  /* zero */

	/* line 3: user -> kernel descriptor and the user's waiting flag */
	struct kup_msg_desc u2k; /* written by the user side only */
	uint32_t user_waiting;   /* 1 while the user side wants a wake-up:
	                          * asleep, or (poll mode) polling its fd */
	uint32_t reserved3[11];  /* zero */
};

/* Offsets, pinned.  A change to any of these is a new KUP_ABI_VERSION. */
#define KUP_OFF_MAGIC          0U
#define KUP_OFF_ABI_VERSION    4U
#define KUP_OFF_PAGE_SIZE      8U
#define KUP_OFF_CTRL_SIZE      12U
#define KUP_OFF_K2U_OFF        16U
#define KUP_OFF_K2U_SIZE       20U
#define KUP_OFF_U2K_OFF        24U
#define KUP_OFF_U2K_SIZE       28U
#define KUP_OFF_CHAN_ID        32U
#define KUP_OFF_CHAN_COUNT     36U
#define KUP_OFF_TURN           64U
#define KUP_OFF_STATE          68U
#define KUP_OFF_ATTACH_GEN     72U
#define KUP_OFF_K2U            128U
#define KUP_OFF_KERNEL_WAITING 144U
#define KUP_OFF_U2K            192U
#define KUP_OFF_USER_WAITING   208U
#define KUP_DESC_OFF_LEN       0U
#define KUP_DESC_OFF_KIND      4U
#define KUP_DESC_OFF_SEQ       8U
#define KUP_DESC_SIZE          16U

#if !defined(__cplusplus)
#define KUP_ABI_ASSERT(c, m) _Static_assert(c, m)
KUP_ABI_ASSERT(sizeof(struct kup_msg_desc) == KUP_DESC_SIZE, "desc size");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_msg_desc, len) == KUP_DESC_OFF_LEN, "len");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_msg_desc, kind) == KUP_DESC_OFF_KIND, "kind");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_msg_desc, seq) == KUP_DESC_OFF_SEQ, "seq");
KUP_ABI_ASSERT(sizeof(struct kup_ctrl) == KUP_CTRL_SIZE, "ctrl size");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, magic) == KUP_OFF_MAGIC, "magic");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, abi_version) == KUP_OFF_ABI_VERSION, "ver");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, page_size) == KUP_OFF_PAGE_SIZE, "psz");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, ctrl_size) == KUP_OFF_CTRL_SIZE, "csz");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, k2u_off) == KUP_OFF_K2U_OFF, "k2u_off");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, k2u_size) == KUP_OFF_K2U_SIZE, "k2u_size");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, u2k_off) == KUP_OFF_U2K_OFF, "u2k_off");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, u2k_size) == KUP_OFF_U2K_SIZE, "u2k_size");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, chan_id) == KUP_OFF_CHAN_ID, "chan_id");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, chan_count) == KUP_OFF_CHAN_COUNT, "chan_count");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, turn) == KUP_OFF_TURN, "turn");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, state) == KUP_OFF_STATE, "state");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, attach_gen) == KUP_OFF_ATTACH_GEN, "gen");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, k2u) == KUP_OFF_K2U, "k2u");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, kernel_waiting) == KUP_OFF_KERNEL_WAITING, "kw");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, u2k) == KUP_OFF_U2K, "u2k");
KUP_ABI_ASSERT(__builtin_offsetof(struct kup_ctrl, user_waiting) == KUP_OFF_USER_WAITING, "uw");
KUP_ABI_ASSERT(KUP_OFF_TURN % KUP_CACHELINE == 0, "turn on its own line");
KUP_ABI_ASSERT(KUP_OFF_K2U % KUP_CACHELINE == 0, "k2u on its own line");
KUP_ABI_ASSERT(KUP_OFF_U2K % KUP_CACHELINE == 0, "u2k on its own line");
#undef KUP_ABI_ASSERT
#endif

/* Geometry helpers: offsets only, no pointers. */
#define KUP_CHAN_K2U_OFF(page)          ((uint64_t)(page))
#define KUP_CHAN_U2K_OFF(page, npages)  ((uint64_t)(page) * (1U + (uint64_t)(npages)))
#define KUP_CHAN_BYTES(page, npages)    ((uint64_t)(page) * (1U + 2U * (uint64_t)(npages)))
#define KUP_CHAN_DATA_SIZE(page, npages) ((uint64_t)(page) * (uint64_t)(npages))

/* Limits the hosts enforce on kupdev_create() arguments. */
#define KUP_MAX_CHANNELS       1024U
#define KUP_MAX_PAGES          1024U   /* per direction: 4 MiB with 4 KiB pages */
#define KUP_NAME_MAX           32U     /* including the NUL */

/* Bits of a channel's byte in a device's INFO (attached[]; kup_ioctl.h
 * says what each means). */
#define KUP_INFO_ATTACHED      0x01U   /* a user side holds the channel */
#define KUP_INFO_MODULE_HOLDS  0x02U   /* a module thread holds it locked */

#endif /* KUP_ABI_H */
