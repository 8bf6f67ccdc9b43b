//! `lodge vm …`: define, run and inspect VMs through the daemon.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use hyper::Method;
use lodge_contract::config::parse_memory;
use lodge_daemon::client::Client;
use lodge_daemon::model::{self, CreateVm, DiskAttachment, UpdateVm, Vm, VmState};

use super::format::{mib, table, Progress};
use super::{print_json, run_client, segment, ClientArgs};

#[derive(Args, Debug)]
pub struct VmArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Define a VM.
    Create(CreateArgs),
    /// List VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Start a VM and wait until it runs.
    Start {
        name: String,
        /// Return once the VMM process is started.
        #[arg(long)]
        no_wait: bool,
    },
    /// Ask the guest to shut down; force the VMM to stop after the timeout.
    Stop {
        name: String,
        /// Seconds the guest gets (default: the daemon's).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Return without waiting for the VM to stop.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the VMM now.
    Kill { name: String },
    /// Pause the vCPUs.
    Pause { name: String },
    /// Resume paused vCPUs.
    Resume { name: String },
    /// Stop gracefully and start again.
    Restart {
        name: String,
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete a VM (its disks stay).
    Delete {
        name: String,
        /// Kill it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Change settings of a stopped VM.
    Update(UpdateArgs),
    /// Attach to the serial console (detach with Ctrl-]).
    Console { name: String },
    /// Forward host TCP ports to the VM's first NIC (NAT networks).
    PortForward {
        #[command(subcommand)]
        command: PortForwardCommand,
    },
    /// Print the console log.
    Logs {
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(long, short)]
        follow: bool,
        /// Only the last N lines.
        #[arg(long, short = 'n', value_name = "N")]
        lines: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum PortForwardCommand {
    /// Forward HOST_PORT on the host to GUEST_PORT on the VM.
    Add {
        name: String,
        #[arg(value_name = "HOST_PORT:GUEST_PORT")]
        ports: String,
    },
    /// Remove the forward of HOST_PORT.
    Remove { name: String, host_port: u16 },
}

#[derive(Args, Debug)]
struct CreateArgs {
    name: String,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Add a virtio-rng device.
    #[arg(long)]
    rng: bool,
    /// Boot a distribution (debian): its root disk NAME-root is built from the image and
    /// attached first; the command waits until the disk is ready.
    #[arg(long, value_name = "debian")]
    image: Option<String>,
    /// Start it right away.
    #[arg(long)]
    start: bool,
}

#[derive(Args, Debug)]
struct UpdateArgs {
    name: String,
    #[command(flatten)]
    settings: SettingsArgs,
    /// Remove every disk (instead of `--disk`).
    #[arg(long, conflicts_with = "disk")]
    no_disks: bool,
    /// Add (true) or remove (false) the virtio-rng device.
    #[arg(long)]
    rng: Option<bool>,
}

/// The settings `create` and `update` share. At create, absent ones take the API's defaults;
/// at update, they stay as they are.
#[derive(Args, Debug, Default)]
struct SettingsArgs {
    /// Number of vCPUs (default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory, e.g. 256M or 1G; plain numbers are MiB (default 256M).
    #[arg(long)]
    memory: Option<String>,
    /// A disk from `lodge disk list`, NAME or NAME,ro (repeatable; the first is /dev/vda). At
    /// update, the list replaces the VM's.
    #[arg(long, value_name = "NAME[,ro]")]
    disk: Vec<String>,
    /// Kernel (vmlinux or bzImage) on the daemon's host; default: the default guest image (at
    /// update, an empty value returns to it).
    #[arg(long, value_name = "PATH")]
    kernel: Option<String>,
    #[arg(long, value_name = "PATH")]
    initrd: Option<String>,
    /// Kernel command line, replacing the default.
    #[arg(long)]
    cmdline: Option<String>,
    /// Added to the kernel command line (repeatable; at update, replaces the list).
    #[arg(long)]
    append: Vec<String>,
    /// kvm, emulator or auto (default auto).
    #[arg(long)]
    engine: Option<String>,
    /// A NIC on a network (repeatable; the first is eth0). At create, default: one on
    /// `default`; at update, the list replaces the VM's (a NIC that stays on its network keeps
    /// its MAC and address).
    #[arg(long, value_name = "NETWORK[,mac=M]", conflicts_with = "no_nic")]
    nic: Vec<String>,
    /// No network adapter (at update: remove them all).
    #[arg(long)]
    no_nic: bool,
}

pub fn run(args: VmArgs) -> ExitCode {
    run_client(async move {
        let client = args.client.client();
        let json_output = args.client.json;
        let vm_path = |name: &str| format!("/v1/vms/{}", segment(name));
        match args.command {
            VmCommand::Create(create) => {
                let start = create.start;
                let name = create.name.clone();
                let body = create_body(create)?;
                let mut vm: Vm = client.call(Method::POST, "/v1/vms", Some(&body)).await?;
                if body.image.is_some() {
                    wait_for_root_disk(&client, &name).await?;
                    vm = client.get(&vm_path(&name)).await?;
                }
                if start {
                    let vm = start_and_wait(&client, &name, false).await?;
                    return show(&vm, json_output);
                }
                show(&vm, json_output)
            }
            VmCommand::List => {
                let vms: Vec<Vm> = client.get("/v1/vms").await?;
                if json_output {
                    return print_json(&vms);
                }
                print!("{}", vm_table(&vms));
                Ok(())
            }
            VmCommand::Show { name } => {
                let vm: Vm = client.get(&vm_path(&name)).await?;
                show(&vm, json_output)
            }
            VmCommand::Start { name, no_wait } => {
                let vm = start_and_wait(&client, &name, no_wait).await?;
                report(&vm, json_output)
            }
            VmCommand::Stop {
                name,
                timeout,
                no_wait,
            } => {
                let mut vm = action(&client, &name, "stop", timeout).await?;
                if !no_wait {
                    vm = wait_for(&client, &name, "Stopping", |vm| !vm.state.is_active()).await?;
                }
                report(&vm, json_output)
            }
            VmCommand::Kill { name } => {
                report(&action(&client, &name, "kill", None).await?, json_output)
            }
            VmCommand::Pause { name } => {
                report(&action(&client, &name, "pause", None).await?, json_output)
            }
            VmCommand::Resume { name } => {
                report(&action(&client, &name, "resume", None).await?, json_output)
            }
            VmCommand::Restart {
                name,
                timeout,
                no_wait,
            } => {
                let before = action(&client, &name, "restart", timeout).await?;
                let old_pid = before.runtime.as_ref().map(|r| r.pid);
                let vm = if no_wait {
                    before
                } else {
                    wait_for(&client, &name, "Restarting", |vm| {
                        vm.state == VmState::Crashed
                            || (vm.state == VmState::Running
                                && vm.runtime.as_ref().map(|r| r.pid) != old_pid)
                    })
                    .await?
                };
                report(&vm, json_output)
            }
            VmCommand::Delete { name, force } => {
                let query = if force { "?force=true" } else { "" };
                client
                    .call_empty(Method::DELETE, &format!("{}{query}", vm_path(&name)))
                    .await?;
                if !json_output {
                    println!("Deleted {name}");
                }
                Ok(())
            }
            VmCommand::Update(update) => {
                let name = update.name.clone();
                let body = update_body(update)?;
                let vm: Vm = client
                    .call(Method::PATCH, &vm_path(&name), Some(&body))
                    .await?;
                show(&vm, json_output)
            }
            VmCommand::Console { name } => {
                super::console::attach(&client, &format!("{}/console", vm_path(&name)), &name).await
            }
            VmCommand::PortForward { command } => {
                let vm: Vm = match command {
                    PortForwardCommand::Add { name, ports } => {
                        let forward = parse_forward(&ports)?;
                        client
                            .call(
                                Method::POST,
                                &format!("{}/port-forwards", vm_path(&name)),
                                Some(&forward),
                            )
                            .await?
                    }
                    PortForwardCommand::Remove { name, host_port } => {
                        client
                            .call::<Vm>(
                                Method::DELETE,
                                &format!("{}/port-forwards/{host_port}", vm_path(&name)),
                                None::<&()>,
                            )
                            .await?
                    }
                };
                show(&vm, json_output)
            }
            VmCommand::Logs {
                name,
                follow,
                lines,
            } => {
                let mut query = vec![];
                if follow {
                    query.push("follow=true".to_owned());
                }
                if let Some(lines) = lines {
                    query.push(format!("lines={lines}"));
                }
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                let mut body = client
                    .stream(&format!("{}/logs{query}", vm_path(&name)))
                    .await?;
                let mut stdout = std::io::stdout();
                while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                    if let Ok(data) = frame.context("Reading the log failed")?.into_data() {
                        stdout.write_all(&data)?;
                        stdout.flush()?;
                    }
                }
                Ok(())
            }
        }
    })
}

fn create_body(args: CreateArgs) -> anyhow::Result<CreateVm> {
    let settings = args.settings;
    Ok(CreateVm {
        name: args.name,
        cpus: settings.cpus.unwrap_or_else(model::default_cpus),
        memory_mib: match &settings.memory {
            Some(memory) => memory_mib(memory)?,
            None => model::default_memory_mib(),
        },
        disks: parse_disks(&settings.disk)?,
        kernel: settings.kernel,
        initrd: settings.initrd,
        cmdline: settings.cmdline,
        append: settings.append,
        engine: settings
            .engine
            .as_deref()
            .map(str::parse)
            .transpose()?
            .unwrap_or_default(),
        rng: args.rng,
        image: args.image,
        nics: nic_list(&settings.nic, settings.no_nic)?,
    })
}

/// `--nic`s and `--no-nic` as the API's NIC list (None: not given).
fn nic_list(nics: &[String], none: bool) -> anyhow::Result<Option<Vec<model::NicRequest>>> {
    if none {
        return Ok(Some(Vec::new()));
    }
    if nics.is_empty() {
        return Ok(None);
    }
    nics.iter()
        .map(|nic| parse_nic(nic))
        .collect::<anyhow::Result<_>>()
        .map(Some)
}

/// `HOST_PORT:GUEST_PORT`.
fn parse_forward(text: &str) -> anyhow::Result<model::PortForward> {
    let parsed = text
        .split_once(':')
        .and_then(|(host, guest)| Some((host.parse().ok()?, guest.parse().ok()?)));
    match parsed {
        Some((host_port, guest_port)) if host_port > 0 && guest_port > 0 => {
            Ok(model::PortForward {
                host_port,
                guest_port,
            })
        }
        _ => anyhow::bail!("Invalid port forward '{text}' (expected HOST_PORT:GUEST_PORT)"),
    }
}

/// `NETWORK[,mac=M]`.
fn parse_nic(text: &str) -> anyhow::Result<model::NicRequest> {
    let (network, mac) = match text.split_once(',') {
        None => (text, None),
        Some((network, option)) => match option.strip_prefix("mac=") {
            Some(mac) => (network, Some(mac.to_owned())),
            None => anyhow::bail!("Invalid NIC '{text}' (expected NETWORK or NETWORK,mac=M)"),
        },
    };
    if network.is_empty() {
        anyhow::bail!("Invalid NIC '{text}' (expected NETWORK or NETWORK,mac=M)");
    }
    Ok(model::NicRequest {
        network: network.to_owned(),
        mac,
    })
}

/// Waits for the root disk of a VM created from an image, showing the build's progress.
async fn wait_for_root_disk(client: &lodge_daemon::client::Client, vm: &str) -> anyhow::Result<()> {
    let path = format!("/v1/disks/{}", segment(&format!("{vm}-root")));
    let started = std::time::Instant::now();
    let mut last_report = 0;
    loop {
        let disk: model::Disk = client.get(&path).await?;
        match disk.state {
            model::DiskState::Ready => {
                eprintln!(
                    "lodge: root disk {} ready after {} s",
                    disk.name,
                    started.elapsed().as_secs()
                );
                return Ok(());
            }
            model::DiskState::Failed => anyhow::bail!(
                "The root disk {} could not be built: {}",
                disk.name,
                disk.error.unwrap_or_default()
            ),
            _ => {}
        }
        let elapsed = started.elapsed().as_secs();
        if elapsed >= last_report + 15 {
            last_report = elapsed;
            eprintln!("lodge: building root disk {} ({elapsed} s)", disk.name);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn update_body(args: UpdateArgs) -> anyhow::Result<UpdateVm> {
    let settings = args.settings;
    let update = UpdateVm {
        cpus: settings.cpus,
        memory_mib: settings.memory.as_deref().map(memory_mib).transpose()?,
        disks: (!settings.disk.is_empty() || args.no_disks)
            .then(|| parse_disks(&settings.disk))
            .transpose()?,
        kernel: settings.kernel,
        initrd: settings.initrd,
        cmdline: settings.cmdline,
        append: (!settings.append.is_empty()).then_some(settings.append),
        engine: settings.engine.as_deref().map(str::parse).transpose()?,
        rng: args.rng,
        nics: nic_list(&settings.nic, settings.no_nic)?,
    };
    if update == UpdateVm::default() {
        anyhow::bail!("Nothing to change: give at least one setting");
    }
    Ok(update)
}

/// `--memory` in the API's unit: `512M`, `2G`, or a plain number of MiB.
fn memory_mib(text: &str) -> anyhow::Result<u64> {
    let size = parse_memory(text)?;
    if !size.bytes().is_multiple_of(1 << 20) {
        anyhow::bail!("Memory size '{text}' is not a whole number of MiB");
    }
    Ok(size.mib())
}

fn parse_disks(disks: &[String]) -> anyhow::Result<Vec<DiskAttachment>> {
    disks
        .iter()
        .map(|text| {
            let (disk, options) = match text.split_once(',') {
                Some((disk, options)) => (disk, Some(options)),
                None => (text.as_str(), None),
            };
            let read_only = match options {
                None => false,
                Some("ro" | "readonly" | "read-only") => true,
                Some(other) => anyhow::bail!("Unknown disk option '{other}' (expected ro)"),
            };
            Ok(DiskAttachment {
                disk: disk.to_owned(),
                read_only,
            })
        })
        .collect()
}

/// POSTs `/v1/vms/NAME/VERB`, with the graceful-stop timeout for the verbs that take one.
async fn action(
    client: &Client,
    name: &str,
    verb: &str,
    timeout: Option<u64>,
) -> anyhow::Result<Vm> {
    let query = timeout.map_or(String::new(), |t| format!("?timeout={t}"));
    let path = format!("/v1/vms/{}/{verb}{query}", segment(name));
    Ok(client.call(Method::POST, &path, None::<&()>).await?)
}

async fn start_and_wait(client: &Client, name: &str, no_wait: bool) -> anyhow::Result<Vm> {
    let vm = action(client, name, "start", None).await?;
    if no_wait {
        return Ok(vm);
    }
    let vm = wait_for(client, name, "Starting", |vm| vm.state != VmState::Starting).await?;
    if vm.state == VmState::Crashed {
        let reason = vm
            .last_exit
            .as_ref()
            .map_or("unknown reason", |exit| exit.reason.as_str());
        anyhow::bail!("VM '{name}' crashed while starting: {reason}");
    }
    Ok(vm)
}

/// Polls the VM, showing progress, until `done`.
async fn wait_for(
    client: &Client,
    name: &str,
    doing: &str,
    done: impl Fn(&Vm) -> bool,
) -> anyhow::Result<Vm> {
    let path = format!("/v1/vms/{}", segment(name));
    let mut progress = Progress::new();
    loop {
        let vm: Vm = client.get(&path).await?;
        if done(&vm) {
            progress.finish();
            return Ok(vm);
        }
        let hint = if vm.state == VmState::Starting
            && vm.settings.kernel.is_none()
            && progress.elapsed() > Duration::from_secs(5)
        {
            " — the first start builds the default guest image, which takes minutes"
        } else {
            ""
        };
        progress.update(&format!("{doing} {name}: {}{hint}", vm.state));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One line after an action, or the JSON.
fn report(vm: &Vm, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        return print_json(vm);
    }
    match &vm.last_exit {
        Some(exit) if !vm.state.is_active() => {
            println!("{}: {} ({})", vm.name, vm.state, exit.reason)
        }
        _ => println!("{}: {}", vm.name, vm.state),
    }
    Ok(())
}

fn show(vm: &Vm, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        return print_json(vm);
    }
    let settings = &vm.settings;
    let disks: Vec<String> = settings
        .disks
        .iter()
        .map(|d| {
            if d.read_only {
                format!("{} (ro)", d.disk)
            } else {
                d.disk.clone()
            }
        })
        .collect();
    let mut lines = vec![
        ("Name", vm.name.clone()),
        ("State", vm.state.to_string()),
        ("vCPUs", settings.cpus.to_string()),
        ("Memory", mib(settings.memory_mib)),
        ("Engine", settings.engine.to_string()),
        (
            "Disks",
            if disks.is_empty() {
                "-".into()
            } else {
                disks.join(", ")
            },
        ),
        (
            "Kernel",
            settings
                .kernel
                .clone()
                .unwrap_or_else(|| "default guest image".into()),
        ),
    ];
    if let Some(initrd) = &settings.initrd {
        lines.push(("Initrd", initrd.clone()));
    }
    if let Some(cmdline) = &settings.cmdline {
        lines.push(("Cmdline", cmdline.clone()));
    }
    if !settings.append.is_empty() {
        lines.push(("Append", settings.append.join(" ")));
    }
    if settings.rng {
        lines.push(("RNG", "yes".into()));
    }
    for (index, nic) in settings.nics.iter().enumerate() {
        lines.push((
            "NIC",
            format!("eth{index} on {}: {} {}", nic.network, nic.mac, nic.address),
        ));
    }
    for forward in &settings.port_forwards {
        lines.push((
            "Forward",
            format!("host port {} -> {}", forward.host_port, forward.guest_port),
        ));
    }
    lines.push(("Created", vm.created_at.clone()));
    if let Some(runtime) = &vm.runtime {
        lines.push(("PID", runtime.pid.to_string()));
        lines.push(("Started", runtime.started_at.clone()));
        if let Some(engine) = &runtime.engine {
            lines.push(("Running on", engine.to_string()));
        }
        if let Some(boot) = runtime.boot_time_ms {
            lines.push(("Boot time", format!("{boot} ms")));
        }
    }
    if let Some(exit) = &vm.last_exit {
        let status = exit
            .status
            .map_or(String::new(), |s| format!(", status {s}"));
        lines.push((
            "Last exit",
            format!("{} ({}{status})", exit.reason, exit.at),
        ));
    }
    for (key, value) in lines {
        println!("{:<11} {value}", format!("{key}:"));
    }
    if let Some(tail) = vm.last_exit.as_ref().and_then(|e| e.console_tail.as_ref()) {
        println!("Console (end):");
        for line in tail
            .lines()
            .rev()
            .take(15)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("  {line}");
        }
    }
    Ok(())
}

fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                vm.name.clone(),
                vm.state.to_string(),
                vm.settings.cpus.to_string(),
                mib(vm.settings.memory_mib),
                vm.settings.disks.len().to_string(),
                vm.runtime.as_ref().and_then(|r| r.engine).map_or_else(
                    || vm.settings.engine.to_string(),
                    |engine| engine.to_string(),
                ),
                vm.runtime
                    .as_ref()
                    .map_or("-".into(), |r| r.pid.to_string()),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "VCPUS", "MEMORY", "DISKS", "ENGINE", "PID"],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_with_read_only() {
        let disks = parse_disks(&["root".into(), "data,ro".into()]).unwrap();
        assert_eq!(
            disks[0],
            DiskAttachment {
                disk: "root".into(),
                read_only: false
            }
        );
        assert!(disks[1].read_only);
        assert!(parse_disks(&["x,rw".into()]).is_err());
    }

    #[test]
    fn update_needs_a_setting() {
        let args = UpdateArgs {
            name: "a".into(),
            settings: SettingsArgs::default(),
            no_disks: false,
            rng: None,
        };
        assert!(update_body(args).is_err());
    }

    #[test]
    fn memory_is_sent_in_whole_mib() {
        assert_eq!(memory_mib("512").unwrap(), 512);
        assert_eq!(memory_mib("2G").unwrap(), 2048);
        assert!(memory_mib("1500K").is_err());
        assert!(memory_mib("lots").is_err());
    }
}
