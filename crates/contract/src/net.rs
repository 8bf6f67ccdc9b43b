//! Network adapters: what `lodge run --net` takes and the daemon writes into a VM's
//! configuration. A NIC is written the same way in both places, as text:
//!
//! - `tap=NAME[,mac=M][,mtu=N]`: a tap the VMM opens (creating it if it may);
//! - `fd=N[,mac=M][,mtu=N]`: a tap already open as descriptor N, inherited from the
//!   supervisor (the daemon opens taps, so the VMM needs no network privileges);
//! - `user[,hostfwd=tcp:HOST:GUEST]...[,mac=M][,mtu=N]`: user-mode networking through passt
//!   (no root, no host configuration): outbound connections, and TCP port forwards from host
//!   port HOST to guest port GUEST.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A network adapter (virtio-net).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub backend: NicBackend,
    /// Absent: the VMM picks a random locally administered address.
    pub mac: Option<MacAddress>,
    pub mtu: u16,
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicBackend {
    Tap { name: String },
    TapFd { fd: i32 },
    User { forwards: Vec<PortForward> },
}

/// A TCP port forward from the host to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

/// The default MTU.
pub const DEFAULT_MTU: u16 = 1500;
/// Tap names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_TAP_NAME: usize = 15;

/// Errors from reading a NIC or MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("Invalid NIC '{text}': {why} (expected tap=NAME, fd=N or user[,hostfwd=tcp:HOST:GUEST], then [,mac=M][,mtu=N])")]
    InvalidNic { text: String, why: &'static str },
    #[error(
        "Invalid MAC address '{0}' (expected six hex bytes such as 52:54:00:12:34:56, unicast)"
    )]
    InvalidMac(String),
}

impl MacAddress {
    /// A random locally administered unicast address in QEMU's 52:54:00 range.
    pub fn random() -> MacAddress {
        let mut bytes = [0u8; 3];
        // Uniqueness on one host is all that matters; the clock's low bits and the pid do.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 20);
        let mixed = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        bytes.copy_from_slice(&mixed.to_le_bytes()[5..8]);
        MacAddress([0x52, 0x54, 0x00, bytes[0], bytes[1], bytes[2]])
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddress {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || NetError::InvalidMac(s.to_owned());
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(invalid());
        }
        let mut bytes = [0u8; 6];
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        // A multicast source address would be dropped by every switch.
        if bytes[0] & 1 != 0 {
            return Err(invalid());
        }
        Ok(MacAddress(bytes))
    }
}

impl fmt::Display for NicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            NicBackend::Tap { name } => write!(f, "tap={name}")?,
            NicBackend::TapFd { fd } => write!(f, "fd={fd}")?,
            NicBackend::User { forwards } => {
                f.write_str("user")?;
                for forward in forwards {
                    write!(f, ",hostfwd=tcp:{}:{}", forward.host, forward.guest)?;
                }
            }
        }
        if let Some(mac) = self.mac {
            write!(f, ",mac={mac}")?;
        }
        if self.mtu != DEFAULT_MTU {
            write!(f, ",mtu={}", self.mtu)?;
        }
        Ok(())
    }
}

impl FromStr for NicConfig {
    type Err = NetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why| NetError::InvalidNic {
            text: s.to_owned(),
            why,
        };
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let mut backend = match first.split_once('=') {
            Some(("tap", name)) => {
                if name.is_empty() || name.len() > MAX_TAP_NAME || name.contains(['/', ' ', '\0']) {
                    return Err(invalid("a tap name is 1 to 15 bytes without '/' or spaces"));
                }
                NicBackend::Tap {
                    name: name.to_owned(),
                }
            }
            Some(("fd", fd)) => match fd.parse::<i32>() {
                Ok(fd) if fd >= 3 => NicBackend::TapFd { fd },
                _ => return Err(invalid("the descriptor is a number of 3 or more")),
            },
            None if first == "user" => NicBackend::User {
                forwards: Vec::new(),
            },
            _ => return Err(invalid("unknown backend")),
        };
        let mut mac = None;
        let mut mtu = DEFAULT_MTU;
        for option in parts {
            match option.split_once('=') {
                Some(("mac", value)) => mac = Some(value.parse()?),
                Some(("mtu", value)) => {
                    mtu = match value.parse::<u16>() {
                        Ok(value) if (68..=65_535 - 14).contains(&value) => value,
                        _ => return Err(invalid("the MTU is 68 to 65521")),
                    }
                }
                Some(("hostfwd", value)) => {
                    let NicBackend::User { forwards } = &mut backend else {
                        return Err(invalid("hostfwd is for user networking"));
                    };
                    let ports = value
                        .strip_prefix("tcp:")
                        .ok_or(invalid("hostfwd is tcp:HOST:GUEST"))?;
                    let (host, guest) = ports
                        .split_once(':')
                        .ok_or(invalid("hostfwd is tcp:HOST:GUEST"))?;
                    let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0);
                    match (port(host), port(guest)) {
                        (Some(host), Some(guest)) => forwards.push(PortForward { host, guest }),
                        _ => return Err(invalid("ports are 1 to 65535")),
                    }
                }
                _ => return Err(invalid("unknown option")),
            }
        }
        Ok(NicConfig { backend, mac, mtu })
    }
}

impl Serialize for NicConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NicConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for MacAddress {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_round_trip_through_text() {
        for text in [
            "tap=tap0",
            "tap=lodge-web-0,mac=52:54:00:12:34:56",
            "fd=7,mac=52:54:00:aa:bb:cc,mtu=9000",
            "user",
            "user,hostfwd=tcp:8080:80,hostfwd=tcp:2222:22",
        ] {
            let nic: NicConfig = text.parse().unwrap();
            assert_eq!(nic.to_string(), text);
            let json = serde_json::to_string(&nic).unwrap();
            assert_eq!(serde_json::from_str::<NicConfig>(&json).unwrap(), nic);
        }
        let nic: NicConfig = "user,hostfwd=tcp:8080:80".parse().unwrap();
        assert_eq!(
            nic.backend,
            NicBackend::User {
                forwards: vec![PortForward {
                    host: 8080,
                    guest: 80
                }]
            }
        );
    }

    #[test]
    fn bad_nics_say_why() {
        for bad in [
            "",
            "tap=",
            "tap=a-name-longer-than-15",
            "tap=a/b",
            "fd=1",
            "fd=x",
            "bridge=br0",
            "user,hostfwd=udp:1:2",
            "user,hostfwd=tcp:0:80",
            "user,hostfwd=tcp:80",
            "tap=t,hostfwd=tcp:1:2",
            "tap=t,mac=01:00:00:00:00:01",
            "tap=t,mac=52:54:00:12:34",
            "tap=t,mtu=20",
            "tap=t,speed=10",
        ] {
            assert!(bad.parse::<NicConfig>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn random_macs_are_local_unicast() {
        let mac = MacAddress::random();
        assert_eq!(&mac.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(mac.to_string().parse::<MacAddress>().unwrap(), mac);
    }
}
