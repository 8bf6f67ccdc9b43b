//! `lodge`: run a VM in the foreground (`lodge run`), and (soon) the host daemon and its client.

mod cli;
mod guest_image;
mod image;
mod run;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

/// lodge: virtual machines for Linux hosts.
#[derive(Parser)]
#[command(name = "lodge", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground with its serial console on this terminal (Ctrl-A x quits).
    Run(Box<run::RunArgs>),
    /// Build (or find in the cache) the default guest image and print its directory.
    GuestImage,
    /// Root file system images of distributions (`lodge image create debian`).
    Image(image::ImageArgs),
    /// Run the host daemon: VM inventory, supervisor and REST API.
    Daemon(Box<cli::DaemonArgs>),
    /// Manage VMs through the daemon.
    Vm(Box<cli::VmArgs>),
    /// Manage disk images through the daemon.
    Disk(cli::DiskArgs),
    /// Manage networks (virtual switches) through the daemon.
    Network(cli::NetworkArgs),
    /// Show the daemon's host.
    Host(cli::HostArgs),
}

fn main() -> ExitCode {
    let start = Instant::now();
    init_logging();
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        lodge_vmm::console::restore_terminal();
        previous_hook(info);
    }));

    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(*args, start),
        Command::GuestImage => match guest_image::default_image() {
            Ok(image) => {
                println!("{}", image.dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lodge: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Image(args) => match image::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lodge: error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Daemon(args) => cli::run_daemon(*args),
        Command::Vm(args) => cli::run_vm(*args),
        Command::Disk(args) => cli::run_disk(args),
        Command::Network(args) => cli::run_network(args),
        Command::Host(args) => cli::run_host(args),
    }
}

/// Logs go to stderr; `LODGE_LOG` sets the filter (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LODGE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(RawModeStderr)
        .with_target(false)
        .init();
}

/// Stderr that keeps log lines readable while the terminal is raw for the guest console.
struct RawModeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RawModeStderr {
    type Writer = RawModeStderrWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RawModeStderrWriter
    }
}

struct RawModeStderrWriter;

impl std::io::Write for RawModeStderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lodge_vmm::console::write_host_text(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
