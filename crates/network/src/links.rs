//! Bridges and taps, through rtnetlink (no `ip` commands).
//!
//! A bridge lodge creates carries the interface alias `lodge:<network>`, so the daemon never
//! takes over or deletes an interface it did not make.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::OwnedFd;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::Ipv4Subnet;

/// Errors managing links.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("Cannot open a netlink connection")]
    Connect(#[source] std::io::Error),
    #[error("Netlink request failed: {what}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("Interface {0} exists and was not created by lodge")]
    NameTaken(String),
    #[error("Interface {0} does not exist")]
    Missing(String),
    #[error("Cannot open tap {name}")]
    Tap {
        name: String,
        #[source]
        source: lodge_devices::virtio::net::backend::BackendError,
    },
}

/// A netlink connection for managing links (needs a Tokio runtime).
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    pub fn connect() -> Result<Links, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        tokio::spawn(connection);
        Ok(Links { handle })
    }

    /// The link called `name`, if there is one.
    pub async fn find(&self, name: &str) -> Result<Option<LinkMessage>, LinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(message)) if message.raw_code() == -libc::ENODEV => {
                Ok(None)
            }
            Err(source) => Err(LinkError::Netlink {
                what: format!("look up {name}"),
                source,
            }),
        }
    }

    /// Creates bridge `name` marked with `alias` and the gateway address of `subnet`, up;
    /// adopts it if it exists with that alias; refuses an interface someone else made.
    pub async fn ensure_bridge(
        &self,
        name: &str,
        alias: &str,
        subnet: &Ipv4Subnet,
    ) -> Result<(), LinkError> {
        let netlink = |what: String| move |source| LinkError::Netlink { what, source };
        let link = match self.find(name).await? {
            Some(link) if alias_of(&link).as_deref() == Some(alias) => link,
            Some(_) => return Err(LinkError::NameTaken(name.to_owned())),
            None => {
                self.handle
                    .link()
                    .add(LinkBridge::new(name).build())
                    .execute()
                    .await
                    .map_err(netlink(format!("create bridge {name}")))?;
                let link = self
                    .find(name)
                    .await?
                    .ok_or_else(|| LinkError::Missing(name.to_owned()))?;
                // The kernel sets an alias only on an existing link.
                self.handle
                    .link()
                    .set(
                        LinkUnspec::new_with_index(link.header.index)
                            .alias(alias)
                            .build(),
                    )
                    .execute()
                    .await
                    .map_err(netlink(format!("mark bridge {name}")))?;
                link
            }
        };
        let index = link.header.index;
        let gateway = subnet.gateway();
        if !self.has_address(index, gateway).await? {
            self.handle
                .address()
                .add(index, IpAddr::V4(gateway), subnet.prefix())
                .execute()
                .await
                .map_err(netlink(format!("add {gateway} to {name}")))?;
        }
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink(format!("set {name} up")))?;
        Ok(())
    }

    /// Deletes bridge `name` if lodge made it (it carries `alias`).
    pub async fn delete_bridge(&self, name: &str, alias: &str) -> Result<(), LinkError> {
        match self.find(name).await? {
            Some(link) if alias_of(&link).as_deref() == Some(alias) => self
                .handle
                .link()
                .del(link.header.index)
                .execute()
                .await
                .map_err(|source| LinkError::Netlink {
                    what: format!("delete bridge {name}"),
                    source,
                }),
            _ => Ok(()),
        }
    }

    /// Puts `port` on `bridge` and sets it up.
    pub async fn attach(&self, port: &str, bridge: &str) -> Result<(), LinkError> {
        let bridge_index = self
            .find(bridge)
            .await?
            .ok_or_else(|| LinkError::Missing(bridge.to_owned()))?
            .header
            .index;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_name(port)
                    .controller(bridge_index)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|source| LinkError::Netlink {
                what: format!("attach {port} to {bridge}"),
                source,
            })
    }

    async fn has_address(&self, index: u32, address: Ipv4Addr) -> Result<bool, LinkError> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(message) =
            addresses
                .try_next()
                .await
                .map_err(|source| LinkError::Netlink {
                    what: "list addresses".to_owned(),
                    source,
                })?
        {
            let found = message.attributes.iter().any(
                |attribute| matches!(attribute, AddressAttribute::Local(IpAddr::V4(a)) if *a == address),
            );
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Opens tap `name` (created, not persistent: it goes away with the last descriptor) with a
/// virtio-net header, for handing to a VMM.
pub fn open_tap(name: &str) -> Result<OwnedFd, LinkError> {
    lodge_devices::virtio::net::backend::Tap::open(name)
        .map(|tap| tap.into_fd())
        .map_err(|source| LinkError::Tap {
            name: name.to_owned(),
            source,
        })
}

fn alias_of(link: &LinkMessage) -> Option<String> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfAlias(alias) => Some(alias.clone()),
            _ => None,
        })
}

/// The host's IPv4 routes other than the default route and those on `except` interfaces:
/// (interface, destination subnet) from the calling thread's network namespace.
pub fn host_routes(except: &[String]) -> Vec<(String, Ipv4Addr, u8)> {
    let Ok(text) = std::fs::read_to_string("/proc/thread-self/net/route") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let interface = fields.first()?.to_string();
            let destination = u32::from_str_radix(fields.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(fields.get(7)?, 16).ok()?;
            // The file shows addresses in host (little-endian) byte order.
            let destination = Ipv4Addr::from(u32::from_be(destination.to_le()));
            let prefix = u32::from_be(mask.to_le()).leading_ones() as u8;
            (prefix > 0 && !except.contains(&interface)).then_some((interface, destination, prefix))
        })
        .collect()
}
