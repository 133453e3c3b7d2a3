// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_tally_linux.c -- the Linux wrapper of kmod/examples/tally
 * (kup_tally.ko, device "tally"): as kup_echo_linux.c for echo, it only
 * maps Linux's module entry points onto kup_module_init / kup_module_fini
 * of the host-neutral source.
 */
#include <linux/module.h>
#include "kup_module.h"

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("KUP example module (kmod/examples/tally: a total shared by every channel)");
MODULE_SOFTDEP("pre: kup");

static int __init kup_tally_linux_init(void)
{
	return kup_module_init();
}

static void __exit kup_tally_linux_exit(void)
{
	kup_module_fini();
}

module_init(kup_tally_linux_init);
module_exit(kup_tally_linux_exit);
