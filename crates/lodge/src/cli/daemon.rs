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
    /// Leave the host's network alone: no bridges, taps, DHCP or nftables rules, and VMs
    /// with NICs are refused.
    #[arg(long)]
    no_host_network: bool,
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
    config.host_network = !args.no_host_network;
    config.console_log_limit = args.console_log_limit;
    Ok(config)
}
