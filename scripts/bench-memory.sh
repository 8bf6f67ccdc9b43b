#!/usr/bin/env bash
# Memory benchmark: what the VMM process costs beyond the guest's own RAM, for lodge's
# software engine and QEMU's TCG, booting the same default guest in the same run.
#
# Usage: scripts/bench-memory.sh [RUNS]   (default 3; prints medians and the ratio)
#
# Each VM gets 256 MiB and runs `sleep 3` in the guest; one second after the guest prints
# "lodge-guest: userspace started", the script reads /proc/PID/smaps: the process's total
# resident memory, and the resident part of the guest RAM mapping (the 256 MiB anonymous
# mapping). Overhead = total - guest RAM. It also prints the size of lodge's release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}

scripts/install-deps.sh >/dev/null
cargo build --release -q -p lodge
lodge=${CARGO_TARGET_DIR:-target}/release/lodge
image=$("$lodge" guest-image)
cmdline='console=ttyS0 reboot=k panic=-1 guest.cmd="sleep 3"'

python3 - "$runs" "$lodge" "$image" "$cmdline" <<'PYTHON'
import os, re, statistics, subprocess, sys, time

runs, lodge, image, cmdline = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
kernel, initrd = f"{image}/vmlinux", f"{image}/initramfs.cpio.gz"
MARKER = b"lodge-guest: userspace started"
GUEST_BYTES = 256 << 20

def smaps(pid):
    """Total resident KiB, and resident KiB of the guest RAM mapping."""
    total, guest, size = 0, 0, 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                size = int(m.group(2), 16) - int(m.group(1), 16)
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if size == GUEST_BYTES:
                    guest += kib
    return total, guest

def measure(argv):
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    seen, sample = b"", None
    while True:
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
        if sample is None and MARKER in seen:
            time.sleep(1)
            sample = smaps(process.pid)
    process.wait()
    if sample is None or process.returncode != 0:
        sys.exit(f"{argv[0]} failed (status {process.returncode}):\n{seen.decode(errors='replace')[-2000:]}")
    if sample[1] == 0:
        sys.exit(f"{argv[0]}: no resident 256 MiB guest RAM mapping found")
    return sample

lodge_argv = [lodge, "run", "--engine", "emulator", "--memory", "256M", "--kernel", kernel,
              "--initrd", initrd, "--cmdline", cmdline, "--console", "stdio"]
qemu_argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256",
             "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
             "-device", "i8042", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
             "-append", cmdline]

results = {"lodge": [], "qemu": []}
for run in range(runs):
    for name, argv in (("lodge", lodge_argv), ("qemu", qemu_argv)):
        results[name].append(measure(argv))
    print(f"run {run + 1}/{runs}: " + ", ".join(
        f"{name} {r[-1][0] / 1024:.1f} MiB total, {r[-1][1] / 1024:.1f} MiB guest RAM"
        for name, r in results.items()))

def median(name, pick):
    return statistics.median(pick(r) for r in results[name]) / 1024

print()
print(f"{'':28}{'lodge emulator':>16}{'QEMU TCG':>12}{'ratio':>9}")
for label, pick in (("resident total (MiB)", lambda r: r[0]),
                    ("guest RAM resident (MiB)", lambda r: r[1]),
                    ("VMM overhead (MiB)", lambda r: r[0] - r[1])):
    l, q = median("lodge", pick), median("qemu", pick)
    print(f"{label:28}{l:16.1f}{q:12.1f}{l / q:8.2f}x")
print(f"lodge release binary: {os.path.getsize(lodge) / 1e6:.1f} MB")
PYTHON
