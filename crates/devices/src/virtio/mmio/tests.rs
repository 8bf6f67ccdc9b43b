use std::sync::Mutex;

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;

use super::*;
use crate::virtio::test_utils::CountingLine;
use crate::virtio::{Activation, VirtioRng, COMMON_FEATURES};

const MEMORY_SIZE: u64 = 0x40_0000;
const QUEUE_ADDRESS: u64 = 0x1_0000;
const QUEUE_SIZE: u16 = 16;
const BUFFER: u64 = 0x20_0000;
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const DRIVER_STARTED: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
}

fn rng_transport(memory: &GuestMemoryMmap) -> (MmioTransport, Arc<CountingLine>) {
    let line = Arc::new(CountingLine::default());
    let transport =
        MmioTransport::new(Box::new(VirtioRng::new()), memory.clone(), line.clone()).unwrap();
    (transport, line)
}

fn read32(transport: &mut MmioTransport, register: u32) -> u32 {
    let mut data = [0u8; 4];
    transport.read(u64::from(register), &mut data);
    u32::from_le_bytes(data)
}

fn write32(transport: &mut MmioTransport, register: u32, value: u32) {
    transport.write(u64::from(register), &value.to_le_bytes());
}

/// The driver side of feature negotiation; returns the status it reads back.
fn negotiate(transport: &mut MmioTransport, features: u64) -> u32 {
    write32(transport, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    write32(transport, VIRTIO_MMIO_STATUS, DRIVER_STARTED);
    for select in 0..2u32 {
        write32(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
        write32(
            transport,
            VIRTIO_MMIO_DRIVER_FEATURES,
            (features >> (32 * select)) as u32,
        );
    }
    write32(
        transport,
        VIRTIO_MMIO_STATUS,
        DRIVER_STARTED | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    read32(transport, VIRTIO_MMIO_STATUS)
}

fn set_queue(transport: &mut MmioTransport, size: u32, desc: u64, avail: u64, used: u64) {
    write32(transport, VIRTIO_MMIO_QUEUE_SEL, 0);
    write32(transport, VIRTIO_MMIO_QUEUE_NUM, size);
    for (low, value) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, used),
    ] {
        write32(transport, low, value as u32);
        write32(transport, low + 4, (value >> 32) as u32);
    }
    write32(transport, VIRTIO_MMIO_QUEUE_READY, 1);
}

fn set_mock_queue(transport: &mut MmioTransport, mock: &MockSplitQueue<GuestMemoryMmap>) {
    set_queue(
        transport,
        u32::from(QUEUE_SIZE),
        mock.desc_table_addr().0,
        mock.avail_addr().0,
        mock.used_addr().0,
    );
}

fn driver_ok(transport: &mut MmioTransport) -> u32 {
    let status = read32(transport, VIRTIO_MMIO_STATUS);
    write32(
        transport,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    read32(transport, VIRTIO_MMIO_STATUS)
}

/// A transport whose rng device the driver has fully started on a mock queue.
fn started<'a>(
    memory: &'a GuestMemoryMmap,
) -> (
    MmioTransport,
    Arc<CountingLine>,
    MockSplitQueue<'a, GuestMemoryMmap>,
) {
    let (mut transport, line) = rng_transport(memory);
    let mock = MockSplitQueue::create(memory, GuestAddress(QUEUE_ADDRESS), QUEUE_SIZE);
    negotiate(&mut transport, VERSION_1);
    set_mock_queue(&mut transport, &mock);
    let status = driver_ok(&mut transport);
    assert_eq!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(transport.is_activated());
    (transport, line, mock)
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

fn notify(transport: &mut MmioTransport) {
    write32(transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    transport.handle_queue_event(0);
}

fn assert_needs_reset(transport: &mut MmioTransport, line: &CountingLine) {
    assert_ne!(
        read32(transport, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
    assert_ne!(
        read32(transport, VIRTIO_MMIO_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
        0
    );
    assert!(line.count() > 0, "the driver was not told");
}

#[test]
fn identifies_itself() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_RNG);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
}

#[test]
fn feature_words_follow_the_select_register() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES),
        COMMON_FEATURES as u32
    );
    write32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES),
        (COMMON_FEATURES >> 32) as u32
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES) & 1, 1);
    write32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_DEVICE_FEATURES), 0);
}

#[test]
fn accepts_offered_features() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    let status = negotiate(&mut transport, COMMON_FEATURES);
    assert_eq!(status, DRIVER_STARTED | VIRTIO_CONFIG_S_FEATURES_OK);
}

#[test]
fn refuses_features_the_device_did_not_offer() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    let status = negotiate(&mut transport, VERSION_1 | 1);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn requires_version_1() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    let status = negotiate(&mut transport, COMMON_FEATURES & !VERSION_1);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn refuses_feature_bits_above_63() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    let status = negotiate(&mut transport, VERSION_1);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn features_are_frozen_after_features_ok() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    negotiate(&mut transport, VERSION_1);
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write32(&mut transport, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    assert_eq!(transport.driver_features, VERSION_1);
}

#[test]
fn the_driver_cannot_clear_status_bits() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    negotiate(&mut transport, VERSION_1);
    write32(
        &mut transport,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE,
    );
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_STATUS),
        DRIVER_STARTED | VIRTIO_CONFIG_S_FEATURES_OK
    );
    // Nor set DEVICE_NEEDS_RESET itself.
    write32(
        &mut transport,
        VIRTIO_MMIO_STATUS,
        DRIVER_STARTED | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
    );
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

/// The arrangement the VMM uses: one `Arc<Mutex<MmioTransport>>` on the bus and in the event
/// manager; the notification crosses over through the queue's eventfd.
#[test]
fn notifications_reach_the_device_through_the_event_loop() {
    let memory = memory();
    let (transport, line, mock) = started(&memory);
    let transport = Arc::new(Mutex::new(transport));
    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    event_manager.add_subscriber(transport.clone());

    mock.add_desc_chains(&[writable(BUFFER, 32)], 0).unwrap();
    let bus_device: Arc<Mutex<dyn BusDevice>> = transport.clone();
    bus_device
        .lock()
        .unwrap()
        .write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &0u32.to_le_bytes());
    // Nothing happens on the vCPU's side of the notification.
    assert_eq!(mock.used().idx().load(), 0);

    assert_eq!(event_manager.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(mock.used().idx().load(), 1);
    assert_eq!(mock.used().ring().ref_at(0).unwrap().load().len(), 32);
    let mut transport = transport.lock().unwrap();
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );
    assert_eq!(line.count(), 1);
    write32(
        &mut transport,
        VIRTIO_MMIO_INTERRUPT_ACK,
        VIRTIO_MMIO_INT_VRING,
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    let notifiers: Vec<u32> = transport
        .queue_notifiers()
        .map(|(index, _)| index)
        .collect();
    assert_eq!(notifiers, vec![0]);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let event = transport.queue_events[0].try_clone().unwrap();
    assert_eq!(event.read().unwrap(), 2);
    // A notification for a queue that does not exist goes nowhere.
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert!(event.read().is_err());
}

#[test]
fn notifications_before_driver_ok_are_ignored() {
    let memory = memory();
    let (mut transport, _) = rng_transport(&memory);
    let mock = MockSplitQueue::create(&memory, GuestAddress(QUEUE_ADDRESS), QUEUE_SIZE);
    negotiate(&mut transport, VERSION_1);
    set_mock_queue(&mut transport, &mock);
    mock.add_desc_chains(&[writable(BUFFER, 32)], 0).unwrap();
    notify(&mut transport);
    assert_eq!(mock.used().idx().load(), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn driver_ok_without_features_ok_needs_reset() {
    let memory = memory();
    let (mut transport, line) = rng_transport(&memory);
    let mock = MockSplitQueue::create(&memory, GuestAddress(QUEUE_ADDRESS), QUEUE_SIZE);
    write32(&mut transport, VIRTIO_MMIO_STATUS, DRIVER_STARTED);
    set_mock_queue(&mut transport, &mock);
    driver_ok(&mut transport);
    assert!(!transport.is_activated());
    assert_needs_reset(&mut transport, &line);
}

#[test]
fn invalid_queues_need_reset() {
    let cases: [(&str, u32, u64, u64, u64); 8] = [
        ("rings outside memory", 16, MEMORY_SIZE, 0x2000, 0x3000),
        ("used ring at the end", 16, 0x1000, 0x2000, MEMORY_SIZE - 8),
        ("addresses near 2^64", 16, u64::MAX - 0xff, 0x2000, 0x3000),
        ("misaligned descriptors", 16, 0x1008, 0x2000, 0x3000),
        ("misaligned used ring", 16, 0x1000, 0x2000, 0x3002),
        ("size not a power of two", 12, 0x1000, 0x2000, 0x3000),
        ("size above the maximum", 512, 0x1000, 0x2000, 0x3000),
        ("size zero", 0, 0x1000, 0x2000, 0x3000),
    ];
    for (name, size, desc, avail, used) in cases {
        let memory = memory();
        let (mut transport, line) = rng_transport(&memory);
        negotiate(&mut transport, VERSION_1);
        set_queue(&mut transport, size, desc, avail, used);
        driver_ok(&mut transport);
        assert!(!transport.is_activated(), "{name}");
        assert_needs_reset(&mut transport, &line);
        // Notifications are ignored until the driver resets the device.
        notify(&mut transport);
    }
}

#[test]
fn an_avail_index_jump_needs_reset_and_a_reset_recovers() {
    let memory = memory();
    let (mut transport, line, mock) = started(&memory);
    mock.avail().idx().store(QUEUE_SIZE + 1);
    notify(&mut transport);
    assert_needs_reset(&mut transport, &line);
    assert_eq!(mock.used().idx().load(), 0);

    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(!transport.is_activated());

    mock.avail().idx().store(0);
    negotiate(&mut transport, VERSION_1);
    set_mock_queue(&mut transport, &mock);
    assert_eq!(driver_ok(&mut transport) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    mock.add_desc_chains(&[writable(BUFFER, 8)], 0).unwrap();
    notify(&mut transport);
    assert_eq!(mock.used().idx().load(), 1);
}

#[test]
fn a_head_index_beyond_the_queue_needs_reset() {
    let memory = memory();
    let (mut transport, line, mock) = started(&memory);
    mock.avail().ring().ref_at(0).unwrap().store(QUEUE_SIZE + 3);
    mock.avail().idx().store(1);
    notify(&mut transport);
    assert_needs_reset(&mut transport, &line);
}

#[test]
fn reset_returns_every_register_to_its_initial_value() {
    let memory = memory();
    let (mut transport, _, mock) = started(&memory);
    mock.add_desc_chains(&[writable(BUFFER, 8)], 0).unwrap();
    notify(&mut transport);
    assert_ne!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    write32(&mut transport, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_STATUS), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_NUM), 256);
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    assert_eq!(transport.driver_features, 0);
    // The pending notification was dropped with the old queue.
    let (_, event) = transport.queue_notifiers().next().unwrap();
    assert!(event.read().is_err());
}

#[test]
fn queue_configuration_is_frozen_while_in_use() {
    let memory = memory();
    let (mut transport, _, mock) = started(&memory);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000);
    write32(&mut transport, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(
        u64::from(read32(&mut transport, VIRTIO_MMIO_QUEUE_DESC_LOW)),
        mock.desc_table_addr().0
    );
    assert_eq!(read32(&mut transport, VIRTIO_MMIO_QUEUE_READY), 1);
}

#[test]
fn odd_accesses_are_harmless() {
    let memory = memory();
    let (mut transport, _, _) = started(&memory);
    for offset in [0u64, 1, 2, 3, 0x50, 0x70, 0xfc, 0xfe] {
        for len in [1usize, 2, 8] {
            let mut data = vec![0xaa; len];
            transport.read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0), "{offset:#x}/{len}");
            transport.write(offset, &data);
        }
    }
    // Unaligned 4-byte accesses are not registers either.
    let mut data = [0xaau8; 4];
    transport.read(0x71, &mut data);
    assert_eq!(data, [0; 4]);
    transport.write(0x71, &[0; 4]);
    // Configuration space of any size and offset, up to the end of the window and past it.
    for (offset, len) in [
        (0x100u64, 1usize),
        (0x101, 8),
        (0xfff, 1),
        (0x1000, 4),
        (u64::MAX, 1),
    ] {
        let mut data = vec![0xaa; len];
        transport.read(offset, &mut data);
        assert!(data.iter().all(|b| *b == 0));
        transport.write(offset, &data);
    }
    transport.write(0x70, &[]);
    // Still running.
    assert!(transport.is_activated());
    assert_eq!(
        read32(&mut transport, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET,
        0
    );
}

#[test]
fn kernel_cmdline_arg_uses_the_linux_syntax() {
    assert_eq!(
        kernel_cmdline_arg(0xd000_1000, 5),
        "virtio_mmio.device=4K@0xd0001000:5"
    );
}

/// A device with configurable offers, to check what the transport accepts.
struct FakeDevice {
    features: u64,
    sizes: Vec<u16>,
    fail_activation: bool,
    /// Which queues were ready at activation.
    activated_with: Arc<Mutex<Option<Vec<bool>>>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x11);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        let ready = activation.queues.iter().map(|q| q.ready()).collect();
        *self.activated_with.lock().unwrap() = Some(ready);
        if self.fail_activation {
            // As a device would that needs a queue the driver did not give it.
            Err(DeviceError::NoSuchQueue(self.sizes.len()))
        } else {
            Ok(())
        }
    }
    fn process_queue(&mut self, _index: usize) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

fn fake(features: u64, sizes: &[u16], fail_activation: bool) -> Box<dyn VirtioDevice> {
    fake_recording(features, sizes, fail_activation, Arc::default())
}

fn fake_recording(
    features: u64,
    sizes: &[u16],
    fail_activation: bool,
    activated_with: Arc<Mutex<Option<Vec<bool>>>>,
) -> Box<dyn VirtioDevice> {
    Box::new(FakeDevice {
        features,
        sizes: sizes.to_vec(),
        fail_activation,
        activated_with,
    })
}

#[test]
fn rejects_devices_the_transport_cannot_carry() {
    let memory = memory();
    let line = Arc::new(CountingLine::default());
    let legacy = MmioTransport::new(fake(0, &[16], false), memory.clone(), line.clone());
    assert!(matches!(legacy, Err(MmioError::NotModern)));
    for size in [0u16, 3, 65535] {
        let result = MmioTransport::new(
            fake(VERSION_1, &[16, size], false),
            memory.clone(),
            line.clone(),
        );
        assert!(
            matches!(result, Err(MmioError::QueueMaxSize { index: 1, size: s }) if s == size),
            "{size}"
        );
    }
}

#[test]
fn a_device_refusing_activation_needs_reset() {
    let memory = memory();
    let line = Arc::new(CountingLine::default());
    let mut transport =
        MmioTransport::new(fake(VERSION_1, &[16, 16], true), memory, line.clone()).unwrap();
    negotiate(&mut transport, VERSION_1);
    driver_ok(&mut transport);
    assert!(!transport.is_activated());
    assert_needs_reset(&mut transport, &line);
}

#[test]
fn queues_the_driver_leaves_unready_are_passed_unready() {
    let memory = memory();
    let line = Arc::new(CountingLine::default());
    let activated_with = Arc::default();
    let device = fake_recording(VERSION_1, &[16, 16], false, Arc::clone(&activated_with));
    let mut transport = MmioTransport::new(device, memory, line).unwrap();
    negotiate(&mut transport, VERSION_1);
    set_queue(&mut transport, 16, 0x1000, 0x2000, 0x3000);
    assert_eq!(driver_ok(&mut transport) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert!(transport.is_activated());
    assert_eq!(*activated_with.lock().unwrap(), Some(vec![true, false]));
    // Configuration space goes to the device.
    let mut data = [0u8; 2];
    transport.read(0x102, &mut data);
    assert_eq!(data, [0x11, 0x11]);
}
