#!/usr/bin/env bash
# Build the busybox initramfs that boots the KUP test VM.
#
#   scripts/vm/mkinitramfs.sh KVER OUTPUT.cpio.gz [MODDIR]
#
# Contents: a static busybox, scripts/vm/init as /init, and the modules the
# guest needs to reach the host (virtio PCI transport and 9p over virtio)
# taken from the kernel's own module tree MODDIR (default /lib/modules/KVER;
# for a kernel unpacked in the kernel cache, CACHE/KVER/lib/modules/KVER)
# with their dependencies, in load order
# (modules.dep lists a module's dependencies; we emit them depth-first so
# plain insmod works -- no modprobe, no depmod inside the guest).
set -euo pipefail
kver=${1:?usage: mkinitramfs.sh KVER OUTPUT [MODDIR]}
out=${2:?usage: mkinitramfs.sh KVER OUTPUT [MODDIR]}
moddir=${3:-/lib/modules/$kver}
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox || true)
[ -d "$moddir/kernel" ] || { echo "mkinitramfs: no modules for $kver in $moddir (run scripts/setup-apt.sh)" >&2; exit 1; }
[ -f "$moddir/modules.dep" ] || { echo "mkinitramfs: no $moddir/modules.dep (run depmod for $kver)" >&2; exit 1; }
if [ -z "$busybox" ] || readelf -l "$busybox" 2>/dev/null | grep -q 'program interpreter'; then
  echo "mkinitramfs: need a static busybox (install busybox-static)" >&2; exit 1
fi

# What the guest needs; everything else comes from modules.dep.
wanted=(virtio_pci 9pnet_virtio 9p)

declare -A path_of=() done_=()
while IFS= read -r line; do
  mod=${line%%:*}
  base=$(basename "$mod"); base=${base%%.ko*}; base=${base//-/_}
  path_of[$base]=$mod
done < "$moddir/modules.dep"

order=()
visit() {  # depth-first: dependencies before the module
  local name=$1 mod deps d dn
  [ -n "${done_[$name]:-}" ] && return 0
  done_[$name]=1
  mod=${path_of[$name]:-}
  if [ -z "$mod" ]; then
    # built into the kernel?
    grep -q "/${name//_/[-_]}.ko" "$moddir/modules.builtin" 2>/dev/null && return 0
    echo "mkinitramfs: module $name not found for $kver" >&2; exit 1
  fi
  deps=$(grep -E "^${mod}:" "$moddir/modules.dep" | cut -d: -f2-)
  for d in $deps; do
    dn=$(basename "$d"); dn=${dn%%.ko*}; dn=${dn//-/_}
    visit "$dn"
  done
  order+=("$mod")
}
for w in "${wanted[@]}"; do visit "$w"; done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,dev,proc,sys,host,lib/modules}
cp "$busybox" "$tmp/bin/busybox"
ln -s busybox "$tmp/bin/sh"
install -m 0755 "$here/init" "$tmp/init"
: > "$tmp/modules.order"
for mod in "${order[@]}"; do
  src=$moddir/$mod
  name=$(basename "$mod")
  case "$name" in
    *.ko.xz)  xz -dc "$src" > "$tmp/lib/modules/${name%.xz}"; name=${name%.xz} ;;
    *.ko.zst) zstd -qdc "$src" > "$tmp/lib/modules/${name%.zst}"; name=${name%.zst} ;;
    *.ko.gz)  gzip -dc "$src" > "$tmp/lib/modules/${name%.gz}"; name=${name%.gz} ;;
    *)        cp "$src" "$tmp/lib/modules/$name" ;;
  esac
  echo "$name" >> "$tmp/modules.order"
done
mkdir -p "$(dirname "$out")"
# write under a private name, then rename: concurrent builders never see
# (or produce) a half-written image
(cd "$tmp" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$out.tmp.$$"
mv -f "$out.tmp.$$" "$out"
echo "mkinitramfs: $out ($(tr '\n' ' ' < "$tmp/modules.order"))"
