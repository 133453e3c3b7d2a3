// SPDX-License-Identifier: BSD-2-Clause
/*
 * kup_echo_linux.c -- the Linux wrapper of kmod/examples/echo (built twice:
 * kup_echo.ko, and kup_rot13.ko from the -DECHO_ROT13 build): the module
 * source is host-neutral (kup_module.h); this file only maps Linux's module
 * entry points onto kup_module_init / kup_module_fini.
 */
#include <linux/module.h>
#include "kup_module.h"

MODULE_LICENSE("Dual BSD/GPL");
MODULE_DESCRIPTION("KUP example module (kmod/examples/echo: echo, or rot13)");
MODULE_SOFTDEP("pre: kup");

static int __init kup_echo_linux_init(void)
{
	return kup_module_init();
}

static void __exit kup_echo_linux_exit(void)
{
	kup_module_fini();
}

module_init(kup_echo_linux_init);
module_exit(kup_echo_linux_exit);
