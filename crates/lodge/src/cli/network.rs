//! `lodge network …`: virtual switches on the daemon's host.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use lodge_daemon::model::{CreateNetwork, Network, NetworkMode};

use super::format::table;
use super::{print_json, run_client, segment, ClientArgs};

#[derive(Args, Debug)]
pub struct NetworkArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: NetworkCommand,
}

#[derive(Subcommand, Debug)]
enum NetworkCommand {
    /// Create a network: a bridge, a DHCP server and NAT (default) or isolation rules.
    Create {
        name: String,
        /// IPv4 subnet, /16 to /29, e.g. 10.10.0.0/24; the host takes the first address.
        #[arg(long)]
        subnet: String,
        /// Guests reach outside through the host (the default).
        #[arg(long, conflicts_with = "isolated")]
        nat: bool,
        /// Guests reach only each other.
        #[arg(long)]
        isolated: bool,
    },
    /// List networks.
    List,
    /// Show a network and its leases.
    Show { name: String },
    /// Delete a network (refused while a VM has a NIC on it).
    Delete { name: String },
}

pub fn run(args: NetworkArgs) -> ExitCode {
    run_client(async move {
        let client = args.client.client();
        let json_output = args.client.json;
        match args.command {
            NetworkCommand::Create {
                name,
                subnet,
                nat: _,
                isolated,
            } => {
                let body = CreateNetwork {
                    name,
                    subnet,
                    mode: if isolated {
                        NetworkMode::Isolated
                    } else {
                        NetworkMode::Nat
                    },
                };
                let network: Network = client
                    .call(Method::POST, "/v1/networks", Some(&body))
                    .await?;
                show(&network, json_output)
            }
            NetworkCommand::List => {
                let networks: Vec<Network> = client.get("/v1/networks").await?;
                if json_output {
                    return print_json(&networks);
                }
                let rows: Vec<Vec<String>> = networks
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            n.subnet.clone(),
                            n.mode.as_str().to_owned(),
                            n.bridge.clone(),
                            n.leases.len().to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["NAME", "SUBNET", "MODE", "BRIDGE", "NICS"], &rows)
                );
                Ok(())
            }
            NetworkCommand::Show { name } => {
                let network: Network = client
                    .get(&format!("/v1/networks/{}", segment(&name)))
                    .await?;
                show(&network, json_output)
            }
            NetworkCommand::Delete { name } => {
                client
                    .call_empty(Method::DELETE, &format!("/v1/networks/{}", segment(&name)))
                    .await?;
                if !json_output {
                    println!("Deleted {name}");
                }
                Ok(())
            }
        }
    })
}

fn show(network: &Network, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        return print_json(network);
    }
    println!("Name:    {}", network.name);
    println!("Subnet:  {}", network.subnet);
    println!("Mode:    {}", network.mode.as_str());
    println!("Gateway: {}", network.gateway);
    println!("Bridge:  {}", network.bridge);
    if network.leases.is_empty() {
        println!("Leases:  -");
    } else {
        let rows: Vec<Vec<String>> = network
            .leases
            .iter()
            .map(|l| vec![l.vm.clone(), l.mac.clone(), l.address.clone()])
            .collect();
        print!("{}", table(&["VM", "MAC", "ADDRESS"], &rows));
    }
    Ok(())
}
