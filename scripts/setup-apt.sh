#!/usr/bin/env bash
# Install the Debian packages the build and the tests need, idempotently:
# nothing is fetched when every package is already installed and the 6.12
# kernel image (below) is already unpacked.
#
# KUPD_KERNEL_CACHE: where that image is unpacked (an absolute path;
# default .cache/kernels in the repository).
set -euo pipefail
pkgs=(
  spin              # Promela model checker for kmod/include/kup_turn.pml
  shellcheck        # deploy scripts
  qemu-system-x86   # Linux module tests in a VM (-accel tcg)
  linux-image-amd64 linux-headers-amd64 busybox-static cpio
  kmod              # depmod, for the unpacked 6.12 kernel's module index
)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
updated=0
apt_update() {
  [ "$updated" -eq 1 ] && return 0
  $SUDO apt-get update -qq
  updated=1
}

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup-apt: installing ${missing[*]}"
  apt_update
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# A second kernel for the VM test (tests/vm): kmod/linux has version
# branches for kernels newer than bookworm's 6.1 (class_create() lost its
# owner argument in 6.4, and so on) that only compile, and only run, against
# a newer kernel -- the 6.12 from bookworm-backports (the next longterm
# kernel, trixie's), under its own ABI name (linux-headers-6.12.N+debNN-amd64).
#
# Its headers are installed with apt: they are needed to build the module
# and change nothing about how the machine boots.  Its image is NOT
# installed: an installed kernel image becomes the default GRUB entry of a
# real Debian host (the newest kernel wins; and under Secure Boot it may not
# even be bootable), and a test suite must not change what the developer's
# machine boots.  The VM test only needs the files, so the image .deb is
# fetched with `apt-get download` (the same ABI as the headers, so modules
# built against them load) and unpacked with `dpkg-deb -x` into
# $cache/ABI/ (boot/vmlinuz-ABI, lib/modules/ABI/), plus the module index
# depmod would have made at install time; tests/vm and kmod/linux look for
# kernels there as well as in /boot.
#
# Once installed headers have their unpacked image, nothing is fetched
# again (no upgrades, no apt-get at all).
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${KUPD_KERNEL_CACHE:-$repo/.cache/kernels}
case $cache in
  /*) ;;
  *) echo "setup-apt: KUPD_KERNEL_CACHE=$cache: want an absolute path" >&2; exit 1 ;;
esac

installed_612_headers() {  # ABIs of the installed 6.12 headers, newest first
  dpkg-query -W -f='${Package} ${Status}\n' 'linux-headers-6.12.*-amd64' 2>/dev/null \
    | awk '/install ok installed/ {print $1}' | sed 's/^linux-headers-//' | sort -rV
}

unpacked() {  # is ABI's image already unpacked in the cache?
  [ -f "$cache/$1/boot/vmlinuz-$1" ] && [ -f "$cache/$1/lib/modules/$1/modules.dep" ]
}

die() { echo "setup-apt: $*" >&2; exit 1; }

# fetch_image ABI: download linux-image-ABI (or its -unsigned twin) and
# unpack it into $cache/ABI.  Returns 1, leaving nothing behind, when apt
# cannot get it; any other failure ends the script (explicitly: set -e does
# not apply inside a function called from an if).  Built in a private
# directory (removed on exit, however the script ends) and renamed into
# place, so a run that fails, is interrupted or races another run never
# leaves a half tree.
fetch_tmp=""
trap '[ -z "$fetch_tmp" ] || rm -rf "$fetch_tmp"' EXIT
fetch_image() {
  local abi=$1 tmp img got="" sandbox=()
  mkdir -p "$cache" || die "cannot create $cache"
  tmp=$(mktemp -d "$cache/.fetch-$abi.XXXXXX") || die "cannot create a directory in $cache"
  fetch_tmp=$tmp
  # as root, apt's download sandbox user (_apt) cannot write to $tmp
  [ "$(id -u)" -ne 0 ] || sandbox=(-o APT::Sandbox::User=root)
  for img in "linux-image-$abi" "linux-image-$abi-unsigned"; do
    if (cd "$tmp" && apt-get download -qq "${sandbox[@]}" "$img"); then got=$img; break; fi
  done
  if [ -z "$got" ]; then rm -rf "$tmp"; fetch_tmp=""; return 1; fi
  echo "setup-apt: unpacking $got into $cache/$abi (not installed: see setup-apt.sh)"
  dpkg-deb -x "$tmp/${got}"_*.deb "$tmp/tree" || die "cannot unpack $got"
  rm -f "$tmp"/*.deb
  if [ ! -f "$tmp/tree/boot/vmlinuz-$abi" ] || [ ! -d "$tmp/tree/lib/modules/$abi/kernel" ]; then
    die "$got has no boot/vmlinuz-$abi and lib/modules/$abi/kernel"
  fi
  # the package leaves modules.dep to its postinst; the VM's initramfs
  # builder (scripts/vm/mkinitramfs.sh) resolves module dependencies with it
  PATH=$PATH:/usr/sbin:/sbin depmod -b "$tmp/tree" "$abi" \
    || die "depmod failed on the unpacked $got"
  if ! mv -T "$tmp/tree" "$cache/$abi" 2>/dev/null; then
    # a concurrent run may have put the same kernel there first
    unpacked "$abi" || die "cannot move the unpacked kernel to $cache/$abi"
  fi
  rm -rf "$tmp"; fetch_tmp=""
}

done612=0
for abi in $(installed_612_headers); do
  if unpacked "$abi"; then done612=1; break; fi
done
if [ "$done612" -eq 0 ]; then
  abi=$(installed_612_headers | head -n 1)
  if [ -n "$abi" ] && fetch_image "$abi"; then
    done612=1
  elif [ -n "$abi" ]; then
    echo "setup-apt: no image for the installed linux-headers-$abi in the package lists; looking again"
  fi
fi
if [ "$done612" -eq 0 ]; then
  if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup-apt: adding bookworm-backports (for a 6.12 kernel next to 6.1)"
    $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources > /dev/null <<'EOF'
# Added by kupd's scripts/setup-apt.sh: the VM test (tests/vm) builds and
# boots the Linux kernel module on bookworm's 6.1 and on the 6.12 kernel
# from bookworm-backports (its headers are installed; its image is only
# unpacked into the repository's kernel cache, never installed).
# Backports has priority 100: nothing else is upgraded from here unless
# asked for by name.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=0
  fi
  apt_update
  # Headers and image must be the same ABI (backports publishes them from
  # different source packages, so one can briefly lag the other): take the
  # newest ABI that has both.
  abi=""
  for h in $(apt-cache pkgnames linux-headers-6.12. | grep -E '^linux-headers-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$' \
               | sed 's/^linux-headers-//' | sort -rV); do
    for img in "linux-image-$h" "linux-image-$h-unsigned"; do
      if apt-cache show --no-all-versions "$img" > /dev/null 2>&1; then
        abi=$h; break 2
      fi
    done
  done
  [ -n "$abi" ] || die "bookworm-backports has no 6.12 amd64 kernel image with matching headers"
  if ! dpkg-query -W -f='${Status}' "linux-headers-$abi" 2>/dev/null | grep -q "install ok installed"; then
    echo "setup-apt: installing linux-headers-$abi (bookworm-backports)"
    $SUDO apt-get install -y -qq --no-install-recommends "linux-headers-$abi"
  fi
  fetch_image "$abi" || die "cannot download linux-image-$abi"
fi
