//! Network adapters: the backend each NIC of the configuration asks for, and the passt
//! process behind user-mode networking.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use lodge_contract::{MacAddress, NicBackend, NicConfig};
use lodge_devices::virtio::net::backend::{adopt_fd, BackendError, NetBackend, StreamBackend, Tap};
use lodge_devices::virtio::net::{NetConfig, VirtioNet};

/// Errors setting up a NIC.
#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("Cannot open the backend of NIC {index} ({nic})")]
    Backend {
        index: usize,
        nic: String,
        #[source]
        source: BackendError,
    },
    #[error("Descriptor {fd} of NIC {index} is not open")]
    NotOpen { index: usize, fd: i32 },
    #[error("Cannot start passt for NIC {index} (is the passt package installed?)")]
    Passt {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A NIC's device, and the helper process it needs (passt), which ends with it.
pub struct Nic {
    pub device: VirtioNet,
    pub mac: MacAddress,
    pub helper: Option<Helper>,
}

/// A helper process killed when dropped.
pub struct Helper(Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Builds NIC `index` as `config` describes it.
pub fn build(index: usize, config: &NicConfig) -> Result<Nic, NicError> {
    let backend_error = |source| NicError::Backend {
        index,
        nic: config.to_string(),
        source,
    };
    let mut helper = None;
    let backend: Box<dyn NetBackend> = match &config.backend {
        NicBackend::Tap { name } => Box::new(Tap::open(name).map_err(backend_error)?),
        NicBackend::TapFd { fd } => {
            // SAFETY: F_GETFD only inspects the descriptor table.
            if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                return Err(NicError::NotOpen { index, fd: *fd });
            }
            // SAFETY: the supervisor handed this descriptor to this process for this NIC;
            // nothing else in the VMM uses it.
            let owned = unsafe { adopt_fd(*fd) };
            Box::new(Tap::from_fd(owned).map_err(backend_error)?)
        }
        NicBackend::User { forwards } => {
            let (ours, theirs) =
                UnixStream::pair().map_err(|source| NicError::Passt { index, source })?;
            let child = spawn_passt(theirs.into(), forwards)
                .map_err(|source| NicError::Passt { index, source })?;
            helper = Some(Helper(child));
            Box::new(StreamBackend::new(ours).map_err(backend_error)?)
        }
    };
    let mac = config.mac.unwrap_or_else(MacAddress::random);
    Ok(Nic {
        device: VirtioNet::new(NetConfig {
            mac: mac.0,
            mtu: config.mtu,
            backend,
        }),
        mac,
        helper,
    })
}

/// Starts `passt` serving the guest on `socket` (its end of a socket pair), quitting when the
/// VMM's end closes.
fn spawn_passt(
    socket: OwnedFd,
    forwards: &[lodge_contract::PortForward],
) -> std::io::Result<Child> {
    let fd = socket.as_raw_fd();
    let mut command = Command::new("passt");
    command
        .args(["--foreground", "--quiet", "--one-off", "--fd"])
        .arg(fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // passt reports to syslog as well; its stderr notes (dropping root) are noise here.
        .stderr(Stdio::null());
    for forward in forwards {
        command
            .arg("--tcp-ports")
            .arg(format!("{}:{}", forward.host, forward.guest));
    }
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl on a descriptor the
    // child inherited, to keep it across exec.
    unsafe {
        command.pre_exec(move || {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    drop(socket);
    Ok(child)
}
