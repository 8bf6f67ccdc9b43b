//! `lodge daemon`: the host service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use lodge_daemon::config::{TcpListen, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR};
use lodge_daemon::DaemonConfig;

/// Flags of `lodge daemon`.
#[derive(Args, Debug)]
pub struct DaemonArgs {
    /// Database, disk images and VM logs.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Sockets and other runtime files.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// The API socket (default: RUN_DIR/lodge.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Also serve the API on TCP at this address; needs a token.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// File holding the bearer token for TCP clients (or set LODGE_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Active VMs may use together at most host memory × this ratio.
    #[arg(long, value_name = "RATIO", default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Allow VMs with more vCPUs than the host has CPUs.
    #[arg(long)]
    cpu_overcommit: bool,
    /// Seconds a guest gets to shut down on `vm stop` before it is forced.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    stop_timeout: u64,
    /// Size at which a VM's console log rotates.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 20)]
    console_log_limit: u64,
    /// The program run for each VM as `PROGRAM run --config FILE` (default: this lodge).
    #[arg(long, value_name = "PATH", hide = true)]
    vmm_binary: Option<PathBuf>,
}

pub fn run(args: DaemonArgs) -> ExitCode {
    match config(args).map(lodge_daemon::run) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => super::fail(&anyhow::Error::new(e)),
        Err(e) => super::fail(&e),
    }
}

fn config(args: DaemonArgs) -> anyhow::Result<DaemonConfig> {
    if !(args.memory_overcommit > 0.0 && args.memory_overcommit.is_finite()) {
        anyhow::bail!("Invalid memory overcommit ratio {}", args.memory_overcommit);
    }
    let mut config = DaemonConfig::new(args.state_dir, &args.run_dir);
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    if let Some(addr) = args.listen {
        let token = match args.token_file {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("Cannot read token file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            None => std::env::var("LODGE_TOKEN").unwrap_or_default(),
        };
        if token.len() < 16 {
            anyhow::bail!("--listen needs a bearer token of at least 16 characters (--token-file or LODGE_TOKEN)");
        }
        config.tcp = Some(TcpListen { addr, token });
    }
    if let Some(vmm) = args.vmm_binary {
        config.vmm_binary = vmm;
    }
    config.memory_overcommit = args.memory_overcommit;
    config.cpu_overcommit = args.cpu_overcommit;
    config.stop_timeout = Duration::from_secs(args.stop_timeout);
    config.console_log_limit = args.console_log_limit;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use lodge_daemon::vmm::{ConsoleLog, VmmConfig, VmmDisk};

    /// The file the daemon writes for `lodge run --config` parses as the VMM's own
    /// configuration (which denies unknown fields), with every field in place.
    #[test]
    fn daemon_vmm_config_is_a_valid_vm_config() {
        let config = VmmConfig {
            kernel: PathBuf::new(),
            initrd: Some("/boot/initrd".into()),
            cmdline: Some("console=ttyS0".into()),
            append: vec!["quiet".into()],
            cpus: 2,
            memory: 512,
            disks: vec![VmmDisk {
                path: "/var/lib/lodge/images/root.raw".into(),
                read_only: true,
            }],
            rng: true,
            engine: "emulator".into(),
            console: "none".into(),
            api_socket: "/run/lodge/vms/1/api.sock".into(),
            console_log: ConsoleLog {
                path: "/var/lib/lodge/vms/1/console.log".into(),
                limit: 4096,
            },
            console_socket: "/run/lodge/vms/1/console.sock".into(),
            exit_file: "/var/lib/lodge/vms/1/exit.json".into(),
        };
        let json = serde_json::to_string(&config).unwrap();
        let parsed: lodge_vmm::VmConfig = serde_json::from_str(&json).unwrap();
        assert!(
            parsed.kernel.as_os_str().is_empty(),
            "empty kernel means the default guest"
        );
        assert_eq!(parsed.cpus, 2);
        assert_eq!(parsed.memory.bytes(), 512 << 20);
        assert_eq!(parsed.engine, lodge_vmm::config::EngineChoice::Emulator);
        assert_eq!(parsed.console, lodge_vmm::config::ConsoleConfig::None);
        assert!(parsed.disks[0].read_only);
        assert_eq!(parsed.api_socket, Some(config.api_socket.clone()));
        assert_eq!(parsed.console_socket, Some(config.console_socket.clone()));
        assert_eq!(parsed.exit_file, Some(config.exit_file.clone()));
        let log = parsed.console_log.unwrap();
        assert_eq!((log.path, log.limit), (config.console_log.path, 4096));
    }

    /// The exit report the VMM writes is what the daemon reads.
    #[test]
    fn vmm_exit_report_is_readable_by_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        let record = lodge_vmm::exit::ExitRecord {
            reason: "Guest triple fault".into(),
            status: 1,
            boot_time_ms: Some(812),
        };
        record.write(&path).unwrap();
        let report = lodge_daemon::vmm::read_exit_report(&path).expect("report parses");
        assert_eq!(
            (report.reason.as_str(), report.status, report.boot_time_ms),
            ("Guest triple fault", 1, Some(812))
        );
    }
}
