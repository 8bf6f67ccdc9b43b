//! virtio-net: one receive and one transmit queue over a [`NetBackend`] (a tap, or a stream
//! socket such as passt's).
//!
//! Both directions run on the VMM's event loop: transmit when the driver notifies the TX
//! queue; receive when the backend's descriptor becomes readable (edge-triggered, so it is
//! read until empty) or when the driver adds receive buffers after the device ran out.
//! Features: MAC, link status, MTU, mergeable receive buffers, event indexes, and, with a tap,
//! checksum and segmentation offloads in both directions (those the guest accepts on receive
//! are applied to the tap with `TUNSETOFFLOAD`). Malformed chains and frames are dropped and
//! counted in [`NetStats`]; a backend that fails sets the link down and the VM goes on.

pub mod backend;
#[cfg(test)]
mod tests;

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::os::fd::AsRawFd;

use event_manager::EventSet;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::chain::{buffer_address, collect_chain, CheckedChain};
use super::{
    read_config_bytes, Activation, DeviceError, QueueError, VirtioDevice, COMMON_FEATURES,
};
use crate::logging::LogLimiter;
use backend::{offload, NetBackend, MAX_FRAME_SIZE, VNET_HEADER_SIZE};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_MAX_SIZES: &[u16] = &[256, 256];
/// Descriptors per chain the device accepts (a 64 KiB GSO frame in 4 KiB pages is 17).
const MAX_DESCRIPTORS: usize = 64;
/// The smallest frame worth sending: a header and an Ethernet header.
const MIN_FRAME: usize = VNET_HEADER_SIZE + 14;
/// Frames received in one go before the event loop gets a turn for other devices (as NAPI's
/// default weight).
const RX_BUDGET: usize = 64;
/// Bytes of the configuration space: mac, status, max_virtqueue_pairs, mtu.
const CONFIG_SIZE: usize = 12;

/// A MAC address.
pub type MacAddress = [u8; 6];

/// Counters of one NIC, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames from the backend the guest had no room for or that were malformed.
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames the backend could not take (full).
    pub tx_dropped: AtomicU64,
    /// Descriptor chains from the guest that were malformed, too short or too long.
    pub tx_malformed: AtomicU64,
}

impl NetStats {
    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

/// What a virtio-net device is made of.
pub struct NetConfig {
    pub mac: MacAddress,
    pub mtu: u16,
    pub backend: Box<dyn NetBackend>,
}

/// The virtio network device.
pub struct VirtioNet {
    mac: MacAddress,
    mtu: u16,
    backend: Box<dyn NetBackend>,
    /// The backend failed: link down, nothing is read or sent any more.
    link_down: bool,
    active: Option<Activation>,
    mergeable: bool,
    /// A frame read from the backend that the guest had no buffers for yet.
    rx_frame: Vec<u8>,
    rx_pending: usize,
    tx_frame: Vec<u8>,
    /// Signalled when a receive pass stops at its budget with frames possibly left: the
    /// backend's descriptor is edge-triggered, so no new event would come for them.
    rx_resume: EventFd,
    stats: Arc<NetStats>,
    log: LogLimiter,
}

impl VirtioNet {
    pub fn new(config: NetConfig) -> VirtioNet {
        VirtioNet {
            mac: config.mac,
            mtu: config.mtu,
            backend: config.backend,
            link_down: false,
            active: None,
            mergeable: false,
            rx_frame: vec![0; VNET_HEADER_SIZE + MAX_FRAME_SIZE],
            rx_pending: 0,
            tx_frame: Vec::with_capacity(VNET_HEADER_SIZE + MAX_FRAME_SIZE),
            rx_resume: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
            stats: Arc::new(NetStats::default()),
            log: LogLimiter::new(),
        }
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    fn offered_offloads(&self) -> u64 {
        if !self.backend.supports_offloads() {
            return 0;
        }
        [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
        ]
        .iter()
        .fold(0, |bits, feature| bits | (1 << feature))
    }

    /// The backend is gone: link down, tell the driver.
    fn set_link_down(&mut self, why: &std::io::Error) {
        if self.link_down {
            return;
        }
        self.link_down = true;
        tracing::warn!("virtio-net: backend failed, link down: {why}");
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
    }

    /// Moves frames from the backend into the guest's receive buffers until either runs out.
    fn receive(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let memory = &active.memory;
        let queue = active
            .queues
            .get_mut(RX)
            .ok_or(DeviceError::NoSuchQueue(RX))?;
        if !queue.ready() {
            return Ok(());
        }
        let queue_error = |source| DeviceError::Queue { index: RX, source };
        let mut delivered_any = false;
        let mut failure = None;
        let mut rounds = 0;
        loop {
            if rounds == RX_BUDGET {
                // More may be waiting: come back once the other devices had their turn.
                let _ = self.rx_resume.write(1);
                break;
            }
            rounds += 1;
            if self.link_down {
                break;
            }
            if self.rx_pending == 0 {
                match self.backend.receive(&mut self.rx_frame) {
                    Ok(length) if length < MIN_FRAME => {
                        NetStats::add(&self.stats.rx_dropped, 1);
                        continue;
                    }
                    Ok(length) => self.rx_pending = length,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                    Err(error) => {
                        failure = Some(error);
                        break;
                    }
                }
            }
            let frame = &mut self.rx_frame[..self.rx_pending];
            match deliver(queue, memory, frame, self.mergeable).map_err(queue_error)? {
                Delivery::Delivered => {
                    NetStats::add(&self.stats.rx_frames, 1);
                    NetStats::add(
                        &self.stats.rx_bytes,
                        (self.rx_pending - VNET_HEADER_SIZE) as u64,
                    );
                    self.rx_pending = 0;
                    delivered_any = true;
                }
                Delivery::Dropped => {
                    NetStats::add(&self.stats.rx_dropped, 1);
                    self.rx_pending = 0;
                    delivered_any = true;
                }
                Delivery::NoBuffers => {
                    // Ask for a notification when buffers come; retry if some came already.
                    match queue.enable_notification(memory) {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(source) => return Err(queue_error(QueueError::Notification(source))),
                    }
                }
            }
        }
        if delivered_any
            && queue
                .needs_notification(memory)
                .map_err(|source| queue_error(QueueError::Notification(source)))?
        {
            active.interrupt.signal_used_queue();
        }
        if let Some(error) = failure {
            self.set_link_down(&error);
        }
        Ok(())
    }

    /// Sends every frame the driver queued for transmission.
    fn transmit(&mut self) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Err(DeviceError::NotActivated);
        };
        let backend = &mut self.backend;
        let stats = &self.stats;
        let log = &mut self.log;
        let frame = &mut self.tx_frame;
        let link_down = self.link_down;
        let mut failure = None;
        active.process_queue(TX, |chain, memory| {
            match gather(chain, memory, frame) {
                Ok(()) if link_down || failure.is_some() => NetStats::add(&stats.tx_dropped, 1),
                Ok(()) => match backend.send(frame) {
                    Ok(()) => {
                        NetStats::add(&stats.tx_frames, 1);
                        NetStats::add(&stats.tx_bytes, (frame.len() - VNET_HEADER_SIZE) as u64);
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        NetStats::add(&stats.tx_dropped, 1)
                    }
                    Err(error) => {
                        NetStats::add(&stats.tx_dropped, 1);
                        failure = Some(error);
                    }
                },
                Err(why) => {
                    NetStats::add(&stats.tx_malformed, 1);
                    if let Some(suppressed) = log.check() {
                        tracing::warn!(
                            suppressed,
                            "virtio-net: dropped a frame from the guest: {why}"
                        );
                    }
                }
            }
            0
        })?;
        if let Some(error) = failure {
            self.set_link_down(&error);
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | self.offered_offloads()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[..6].copy_from_slice(&self.mac);
        let status = if self.link_down {
            0
        } else {
            VIRTIO_NET_S_LINK_UP as u16
        };
        config[6..8].copy_from_slice(&status.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only with VERSION_1 (no VIRTIO_NET_F_CTRL_MAC_ADDR offered).
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                suppressed,
                "virtio-net: ignored a {}-byte config write at {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        let acked = activation.features;
        self.mergeable = acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let flags = [
            (VIRTIO_NET_F_GUEST_CSUM, offload::CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, offload::TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, offload::TSO6),
            (VIRTIO_NET_F_GUEST_ECN, offload::TSO_ECN),
            (VIRTIO_NET_F_GUEST_UFO, offload::UFO),
        ]
        .iter()
        .filter(|(feature, _)| acked & (1 << feature) != 0)
        .fold(0, |flags, (_, flag)| flags | flag);
        // Segmentation offloads need checksum offload (the kernel refuses them alone).
        let flags = if flags & offload::CSUM == 0 { 0 } else { flags };
        tracing::debug!(
            features = format_args!("{acked:#x}"),
            offloads = format_args!("{flags:#x}"),
            mergeable = self.mergeable,
            "virtio-net: driver ready"
        );
        if let Err(error) = self.backend.set_offloads(flags) {
            tracing::warn!("virtio-net: cannot set the backend's offloads: {error}");
        }
        self.active = Some(activation);
        self.rx_pending = 0;
        self.receive()
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => Err(DeviceError::NoSuchQueue(index)),
        }
    }

    fn event_sources(&self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        vec![
            (
                self.backend.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (self.rx_resume.as_raw_fd(), EventSet::IN),
        ]
    }

    fn process_event(&mut self, source: usize) -> Result<(), DeviceError> {
        if source == 1 {
            let _ = self.rx_resume.read();
        }
        self.receive()
    }

    fn reset(&mut self) {
        self.active = None;
        self.mergeable = false;
        self.rx_pending = 0;
        if let Err(error) = self.backend.set_offloads(0) {
            tracing::warn!("virtio-net: cannot clear the backend's offloads: {error}");
        }
    }
}

/// What became of a received frame.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// The guest's buffers were unusable (or too small without mergeable buffers).
    Dropped,
    /// Not enough buffers yet; nothing was consumed.
    NoBuffers,
}

/// Writes `frame` (header first) into the next available receive chain(s): as many as it
/// needs with mergeable buffers (their count goes in the header's `num_buffers`), exactly one
/// without. Chains are only consumed when the whole frame fits.
fn deliver(
    queue: &mut virtio_queue::Queue,
    memory: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
) -> Result<Delivery, QueueError> {
    let start = queue.next_avail();
    let mut chains: Vec<(u16, Vec<Descriptor>)> = Vec::new();
    let mut capacity = 0u64;
    let mut malformed = false;
    while capacity < frame.len() as u64 {
        let chain = match queue.iter(memory) {
            Ok(mut available) => available.next(),
            Err(source) => return Err(QueueError::AvailableRing(source)),
        };
        let Some(chain) = chain else {
            if malformed {
                break;
            }
            queue.set_next_avail(start);
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        let checked = collect_chain(chain, MAX_DESCRIPTORS).and_then(|checked| {
            checked.require_direction(&checked.descriptors, true)?;
            checked.require_in_memory(memory, &checked.descriptors)?;
            Ok(checked)
        });
        match checked {
            Ok(CheckedChain { descriptors, .. }) => {
                capacity += CheckedChain::total_len(&descriptors);
                chains.push((head, descriptors));
            }
            Err(_) => {
                // Consumed and unusable: the frame cannot be delivered in order any more.
                malformed = true;
                chains.push((head, Vec::new()));
                break;
            }
        }
        if !mergeable {
            break;
        }
    }
    if malformed || capacity < frame.len() as u64 {
        for (head, _) in &chains {
            queue
                .add_used(memory, *head, 0)
                .map_err(|source| QueueError::UsedRing {
                    head: *head,
                    source,
                })?;
        }
        return Ok(Delivery::Dropped);
    }
    let buffers = chains.len() as u16;
    frame[10..12].copy_from_slice(&buffers.to_le_bytes());
    let mut offset = 0usize;
    for (head, descriptors) in &chains {
        let mut written = 0u32;
        for descriptor in descriptors {
            if offset == frame.len() {
                break;
            }
            let count = (descriptor.len() as usize).min(frame.len() - offset);
            memory
                .write_slice(
                    &frame[offset..offset + count],
                    buffer_address(descriptor, 0),
                )
                .map_err(QueueError::BufferWrite)?;
            offset += count;
            written += count as u32;
        }
        queue
            .add_used(memory, *head, written)
            .map_err(|source| QueueError::UsedRing {
                head: *head,
                source,
            })?;
    }
    Ok(Delivery::Delivered)
}

/// Why a frame from the guest was not sent.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("malformed descriptor chain")]
    Chain(#[from] super::ChainError),
    #[error("frame of {0} bytes (header included) is outside {MIN_FRAME}..={max}", max = VNET_HEADER_SIZE + MAX_FRAME_SIZE)]
    Length(u64),
    #[error("cannot read the frame from guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Copies a transmit chain (header and frame, device-readable) into `frame`.
fn gather(
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    frame: &mut Vec<u8>,
) -> Result<(), TxError> {
    let checked = collect_chain(chain, MAX_DESCRIPTORS)?;
    checked.require_direction(&checked.descriptors, false)?;
    checked.require_in_memory(memory, &checked.descriptors)?;
    let length = CheckedChain::total_len(&checked.descriptors);
    if length < MIN_FRAME as u64 || length > (VNET_HEADER_SIZE + MAX_FRAME_SIZE) as u64 {
        return Err(TxError::Length(length));
    }
    frame.clear();
    frame.resize(length as usize, 0);
    let mut offset = 0;
    for descriptor in &checked.descriptors {
        let count = descriptor.len() as usize;
        memory
            .read_slice(&mut frame[offset..offset + count], descriptor.addr())
            .map_err(TxError::Memory)?;
        offset += count;
    }
    Ok(())
}
