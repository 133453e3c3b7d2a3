/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * kupsim -- run KUP kernel modules in a user process.
 *
 *   kupsim [-d RUNDIR] module.so [module.so ...]
 *
 * Loads each module (dlopen), calls its kup_module_init(), publishes every
 * device it creates as RUNDIR/<name>.sock (RUNDIR: -d, else $KUPSIM_DIR,
 * else /run/kupsim), prints "kupsim: ready <dev> <dev>..." on stdout and
 * serves until SIGTERM/SIGINT; then calls every module's kup_module_fini()
 * in reverse order (which unloads its devices: user sides see
 * EKU_SHUTDOWN) and exits 0.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "kup_os.h"
#include "kupsim.h"

struct module {
	const char *path;
	void *dl;
	int (*init)(void);
	void (*fini)(void);
};

static void
usage(void)
{
	fprintf(stderr, "usage: kupsim [-d RUNDIR] module.so [module.so ...]\n"
	    "  RUNDIR defaults to $KUPSIM_DIR, else /run/kupsim\n");
}

static void
raise_nofile(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		(void)setrlimit(RLIMIT_NOFILE, &rl);
	}
}

int
main(int argc, char **argv)
{
	const char *rundir = getenv("KUPSIM_DIR");
	struct module *mods = NULL;
	char names[4096];
	sigset_t ss;
	int opt, nmods, i, sig, rc = 1;

	while ((opt = getopt(argc, argv, "d:h")) != -1) {
		switch (opt) {
		case 'd':
			rundir = optarg;
			break;
		case 'h':
			usage();
			return 0;
		default:
			usage();
			return 2;
		}
	}
	if (rundir == NULL || *rundir == '\0')
		rundir = "/run/kupsim";
	nmods = argc - optind;
	if (nmods <= 0) {
		fprintf(stderr, "kupsim: no module given\n");
		usage();
		return 2;
	}
	mods = calloc((size_t)nmods, sizeof(*mods));
	if (mods == NULL)
		return 1;
	raise_nofile();

	/* every thread inherits this mask; main collects the signal */
	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	pthread_sigmask(SIG_BLOCK, &ss, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (kup_core_init() != 0)
		goto out;
	if (kupsim_server_start(rundir) != 0)
		goto out_core;

	for (i = 0; i < nmods; i++) {
		struct module *m = &mods[i];
		int r;

		m->path = argv[optind + i];
		m->dl = dlopen(m->path, RTLD_NOW | RTLD_LOCAL);
		if (m->dl == NULL) {
			fprintf(stderr, "kupsim: cannot load module %s: %s\n",
			    m->path, dlerror());
			goto out_fini;
		}
		m->init = (int (*)(void))dlsym(m->dl, "kup_module_init");
		m->fini = (void (*)(void))dlsym(m->dl, "kup_module_fini");
		if (m->init == NULL || m->fini == NULL) {
			fprintf(stderr, "kupsim: module %s lacks kup_module_init "
			    "or kup_module_fini\n", m->path);
			dlclose(m->dl);
			m->dl = NULL;
			goto out_fini;
		}
		r = m->init();
		if (r != 0) {
			fprintf(stderr, "kupsim: module %s: kup_module_init "
			    "failed: %s\n", m->path, strerror(r < 0 ? -r : r));
			m->fini = NULL;   /* init failed: it cleaned up */
			goto out_fini;
		}
	}
	kupsim_server_names(names, sizeof(names));
	printf("kupsim: ready %s\n", names);
	fflush(stdout);

	for (;;) {
		if (sigwait(&ss, &sig) == 0 && (sig == SIGTERM || sig == SIGINT))
			break;
	}
	/* tell every user of every device at once, then unload the modules */
	kup_core_shutdown_all();
	kup_os_log("kupsim: %s: unloading modules", strsignal(sig));
	rc = 0;

out_fini:
	for (i = nmods - 1; i >= 0; i--) {
		if (mods[i].fini != NULL && mods[i].dl != NULL)
			mods[i].fini();
	}
	kupsim_server_stop();
	/* modules are not dlclose()d: leak reports keep their symbols */
out_core:
	kup_core_fini();
out:
	free(mods);
	return rc;
}
