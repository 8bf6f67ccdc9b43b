//! Entry points that drive devices with arbitrary bytes, shared by the cargo-fuzz targets in
//! `fuzz/` and the crate's property tests (so the same paths run in every `cargo test`).
//!
//! Each entry point builds a fresh device on fresh guest memory, lets the input play the
//! guest, and checks invariants a hostile guest must not be able to break. A panic, whether
//! from the device or from a failed invariant, is a finding.

use std::sync::Arc;

use lodge_bus::BusDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::virtio::test_utils::CountingLine;
use crate::virtio::{MmioTransport, VirtioBlock, VirtioDevice, VirtioRng, SECTOR_SIZE};

/// Two RAM regions with a hole between them, so buffers can straddle a gap or run off the end.
const LOW_RAM: (u64, u64) = (0, 0x8_0000);
const HIGH_RAM: (u64, u64) = (0x10_0000, 0x8_0000);
/// Addresses the byte-driven guest picks from: both regions, the hole and beyond the end.
const ADDRESS_SPAN: u64 = 0x20_0000;

const QUEUE_SIZE: u16 = 64;
const DESCRIPTOR_TABLE: u64 = 0x1000;
const AVAILABLE_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Per-request header slots, then data, status and indirect-table areas.
const HEADERS: u64 = 0x4000;
const DATA: u64 = 0x1_0000;
const STATUS: u64 = 0x7_f000;
const INDIRECT_TABLES: u64 = 0x10_0000;
const DISK_SECTORS: u64 = 32;

const NEXT: u16 = 1;
const INDIRECT: u16 = 4;

/// Plays a driver that set up a virtio-blk device properly and then submits whatever
/// requests the input describes: any types, sectors, buffer layouts, flags, `next` links,
/// indirect tables full of input bytes, and an available index that may jump.
///
/// Invariants: the image never changes size, and unless the device asked for a reset every
/// published chain comes back in the used ring.
pub fn virtio_block_request(data: &[u8]) {
    let mut input = Input(data);
    let memory = memory();
    let file = TempFile::new().expect("temporary file").into_file();
    file.set_len(DISK_SECTORS * SECTOR_SIZE)
        .expect("sized image");
    let image = file.try_clone().expect("image handle");
    let read_only = input.byte() & 1 == 1;
    let device = VirtioBlock::from_file(file, read_only).expect("block device");
    let (mut transport, line) = start(Box::new(device), &memory);

    let mut index = 0u16;
    let mut chains = 0u16;
    while !input.is_empty() && index < QUEUE_SIZE && chains < QUEUE_SIZE {
        let head = index;
        index = write_request(&mut input, &memory, chains, index);
        memory
            .write_obj(head, available_entry(chains))
            .expect("available ring entry");
        chains += 1;
    }
    let published = if input.byte() == 0xff {
        input.u16()
    } else {
        chains
    };
    memory
        .write_obj(published, GuestAddress(AVAILABLE_RING + 2))
        .expect("available index");
    notify(&mut transport, 0);

    let size = image.metadata().expect("image metadata").len();
    assert_eq!(
        size,
        DISK_SECTORS * SECTOR_SIZE,
        "the guest resized the image"
    );
    if transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
        let used: u16 = memory
            .read_obj(GuestAddress(USED_RING + 2))
            .expect("used index");
        assert_eq!(used, published, "published chains did not all come back");
        if used > 0 {
            assert!(line.count() > 0, "used buffers were not announced");
        }
    }
}

/// Plays a driver poking the register window of a virtio-blk or virtio-rng device at will,
/// interleaved with writes to guest memory (where it may build rings), queue notifications
/// and, now and then, a correct initialisation sequence to get the device running.
pub fn mmio_transport(data: &[u8]) {
    let mut input = Input(data);
    let memory = memory();
    let device: Box<dyn VirtioDevice> = if input.byte() & 1 == 0 {
        let file = TempFile::new().expect("temporary file").into_file();
        file.set_len(DISK_SECTORS * SECTOR_SIZE)
            .expect("sized image");
        Box::new(VirtioBlock::from_file(file, false).expect("block device"))
    } else {
        Box::new(VirtioRng::new())
    };
    let line = Arc::new(CountingLine::default());
    let mut transport = MmioTransport::new(device, memory.clone(), line).expect("transport");
    while !input.is_empty() {
        match input.byte() % 6 {
            0 => {
                let register = u64::from(input.byte()) * 4;
                let value = input.u32();
                transport.write(register, &value.to_le_bytes());
            }
            1 => {
                let offset = u64::from(input.u16()) % 0x1100;
                let mut buffer = [0u8; 8];
                let len = access_size(input.byte());
                transport.read(offset, &mut buffer[..len]);
            }
            2 => {
                let offset = u64::from(input.u16()) % 0x1100;
                let len = access_size(input.byte());
                let bytes = input.u64().to_le_bytes();
                transport.write(offset, &bytes[..len]);
            }
            3 => {
                let queue = usize::from(input.byte() % 3);
                transport.handle_queue_event(queue);
            }
            4 => {
                let address = GuestAddress(u64::from(input.u32()) % ADDRESS_SPAN);
                // Writes landing outside guest memory are the test's own misses: ignore them.
                let _ = memory.write_obj(input.u64(), address);
            }
            _ => initialise(&mut transport, &memory),
        }
    }
}

/// Transmit queue of the virtio-net target, after the receive queue's rings.
const TX_RINGS: (u64, u64, u64) = (0x5000, 0x6000, 0x7000);

/// Plays a driver that set up a virtio-net device (both queues) on a stream-socket backend,
/// then, as the input says: posts receive or transmit chains of arbitrary descriptors (any
/// address, length, flags and links), notifies either queue, lets the peer send frames of any
/// announced length and content, and hands the device its backend events.
///
/// Invariant: unless the device asked for a reset, no ring returns more chains than were
/// published, and nothing panics.
pub fn virtio_net_traffic(data: &[u8]) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use crate::virtio::net::backend::StreamBackend;
    use crate::virtio::net::{NetConfig, VirtioNet};

    let mut input = Input(data);
    let memory = memory();
    let (ours, mut peer) = UnixStream::pair().expect("a socket pair");
    peer.set_nonblocking(true).expect("non-blocking peer");
    let device = VirtioNet::new(NetConfig {
        mac: [0x52, 0x54, 0, 0, 0, 1],
        mtu: 1500,
        backend: Box::new(StreamBackend::new(ours).expect("stream backend")),
    });
    let line = Arc::new(CountingLine::default());
    let mut transport =
        MmioTransport::new(Box::new(device), memory.clone(), line).expect("transport");
    let rings = [(DESCRIPTOR_TABLE, AVAILABLE_RING, USED_RING), TX_RINGS];
    initialise_queues(&mut transport, &memory, &rings);
    let mut next_descriptor = [0u16; 2];
    let mut published = [0u16; 2];
    while !input.is_empty() {
        match input.byte() % 5 {
            0 => {
                let length = if input.byte() & 1 == 0 {
                    u32::from(input.u16() % 2048)
                } else {
                    input.u32()
                };
                let mut message = length.to_be_bytes().to_vec();
                for _ in 0..(length % 2048) {
                    message.push(input.byte());
                }
                // A full socket drops the rest, as a busy peer would.
                let _ = peer.write_all(&message);
            }
            choice @ (1 | 2) => {
                let queue = usize::from(choice - 1);
                if published[queue] >= QUEUE_SIZE {
                    continue;
                }
                let (table, available, _) = rings[queue];
                let count = 1 + input.byte() % 4;
                let head = next_descriptor[queue] % QUEUE_SIZE;
                for i in 0..count {
                    let index = (head + u16::from(i)) % QUEUE_SIZE;
                    let address = u64::from(input.u32()) % ADDRESS_SPAN;
                    let length = u32::from(input.u16());
                    let flags = u16::from(input.byte() & 7);
                    let next = if i + 1 < count && input.byte() & 7 != 0 {
                        (index + 1) % QUEUE_SIZE
                    } else {
                        u16::from(input.byte()) % QUEUE_SIZE
                    };
                    let mut raw = [0u8; 16];
                    raw[..8].copy_from_slice(&address.to_le_bytes());
                    raw[8..12].copy_from_slice(&length.to_le_bytes());
                    raw[12..14].copy_from_slice(&flags.to_le_bytes());
                    raw[14..].copy_from_slice(&next.to_le_bytes());
                    memory
                        .write_slice(&raw, GuestAddress(table + u64::from(index) * 16))
                        .expect("descriptor");
                }
                next_descriptor[queue] = head + u16::from(count);
                memory
                    .write_obj(
                        head,
                        GuestAddress(available + 4 + u64::from(published[queue]) * 2),
                    )
                    .expect("available entry");
                published[queue] += 1;
                memory
                    .write_obj(published[queue], GuestAddress(available + 2))
                    .expect("available index");
            }
            3 => notify(&mut transport, u32::from(input.byte() % 2)),
            _ => transport.handle_device_event(usize::from(input.byte() % 2)),
        }
    }
    transport.handle_device_event(0);
    if transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET == 0 {
        for (queue, &(_, _, used)) in rings.iter().enumerate() {
            let returned: u16 = memory.read_obj(GuestAddress(used + 2)).expect("used index");
            assert!(
                returned <= published[queue],
                "queue {queue} returned {returned} of {} chains",
                published[queue]
            );
        }
    }
}

/// The guest side of a correct initialisation, with the request queue at its fixed place.
fn start(
    device: Box<dyn VirtioDevice>,
    memory: &GuestMemoryMmap,
) -> (MmioTransport, Arc<CountingLine>) {
    let line = Arc::new(CountingLine::default());
    let mut transport =
        MmioTransport::new(device, memory.clone(), line.clone()).expect("transport");
    initialise(&mut transport, memory);
    (transport, line)
}

/// A correct initialisation of a device with one queue.
fn initialise(transport: &mut MmioTransport, memory: &GuestMemoryMmap) {
    initialise_queues(
        transport,
        memory,
        &[(DESCRIPTOR_TABLE, AVAILABLE_RING, USED_RING)],
    );
}

/// As [`initialise`], with queue `i` at `queues[i]` (descriptor table, available ring, used
/// ring).
fn initialise_queues(
    transport: &mut MmioTransport,
    memory: &GuestMemoryMmap,
    queues: &[(u64, u64, u64)],
) {
    let offered = {
        write(transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = read(transport, VIRTIO_MMIO_DEVICE_FEATURES);
        write(transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = read(transport, VIRTIO_MMIO_DEVICE_FEATURES);
        (low, high)
    };
    // Rings start out empty.
    for &(_, available, used) in queues {
        let _ = memory.write_slice(&[0u8; 4], GuestAddress(available));
        let _ = memory.write_slice(&[0u8; 4], GuestAddress(used));
    }
    write(transport, VIRTIO_MMIO_STATUS, 0);
    write(transport, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    let driver = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    write(transport, VIRTIO_MMIO_STATUS, driver);
    write(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write(transport, VIRTIO_MMIO_DRIVER_FEATURES, offered.0);
    write(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write(transport, VIRTIO_MMIO_DRIVER_FEATURES, offered.1);
    let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
    write(transport, VIRTIO_MMIO_STATUS, features_ok);
    for (index, &(table, available, used)) in (0u32..).zip(queues) {
        write(transport, VIRTIO_MMIO_QUEUE_SEL, index);
        write(transport, VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
        write(transport, VIRTIO_MMIO_QUEUE_DESC_LOW, table as u32);
        write(transport, VIRTIO_MMIO_QUEUE_AVAIL_LOW, available as u32);
        write(transport, VIRTIO_MMIO_QUEUE_USED_LOW, used as u32);
        write(transport, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    write(
        transport,
        VIRTIO_MMIO_STATUS,
        features_ok | VIRTIO_CONFIG_S_DRIVER_OK,
    );
}

/// Writes the descriptors of one request, starting at table entry `first`, and returns the
/// next free entry.
fn write_request(input: &mut Input, memory: &GuestMemoryMmap, request: u16, first: u16) -> u16 {
    let header = GuestAddress(HEADERS + u64::from(request) * 16);
    let request_type = match input.byte() % 5 {
        0 => VIRTIO_BLK_T_IN,
        1 => VIRTIO_BLK_T_OUT,
        2 => VIRTIO_BLK_T_FLUSH,
        3 => VIRTIO_BLK_T_GET_ID,
        _ => input.u32(),
    };
    let sector_choice = input.byte();
    let sector = if sector_choice & 0x80 != 0 {
        input.u64()
    } else {
        u64::from(sector_choice) % (DISK_SECTORS + 8)
    };
    let mut header_bytes = [0u8; 16];
    header_bytes[..4].copy_from_slice(&request_type.to_le_bytes());
    header_bytes[8..].copy_from_slice(&sector.to_le_bytes());
    memory.write_slice(&header_bytes, header).expect("header");

    let count = u16::from(input.byte() % 6) + 1;
    let mut index = first;
    for position in 0..count {
        if index >= QUEUE_SIZE {
            break;
        }
        let spec = input.byte();
        let size = input.byte();
        let mut flags = u16::from(spec & 7);
        if position + 1 == count {
            flags &= !NEXT;
        }
        let (address, len) = match (spec >> 3) & 3 {
            0 => (header.0, 16),
            1 => (
                DATA + u64::from(input.u16()) * 8 % (STATUS - DATA),
                SECTOR_SIZE as u32 * u32::from(size % 4) + u32::from(size >> 6),
            ),
            2 => (STATUS + u64::from(size) * 8, 1),
            _ => (
                u64::from(input.u32()) % ADDRESS_SPAN,
                input.u32() >> (size % 32),
            ),
        };
        let (address, len) = if flags & INDIRECT != 0 {
            // An indirect table made of input bytes: whatever they describe.
            let table = INDIRECT_TABLES + u64::from(request) * 0x100;
            let mut entries = [0u8; 0x100];
            for byte in entries.iter_mut().take(usize::from(size)) {
                *byte = input.byte();
            }
            memory
                .write_slice(&entries, GuestAddress(table))
                .expect("indirect table");
            (table, u32::from(size % 17) * 16)
        } else {
            (address, len)
        };
        let next = if spec & 0x20 != 0 {
            u16::from(input.byte())
        } else {
            index + 1
        };
        let descriptor = GuestAddress(DESCRIPTOR_TABLE + u64::from(index) * 16);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&address.to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&flags.to_le_bytes());
        bytes[14..].copy_from_slice(&next.to_le_bytes());
        memory.write_slice(&bytes, descriptor).expect("descriptor");
        index += 1;
    }
    index
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(LOW_RAM.0), LOW_RAM.1 as usize),
        (GuestAddress(HIGH_RAM.0), HIGH_RAM.1 as usize),
    ])
    .expect("guest memory")
}

fn available_entry(position: u16) -> GuestAddress {
    GuestAddress(AVAILABLE_RING + 4 + u64::from(position % QUEUE_SIZE) * 2)
}

fn notify(transport: &mut MmioTransport, queue: u32) {
    write(transport, VIRTIO_MMIO_QUEUE_NOTIFY, queue);
    transport.handle_queue_event(queue as usize);
}

fn access_size(selector: u8) -> usize {
    [1, 2, 4, 8][usize::from(selector % 4)]
}

fn read(transport: &mut MmioTransport, register: u32) -> u32 {
    let mut data = [0u8; 4];
    transport.read(u64::from(register), &mut data);
    u32::from_le_bytes(data)
}

fn write(transport: &mut MmioTransport, register: u32, value: u32) {
    transport.write(u64::from(register), &value.to_le_bytes());
}

/// Fuzz input consumed front to back; reads past the end give zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let count = N.min(self.0.len());
        out[..count].copy_from_slice(&self.0[..count]);
        self.0 = &self.0[count..];
        out
    }

    fn byte(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn block_requests_from_random_bytes(data in vec(any::<u8>(), 0..1024)) {
            virtio_block_request(&data);
        }

        #[test]
        fn transport_registers_from_random_bytes(data in vec(any::<u8>(), 0..1024)) {
            mmio_transport(&data);
        }

        #[test]
        fn network_traffic_from_random_bytes(data in vec(any::<u8>(), 0..2048)) {
            virtio_net_traffic(&data);
        }
    }

    #[test]
    fn a_well_formed_read_completes() {
        // Type IN, sector 3, three descriptors: header, one 512-byte data buffer, status.
        let data = [
            0, // read-write disk
            0,
            3,
            2, // IN, sector 3, three descriptors
            1,
            0, // header, NEXT
            1 << 3 | 2 | 1,
            1,
            0,
            0, // data: device-writable, NEXT, 512 bytes at DATA
            2 << 3 | 2,
            0, // status: device-writable
        ];
        virtio_block_request(&data);
        let memory = memory();
        // The entry point builds its own memory; rerun the request here to see the result.
        let file = TempFile::new().unwrap().into_file();
        file.set_len(DISK_SECTORS * SECTOR_SIZE).unwrap();
        let device = Box::new(VirtioBlock::from_file(file, false).unwrap());
        let (mut transport, line) = start(device, &memory);
        let mut input = Input(&data[1..]);
        let next = write_request(&mut input, &memory, 0, 0);
        assert_eq!(next, 3);
        memory.write_obj(0u16, available_entry(0)).unwrap();
        memory
            .write_obj(1u16, GuestAddress(AVAILABLE_RING + 2))
            .unwrap();
        notify(&mut transport, 0);
        let used: u16 = memory.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        assert_eq!(used, 1);
        let status: u8 = memory.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(status, 0, "request failed");
        let used_len: u32 = memory.read_obj(GuestAddress(USED_RING + 8)).unwrap();
        assert_eq!(used_len, 513);
        assert_eq!(line.count(), 1);
    }
}
