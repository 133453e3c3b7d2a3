/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kup_client_mod.c -- FreeBSD module glue for a host-neutral KUP module
 * (kup_module.h: kup_module_init / kup_module_fini), e.g. the echo example.
 *
 * Compiled once per client module with -DKUP_CLIENT_MODNAME=<name>
 * (kmod/freebsd/echo/Makefile: kup_echo).  It declares the module to the
 * kernel, records its dependency on kupdev.ko -- the kernel linker then
 * loads kupdev.ko first, resolves the kupdev_* calls against it, and
 * refuses to unload kupdev.ko while this module is loaded -- and maps the
 * load/unload events onto the module's entry points.
 */
#include <sys/param.h>
#include <sys/systm.h>
#include <sys/kernel.h>
#include <sys/module.h>

#include "kup_module.h"

#ifndef KUP_CLIENT_MODNAME
#error "compile with -DKUP_CLIENT_MODNAME=<module name>"
#endif

#define KUP_CM_STR2(x) #x
#define KUP_CM_STR(x)  KUP_CM_STR2(x)

static int
kup_client_modevent(module_t mod, int what, void *arg)
{
	int rc;

	(void)mod;
	(void)arg;
	switch (what) {
	case MOD_LOAD:
		/* kup_module_init returns 0 or a negative errno */
		rc = kup_module_init();
		if (rc > 0 || rc < -ELAST) {
			printf("%s: kup_module_init returned %d, not a "
			    "negative errno\n", KUP_CM_STR(KUP_CLIENT_MODNAME), rc);
			return (EINVAL);
		}
		return (-rc);
	case MOD_UNLOAD:
		/* The module shuts its devices down (kupdev_shutdown wakes
		 * every waiter on both sides), joins its threads and unloads
		 * them; user mappings keep their pages (see kup_freebsd.c). */
		kup_module_fini();
		return (0);
	case MOD_QUIESCE:
	case MOD_SHUTDOWN:
		return (0);
	default:
		return (EOPNOTSUPP);
	}
}

static moduledata_t kup_client_mod = {
	KUP_CM_STR(KUP_CLIENT_MODNAME),
	kup_client_modevent,
	NULL
};

/* The module macros paste their name argument (##), which would take
 * KUP_CLIENT_MODNAME literally; one more macro level expands it first. */
#define KUP_CM_DECLARE(name)						\
	DECLARE_MODULE(name, kup_client_mod, SI_SUB_DRIVERS, SI_ORDER_ANY)
#define KUP_CM_DEPEND(name)	MODULE_DEPEND(name, kupdev, 1, 1, 1)
#define KUP_CM_VERSION(name)	MODULE_VERSION(name, 1)

KUP_CM_DECLARE(KUP_CLIENT_MODNAME);
KUP_CM_DEPEND(KUP_CLIENT_MODNAME);
KUP_CM_VERSION(KUP_CLIENT_MODNAME);
