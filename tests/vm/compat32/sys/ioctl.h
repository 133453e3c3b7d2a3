/* SPDX-License-Identifier: BSD-2-Clause */
/*
 * sys/ioctl.h for tests/vm/kup_compat32.c only: that program is built for
 * i386 without a C library (-m32 -nostdlib -ffreestanding: the build host
 * has no 32-bit libc), so kup_ioctl.h's <sys/ioctl.h> finds this instead.
 * It defines just the request-number macros, with the generic Linux
 * encoding x86 uses: dir (2 bits) << 30 | size (14) << 16 | type << 8 | nr.
 */
#ifndef KUP_COMPAT32_SYS_IOCTL_H
#define KUP_COMPAT32_SYS_IOCTL_H

#define _IOC_NONE  0U
#define _IOC_WRITE 1U
#define _IOC_READ  2U
#define _IOC(dir, type, nr, size) \
	(((dir) << 30) | ((unsigned int)(size) << 16) | ((type) << 8) | (nr))
#define _IO(type, nr)          _IOC(_IOC_NONE, (type), (nr), 0)
#define _IOR(type, nr, t)      _IOC(_IOC_READ, (type), (nr), sizeof(t))
#define _IOW(type, nr, t)      _IOC(_IOC_WRITE, (type), (nr), sizeof(t))
#define _IOWR(type, nr, t)     _IOC(_IOC_READ | _IOC_WRITE, (type), (nr), sizeof(t))

#endif
