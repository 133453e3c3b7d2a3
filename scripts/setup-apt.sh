#!/usr/bin/env bash
# Install the Debian packages the build and the tests need, idempotently:
# nothing is fetched when every package is already installed and the 6.12
# kernel (below) is already unpacked.
#
# KUPD_KERNEL_CACHE: where that kernel is unpacked (an absolute path;
# default .cache/kernels in the repository).
set -euo pipefail
pkgs=(
  spin              # Promela model checker for kmod/include/kup_turn.pml
  shellcheck        # deploy scripts
  logrotate         # deploy/linux/logrotate.d/kupd, checked with logrotate --debug
  qemu-system-x86   # Linux module tests in a VM (-accel tcg)
  linux-image-amd64 linux-headers-amd64 busybox-static cpio
  kmod              # depmod, for the unpacked 6.12 kernel's module index
  # the C++ client (clients/cpp, tests/cpp): grpc++ and protobuf, protoc
  # and its gRPC plugin for the code generated from protos/, pkg-config
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler pkg-config
)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
# apt_get ARGS...: apt-get, waiting its turn when another apt-get or dpkg
# (another checkout's setup, an unattended upgrade) holds one of apt's locks
# -- apt-get itself gives up at once with "Could not get lock" -- for up to
# KUPD_APT_LOCK_WAIT seconds (default 600).
apt_get() {
  local waited=0 limit=${KUPD_APT_LOCK_WAIT:-600} err rc
  err=$(mktemp)
  while true; do
    rc=0
    $SUDO apt-get -o DPkg::Lock::Timeout=60 "$@" 2> >(tee "$err" >&2) || rc=$?
    wait  # the tee above
    if [ "$rc" -eq 0 ] || ! grep -q "Could not get lock" "$err" || [ "$waited" -ge "$limit" ]; then
      rm -f "$err"
      return "$rc"
    fi
    echo "setup-apt: another apt-get or dpkg holds its lock; waiting (${waited} s so far)" >&2
    sleep 5
    waited=$((waited + 5))
  done
}
updated=0
apt_update() {
  [ "$updated" -eq 1 ] && return 0
  apt_get update -qq
  updated=1
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-apt: installing ${missing[*]}"
  apt_update
  apt_get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A second kernel for the VM test (tests/vm): kmod/linux has version
# branches for kernels newer than bookworm's 6.1 (class_create() lost its
# owner argument in 6.4, and so on) that only compile, and only run, against
# a newer kernel -- the 6.12 from bookworm-backports (the next longterm
# kernel, trixie's), under its own ABI name (linux-image-6.12.N+debNN-amd64).
#
# None of it is installed.  An installed kernel image becomes the default
# GRUB entry of a real Debian host (the newest kernel wins; and under Secure
# Boot it may not even be bootable), and a test suite must not change what
# the developer's machine boots.  Nor can its headers be installed alone:
# unlike 6.1's, linux-headers-6.12.N+debNN-amd64 Depends on
# linux-image-6.12.N+debNN-amd64 (or its -unsigned twin), so apt would
# install the image with them.  The VM test and the module build need only
# the files, so the four packages of one ABI -- the image, the headers, the
# common headers those include and the kbuild tools they run -- are fetched
# with `apt-get download` and unpacked with `dpkg-deb -x` into $cache/ABI/,
# a small root: boot/vmlinuz-ABI; lib/modules/ABI/ with the module index
# depmod would have made at install time; usr/src/linux-headers-ABI (the
# build tree), its -common twin and usr/lib/linux-kbuild-*.  The headers'
# absolute references (the build Makefile's include of the common tree,
# lib/modules/ABI/build and source) are made relative, so the tree works
# where it lies.
# What those packages need from the system (the compiler they were built
# with, pahole, libelf...) is installed with apt as usual.  tests/vm and
# kmod/linux look for kernels there as well as in /boot.
#
# Once a complete tree is in the cache, nothing is fetched again (no
# upgrades, no apt-get at all).
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUPD_KERNEL_CACHE:-$repo/.cache/kernels}
case $cache in
  /*) ;;
  *) echo "setup-apt: KUPD_KERNEL_CACHE=$cache: want an absolute path" >&2; exit 1 ;;
esac

die() { echo "setup-apt: $*" >&2; exit 1; }

kernel_complete() {  # is ABI's kernel completely unpacked in the cache?
  local d=$cache/$1
  [ -f "$d/boot/vmlinuz-$1" ] && [ -f "$d/lib/modules/$1/modules.dep" ] \
    && [ -f "$d/usr/src/linux-headers-$1/Makefile" ]
}

# deps_of DEB...: what the packages need from the system -- the first
# alternative of each Depends entry, without version, leaving out the
# kernel's own packages (they come from the cache, never from apt)
deps_of() {
  local deb
  for deb in "$@"; do dpkg-deb -f "$deb" Depends; done | tr ',' '\n' \
    | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' \
    | grep -vE '^$|^linux-(image|headers|kbuild)-|^linux-base$' | sort -u || true
}

# fetch_kernel ABI: download and unpack ABI's kernel into $cache/ABI.
# Returns 1, leaving nothing behind, when apt cannot get its packages; any
# other failure ends the script (explicitly: set -e does not apply inside
# a function called from an if).  Built in a private directory (removed on
# exit, however the script ends) and renamed into place, so a run that
# fails, is interrupted or races another run never leaves a half tree.
fetch_tmp=""
trap '[ -z "$fetch_tmp" ] || rm -rf "$fetch_tmp"' EXIT
fetch_kernel() {
  local abi=$1 tmp img got="" p extra=() need=() sandbox=() tree
  mkdir -p "$cache" || die "cannot create $cache"
  tmp=$(mktemp -d "$cache/.fetch-$abi.XXXXXX") || die "cannot create a directory in $cache"
  fetch_tmp=$tmp
  # as root, apt's download sandbox user (_apt) cannot write to $tmp
  [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
  for img in "linux-image-$abi" "linux-image-$abi-unsigned"; do
    if (cd "$tmp" && apt-get download -qq "${sandbox[@]}" "$img" "linux-headers-$abi"); then
      got=$img; break
    fi
  done
  if [ -z "$got" ]; then rm -rf "$tmp"; fetch_tmp=""; return 1; fi
  # the common headers and kbuild tools of exactly these headers
  while read -r p; do extra+=("$p"); done < <(dpkg-deb -f "$tmp/linux-headers-${abi}"_*.deb Depends \
    | tr ',|' '\n' | sed -E 's/\(.*\)//; s/[[:space:]]//g' | grep -E '^linux-(headers-.*-common|kbuild-.*)$' | sort -u)
  [ ${#extra[@]} -eq 2 ] || die "linux-headers-$abi: expected one -common and one linux-kbuild- dependency, got: ${extra[*]:-none}"
  (cd "$tmp" && apt-get download -qq "${sandbox[@]}" "${extra[@]}") || { rm -rf "$tmp"; fetch_tmp=""; return 1; }
  # (the image's own dependencies serve its maintainer scripts, never run here)
  for p in $(deps_of "$tmp"/linux-headers-*.deb "$tmp"/linux-kbuild-*.deb); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup-apt: installing ${need[*]} (needed by the 6.12 kernel's build tools)"
    apt_get install -y -qq --no-install-recommends "${need[@]}" || die "cannot install ${need[*]}"
  fi
  echo "setup-apt: unpacking $got, linux-headers-$abi, ${extra[*]} into $cache/$abi (not installed: see setup-apt.sh)"
  tree=$tmp/tree
  for p in "$tmp"/*.deb; do dpkg-deb -x "$p" "$tree" || die "cannot unpack $p"; done
  rm -f "$tmp"/*.deb
  if [ ! -f "$tree/boot/vmlinuz-$abi" ] || [ ! -d "$tree/lib/modules/$abi/kernel" ] \
     || [ ! -f "$tree/usr/src/linux-headers-$abi/Makefile" ]; then
    die "$got + linux-headers-$abi have no boot/vmlinuz-$abi, lib/modules/$abi/kernel and usr/src/linux-headers-$abi/Makefile"
  fi
  # relative, so the tree works in the cache (and survives the rename below)
  # shellcheck disable=SC2016  # make syntax, for make to expand
  sed -i -E 's|^include /usr/src/|include $(dir $(lastword $(MAKEFILE_LIST)))../|' \
    "$tree/usr/src/linux-headers-$abi/Makefile" || die "cannot edit the headers' Makefile"
  ln -sfn "../../../usr/src/linux-headers-$abi" "$tree/lib/modules/$abi/build" || die "cannot link build"
  for p in "${extra[@]}"; do
    case $p in
      linux-headers-*-common) ln -sfn "../../../usr/src/$p" "$tree/lib/modules/$abi/source" || die "cannot link source" ;;
    esac
  done
  if grep -q '^include /' "$tree/usr/src/linux-headers-$abi/Makefile"; then
    die "linux-headers-$abi's Makefile still includes an absolute path"
  fi
  # the image package leaves modules.dep to its postinst; the VM's initramfs
  # builder (scripts/vm/mkinitramfs.sh) resolves module dependencies with it
  PATH=$PATH:/usr/sbin:/sbin depmod -b "$tree" "$abi" || die "depmod failed on the unpacked $got"
  # an incomplete tree there (an older layout of this cache) is replaced:
  # moved aside in one step (removed with $tmp), so no reader sees it half gone
  if [ -e "$cache/$abi" ] && ! kernel_complete "$abi"; then
    mv -T "$cache/$abi" "$tmp/old" || die "cannot move the incomplete $cache/$abi aside"
  fi
  if ! mv -T "$tree" "$cache/$abi" 2>/dev/null; then
    # a concurrent run may have put the same kernel there first
    kernel_complete "$abi" || die "cannot move the unpacked kernel to $cache/$abi"
  fi
  rm -rf "$tmp"; fetch_tmp=""
}

have_612() {  # a complete 6.12 kernel in the cache
  local d
  for d in "$cache"/6.12.*-amd64; do
    if [ -d "$d" ] && kernel_complete "$(basename "$d")"; then return 0; fi
  done
  return 1
}

get_612() {
  local abi="" h img
  if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup-apt: adding bookworm-backports (for a 6.12 kernel next to 6.1)"
    $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources > /dev/null <<'EOF'
# Added by kupd's scripts/setup-apt.sh: the VM test (tests/vm) builds and
# boots the Linux kernel module on bookworm's 6.1 and on the 6.12 kernel
# from bookworm-backports (downloaded and unpacked into the repository's
# kernel cache, never installed).  Backports has priority 100: nothing
# else is upgraded from here unless asked for by name.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=0
  fi
  apt_update
  # Image and headers must be the same ABI (backports publishes them from
  # different source packages, so one can briefly lag the other): take the
  # newest ABI that has both.
  for h in $(apt-cache pkgnames linux-headers-6.12. | grep -E '^linux-headers-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$' \
               | sed 's/^linux-headers-//' | sort -rV); do
    for img in "linux-image-$h" "linux-image-$h-unsigned"; do
      if apt-cache show --no-all-versions "$img" > /dev/null 2>&1; then
        abi=$h; break 2
      fi
    done
  done
  [ -n "$abi" ] || die "bookworm-backports has no 6.12 amd64 kernel image with matching headers"
  fetch_kernel "$abi" || die "cannot download the packages of the $abi kernel"
}

if ! have_612; then get_612; fi  # (not `||`: set -e must hold inside get_612)
