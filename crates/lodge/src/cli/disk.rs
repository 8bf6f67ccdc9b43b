//! `lodge disk …`: raw disk images in the daemon's storage directory.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use hyper::Method;
use lodge_contract::{ByteSize, SizeUnit};
use lodge_daemon::model::{CreateDisk, Disk, DiskState};

use super::format::{bytes, table, Progress};
use super::{print_json, run_client, segment, ClientArgs};

#[derive(Args, Debug)]
pub struct DiskArgs {
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: DiskCommand,
}

#[derive(Subcommand, Debug)]
enum DiskCommand {
    /// Create a blank (sparse) raw image.
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
    },
    /// Copy a raw image from a path on the daemon's host (holes stay holes).
    Import {
        name: String,
        /// The image's path on the daemon's host.
        source: String,
        /// Return without waiting for the copy.
        #[arg(long)]
        no_wait: bool,
    },
    /// List disks.
    List,
    /// Show one disk.
    Show { name: String },
    /// Delete a disk and its image (refused while attached to a VM).
    Delete { name: String },
}

pub fn run(args: DiskArgs) -> ExitCode {
    run_client(async move {
        let client = args.client.client();
        let json_output = args.client.json;
        match args.command {
            DiskCommand::Create { name, size } => {
                let body = CreateDisk {
                    name,
                    size_bytes: Some(ByteSize::parse(&size, SizeUnit::Byte)?.bytes()),
                    source: None,
                };
                let disk: Disk = client.call(Method::POST, "/v1/disks", Some(&body)).await?;
                show(&disk, json_output)
            }
            DiskCommand::Import {
                name,
                source,
                no_wait,
            } => {
                let source = std::path::absolute(&source)?;
                let body = CreateDisk {
                    name: name.clone(),
                    size_bytes: None,
                    source: Some(source.display().to_string()),
                };
                let mut disk: Disk = client.call(Method::POST, "/v1/disks", Some(&body)).await?;
                let path = format!("/v1/disks/{}", segment(&name));
                let mut progress = Progress::new();
                while !no_wait && disk.state == DiskState::Importing {
                    if let Some(p) = &disk.import_progress {
                        let percent = p.copied_bytes as f64 * 100.0 / p.total_bytes.max(1) as f64;
                        progress.update(&format!(
                            "Importing {name}: {percent:.0}% of {}",
                            bytes(p.total_bytes)
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    disk = client.get(&path).await?;
                }
                progress.finish();
                if disk.state == DiskState::Failed {
                    anyhow::bail!(
                        "Import of {name} failed: {}",
                        disk.error.as_deref().unwrap_or("unknown error")
                    );
                }
                show(&disk, json_output)
            }
            DiskCommand::List => {
                let disks: Vec<Disk> = client.get("/v1/disks").await?;
                if json_output {
                    return print_json(&disks);
                }
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .map(|d| {
                        vec![
                            d.name.clone(),
                            d.state.as_str().to_owned(),
                            bytes(d.size_bytes),
                            bytes(d.allocated_bytes),
                            if d.attached_to.is_empty() {
                                "-".into()
                            } else {
                                d.attached_to.join(",")
                            },
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(&["NAME", "STATE", "SIZE", "USED", "ATTACHED TO"], &rows)
                );
                Ok(())
            }
            DiskCommand::Show { name } => {
                let disk: Disk = client.get(&format!("/v1/disks/{}", segment(&name))).await?;
                show(&disk, json_output)
            }
            DiskCommand::Delete { name } => {
                client
                    .call_empty(Method::DELETE, &format!("/v1/disks/{}", segment(&name)))
                    .await?;
                if !json_output {
                    println!("Deleted {name}");
                }
                Ok(())
            }
        }
    })
}

fn show(disk: &Disk, json_output: bool) -> anyhow::Result<()> {
    if json_output {
        return print_json(disk);
    }
    println!("Name:        {}", disk.name);
    println!("State:       {}", disk.state.as_str());
    println!(
        "Size:        {} ({} bytes)",
        bytes(disk.size_bytes),
        disk.size_bytes
    );
    println!("Used:        {}", bytes(disk.allocated_bytes));
    println!("Path:        {}", disk.path);
    if !disk.attached_to.is_empty() {
        println!("Attached to: {}", disk.attached_to.join(", "));
    }
    if let Some(error) = &disk.error {
        println!("Error:       {error}");
    }
    Ok(())
}
