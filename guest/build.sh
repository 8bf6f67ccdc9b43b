#!/usr/bin/env bash
# lodge's default guest image: a tinyconfig+virtio Linux 6.1 kernel built from Debian's
# linux-source-6.1 and a busybox-static initramfs.
#
# Embedded inputs: the lodge binary embeds exactly these files of guest/ with include_str!,
# writes them to a temporary directory and runs `bash build.sh` there. Keep this list true and
# the directory flat (inputs are found beside this script, never in subdirectories):
#   build.sh  kernel.fragment  init  mkdisk.sh
#
# Usage: bash build.sh [--cache-dir DIR] [--initramfs-only]
#   --cache-dir DIR   lodge's cache directory (default: $LODGE_CACHE_DIR, else
#                     ${XDG_CACHE_HOME:-$HOME/.cache}/lodge); this recipe uses DIR/guest/.
#   --initramfs-only  build (or reuse) only the initramfs; the printed directory then holds
#                     just initramfs.cpio.gz.
#
# Contract: progress and logs go to stderr; the last line of stdout is the absolute path of the
# output directory, holding vmlinux (stripped ELF with the PVH entry note), bzImage,
# initramfs.cpio.gz, kernel.config, System.map and manifest.json (input hash, package
# versions, sha256 of each file). On failure it exits non-zero and the last stderr line says why.
# Missing Debian packages are installed with apt-get, which needs root.
#
# Cache layout (all under DIR/guest/, every entry named by the hash of its inputs and renamed
# into place only when complete, builds serialised by flock on DIR/guest/lock):
#   images/<hash>/      the output directories this script prints
#   kernel/<hash>/      vmlinux, bzImage, kernel.config, System.map
#   initramfs/<hash>/   initramfs.cpio.gz
#   linux-<version>/    unpacked linux-source-6.1 with the in-tree kernel build (incremental)
#   tmp/                work in progress; emptied by the next build
set -Eeuo pipefail

# stdout carries only the final path: everything else, including tools' stdout, goes to stderr.
exec 3>&1 1>&2

recipe_dir=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)

say() { printf 'lodge guest: %s\n' "$*" >&2; }
# Failures exit with status 70 after one "error:" line. The ERR trap reports commands that fail
# unexpectedly; it stays quiet for status 70, which means a subshell already said why.
die() {
	printf 'lodge guest: error: %s\n' "$*" >&2
	exit 70
}
# shellcheck disable=SC2317 # called from the ERR trap
on_error() { # status line command
	(($1 == 70)) || printf 'lodge guest: error: unexpected failure (status %d) at build.sh line %d: %s\n' "$@" >&2
	exit 70
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
trap 'die "interrupted"' INT TERM HUP

# --- Arguments and cache directory -----------------------------------------------------------

cache_root=${LODGE_CACHE_DIR:-}
initramfs_only=no
while (($#)); do
	case $1 in
	--cache-dir)
		(($# >= 2)) || die "--cache-dir needs a directory"
		cache_root=$2
		shift 2
		;;
	--cache-dir=*)
		cache_root=${1#*=}
		shift
		;;
	--initramfs-only)
		initramfs_only=yes
		shift
		;;
	-h | --help)
		sed -n '2,/^set -/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}" >&3
		exit 0
		;;
	*) die "unknown argument '$1' (usage: build.sh [--cache-dir DIR] [--initramfs-only])" ;;
	esac
done
if [[ -z $cache_root ]]; then
	if [[ -n ${XDG_CACHE_HOME:-} ]]; then
		cache_root=$XDG_CACHE_HOME/lodge
	else
		[[ -n ${HOME:-} ]] || die "no cache directory: set HOME, XDG_CACHE_HOME or LODGE_CACHE_DIR, or pass --cache-dir"
		cache_root=$HOME/.cache/lodge
	fi
fi
[[ $cache_root == /* ]] || cache_root=$PWD/$cache_root
cache=$cache_root/guest

for input in kernel.fragment init; do
	[[ -f $recipe_dir/$input ]] || die "recipe input $recipe_dir/$input is missing"
done

# --- Build packages ----------------------------------------------------------------------------

# Everything the recipe runs. A fresh Debian 12 machine lacks the first four.
required_packages=(flex bison libelf-dev cpio linux-source-6.1 busybox-static
	bc binutils e2fsprogs gcc gzip libc6-dev libssl-dev make xz-utils)

declare -A package_version=()
read_package_versions() {
	local name status version
	package_version=()
	while IFS=$'\t' read -r name status version; do
		if [[ $status == installed ]]; then package_version[$name]=$version; fi
	done < <(dpkg-query -W -f='${Package}\t${db:Status-Status}\t${Version}\n' \
		"${required_packages[@]}" 2>/dev/null || true)
}

command -v dpkg-query >/dev/null || die "dpkg-query not found: this recipe needs Debian 12 (bookworm) or a derivative"
read_package_versions
missing=()
for package in "${required_packages[@]}"; do
	[[ -n ${package_version[$package]:-} ]] || missing+=("$package")
done
if ((${#missing[@]})); then
	if [[ $(id -u) != 0 ]]; then
		die "missing packages: ${missing[*]}; run this as root to install them, or: sudo apt-get install ${missing[*]}"
	fi
	say "installing ${missing[*]} (apt-get)"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q || die "apt-get update failed"
	apt-get install -y -q --no-install-recommends "${missing[@]}" ||
		die "apt-get install ${missing[*]} failed"
	read_package_versions
	for package in "${missing[@]}"; do
		[[ -n ${package_version[$package]:-} ]] || die "package $package is still not installed after apt-get"
	done
fi

linux_source_tarball=/usr/src/linux-source-6.1.tar.xz
busybox_binary=/bin/busybox
[[ -f $linux_source_tarball ]] || die "$linux_source_tarball is missing although linux-source-6.1 is installed"
[[ -x $busybox_binary ]] || die "$busybox_binary is missing although busybox-static is installed"
compiler_version=$(gcc --version)
compiler_version=${compiler_version%%$'\n'*}
linker_version=$(ld --version)
linker_version=${linker_version%%$'\n'*}

# --- Input hashes ------------------------------------------------------------------------------

# The text between a section's begin and end markers below, which is part of its cache key.
recipe_section() {
	sed -n "/^#@ $1 recipe begin/,/^#@ $1 recipe end/p" "$recipe_dir/build.sh"
}
hash_stream() { sha256sum | cut -c1-64; }

kernel_key=$(
	{
		echo "lodge guest kernel"
		echo "linux-source-6.1 ${package_version[linux-source-6.1]}"
		echo "$compiler_version"
		echo "$linker_version"
		recipe_section kernel
		cat "$recipe_dir/kernel.fragment"
	} | hash_stream
)
initramfs_key=$(
	{
		echo "lodge guest initramfs"
		echo "busybox-static ${package_version[busybox-static]}"
		echo "cpio ${package_version[cpio]}"
		echo "gzip ${package_version[gzip]}"
		recipe_section initramfs
		cat "$recipe_dir/init"
	} | hash_stream
)
image_key=$({
	echo "$kernel_key $initramfs_key"
	cat "$recipe_dir/build.sh"
} | hash_stream)

kernel_entry=$cache/kernel/$kernel_key
initramfs_entry=$cache/initramfs/$initramfs_key
image_entry=$cache/images/$image_key

finish() {
	printf '%s\n' "$1" >&3
	exit 0
}

# Fast path: entries appear only by rename once complete, so existence means valid.
if [[ $initramfs_only == yes && -f $initramfs_entry/initramfs.cpio.gz ]]; then
	finish "$initramfs_entry"
fi
if [[ $initramfs_only == no && -f $image_entry/manifest.json ]]; then
	finish "$image_entry"
fi

# --- Slow path: one build at a time per cache ----------------------------------------------------

mkdir -p "$cache" || die "cannot create cache directory $cache"
exec 9>"$cache/lock"
if ! flock -n 9; then
	say "waiting for another build using $cache"
	flock 9
fi
# Whatever is in tmp/ belongs to a build that died: with the lock held, no other build runs.
rm -rf "$cache/tmp"
mkdir -p "$cache/tmp" "$cache/kernel" "$cache/initramfs" "$cache/images" "$cache/logs"
work=$(mktemp -d "$cache/tmp/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Logs of the latest build stay for inspection; work/ goes away with the process.
logs=$cache/logs
if [[ $initramfs_only == no && -f $image_entry/manifest.json ]]; then
	finish "$image_entry" # built by the build we waited for
fi

# Shows the progress of a stream of lines on stdin, one step per line matching step_regex, and
# writes every line to log. total is N (an exact step count: shows a percentage), ~N (an
# estimate: shows steps and a percentage capped at 99) or 0 (unknown: shows steps). Updates in
# place on a terminal; otherwise prints a line every 5% (every 20 s when the total is
# unknown), so CI logs stay short.
show_progress() { # label total step_regex log
	local label=$1 total=${2#\~} step_regex=$3 log=$4 estimate=no
	local line steps=0 percent=0 shown=-1 started=$SECONDS last=$SECONDS tty=no text
	[[ $2 == \~* ]] && estimate=yes
	[[ -t 2 ]] && tty=yes
	exec 4>"$log"
	while IFS= read -r line; do
		printf '%s\n' "$line" >&4
		[[ $line =~ $step_regex ]] || continue
		steps=$((steps + 1))
		if ((total == 0)); then
			text="$steps steps"
		else
			percent=$((steps * 100 / total))
			((percent <= 99)) || percent=99
			text="$percent%"
			[[ $estimate == no ]] || text="$steps/~$total steps ($percent%)"
		fi
		text="lodge guest: $label: $text, $((SECONDS - started)) s"
		if [[ $tty == yes ]]; then
			printf '\r\033[K%s' "$text" >&2
		elif ((total > 0 && percent / 5 != shown / 5)) || ((total == 0 && SECONDS - last >= 20)); then
			printf '%s\n' "$text" >&2
			shown=$percent
			last=$SECONDS
		fi
	done
	exec 4>&-
	if [[ $tty == yes ]]; then printf '\r\033[K' >&2; fi
	say "$label: done, $steps steps in $((SECONDS - started)) s"
}

# Runs a command with a progress display; on failure shows the end of its log and dies.
run_with_progress() { # label total step_regex log command...
	local label=$1 total=$2 step_regex=$3 log=$4
	shift 4
	if ! "$@" 2>&1 | show_progress "$label" "$total" "$step_regex" "$log"; then
		echo "--- last lines of $log ---" >&2
		tail -n 40 "$log" >&2
		die "$label failed (full log: $log)"
	fi
}

# Atomically publishes a finished directory as a cache entry.
publish() { # staging_dir entry
	chmod -R a-w "$1"/*
	mv -T "$1" "$2"
}

#@ kernel recipe begin
# Everything from here to "kernel recipe end" is part of the kernel's cache key.

# Pinned so the same inputs give the same vmlinux: no build date, user, host or build counter.
kernel_build_environment() {
	export SOURCE_DATE_EPOCH=0
	export KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 1970'
	export KBUILD_BUILD_USER=lodge
	export KBUILD_BUILD_HOST=lodge
	export KBUILD_BUILD_VERSION=1
	export LC_ALL=C TZ=UTC
}

kernel_make() { # tree target...
	local tree=$1
	shift
	make -C "$tree" ARCH=x86_64 "$@"
}

# Lines of the fragment that must hold in .config: "CONFIG_X=value" or "# CONFIG_X is not set".
fragment_directives() {
	grep -E '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$1"
}

# Fails loudly, listing them, when olddefconfig dropped or changed fragment lines.
verify_kernel_config() { # fragment config
	local directive symbol lost=()
	while IFS= read -r directive; do
		if [[ $directive == CONFIG_* ]]; then
			grep -qxF -- "$directive" "$2" || lost+=("$directive")
		else
			symbol=${directive#\# }
			symbol=${symbol%% *}
			# An "is not set" line holds when the symbol is off or absent (dependencies off).
			if ! grep -qxF -- "$directive" "$2" && grep -q "^$symbol=" "$2"; then
				lost+=("$directive")
			fi
		fi
	done < <(fragment_directives "$1")
	if ((${#lost[@]})); then
		for directive in "${lost[@]}"; do
			symbol=${directive#\# }
			symbol=${symbol%%[= ]*}
			printf '  fragment: %-40s .config: %s\n' "$directive" \
				"$(grep -E "^(# )?${symbol}[= ]" "$2" || echo '(absent)')" >&2
		done
		die "kernel config: ${#lost[@]} fragment line(s) did not survive olddefconfig (missing dependency?)"
	fi
}

# Unpacks linux-source-6.1 into tree, atomically (a half-unpacked tree never gets the name).
unpack_kernel_source() { # tarball tree
	local tarball=$1 tree=$2 records checkpoint
	# tar counts 10 KiB records; a checkpoint every 1% of them makes ~100 progress steps.
	records=$(($(xz --robot --list "$tarball" | awk '$1 == "totals" { print $5 }') / 10240))
	checkpoint=$((records / 100 > 0 ? records / 100 : 1))
	mkdir "$work/unpack"
	run_with_progress "unpacking $(basename "$tarball")" $((records / checkpoint)) '^tar: [0-9]+$' \
		"$logs/unpack.log" \
		tar -C "$work/unpack" -xJf "$tarball" --checkpoint="$checkpoint" --checkpoint-action='echo=%u'
	[[ -f $work/unpack/linux-source-6.1/Makefile ]] || die "unexpected layout in $tarball"
	mv -T "$work/unpack/linux-source-6.1" "$tree"
}

# Configures and builds the kernel in tree and copies the results to out.
build_kernel() { # tree fragment out estimated_steps
	local tree=$1 fragment=$2 out=$3 estimated_steps=$4 total=0
	local log=$logs/kernel-config.log build_log=$logs/kernel-build.log
	kernel_build_environment
	say "configuring the kernel (tinyconfig + $(basename "$fragment"))"
	: >"$log"
	kernel_make "$tree" tinyconfig >>"$log" 2>&1 || die "make tinyconfig failed (log: $log)"
	(cd "$tree" && scripts/kconfig/merge_config.sh -m .config "$fragment") >>"$log" 2>&1 ||
		die "merge_config.sh failed (log: $log)"
	kernel_make "$tree" olddefconfig >>"$log" 2>&1 || die "make olddefconfig failed (log: $log)"
	verify_kernel_config "$fragment" "$tree/.config"

	# A tree that has built before only rebuilds what the config change touches.
	[[ -f $tree/vmlinux ]] || total="~$estimated_steps"
	run_with_progress "building the kernel" "$total" '^  [A-Z][A-Z0-9_]* +[^ ]' "$build_log" \
		kernel_make "$tree" -j"$(nproc)" vmlinux bzImage
	# The step count of a full build is the next full build's progress total.
	if [[ $total != 0 ]]; then
		grep -cE '^  [A-Z][A-Z0-9_]* +[^ ]' "$build_log" >"$tree/.lodge-build-steps" || true
	fi

	strip --strip-all -o "$out/vmlinux" "$tree/vmlinux"
	cp "$tree/arch/x86/boot/bzImage" "$out/bzImage"
	cp "$tree/System.map" "$out/System.map"
	cp "$tree/.config" "$out/kernel.config"
	cp "$tree/include/config/kernel.release" "$out/kernel.release"

	local header notes
	header=$(readelf -h "$out/vmlinux")
	[[ $header =~ Class:[[:space:]]+ELF64 ]] || die "built vmlinux is not ELF64"
	# XEN_ELFNOTE_PHYS32_ENTRY (18) is the PVH entry point lodge and QEMU boot vmlinux through.
	notes=$(readelf -n "$out/vmlinux")
	[[ $notes =~ Xen[[:space:]]+0x[0-9a-f]+[[:space:]][^$'\n']*\(0x00000012\) ]] ||
		die "built vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
}
#@ kernel recipe end

#@ initramfs recipe begin
# Everything from here to "initramfs recipe end" is part of the initramfs's cache key.

# A newc cpio archive holding only /dev/console (char 5:1, 0600, root), written by hand because
# making the node for GNU cpio would need mknod and so root. The kernel opens /dev/console for
# init's stdin/stdout/stderr before /init can mount devtmpfs.
console_node_cpio() {
	newc_header 1 $((0020600)) 0 0 1 0 0 0 0 5 1 12 0
	printf 'dev/console\0\0\0' # name, NUL, padding to a multiple of 4 (110 + 12 + 2)
	newc_header 0 0 0 0 1 0 0 0 0 0 0 11 0
	printf 'TRAILER!!!\0\0\0\0' # 110 + 11 + 3
}
newc_header() { # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' "$@"
}

# Builds the initramfs from busybox-static and init into out/initramfs.cpio.gz, bit-reproducibly:
# fixed modes, owners, times and order, no host-specific inode or device numbers.
build_initramfs() { # busybox init out
	local busybox=$1 init=$2 out=$3 root=$work/initramfs-root applet
	local program_headers
	program_headers=$(readelf -lW "$busybox")
	if [[ $program_headers == *'program interpreter'* ]]; then
		die "$busybox is dynamically linked; the initramfs needs busybox-static's binary"
	fi
	mkdir -p "$root"
	(cd "$root" && mkdir -p bin sbin usr/bin usr/sbin etc dev mnt proc sys tmp run root)
	cp "$busybox" "$root/bin/busybox"
	while IFS= read -r applet; do
		case $applet in
		linuxrc | bin/busybox | init) continue ;; # /init is ours; linuxrc is for initrd images
		esac
		mkdir -p "$root/$(dirname "$applet")"
		ln -s /bin/busybox "$root/$applet"
	done < <("$busybox" --list-full | LC_ALL=C sort)
	cp "$init" "$root/init"

	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
	printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
	printf 'lodge\n' >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\tlodge\n::1\tlocalhost\n' >"$root/etc/hosts"
	cat >"$root/etc/profile" <<-'EOF'
		# Login shells on lodge's default guest (usually on the serial console).
		export PATH=/bin:/sbin:/usr/bin:/usr/sbin
		export HOME=/root
		export TERM=${TERM:-linux}
		PS1='\u@\h:\w\$ '
		[ "$PWD" = / ] && cd "$HOME"
	EOF

	find "$root" -type d -exec chmod 0755 {} +
	find "$root" -type f -exec chmod 0644 {} +
	chmod 0755 "$root/init" "$root/bin/busybox"
	chmod 0700 "$root/root"
	chmod 1777 "$root/tmp"
	find "$root" -exec touch -h -d @0 {} +

	(
		cd "$root"
		find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort |
			cpio --quiet -o -H newc -R 0:0 --reproducible
		console_node_cpio
	) | gzip -9n >"$out/initramfs.cpio.gz"
}
#@ initramfs recipe end

# --- Build what the cache lacks ------------------------------------------------------------------

if [[ ! -f $initramfs_entry/initramfs.cpio.gz ]]; then
	say "building the initramfs (busybox-static ${package_version[busybox-static]})"
	mkdir "$work/initramfs"
	build_initramfs "$busybox_binary" "$recipe_dir/init" "$work/initramfs"
	publish "$work/initramfs" "$initramfs_entry"
fi
[[ $initramfs_only == yes ]] && finish "$initramfs_entry"

if [[ ! -f $kernel_entry/vmlinux ]]; then
	tree=$cache/linux-${package_version[linux-source-6.1]}
	if [[ ! -f $tree/Makefile ]]; then
		# Trees of other source versions would never be used again: 1.5 GB or more each.
		rm -rf "$cache"/linux-*
		unpack_kernel_source "$linux_source_tarball" "$tree"
	fi
	estimated_steps=$(cat "$tree/.lodge-build-steps" 2>/dev/null || true)
	[[ $estimated_steps =~ ^[1-9][0-9]*$ ]] || estimated_steps=1520 # measured, 6.1.192
	mkdir "$work/kernel"
	build_kernel "$tree" "$recipe_dir/kernel.fragment" "$work/kernel" "$estimated_steps"
	publish "$work/kernel" "$kernel_entry"
fi

# --- Assemble the output directory -------------------------------------------------------------

json_string() {
	local s=${1//\\/\\\\}
	printf '"%s"' "${s//\"/\\\"}"
}

mkdir "$work/image"
for file in vmlinux bzImage kernel.config System.map; do
	ln "$kernel_entry/$file" "$work/image/$file" 2>/dev/null || cp "$kernel_entry/$file" "$work/image/$file"
done
ln "$initramfs_entry/initramfs.cpio.gz" "$work/image/" 2>/dev/null ||
	cp "$initramfs_entry/initramfs.cpio.gz" "$work/image/"
{
	echo "{"
	echo "  \"input_hash\": \"$image_key\","
	echo "  \"kernel_input_hash\": \"$kernel_key\","
	echo "  \"initramfs_input_hash\": \"$initramfs_key\","
	echo "  \"kernel_release\": $(json_string "$(cat "$kernel_entry/kernel.release")"),"
	echo "  \"compiler\": $(json_string "$compiler_version"),"
	echo "  \"linker\": $(json_string "$linker_version"),"
	echo "  \"packages\": {"
	sep=
	for package in $(printf '%s\n' "${!package_version[@]}" | LC_ALL=C sort); do
		printf '%s    %s: %s' "$sep" "$(json_string "$package")" "$(json_string "${package_version[$package]}")"
		sep=$',\n'
	done
	printf '\n  },\n'
	echo "  \"files\": {"
	sep=
	for file in bzImage initramfs.cpio.gz kernel.config System.map vmlinux; do
		printf '%s    "%s": { "size": %d, "sha256": "%s" }' "$sep" "$file" \
			"$(stat -c %s "$work/image/$file")" "$(sha256sum <"$work/image/$file" | cut -c1-64)"
		sep=$',\n'
	done
	printf '\n  }\n}\n'
} >"$work/image/manifest.json"
chmod a-w "$work/image/manifest.json"
mv -T "$work/image" "$image_entry"
say "guest image ready: $image_entry"
finish "$image_entry"
