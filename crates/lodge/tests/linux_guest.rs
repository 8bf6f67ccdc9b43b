//! The default Linux guest booted by `lodge run` on each engine: a shell command, a virtio-blk
//! ext4 disk written in one boot and read back in the next, virtio-rng, a userspace workload
//! checked against the host, and reboot ending the VM with status 0.
//!
//! The software engine runs these everywhere. The KVM engine runs them where hardware
//! virtualization is available; on PVM hosts (whose KVM interprets guest ring 0 and cannot
//! run Linux to userspace) they skip with a printed reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The default guest image directory (built by the recipe on first use, cached after).
fn image_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let output = Command::new(env!("CARGO_BIN_EXE_lodge"))
            .arg("guest-image")
            .stderr(Stdio::inherit())
            .output()
            .expect("lodge guest-image runs");
        assert!(output.status.success(), "the default guest image builds");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

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

fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lodge starts");
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        // SAFETY: kill(2) on the child we started; harmless if it already exited.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let output = child.wait_with_output().expect("lodge finishes");
    drop(watchdog);
    output
}

fn console(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).replace('\r', "")
}

/// Whether `engine` can run Linux guests here; prints why not.
fn engine_runs_linux(engine: &str, test: &str) -> bool {
    if engine != "kvm" {
        return true;
    }
    match lodge_kvm::probe() {
        Ok(lodge_kvm::KvmFlavor::Hardware) => true,
        Ok(lodge_kvm::KvmFlavor::Pvm) => {
            println!("SKIP {test}: /dev/kvm is PVM, which cannot run Linux guests to userspace");
            false
        }
        Err(reason) => {
            println!("SKIP {test}: {reason}");
            false
        }
    }
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
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd};

    let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
    let slave =
        |pty: &nix::pty::OpenptyResult| -> Stdio { Stdio::from(pty.slave.try_clone().unwrap()) };
    let mut child = Command::new(env!("CARGO_BIN_EXE_lodge"))
        .args(["run", "--engine", engine, "--memory", "256M"])
        .arg("--kernel")
        .arg(image_dir().join("vmlinux"))
        .arg("--initrd")
        .arg(image_dir().join("initramfs.cpio.gz"))
        .env("LODGE_LOG", "warn")
        .stdin(slave(&pty))
        .stdout(slave(&pty))
        .stderr(slave(&pty))
        .spawn()
        .expect("lodge starts");
    drop(pty.slave);
    // SAFETY: the master fd is ours; File takes ownership of a duplicate.
    let mut terminal = unsafe { std::fs::File::from_raw_fd(libc::dup(pty.master.as_raw_fd())) };
    let (sender, receiver) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = terminal.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buffer) {
            if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let expect = |needle: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(240);
        while !seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(left) {
                Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("{needle:?} never appeared; console:\n{seen}"),
            }
        }
    };
    expect("userspace started", &mut seen);
    expect("# ", &mut seen);
    terminal.write_all(b"echo typed-$((6*7))\r").unwrap();
    expect("typed-42", &mut seen);
    terminal.write_all(b"sleep 100\r").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    terminal.write_all(b"\x03").unwrap();
    terminal.write_all(b"echo after-ctrl-c\r").unwrap();
    expect("after-ctrl-c\r\n", &mut seen);
    terminal.write_all(b"reboot -f\r").unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "console:\n{seen}");
    drop(pty.master);
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
