//! Networks: inventory objects backed by a bridge, a DHCP server and nftables rules on the
//! host ([`lodge_network`]), and the taps a starting VM gets on them.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use lodge_network::dhcp::{self, Reservations, ServerConfig};
use lodge_network::firewall::{self, NetworkRules, Reach};
use lodge_network::links::{self, Links};
use lodge_network::Ipv4Subnet;

use super::{lock, Inventory, InventoryError, Result};
use crate::db::{rfc3339, DbError, NetworkRecord, NicRecord, VmRecord};
use crate::model::{
    CreateNetwork, Lease, Network, NetworkMode, NicRequest, PortForward, DEFAULT_NETWORK,
    DEFAULT_SUBNET,
};

/// Errors of the host side of networks.
#[derive(Debug, thiserror::Error)]
pub enum HostNetworkError {
    #[error(transparent)]
    Link(#[from] links::LinkError),
    #[error(transparent)]
    Dhcp(#[from] dhcp::DhcpError),
    #[error(transparent)]
    Firewall(#[from] firewall::FirewallError),
}

/// The host side of every network: its netlink connection, DHCP servers and reservations.
pub struct HostNetwork {
    links: Links,
    servers: Mutex<HashMap<i64, (tokio::task::JoinHandle<()>, Reservations)>>,
}

/// A bridge's interface name: short enough for IFNAMSIZ whatever the network's name.
pub fn bridge_name(network_id: i64) -> String {
    format!("lodgebr{network_id}")
}

/// The alias marking a bridge as lodge's, for network `name`.
fn bridge_alias(name: &str) -> String {
    format!("lodge:{name}")
}

/// The tap of NIC `position` of VM `vm_id`.
pub fn tap_name(vm_id: i64, position: usize) -> String {
    format!("lodge{vm_id}n{position}")
}

impl Inventory {
    pub fn list_networks(&self) -> Result<Vec<Network>> {
        let (networks, nics) = {
            let db = self.db();
            (db.networks()?, db.nics()?)
        };
        Ok(networks.iter().map(|n| to_network(n, &nics)).collect())
    }

    pub fn network(&self, name: &str) -> Result<Network> {
        let record = self.network_record(name)?;
        Ok(to_network(&record, &self.db().nics()?))
    }

    /// Creates a network and its bridge, DHCP server and rules.
    pub async fn create_network(&self, request: CreateNetwork) -> Result<Network> {
        crate::model::validate_name(&request.name).map_err(InventoryError::Invalid)?;
        let host = self.host_network_or("networks need host networking")?;
        let subnet: Ipv4Subnet = request
            .subnet
            .parse()
            .map_err(|e: lodge_network::SubnetError| InventoryError::Invalid(e.to_string()))?;
        self.check_subnet_free(&subnet)?;
        let record = self
            .db()
            .insert_network(&request.name, &subnet, request.mode)
            .map_err(|e| match e {
                DbError::NameTaken(name) => InventoryError::NameTaken {
                    kind: "network",
                    name,
                },
                other => other.into(),
            })?;
        if let Err(error) = self.bring_up(host, &record).await {
            let _ = self.db().delete_network(record.id);
            self.refresh_host_network();
            return Err(error);
        }
        self.refresh_host_network();
        self.network(&request.name)
    }

    /// Deletes a network no VM uses, with its bridge and rules.
    pub async fn delete_network(&self, name: &str) -> Result<()> {
        let record = self.network_record(name)?;
        if !self.db().delete_network(record.id)? {
            let users: Vec<String> = self
                .db()
                .nics()?
                .into_iter()
                .filter(|nic| nic.network_id == record.id)
                .map(|nic| nic.vm_name)
                .collect();
            return Err(InventoryError::NetworkInUse {
                network: record.name,
                vms: format!("VM(s) {}", users.join(", ")),
            });
        }
        if let Some(host) = self.host_network.get() {
            if let Some((server, _)) = lock(&host.servers).remove(&record.id) {
                server.abort();
            }
            self.refresh_host_network();
            host.links
                .delete_bridge(&bridge_name(record.id), &bridge_alias(&record.name))
                .await
                .map_err(|e| InventoryError::HostNetwork(e.into()))?;
        }
        Ok(())
    }

    /// Starts host networking: the default network on first start, then every network's
    /// bridge, DHCP server and rules. Does nothing with host networking off.
    pub async fn start_host_network(&self) -> Result<()> {
        if !self.config.host_network {
            tracing::info!("Host networking is off: no bridges, DHCP or rules");
            return Ok(());
        }
        let links = Links::connect().map_err(|e| InventoryError::HostNetwork(e.into()))?;
        let _ = self.host_network.set(HostNetwork {
            links,
            servers: Mutex::new(HashMap::new()),
        });
        let host = self.host_network.get().expect("just set");
        if self.db().network(DEFAULT_NETWORK)?.is_none() {
            let subnet: Ipv4Subnet = DEFAULT_SUBNET.parse().expect("a valid default subnet");
            match self.check_subnet_free(&subnet) {
                Ok(()) => {
                    self.db()
                        .insert_network(DEFAULT_NETWORK, &subnet, NetworkMode::Nat)?;
                    tracing::info!(subnet = DEFAULT_SUBNET, "Created the default network");
                }
                Err(error) => tracing::warn!("No default network: {error}"),
            }
        }
        let networks = self.db().networks()?;
        for record in networks {
            self.bring_up(host, &record).await?;
        }
        self.refresh_host_network();
        Ok(())
    }

    /// Adds a port forward from the host to the VM's first NIC.
    pub fn add_port_forward(&self, vm: &str, forward: PortForward) -> Result<()> {
        let record = self.record(vm)?;
        if forward.host_port == 0 || forward.guest_port == 0 {
            return Err(InventoryError::Invalid("Ports are 1 to 65535".to_owned()));
        }
        let Some(nic) = record.settings.nics.first() else {
            return Err(InventoryError::Invalid(format!("VM '{vm}' has no NIC")));
        };
        let network = self.network_record(&nic.network)?;
        if network.mode != NetworkMode::Nat {
            return Err(InventoryError::Invalid(format!(
                "Network '{}' is isolated: nothing reaches it from the host",
                network.name
            )));
        }
        self.db().add_port_forward(record.id, forward)?;
        self.refresh_host_network();
        Ok(())
    }

    pub fn remove_port_forward(&self, vm: &str, host_port: u16) -> Result<()> {
        let record = self.record(vm)?;
        if !self.db().remove_port_forward(record.id, host_port)? {
            return Err(InventoryError::Invalid(format!(
                "VM '{vm}' has no forward of host port {host_port}"
            )));
        }
        self.refresh_host_network();
        Ok(())
    }

    /// The NICs a new VM asks for: as given, or one on the default network when it says
    /// nothing and host networking is on.
    pub(super) fn nic_requests(&self, nics: Option<Vec<NicRequest>>) -> Result<Vec<NicRequest>> {
        let nics = match nics {
            Some(nics) => nics,
            None if self.config.host_network && self.db().network(DEFAULT_NETWORK)?.is_some() => {
                vec![NicRequest {
                    network: DEFAULT_NETWORK.to_owned(),
                    mac: None,
                }]
            }
            None => Vec::new(),
        };
        if !nics.is_empty() && !self.config.host_network {
            return Err(InventoryError::HostNetworkingOff("VMs cannot have NICs"));
        }
        for nic in &nics {
            if let Some(mac) = &nic.mac {
                mac.parse::<lodge_contract::MacAddress>()
                    .map_err(|e| InventoryError::Invalid(e.to_string()))?;
            }
        }
        Ok(nics)
    }

    /// Opens a tap on its network's bridge for each NIC of a starting VM; the VMM gets the
    /// descriptors, and the taps go away when it ends.
    pub(super) async fn open_taps(&self, record: &VmRecord) -> Result<Vec<OwnedFd>> {
        if record.settings.nics.is_empty() {
            return Ok(Vec::new());
        }
        let host = self.host_network_or("VMs with NICs cannot start")?;
        let mut taps = Vec::new();
        for (position, nic) in record.settings.nics.iter().enumerate() {
            let network = self.network_record(&nic.network)?;
            let name = tap_name(record.id, position);
            let tap = links::open_tap(&name).map_err(|e| InventoryError::HostNetwork(e.into()))?;
            host.links
                .attach(&name, &bridge_name(network.id))
                .await
                .map_err(|e| InventoryError::HostNetwork(e.into()))?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Brings DHCP reservations and rules in line with the inventory.
    pub(super) fn refresh_host_network(&self) {
        let Some(host) = self.host_network.get() else {
            return;
        };
        if let Err(error) = self.apply_host_state(host) {
            tracing::error!("Cannot update the host network: {error}");
        }
    }

    fn apply_host_state(&self, host: &HostNetwork) -> Result<()> {
        let (networks, nics, forwards) = {
            let db = self.db();
            (db.networks()?, db.nics()?, db.port_forwards()?)
        };
        let servers = lock(&host.servers);
        for (network_id, (_, reservations)) in servers.iter() {
            let mut table = lock(reservations);
            table.clear();
            for nic in nics.iter().filter(|nic| nic.network_id == *network_id) {
                if let Ok(mac) = nic.mac.parse::<lodge_contract::MacAddress>() {
                    table.insert(mac.0, nic.address);
                }
            }
        }
        drop(servers);
        let rules: Vec<NetworkRules> = networks
            .iter()
            .map(|network| NetworkRules {
                bridge: bridge_name(network.id),
                subnet: network.subnet,
                reach: match network.mode {
                    NetworkMode::Nat => Reach::Nat,
                    NetworkMode::Isolated => Reach::Isolated,
                },
                forwards: forwards
                    .iter()
                    .filter_map(|(vm_id, forward)| {
                        let nic = nics
                            .iter()
                            .find(|nic| nic.vm_id == *vm_id && nic.position == 0)?;
                        (nic.network_id == network.id).then_some((
                            forward.host_port,
                            nic.address,
                            forward.guest_port,
                        ))
                    })
                    .collect(),
            })
            .collect();
        firewall::apply(&rules).map_err(|e| InventoryError::HostNetwork(e.into()))
    }

    async fn bring_up(&self, host: &HostNetwork, record: &NetworkRecord) -> Result<()> {
        let bridge = bridge_name(record.id);
        host.links
            .ensure_bridge(&bridge, &bridge_alias(&record.name), &record.subnet)
            .await
            .map_err(|e| match e {
                links::LinkError::NameTaken(name) => InventoryError::AddressConflict(format!(
                    "Interface {name} exists and was not created by lodge"
                )),
                other => InventoryError::HostNetwork(other.into()),
            })?;
        let reservations: Reservations = Arc::default();
        let server = dhcp::serve(
            &bridge,
            ServerConfig {
                subnet: record.subnet,
                router: record.mode == NetworkMode::Nat,
            },
            reservations.clone(),
        )
        .map_err(|e| InventoryError::HostNetwork(e.into()))?;
        if let Some((old, _)) = lock(&host.servers).insert(record.id, (server, reservations)) {
            old.abort();
        }
        tracing::info!(network = record.name, bridge, subnet = %record.subnet, "Network up");
        Ok(())
    }

    /// Refuses a subnet that overlaps another network or a route of the host.
    fn check_subnet_free(&self, subnet: &Ipv4Subnet) -> Result<()> {
        let networks = self.db().networks()?;
        if let Some(other) = networks.iter().find(|n| n.subnet.overlaps(subnet)) {
            return Err(InventoryError::AddressConflict(format!(
                "Subnet {subnet} overlaps network '{}' ({})",
                other.name, other.subnet
            )));
        }
        let ours: Vec<String> = networks.iter().map(|n| bridge_name(n.id)).collect();
        for (interface, destination, prefix) in links::host_routes(&ours) {
            if subnet.overlaps_network(destination, prefix) {
                return Err(InventoryError::AddressConflict(format!(
                    "Subnet {subnet} clashes with the host route {destination}/{prefix} on {interface}"
                )));
            }
        }
        Ok(())
    }

    fn host_network_or(&self, what: &'static str) -> Result<&HostNetwork> {
        self.host_network
            .get()
            .ok_or(InventoryError::HostNetworkingOff(what))
    }

    fn network_record(&self, name: &str) -> Result<NetworkRecord> {
        self.db()
            .network(name)?
            .ok_or_else(|| InventoryError::NetworkNotFound(name.to_owned()))
    }
}

/// A network as the API shows it, with the leases among `nics` that are on it.
fn to_network(record: &NetworkRecord, nics: &[NicRecord]) -> Network {
    let leases = nics
        .iter()
        .filter(|nic| nic.network_id == record.id)
        .map(|nic| Lease {
            vm: nic.vm_name.clone(),
            mac: nic.mac.clone(),
            address: nic.address.to_string(),
        })
        .collect();
    Network {
        name: record.name.clone(),
        subnet: record.subnet.to_string(),
        mode: record.mode,
        gateway: record.subnet.gateway().to_string(),
        bridge: bridge_name(record.id),
        created_at: rfc3339(record.created_at),
        leases,
    }
}
