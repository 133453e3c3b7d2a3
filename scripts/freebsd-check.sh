#!/usr/bin/env bash
# freebsd-check.sh -- compile every FreeBSD source of KUP against FreeBSD's
# own headers, for amd64 and arm64, with warnings as errors.
#
# We cannot boot FreeBSD here, so this is the check that keeps the FreeBSD
# host honest on every run: the kernel sources (kmod/freebsd glue, the
# shared core, the echo and tally examples and their module wrapper) are compiled as a
# kernel module would be (-D_KERNEL -DKLD_MODULE, -nostdinc with only the
# FreeBSD system headers, the kernel's code-model flags and kern.mk's
# warning set), and libkup with its FreeBSD backend is compiled as
# FreeBSD userland.  The compiler and the headers come from the `ziglang`
# PyPI package (zig's bundled clang and FreeBSD libc/sys headers).
#
# Compile only (-c) -- there is no FreeBSD kernel to link against -- plus
# the partial link (ld -r) bsd.kmod.mk does first, which catches symbols
# defined twice within a module.
#
# Usage: scripts/freebsd-check.sh [-v] [-o OUTDIR]
#   PYTHON   interpreter that has ziglang (default: .venv/bin/python)
#   ARCHS    space-separated subset of "x86_64 aarch64" (default: both)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

verbose=0
outdir=""
while getopts "vo:" opt; do
	case "$opt" in
	v) verbose=1 ;;
	o) outdir=$OPTARG ;;
	*) echo "usage: $0 [-v] [-o OUTDIR]" >&2; exit 2 ;;
	esac
done

PYTHON=${PYTHON:-$here/.venv/bin/python}
ARCHS=${ARCHS:-"x86_64 aarch64"}

if ! "$PYTHON" -c 'import ziglang' 2>/dev/null; then
	echo "freebsd-check: $PYTHON has no ziglang package (pip install ziglang)" >&2
	exit 2
fi
zigdir=$("$PYTHON" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')
libc_inc="$zigdir/lib/libc/include"
if [ ! -d "$libc_inc/generic-freebsd/sys" ] || [ ! -f "$libc_inc/generic-freebsd/vm/vm_pager.h" ]; then
	echo "freebsd-check: no FreeBSD kernel headers under $libc_inc/generic-freebsd" >&2
	exit 2
fi

if [ -z "$outdir" ]; then
	outdir=$(mktemp -d "${TMPDIR:-/tmp}/kup-freebsd-check.XXXXXX")
	trap 'rm -rf "$outdir"' EXIT
fi
mkdir -p "$outdir"
# zig keeps a compilation cache; keep it out of $HOME when that is read-only
export ZIG_GLOBAL_CACHE_DIR=${ZIG_GLOBAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kup-zig}
export ZIG_LOCAL_CACHE_DIR=${ZIG_LOCAL_CACHE_DIR:-$ZIG_GLOBAL_CACHE_DIR}

# FreeBSD's sys/conf/kern.mk warning set, plus -Wextra; -Werror always.
warn=(-Wall -Wextra -Werror -Wredundant-decls -Wnested-externs
	-Wstrict-prototypes -Wmissing-prototypes -Wpointer-arith -Wcast-qual
	-Wundef -Wno-pointer-sign -Wmissing-include-dirs -Wswitch
	-Wno-unknown-pragmas)

# Kernel sources: the glue, the shared core, the examples (echo, tally) +
# their wrapper.
kernel_common=(-std=gnu99 -O2 -nostdinc -D_KERNEL -DKLD_MODULE
	-ffreestanding -fno-common -fno-strict-aliasing -fno-omit-frame-pointer
	-D__printf__=__freebsd_kprintf__
	-I kmod/freebsd -I kmod/core -I kmod/include)

kernel_sources=(
	"kupdev:kmod/freebsd/kup_freebsd.c"
	"kupdev:kmod/core/kup_core.c"
	"kup_echo:kmod/examples/echo/echo.c"
	"kup_echo:kmod/freebsd/kup_client_mod.c"
	"kup_rot13:kmod/examples/echo/echo.c"
	"kup_rot13:kmod/freebsd/kup_client_mod.c"
	"kup_tally:kmod/examples/tally/tally.c"
	"kup_tally:kmod/freebsd/kup_client_mod.c"
)
# One more kernel file to compile the same way (the test suite uses it to
# prove that a warning fails the check).
if [ -n "${KUP_FREEBSD_CHECK_EXTRA:-}" ]; then
	kernel_sources+=("extra:$KUP_FREEBSD_CHECK_EXTRA")
fi

# Userspace: libkup with the FreeBSD backend (and the sim backend it always
# carries), as FreeBSD userland.
user_sources=(kmod/libkup/backend_kdev.c)
for f in kmod/libkup/kup.c kmod/libkup/backend_sim.c; do
	if [ -f "$f" ]; then user_sources+=("$f"); fi
done
user_common=(-std=gnu11 -O2 -DKUP_HAVE_BACKEND_FREEBSD
	-I kmod/libkup -I kmod/include -I kmod/kupsim)

failed=0
count=0

run() {
	if [ "$verbose" = 1 ]; then echo "+ $*"; fi
	"$@"
}

compile() {   # label target outfile args...
	local label=$1 target=$2 out=$3
	shift 3
	count=$((count + 1))
	if run "$PYTHON" -m ziglang cc -target "$target" "$@" -c -o "$out"; then
		echo "ok    $label"
	else
		echo "FAIL  $label" >&2
		failed=$((failed + 1))
		return 1
	fi
}

link() {   # label outfile objects...
	local label=$1 out=$2
	shift 2
	count=$((count + 1))
	if run "$PYTHON" -m ziglang ld.lld -r -d -o "$out" "$@"; then
		echo "ok    $label"
	else
		echo "FAIL  $label" >&2
		failed=$((failed + 1))
		return 1
	fi
}

declare -A modobjs=() modbad=()

for arch in $ARCHS; do
	case "$arch" in
	x86_64)
		# sys/conf/kern.mk (amd64): kernel code model, no red zone,
		# no FPU/SIMD registers in the kernel
		march=(-mcmodel=kernel -mno-red-zone -mno-mmx -mno-sse -mno-sse2
			-mno-avx -msoft-float -fno-asynchronous-unwind-tables) ;;
	aarch64)
		# x18 is the kernel's per-CPU pointer; no FP/SIMD in the kernel
		march=(-mcpu=generic+reserve_x18 -mgeneral-regs-only) ;;
	*)
		echo "freebsd-check: unknown arch $arch (x86_64 or aarch64)" >&2
		exit 2 ;;
	esac
	kinc=(-I "$libc_inc/$arch-freebsd-none" -I "$libc_inc/generic-freebsd")
	for entry in "${kernel_sources[@]}"; do
		mod=${entry%%:*}
		src=${entry#*:}
		if [ ! -f "$src" ]; then
			echo "FAIL  $arch kernel $src: missing" >&2
			failed=$((failed + 1))
			continue
		fi
		obj="$outdir/$arch-kern-$(basename "${src%.c}").o"
		label="$arch kernel $src"
		# the same -D flags as kmod/freebsd/<module>/Makefile
		modflags=()
		case "$mod" in
		kup_echo)
			modflags=(-DKUP_CLIENT_MODNAME=kup_echo) ;;
		kup_rot13)
			modflags=(-DKUP_CLIENT_MODNAME=kup_rot13 -DECHO_ROT13
				'-DECHO_NAME="rot13"' '-DECHO_PARAM="rot13"')
			obj="$outdir/$arch-kern-rot13-$(basename "${src%.c}").o"
			label="$arch kernel $src (rot13)" ;;
		kup_tally)
			modflags=(-DKUP_CLIENT_MODNAME=kup_tally)
			obj="$outdir/$arch-kern-tally-$(basename "${src%.c}").o"
			label="$arch kernel $src (tally)" ;;
		esac
		if compile "$label" "$arch-freebsd-none" "$obj" \
			"${kernel_common[@]}" "${march[@]}" "${kinc[@]}" \
			"${modflags[@]}" "${warn[@]}" "$src"; then
			modobjs[$mod]="${modobjs[$mod]:-} $obj"
		else
			modbad[$mod]=1
		fi
	done
	# Link each module's objects the way bsd.kmod.mk does first (ld -r -d):
	# catches symbols defined twice, e.g. by the glue and the core.
	for mod in "${!modobjs[@]}"; do
		[ "$mod" = extra ] && continue
		[ -n "${modbad[$mod]:-}" ] && continue
		# shellcheck disable=SC2086 # a list of object paths
		link "$arch $mod.ko (ld -r)" "$outdir/$arch-$mod.kld" ${modobjs[$mod]}
	done
	modobjs=()
	modbad=()
	for src in "${user_sources[@]}"; do
		if [ ! -f "$src" ]; then
			echo "FAIL  $arch user $src: missing" >&2
			failed=$((failed + 1))
			continue
		fi
		obj="$outdir/$arch-user-$(basename "${src%.c}").o"
		compile "$arch user $src" "$arch-freebsd" "$obj" \
			"${user_common[@]}" "${warn[@]}" "$src" || true
	done
done

if [ "$failed" -ne 0 ]; then
	echo "freebsd-check: $failed of $count compilations/links failed" >&2
	exit 1
fi
echo "freebsd-check: all $count compilations and links passed ($ARCHS)"
