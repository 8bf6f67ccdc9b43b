//! The daemon's settings and where it keeps things on disk.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default directory of the database and disk images.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/lodge";
/// Default directory of sockets and other runtime files.
pub const DEFAULT_RUN_DIR: &str = "/run/lodge";
/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/lodge/lodge.sock";

/// Everything `lodge daemon` can be told.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Durable state: `lodge.db`, `images/`, `vms/<id>/` (console log, exit report, VMM log).
    pub state_dir: PathBuf,
    /// Runtime state: `vms/<id>/` (control and console sockets, pidfile).
    pub run_dir: PathBuf,
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// Also serve the API on TCP, with a bearer token.
    pub tcp: Option<TcpListen>,
    /// The program run as `<vmm_binary> run --config VM.json` for each VM.
    pub vmm_binary: PathBuf,
    /// Active VMs may use together at most host memory × this ratio.
    pub memory_overcommit: f64,
    /// A VM may have more vCPUs than the host has CPUs.
    pub cpu_overcommit: bool,
    /// Time a guest gets to shut down after a graceful stop before it is forced.
    pub stop_timeout: Duration,
    /// Size at which each VM's console log rotates (one old file is kept).
    pub console_log_limit: u64,
    /// Largest request body accepted.
    pub body_limit: usize,
    /// Manage bridges, taps, DHCP and nftables rules for VM networks. Off: no host network
    /// changes at all, and VMs with NICs are refused.
    pub host_network: bool,
}

/// The API on TCP.
#[derive(Debug, Clone)]
pub struct TcpListen {
    pub addr: SocketAddr,
    /// Clients send `Authorization: Bearer <token>`.
    pub token: String,
}

impl DaemonConfig {
    /// Defaults with the given directories; the socket goes in the run directory.
    pub fn new(state_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        let run_dir = run_dir.into();
        Self {
            state_dir: state_dir.into(),
            socket: run_dir.join("lodge.sock"),
            run_dir,
            tcp: None,
            vmm_binary: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lodge")),
            memory_overcommit: 1.0,
            cpu_overcommit: false,
            stop_timeout: Duration::from_secs(30),
            console_log_limit: 1 << 20,
            body_limit: 64 << 10,
            host_network: true,
        }
    }

    pub fn paths(&self) -> Paths {
        Paths {
            state_dir: self.state_dir.clone(),
            run_dir: self.run_dir.clone(),
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self::new(DEFAULT_STATE_DIR, DEFAULT_RUN_DIR)
    }
}

/// File layout under the state and run directories. Per-VM directories are named by the
/// VM's id, not its name, to keep socket paths short (Unix socket paths are limited to 107
/// bytes).
#[derive(Debug, Clone)]
pub struct Paths {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Paths {
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("lodge.db")
    }

    /// Held (flock) while a daemon uses this state directory.
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir.join("lodge.lock")
    }

    pub fn images(&self) -> PathBuf {
        self.state_dir.join("images")
    }

    pub fn image(&self, disk_name: &str) -> PathBuf {
        self.images().join(format!("{disk_name}.raw"))
    }

    pub fn vm(&self, id: i64) -> VmPaths {
        VmPaths {
            data: self.state_dir.join("vms").join(id.to_string()),
            run: self.run_dir.join("vms").join(id.to_string()),
        }
    }
}

/// One VM's files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// Under the state directory: survives reboots.
    pub data: PathBuf,
    /// Under the run directory.
    pub run: PathBuf,
}

impl VmPaths {
    /// The `lodge run --config` file.
    pub fn vmm_config(&self) -> PathBuf {
        self.data.join("vm.json")
    }

    pub fn console_log(&self) -> PathBuf {
        self.data.join("console.log")
    }

    /// Where the console log rotates to.
    pub fn console_log_old(&self) -> PathBuf {
        rotated(&self.console_log())
    }

    pub fn exit_file(&self) -> PathBuf {
        self.data.join("exit.json")
    }

    /// The VMM process's stdout and stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.data.join("vmm.log")
    }

    pub fn api_socket(&self) -> PathBuf {
        self.run.join("api.sock")
    }

    pub fn console_socket(&self) -> PathBuf {
        self.run.join("console.sock")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.run.join("vmm.pid")
    }
}

/// `P` → `P.1`.
pub fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}
