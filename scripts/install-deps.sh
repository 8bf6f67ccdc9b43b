#!/usr/bin/env bash
# Installs the Debian packages lodge's build, guest image and tests use, when missing.
# Needs root (apt-get); prints what it installs.
set -euo pipefail

packages=(
	# Guest image recipe (it would install these itself; listed so one apt run does all).
	linux-source-6.1 busybox-static flex bison libelf-dev cpio bc xz-utils e2fsprogs
	# Debian guest images (guest/debian.sh) and their tests.
	debootstrap
	# User-mode networking for `lodge run --net user`.
	passt
	# Host networking of the daemon (nftables rules of lodge networks).
	nftables
	# QEMU: the guest image's boot check and the boot benchmark's peer.
	qemu-system-x86 qemu-utils
)
missing=()
for package in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
		missing+=("$package")
done
if ((${#missing[@]} == 0)); then
	echo "all system packages present"
	exit 0
fi
if ((EUID != 0)); then
	echo "error: missing packages (${missing[*]}); run as root or install them with apt-get" >&2
	exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
