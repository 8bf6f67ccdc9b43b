use std::io::Write;
use std::sync::Arc;

use tempfile::NamedTempFile;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::test_utils::CountingLine;
use crate::virtio::VirtioInterrupt;

const MEMORY_SIZE: u64 = 0x40_0000;
const QUEUE_ADDRESS: u64 = 0x1000;
const QUEUE_SIZE: u16 = 256;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const SECTORS: u64 = 64;

const READ: u16 = 0;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const UNTOUCHED: u8 = 0xee;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
}

/// The image's byte at `offset`: differs between neighbouring bytes and sectors.
fn pattern(offset: u64) -> u8 {
    ((offset / SECTOR_SIZE) as u8).wrapping_mul(31) ^ (offset % 251) as u8
}

fn image(len: u64) -> NamedTempFile {
    let mut file = NamedTempFile::new().unwrap();
    let bytes: Vec<u8> = (0..len).map(pattern).collect();
    file.write_all(&bytes).unwrap();
    file
}

fn open(image: &NamedTempFile, read_only: bool) -> Result<VirtioBlock, BlockError> {
    VirtioBlock::new(BlockConfig {
        path: image.path().to_path_buf(),
        read_only,
        id: "lodge-disk-0".into(),
    })
}

/// A driver for one activated block device on a mock queue.
struct Harness<'a> {
    memory: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    line: Arc<CountingLine>,
    block: VirtioBlock,
    image: NamedTempFile,
    next_descriptor: u16,
}

fn harness(memory: &GuestMemoryMmap, read_only: bool) -> Harness<'_> {
    let image = image(SECTORS * SECTOR_SIZE);
    let mut block = open(&image, read_only).unwrap();
    let mock = MockSplitQueue::create(memory, GuestAddress(QUEUE_ADDRESS), QUEUE_SIZE);
    let line = Arc::new(CountingLine::default());
    let queue: Queue = mock.create_queue().unwrap();
    block
        .activate(Activation {
            memory: memory.clone(),
            queues: vec![queue],
            interrupt: VirtioInterrupt::new(line.clone()),
            features: block.features(),
        })
        .unwrap();
    Harness {
        memory,
        mock,
        line,
        block,
        image,
        next_descriptor: 0,
    }
}

impl Harness<'_> {
    /// Makes `descriptors` available as one chain starting at the next free table entry (their
    /// NEXT flags and indexes are filled in), processes the queue and returns the used length.
    fn submit(&mut self, buffers: &[(u64, u32, u16)]) -> u32 {
        let first = self.next_descriptor;
        let descriptors: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(index, &(addr, len, flags))| {
                let last = index + 1 == buffers.len();
                let flags = if last { flags } else { flags | NEXT };
                let next = first + index as u16 + 1;
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.submit_raw(&descriptors)
    }

    fn submit_raw(&mut self, descriptors: &[RawDescriptor]) -> u32 {
        let first = self.next_descriptor;
        self.mock.add_desc_chains(descriptors, first).unwrap();
        self.next_descriptor += descriptors.len() as u16;
        self.block.process_queue(0).unwrap();
        let used = self.mock.used().idx().load();
        let element = self
            .mock
            .used()
            .ring()
            .ref_at(usize::from(used.wrapping_sub(1) % QUEUE_SIZE))
            .unwrap()
            .load();
        assert_eq!(element.id(), u32::from(first), "wrong chain returned");
        element.len()
    }

    /// Sends a request with the given data buffers; returns its status byte and used length.
    fn request(&mut self, request_type: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        self.write_header(request_type, sector);
        self.memory
            .write_obj(UNTOUCHED, GuestAddress(STATUS))
            .unwrap();
        let mut buffers = vec![(HEADER, 16, READ)];
        buffers.extend_from_slice(data);
        buffers.push((STATUS, 1, WRITE));
        let used = self.submit(&buffers);
        (self.status(), used)
    }

    fn write_header(&self, request_type: u32, sector: u64) {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.memory
            .write_slice(&header, GuestAddress(HEADER))
            .unwrap();
    }

    fn status(&self) -> u8 {
        self.memory.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn guest_bytes(&self, address: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(address))
            .unwrap();
        bytes
    }

    fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self.image.path()).unwrap()
    }
}

fn expected(sector: u64, len: u64) -> Vec<u8> {
    (sector * SECTOR_SIZE..sector * SECTOR_SIZE + len)
        .map(pattern)
        .collect()
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn reads_sectors_into_guest_memory() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    // Two buffers, the second starting mid-page, together three sectors.
    let data = [(DATA, 1024, WRITE), (DATA + 0x1100, 512, WRITE)];
    assert_eq!(harness.request(VIRTIO_BLK_T_IN, 5, &data), (OK, 1537));
    assert_eq!(harness.guest_bytes(DATA, 1024), expected(5, 1024));
    assert_eq!(harness.guest_bytes(DATA + 0x1100, 512), expected(7, 512));
    assert_eq!(harness.line.count(), 1);
}

#[test]
fn writes_reach_the_image() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    memory
        .write_slice(&payload[..512], GuestAddress(DATA))
        .unwrap();
    memory
        .write_slice(&payload[512..], GuestAddress(DATA + 0x3000))
        .unwrap();
    let data = [(DATA, 512, READ), (DATA + 0x3000, 512, READ)];
    assert_eq!(
        harness.request(VIRTIO_BLK_T_OUT, SECTORS - 2, &data),
        (OK, 1)
    );
    let image = harness.image_bytes();
    let start = ((SECTORS - 2) * SECTOR_SIZE) as usize;
    assert_eq!(&image[start..], payload.as_slice());
    assert_eq!(&image[..start], expected(0, start as u64).as_slice());

    // And read back through the device.
    let (status, _) = harness.request(
        VIRTIO_BLK_T_IN,
        SECTORS - 2,
        &[(DATA + 0x8000, 1024, WRITE)],
    );
    assert_eq!(status, OK);
    assert_eq!(harness.guest_bytes(DATA + 0x8000, 1024), payload);
}

#[test]
fn flush_succeeds() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    assert_eq!(harness.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    // A flush carrying data is malformed.
    let (status, _) = harness.request(VIRTIO_BLK_T_FLUSH, 0, &[(DATA, 512, READ)]);
    assert_eq!(status, IOERR);
}

#[test]
fn get_id_returns_the_zero_padded_id() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    memory.write_slice(&[0xaa; 32], GuestAddress(DATA)).unwrap();
    assert_eq!(
        harness.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, WRITE)]),
        (OK, 21)
    );
    let mut id = b"lodge-disk-0".to_vec();
    id.resize(20, 0);
    assert_eq!(harness.guest_bytes(DATA, 20), id);
    assert_eq!(harness.guest_bytes(DATA + 20, 12), vec![0xaa; 12]);
    // A shorter buffer gets what fits.
    assert_eq!(
        harness.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA + 0x100, 5, WRITE)]),
        (OK, 6)
    );
    assert_eq!(harness.guest_bytes(DATA + 0x100, 5), b"lodge");
}

#[test]
fn read_only_disks_refuse_writes_and_say_so() {
    let memory = memory();
    let mut harness = harness(&memory, true);
    assert_ne!(harness.block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let before = harness.image_bytes();
    memory
        .write_slice(&[0x55; 512], GuestAddress(DATA))
        .unwrap();
    let (status, _) = harness.request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, READ)]);
    assert_eq!(status, IOERR);
    assert_eq!(harness.image_bytes(), before);
    // Reads and flushes still work.
    assert_eq!(
        harness.request(VIRTIO_BLK_T_IN, 1, &[(DATA, 512, WRITE)]).0,
        OK
    );
    assert_eq!(harness.request(VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
}

#[test]
fn advertises_capacity_and_limits() {
    let memory = memory();
    let harness = harness(&memory, false);
    let block = &harness.block;
    assert_eq!(block.device_type(), VIRTIO_ID_BLOCK);
    assert_eq!(block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    let mut capacity = [0u8; 8];
    block.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS);
    let mut word = [0u8; 4];
    block.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), SEGMENT_MAX);
    block.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    block.read_config(4, &mut word);
    assert_eq!(word, [0; 4]);
}

#[test]
fn capacity_ignores_a_partial_last_sector() {
    let image = image(3 * SECTOR_SIZE + 100);
    assert_eq!(open(&image, true).unwrap().capacity(), 3);
}

#[test]
fn unsupported_types_get_unsupp() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    for request_type in [2u32, 11, 13, 0xffff_ffff] {
        let (status, used) = harness.request(request_type, 0, &[(DATA, 512, WRITE)]);
        assert_eq!((status, used), (UNSUPP, 1), "type {request_type}");
    }
}

#[test]
fn rejects_sectors_beyond_the_disk() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    memory
        .write_slice(&[0x77; 1024], GuestAddress(DATA))
        .unwrap();
    let before = harness.image_bytes();
    for sector in [SECTORS - 1, SECTORS, u64::MAX, u64::MAX / 512, u64::MAX - 1] {
        let (status, _) = harness.request(VIRTIO_BLK_T_IN, sector, &[(DATA, 1024, WRITE)]);
        assert_eq!(status, IOERR, "read at {sector}");
        let (status, _) = harness.request(VIRTIO_BLK_T_OUT, sector, &[(DATA, 1024, READ)]);
        assert_eq!(status, IOERR, "write at {sector}");
    }
    assert_eq!(harness.image_bytes(), before);
    assert_eq!(harness.guest_bytes(DATA, 1024), vec![0x77; 1024]);
}

#[test]
fn rejects_partial_sectors() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    for data in [
        [(DATA, 511, WRITE)],
        [(DATA, 513, WRITE)],
        [(DATA, 1, WRITE)],
    ] {
        assert_eq!(harness.request(VIRTIO_BLK_T_IN, 0, &data).0, IOERR);
    }
    // Partial buffers adding up to whole sectors are fine.
    let data = [(DATA, 100, WRITE), (DATA + 0x1000, 412, WRITE)];
    assert_eq!(harness.request(VIRTIO_BLK_T_IN, 2, &data), (OK, 513));
    assert_eq!(harness.guest_bytes(DATA, 100), expected(2, 100));
    assert_eq!(
        harness.guest_bytes(DATA + 0x1000, 412),
        expected(2, 512)[100..].to_vec()
    );
}

#[test]
fn rejects_data_buffers_in_the_wrong_direction() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    memory
        .write_slice(&[0x33; 512], GuestAddress(DATA))
        .unwrap();
    let before = harness.image_bytes();
    // A read into a buffer the device may not write.
    assert_eq!(
        harness.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, READ)]).0,
        IOERR
    );
    assert_eq!(harness.guest_bytes(DATA, 512), vec![0x33; 512]);
    // A write from a device-writable buffer, and a mixed one.
    assert_eq!(
        harness
            .request(VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, WRITE)])
            .0,
        IOERR
    );
    let mixed = [(DATA, 512, READ), (DATA + 0x1000, 512, WRITE)];
    assert_eq!(harness.request(VIRTIO_BLK_T_OUT, 0, &mixed).0, IOERR);
    assert_eq!(
        harness
            .request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, READ)])
            .0,
        IOERR
    );
    assert_eq!(harness.image_bytes(), before);
}

#[test]
fn rejects_malformed_headers() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    harness.write_header(VIRTIO_BLK_T_IN, 0);
    for header in [(HEADER, 16, WRITE), (HEADER, 8, READ), (HEADER, 32, READ)] {
        memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        harness.submit(&[header, (DATA, 512, WRITE), (STATUS, 1, WRITE)]);
        assert_eq!(harness.status(), IOERR, "{header:?}");
    }
    // Only a status buffer.
    memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    assert_eq!(harness.submit(&[(STATUS, 1, WRITE)]), 1);
    assert_eq!(harness.status(), IOERR);
}

#[test]
fn a_request_without_a_usable_status_buffer_is_dropped() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    harness.write_header(VIRTIO_BLK_T_IN, 0);
    memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    for status in [
        (STATUS, 1, READ),
        (STATUS, 0, WRITE),
        (MEMORY_SIZE, 1, WRITE),
    ] {
        let used = harness.submit(&[(HEADER, 16, READ), (DATA, 512, WRITE), status]);
        assert_eq!(used, 0, "{status:?}");
    }
    assert_eq!(harness.status(), UNTOUCHED);
    // The device carries on.
    assert_eq!(
        harness.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]).0,
        OK
    );
}

#[test]
fn data_outside_guest_memory_gets_ioerr() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    let before = harness.image_bytes();
    for data in [
        (MEMORY_SIZE - 256, 512, WRITE),
        (MEMORY_SIZE, 512, WRITE),
        (u64::MAX - 511, 512, WRITE),
    ] {
        assert_eq!(
            harness.request(VIRTIO_BLK_T_IN, 0, &[data]).0,
            IOERR,
            "{data:?}"
        );
        let read = (data.0, data.1, READ);
        assert_eq!(
            harness.request(VIRTIO_BLK_T_OUT, 0, &[read]).0,
            IOERR,
            "{data:?}"
        );
    }
    // A header outside memory too.
    memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    harness.submit(&[(MEMORY_SIZE + 16, 16, READ), (STATUS, 1, WRITE)]);
    assert_eq!(harness.status(), IOERR);
    assert_eq!(harness.image_bytes(), before);
}

#[test]
fn looping_and_overlong_chains_are_dropped() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    harness.write_header(VIRTIO_BLK_T_IN, 0);
    memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let first = harness.next_descriptor;
    let looping = [
        RawDescriptor::from(Descriptor::new(HEADER, 16, NEXT, first + 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, NEXT | WRITE, first)),
    ];
    assert_eq!(harness.submit_raw(&looping), 0);
    let mut overlong = vec![(HEADER, 16, READ)];
    overlong.extend((0..SEGMENT_MAX + 1).map(|i| (DATA + u64::from(i) * 512, 512, WRITE)));
    overlong.push((STATUS, 1, WRITE));
    assert_eq!(harness.submit(&overlong), 0);
    assert_eq!(harness.status(), UNTOUCHED);
    // The queue still works.
    assert_eq!(
        harness.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]).0,
        OK
    );
}

#[test]
fn indirect_requests_work_and_malformed_tables_are_dropped() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    harness.write_header(VIRTIO_BLK_T_IN, 3);
    let table = 0x38_0000u64;
    let entries = [
        Descriptor::new(HEADER, 16, NEXT, 1),
        Descriptor::new(DATA, 512, NEXT | WRITE, 2),
        Descriptor::new(STATUS, 1, WRITE, 0),
    ];
    for (index, entry) in entries.iter().enumerate() {
        memory
            .write_obj(*entry, GuestAddress(table + 16 * index as u64))
            .unwrap();
    }
    let indirect = VRING_DESC_F_INDIRECT as u16;
    let used = harness.submit_raw(&[RawDescriptor::from(Descriptor::new(table, 48, indirect, 0))]);
    assert_eq!((harness.status(), used), (OK, 513));
    assert_eq!(harness.guest_bytes(DATA, 512), expected(3, 512));

    // The same table, but its last entry points past its end.
    memory
        .write_obj(
            Descriptor::new(STATUS, 1, WRITE | NEXT, 7),
            GuestAddress(table + 32),
        )
        .unwrap();
    memory.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    let used = harness.submit_raw(&[RawDescriptor::from(Descriptor::new(table, 48, indirect, 0))]);
    assert_eq!((harness.status(), used), (UNTOUCHED, 0));
    // A table whose length is not a multiple of 16.
    let used = harness.submit_raw(&[RawDescriptor::from(Descriptor::new(table, 40, indirect, 0))]);
    assert_eq!(used, 0);
}

#[test]
fn failed_host_io_gets_ioerr() {
    let memory = memory();
    let mut harness = harness(&memory, false);
    // The image shrinks under the device: reads past its new end fail.
    harness.image.as_file().set_len(SECTOR_SIZE).unwrap();
    let (status, used) = harness.request(VIRTIO_BLK_T_IN, 10, &[(DATA, 512, WRITE)]);
    assert_eq!((status, used), (IOERR, 1));
    assert_eq!(
        harness.request(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]).0,
        OK
    );
}

#[test]
fn images_are_locked_against_a_second_writer() {
    let image = image(SECTORS * SECTOR_SIZE);
    let writer = open(&image, false).unwrap();
    assert!(matches!(
        open(&image, false),
        Err(BlockError::Locked { .. })
    ));
    assert!(matches!(open(&image, true), Err(BlockError::Locked { .. })));
    drop(writer);
    let reader = open(&image, true).unwrap();
    let second_reader = open(&image, true).unwrap();
    assert!(matches!(
        open(&image, false),
        Err(BlockError::Locked { .. })
    ));
    drop((reader, second_reader));
    assert!(open(&image, false).is_ok());
}

#[test]
fn refuses_bad_configurations() {
    let image = image(SECTOR_SIZE);
    let long_id = VirtioBlock::new(BlockConfig {
        path: image.path().to_path_buf(),
        read_only: true,
        id: "x".repeat(21),
    });
    assert!(matches!(long_id, Err(BlockError::IdTooLong { .. })));
    let missing = VirtioBlock::new(BlockConfig {
        path: "/nonexistent/lodge/disk.img".into(),
        read_only: true,
        id: String::new(),
    });
    assert!(matches!(missing, Err(BlockError::Open { .. })));
}

#[test]
fn processing_requires_activation() {
    let image = image(SECTOR_SIZE);
    let mut block = open(&image, true).unwrap();
    assert!(matches!(
        block.process_queue(0),
        Err(DeviceError::NotActivated)
    ));
    let memory = memory();
    let mut harness = harness(&memory, false);
    assert!(matches!(
        harness.block.process_queue(1),
        Err(DeviceError::NoSuchQueue(1))
    ));
    harness.block.reset();
    assert!(matches!(
        harness.block.process_queue(0),
        Err(DeviceError::NotActivated)
    ));
}
