//! Networks, the NICs on them with their reserved addresses, and port forwards.

use std::net::Ipv4Addr;

use lodge_network::Ipv4Subnet;
use rusqlite::{params, OptionalExtension, Transaction};

use super::{is_unique_violation, now_ms, Db, DbError};
use crate::model::{NetworkMode, NicRequest, PortForward, VmNic};

/// A network row.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkRecord {
    pub id: i64,
    pub name: String,
    pub subnet: Ipv4Subnet,
    pub mode: NetworkMode,
    pub created_at: i64,
}

/// A NIC with its VM, for DHCP reservations and rules.
#[derive(Debug, Clone, PartialEq)]
pub struct NicRecord {
    pub vm_id: i64,
    pub vm_name: String,
    pub position: i64,
    pub network_id: i64,
    pub mac: String,
    pub address: Ipv4Addr,
}

impl Db {
    pub fn insert_network(
        &mut self,
        name: &str,
        subnet: &Ipv4Subnet,
        mode: NetworkMode,
    ) -> Result<NetworkRecord, DbError> {
        let inserted = self.conn.execute(
            "INSERT INTO networks (name, subnet, mode, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![name, subnet.to_string(), mode.as_str(), now_ms()],
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(DbError::NameTaken(name.to_owned())),
            other => other?,
        };
        self.network(name)?.ok_or(DbError::Corrupt("networks"))
    }

    pub fn networks(&self) -> Result<Vec<NetworkRecord>, DbError> {
        self.query_networks("", [])
    }

    pub fn network(&self, name: &str) -> Result<Option<NetworkRecord>, DbError> {
        Ok(self
            .query_networks("WHERE name = ?1", [name])?
            .into_iter()
            .next())
    }

    /// Deletes a network; `Ok(false)` when NICs are still on it.
    pub fn delete_network(&mut self, id: i64) -> Result<bool, DbError> {
        match self
            .conn
            .execute("DELETE FROM networks WHERE id = ?1", [id])
        {
            Ok(_) => Ok(true),
            // A NIC row refers to it (reported as a foreign key or trigger constraint).
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Every NIC, by network then VM.
    pub fn nics(&self) -> Result<Vec<NicRecord>, DbError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT n.vm_id, v.name, n.position, n.network_id, n.mac, n.address \
             FROM vm_nics n JOIN vms v ON v.id = n.vm_id ORDER BY n.network_id, v.name, n.position",
        )?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, String>(5)?,
            ))
        })?;
        let mut nics = Vec::new();
        for row in rows {
            let (vm_id, vm_name, position, network_id, mac, address) = row?;
            nics.push(NicRecord {
                vm_id,
                vm_name,
                position,
                network_id,
                mac,
                address: address
                    .parse()
                    .map_err(|_| DbError::Corrupt("vm_nics.address"))?,
            });
        }
        Ok(nics)
    }

    pub(super) fn nics_of(&self, vm_id: i64) -> Result<Vec<VmNic>, DbError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT w.name, n.mac, n.address FROM vm_nics n JOIN networks w ON w.id = n.network_id \
             WHERE n.vm_id = ?1 ORDER BY n.position",
        )?;
        let rows = statement.query_map([vm_id], |row| {
            Ok(VmNic {
                network: row.get(0)?,
                mac: row.get(1)?,
                address: row.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub(super) fn port_forwards_of(&self, vm_id: i64) -> Result<Vec<PortForward>, DbError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT host_port, guest_port FROM port_forwards WHERE vm_id = ?1 ORDER BY host_port",
        )?;
        let rows = statement.query_map([vm_id], |row| {
            Ok(PortForward {
                host_port: row.get(0)?,
                guest_port: row.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every port forward: (VM id, forward).
    pub fn port_forwards(&self) -> Result<Vec<(i64, PortForward)>, DbError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT vm_id, host_port, guest_port FROM port_forwards")?;
        let rows = statement.query_map([], |row| {
            Ok((
                row.get(0)?,
                PortForward {
                    host_port: row.get(1)?,
                    guest_port: row.get(2)?,
                },
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn add_port_forward(&mut self, vm_id: i64, forward: PortForward) -> Result<(), DbError> {
        match self.conn.execute(
            "INSERT INTO port_forwards (host_port, vm_id, guest_port) VALUES (?1, ?2, ?3)",
            params![forward.host_port, vm_id, forward.guest_port],
        ) {
            Err(e) if is_unique_violation(&e) => Err(DbError::PortTaken(forward.host_port)),
            other => other.map(drop).map_err(Into::into),
        }
    }

    /// Removes a VM's forward of `host_port`; false if it had none.
    pub fn remove_port_forward(&mut self, vm_id: i64, host_port: u16) -> Result<bool, DbError> {
        Ok(self.conn.execute(
            "DELETE FROM port_forwards WHERE vm_id = ?1 AND host_port = ?2",
            params![vm_id, host_port],
        )? > 0)
    }

    fn query_networks<P: rusqlite::Params>(
        &self,
        filter: &str,
        params: P,
    ) -> Result<Vec<NetworkRecord>, DbError> {
        let sql = format!(
            "SELECT id, name, subnet, mode, created_at FROM networks {filter} ORDER BY name"
        );
        let mut statement = self.conn.prepare_cached(&sql)?;
        let rows = statement.query_map(params, |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, i64>(4)?,
            ))
        })?;
        let mut networks = Vec::new();
        for row in rows {
            let (id, name, subnet, mode, created_at) = row?;
            networks.push(NetworkRecord {
                id,
                name,
                subnet: subnet
                    .parse()
                    .map_err(|_| DbError::Corrupt("networks.subnet"))?,
                mode: NetworkMode::parse(&mode).ok_or(DbError::Corrupt("networks.mode"))?,
                created_at,
            });
        }
        Ok(networks)
    }
}

/// Replaces a VM's NICs with `nics`: a NIC on the same network at the same position that asks
/// for no other MAC keeps its MAC and address; the others get new ones.
pub(super) fn replace_nics(
    tx: &Transaction<'_>,
    vm_id: i64,
    nics: &[NicRequest],
) -> Result<(), DbError> {
    let existing: Vec<(String, String, String)> = {
        let mut statement = tx.prepare_cached(
            "SELECT w.name, n.mac, n.address FROM vm_nics n JOIN networks w ON w.id = n.network_id \
             WHERE n.vm_id = ?1 ORDER BY n.position",
        )?;
        let rows =
            statement.query_map([vm_id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    tx.execute("DELETE FROM vm_nics WHERE vm_id = ?1", [vm_id])?;
    for (position, request) in nics.iter().enumerate() {
        let kept = existing.get(position).filter(|(network, mac, _)| {
            *network == request.network && request.mac.as_ref().is_none_or(|asked| asked == mac)
        });
        match kept {
            Some((network, mac, address)) => {
                let network_id: i64 = tx.query_row(
                    "SELECT id FROM networks WHERE name = ?1",
                    [network],
                    |row| row.get(0),
                )?;
                tx.execute(
                    "INSERT INTO vm_nics (vm_id, position, network_id, mac, address) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![vm_id, position as i64, network_id, mac, address],
                )?;
            }
            None => insert_nic(tx, vm_id, position, request)?,
        }
    }
    Ok(())
}

/// Inserts the NICs of a new VM, choosing MACs and addresses.
pub(super) fn attach_nics(
    tx: &Transaction<'_>,
    vm_id: i64,
    nics: &[NicRequest],
) -> Result<(), DbError> {
    for (position, request) in nics.iter().enumerate() {
        insert_nic(tx, vm_id, position, request)?;
    }
    Ok(())
}

/// Inserts NIC `position` of a VM on the network `request` names, with the MAC it asks for or
/// a random one, and the network's first free address.
fn insert_nic(
    tx: &Transaction<'_>,
    vm_id: i64,
    position: usize,
    request: &NicRequest,
) -> Result<(), DbError> {
    {
        let network: Option<(i64, String)> = tx
            .query_row(
                "SELECT id, subnet FROM networks WHERE name = ?1",
                [&request.network],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        let (network_id, subnet) =
            network.ok_or_else(|| DbError::NetworkNotFound(request.network.clone()))?;
        let subnet: Ipv4Subnet = subnet
            .parse()
            .map_err(|_| DbError::Corrupt("networks.subnet"))?;
        let used: Vec<String> = {
            let mut statement =
                tx.prepare_cached("SELECT address FROM vm_nics WHERE network_id = ?1")?;
            let rows = statement.query_map([network_id], |row| row.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let address = subnet
            .guest_addresses()
            .find(|candidate| !used.iter().any(|u| *u == candidate.to_string()))
            .ok_or_else(|| DbError::PoolExhausted(request.network.clone()))?;
        let mac = match &request.mac {
            Some(mac) => mac.clone(),
            None => unused_mac(tx)?,
        };
        let inserted = tx.execute(
            "INSERT INTO vm_nics (vm_id, position, network_id, mac, address) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![vm_id, position as i64, network_id, mac, address.to_string()],
        );
        match inserted {
            Err(e) if is_unique_violation(&e) => return Err(DbError::MacTaken(mac)),
            other => other?,
        };
    }
    Ok(())
}

fn unused_mac(tx: &Transaction<'_>) -> Result<String, DbError> {
    loop {
        let mac = lodge_contract::MacAddress::random().to_string();
        let taken: Option<i64> = tx
            .query_row("SELECT vm_id FROM vm_nics WHERE mac = ?1", [&mac], |row| {
                row.get(0)
            })
            .optional()?;
        if taken.is_none() {
            return Ok(mac);
        }
        // Random MACs come from the clock; the next try differs.
        std::thread::sleep(std::time::Duration::from_micros(1));
    }
}
