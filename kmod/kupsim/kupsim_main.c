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
 *
 * Every module is loaded before any is initialised, so that one given
 * twice is refused (exit 2) before its init could run twice on the same
 * globals.  A module path is always a file path: one without a '/' is
 * loaded as ./path, never looked up on the library path.  Exit 2 also
 * for a RUNDIR too long for its sockets' paths (kupsim_server_start).  A
 * KUP_PARAM_* value that is not a decimal int is logged and the module
 * gets its default, as on the kernel hosts (kup_module.h).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "kup_os.h"
#include "kupsim.h"

struct module {
	const char *path;          /* as given on the command line */
	char *real;                /* realpath(path), NULL if it failed */
	void *dl;
	int (*init)(void);
	void (*fini)(void);
	int inited;                /* init returned 0: fini is owed */
};

static void
usage(FILE *f)
{
	fprintf(f, "usage: kupsim [-d RUNDIR] module.so [module.so ...]\n"
	    "  -d RUNDIR    where the device sockets go (default $KUPSIM_DIR,"
	    " else /run/kupsim)\n"
	    "  module.so    a module file (a bare name: in the current directory)\n"
	    "  environment  KUP_PARAM_<MODULE>_<NAME>=<integer>: module parameters,\n"
	    "               e.g. KUP_PARAM_ECHO_CHANNELS=8 (decimal; a malformed or\n"
	    "               out-of-range one is logged and the default used)\n"
	    "  SIGTERM or SIGINT unloads every module and exits.\n");
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

/*
 * dlopen m->path and find its entry points.  A name without a '/' would
 * make dlopen search the library path (and miss the file in the current
 * directory, the README's "kupsim -d DIR mymod.so"): it is loaded as
 * ./name.  0, or -1 with a message printed.
 */
static int
load_module(struct module *m)
{
	char local[PATH_MAX];
	const char *p = m->path;
	int n;

	if (strchr(p, '/') == NULL) {
		n = snprintf(local, sizeof(local), "./%s", p);
		if (n < 0 || (size_t)n >= sizeof(local)) {
			fprintf(stderr, "kupsim: module path too long: %s\n", p);
			return -1;
		}
		p = local;
	}
	m->dl = dlopen(p, RTLD_NOW | RTLD_LOCAL);
	if (m->dl == NULL) {
		fprintf(stderr, "kupsim: cannot load module %s: %s\n",
		    m->path, dlerror());
		return -1;
	}
	m->init = (int (*)(void))dlsym(m->dl, "kup_module_init");
	m->fini = (void (*)(void))dlsym(m->dl, "kup_module_fini");
	if (m->init == NULL || m->fini == NULL) {
		fprintf(stderr, "kupsim: module %s lacks kup_module_init "
		    "or kup_module_fini\n", m->path);
		dlclose(m->dl);
		m->dl = NULL;
		return -1;
	}
	/* only to recognise the same file given twice; dlopen found it, so
	 * a failure here leaves the handle comparison alone to do it */
	m->real = realpath(p, NULL);
	return 0;
}

/*
 * The module mods[i] is also mods[j], j < i: the same handle (dlopen
 * recognises a file it has loaded, under any name) or the same file.  Its
 * init would run twice on the same globals (the second one fails half-way
 * and leaves the first one's device behind): refused.
 */
static int
same_module(const struct module *a, const struct module *b)
{
	return a->dl == b->dl ||
	    (a->real != NULL && b->real != NULL && strcmp(a->real, b->real) == 0);
}

int
main(int argc, char **argv)
{
	const char *rundir = getenv("KUPSIM_DIR");
	struct module *mods = NULL;
	char names[4096];
	sigset_t ss;
	int opt, nmods, i, sig, rc = 1;

	for (i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
		if (strcmp(argv[i], "--help") == 0) {
			usage(stdout);
			return 0;
		}
	}
	while ((opt = getopt(argc, argv, "d:h")) != -1) {
		switch (opt) {
		case 'd':
			rundir = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (rundir == NULL || *rundir == '\0')
		rundir = "/run/kupsim";
	nmods = argc - optind;
	if (nmods <= 0) {
		fprintf(stderr, "kupsim: no module given\n");
		usage(stderr);
		return 2;
	}
	mods = calloc((size_t)nmods, sizeof(*mods));
	if (mods == NULL)
		return 1;
	raise_nofile();

	/* load them all first: a module given twice is refused before any
	 * init has run (dlopen runs no module code but constructors) */
	for (i = 0; i < nmods; i++) {
		int j;

		mods[i].path = argv[optind + i];
		if (load_module(&mods[i]) != 0)
			goto out;
		for (j = 0; j < i; j++) {
			if (same_module(&mods[i], &mods[j])) {
				fprintf(stderr, "kupsim: module %s given twice "
				    "(as %s and as %s): refusing to start\n",
				    mods[i].real != NULL ? mods[i].real :
				    mods[i].path, mods[j].path, mods[i].path);
				rc = 2;
				goto out;
			}
		}
	}

	/* every thread inherits this mask; main collects the signal */
	sigemptyset(&ss);
	sigaddset(&ss, SIGTERM);
	sigaddset(&ss, SIGINT);
	pthread_sigmask(SIG_BLOCK, &ss, NULL);
	signal(SIGPIPE, SIG_IGN);

	if (kup_core_init() != 0)
		goto out;
	/* ENAMETOOLONG: RUNDIR cannot hold a device's socket path (refused
	 * before anything is created, with a message): the command line's
	 * fault, like a bad option */
	errno = 0;
	if (kupsim_server_start(rundir) != 0) {
		if (errno == ENAMETOOLONG)
			rc = 2;
		goto out_core;
	}

	for (i = 0; i < nmods; i++) {
		struct module *m = &mods[i];
		int pub = kupsim_server_publish_errors();
		int r;

		r = m->init();
		if (r != 0) {
			/* the module's own errno would mislead when kupsim could
			 * not publish its device (echo says ENOMEM for any
			 * kupdev_create failure): name the cause logged above */
			if (kupsim_server_publish_errors() != pub)
				fprintf(stderr, "kupsim: module %s: kup_module_init "
				    "failed: its device could not be published "
				    "(see above)\n", m->path);
			else
				fprintf(stderr, "kupsim: module %s: kup_module_init "
				    "failed: %s\n", m->path, strerror(r < 0 ? -r : r));
			if (kupsim_server_publish_errors() != pub)
				rc = 2;
			goto out_fini;   /* init failed: it cleaned up */
		}
		m->inited = 1;
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
		if (mods[i].inited)
			mods[i].fini();
	}
	kupsim_server_stop();
	/* modules are not dlclose()d: leak reports keep their symbols */
out_core:
	kup_core_fini();
out:
	for (i = 0; i < nmods; i++)
		free(mods[i].real);
	free(mods);
	return rc;
}
