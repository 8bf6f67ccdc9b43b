#!/usr/bin/env bash
# Tests of lodge's default guest image recipe (guest/), run by the project's test command.
#
# Usage: bash guest/test.sh [--cache-dir DIR]
#
# Builds the image (or reuses it from the cache; the first build takes 5-15 minutes on 2 cores),
# then checks properties of what was built: the kernel config, the vmlinux ELF and its PVH
# note, the initramfs contents and its bit-reproducibility, mkdisk.sh's ext4 images, and, when
# qemu-system-x86_64 is installed, that the guest boots under QEMU TCG and runs a command.
# Prints PASS/FAIL/SKIP lines and exits non-zero if any check failed.
set -uo pipefail

here=$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
cache_args=()
case ${1:-} in
--cache-dir) cache_args=(--cache-dir "${2:?--cache-dir needs a directory}") ;;
"") ;;
*)
	echo "usage: guest/test.sh [--cache-dir DIR]" >&2
	exit 2
	;;
esac

failures=0
pass() { printf 'PASS: %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*"
	failures=$((failures + 1))
}
skip() { printf 'SKIP: %s\n' "$*"; }
check() { # description command...
	local description=$1
	shift
	if "$@"; then pass "$description"; else fail "$description"; fi
}

scratch=$(mktemp -d "${TMPDIR:-/tmp}/lodge-guest-test.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# --- Build -------------------------------------------------------------------------------------

echo "== building the guest image (guest/build.sh ${cache_args[*]})"
if ! out=$(bash "$here/build.sh" "${cache_args[@]}" | tail -n1) || [[ $out != /* || ! -d $out ]]; then
	fail "guest/build.sh printed an output directory (got '${out:-}')"
	exit 1
fi
pass "guest/build.sh printed output directory $out"
for file in vmlinux bzImage initramfs.cpio.gz kernel.config manifest.json; do
	check "output has $file" test -s "$out/$file"
done

manifest_lists() { # file: the manifest records this file's sha256
	local sum
	sum=$(sha256sum <"$out/$1" | cut -c1-64)
	grep -qE "\"$1\": \\{ \"size\": [0-9]+, \"sha256\": \"$sum\" \\}" "$out/manifest.json"
}
for file in vmlinux bzImage initramfs.cpio.gz kernel.config; do
	check "manifest.json has the sha256 of $file" manifest_lists "$file"
done
if command -v python3 >/dev/null; then
	check "manifest.json is valid JSON" python3 -m json.tool "$out/manifest.json" /dev/null
else
	skip "manifest.json JSON syntax: python3 is not installed"
fi
check "manifest.json records the input hash" grep -qE '"input_hash": "[0-9a-f]{64}"' "$out/manifest.json"
check "manifest.json records the linux-source-6.1 version" \
	grep -qE '"linux-source-6.1": "[^"]+"' "$out/manifest.json"

cache_hit_seconds=$({ TIMEFORMAT=%R; time bash "$here/build.sh" "${cache_args[@]}" >"$scratch/again" 2>/dev/null; } 2>&1)
check "a second build.sh run returns the same directory" test "$(tail -n1 "$scratch/again")" = "$out"
check "a second build.sh run is a cache hit under 1 s (took ${cache_hit_seconds} s)" \
	awk -v t="$cache_hit_seconds" 'BEGIN { exit !(t < 1.0) }'

# --- Kernel ------------------------------------------------------------------------------------

echo "== kernel"
fragment_survived() { # every CONFIG line of the fragment holds in the built .config
	local line symbol lost=0
	while IFS= read -r line; do
		if [[ $line == CONFIG_* ]]; then
			grep -qxF -- "$line" "$out/kernel.config" && continue
		else
			symbol=${line#\# }
			symbol=${symbol%% *}
			# "is not set", or absent because its dependencies are off: both mean not built.
			grep -q "^$symbol=" "$out/kernel.config" || continue
		fi
		echo "  not in kernel.config: $line"
		lost=$((lost + 1))
	done < <(grep -E '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$here/kernel.fragment")
	((lost == 0))
}
directives=$(grep -cE '^(CONFIG_[A-Za-z0-9_]+=|# CONFIG_[A-Za-z0-9_]+ is not set$)' "$here/kernel.fragment")
check "all $directives kernel.fragment lines hold in the built .config" fragment_survived
for option in CONFIG_64BIT=y CONFIG_PVH=y CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y CONFIG_DEVMEM=y; do
	check "kernel.config has $option" grep -qxF "$option" "$out/kernel.config"
done
for option in CONFIG_MODULES CONFIG_ACPI CONFIG_IA32_EMULATION CONFIG_RANDOMIZE_BASE \
	CONFIG_PTP_1588_CLOCK CONFIG_LEGACY_PTYS CONFIG_VT; do
	check "kernel.config has $option off" bash -c "! grep -q '^$option=' '$out/kernel.config'"
done

readelf -hW "$out/vmlinux" >"$scratch/vmlinux.header" 2>&1
check "vmlinux is ELF64" grep -qE 'Class: +ELF64' "$scratch/vmlinux.header"
check "vmlinux is x86-64" grep -qE 'Machine: +Advanced Micro Devices X86-64' "$scratch/vmlinux.header"
check "vmlinux is an executable" grep -qE 'Type: +EXEC' "$scratch/vmlinux.header"
readelf -nW "$out/vmlinux" >"$scratch/vmlinux.notes" 2>&1
# XEN_ELFNOTE_PHYS32_ENTRY = 18 = 0x12: the 32-bit PVH entry point.
check "vmlinux has the PVH entry note (Xen note type 0x12)" \
	grep -qE '^[[:space:]]+Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*\(0x00000012\)' "$scratch/vmlinux.notes"
readelf -SW "$out/vmlinux" >"$scratch/vmlinux.sections" 2>&1
check "vmlinux is stripped (no .symtab)" bash -c "! grep -q '\\.symtab' '$scratch/vmlinux.sections'"
check "bzImage carries the x86 boot protocol header (HdrS at 0x202)" \
	test "$(dd if="$out/bzImage" bs=1 skip=514 count=4 status=none)" = HdrS

# --- Initramfs ---------------------------------------------------------------------------------

echo "== initramfs"
initramfs=$out/initramfs.cpio.gz
check "initramfs.cpio.gz is valid gzip" gzip -t "$initramfs"
gzip -dc "$initramfs" >"$scratch/initramfs.cpio"
cpio -tv --quiet <"$scratch/initramfs.cpio" >"$scratch/initramfs.list" 2>&1
check "initramfs has an executable /init" grep -qE '^-rwxr-xr-x .* init$' "$scratch/initramfs.list"
check "initramfs has an executable bin/busybox" grep -qE '^-rwxr-xr-x .* bin/busybox$' "$scratch/initramfs.list"
check "initramfs has bin/sh -> /bin/busybox" grep -qE ' bin/sh -> /bin/busybox$' "$scratch/initramfs.list"
for dir in dev etc mnt proc root run sys tmp; do
	check "initramfs has directory $dir" grep -qE "^d.* $dir\$" "$scratch/initramfs.list"
done
check "initramfs has etc/passwd with root" grep -qE ' etc/passwd$' "$scratch/initramfs.list"
check "initramfs files are all owned by root" bash -c "! awk '\$3 != \"root\" || \$4 != \"root\"' '$scratch/initramfs.list' | grep -q ."
# The console node lives in a second archive appended after the first one's trailer.
check "initramfs appends a dev/console character device 5:1" \
	grep -qaE '070701[0-9A-F]{8}00002180[0-9A-F]{56}00000005000000010000000C[0-9A-F]{8}dev/console' \
	"$scratch/initramfs.cpio"
mkdir "$scratch/root"
(cd "$scratch/root" && cpio -id --quiet --no-absolute-filenames <"$scratch/initramfs.cpio") 2>/dev/null
check "/init extracts as an executable file" test -x "$scratch/root/init" -a -f "$scratch/root/init"
check "/init is valid busybox sh" "$scratch/root/bin/busybox" sh -n "$scratch/root/init"
check "/init is the recipe's init" cmp -s "$scratch/root/init" "$here/init"

# Two builds into fresh cache directories, one with a different umask and time zone, and the
# initramfs of the main build must all be the same bytes.
reproducible_build() { # cache_dir
	bash "$here/build.sh" --initramfs-only --cache-dir "$1" 2>"$scratch/repro.err" | tail -n1
}
first=$(reproducible_build "$scratch/cache-a")
second=$(umask 077 && TZ=Asia/Tokyo reproducible_build "$scratch/cache-b")
if [[ -f $first/initramfs.cpio.gz && -f $second/initramfs.cpio.gz ]]; then
	check "two initramfs builds in different cache dirs are byte-identical" \
		cmp "$first/initramfs.cpio.gz" "$second/initramfs.cpio.gz"
	check "a fresh initramfs build equals the image's initramfs" cmp "$first/initramfs.cpio.gz" "$initramfs"
else
	fail "build.sh --initramfs-only into fresh cache dirs ($(tail -n1 "$scratch/repro.err"))"
fi
rm -rf "$scratch/cache-a" "$scratch/cache-b"

# --- Disk images -------------------------------------------------------------------------------

echo "== mkdisk.sh"
PATH=$PATH:/usr/sbin:/sbin
mkdir -p "$scratch/disk-source/sub"
token="lodge-disk-$RANDOM-$$"
echo "$token" >"$scratch/disk-source/hello.txt"
echo nested >"$scratch/disk-source/sub/nested.txt"
disk=$(bash "$here/mkdisk.sh" "$scratch/disk.img" 64M "$scratch/disk-source" testdisk 2>"$scratch/mkdisk.err" | tail -n1)
check "mkdisk.sh prints the image's absolute path" test "$disk" = "$scratch/disk.img"
dumpe2fs -h "$scratch/disk.img" >"$scratch/disk.header" 2>/dev/null
check "disk image is ext4 with label testdisk" grep -qE '^Filesystem volume name: +testdisk$' "$scratch/disk.header"
check "disk image has ext4 extents" grep -qE '^Filesystem features:.* extent' "$scratch/disk.header"
check "disk image is 64 MiB" test "$(stat -c %s "$scratch/disk.img")" = $((64 << 20))
check "disk image is sparse" test "$(($(stat -c %b "$scratch/disk.img") * 512))" -lt $((64 << 20))
check "disk image holds SOURCE_DIR's hello.txt" \
	test "$(debugfs -R 'cat /hello.txt' "$scratch/disk.img" 2>/dev/null)" = "$token"
check "disk image holds SOURCE_DIR's sub/nested.txt" \
	test "$(debugfs -R 'cat /sub/nested.txt' "$scratch/disk.img" 2>/dev/null)" = nested
check "disk image root directory is owned by 0:0" \
	bash -c "debugfs -R 'stat /' '$scratch/disk.img' 2>/dev/null | grep -qE 'User: +0 +Group: +0 '"
e2fsck_clean() { e2fsck -fn "$1" >/dev/null 2>&1; }
check "e2fsck finds the disk image clean" e2fsck_clean "$scratch/disk.img"
bash "$here/mkdisk.sh" "$scratch/empty.img" 16M >/dev/null 2>&1
check "mkdisk.sh without SOURCE_DIR makes an empty ext4 labelled lodge" \
	bash -c "dumpe2fs -h '$scratch/empty.img' 2>/dev/null | grep -qE '^Filesystem volume name: +lodge$'"
check "mkdisk.sh rejects a bad size" bash -c "! bash '$here/mkdisk.sh' '$scratch/bad.img' 12X 2>/dev/null"
mkdir "$scratch/too-big"
head -c $((4 << 20)) /dev/urandom >"$scratch/too-big/4MiB" # not zeros: mkfs -d keeps those sparse
check "mkdisk.sh fails when SOURCE_DIR does not fit" \
	bash -c "! bash '$here/mkdisk.sh' '$scratch/small.img' 1M '$scratch/too-big' 2>/dev/null"
check "mkdisk.sh leaves no image or partial file behind on failure" \
	bash -c "! ls '$scratch'/bad.img* '$scratch'/small.img* >/dev/null 2>&1"

# --- Boot under QEMU TCG -----------------------------------------------------------------------

echo "== boot under QEMU (TCG)"
# microvm has no i8042 of its own: -device i8042 gives reboot=k the reset line lodge also
# provides. Without it the kernel falls back to other reset methods, which take seconds or,
# for bzImage, never reset the machine.
#
# Boots the guest and writes the console to log, each line prefixed with the seconds since QEMU
# started (log.raw keeps the bytes as they came). With input, types it on the console once the
# shell prompt shows: text that arrives before the shell reads its terminal can get lost, as it
# would for a person typing ahead. Returns QEMU's status (124: it did not exit in time).
boot_qemu() { # log kernel smp append [input]
	local log=$1 kernel=$2 smp=$3 append=$4 input=${5:-} fifo=$scratch/qemu-input input_fd tries
	rm -f "$fifo" "$log.status"
	mkfifo "$fifo"
	exec {input_fd}<>"$fifo" # keeps a writer open so QEMU's stdin never sees end-of-file
	{
		timeout 120 qemu-system-x86_64 -M microvm,acpi=off -accel tcg -m 256 -smp "$smp" \
			-nodefaults -no-user-config -nographic -serial stdio -no-reboot -device i8042 \
			-kernel "$kernel" -initrd "$initramfs" -append "$append" <"$fifo" 2>&1
		echo $? >"$log.status"
	} | tee "$log.raw" | timestamp_lines >"$log" &
	local pipeline=$!
	if [[ -n $input ]]; then
		for ((tries = 0; tries < 600; tries++)); do
			grep -qF 'root@lodge:~# ' "$log.raw" 2>/dev/null && break
			[[ -e $log.status ]] && break
			sleep 0.1
		done
		printf '%s' "$input" >&"$input_fd"
	fi
	wait "$pipeline"
	exec {input_fd}>&-
	return "$(cat "$log.status")"
}
timestamp_lines() {
	local start=${EPOCHREALTIME//[!0-9]/} line elapsed # microseconds
	while IFS= read -r line; do
		elapsed=$((${EPOCHREALTIME//[!0-9]/} - start))
		printf '%d.%03d %s\n' $((elapsed / 1000000)) $((elapsed / 1000 % 1000)) "${line%$'\r'}"
	done
}
show_console_on_failure() { # failures_before log
	(($1 == failures)) || sed 's/^/  console: /' "$2" | tail -n 40
}
console_has_line() { grep -qE "^[0-9.]+ $2\$" "$1"; }
time_of_line() { awk -v text="$2" 'index($0, text) { print $1; exit }' "$1"; }
init_time() { # kernel's printk time of "Run /init"
	sed -nE 's/^[0-9.]+ \[ *([0-9.]+)\] Run \/init as init process$/\1/p' "$1" | head -n1
}

qemu=$(command -v qemu-system-x86_64 || true)
if [[ -z $qemu || ! -x $qemu ]]; then
	skip "QEMU boot tests: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
else
	command_line='console=ttyS0 reboot=k panic=-1 guest.cmd="echo hello-from-guest"'

	failures_before=$failures
	boot_qemu "$scratch/boot-vmlinux.log" "$out/vmlinux" 1 "$command_line"
	status=$?
	log=$scratch/boot-vmlinux.log
	check "QEMU (vmlinux via PVH, 1 vCPU) exited by itself with status 0 (status $status)" test "$status" = 0
	check "guest printed 'lodge-guest: userspace started'" console_has_line "$log" 'lodge-guest: userspace started'
	check "guest ran guest.cmd and printed hello-from-guest" console_has_line "$log" 'hello-from-guest'
	check "guest printed 'lodge-guest: command exited with status 0'" \
		console_has_line "$log" 'lodge-guest: command exited with status 0'
	check "guest rebooted (kernel: 'reboot: Restarting system')" grep -q 'reboot: Restarting system' "$log"
	echo "  vmlinux/PVH: Run /init at $(init_time "$log") s kernel time;" \
		"userspace started at $(time_of_line "$log" 'lodge-guest: userspace started') s," \
		"QEMU exited at $(tail -n1 "$log" | cut -d' ' -f1) s after QEMU started"
	show_console_on_failure "$failures_before" "$log"

	failures_before=$failures
	boot_qemu "$scratch/boot-bzimage.log" "$out/bzImage" 2 \
		'console=ttyS0 reboot=k panic=-1 guest.cmd=false'
	status=$?
	log=$scratch/boot-bzimage.log
	check "QEMU (bzImage, 2 vCPUs) exited by itself with status 0 (status $status)" test "$status" = 0
	check "guest brought up 2 CPUs from the MP table" grep -q 'smp: Brought up 1 node, 2 CPUs' "$log"
	check "guest.cmd=false (unquoted form) exits with status 1" \
		console_has_line "$log" 'lodge-guest: command exited with status 1'
	echo "  bzImage: Run /init at $(init_time "$log") s kernel time;" \
		"QEMU exited at $(tail -n1 "$log" | cut -d' ' -f1) s after QEMU started"
	show_console_on_failure "$failures_before" "$log"

	# Without guest.cmd the console gets a login shell with job control; exiting it reboots.
	failures_before=$failures
	boot_qemu "$scratch/boot-shell.log" "$out/vmlinux" 1 'console=ttyS0 reboot=k panic=-1' \
		$'echo shell-$((6 * 7)) tty=$(tty)\nexit\n'
	status=$?
	log=$scratch/boot-shell.log
	check "QEMU (interactive shell) exited by itself with status 0 (status $status)" test "$status" = 0
	check "the shell ran a command from the console" console_has_line "$log" 'shell-42 tty=/dev/ttyS0'
	check "the shell has job control" bash -c "! grep -q 'job control turned off' '$log'"
	check "the shell's prompt is root@lodge:~#" grep -qF 'root@lodge:~# ' "$log"
	check "exiting the shell reboots the guest" console_has_line "$log" 'lodge-guest: shell exited'
	show_console_on_failure "$failures_before" "$log"
fi

echo
if ((failures)); then
	echo "guest/test.sh: $failures check(s) failed"
	exit 1
fi
echo "guest/test.sh: all checks passed"
