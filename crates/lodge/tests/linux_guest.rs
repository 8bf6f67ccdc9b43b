//! The default Linux guest booted by `lodge run` on each engine: a shell command, a virtio-blk
//! ext4 disk written in one boot and read back in the next, virtio-rng, a userspace workload
//! checked against the host, and reboot ending the VM with status 0.
//!
//! The software engine runs these everywhere. The KVM engine runs them where hardware
//! virtualization is available; on PVM hosts (whose KVM interprets guest ring 0 and cannot
//! run Linux to userspace) they skip with a printed reason.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{engine_runs_linux, image_dir, run_with_timeout};

/// Boots the default guest with `guest.cmd=COMMAND` and extra flags; returns the output.
fn boot(engine: &str, command: &str, flags: &[&str]) -> Output {
    boot_logging(engine, command, flags, "warn")
}

/// [`boot`] with lodge's log at `log` (`LODGE_LOG`).
fn boot_logging(engine: &str, command: &str, flags: &[&str], log: &str) -> Output {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lodge"));
    child
        .args([
            "run",
            "--engine",
            engine,
            "--memory",
            "256M",
            "--console",
            "stdio",
        ])
        .arg("--kernel")
        .arg(image_dir().join("vmlinux"))
        .arg("--initrd")
        .arg(image_dir().join("initramfs.cpio.gz"))
        .arg("--append")
        .arg(format!("guest.cmd=\"{command}\""))
        .args(flags)
        .env("LODGE_LOG", log)
        .stdin(Stdio::null());
    let output = run_with_timeout(child, Duration::from_secs(300));
    println!(
        "{engine}: `{command}` took {:.1} s\n--- console ---\n{}\n--- stderr ---\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn console(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).replace('\r', "")
}

fn shell_command_and_reboot(engine: &str) {
    let output = boot(
        engine,
        "echo hello-from-$(uname -s); cat /proc/cmdline",
        &[],
    );
    let text = console(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "reboot ends lodge run with 0"
    );
    assert!(text.contains("lodge-guest: userspace started"), "{text}");
    assert!(text.contains("hello-from-Linux"), "{text}");
    assert!(
        text.contains("lodge-guest: command exited with status 0"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("guest userspace started after"),
        "boot timer: {stderr}"
    );
}

/// `reboot -f` resets through the i8042 once and ends the VM there: no other reset method
/// runs and the guest prints no oops (it used to reach the real-mode restart and fault).
fn reboot_is_clean(engine: &str) {
    for _ in 0..3 {
        let output = boot_logging(engine, "true", &[], "info");
        let text = console(&output);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        assert!(text.contains("reboot: machine restart"), "{text}");
        for sign_of_trouble in [
            "Oops",
            "general protection",
            "Call Trace",
            "BUG:",
            "traps:",
            "invalid opcode",
        ] {
            assert!(!text.contains(sign_of_trouble), "{sign_of_trouble}: {text}");
        }
        assert_eq!(
            stderr.matches("Guest pulsed the i8042 reset line").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.contains("lodge: Guest reset"), "{stderr}");
    }
}

fn disk_survives_a_reboot(engine: &str) {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    std::fs::create_dir(&source).unwrap();
    std::fs::write(source.join("hello.txt"), "from the host\n").unwrap();
    let disk = dir.path().join("disk.ext4");
    let status = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../guest/mkdisk.sh"
        ))
        .arg(&disk)
        .arg("64M")
        .arg(&source)
        .arg("testdisk")
        .status()
        .unwrap();
    assert!(status.success(), "mkdisk.sh makes the image");
    let disk_flag = format!("{}", disk.display());

    let first = boot(
        engine,
        "mount /dev/vda /mnt && cat /mnt/hello.txt && echo written-by-the-guest > /mnt/guest.txt && sync && umount /mnt && echo first-boot-done",
        &["--disk", &disk_flag],
    );
    let text = console(&first);
    assert_eq!(first.status.code(), Some(0), "{text}");
    assert!(text.contains("from the host"), "{text}");
    assert!(text.contains("first-boot-done"), "{text}");

    let second = boot(
        engine,
        "mount -o ro /dev/vda /mnt && cat /mnt/guest.txt",
        &["--disk", &format!("{disk_flag},readonly")],
    );
    let text = console(&second);
    assert_eq!(second.status.code(), Some(0), "{text}");
    assert!(text.contains("written-by-the-guest"), "{text}");
    assert!(text.contains("command exited with status 0"), "{text}");

    // The host sees the guest's file too: the data reached the image.
    let debugfs = Command::new("debugfs")
        .args(["-R", "cat /guest.txt"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&debugfs.stdout),
        "written-by-the-guest\n"
    );
}

fn reads_virtio_rng(engine: &str) {
    let output = boot(
        engine,
        "cat /sys/class/misc/hw_random/rng_current; head -c 64 /dev/hwrng | od -An -tx1 | wc -w",
        &["--rng"],
    );
    let text = console(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("virtio_rng"), "{text}");
    assert!(
        text.lines().any(|l| l.trim() == "64"),
        "64 random bytes read: {text}"
    );
}

/// Integer, SSE and floating-point work in guest userspace (hashing, compression, sorting,
/// awk's double arithmetic) gives the same results as the same busybox binary on the host.
fn computes_what_the_host_computes(engine: &str) {
    // No double quotes: the guest's init takes guest.cmd="..." up to the next one.
    let command = "sha256sum /bin/busybox; \
        head -c 1000000 /bin/busybox | gzip -9 | md5sum; \
        head -c 1000000 /bin/busybox | gzip | gunzip | md5sum; \
        head -c 1000000 /bin/busybox | bzip2 | md5sum; \
        seq 1 20000 | sort -r | md5sum; \
        awk 'BEGIN{s=0; for(i=1;i<=200000;i++) s+=1/i; print s, s*1e300*7, int(s*1e9)}'";
    // The recipe copies the host's busybox-static binary into the initramfs, so the host's
    // copy is the reference; the first line (its hash) checks that it is the same binary.
    let host = Command::new("/bin/busybox")
        .args(["sh", "-c", command])
        .output()
        .expect("the host's busybox runs");
    assert!(host.status.success(), "{host:?}");
    let expected = String::from_utf8(host.stdout).unwrap();
    assert_eq!(expected.lines().count(), 6, "{expected}");

    let output = boot(engine, command, &[]);
    let text = console(&output);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("lodge-guest: command exited with status 0"),
        "{text}"
    );
    for line in expected.lines() {
        assert!(
            text.lines().any(|l| l == line),
            "the guest printed no line `{line}`: {text}"
        );
    }
}

/// `lodge run` on a terminal: keys typed reach the guest shell, Ctrl-C reaches the guest
/// rather than killing lodge, and `reboot -f` ends lodge with status 0.
fn interactive_console(engine: &str) {
    let mut command = support::lodge();
    command
        .args(["run", "--engine", engine, "--memory", "256M"])
        .arg("--kernel")
        .arg(image_dir().join("vmlinux"))
        .arg("--initrd")
        .arg(image_dir().join("initramfs.cpio.gz"))
        .env("LODGE_LOG", "warn");
    let mut console = support::ConsoleSession::start(command);
    let timeout = Duration::from_secs(240);
    let at = console.expect("userspace started", timeout);
    console.expect_from(at, "# ", timeout);
    console.send_line("echo typed-$((6*7))");
    console.expect("typed-42", timeout);
    console.send_line("sleep 100");
    std::thread::sleep(Duration::from_millis(500));
    console.send(b"\x03");
    console.send_line("echo after-ctrl-c");
    console.expect("after-ctrl-c\n", timeout);
    console.send_line("reboot -f");
    let status = console.wait(timeout);
    assert_eq!(status.code(), Some(0), "console:\n{}", console.seen);
}

#[test]
fn emulator_interactive_console() {
    interactive_console("emulator");
}

#[test]
fn kvm_interactive_console() {
    if engine_runs_linux("kvm", "kvm_interactive_console") {
        interactive_console("kvm");
    }
}

#[test]
fn emulator_shell_command_and_reboot() {
    shell_command_and_reboot("emulator");
}

#[test]
fn emulator_reboot_is_clean() {
    reboot_is_clean("emulator");
}

#[test]
fn kvm_reboot_is_clean() {
    if engine_runs_linux("kvm", "kvm_reboot_is_clean") {
        reboot_is_clean("kvm");
    }
}

#[test]
fn emulator_disk_survives_a_reboot() {
    disk_survives_a_reboot("emulator");
}

#[test]
fn emulator_reads_virtio_rng() {
    reads_virtio_rng("emulator");
}

#[test]
fn emulator_computes_what_the_host_computes() {
    computes_what_the_host_computes("emulator");
}

#[test]
fn kvm_computes_what_the_host_computes() {
    if engine_runs_linux("kvm", "kvm_computes_what_the_host_computes") {
        computes_what_the_host_computes("kvm");
    }
}

#[test]
fn kvm_shell_command_and_reboot() {
    if engine_runs_linux("kvm", "kvm_shell_command_and_reboot") {
        shell_command_and_reboot("kvm");
    }
}

#[test]
fn kvm_disk_survives_a_reboot() {
    if engine_runs_linux("kvm", "kvm_disk_survives_a_reboot") {
        disk_survives_a_reboot("kvm");
    }
}

#[test]
fn kvm_reads_virtio_rng() {
    if engine_runs_linux("kvm", "kvm_reads_virtio_rng") {
        reads_virtio_rng("kvm");
    }
}
