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

/* Give channel ch, which the caller has detached (kup_core_detach),
 * fresh user-visible objects: a new memfd for its pages (mapped by the
 * kernel side at the same address, zeroed) and new kernel->user and
 * user->kernel eventfds, so that whoever held the previous ones can
 * neither touch nor observe the next attachment.  Never waits for the
 * module: -EBUSY when a kernel-side operation holds the channel lock or a
 * module thread is in the channel (waiting in its receive, or between its
 * receive and kupdev_unlock_channel); -EAGAIN (deferred) when force is 0
 * and the departed user left a message the module has not received yet
 * (kupdev.h: its next receive delivers it; fresh memory would lose it).
 * Until a later call has run, a module thread letting go of the channel
 * calls kupsim_server_kick().  force: renew even then (a new attachment
 * needs the channel).  0, or -errno (-EBUSY and -EAGAIN included): the
 * channel keeps objects a previous user may hold and must not be handed
 * out again until a later call succeeds. */
struct kup_chan;
int  kupsim_chan_renew_try(struct kup_chan *ch, int force);
/* A parked ATTACH waits for ch->lock (the core's -EINPROGRESS): a module
 * thread letting go of it kicks the server, which asks again at once. */
void kupsim_chan_want_lock(struct kup_chan *ch);

/* Wake the server thread (it retries the renewals still to run).  Safe
 * from any thread while the server runs, a no-op when it does not; never
 * sleeps. */
void kupsim_server_kick(void);

/* Devices whose socket path did not fit sun_path so far (each one logged,
 * naming it): their module's init failed for the command line's -d. */
int  kupsim_server_publish_errors(void);

/* Space-separated names of the published devices into buf. */
void kupsim_server_names(char *buf, size_t len);

#endif /* KUPSIM_H */
