#!/usr/bin/env bash
# Boot benchmark: the default guest on lodge's software engine against QEMU's TCG software
# emulator, same kernel, initramfs and command line, measured in the same run.
#
# Usage: scripts/bench-boot.sh [--workload] [RUNS]   (default 5; prints medians and ratios)
#
# For each run it records, from process start: the time the guest prints
# "lodge-guest: userspace started" (its /init is running) and the time the process exits
# after the guest's `reboot -f`. lodge also reports the software engine's instruction count.
# Without --workload the guest runs `true`, so this is boot time; with it the guest runs a
# userspace compute workload (hashing, compression, sorting, awk arithmetic) and the
# "/init to exit" row is mostly that workload.
set -euo pipefail
cd "$(dirname "$0")/.."
guest_command=true
if [[ ${1:-} == --workload ]]; then
	guest_command="sha256sum /bin/busybox; head -c 1000000 /bin/busybox | gzip -9 | md5sum; head -c 1000000 /bin/busybox | bzip2 | md5sum; seq 1 20000 | sort -r | md5sum; awk 'BEGIN{s=0; for(i=1;i<=200000;i++) s+=1/i; print s}'"
	shift
fi
runs=${1:-5}

scripts/install-deps.sh >/dev/null
cargo build --release -q -p lodge
lodge=${CARGO_TARGET_DIR:-target}/release/lodge
image=$("$lodge" guest-image)
# The guest's init takes guest.cmd="..." up to the next double quote.
cmdline="console=ttyS0 reboot=k panic=-1 guest.cmd=\"$guest_command\""

python3 - "$runs" "$lodge" "$image" "$cmdline" <<'PYTHON'
import os, re, statistics, subprocess, sys, time

runs, lodge, image, cmdline = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
kernel, initrd = f"{image}/vmlinux", f"{image}/initramfs.cpio.gz"
MARKER = b"lodge-guest: userspace started"

def measure(argv, env=None):
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, env=env)
    seen, to_init = b"", None
    while True:
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
        if to_init is None and MARKER in seen:
            to_init = time.monotonic() - start
    stderr = process.stderr.read()
    process.wait()
    total = time.monotonic() - start
    if to_init is None or process.returncode != 0:
        sys.exit(f"{argv[0]} failed (status {process.returncode}):\n{seen.decode(errors='replace')[-2000:]}\n{stderr.decode(errors='replace')[-2000:]}")
    return to_init, total, stderr.decode(errors="replace")

lodge_argv = [lodge, "run", "--engine", "emulator", "--memory", "256M", "--kernel", kernel,
              "--initrd", initrd, "--cmdline", cmdline]
qemu_argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256",
             "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
             "-device", "i8042", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
             "-append", cmdline]

results = {"lodge": [], "qemu": []}
instructions = []
env = dict(os.environ, LODGE_LOG="lodge_emulator=info,warn")
for run in range(runs):
    for name, argv in (("lodge", lodge_argv), ("qemu", qemu_argv)):
        to_init, total, stderr = measure(argv, env if name == "lodge" else None)
        results[name].append((to_init, total))
        if name == "lodge":
            match = re.search(r"executed (\d+) instructions", stderr)
            if match:
                instructions.append((int(match.group(1)), total))
    print(f"run {run + 1}/{runs}: lodge {results['lodge'][-1][0]:.2f}/{results['lodge'][-1][1]:.2f} s, "
          f"qemu {results['qemu'][-1][0]:.2f}/{results['qemu'][-1][1]:.2f} s (to /init / total)")

def median(name, index):
    return statistics.median(r[index] for r in results[name])

print()
print(f"{'':24}{'lodge emulator':>16}{'QEMU TCG':>12}{'ratio':>9}")
for name in results:
    results[name] = [(to_init, total - to_init, total) for to_init, total in results[name]]
for label, index in (("time to /init (s)", 0), ("/init to exit (s)", 1), ("boot to exit (s)", 2)):
    l, q = median("lodge", index), median("qemu", index)
    print(f"{label:24}{l:16.2f}{q:12.2f}{l / q:8.2f}x")
if instructions:
    count, seconds = instructions[len(instructions) // 2]
    print(f"engine: {count / 1e6:.0f} M instructions per run, {count / seconds / 1e6:.0f} M instructions/s")
else:
    print("engine: instruction count not reported (set LODGE_LOG=lodge_emulator=info)")
PYTHON
