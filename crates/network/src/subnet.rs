//! IPv4 subnets of lodge networks: `10.1.2.0/24`, the gateway at the first host address.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// A subnet between /16 and /29 with its host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

/// Why a subnet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubnetError {
    #[error("Invalid subnet '{0}' (expected an IPv4 network such as 10.10.0.0/24)")]
    Syntax(String),
    #[error("Subnet {0} has host bits set (did you mean {1}?)")]
    HostBits(String, String),
    #[error("Subnet prefix /{0} is outside /16../29")]
    Prefix(u8),
}

impl Ipv4Subnet {
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    fn mask_bits(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask_bits())
    }

    /// The host's address on the network: the first host address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The addresses guests get: after the gateway, before the broadcast address.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !self.mask_bits();
        (first..broadcast).map(Ipv4Addr::from)
    }

    pub fn contains(&self, address: Ipv4Addr) -> bool {
        u32::from(address) & self.mask_bits() == u32::from(self.network)
    }

    /// Whether the two share any address.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        self.overlaps_network(other.network, other.prefix)
    }

    /// Whether the network `address/prefix` (any prefix, such as a host route's) shares an
    /// address with this one.
    pub fn overlaps_network(&self, address: Ipv4Addr, prefix: u8) -> bool {
        let shorter = u32::from(self.prefix.min(prefix));
        let mask = u32::MAX.checked_shl(32 - shorter).unwrap_or(0);
        u32::from(self.network) & mask == u32::from(address) & mask
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = SubnetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetError::Syntax(s.to_owned());
        let (address, prefix) = s.split_once('/').ok_or_else(syntax)?;
        let address: Ipv4Addr = address.parse().map_err(|_| syntax())?;
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        if !(16..=29).contains(&prefix) {
            return Err(SubnetError::Prefix(prefix));
        }
        let subnet = Ipv4Subnet {
            network: address,
            prefix,
        };
        let network = Ipv4Addr::from(u32::from(address) & subnet.mask_bits());
        if network != address {
            return Err(SubnetError::HostBits(
                s.to_owned(),
                format!("{network}/{prefix}"),
            ));
        }
        Ok(subnet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_plans_addresses() {
        let subnet: Ipv4Subnet = "10.10.0.0/24".parse().unwrap();
        assert_eq!(subnet.to_string(), "10.10.0.0/24");
        assert_eq!(subnet.gateway(), Ipv4Addr::new(10, 10, 0, 1));
        assert_eq!(subnet.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        let guests: Vec<_> = subnet.guest_addresses().collect();
        assert_eq!(guests.first(), Some(&Ipv4Addr::new(10, 10, 0, 2)));
        assert_eq!(guests.last(), Some(&Ipv4Addr::new(10, 10, 0, 254)));
        assert_eq!(guests.len(), 253);
        assert!(subnet.contains(Ipv4Addr::new(10, 10, 0, 77)));
        assert!(!subnet.contains(Ipv4Addr::new(10, 10, 1, 77)));
    }

    #[test]
    fn overlaps_in_both_directions() {
        let a: Ipv4Subnet = "10.10.0.0/16".parse().unwrap();
        let b: Ipv4Subnet = "10.10.5.0/24".parse().unwrap();
        let c: Ipv4Subnet = "10.11.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c) && !c.overlaps(&b));
        // Routes of any length: a default route, a /8, a host route inside or outside.
        assert!(b.overlaps_network(Ipv4Addr::UNSPECIFIED, 0));
        assert!(b.overlaps_network(Ipv4Addr::new(10, 0, 0, 0), 8));
        assert!(b.overlaps_network(Ipv4Addr::new(10, 10, 5, 9), 32));
        assert!(!b.overlaps_network(Ipv4Addr::new(10, 10, 6, 9), 32));
    }

    #[test]
    fn refuses_what_is_not_a_usable_subnet() {
        assert!(matches!(
            "10.10.0.5/24".parse::<Ipv4Subnet>(),
            Err(SubnetError::HostBits(_, ref hint)) if hint == "10.10.0.0/24"
        ));
        assert_eq!(
            "10.0.0.0/8".parse::<Ipv4Subnet>(),
            Err(SubnetError::Prefix(8))
        );
        assert_eq!(
            "10.0.0.0/30".parse::<Ipv4Subnet>(),
            Err(SubnetError::Prefix(30))
        );
        for bad in ["", "10.0.0.0", "10.0.0/24", "x/24", "10.0.0.0/x"] {
            assert!(
                matches!(bad.parse::<Ipv4Subnet>(), Err(SubnetError::Syntax(_))),
                "{bad}"
            );
        }
    }
}
