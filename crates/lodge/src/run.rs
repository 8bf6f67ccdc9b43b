//! `lodge run`: one VM in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use lodge_contract::config::{parse_memory, parse_vcpus};
use lodge_contract::{
    limits, ConsoleConfig, DiskConfig, EngineChoice, ExitRecord, NicConfig, VmConfig,
};
use lodge_vmm::console::{write_host_text, RawTerminal};
use lodge_vmm::{engine_select, supervision};
use lodge_vmm::{ExitReason, Machine, MachineOptions};

use crate::{guest_image, image};

/// Exit status for invalid flags or configuration.
const USAGE_ERROR: u8 = 2;

/// Flags of `lodge run`. Values are parsed here rather than by clap so every validation error
/// is one line in the same form.
#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// JSON VM configuration; flags given as well override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel (vmlinux or bzImage). Default: the default guest image, built when missing.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs. Default with the default kernel: its initramfs.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long, value_name = "ARGS")]
    cmdline: Option<String>,
    /// Arguments added to the kernel command line (repeatable).
    #[arg(long, value_name = "ARGS")]
    append: Vec<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    cpus: Option<String>,
    /// Guest memory, e.g. 256M or 1G.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Disk image as virtio-blk, PATH or PATH,readonly (repeatable; the first is /dev/vda).
    #[arg(long, value_name = "PATH[,readonly]")]
    disk: Vec<String>,
    /// Add a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// A network adapter (repeatable; the first is eth0): tap=NAME, fd=N, or
    /// user[,hostfwd=tcp:HOST:GUEST]... (passt, no root needed); then [,mac=M][,mtu=N].
    #[arg(long, value_name = "BACKEND[,OPTIONS]")]
    net: Vec<String>,
    /// CPU engine: kvm, emulator or auto.
    #[arg(long, value_name = "ENGINE")]
    engine: Option<String>,
    /// Serial console: stdio, file:PATH or none.
    #[arg(long, value_name = "WHERE")]
    console: Option<String>,
    /// Boot a distribution: `debian` (a private copy of the cached image, built on first use,
    /// removed when the VM ends) or an image file (used in place, read-write). It becomes the
    /// first disk and the root file system; the default kernel boots it without an initramfs.
    #[arg(long, value_name = "debian|PATH")]
    image: Option<String>,
}

/// Runs the VM and turns the outcome into the process exit status (and the exit file, when
/// the configuration names one).
pub fn run(args: RunArgs, start: Instant) -> ExitCode {
    // The VM's private image copy, if any, lives until the VM ends.
    let (config, _image_copy) = match build_config(args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lodge: error: {e:#}");
            return ExitCode::from(USAGE_ERROR);
        }
    };
    let (reason, status, boot_time_ms) = run_config(&config, start);
    if let Some(path) = &config.supervision.exit_file {
        let record = ExitRecord {
            reason,
            status: i32::from(status),
            boot_time_ms,
        };
        if let Err(e) = record.write(path) {
            eprintln!(
                "lodge: error: Cannot write exit file {}: {e}",
                path.display()
            );
        }
    }
    ExitCode::from(status)
}

/// Validates, builds and runs the VM; returns why it ended, the exit status and the boot time.
fn run_config(config: &VmConfig, start: Instant) -> (String, u8, Option<u64>) {
    let fail = |status: u8, message: String| {
        eprintln!("lodge: error: {message}");
        (message, status, None)
    };
    let machine_config = &config.machine;
    if let Err(e) = machine_config.validate(limits::host_memory()) {
        return fail(USAGE_ERROR, e.to_string());
    }
    let selected = match engine_select::select(machine_config.engine) {
        Ok(selected) => selected,
        Err(e) => return fail(1, e.to_string()),
    };
    eprintln!(
        "lodge: engine {} ({})",
        selected.engine.kind(),
        selected.reason
    );
    let stdio = machine_config.console == ConsoleConfig::Stdio;
    let options = MachineOptions {
        start,
        console_input: stdio,
        handle_signals: true,
    };
    let mut machine = match Machine::build(machine_config, selected.engine.as_ref(), options) {
        Ok(machine) => machine,
        Err(e) => return fail(1, format!("{:#}", anyhow::Error::new(e))),
    };
    if let Err(e) = supervision::attach(&mut machine, &config.supervision) {
        return fail(1, format!("{:#}", anyhow::Error::new(e)));
    }
    tracing::debug!(cmdline = machine.cmdline(), "Booting");
    let terminal = if stdio { RawTerminal::enter() } else { None };
    if terminal.is_some() {
        eprintln!("lodge: console attached; Ctrl-A x quits\r");
    }
    let result = machine.run();
    drop(terminal);
    match result {
        Ok(summary) => {
            let boot_time_ms = summary.boot_time.map(|t| t.as_millis() as u64);
            if let Some(ms) = boot_time_ms {
                message(&format!("guest userspace started after {ms} ms"));
            }
            match &summary.reason {
                ExitReason::EngineFailure(_) | ExitReason::TripleFault(_) => {
                    tracing::error!("{}", summary.reason);
                }
                reason => message(&reason.to_string()),
            }
            let status = summary.reason.exit_status() as u8;
            (summary.reason.to_string(), status, boot_time_ms)
        }
        Err(e) => {
            let text = format!("{:#}", anyhow::Error::new(e));
            tracing::error!("{text}");
            (text, 1, None)
        }
    }
}

/// Merges the config file (if any), the default guest image and the flags; returns the
/// private image copy `--image NAME` made, which must outlive the VM.
fn build_config(args: RunArgs) -> anyhow::Result<(VmConfig, Option<image::PrivateCopy>)> {
    let mut config = match &args.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
    };
    let machine = &mut config.machine;
    if let Some(kernel) = args.kernel {
        machine.kernel = kernel;
    }
    let root_image = args.image.as_deref().map(image::RootImage::parse);
    if machine.uses_default_kernel() {
        let image = guest_image::default_image()?;
        machine.kernel = image.kernel;
        // A root image brings its own init: no initramfs.
        if args.initrd.is_none() && machine.initrd.is_none() && root_image.is_none() {
            machine.initrd = Some(image.initrd);
        }
    }
    let mut image_copy = None;
    if let Some(root_image) = root_image {
        let path = match root_image {
            image::RootImage::File(path) => path,
            image::RootImage::Distribution(name) => {
                let copy = image::private_copy(&name)?;
                let path = copy.path.clone();
                image_copy = Some(copy);
                path
            }
        };
        machine.disks.insert(
            0,
            DiskConfig {
                path,
                read_only: false,
            },
        );
        machine.root_disk = true;
    }
    if let Some(initrd) = args.initrd {
        machine.initrd = Some(initrd);
    }
    if let Some(cmdline) = args.cmdline {
        machine.cmdline = Some(cmdline);
    }
    machine.append.extend(args.append);
    if let Some(cpus) = args.cpus {
        machine.cpus = parse_vcpus(&cpus)?;
    }
    if let Some(memory) = args.memory {
        machine.memory = parse_memory(&memory)?;
    }
    for disk in args.disk {
        machine.disks.push(disk.parse::<DiskConfig>()?);
    }
    if args.rng {
        machine.rng = true;
    }
    for nic in args.net {
        machine.nics.push(nic.parse::<NicConfig>()?);
    }
    if let Some(engine) = args.engine {
        machine.engine = engine.parse::<EngineChoice>()?;
    }
    if let Some(console) = args.console {
        machine.console = console.parse::<ConsoleConfig>()?;
    }
    Ok((config, image_copy))
}

fn message(text: &str) {
    let _ = write_host_text(format!("lodge: {text}\n").as_bytes());
}
