/* SPDX-License-Identifier: BSD-2-Clause */
/* kupsim.h -- between kupsim's glue (kup_os.h side) and its socket server. */
#ifndef KUPSIM_H
#define KUPSIM_H

#include <stddef.h>

struct kupdev_softc;

/* Start serving devices under rundir (lock file, poll thread).  Until
 * started, publish/withdraw/release are no-ops (in-process unit tests).
 * 0, or -1 with a message printed. */
int  kupsim_server_start(const char *rundir);
void kupsim_server_stop(void);

int  kupsim_server_publish(struct kupdev_softc *sc);
void kupsim_server_withdraw(struct kupdev_softc *sc);
void kupsim_server_release(struct kupdev_softc *sc);

/* Give channel ch, which the caller has just detached (kup_core_detach),
 * fresh user-visible objects: a new memfd for its pages (mapped by the
 * kernel side at the same address, zeroed) and new kernel->user and
 * user->kernel eventfds, so that whoever held the previous ones can
 * neither touch nor observe the next attachment.  Waits for a kernel-side
 * operation in progress on ch to finish.  0, or -errno: the channel keeps
 * objects a previous user may hold and must not be handed out again until
 * a later call succeeds. */
struct kup_chan;
int  kupsim_chan_renew(struct kup_chan *ch);

/* Space-separated names of the published devices into buf. */
void kupsim_server_names(char *buf, size_t len);

#endif /* KUPSIM_H */
