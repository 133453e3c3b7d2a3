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
# a newer kernel -- bookworm-backports' 6.12 (the next longterm kernel,
# trixie's).  It goes next to 6.1 under its own ABI name
# (linux-image-6.12.N+debNN-amd64), not through the linux-image-amd64
# metapackage, which would replace 6.1's.  Headers and image must be the
# same ABI (backports publishes them from different source packages, so
# their versions can briefly differ): we take the newest ABI that has both.
# Once any 6.12 pair is installed nothing is fetched again (no upgrades).
# Note: on a machine that boots through GRUB, the newest installed kernel
# (this one) becomes the default boot entry; the tests never boot the host.
have_612() {  # an installed 6.12 image with its headers
  local pkg abi
  while read -r pkg; do
    abi=${pkg#linux-image-}; abi=${abi%-unsigned}
    dpkg-query -W -f='${Status}' "linux-headers-$abi" 2>/dev/null \
      | grep -q "install ok installed" && return 0
  done < <(dpkg-query -W -f='${Package} ${Status}\n' 'linux-image-6.12.*-amd64*' 2>/dev/null \
             | awk '/install ok installed/ {print $1}')
  return 1
}
if ! have_612; then
  if ! grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "setup-apt: adding bookworm-backports (for a 6.12 kernel next to 6.1)"
    $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources > /dev/null <<'EOF'
# Added by kupd's scripts/setup-apt.sh: the VM test (tests/vm) builds and
# boots the Linux kernel module on bookworm's 6.1 and on the 6.12 kernel
# from bookworm-backports.  Backports has priority 100: nothing else is
# upgraded from here unless asked for by name.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    updated=0
  fi
  apt_update
  abi=""
  for h in $(apt-cache pkgnames linux-headers-6.12. | grep -E '^linux-headers-6\.12\.[0-9]+\+[a-z0-9.]+-amd64$' \
               | sed 's/^linux-headers-//' | sort -rV); do
    for img in "linux-image-$h" "linux-image-$h-unsigned"; do
      if apt-cache show --no-all-versions "$img" > /dev/null 2>&1; then
        abi=$h; image=$img; break 2
      fi
    done
  done
  [ -n "$abi" ] || { echo "setup-apt: bookworm-backports has no 6.12 amd64 kernel image with matching headers" >&2; exit 1; }
  echo "setup-apt: installing $image linux-headers-$abi (bookworm-backports)"
  $SUDO apt-get install -y -qq --no-install-recommends "$image" "linux-headers-$abi"
fi
