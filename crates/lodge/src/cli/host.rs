//! `lodge host info`: the host's capacity and what the VMs use of it.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use lodge_daemon::model::HostInfo;

use super::format::mib;
use super::{print_json, run_client, ClientArgs};

#[derive(Args, Debug)]
pub struct HostArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: HostCommand,
}

#[derive(Subcommand, Debug)]
enum HostCommand {
    /// CPUs, memory, overcommit policy and allocation.
    Info,
}

pub fn run(args: HostArgs) -> ExitCode {
    run_client(async move {
        let client = args.client.client();
        match args.command {
            HostCommand::Info => {
                let info: HostInfo = client.get("/v1/host").await?;
                if args.client.json {
                    return print_json(&info);
                }
                println!("lodge:        {}", info.version);
                println!(
                    "CPUs:         {} ({} vCPUs allocated{})",
                    info.cpus,
                    info.vcpus_allocated,
                    if info.cpu_overcommit {
                        ", overcommit allowed"
                    } else {
                        ""
                    }
                );
                println!(
                    "Memory:       {} (capacity {} at overcommit ratio {}; {} allocated)",
                    mib(info.memory_mib),
                    mib(info.memory_capacity_mib),
                    info.memory_overcommit_ratio,
                    mib(info.memory_allocated_mib)
                );
                println!(
                    "VMs:          {} defined, {} active",
                    info.vms_defined, info.vms_active
                );
                println!("Disks:        {}", info.disks);
                println!(
                    "KVM:          {}",
                    if info.kvm_present {
                        "/dev/kvm present"
                    } else {
                        "absent"
                    }
                );
                println!("State dir:    {}", info.state_dir);
                Ok(())
            }
        }
    })
}
