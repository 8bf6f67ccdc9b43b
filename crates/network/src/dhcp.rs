//! The DHCP server of a lodge network: every NIC's address is reserved in the inventory, so
//! the server only tells each MAC its address (no pool, no lease state of its own).
//!
//! One socket per network, bound to port 67 on the bridge (`SO_BINDTODEVICE`); replies are
//! broadcast on the bridge, as clients without an address need.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};

use crate::Ipv4Subnet;

/// Lease time given to guests: renewals are cheap and the address never changes.
pub const LEASE_SECONDS: u32 = 3600;

/// MAC → reserved address, shared with the inventory.
pub type Reservations = Arc<Mutex<HashMap<[u8; 6], Ipv4Addr>>>;

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("Cannot open the DHCP socket on {bridge}")]
    Socket {
        bridge: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a network's server answers with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub subnet: Ipv4Subnet,
    /// Offer a default route through the gateway (networks that reach outside).
    pub router: bool,
}

/// Serves DHCP on `bridge` until the task is aborted.
pub fn serve(
    bridge: &str,
    config: ServerConfig,
    reservations: Reservations,
) -> Result<tokio::task::JoinHandle<()>, DhcpError> {
    let socket = bound_socket(bridge).map_err(|source| DhcpError::Socket {
        bridge: bridge.to_owned(),
        source,
    })?;
    let bridge = bridge.to_owned();
    Ok(tokio::spawn(async move {
        let mut buffer = vec![0u8; 1500];
        loop {
            let (length, _) = match socket.recv_from(&mut buffer).await {
                Ok(received) => received,
                Err(error) => {
                    tracing::warn!(bridge, "DHCP receive failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Some(reply) = answer(&buffer[..length], &config, &reservations) else {
                continue;
            };
            let destination = SocketAddrV4::new(Ipv4Addr::BROADCAST, 68);
            if let Err(error) = socket.send_to(&reply, destination).await {
                tracing::warn!(bridge, "DHCP reply failed: {error}");
            }
        }
    }))
}

/// The reply to one request, or None for anything not to answer (malformed, not a request,
/// an unknown MAC, a message for another server).
pub fn answer(
    request: &[u8],
    config: &ServerConfig,
    reservations: &Reservations,
) -> Option<Vec<u8>> {
    if !options_are_sane(request) {
        return None;
    }
    let message = Message::from_bytes(request).ok()?;
    if message.opcode() != Opcode::BootRequest || message.chaddr().len() < 6 {
        return None;
    }
    let mac: [u8; 6] = message.chaddr()[..6].try_into().ok()?;
    let reserved = *reservations.lock().ok()?.get(&mac)?;
    let gateway = config.subnet.gateway();
    let reply_type = match message.opts().msg_type()? {
        MessageType::Discover => MessageType::Offer,
        MessageType::Request => {
            if let Some(DhcpOption::ServerIdentifier(server)) =
                message.opts().get(OptionCode::ServerIdentifier)
            {
                if *server != gateway {
                    return None;
                }
            }
            let asked = match message.opts().get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(address)) => *address,
                _ => message.ciaddr(),
            };
            if asked == reserved {
                MessageType::Ack
            } else {
                MessageType::Nak
            }
        }
        _ => return None,
    };
    let mut reply = Message::default();
    reply
        .set_opcode(Opcode::BootReply)
        .set_xid(message.xid())
        .set_flags(message.flags())
        .set_chaddr(&mac)
        .set_giaddr(message.giaddr());
    reply.opts_mut().insert(DhcpOption::MessageType(reply_type));
    reply
        .opts_mut()
        .insert(DhcpOption::ServerIdentifier(gateway));
    if reply_type != MessageType::Nak {
        reply.set_yiaddr(reserved).set_siaddr(gateway);
        let options = reply.opts_mut();
        options.insert(DhcpOption::AddressLeaseTime(LEASE_SECONDS));
        options.insert(DhcpOption::SubnetMask(config.subnet.netmask()));
        if config.router {
            options.insert(DhcpOption::Router(vec![gateway]));
        }
    }
    reply.to_vec().ok()
}

/// Where the options start: after the fixed header and the magic cookie.
const OPTIONS_OFFSET: usize = 240;

/// Whether every option lies within the packet and the few options whose length dhcproto
/// trusts (it asserts on them, or subtracts from them) have the length their RFC gives.
/// Packets that fail are dropped before decoding: a guest cannot make the decoder panic.
fn options_are_sane(packet: &[u8]) -> bool {
    if packet.len() < OPTIONS_OFFSET || packet[236..240] != [99, 130, 83, 99] {
        return false;
    }
    let mut at = OPTIONS_OFFSET;
    while at < packet.len() {
        let code = packet[at];
        match code {
            0 => {
                at += 1;
                continue;
            }
            255 => return true,
            _ => {}
        }
        let Some(&length) = packet.get(at + 1) else {
            return false;
        };
        let length = usize::from(length);
        if at + 2 + length > packet.len() {
            return false;
        }
        let fits = match code {
            // Option overload moves options into sname/file: not needed, not trusted.
            52 => false,
            80 => length == 0,
            81 => length >= 3,
            94 => length == 3,
            151 => length >= 1,
            152..=155 => length == 4,
            _ => true,
        };
        if !fits {
            return false;
        }
        at += 2 + length;
    }
    true
}

/// A UDP socket on port 67 of `bridge` that may broadcast.
fn bound_socket(bridge: &str) -> std::io::Result<tokio::net::UdpSocket> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        set_option(&socket, option, &one as *const _ as *const libc::c_void, 4)?;
    }
    set_option(
        &socket,
        libc::SO_BINDTODEVICE,
        bridge.as_ptr().cast(),
        bridge.len() as libc::socklen_t,
    )?;
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 67u16.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: `address` is a sockaddr_in of the size given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(std::io::Error::last_os_error());
    }
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))
}

fn set_option(
    socket: &OwnedFd,
    option: libc::c_int,
    value: *const libc::c_void,
    length: libc::socklen_t,
) -> std::io::Result<()> {
    // SAFETY: `value` points at `length` readable bytes for the duration of the call.
    let result =
        unsafe { libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, option, value, length) };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

    fn setup() -> (ServerConfig, Reservations) {
        let reservations: Reservations = Arc::default();
        reservations
            .lock()
            .unwrap()
            .insert(MAC, Ipv4Addr::new(10, 9, 0, 5));
        (
            ServerConfig {
                subnet: "10.9.0.0/24".parse().unwrap(),
                router: true,
            },
            reservations,
        )
    }

    fn request(kind: MessageType, mac: [u8; 6], requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut message = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        message.opts_mut().insert(DhcpOption::MessageType(kind));
        if let Some(address) = requested {
            message
                .opts_mut()
                .insert(DhcpOption::RequestedIpAddress(address));
        }
        message.to_vec().unwrap()
    }

    fn decode(reply: &[u8]) -> Message {
        Message::from_bytes(reply).unwrap()
    }

    #[test]
    fn offers_and_acknowledges_the_reserved_address() {
        let (config, reservations) = setup();
        let offer = decode(
            &answer(
                &request(MessageType::Discover, MAC, None),
                &config,
                &reservations,
            )
            .unwrap(),
        );
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 9, 0, 5));
        assert_eq!(
            offer.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 9, 0, 1)]))
        );
        let ack = decode(
            &answer(
                &request(MessageType::Request, MAC, Some(Ipv4Addr::new(10, 9, 0, 5))),
                &config,
                &reservations,
            )
            .unwrap(),
        );
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        let nak = decode(
            &answer(
                &request(MessageType::Request, MAC, Some(Ipv4Addr::new(10, 9, 0, 9))),
                &config,
                &reservations,
            )
            .unwrap(),
        );
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn strangers_and_garbage_get_no_answer() {
        let (config, reservations) = setup();
        assert!(answer(
            &request(MessageType::Discover, [2, 0, 0, 0, 0, 1], None),
            &config,
            &reservations
        )
        .is_none());
        assert!(answer(b"not dhcp", &config, &reservations).is_none());
        assert!(answer(&[], &config, &reservations).is_none());
        let mut truncated = request(MessageType::Discover, MAC, None);
        truncated.truncate(200);
        assert!(answer(&truncated, &config, &reservations).is_none());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let (config, reservations) = setup();
            let _ = answer(&bytes, &config, &reservations);
        }

        /// A valid header from a known MAC followed by random options reaches the decoder.
        #[test]
        fn arbitrary_options_never_panic(
            options in proptest::collection::vec((proptest::num::u8::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..12)), 0..12),
        ) {
            let (config, reservations) = setup();
            let mut packet = request(MessageType::Discover, MAC, None);
            packet.truncate(OPTIONS_OFFSET);
            packet.extend_from_slice(&[53, 1, 1]);
            for (code, value) in options {
                packet.push(code);
                packet.push(value.len() as u8);
                packet.extend_from_slice(&value);
            }
            packet.push(255);
            let _ = answer(&packet, &config, &reservations);
        }
    }
}
