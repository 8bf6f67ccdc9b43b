//! Networking of `lodge run` on the software engine: user-mode networking through passt (an
//! ordinary user reaches a server on the host and serves one through a port forward), and
//! guests on taps in a bridge that reach each other and move 10 MB intact.
//!
//! Traffic stays on loopback (passt maps the guest's gateway to the host's loopback) or inside
//! a network namespace the test creates and deletes.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::netns::Namespace;
use support::{image_dir, is_root, lodge, prefixed, run_with_timeout};

/// `lodge run` of the default guest running `command`, with `flags`.
fn guest_command(kernel_dir: &Path, command: &str, flags: &[&str]) -> Command {
    let mut run = lodge();
    run.args([
        "run",
        "--engine",
        "emulator",
        "--memory",
        "256M",
        "--console",
        "stdio",
    ])
    .arg("--kernel")
    .arg(kernel_dir.join("vmlinux"))
    .arg("--initrd")
    .arg(kernel_dir.join("initramfs.cpio.gz"))
    .arg("--append")
    .arg(format!("guest.cmd=\"{command}\""))
    .args(flags)
    .env("LODGE_LOG", "info")
    .stdin(Stdio::null());
    run
}

fn console(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).replace('\r', "")
}

fn passt_installed(test: &str) -> bool {
    let found = Command::new("passt")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        println!("SKIP {test}: passt is not installed (scripts/install-deps.sh installs it)");
    }
    found
}

/// The default guest's kernel and initramfs where an unprivileged user can read them.
fn readable_image(dir: &Path) -> PathBuf {
    let copy = dir.join("image");
    std::fs::create_dir(&copy).unwrap();
    for name in ["vmlinux", "initramfs.cpio.gz"] {
        std::fs::copy(image_dir().join(name), copy.join(name)).unwrap();
        std::fs::set_permissions(copy.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    for path in [dir, copy.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    copy
}

/// Runs `command` as the unprivileged user `nobody` when this test runs as root.
fn unprivileged(command: Command) -> Command {
    if !is_root() {
        return command;
    }
    let mut wrapped = prefixed(
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ],
        command,
    );
    wrapped.env("HOME", "/tmp");
    wrapped
}

/// Answers one HTTP GET on `listener` with `body`; returns the request line.
fn serve_once(listener: TcpListener, body: String) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        let mut stream = stream;
        write!(
            stream,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        request
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn user_networking_reaches_the_host_without_root() {
    let test = "user_networking_reaches_the_host_without_root";
    if !passt_installed(test) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let image = readable_image(scratch.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = format!("host-says-{}", std::process::id());
    let server = serve_once(listener, token.clone());
    // passt maps the guest's default gateway to the host's loopback.
    let command = format!(
        "while ! ip route | grep -q default; do sleep 0.2; done; \
         gw=$(ip route | awk '/default/ {{print $3}}'); \
         echo fetched=$(wget -q -O - http://$gw:{port}/lodge)"
    );
    let output = run_with_timeout(
        unprivileged(guest_command(&image, &command, &["--net", "user"])),
        Duration::from_secs(180),
    );
    let text = console(&output);
    println!("{text}\n{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("lodge-guest: eth0 has address"), "{text}");
    assert!(text.contains(&format!("fetched={token}")), "{text}");
    assert_eq!(server.join().unwrap().trim(), "GET /lodge HTTP/1.1");
}

#[test]
fn user_networking_forwards_a_host_port_to_the_guest() {
    let test = "user_networking_forwards_a_host_port_to_the_guest";
    if !passt_installed(test) {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let image = readable_image(scratch.path());
    let port = free_port();
    let token = format!("guest-says-{}", std::process::id());
    let command = format!(
        "mkdir -p /tmp/www; echo {token} >/tmp/www/index.html; \
         httpd -f -p 8080 -h /tmp/www & sleep 600"
    );
    let forward = format!("user,hostfwd=tcp:{port}:8080");
    let mut child: Child = unprivileged(guest_command(&image, &command, &["--net", &forward]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answer = String::new();
    while Instant::now() < deadline {
        if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let _ = stream.write_all(b"GET /index.html HTTP/1.0\r\n\r\n");
            answer.clear();
            let _ = stream.read_to_string(&mut answer);
            if answer.contains(&token) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answer.contains(&token),
        "no answer through the forward: {answer:?}"
    );
}

/// A network namespace holding a bridge br0 (10.77.0.1/24) with `taps` on it.
fn bridge_with_taps(taps: &[&str]) -> Namespace {
    let namespace = Namespace::new(format!("lodge-net-{}", std::process::id()));
    namespace.ip(&["link", "add", "br0", "type", "bridge"]);
    namespace.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"]);
    namespace.ip(&["link", "set", "br0", "up"]);
    for tap in taps {
        namespace.ip(&["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        namespace.ip(&["link", "set", tap, "master", "br0", "up"]);
    }
    namespace
}

#[test]
fn guests_on_a_bridge_reach_each_other_and_move_10_mb_intact() {
    let test = "guests_on_a_bridge_reach_each_other_and_move_10_mb_intact";
    if !is_root() {
        println!("SKIP {test}: needs root for a network namespace, a bridge and taps");
        return;
    }
    let namespace = bridge_with_taps(&["tapa", "tapb"]);
    let image = image_dir();
    // udhcpc finds no server on this bridge: the addresses are set by hand once its first
    // attempt has passed.
    let receiver = "sleep 2; ip addr add 10.77.0.2/24 dev eth0; \
        ping -c 2 -W 5 10.77.0.1 >/dev/null && echo a-pings-host; \
        nc -l -p 5000 >/tmp/got; echo received=$(md5sum </tmp/got) bytes=$(wc -c </tmp/got)";
    let sender = "sleep 2; ip addr add 10.77.0.3/24 dev eth0; \
        dd if=/dev/urandom of=/tmp/data bs=1048576 count=10 2>/dev/null; \
        echo sent=$(md5sum </tmp/data); \
        until ping -c 1 -W 1 10.77.0.2 >/dev/null; do sleep 0.5; done; echo b-pings-a; \
        sleep 1; nc 10.77.0.2 5000 </tmp/data; echo sender-done";
    let spawn = |command: &str, nic: &str| {
        namespace
            .wrap(guest_command(image, command, &["--net", nic]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let started = Instant::now();
    let a = spawn(receiver, "tap=tapa,mac=52:54:00:77:00:02");
    let b = spawn(sender, "tap=tapb,mac=52:54:00:77:00:03");
    let watchdog = {
        let (a, b) = (a.id() as i32, b.id() as i32);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(300));
            // SAFETY: kill(2) on children we started; harmless if they exited.
            unsafe {
                libc::kill(a, libc::SIGKILL);
                libc::kill(b, libc::SIGKILL);
            }
        })
    };
    let a = a.wait_with_output().unwrap();
    let b = b.wait_with_output().unwrap();
    drop(watchdog);
    let (text_a, text_b) = (console(&a), console(&b));
    println!(
        "took {:.1} s\n--- receiver ---\n{text_a}\n--- sender ---\n{text_b}",
        started.elapsed().as_secs_f64()
    );
    assert!(text_a.contains("a-pings-host"), "{text_a}");
    assert!(text_b.contains("b-pings-a"), "{text_b}");
    let sent = text_b
        .lines()
        .find_map(|l| l.strip_prefix("sent="))
        .expect("the sender's checksum");
    let received = text_a
        .lines()
        .find_map(|l| l.strip_prefix("received="))
        .expect("the receiver's checksum");
    assert_eq!(received, format!("{sent} bytes=10485760"));
    assert_eq!(a.status.code(), Some(0));
    assert_eq!(b.status.code(), Some(0));
}
