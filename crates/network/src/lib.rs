//! Host networking for VMs: what the daemon's virtual switch is made of.
//!
//! A lodge network is a Linux bridge ([`links`], through rtnetlink) whose gateway address is
//! the host's; each VM NIC is a tap on it ([`links::open_tap`]); the daemon answers DHCP on it
//! itself ([`dhcp`], wire format by dhcproto) with the addresses its inventory reserved; NAT,
//! isolation and port forwards are nftables rules in a table of lodge's own ([`firewall`],
//! driven through the nftables crate's `nft -j`). [`Ipv4Subnet`] is the address plan.

pub mod dhcp;
pub mod firewall;
pub mod links;
mod subnet;

pub use subnet::{Ipv4Subnet, SubnetError};
