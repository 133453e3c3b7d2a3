/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kupsim_proto.h -- the wire protocol between kupsim and libkup's sim
 * backend, over a SOCK_SEQPACKET unix socket RUNDIR/<device>.sock.
 *
 * Every request is one struct kupsim_req packet; every reply one packet
 * starting with struct kupsim_hdr.  Host byte order (same machine).
 *
 *   INFO    -> struct kupsim_info_reply
 *   ATTACH  -> struct kupsim_attach_reply; on status KUP_E_OK the packet
 *              carries SCM_RIGHTS with exactly 3 fds, in this order:
 *              [0] memfd of the channel pages (map reply.bytes, MAP_SHARED)
 *              [1] kernel->user eventfd (readable: kernel woke the user)
 *              [2] user->kernel eventfd (write 8 bytes to wake the kernel)
 *              The connection's lifetime IS the attachment: closing it (or
 *              dying) detaches the channel.  One ATTACH per connection.
 *              The fds belong to this attachment only: every attachment
 *              gets new ones, and once it ends the old memfd and eventfds
 *              are no longer the channel's (writes to them reach nobody,
 *              the kernel side never wakes them again).  A channel whose
 *              previous attachment ended while the module still held it
 *              (between its receive and kupdev_unlock_channel) gets its
 *              new objects when the module lets go: an ATTACH of it (or
 *              of any channel, when no other is free) is answered then,
 *              or after at most 0.5 s with KUP_E_RELEASING (KUP_E_BUSY
 *              is another user holding it); a channel whose
 *              new objects cannot be made is refused with KUP_E_SYS.
 *   WATCH   -> struct kupsim_hdr (status); the connection then receives a
 *              struct kupsim_event packet on every announce/notify and at
 *              shutdown.  Events may be dropped if the reader is slow: the
 *              reader re-reads INFO after any event.
 * Any request may be sent on a fresh connection; INFO on any connection.
 */
#ifndef KUPSIM_PROTO_H
#define KUPSIM_PROTO_H

#include <stdint.h>
#include "kup_abi.h"

#define KUPSIM_PROTO_VERSION 1U

#define KUPSIM_OP_INFO    1U
#define KUPSIM_OP_ATTACH  2U
#define KUPSIM_OP_WATCH   3U
#define KUPSIM_OP_EVENT   4U   /* server -> watcher only */

#define KUPSIM_EV_ANNOUNCE 0x1U
#define KUPSIM_EV_SHUTDOWN 0x2U

struct kupsim_req {
	uint32_t op;           /* KUPSIM_OP_* */
	uint32_t proto;        /* KUPSIM_PROTO_VERSION */
	uint32_t chan_id;      /* ATTACH: id or 0xffffffff (any) */
	uint32_t abi_version;  /* ATTACH: KUP_ABI_VERSION the user was built for */
	uint32_t pages;        /* ATTACH: 0 (any) or must equal the device's */
	uint32_t reserved[3];  /* zero */
};

struct kupsim_hdr {
	uint32_t op;           /* echo of the request op, or KUPSIM_OP_EVENT */
	int32_t  status;       /* KUP_E_* */
};

struct kupsim_info_reply {
	struct kupsim_hdr hdr;
	char     name[KUP_NAME_MAX];
	uint32_t abi_version, page_size, chan_count, announced, pages, max_msg;
	uint32_t shutting_down;
	uint32_t pad;
	uint64_t notify_gen;
	uint8_t  attached[KUP_MAX_CHANNELS];
};

struct kupsim_attach_reply {
	struct kupsim_hdr hdr;
	uint32_t chan_id;
	uint32_t pages;
	uint32_t page_size;
	uint32_t pad;
	uint64_t bytes;        /* length of the mapping */
};

struct kupsim_event {
	struct kupsim_hdr hdr; /* op = KUPSIM_OP_EVENT, status 0 */
	uint32_t what;         /* KUPSIM_EV_* */
	uint32_t announced;
	uint64_t notify_gen;
};

#endif /* KUPSIM_PROTO_H */
