#!/usr/bin/env bash
# A Debian root file system image for lodge VMs, from Debian packages only: debootstrap
# (minbase) plus systemd, udev, dbus, iproute2 and python3-minimal, configured for a VM and
# written to an ext4 image with `mkfs.ext4 -d` (no loop mounts).
#
# The lodge binary embeds this file (include_str!) and runs it for `lodge image create debian`;
# it can also be run directly. Needs root (debootstrap, device nodes, file ownership).
#
# Usage: bash debian.sh [--suite bookworm] [--size 4G] [--packages a,b,...] [--mirror URL]
#                       [--cache-dir DIR] [--output FILE]
#
# Contract: progress and logs go to stderr; the last line of stdout is the absolute path of the
# image. Without --output that is the cache entry DIR/images/debian/<key>/rootfs.ext4 (key =
# hash of this script and the arguments; entries appear by rename once complete, builds are
# serialised by flock), which callers must copy before writing to it. With --output the image
# is copied (sparse) to FILE. DIR defaults to $LODGE_CACHE_DIR, else ~/.cache/lodge.
#
# The image: root file system for /dev/vda (fstab), a serial getty on ttyS0 where root logs in
# without a password, the hostname taken from `lodge.hostname=NAME` on the kernel command line
# at first boot, systemd-networkd configuring every Ethernet interface by DHCP, a machine ID
# generated at first boot, apt pointed at the mirror.
set -Eeuo pipefail
exec 3>&1 1>&2

say() { printf 'lodge image: %s\n' "$*" >&2; }
die() {
	printf 'lodge image: error: %s\n' "$*" >&2
	exit 70
}
# shellcheck disable=SC2317 # called from the ERR trap
on_error() {
	(($1 == 70)) || printf 'lodge image: error: unexpected failure (status %d) at debian.sh line %d: %s\n' "$@" >&2
	exit 70
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
trap 'die "interrupted"' INT TERM HUP

suite=bookworm
size=4G
extra_packages=
mirror=http://deb.debian.org/debian
cache_root=${LODGE_CACHE_DIR:-}
output=
while (($#)); do
	case $1 in
	--suite | --size | --packages | --mirror | --cache-dir | --output)
		(($# >= 2)) || die "$1 needs a value"
		case $1 in
		--suite) suite=$2 ;;
		--size) size=$2 ;;
		--packages) extra_packages=$2 ;;
		--mirror) mirror=$2 ;;
		--cache-dir) cache_root=$2 ;;
		--output) output=$2 ;;
		esac
		shift 2
		;;
	-h | --help)
		sed -n '2,/^set -/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&3
		exit 0
		;;
	*) die "unknown argument '$1' (see --help)" ;;
	esac
done
[[ $suite =~ ^[a-z]+$ ]] || die "suite '$suite' is not a Debian suite name"
[[ $size =~ ^[0-9]+[KMGT]?$ ]] || die "size '$size' is not a size such as 4G"
[[ $extra_packages =~ ^[a-z0-9.+,-]*$ ]] || die "packages must be a comma-separated list of Debian package names"
[[ $mirror =~ ^https?://[^[:space:]]+$ ]] || die "mirror '$mirror' is not an http(s) URL"
if [[ -z $cache_root ]]; then
	[[ -n ${HOME:-} ]] || die "no cache directory: set HOME or LODGE_CACHE_DIR, or pass --cache-dir"
	cache_root=$HOME/.cache/lodge
fi
[[ $cache_root == /* ]] || cache_root=$PWD/$cache_root
[[ -z $output || $output == /* ]] || output=$PWD/$output

(($(id -u) == 0)) || die "building a Debian image needs root (debootstrap creates device nodes and root-owned files)"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
if ((${#missing[@]})); then
	say "installing ${missing[*]} (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2 || die "apt-get update failed"
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
fi

base_packages=systemd,systemd-sysv,udev,dbus,iproute2,python3-minimal
packages=$base_packages${extra_packages:+,$extra_packages}
key=$({
	cat "${BASH_SOURCE[0]}"
	printf '%s\n' "$suite" "$size" "$packages" "$mirror"
} | sha256sum | cut -c1-32)
store=$cache_root/images/debian
entry=$store/$key

publish_output() {
	if [[ -n $output ]]; then
		say "copying the image to $output"
		mkdir -p "$(dirname "$output")"
		cp --sparse=always "$entry/rootfs.ext4" "$output.partial"
		mv -f "$output.partial" "$output"
		printf '%s\n' "$output" >&3
	else
		printf '%s\n' "$entry/rootfs.ext4" >&3
	fi
	exit 0
}

[[ -f $entry/manifest.json ]] && publish_output

mkdir -p "$store"
exec 9>"$store/lock"
if ! flock -n 9; then
	say "waiting for another image build using $store"
	flock 9
fi
[[ -f $entry/manifest.json ]] && publish_output
rm -rf "$store/tmp"
mkdir -p "$store/tmp"
work=$(mktemp -d "$store/tmp/build.XXXXXX")
# Chroot mounts are never made (debootstrap runs without them), so removing the tree is safe.
trap 'rm -rf "$work"' EXIT
root=$work/root
log=$store/debootstrap.log

say "debootstrap $suite (minbase + $packages) from $mirror; log: $log"
started=$SECONDS
steps=0
if ! debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" 2>&1 |
	while IFS= read -r line; do
		printf '%s\n' "$line"
		case $line in
		I:\ Retrieving* | I:\ Extracting* | I:\ Unpacking* | I:\ Configuring*)
			steps=$((steps + 1))
			((steps % 25)) || printf 'lodge image: debootstrap: %d steps, %d s (%s)\n' \
				"$steps" $((SECONDS - started)) "${line#I: }" >&2
			;;
		esac
	done >"$log"; then
	tail -n 30 "$log" >&2
	die "debootstrap failed (log: $log)"
fi
grep -q '^I: Base system installed successfully' "$log" || {
	tail -n 30 "$log" >&2
	die "debootstrap did not finish (log: $log)"
}
say "debootstrap: done in $((SECONDS - started)) s"

#@ configuration
say "configuring the image"
echo debian >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf '# lodge: the root disk is the first virtio disk.\n/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
printf 'deb %s %s main\n' "$mirror" "$suite" >"$root/etc/apt/sources.list"
# Root logs in on the serial console without a password (Debian's PAM allows empty ones).
chroot "$root" passwd -d root >/dev/null
# "uninitialized": systemd generates the machine ID at first boot and treats it as the first
# boot (ConditionFirstBoot=yes units run once).
echo uninitialized >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

units=$root/etc/systemd/system
mkdir -p "$units/getty.target.wants" "$units/multi-user.target.wants" \
	"$units/sysinit.target.wants" "$units/sockets.target.wants" "$root/etc/systemd/network"
# The getty on the serial console lodge gives every VM (systemd would start it for
# console=ttyS0 too; enabled explicitly so it does not depend on the command line).
ln -sf /lib/systemd/system/serial-getty@.service "$units/getty.target.wants/serial-getty@ttyS0.service"
# Nothing prompts on the console at first boot; the image is configured here.
ln -sf /dev/null "$units/systemd-firstboot.service"
# Network: every Ethernet interface by DHCP; boot does not wait for it (a VM without a NIC
# would wait two minutes).
cat >"$root/etc/systemd/network/80-lodge-dhcp.network" <<'EOF'
[Match]
Type=ether

[Network]
DHCP=yes
EOF
ln -sf /lib/systemd/system/systemd-networkd.service "$units/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/systemd-networkd.socket "$units/sockets.target.wants/systemd-networkd.socket"
ln -sf /dev/null "$units/systemd-networkd-wait-online.service"
# The hostname: the VM's name, from lodge.hostname= on the kernel command line, at first boot.
cat >"$root/usr/local/sbin/lodge-hostname" <<'EOF'
#!/bin/sh
# Sets the hostname from lodge.hostname=NAME on the kernel command line (lodge passes the VM's
# name). Runs at first boot only (lodge-hostname.service).
for word in $(cat /proc/cmdline); do
	case $word in
	lodge.hostname=*)
		name=${word#lodge.hostname=}
		case $name in
		'' | *[!A-Za-z0-9-]*) echo "lodge-hostname: ignoring invalid name '$name'" >&2; exit 0 ;;
		esac
		echo "$name" >/etc/hostname
		sed -i "s/^127\.0\.1\.1\t.*/127.0.1.1\t$name/" /etc/hosts
		hostname "$name"
		;;
	esac
done
EOF
chmod 755 "$root/usr/local/sbin/lodge-hostname"
cat >"$units/lodge-hostname.service" <<'EOF'
[Unit]
Description=Hostname from the lodge VM name
ConditionFirstBoot=yes
DefaultDependencies=no
After=systemd-remount-fs.service
Before=sysinit.target systemd-networkd.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/lodge-hostname

[Install]
WantedBy=sysinit.target
EOF
ln -sf ../lodge-hostname.service "$units/sysinit.target.wants/lodge-hostname.service"
# Downloaded packages are not needed in the image.
rm -f "$root"/var/cache/apt/archives/*.deb
#@ configuration end

manifest_packages=$(chroot "$root" dpkg-query -W -f='${Package}=${Version}\n' | LC_ALL=C sort |
	python3 -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))')

say "writing the ext4 image ($size)"
mkdir "$work/entry"
mkfs.ext4 -q -F -L debian-root -d "$root" "$work/entry/rootfs.ext4" "$size" ||
	die "mkfs.ext4 failed"
python3 - "$suite" "$size" "$mirror" "$manifest_packages" "$(sha256sum <"${BASH_SOURCE[0]}" | cut -c1-64)" \
	>"$work/entry/manifest.json" <<'EOF'
import json, sys
suite, size, mirror, packages, recipe = sys.argv[1:]
print(json.dumps({"suite": suite, "size": size, "mirror": mirror,
                  "packages": json.loads(packages), "recipe_sha256": recipe}))
EOF
mv -T "$work/entry" "$entry"
say "image ready: $entry/rootfs.ext4 ($(du -h --apparent-size "$entry/rootfs.ext4" | cut -f1) sparse, $(du -h "$entry/rootfs.ext4" | cut -f1) used)"
publish_output
