//! The virtio-mmio transport, version 2 (virtio 1.x §4.2.2).
//!
//! Register accesses come from vCPU threads through [`BusDevice`]; queue work happens on the
//! VMM's event loop thread. The two meet at one eventfd per queue: a QueueNotify write that
//! reaches the bus signals the queue's eventfd (a KVM ioeventfd may signal it without a trip
//! through the bus), and the event loop, through [`MutEventSubscriber`], drains it and has the
//! device process the queue.

use std::io;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lodge_bus::{BusDevice, InterruptLine};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, VirtioDevice, VirtioInterrupt};
use crate::logging::{error_chain, LogLimiter};
use std::sync::Arc;

/// Length of one device's MMIO window.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register in the window, where the driver writes a queue's index.
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// "virt", little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
const VERSION: u32 = 2;
/// "lodg", little-endian; the Linux driver does not care which vendor it is.
const VENDOR_ID: u32 = 0x6764_6f6c;
/// Where the device configuration space starts.
const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// What the shared memory length and base registers read when the selected region does not
/// exist (none do).
const NO_SHARED_MEMORY: u32 = u32::MAX;

/// The kernel command-line argument that announces a virtio-mmio device at `base` raising
/// `irq`, for a kernel without ACPI or device tree.
pub fn kernel_cmdline_arg(base: u64, irq: u32) -> String {
    format!("virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// Errors from building a transport or from the driver's attempt to start the device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue's notification eventfd could not be created.
    #[error("Failed to create the notification eventfd of queue {index}")]
    QueueEvent {
        index: usize,
        #[source]
        source: io::Error,
    },
    /// The device offers a queue whose maximum size is 0, above 32768 or not a power of two.
    #[error("Device offers queue {index} with invalid maximum size {size}")]
    QueueMaxSize { index: usize, size: u16 },
    /// The device does not offer VIRTIO_F_VERSION_1, which this transport requires.
    #[error("Device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// The driver set DRIVER_OK before FEATURES_OK.
    #[error("Driver set DRIVER_OK without FEATURES_OK")]
    FeaturesNotNegotiated,
    /// A ready queue has a size or ring address the spec forbids.
    #[error("Queue {index} has an invalid {field}")]
    InvalidQueue { index: usize, field: &'static str },
    /// A ready queue's rings do not lie in guest memory.
    #[error("Queue {index} rings lie outside guest memory")]
    QueueOutsideMemory { index: usize },
    /// The device refused to start or failed while running.
    #[error("Device failed")]
    Device(#[source] DeviceError),
}

/// The registers of one queue, as the driver wrote them.
#[derive(Debug, Clone)]
struct QueueRegisters {
    max_size: u16,
    size: u32,
    ready: bool,
    descriptor_table: u64,
    available_ring: u64,
    used_ring: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: u32::from(max_size),
            ready: false,
            descriptor_table: 0,
            available_ring: 0,
            used_ring: 0,
        }
    }

    /// The queue the device gets: checked against the spec and guest memory when ready.
    fn build(
        &self,
        index: usize,
        memory: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, MmioError> {
        let invalid = |field| MmioError::InvalidQueue { index, field };
        let mut queue = Queue::new(self.max_size).map_err(|_| invalid("maximum size"))?;
        if !self.ready {
            return Ok(queue);
        }
        let size = u16::try_from(self.size).map_err(|_| invalid("size"))?;
        queue.try_set_size(size).map_err(|_| invalid("size"))?;
        queue
            .try_set_desc_table_address(GuestAddress(self.descriptor_table))
            .map_err(|_| invalid("descriptor table address"))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.available_ring))
            .map_err(|_| invalid("available ring address"))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| invalid("used ring address"))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(memory) {
            return Err(MmioError::QueueOutsideMemory { index });
        }
        Ok(queue)
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: VirtioInterrupt,
    queue_events: Vec<EventFd>,
    queues: Vec<QueueRegisters>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// The driver set a feature bit above 63, which no device here offers.
    driver_features_invalid: bool,
    status: u32,
    activated: bool,
    log: LogLimiter,
}

impl MmioTransport {
    /// Wraps `device`, whose queues live in `memory` and whose interrupts raise `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptLine>,
    ) -> Result<Self, MmioError> {
        if device.features() & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(MmioError::NotModern);
        }
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(MmioError::QueueMaxSize { index, size });
            }
            queues.push(QueueRegisters::new(size));
            queue_events.push(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEvent { index, source })?,
            );
        }
        Ok(Self {
            device,
            memory,
            interrupt: VirtioInterrupt::new(interrupt),
            queue_events,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_features_invalid: false,
            status: 0,
            activated: false,
            log: LogLimiter::new(),
        })
    }

    /// Each queue's index and notification eventfd. The VMM may register them as ioeventfds
    /// at `base +` [`QUEUE_NOTIFY_OFFSET`] matching the queue index.
    pub fn queue_notifiers(&self) -> impl Iterator<Item = (u32, &EventFd)> {
        (0u32..).zip(self.queue_events.iter())
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the driver started the device and it accepted its queues.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Drains queue `index`'s eventfd and has the device process the queue if it is running.
    pub fn handle_queue_event(&mut self, index: usize) {
        let Some(event) = self.queue_events.get(index) else {
            return;
        };
        if let Err(error) = event.read() {
            if error.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(%error, "virtio-mmio: failed to read queue {index}'s eventfd");
            }
        }
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if let Err(error) = self.device.process_queue(index) {
            self.needs_reset(MmioError::Device(error));
        }
    }

    /// Has the device handle its event source `source` if it is running.
    pub fn handle_device_event(&mut self, source: usize) {
        if !self.activated || self.status & VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            return;
        }
        if let Err(error) = self.device.process_event(source) {
            self.needs_reset(MmioError::Device(error));
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    fn read_register(&self, register: u32) -> u32 {
        let queue = self.selected_queue();
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_NUM => queue.map_or(0, |q| q.size),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| q.descriptor_table as u32),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.descriptor_table >> 32) as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| q.available_ring as u32),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| (q.available_ring >> 32) as u32),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| q.used_ring as u32),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| (q.used_ring >> 32) as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => NO_SHARED_MEMORY,
            VIRTIO_MMIO_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, register: u32, value: u32) {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue(|q| q.size = value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.write_queue(|q| set_low(&mut q.descriptor_table, value))
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.write_queue(|q| set_high(&mut q.descriptor_table, value))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.write_queue(|q| set_low(&mut q.available_ring, value))
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.write_queue(|q| set_high(&mut q.available_ring, value))
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue(|q| set_low(&mut q.used_ring, value)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue(|q| set_high(&mut q.used_ring, value)),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => {}
            _ => self.warn(format_args!(
                "ignored a write of {value:#x} to register {register:#x}"
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            self.warn(format_args!("ignored a feature write after FEATURES_OK"));
            return;
        }
        match self.driver_features_select {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            _ if value != 0 => self.driver_features_invalid = true,
            _ => {}
        }
    }

    /// Applies a write to the selected queue's configuration, which is frozen once the queue
    /// is ready or the device is running.
    fn write_queue(&mut self, update: impl FnOnce(&mut QueueRegisters)) {
        let frozen = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let index = self.queue_select;
        match self.queues.get_mut(index as usize) {
            Some(queue) if !frozen && !queue.ready => update(queue),
            Some(_) => self.warn(format_args!(
                "ignored a configuration write to queue {index}, which is in use"
            )),
            None => self.warn(format_args!(
                "ignored a configuration write to queue {index}, which does not exist"
            )),
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let frozen = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0;
        let index = self.queue_select;
        match self.queues.get_mut(index as usize) {
            Some(queue) if !frozen => queue.ready = value == 1,
            _ => self.warn(format_args!("ignored QueueReady write to queue {index}")),
        }
    }

    fn notify(&mut self, value: u32) {
        match self.queue_events.get(value as usize) {
            Some(event) => {
                if let Err(error) = event.write(1) {
                    tracing::error!(%error, "virtio-mmio: failed to signal queue {value}'s eventfd");
                }
            }
            None => self.warn(format_args!("notification for missing queue {value}")),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set; the driver neither sets nor clears it.
        let device_bits = self.status & VIRTIO_CONFIG_S_NEEDS_RESET;
        let driver_bits = self.status & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let requested = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        if requested & driver_bits != driver_bits {
            let current = self.status;
            self.warn(format_args!(
                "ignored status {value:#x}: the driver may not clear bits of {current:#x}"
            ));
            return;
        }
        let added = requested & !driver_bits;
        let mut status = requested;
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.features_acceptable() {
            let (requested, offered) = (self.driver_features, self.device.features());
            self.warn(format_args!(
                "refused FEATURES_OK for features {requested:#x} (device offers {offered:#x})"
            ));
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
        }
        self.status = status | device_bits;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        {
            if let Err(error) = self.activate() {
                self.needs_reset(error);
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        !self.driver_features_invalid
            && self.driver_features & !self.device.features() == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(MmioError::FeaturesNotNegotiated);
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, registers)| registers.build(index, &self.memory, event_idx))
            .collect::<Result<Vec<_>, _>>()?;
        self.device
            .activate(super::Activation {
                memory: self.memory.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                features: self.driver_features,
            })
            .map_err(MmioError::Device)?;
        self.activated = true;
        Ok(())
    }

    /// Stops the device until the driver resets it, and tells the driver so.
    fn needs_reset(&mut self, error: MmioError) {
        tracing::error!(
            "virtio-mmio: device {} needs a reset: {}",
            self.device.device_type(),
            error_chain(&error)
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.signal_config_change();
    }

    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.status = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_features_invalid = false;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        self.interrupt.clear();
        // Notifications meant for the old queues must not reach the new ones.
        for event in &self.queue_events {
            let _ = event.read();
        }
    }

    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                suppressed,
                "virtio-mmio: device {}: {message}",
                self.device.device_type()
            );
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_access(offset, data.len()) {
            Some(register) => data.copy_from_slice(&self.read_register(register).to_le_bytes()),
            None => {
                data.fill(0);
                self.warn(format_args!(
                    "ignored a {}-byte read at {offset:#x}",
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match (
            register_access(offset, data.len()),
            <[u8; 4]>::try_from(data),
        ) {
            (Some(register), Ok(bytes)) => self.write_register(register, u32::from_le_bytes(bytes)),
            _ => self.warn(format_args!(
                "ignored a {}-byte write at {offset:#x}",
                data.len()
            )),
        }
    }
}

impl MutEventSubscriber for MmioTransport {
    /// Event data below the queue count is a queue's notification; from there on, the
    /// device's own event sources in order.
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data() as usize;
        match data.checked_sub(self.queues.len()) {
            None => self.handle_queue_event(data),
            Some(source) => self.handle_device_event(source),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_notifiers() {
            if let Err(error) = ops.add(Events::with_data(event, index, EventSet::IN)) {
                tracing::error!(%error, "virtio-mmio: failed to watch queue {index}'s eventfd");
            }
        }
        let first = self.queues.len() as u32;
        for (index, (fd, set)) in (first..).zip(self.device.event_sources()) {
            if let Err(error) = ops.add(Events::with_data_raw(fd, index, set)) {
                tracing::error!(%error, "virtio-mmio: failed to watch a device descriptor");
            }
        }
    }
}

/// The register a 4-byte, 4-aligned access below the configuration space targets; registers
/// take no other accesses.
fn register_access(offset: u64, len: usize) -> Option<u32> {
    if len == 4 && offset.is_multiple_of(4) && offset < CONFIG_SPACE_OFFSET {
        u32::try_from(offset).ok()
    } else {
        None
    }
}

fn set_low(field: &mut u64, value: u32) {
    *field = (*field & !0xffff_ffff) | u64::from(value);
}

fn set_high(field: &mut u64, value: u32) {
    *field = (*field & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests;
