#!/usr/bin/env bash
# Install the Debian packages the build and the tests need, idempotently:
# nothing is fetched when every package is already installed.
set -euo pipefail
pkgs=(
  spin              # Promela model checker for kmod/include/kup_turn.pml
  shellcheck        # deploy scripts
  qemu-system-x86   # Linux module tests in a VM (-accel tcg)
  linux-image-amd64 linux-headers-amd64 busybox-static cpio
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "setup-apt: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
