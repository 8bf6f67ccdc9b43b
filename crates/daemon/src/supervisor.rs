//! VMM processes: spawning them so they outlive the daemon, recognizing them again after a
//! daemon restart, and noticing when they end.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;

use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

/// Errors from process handling.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("Cannot open VMM log {path}")]
    Log {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Cannot run VMM program {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// Starts `<program> run --config <config>` in its own session, with stdin from /dev/null
/// and stdout/stderr appended to `log`, inheriting the descriptors `inherit` (taps) under the
/// same numbers. The new session keeps it alive when the daemon or the daemon's terminal goes
/// away; the daemon reaps it while it is the parent.
pub fn spawn(
    program: &Path,
    config: &Path,
    log: &Path,
    inherit: &[i32],
) -> Result<Child, SupervisorError> {
    let log_error = |source| SupervisorError::Log {
        path: log.display().to_string(),
        source,
    };
    let stdout = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_error)?;
    let stderr = stdout.try_clone().map_err(log_error)?;
    let mut command = std::process::Command::new(program);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let inherit = inherit.to_vec();
    // SAFETY: setsid and fcntl are async-signal-safe; the closure reads only its own copy of
    // the descriptor numbers.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for &fd in &inherit {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Command::from(command)
        .spawn()
        .map_err(|source| SupervisorError::Spawn {
            program: program.display().to_string(),
            source,
        })
}

/// The start time of a process in clock ticks since boot (`/proc/PID/stat` field 22), which
/// together with the pid identifies it across pid reuse.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Fields from 3 on; field 22 is the 20th of them.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The process `pid` exists, is not a zombie, and is the one that started at `ticks`.
pub fn is_alive(pid: u32, ticks: Option<u64>) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    match ticks {
        Some(ticks) => start_ticks(pid) == Some(ticks),
        None => true,
    }
}

/// Finds a live process whose command line names `config`: recovers a VMM when the daemon
/// died between spawning it and recording its pid.
pub fn find_by_config(config: &Path) -> Option<u32> {
    let wanted = config.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|&b| b == 0).any(|arg| arg == wanted) && is_alive(pid, None) {
            return Some(pid);
        }
    }
    None
}

/// Sends SIGKILL to the VMM and its process group (a VMM building the default guest image
/// has helper processes; as a session leader its group id is its pid).
pub fn kill(pid: u32) {
    use nix::sys::signal::{kill, killpg, Signal};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(pid as i32);
    if nix::unistd::getpgid(Some(pid)) == Ok(pid) {
        let _ = killpg(pid, Signal::SIGKILL);
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// A process that is not (or no longer) the daemon's child, watched through a pidfd.
pub struct PidWatch {
    fd: AsyncFd<OwnedFd>,
}

impl PidWatch {
    /// Opens a pidfd for `pid`; fails if the process is gone.
    pub fn open(pid: u32) -> io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: `fd` is an open pidfd owned by the AsyncFd from here on; OwnedFd always
        // returns the same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Resolves when the process has ended (a pidfd polls readable then).
    pub async fn exited(&self) -> io::Result<()> {
        let _guard = self.fd.readable().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_this_process() {
        let pid = std::process::id();
        let ticks = start_ticks(pid).expect("own start time");
        assert!(is_alive(pid, Some(ticks)));
        assert!(!is_alive(pid, Some(ticks + 1)));
        assert!(!is_alive(u32::MAX / 2, None));
    }

    #[tokio::test]
    async fn spawned_processes_get_their_own_session_and_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("vmm.sh");
        std::fs::write(&script, "#!/bin/sh\necho \"args: $*\"\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let config = dir.path().join("vm.json");
        let log = dir.path().join("vmm.log");
        let mut child = spawn(&script, &config, &log, &[]).unwrap();
        let pid = child.id().unwrap();
        // SAFETY: getsid only reads the session id of a process.
        let session = unsafe { libc::getsid(pid as libc::pid_t) };
        assert_eq!(session, pid as i32, "not a session leader");
        for _ in 0..500 {
            if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("args:")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let watch = PidWatch::open(pid).unwrap();
        kill(pid);
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.exited())
            .await
            .expect("pidfd did not report the exit")
            .unwrap();
        let status = child.wait().await.unwrap();
        assert!(!status.success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&format!("args: run --config {}", config.display())),
            "{text}"
        );
    }
}
