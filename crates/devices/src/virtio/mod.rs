//! Virtio devices and their MMIO transport.
//!
//! A [`VirtioDevice`] implements one device type (block, rng, ...) against guest memory and
//! split virtqueues; the [`MmioTransport`] exposes it to the guest as a virtio-mmio version 2
//! register window, negotiates features, collects the queue configuration and hands it to the
//! device when the driver is ready ([`Activation`]). Devices report used buffers and
//! configuration changes through a [`VirtioInterrupt`].

mod block;
mod chain;
mod mmio;
pub mod net;
mod queue;
mod rng;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use lodge_bus::InterruptLine;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;

use crate::logging::LogLimiter;
use queue::process_available;

pub use block::{BlockConfig, BlockError, VirtioBlock, SECTOR_SIZE};
pub use chain::ChainError;
pub use mmio::{kernel_cmdline_arg, MmioError, MmioTransport, MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
pub use queue::QueueError;
pub use rng::VirtioRng;

/// Features every device here offers: the modern interface, indirect descriptor tables and
/// used/available event indexes (fewer notifications and interrupts).
pub const COMMON_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// One virtio device type, independent of the transport that carries it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; the device has as many queues as entries. Each size is
    /// a power of two no larger than 32768.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers (including [`COMMON_FEATURES`] it supports).
    fn features(&self) -> u64;

    /// Reads `data.len()` bytes of the device configuration space at `offset`. Bytes beyond
    /// the configuration space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Handles a driver write to the configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the queues the driver set up: one per
    /// [`VirtioDevice::queue_max_sizes`] entry, those the driver did not make ready too.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;

    /// Processes the buffers the driver made available on queue `index`. An error means the
    /// device cannot go on without a reset (the transport then sets DEVICE_NEEDS_RESET);
    /// malformed requests are answered with an error status instead.
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError>;

    /// Returns the device to its state before activation.
    fn reset(&mut self);

    /// Descriptors besides the queues' notifications that the device wants watched on the
    /// event loop (a network backend), with the events; watched from when the transport is
    /// added to the event loop.
    fn event_sources(&self) -> Vec<(std::os::fd::RawFd, event_manager::EventSet)> {
        Vec::new()
    }

    /// Event source `source` (an index into [`VirtioDevice::event_sources`]) is ready. Called
    /// only while the device is activated; an error means the device needs a reset.
    fn process_event(&mut self, source: usize) -> Result<(), DeviceError> {
        let _ = source;
        Ok(())
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory the queues and buffers live in.
    pub memory: GuestMemoryMmap,
    /// One per [`VirtioDevice::queue_max_sizes`] entry (the transport builds them from it),
    /// configured as the driver left them.
    pub queues: Vec<Queue>,
    /// Where used-buffer and configuration-change notifications go.
    pub interrupt: VirtioInterrupt,
    /// The features the driver accepted.
    pub features: u64,
}

impl Activation {
    /// Hands every chain the driver made available on queue `index` to `handle_chain`
    /// (with guest memory), which returns how many bytes it wrote into the chain's buffers;
    /// returns the chains to the driver and interrupts it as it asked.
    pub(crate) fn process_queue<F>(
        &mut self,
        index: usize,
        mut handle_chain: F,
    ) -> Result<(), DeviceError>
    where
        F: FnMut(DescriptorChain<&GuestMemoryMmap>, &GuestMemoryMmap) -> u32,
    {
        let queue = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        let memory = &self.memory;
        process_available(queue, memory, &self.interrupt, |chain| {
            handle_chain(chain, memory)
        })
        .map_err(|source| DeviceError::Queue { index, source })
    }
}

/// Errors that stop a device until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A queue index beyond the device's queues.
    #[error("No queue {0}")]
    NoSuchQueue(usize),
    /// The device was asked to process a queue before activation.
    #[error("Device is not activated")]
    NotActivated,
    /// A queue's rings are unusable.
    #[error("Queue {index} failed")]
    Queue {
        index: usize,
        #[source]
        source: QueueError,
    },
}

/// A device's interrupt: the virtio-mmio InterruptStatus register plus the line it raises.
///
/// Cloned handles share the same status. A notification sets its status bit and raises the
/// line only when that bit was clear: while it is set the guest has an interrupt to handle and
/// will see the new work when it does (it acknowledges before looking at the queues).
#[derive(Clone)]
pub struct VirtioInterrupt {
    shared: Arc<InterruptState>,
}

struct InterruptState {
    status: AtomicU32,
    config_generation: AtomicU32,
    line: Arc<dyn InterruptLine>,
    error_log: Mutex<LogLimiter>,
}

impl VirtioInterrupt {
    /// Wraps `line` with a cleared status.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            shared: Arc::new(InterruptState {
                status: AtomicU32::new(0),
                config_generation: AtomicU32::new(0),
                line,
                error_log: Mutex::new(LogLimiter::new()),
            }),
        }
    }

    /// Tells the driver that buffers were put in a used ring.
    pub fn signal_used_queue(&self) {
        self.signal(VIRTIO_MMIO_INT_VRING);
    }

    /// Tells the driver that the device configuration (or status) changed.
    pub fn signal_config_change(&self) {
        self.shared.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(VIRTIO_MMIO_INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.shared.status.load(Ordering::SeqCst)
    }

    fn acknowledge(&self, bits: u32) {
        self.shared.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.shared.status.store(0, Ordering::SeqCst);
    }

    fn config_generation(&self) -> u32 {
        self.shared.config_generation.load(Ordering::SeqCst)
    }

    fn signal(&self, bit: u32) {
        let previous = self.shared.status.fetch_or(bit, Ordering::SeqCst);
        if previous & bit != 0 {
            return;
        }
        if let Err(error) = self.shared.line.trigger() {
            let mut log = self
                .shared
                .error_log
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(suppressed) = log.check() {
                tracing::warn!(%error, suppressed, "Virtio interrupt failed");
            }
        }
    }
}

/// Copies the part of `config` at `offset` into `data`, zero-filling whatever lies beyond it.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(available) = config.get(start..) {
        let count = available.len().min(data.len());
        data[..count].copy_from_slice(&available[..count]);
    }
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) mod test_utils {
    //! Helpers shared by the virtio unit tests and the fuzzing entry points.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use lodge_bus::{InterruptError, InterruptLine};

    /// An interrupt line that counts its triggers.
    #[derive(Default)]
    pub struct CountingLine(AtomicUsize);

    impl CountingLine {
        pub fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::CountingLine;
    use super::*;

    #[test]
    fn interrupt_raises_the_line_once_until_acknowledged() {
        let line = Arc::new(CountingLine::default());
        let interrupt = VirtioInterrupt::new(line.clone());
        interrupt.signal_used_queue();
        interrupt.signal_used_queue();
        assert_eq!(line.count(), 1);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_VRING);
        interrupt.signal_config_change();
        assert_eq!(line.count(), 2);
        assert_eq!(interrupt.config_generation(), 1);
        interrupt.acknowledge(VIRTIO_MMIO_INT_VRING);
        assert_eq!(interrupt.status(), VIRTIO_MMIO_INT_CONFIG);
        interrupt.signal_used_queue();
        assert_eq!(line.count(), 3);
        interrupt.clear();
        assert_eq!(interrupt.status(), 0);
    }

    #[test]
    fn config_reads_zero_fill_past_the_end() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
