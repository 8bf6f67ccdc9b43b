#!/usr/bin/env bash
# Network benchmark: virtio-net on a tap, lodge's software engine against QEMU TCG running the
# same kernel and initramfs with virtio-net on a tap, measured in the same run (needs root).
#
# Usage: scripts/bench-net.sh [RUNS]   (default 3; prints medians and ratios)
#
# Everything happens in a network namespace the script creates and deletes: a bridge with
# 10.99.0.1/24 (the "host" side) and two taps. Per run and per VMM:
#  - guest -> host: the guest sends 64 MiB to a receiver on the bridge address; throughput is
#    measured by the receiver, from the first byte to the end (the guest's busybox `nc` writes
#    small chunks, so this is mostly the guest's CPU);
#  - host -> guest: the host sends 64 MiB to the guest's `nc -l` (large GSO frames through the
#    tap and mergeable receive buffers: the device's receive path);
#  - guest -> guest: guest A receives 32 MiB from guest B; B measures the time (/proc/uptime);
#  - latency: 20 pings from the guest to the bridge address, average round trip.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
((EUID == 0)) || {
	echo "error: needs root for a network namespace and taps" >&2
	exit 1
}
scripts/install-deps.sh >/dev/null
cargo build --release -q -p lodge
lodge=$PWD/${CARGO_TARGET_DIR:-target}/release/lodge
image=$("$lodge" guest-image)
ns=lodge-bench-$$
ip netns add "$ns"
trap 'ip netns delete "$ns" 2>/dev/null || true' EXIT
ip -n "$ns" link set lo up
ip -n "$ns" link add br0 type bridge
ip -n "$ns" addr add 10.99.0.1/24 dev br0
ip -n "$ns" link set br0 up
for tap in tapa tapb; do
	ip -n "$ns" tuntap add dev "$tap" mode tap vnet_hdr
	ip -n "$ns" link set "$tap" master br0 up
done

ip netns exec "$ns" python3 - "$runs" "$lodge" "$image" <<'PYTHON'
import os, re, socket, statistics, subprocess, sys, threading, time

runs, lodge, image = int(sys.argv[1]), sys.argv[2], sys.argv[3]
kernel, initrd = f"{image}/vmlinux", f"{image}/initramfs.cpio.gz"
SETUP = "sleep 1; ip addr add {ip}/24 dev eth0; ip link set eth0 up; "

def cmdline(command):
    return f'console=ttyS0 reboot=k panic=-1 quiet guest.cmd="{command}"'

def vmm(name, tap, mac, command):
    line = cmdline(command)
    if name == "lodge":
        return [lodge, "run", "--engine", "emulator", "--memory", "256M", "--kernel", kernel,
                "--initrd", initrd, "--cmdline", line, "--net", f"tap={tap},mac={mac}"]
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-device", "i8042", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
            "-append", line, "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no,vnet_hdr=on",
            "-device", f"virtio-net-device,netdev=n0,mac={mac}"]

def run(argv, timeout=300):
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, timeout=timeout)
    return out.stdout.decode(errors="replace")

def receiver(port, result):
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("10.99.0.1", port))
    server.listen(1)
    connection, _ = server.accept()
    total, first = 0, None
    while True:
        data = connection.recv(1 << 20)
        if not data:
            break
        if first is None:
            first = time.monotonic()
        total += len(data)
    result.append(total * 8 / (time.monotonic() - first) / 1e6)
    connection.close()
    server.close()

def send_to_guest(address, port, size):
    deadline = time.monotonic() + 60
    while True:
        try:
            connection = socket.create_connection((address, port), timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    chunk = b"\0" * (1 << 20)
    start, sent = time.monotonic(), 0
    while sent < size:
        connection.sendall(chunk)
        sent += len(chunk)
    connection.shutdown(socket.SHUT_WR)
    connection.settimeout(60)
    connection.recv(1)
    connection.close()
    return size * 8 / (time.monotonic() - start) / 1e6

metrics = ("host", "in", "guest", "ping")
results = {(v, m): [] for v in ("lodge", "qemu") for m in metrics}
for run_index in range(runs):
    for name in ("lodge", "qemu"):
        got = []
        thread = threading.Thread(target=receiver, args=(5001, got))
        thread.start()
        console = run(vmm(name, "tapa", "52:54:00:99:00:02",
                         SETUP.format(ip="10.99.0.2") +
                         "dd if=/dev/zero bs=65536 count=1024 2>/dev/null | nc 10.99.0.1 5001; "
                         "ping -c 20 -i 0.2 10.99.0.1"))
        thread.join(timeout=60)
        ping = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", console)
        if not got or not ping:
            sys.exit(f"{name}: guest->host run failed:\n{console[-3000:]}")
        results[(name, "host")].append(got[0])
        results[(name, "ping")].append(float(ping.group(1)))
        # Host to guest.
        guest = subprocess.Popen(vmm(name, "tapa", "52:54:00:99:00:02",
                                     SETUP.format(ip="10.99.0.2") + "nc -l -p 5000 >/dev/null"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        results[(name, "in")].append(send_to_guest("10.99.0.2", 5000, 64 << 20))
        guest.wait(timeout=60)
        # Guest to guest: A listens, B sends and times.
        a = subprocess.Popen(vmm(name, "tapa", "52:54:00:99:00:02",
                                 SETUP.format(ip="10.99.0.2") + "nc -l -p 5000 >/dev/null"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        console = run(vmm(name, "tapb", "52:54:00:99:00:03",
                          SETUP.format(ip="10.99.0.3") +
                          "until ping -c 1 -W 1 10.99.0.2 >/dev/null; do sleep 0.2; done; sleep 1; "
                          "t0=$(cut -d' ' -f1 /proc/uptime); "
                          "dd if=/dev/zero bs=65536 count=512 2>/dev/null | nc 10.99.0.2 5000; "
                          "t1=$(cut -d' ' -f1 /proc/uptime); echo elapsed=$t0:$t1"))
        a.wait(timeout=120)
        elapsed = re.search(r"elapsed=([\d.]+):([\d.]+)", console)
        if not elapsed:
            sys.exit(f"{name}: guest->guest run failed:\n{console[-3000:]}")
        seconds = float(elapsed.group(2)) - float(elapsed.group(1))
        results[(name, "guest")].append(32 * 1048576 * 8 / seconds / 1e6)
    print(f"run {run_index + 1}/{runs}: " + ", ".join(
        f"{v} {m} {results[(v, m)][-1]:.1f}" for v in ("lodge", "qemu") for m in metrics))

print()
print(f"{'median of ' + str(runs):30}{'lodge emulator':>16}{'QEMU TCG':>12}{'ratio':>9}")
for metric, label, unit in (("host", "guest -> host TCP", "Mbit/s"),
                            ("in", "host -> guest TCP", "Mbit/s"),
                            ("guest", "guest -> guest TCP", "Mbit/s"),
                            ("ping", "ping guest -> host (avg)", "ms")):
    l, q = statistics.median(results[("lodge", metric)]), statistics.median(results[("qemu", metric)])
    print(f"{label:30}{l:>10.1f} {unit:<5}{q:>7.1f} {unit:<4}{l / q:>7.2f}x")
PYTHON
