#!/usr/bin/env bash
# Debian benchmark: lodge's software engine against QEMU's TCG software emulator, the same
# kernel, image and command line, measured in the same run.
#
# Usage: scripts/bench-debian.sh [RUNS]   (default 3; prints medians and ratios; needs root)
#
# 1. Boot: from process start to the `login:` prompt of a Debian VM (systemd, the image of
#    `lodge image create debian`, a fresh copy for every boot so each is a first boot).
# 2. Workload: the default busybox guest mounts the Debian image read-only and runs python3,
#    perl, gzip, sort and sha256sum in a chroot of it; process start to exit.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
((EUID == 0)) || {
	echo "error: the Debian image needs root to build (debootstrap)" >&2
	exit 1
}

scripts/install-deps.sh >/dev/null
cargo build --release -q -p lodge
lodge=${CARGO_TARGET_DIR:-target}/release/lodge
guest=$("$lodge" guest-image)
image=$("$lodge" image create debian)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/lodge-bench-debian.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

# The workload script travels as a second raw disk (NUL-padded), as in the tests.
cat >"$scratch/workload.sh" <<'EOF'
mount -o ro /dev/vda /mnt
PATH=/usr/bin:/bin LC_ALL=C chroot /mnt /bin/sh -c '
set -e
python3 -c "
import hashlib, math
print(sum(i * i for i in range(1000000)))
print(sum(math.sin(i) * math.sqrt(i) for i in range(200000)))
print(hashlib.sha256(b\"lodge\" * 200000).hexdigest())
print(len(sorted(str(i * 7919 % 100003) for i in range(200000))))
"
perl -e "my \$s = 0; \$s += sqrt(\$_) * log(\$_) for 1 .. 500000; printf(\"%.6f\n\", \$s)"
seq 1 300000 | sort -r | md5sum
seq 1 300000 | gzip -9 | sha256sum
sha256sum /usr/bin/python3.11 /usr/lib/x86_64-linux-gnu/libc.so.6
'
echo LODGE-WORKLOAD-DONE
EOF
python3 - "$scratch/workload.sh" "$scratch/workload.img" <<'PYTHON'
import sys
data = open(sys.argv[1], "rb").read()
data += b"\0" * (-len(data) % 512)
open(sys.argv[2], "wb").write(data)
PYTHON

python3 - "$runs" "$lodge" "$guest" "$image" "$scratch" <<'PYTHON'
import os, shutil, statistics, subprocess, sys, time

runs, lodge, guest, image, scratch = int(sys.argv[1]), *sys.argv[2:]
kernel, initrd = f"{guest}/vmlinux", f"{guest}/initramfs.cpio.gz"
base = "console=ttyS0 reboot=k panic=-1"
qemu_base = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-m", "512",
             "-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt",
             "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
             "-device", "i8042", "-no-reboot", "-kernel", kernel]

def qemu_disk(index, path, readonly):
    ro = ",readonly=on" if readonly else ""
    return ["-drive", f"id=d{index},file={path},format=raw,if=none{ro}",
            "-device", f"virtio-blk-device,drive=d{index}"]

def until(argv, marker, kill_at_marker):
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    seen, at = b"", None
    while True:
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            break
        seen += chunk
        if at is None and marker in seen:
            at = time.monotonic() - start
            if kill_at_marker:
                process.kill()
    process.wait()
    if at is None:
        sys.exit(f"{argv[0]}: {marker!r} never appeared:\n{seen.decode(errors='replace')[-3000:]}")
    return at if kill_at_marker else time.monotonic() - start

def fresh_copy():
    copy = f"{scratch}/root.ext4"
    subprocess.run(["cp", "--sparse=always", image, copy], check=True)
    return copy

boot = {"lodge": [], "qemu": []}
work = {"lodge": [], "qemu": []}
workload = f"{scratch}/workload.img"
work_cmdline = base + ' quiet guest.cmd="tr -d \\\\000 </dev/vdb >/tmp/w.sh; sh /tmp/w.sh"'
for run in range(runs):
    copy = fresh_copy()
    boot["lodge"].append(until([lodge, "run", "--engine", "emulator", "--memory", "512M",
                                "--image", copy], b"login: ", True))
    copy = fresh_copy()
    boot["qemu"].append(until(qemu_base + ["-append", base + " root=/dev/vda rw"]
                              + qemu_disk(0, copy, False), b"login: ", True))
    work["lodge"].append(until([lodge, "run", "--engine", "emulator", "--memory", "512M",
                                "--kernel", kernel, "--initrd", initrd, "--cmdline", work_cmdline,
                                "--disk", f"{image},readonly", "--disk", f"{workload},readonly"],
                               b"LODGE-WORKLOAD-DONE", False))
    work["qemu"].append(until(qemu_base + ["-initrd", initrd, "-append", work_cmdline]
                              + qemu_disk(0, image, True) + qemu_disk(1, workload, True),
                              b"LODGE-WORKLOAD-DONE", False))
    print(f"run {run + 1}/{runs}: boot to login lodge {boot['lodge'][-1]:.1f} s, "
          f"qemu {boot['qemu'][-1]:.1f} s; workload lodge {work['lodge'][-1]:.1f} s, "
          f"qemu {work['qemu'][-1]:.1f} s")

print()
print(f"{'median of ' + str(runs):28}{'lodge emulator':>16}{'QEMU TCG':>12}{'ratio':>9}")
for label, table in (("Debian boot to login:", boot), ("chroot workload", work)):
    l, q = statistics.median(table["lodge"]), statistics.median(table["qemu"])
    print(f"{label:28}{l:>15.1f}s{q:>11.1f}s{l / q:>8.2f}x")
PYTHON
