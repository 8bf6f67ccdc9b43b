//! Helpers the Linux guest tests share: the default guest image, running lodge with a
//! timeout, the KVM skip check, and a console session on a pseudo-terminal.
#![allow(dead_code)] // Each test binary uses its own subset.

pub mod daemon;
pub mod netns;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::Receiver;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The lodge binary under test.
pub fn lodge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lodge"))
}

/// The default guest image directory (built by the recipe on first use, cached after).
pub fn image_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let output = lodge()
            .arg("guest-image")
            .stderr(Stdio::inherit())
            .output()
            .expect("lodge guest-image runs");
        assert!(output.status.success(), "the default guest image builds");
        PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
    })
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `prefix` followed by `command`'s program and arguments, with `command`'s environment and
/// stdin from /dev/null: `command` run through a wrapper such as `ip netns exec` or `setpriv`.
pub fn prefixed(prefix: &[&str], command: Command) -> Command {
    let mut wrapped = Command::new(prefix[0]);
    wrapped
        .args(&prefix[1..])
        .arg(command.get_program())
        .args(command.get_args())
        .stdin(Stdio::null());
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            wrapped.env(key, value);
        }
    }
    wrapped
}

/// Runs `command` with stdout and stderr captured, killing it after `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> Output {
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

/// Whether `engine` can run Linux guests here; prints why not.
pub fn engine_runs_linux(engine: &str, test: &str) -> bool {
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

/// A process with its stdin, stdout and stderr on a pseudo-terminal, as a user at a terminal
/// would run it; what it prints accumulates in `seen`.
pub struct ConsoleSession {
    child: Child,
    terminal: std::fs::File,
    output: Receiver<Vec<u8>>,
    pub seen: String,
}

impl ConsoleSession {
    /// Starts `command` on a new pseudo-terminal.
    pub fn start(mut command: Command) -> ConsoleSession {
        let pty = nix::pty::openpty(None, None).expect("a pseudo-terminal");
        let slave = || Stdio::from(pty.slave.try_clone().unwrap());
        let child = command
            .stdin(slave())
            .stdout(slave())
            .stderr(slave())
            .spawn()
            .expect("the program starts");
        drop(pty.slave);
        // SAFETY: the master fd is ours; File takes ownership of a duplicate.
        let terminal = unsafe { std::fs::File::from_raw_fd(libc::dup(pty.master.as_raw_fd())) };
        let (sender, output) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut reader = terminal.try_clone().unwrap();
        std::thread::spawn(move || {
            let _master = pty.master;
            let mut buffer = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buffer) {
                if n == 0 || sender.send(buffer[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        ConsoleSession {
            child,
            terminal,
            output,
            seen: String::new(),
        }
    }

    /// Waits until `needle` appears after `from` (a position in `seen`); returns the position
    /// just past it. Panics with the console after `timeout`.
    pub fn expect_from(&mut self, from: usize, needle: &str, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.seen.get(from..).and_then(|text| text.find(needle)) {
                return from + at + needle.len();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(bytes) => self
                    .seen
                    .push_str(&String::from_utf8_lossy(&bytes).replace('\r', "")),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "{needle:?} did not appear within {timeout:?}; console:\n{}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Waits until `needle` appears in what has not been matched yet... from the start.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> usize {
        self.expect_from(0, needle, timeout)
    }

    /// Types `line` and Enter.
    pub fn send_line(&mut self, line: &str) {
        self.terminal.write_all(line.as_bytes()).unwrap();
        self.terminal.write_all(b"\r").unwrap();
    }

    /// Types raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.terminal.write_all(bytes).unwrap();
    }

    /// Runs `command` at a shell prompt and returns its output: what the shell prints between
    /// two markers that `command`'s echo cannot produce by itself.
    pub fn run(&mut self, command: &str, timeout: Duration) -> String {
        let start_marker = "LODGE-BEGIN";
        let end_marker = "LODGE-END";
        let mark = self.seen.len();
        // The markers are split in the typed text, so the terminal's echo does not match.
        self.send_line(&format!(
            "echo LODGE-'BEGIN'; {command}; echo LODGE-'END' status=$?"
        ));
        let begin = self.expect_from(mark, &format!("{start_marker}\n"), timeout);
        let end = self.expect_from(begin, end_marker, timeout);
        let status_end = self.expect_from(end, "\n", timeout);
        let text = self.seen[begin..end - end_marker.len()].to_owned();
        let status = self.seen[end..status_end].trim().to_owned();
        format!("{text}{status}")
    }

    /// Waits for the process to end (killing it after `timeout`).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            while let Ok(bytes) = self.output.try_recv() {
                self.seen
                    .push_str(&String::from_utf8_lossy(&bytes).replace('\r', ""));
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("did not end within {timeout:?}; console:\n{}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ConsoleSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
