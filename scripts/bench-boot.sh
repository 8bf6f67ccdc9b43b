#!/usr/bin/env bash
# Boot benchmark of the software engine against QEMU TCG, measured in the same run.
#
# Usage: scripts/bench-boot.sh [--runs N] [--lodge PATH]
#
# Boots the default guest (guest/build.sh: tinyconfig kernel + busybox initramfs) with
# guest.cmd=true, which reaches /init, runs `true` and reboots (reboot=k ends the VM), N times
# (default 3) under each of:
#   lodge run --engine emulator
#   qemu-system-x86_64 -accel tcg -M microvm,acpi=off (same vmlinux, initramfs, command line)
# For each it reports, from process start: the time until the console prints
# "lodge-guest: userspace started" (time to /init) and until the process exits
# (boot-to-reboot), medians over the runs, and the ratios engine/QEMU. For the engine it also
# prints the instructions executed and the instructions per second it logs at debug level.
# QEMU missing: the engine is still measured and the ratio is reported as unavailable.
set -Eeuo pipefail

runs=3
lodge=
while (($#)); do
	case $1 in
	--runs)
		runs=${2:?--runs needs a number}
		shift 2
		;;
	--lodge)
		lodge=${2:?--lodge needs a path}
		shift 2
		;;
	*)
		echo "usage: scripts/bench-boot.sh [--runs N] [--lodge PATH]" >&2
		exit 2
		;;
	esac
done

repo=$(cd "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
if [[ -z $lodge ]]; then
	target=${CARGO_TARGET_DIR:-$repo/target}
	echo "bench-boot: building lodge (release)" >&2
	(cd "$repo" && cargo build --release -q -p lodge >&2)
	lodge=$target/release/lodge
fi
image=$(bash "$repo/guest/build.sh" | tail -n 1)
kernel=$image/vmlinux
initrd=$image/initramfs.cpio.gz
cmdline="console=ttyS0 reboot=k panic=-1 guest.cmd=true"

# time_boot MARKER-LOG CMD...: runs CMD with stdin closed, and prints
# "<seconds to marker> <seconds to exit>" measured from the start of the process.
time_boot() {
	local log=$1
	shift
	python3 - "$log" "$@" <<'PY'
import subprocess, sys, time
log = open(sys.argv[1], "wb")
start = time.monotonic()
proc = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
marker = None
for line in proc.stdout:
    log.write(line)
    if marker is None and b"lodge-guest: userspace started" in line:
        marker = time.monotonic() - start
proc.wait()
total = time.monotonic() - start
if marker is None:
    sys.exit("bench-boot: the guest never reached /init (log: %s)" % sys.argv[1])
print("%.3f %.3f" % (marker, total))
PY
}

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

scratch=$(mktemp -d "${TMPDIR:-/tmp}/lodge-bench.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

engine_init=() engine_total=() qemu_init=() qemu_total=()
have_qemu=no
command -v qemu-system-x86_64 >/dev/null && have_qemu=yes

for ((i = 1; i <= runs; i++)); do
	read -r a b < <(LODGE_LOG=lodge_emulator=debug,info time_boot "$scratch/engine-$i.log" \
		"$lodge" run --engine emulator --kernel "$kernel" --initrd "$initrd" --memory 256M \
		--cmdline "$cmdline" --console stdio)
	engine_init+=("$a") engine_total+=("$b")
	if [[ $have_qemu == yes ]]; then
		read -r a b < <(time_boot "$scratch/qemu-$i.log" qemu-system-x86_64 -accel tcg \
			-M microvm,acpi=off -m 256M -kernel "$kernel" -initrd "$initrd" \
			-append "$cmdline" -nographic -no-reboot)
		qemu_init+=("$a") qemu_total+=("$b")
	fi
done

ei=$(median "${engine_init[@]}")
et=$(median "${engine_total[@]}")
stats=$(grep -h "Software engine:" "$scratch"/engine-*.log | tail -n 1 | sed 's/.*Software engine: //')
echo "software engine: time to /init ${ei}s, boot to reboot ${et}s (median of $runs)"
echo "software engine: $stats"
if [[ $have_qemu == yes ]]; then
	qi=$(median "${qemu_init[@]}")
	qt=$(median "${qemu_total[@]}")
	echo "qemu tcg:        time to /init ${qi}s, boot to reboot ${qt}s (median of $runs)"
	awk -v ei="$ei" -v qi="$qi" -v et="$et" -v qt="$qt" \
		'BEGIN {printf "ratio engine/qemu: time to /init %.2f, boot to reboot %.2f\n", ei / qi, et / qt}'
else
	echo "qemu tcg: not installed (apt-get install qemu-system-x86); no ratio"
fi
