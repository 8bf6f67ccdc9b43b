use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::test_utils::CountingLine;
use crate::virtio::VirtioInterrupt;

const MEMORY_SIZE: u64 = 0x40_0000;
const RX_QUEUE: u64 = 0x1000;
const TX_QUEUE: u64 = 0x8000;
const QUEUE_SIZE: u16 = 256;
const BUFFERS: u64 = 0x10_0000;
const READ: u16 = 0;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const MAC: MacAddress = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Frames in both directions, and whether the backend has failed.
#[derive(Default)]
struct Wire {
    to_guest: VecDeque<Vec<u8>>,
    from_guest: Vec<Vec<u8>>,
    broken: bool,
    offloads: Option<u32>,
}

/// A backend on an in-memory wire (its descriptor is an unused eventfd).
struct FakeBackend {
    wire: Arc<Mutex<Wire>>,
    event: EventFd,
}

impl NetBackend for FakeBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let mut wire = self.wire.lock().unwrap();
        if wire.broken {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        match wire.to_guest.pop_front() {
            Some(frame) => {
                buffer[..frame.len()].copy_from_slice(&frame);
                Ok(frame.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let mut wire = self.wire.lock().unwrap();
        if wire.broken {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        wire.from_guest.push(frame.to_vec());
        Ok(())
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        self.wire.lock().unwrap().offloads = Some(flags);
        Ok(())
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
}

/// A frame with a zeroed header: `len` bytes of Ethernet frame after it.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut bytes = vec![0u8; VNET_HEADER_SIZE];
    bytes.extend((0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    bytes
}

struct Harness<'a> {
    memory: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    rx_next: u16,
    tx_next: u16,
    line: Arc<CountingLine>,
    net: VirtioNet,
    wire: Arc<Mutex<Wire>>,
}

fn harness(memory: &GuestMemoryMmap, features: u64) -> Harness<'_> {
    let wire = Arc::new(Mutex::new(Wire::default()));
    let mut net = VirtioNet::new(NetConfig {
        mac: MAC,
        mtu: 1500,
        backend: Box::new(FakeBackend {
            wire: wire.clone(),
            event: EventFd::new(0).unwrap(),
        }),
    });
    let rx = MockSplitQueue::create(memory, GuestAddress(RX_QUEUE), QUEUE_SIZE);
    let tx = MockSplitQueue::create(memory, GuestAddress(TX_QUEUE), QUEUE_SIZE);
    let line = Arc::new(CountingLine::default());
    let queues: Vec<Queue> = vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()];
    net.activate(Activation {
        memory: memory.clone(),
        queues,
        interrupt: VirtioInterrupt::new(line.clone()),
        features: features & net.features(),
    })
    .unwrap();
    Harness {
        memory,
        rx,
        tx,
        rx_next: 0,
        tx_next: 0,
        line,
        net,
        wire,
    }
}

/// Chains `buffers` (address, length, flags) with NEXT flags starting at table entry `first`.
fn chain(first: u16, buffers: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
    buffers
        .iter()
        .enumerate()
        .map(|(index, &(addr, len, flags))| {
            let last = index + 1 == buffers.len();
            let flags = if last { flags } else { flags | NEXT };
            RawDescriptor::from(Descriptor::new(addr, len, flags, first + index as u16 + 1))
        })
        .collect()
}

impl Harness<'_> {
    /// Puts the same arbitrary descriptor table (address, length, flags, next) on both queues
    /// and queues frames of the given lengths at the backend.
    fn offer_garbage(&mut self, table: &[(u64, u32, u16, u16)], frames: &[usize]) {
        let raw: Vec<RawDescriptor> = table
            .iter()
            .map(|&(addr, len, flags, next)| {
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.rx.add_desc_chains(&raw, 0).unwrap();
        self.tx.add_desc_chains(&raw, 0).unwrap();
        let mut wire = self.wire.lock().unwrap();
        for &len in frames {
            wire.to_guest.push_back(frame(len.max(14), len as u8));
        }
    }

    fn transmit(&mut self, buffers: &[(u64, u32, u16)]) {
        let descriptors = chain(self.tx_next, buffers);
        self.tx.add_desc_chains(&descriptors, self.tx_next).unwrap();
        self.tx_next += descriptors.len() as u16;
        self.net.process_queue(TX).unwrap();
    }

    /// Offers a receive buffer chain of `sizes` at `address` and on.
    fn offer_rx(&mut self, address: u64, sizes: &[u32]) {
        let mut at = address;
        let buffers: Vec<(u64, u32, u16)> = sizes
            .iter()
            .map(|&size| {
                let buffer = (at, size, WRITE);
                at += u64::from(size);
                buffer
            })
            .collect();
        let descriptors = chain(self.rx_next, &buffers);
        self.rx.add_desc_chains(&descriptors, self.rx_next).unwrap();
        self.rx_next += descriptors.len() as u16;
    }

    fn write_guest(&self, address: u64, bytes: &[u8]) {
        self.memory
            .write_slice(bytes, GuestAddress(address))
            .unwrap();
    }

    fn guest_bytes(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .unwrap();
        bytes
    }

    /// The used ring's entries of the receive queue: (chain head, length).
    fn rx_used(&self) -> Vec<(u32, u32)> {
        let count = self.rx.used().idx().load();
        (0..count)
            .map(|i| {
                let element = self
                    .rx
                    .used()
                    .ring()
                    .ref_at(usize::from(i % QUEUE_SIZE))
                    .unwrap()
                    .load();
                (element.id(), element.len())
            })
            .collect()
    }

    fn tx_used_count(&self) -> u16 {
        self.tx.used().idx().load()
    }

    fn stat(&self, counter: fn(&NetStats) -> &AtomicU64) -> u64 {
        counter(&self.net.stats()).load(Ordering::Relaxed)
    }
}

const ALL: u64 = u64::MAX;
const NOT_MERGEABLE: u64 = !(1 << VIRTIO_NET_F_MRG_RXBUF);

#[test]
fn advertises_mac_link_and_mtu() {
    let memory = memory();
    let h = harness(&memory, ALL);
    let mut config = [0u8; CONFIG_SIZE];
    h.net.read_config(0, &mut config);
    assert_eq!(&config[..6], &MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
    ] {
        assert_ne!(h.net.features() & (1 << feature), 0, "feature {feature}");
    }
}

#[test]
fn acknowledged_receive_offloads_reach_the_backend() {
    let memory = memory();
    let h = harness(&memory, ALL);
    assert_eq!(
        h.wire.lock().unwrap().offloads,
        Some(offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN | offload::UFO)
    );
    let memory = memory_again();
    let h = harness(&memory, ALL & !(1 << VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(
        h.wire.lock().unwrap().offloads,
        Some(0),
        "TSO needs checksum offload"
    );
}

fn memory_again() -> GuestMemoryMmap {
    memory()
}

#[test]
fn transmits_a_frame_split_over_buffers() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    let sent = frame(100, 1);
    h.write_guest(BUFFERS, &sent[..VNET_HEADER_SIZE]);
    h.write_guest(BUFFERS + 0x1000, &sent[VNET_HEADER_SIZE..]);
    h.transmit(&[
        (BUFFERS, VNET_HEADER_SIZE as u32, READ),
        (BUFFERS + 0x1000, 100, READ),
    ]);
    assert_eq!(h.wire.lock().unwrap().from_guest, vec![sent]);
    assert_eq!(h.tx_used_count(), 1);
    assert_eq!(h.stat(|s| &s.tx_frames), 1);
    assert_eq!(h.stat(|s| &s.tx_bytes), 100);
}

#[test]
fn malformed_transmit_chains_are_dropped_and_counted() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    // Too short, device-writable, outside memory, too long.
    h.transmit(&[(BUFFERS, 10, READ)]);
    h.transmit(&[(BUFFERS, 100, WRITE)]);
    h.transmit(&[(MEMORY_SIZE - 8, 100, READ)]);
    h.transmit(&[(BUFFERS, 0x20000, READ)]);
    assert!(h.wire.lock().unwrap().from_guest.is_empty());
    assert_eq!(h.stat(|s| &s.tx_malformed), 4);
    assert_eq!(h.tx_used_count(), 4, "every chain is returned");
    // The device still works.
    h.transmit(&[(BUFFERS, 64, READ)]);
    assert_eq!(h.wire.lock().unwrap().from_guest.len(), 1);
}

#[test]
fn receives_into_one_buffer_without_mergeable_buffers() {
    let memory = memory();
    let mut h = harness(&memory, NOT_MERGEABLE);
    h.offer_rx(BUFFERS, &[2048]);
    let incoming = frame(1000, 2);
    h.wire.lock().unwrap().to_guest.push_back(incoming.clone());
    h.net.process_event(0).unwrap();
    assert_eq!(h.rx_used(), vec![(0, incoming.len() as u32)]);
    let mut expected = incoming.clone();
    expected[10] = 1; // num_buffers
    assert_eq!(h.guest_bytes(BUFFERS, incoming.len()), expected);
    assert_eq!(h.stat(|s| &s.rx_frames), 1);
    assert!(h.line.count() >= 1, "the guest was interrupted");
}

#[test]
fn a_frame_too_big_for_one_buffer_is_dropped_without_mergeable_buffers() {
    let memory = memory();
    let mut h = harness(&memory, NOT_MERGEABLE);
    h.offer_rx(BUFFERS, &[512]);
    h.wire.lock().unwrap().to_guest.push_back(frame(1000, 3));
    h.net.process_event(0).unwrap();
    assert_eq!(h.rx_used(), vec![(0, 0)]);
    assert_eq!(h.stat(|s| &s.rx_dropped), 1);
}

#[test]
fn mergeable_buffers_take_a_large_frame_and_count_themselves() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    for i in 0..4 {
        h.offer_rx(BUFFERS + i * 0x1000, &[1536]);
    }
    let incoming = frame(4000, 4);
    h.wire.lock().unwrap().to_guest.push_back(incoming.clone());
    h.net.process_event(0).unwrap();
    let used = h.rx_used();
    assert_eq!(used.len(), 3, "{used:?}");
    assert_eq!(used.iter().map(|u| u.1).sum::<u32>(), incoming.len() as u32);
    let mut received = Vec::new();
    for (index, (_, len)) in used.iter().enumerate() {
        received.extend(h.guest_bytes(BUFFERS + index as u64 * 0x1000, *len as usize));
    }
    assert_eq!(u16::from_le_bytes([received[10], received[11]]), 3);
    assert_eq!(&received[VNET_HEADER_SIZE..], &incoming[VNET_HEADER_SIZE..]);
}

#[test]
fn frames_wait_for_buffers_and_arrive_when_the_guest_adds_them() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    h.offer_rx(BUFFERS, &[1536]);
    let big = frame(3000, 5);
    h.wire.lock().unwrap().to_guest.push_back(big.clone());
    h.net.process_event(0).unwrap();
    assert!(
        h.rx_used().is_empty(),
        "one buffer is not enough; nothing is consumed"
    );
    h.offer_rx(BUFFERS + 0x1000, &[1536]);
    h.offer_rx(BUFFERS + 0x2000, &[1536]);
    h.net.process_queue(RX).unwrap();
    assert_eq!(h.rx_used().len(), 2);
    assert_eq!(h.stat(|s| &s.rx_frames), 1);
    assert_eq!(h.stat(|s| &s.rx_dropped), 0);
}

#[test]
fn a_receive_pass_stops_at_its_budget_and_resumes_on_its_own_event() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    for i in 0..RX_BUDGET as u64 + 10 {
        h.offer_rx(BUFFERS + i * 0x800, &[1536]);
        h.wire
            .lock()
            .unwrap()
            .to_guest
            .push_back(frame(100, i as u8));
    }
    h.net.process_event(0).unwrap();
    assert_eq!(h.rx_used().len(), RX_BUDGET);
    // The backend's edge is spent; the device's own event brings the rest in.
    assert_eq!(h.net.rx_resume.read().unwrap(), 1);
    h.net.process_event(1).unwrap();
    assert_eq!(h.rx_used().len(), RX_BUDGET + 10);
}

#[test]
fn a_failed_backend_sets_the_link_down_and_the_device_goes_on() {
    let memory = memory();
    let mut h = harness(&memory, ALL);
    let interrupts = h.line.count();
    h.wire.lock().unwrap().broken = true;
    h.transmit(&[(BUFFERS, 64, READ)]);
    let mut status = [0u8; 2];
    h.net.read_config(6, &mut status);
    assert_eq!(status, [0, 0], "link down");
    assert!(h.line.count() > interrupts, "config change signalled");
    assert_eq!(h.stat(|s| &s.tx_dropped), 1);
    // Later frames are dropped quietly, chains still returned.
    h.transmit(&[(BUFFERS, 64, READ)]);
    assert_eq!(h.tx_used_count(), 2);
    h.offer_rx(BUFFERS, &[1536]);
    h.net.process_event(0).unwrap();
    assert!(h.rx_used().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any descriptor table the guest writes leaves the device answering: no panic, no error
    /// that needs a reset, and a well-formed frame still goes through afterwards. (Buffers
    /// start above the rings: a guest that points buffers at its own rings corrupts them, and
    /// the device then asks for a reset, as the spec has it.)
    #[test]
    fn arbitrary_descriptors_never_break_the_device(
        table in proptest::collection::vec(
            (BUFFERS..MEMORY_SIZE + 0x1000, 0u32..0x2_0000, 0u16..8, 0u16..300), 1..40),
        frames in proptest::collection::vec(0usize..5000, 0..6),
    ) {
        let memory = memory();
        let mut h = harness(&memory, ALL);
        h.offer_garbage(&table, &frames);
        prop_assert!(h.net.process_queue(TX).is_ok());
        prop_assert!(h.net.process_event(0).is_ok());
        prop_assert!(h.net.process_queue(RX).is_ok());
        // Then a well-formed frame from the guest still goes out.
        h.tx_next = 100;
        let sent_before = h.wire.lock().unwrap().from_guest.len();
        let good = frame(60, 9);
        h.write_guest(BUFFERS + 0x3_0000, &good);
        h.transmit(&[(BUFFERS + 0x3_0000, good.len() as u32, READ)]);
        let wire = h.wire.lock().unwrap();
        prop_assert_eq!(wire.from_guest.len(), sent_before + 1);
        prop_assert_eq!(wire.from_guest.last().unwrap(), &good);
    }

    /// Buffers anywhere, over the rings too: never a panic; at worst the rings are unusable
    /// and the device asks for a reset.
    #[test]
    fn descriptors_over_the_rings_end_in_a_reset_at_worst(
        table in proptest::collection::vec(
            (0u64..MEMORY_SIZE + 0x1000, 0u32..0x2_0000, 0u16..8, 0u16..300), 1..40),
        frames in proptest::collection::vec(0usize..5000, 0..6),
    ) {
        let memory = memory();
        let mut h = harness(&memory, ALL);
        h.offer_garbage(&table, &frames);
        for result in [h.net.process_queue(TX), h.net.process_event(0), h.net.process_queue(RX)] {
            prop_assert!(matches!(result, Ok(()) | Err(DeviceError::Queue { .. })), "{result:?}");
        }
    }
}
