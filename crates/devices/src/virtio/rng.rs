//! virtio-rng: fills the guest's buffers from the host's `getrandom(2)`.

use std::io;

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice};

use super::chain::{collect_chain, ChainError};
use super::{Activation, DeviceError, VirtioDevice, COMMON_FEATURES};
use crate::logging::LogLimiter;

/// One request queue, of at most 256 entries.
const QUEUE_MAX_SIZES: &[u16] = &[256];
/// Bytes one request gets at most: plenty for seeding the guest's pool, and a bound on how
/// long one request keeps the event loop busy.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
/// Buffers per request.
const MAX_DESCRIPTORS: usize = 64;

/// The entropy device.
pub struct VirtioRng {
    active: Option<Activation>,
    log: LogLimiter,
}

impl VirtioRng {
    /// Creates the device.
    pub fn new() -> Self {
        Self {
            active: None,
            log: LogLimiter::new(),
        }
    }
}

impl Default for VirtioRng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(suppressed) = self.log.check() {
            tracing::warn!(
                suppressed,
                "virtio-rng: ignored a {}-byte config write at {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        self.active = Some(activation);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let log = &mut self.log;
        active.process_queue(index, |chain, memory| match fill_chain(chain, memory) {
            Ok(written) => written,
            Err(error) => {
                if let Some(suppressed) = log.check() {
                    tracing::warn!(suppressed, "virtio-rng: dropped request: {error}");
                }
                0
            }
        })
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Fills the chain's buffers with random bytes, up to [`MAX_BYTES_PER_REQUEST`].
fn fill_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
) -> Result<u32, RngError> {
    let checked = collect_chain(chain, MAX_DESCRIPTORS).map_err(RngError::Chain)?;
    checked
        .require_direction(&checked.descriptors, true)
        .and_then(|()| checked.require_in_memory(memory, &checked.descriptors))
        .map_err(RngError::Chain)?;
    let mut written = 0u32;
    for buffer in &checked.descriptors {
        let count = buffer.len().min(MAX_BYTES_PER_REQUEST - written);
        if count == 0 {
            continue;
        }
        memory
            .read_exact_volatile_from(buffer.addr(), &mut HostRandom, count as usize)
            .map_err(RngError::Entropy)?;
        written += count;
    }
    Ok(written)
}

/// Why a request went unanswered.
#[derive(Debug, thiserror::Error)]
enum RngError {
    #[error("Malformed descriptor chain")]
    Chain(#[source] ChainError),
    #[error("Reading host entropy failed")]
    Entropy(#[source] vm_memory::GuestMemoryError),
}

/// `getrandom(2)` as a source guest memory can be filled from directly.
struct HostRandom;

impl ReadVolatile for HostRandom {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buffer: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let guard = buffer.ptr_guard_mut();
        // SAFETY: the guard keeps the slice's memory mapped, and a VolatileSlice is valid for
        // writes of its length; getrandom writes at most `buffer.len()` bytes there.
        let result = unsafe { libc::getrandom(guard.as_ptr().cast(), buffer.len(), 0) };
        let count = usize::try_from(result)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        buffer.bitmap().mark_dirty(0, count);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::CountingLine;
    use crate::virtio::VirtioInterrupt;
    use std::sync::Arc;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::GuestAddress;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;

    struct Harness<'a> {
        mock: MockSplitQueue<'a, GuestMemoryMmap>,
        line: Arc<CountingLine>,
        rng: VirtioRng,
    }

    fn harness(memory: &GuestMemoryMmap) -> Harness<'_> {
        let mock = MockSplitQueue::new(memory, 16);
        let line = Arc::new(CountingLine::default());
        let mut rng = VirtioRng::new();
        let queue: Queue = mock.create_queue().unwrap();
        rng.activate(Activation {
            memory: memory.clone(),
            queues: vec![queue],
            interrupt: VirtioInterrupt::new(line.clone()),
            features: COMMON_FEATURES,
        })
        .unwrap();
        Harness { mock, line, rng }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        // Chains built here are consecutive: a descriptor with NEXT continues at index 1.
        let next = if flags & NEXT != 0 { 1 } else { 0 };
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn used(harness: &Harness) -> (u32, u32) {
        let element = harness.mock.used().ring().ref_at(0).unwrap().load();
        (element.id(), element.len())
    }

    #[test]
    fn fills_writable_buffers() {
        let memory = memory();
        let mut harness = harness(&memory);
        harness
            .mock
            .add_desc_chains(
                &[raw(0x10_0000, 64, WRITE | NEXT), raw(0x20_0000, 64, WRITE)],
                0,
            )
            .unwrap();
        harness.rng.process_queue(0).unwrap();
        assert_eq!(used(&harness), (0, 128));
        assert_eq!(harness.line.count(), 1);
        let mut bytes = [0u8; 64];
        memory
            .read_slice(&mut bytes, GuestAddress(0x10_0000))
            .unwrap();
        assert_ne!(bytes, [0u8; 64], "buffer was not filled");
    }

    #[test]
    fn caps_the_request_size() {
        let memory = memory();
        let mut harness = harness(&memory);
        harness
            .mock
            .add_desc_chains(&[raw(0x10_0000, 0x20_0000, WRITE)], 0)
            .unwrap();
        harness.rng.process_queue(0).unwrap();
        assert_eq!(used(&harness), (0, MAX_BYTES_PER_REQUEST));
        let mut beyond = [0u8; 16];
        let cap = u64::from(MAX_BYTES_PER_REQUEST);
        memory
            .read_slice(&mut beyond, GuestAddress(0x10_0000 + cap))
            .unwrap();
        assert_eq!(beyond, [0u8; 16]);
    }

    #[test]
    fn rejects_device_readable_and_outside_buffers() {
        let memory = memory();
        let mut harness = harness(&memory);
        harness
            .mock
            .add_desc_chains(&[raw(0x10_0000, 64, 0)], 0)
            .unwrap();
        harness.rng.process_queue(0).unwrap();
        assert_eq!(used(&harness), (0, 0));
        let mut bytes = [0u8; 64];
        memory
            .read_slice(&mut bytes, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(bytes, [0u8; 64], "device-readable buffer was written");

        let mut harness = self::harness(&memory);
        harness
            .mock
            .add_desc_chains(&[raw(0x3f_fff0, 64, WRITE)], 0)
            .unwrap();
        harness.rng.process_queue(0).unwrap();
        assert_eq!(used(&harness), (0, 0));
    }

    #[test]
    fn processing_before_activation_fails_cleanly() {
        let mut rng = VirtioRng::new();
        assert!(matches!(
            rng.process_queue(0),
            Err(DeviceError::NotActivated)
        ));
        let memory = memory();
        let mut harness = harness(&memory);
        assert!(matches!(
            harness.rng.process_queue(1),
            Err(DeviceError::NoSuchQueue(1))
        ));
        harness.rng.reset();
        assert!(matches!(
            harness.rng.process_queue(0),
            Err(DeviceError::NotActivated)
        ));
    }
}
