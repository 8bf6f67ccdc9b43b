//! Guest RAM.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors from allocating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("Cannot allocate {mib} MiB of guest memory")]
    Allocate {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// The RAM ranges for `size` bytes of guest memory: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Allocates `size` bytes of anonymous, private guest RAM. Pages are only backed when the guest
/// touches them.
pub fn allocate(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Allocate {
        mib: size >> 20,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Address, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let ranges = ram_ranges(4 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(ranges[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(ranges[1].1 as u64 + MMIO_GAP_START, 4 << 30);
    }

    #[test]
    fn allocation_covers_the_requested_size() {
        let memory = allocate(64 << 20).unwrap();
        assert_eq!(memory.last_addr().raw_value(), (64 << 20) - 1);
        assert!(memory.address_in_range(GuestAddress(0)));
    }
}
