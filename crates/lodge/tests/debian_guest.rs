//! Debian on the software engine: programs from Debian packages (python3, perl, coreutils,
//! gzip) give the host's output, and a Debian VM with systemd boots to `login:`, logs in, is
//! `running`, powers off with status 0 and a clean file system, and boots again.
//!
//! The image is built by `lodge image create debian` (debootstrap; cached after the first
//! build), which needs root; without root these tests skip with a printed reason.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use support::{image_dir, lodge, run_with_timeout, ConsoleSession};

/// The cached Debian image (built on first use), or None without root.
fn cached_debian_image(test: &str) -> Option<&'static Path> {
    if !support::is_root() {
        println!("SKIP {test}: building a Debian image needs root (debootstrap)");
        return None;
    }
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    Some(IMAGE.get_or_init(|| {
        let output = lodge()
            .args(["image", "create", "debian"])
            .stderr(Stdio::inherit())
            .output()
            .expect("lodge image create runs");
        assert!(output.status.success(), "the Debian image builds");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    }))
}

/// A private copy of the Debian image in `dir`, made by `lodge image create --output`.
fn debian_image_copy(dir: &Path, test: &str) -> Option<PathBuf> {
    cached_debian_image(test)?;
    let path = dir.join("debian.ext4");
    let output = lodge()
        .args(["image", "create", "debian", "--output"])
        .arg(&path)
        .stderr(Stdio::inherit())
        .output()
        .expect("lodge image create runs");
    assert!(output.status.success(), "the Debian image is copied");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        path.display().to_string()
    );
    Some(path)
}

/// The workload run in the Debian tree, in the guest and on the host alike.
const WORKLOAD: &str = r#"
set -e
python3 -c '
import base64, datetime, hashlib, math, random, re, struct
print(sum(i * i for i in range(200000)))
print(math.sqrt(2) ** 10, math.sin(1.5), math.log(10), 1 / 7, 2 ** 100)
print(f"{math.pi:.15f} {12345.678e-3:e} {math.exp(-20):.17g}")
print("-".join(sorted("the quick brown fox jumps over the lazy dog".split(), key=str.upper)))
print("lodge".upper().center(20, "*"), "a,b,,c".split(","), "ünïcødé".encode())
print(hashlib.sha256(b"lodge" * 1000).hexdigest(), hashlib.md5(b"x").hexdigest())
print(base64.b64encode(struct.pack("<dqf", math.e, -2**63, 1.1)), re.findall(r"\w+@\w+", "a@b, c@d"))
random.seed(7); print(random.random(), random.randint(1, 10**12), datetime.date(2026, 12, 3).toordinal())
print(sorted([3.5, -1e300, 2.25, float("inf"), 0.1 + 0.2]))
'
perl -e 'printf("%.12f %.6e %d %s\n", atan2(1, 1) * 4, exp(10), 7 ** 12, 0.1 + 0.2);
  my $s = 0; $s += sqrt($_) for 1 .. 100000; printf("%.6f\n", $s);
  print join(",", sort { $a <=> $b } map { ($_ * 7919) % 1000 } 1 .. 20), "\n";'
seq 1 30000 | sed 's/$/ lodge/' | sort -r | md5sum
seq 1 30000 | sort -n -k1,1 -r | head -3
seq 1 60000 | gzip -9 | sha256sum
seq 1 60000 | gzip -9 | gzip -d | md5sum
sha256sum /usr/bin/dpkg /etc/os-release
md5sum /usr/bin/python3.11
"#;

/// Runs [`WORKLOAD`] in a chroot of the image on the host (files extracted with debugfs, so
/// no loop mount); returns its output.
fn workload_on_host(image: &Path, scratch: &Path) -> String {
    let tree = scratch.join("tree");
    std::fs::create_dir(&tree).unwrap();
    let status = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("debugfs runs");
    assert!(status.success(), "debugfs rdump");
    let dev = tree.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    if !dev.join("null").exists() {
        let status = Command::new("mknod")
            .args(["-m", "666"])
            .arg(dev.join("null"))
            .args(["c", "1", "3"])
            .status()
            .unwrap();
        assert!(status.success(), "mknod /dev/null");
    }
    let output = Command::new("/usr/sbin/chroot")
        .arg(&tree)
        .args(["/bin/sh", "-c", WORKLOAD])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LC_ALL", "C")
        .output()
        .expect("chroot runs");
    assert!(
        output.status.success(),
        "host chroot: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn debian_programs_give_the_hosts_output() {
    let test = "debian_programs_give_the_hosts_output";
    let Some(image) = cached_debian_image(test) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let expected = workload_on_host(image, scratch.path());

    // The script goes in as a second disk: the kernel command line cannot carry it.
    let script = scratch.path().join("workload.img");
    let mut bytes = format!(
        "mount -o ro /dev/vda /mnt && echo LODGE-BEGIN && \
         PATH=/usr/bin:/bin LC_ALL=C chroot /mnt /bin/sh -c '{}' && echo LODGE-END\n",
        WORKLOAD.replace('\'', r"'\''")
    )
    .into_bytes();
    bytes.resize(bytes.len().div_ceil(512) * 512, 0);
    std::fs::write(&script, bytes).unwrap();
    let mut command = lodge();
    command
        .args(["run", "--engine", "emulator", "--memory", "512M"])
        .args(["--console", "stdio"])
        .arg("--kernel")
        .arg(image_dir().join("vmlinux"))
        .arg("--initrd")
        .arg(image_dir().join("initramfs.cpio.gz"))
        .arg("--disk")
        .arg(format!("{},readonly", image.display()))
        .arg("--disk")
        .arg(format!("{},readonly", script.display()))
        .args([
            "--append",
            "quiet guest.cmd=\"tr -d \\\\000 </dev/vdb >/tmp/w.sh; sh /tmp/w.sh\"",
        ])
        .env("LODGE_LOG", "warn")
        .stdin(Stdio::null());
    let started = std::time::Instant::now();
    let output = run_with_timeout(command, Duration::from_secs(600));
    let console = String::from_utf8_lossy(&output.stdout).replace('\r', "");
    println!(
        "guest workload took {:.1} s; host output:\n{expected}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(output.status.code(), Some(0), "console:\n{console}");
    let Some((_, rest)) = console.split_once("LODGE-BEGIN\n") else {
        panic!("the workload did not start; console:\n{console}");
    };
    let Some((guest, _)) = rest.split_once("LODGE-END\n") else {
        panic!("the workload failed in the guest; console:\n{console}");
    };
    assert_eq!(guest, expected, "guest and host outputs differ");
    assert!(expected.lines().count() >= 20, "{expected}");
}

#[test]
fn debian_vm_boots_with_systemd_and_powers_off_cleanly() {
    let test = "debian_vm_boots_with_systemd_and_powers_off_cleanly";
    let scratch = tempfile::tempdir().unwrap();
    let Some(image) = debian_image_copy(scratch.path(), test) else {
        return;
    };
    let boot = |extra: &[&str]| {
        let mut command = lodge();
        command
            .args(["run", "--engine", "emulator", "--memory", "512M", "--image"])
            .arg(&image)
            .args(extra)
            .env("LODGE_LOG", "warn");
        ConsoleSession::start(command)
    };
    let boot_timeout = Duration::from_secs(400);
    let command_timeout = Duration::from_secs(120);

    let started = std::time::Instant::now();
    let mut console = boot(&["--append", "lodge.hostname=lodge-test"]);
    console.expect("login: ", boot_timeout);
    println!(
        "login prompt after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    console.send_line("root");
    console.expect("root@lodge-test:~# ", command_timeout);

    let state = console.run("systemctl is-system-running --wait", command_timeout);
    if !state.starts_with("running\n") {
        let failed = console.run("systemctl --failed --no-legend --no-pager", command_timeout);
        // No unit is expected to fail in this image: every failure is a defect to explain.
        panic!("system state {state:?}; failed units:\n{failed}");
    }
    assert_eq!(
        console.run("hostname", command_timeout),
        "lodge-test\nstatus=0"
    );
    let policy = console.run("apt-cache policy systemd", command_timeout);
    assert!(policy.contains("Installed: 252"), "{policy}");
    assert!(policy.ends_with("status=0"), "{policy}");
    let kernel = console.run(
        "cat /proc/cmdline; findmnt -rno SOURCE,FSTYPE,OPTIONS /",
        command_timeout,
    );
    assert!(kernel.contains("root=/dev/vda rw"), "{kernel}");
    assert!(kernel.contains("/dev/vda ext4 rw"), "{kernel}");
    console.send_line("poweroff");
    let status = console.wait(command_timeout);
    assert_eq!(status.code(), Some(0), "console:\n{}", console.seen);
    assert!(
        console.seen.contains("Guest powered off"),
        "{}",
        console.seen
    );

    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&image)
        .output()
        .expect("e2fsck runs");
    assert!(
        fsck.status.success(),
        "the file system is not clean after poweroff:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );

    // Second boot: no journal recovery, and the first boot's hostname stayed.
    let mut console = boot(&[]);
    console.expect("login: ", boot_timeout);
    for sign in ["recovering journal", "was not cleanly unmounted"] {
        assert!(!console.seen.contains(sign), "{sign}: {}", console.seen);
    }
    console.send_line("root");
    console.expect("root@lodge-test:~# ", command_timeout);
    console.send_line("poweroff");
    assert_eq!(console.wait(command_timeout).code(), Some(0));
}
