//! The client side of the daemon: `lodge daemon` runs it, `lodge vm|disk|host …` talk to its
//! API (human tables by default, `--json` for scripts; non-zero exit status with the API's
//! message on failure).

mod console;
mod daemon;
mod disk;
mod format;
mod host;
mod network;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lodge_daemon::client::{Client, Endpoint};
use lodge_daemon::config::DEFAULT_SOCKET;

pub use daemon::{run as run_daemon, DaemonArgs};
pub use disk::{run as run_disk, DiskArgs};
pub use host::{run as run_host, HostArgs};
pub use network::{run as run_network, NetworkArgs};
pub use vm::{run as run_vm, VmArgs};

/// How to reach the daemon, and how to print.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon's API socket.
    #[arg(long, global = true, env = "LODGE_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Reach the daemon over TCP at HOST:PORT instead, with the token from LODGE_TOKEN.
    #[arg(long, global = true, env = "LODGE_HOST", value_name = "HOST:PORT")]
    host: Option<String>,
    /// Bearer token for TCP.
    #[arg(long, global = true, env = "LODGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

impl ClientArgs {
    fn client(&self) -> Client {
        match &self.host {
            Some(address) => Client::new(Endpoint::Tcp {
                address: address.clone(),
                token: self.token.clone(),
            }),
            None => Client::unix(&self.socket),
        }
    }
}

/// Runs a client command on a small runtime and maps errors to the exit status.
fn run_client<F>(command: F) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&anyhow::anyhow!(e)),
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    eprintln!("lodge: error: {error:#}");
    ExitCode::FAILURE
}

/// Prints a value as pretty JSON.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Escapes a path segment (names are validated by the daemon; this keeps odd input from
/// changing the request path).
fn segment(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
