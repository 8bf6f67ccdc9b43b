//! Reading a descriptor chain the driver made available, trusting none of it.
//!
//! `virtio-queue`'s chain iterator stops quietly at the first problem (a `next` index beyond
//! the table, a loop that exhausts its descriptor budget, an unreadable or nested indirect
//! table). [`collect_chain`] notices those stops, because the last descriptor it got still
//! says another one follows. [`CheckedChain::require_in_memory`] then checks buffers lie in
//! guest memory before a device touches them.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Not even the first descriptor could be read (bad head index or indirect table).
    #[error("Descriptor chain {head} has no readable descriptor")]
    Empty { head: u16 },
    /// The chain points at a descriptor that does not exist, loops, nests indirect tables or
    /// adds up to more than 4 GiB.
    #[error("Descriptor chain {head} is malformed after {count} descriptors")]
    Malformed { head: u16, count: usize },
    /// More descriptors than the device accepts in one request.
    #[error("Descriptor chain {head} has more than {max} descriptors")]
    TooLong { head: u16, max: usize },
    /// A buffer lies (partly) outside guest memory.
    #[error("Descriptor chain {head} has a buffer outside guest memory: {address:#x}+{len:#x}")]
    OutsideMemory { head: u16, address: u64, len: u32 },
    /// A buffer the device must read is device-writable, or the reverse.
    #[error("Descriptor chain {head} has a buffer in the wrong direction")]
    WrongDirection { head: u16 },
}

/// The descriptors of one well-formed chain.
#[derive(Debug)]
pub(crate) struct CheckedChain {
    pub head: u16,
    pub descriptors: Vec<Descriptor>,
}

/// Walks `chain` (following an indirect table if it has one) and returns its descriptors.
pub(crate) fn collect_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_descriptors: usize,
) -> Result<CheckedChain, ChainError> {
    let head = chain.head_index();
    let mut descriptors: Vec<Descriptor> = Vec::new();
    for descriptor in chain {
        if descriptors.len() == max_descriptors {
            return Err(ChainError::TooLong {
                head,
                max: max_descriptors,
            });
        }
        descriptors.push(descriptor);
    }
    match descriptors.last() {
        None => Err(ChainError::Empty { head }),
        Some(last) if last.has_next() => Err(ChainError::Malformed {
            head,
            count: descriptors.len(),
        }),
        Some(_) => Ok(CheckedChain { head, descriptors }),
    }
}

impl CheckedChain {
    /// Total length of `descriptors`, which cannot overflow: the chain iterator stops before
    /// a chain exceeds 4 GiB.
    pub fn total_len(descriptors: &[Descriptor]) -> u64 {
        descriptors.iter().map(|d| u64::from(d.len())).sum()
    }

    /// Fails unless every buffer of `descriptors` lies entirely in guest memory.
    pub fn require_in_memory(
        &self,
        memory: &GuestMemoryMmap,
        descriptors: &[Descriptor],
    ) -> Result<(), ChainError> {
        let outside = descriptors.iter().find(|descriptor| {
            descriptor.len() > 0
                && !memory.check_range(descriptor.addr(), descriptor.len() as usize)
        });
        match outside {
            Some(descriptor) => Err(ChainError::OutsideMemory {
                head: self.head,
                address: descriptor.addr().0,
                len: descriptor.len(),
            }),
            None => Ok(()),
        }
    }

    /// Fails unless every descriptor in `descriptors` is device-writable (`writable`) or
    /// device-readable (`!writable`).
    pub fn require_direction(
        &self,
        descriptors: &[Descriptor],
        writable: bool,
    ) -> Result<(), ChainError> {
        if descriptors.iter().all(|d| d.is_write_only() == writable) {
            Ok(())
        } else {
            Err(ChainError::WrongDirection { head: self.head })
        }
    }
}

/// The address `offset` bytes into a buffer checked with [`CheckedChain::require_in_memory`].
pub(crate) fn buffer_address(descriptor: &Descriptor, offset: u32) -> GuestAddress {
    // Cannot overflow: the whole buffer lies in guest memory.
    GuestAddress(descriptor.addr().0 + u64::from(offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::Bytes;

    const MEMORY_SIZE: u64 = 0x10_0000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)]).unwrap()
    }

    fn raw(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Puts `descriptors` at the start of a 16-entry table, makes descriptor `head` available
    /// and collects the chain.
    fn collect(
        memory: &GuestMemoryMmap,
        descriptors: &[RawDescriptor],
        head: u16,
    ) -> Result<CheckedChain, ChainError> {
        let mock = MockSplitQueue::new(memory, 16);
        for (index, descriptor) in descriptors.iter().enumerate() {
            mock.desc_table().store(index as u16, *descriptor).unwrap();
        }
        mock.avail().ring().ref_at(0).unwrap().store(head);
        mock.avail().idx().store(1);
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.iter(memory).unwrap().next().unwrap();
        let checked = collect_chain(chain, 8)?;
        checked.require_in_memory(memory, &checked.descriptors)?;
        Ok(checked)
    }

    #[test]
    fn accepts_a_well_formed_chain() {
        let memory = memory();
        let chain = collect(
            &memory,
            &[
                raw(0x1000, 16, NEXT, 1),
                raw(0x2000, 512, NEXT | WRITE, 2),
                raw(0x3000, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
        assert_eq!(chain.descriptors.len(), 3);
        assert_eq!(CheckedChain::total_len(&chain.descriptors), 529);
        assert!(chain
            .require_direction(&chain.descriptors[1..], true)
            .is_ok());
        assert_eq!(
            chain.require_direction(&chain.descriptors, true),
            Err(ChainError::WrongDirection { head: 0 })
        );
    }

    #[test]
    fn rejects_a_loop() {
        let memory = memory();
        let result = collect(
            &memory,
            &[raw(0x1000, 16, NEXT, 1), raw(0x2000, 16, NEXT, 0)],
            0,
        );
        assert!(
            matches!(result, Err(ChainError::TooLong { .. })),
            "{result:?}"
        );
        // A loop shorter than the device's limit hits the chain iterator's budget instead.
        let mock_memory = memory;
        let mock = MockSplitQueue::new(&mock_memory, 4);
        mock.desc_table()
            .store(0, raw(0x1000, 16, NEXT, 1))
            .unwrap();
        mock.desc_table()
            .store(1, raw(0x2000, 16, NEXT, 0))
            .unwrap();
        mock.avail().ring().ref_at(0).unwrap().store(0);
        mock.avail().idx().store(1);
        let mut queue: Queue = mock.create_queue().unwrap();
        let chain = queue.iter(&mock_memory).unwrap().next().unwrap();
        assert_eq!(
            collect_chain(chain, 64).unwrap_err(),
            ChainError::Malformed { head: 0, count: 4 }
        );
    }

    #[test]
    fn rejects_a_next_index_beyond_the_table() {
        let memory = memory();
        let result = collect(&memory, &[raw(0x1000, 16, NEXT, 99)], 0);
        assert_eq!(
            result.unwrap_err(),
            ChainError::Malformed { head: 0, count: 1 }
        );
    }

    #[test]
    fn rejects_a_head_beyond_the_table() {
        let memory = memory();
        let result = collect(&memory, &[raw(0x1000, 16, 0, 0)], 40);
        assert_eq!(result.unwrap_err(), ChainError::Empty { head: 40 });
    }

    #[test]
    fn rejects_buffers_outside_memory() {
        let memory = memory();
        for (addr, len) in [(MEMORY_SIZE, 1), (MEMORY_SIZE - 4, 8), (u64::MAX - 2, 16)] {
            let result = collect(&memory, &[raw(addr, len, 0, 0)], 0);
            assert_eq!(
                result.unwrap_err(),
                ChainError::OutsideMemory {
                    head: 0,
                    address: addr,
                    len
                },
                "{addr:#x}+{len}"
            );
        }
    }

    #[test]
    fn follows_a_valid_indirect_table() {
        let memory = memory();
        let table = 0x8000u64;
        memory
            .write_obj(raw(0x1000, 16, NEXT, 1), GuestAddress(table))
            .unwrap();
        memory
            .write_obj(raw(0x2000, 1, WRITE, 0), GuestAddress(table + 16))
            .unwrap();
        let chain = collect(&memory, &[raw(table, 32, INDIRECT, 0)], 0).unwrap();
        assert_eq!(chain.descriptors.len(), 2);
        assert!(chain.descriptors[1].is_write_only());
    }

    #[test]
    fn rejects_malformed_indirect_tables() {
        let memory = memory();
        let table = 0x8000u64;
        memory
            .write_obj(raw(0x1000, 16, NEXT, 5), GuestAddress(table))
            .unwrap();
        // `next` beyond the two-entry table.
        let result = collect(&memory, &[raw(table, 32, INDIRECT, 0)], 0);
        assert_eq!(
            result.unwrap_err(),
            ChainError::Malformed { head: 0, count: 1 }
        );
        // A length that is not a whole number of descriptors.
        let result = collect(&memory, &[raw(table, 20, INDIRECT, 0)], 0);
        assert_eq!(result.unwrap_err(), ChainError::Empty { head: 0 });
        // A table outside guest memory.
        let result = collect(&memory, &[raw(MEMORY_SIZE, 32, INDIRECT, 0)], 0);
        assert_eq!(result.unwrap_err(), ChainError::Empty { head: 0 });
        // An indirect table inside an indirect table.
        memory
            .write_obj(raw(0x9000, 16, INDIRECT, 0), GuestAddress(table))
            .unwrap();
        let result = collect(&memory, &[raw(table, 16, INDIRECT, 0)], 0);
        assert_eq!(result.unwrap_err(), ChainError::Empty { head: 0 });
    }

    #[test]
    fn rejects_chains_over_four_gibibytes() {
        let memory = memory();
        let result = collect(
            &memory,
            &[
                raw(0x1000, 0, NEXT, 1),
                raw(0x1000, u32::MAX, NEXT, 2),
                raw(0x1000, 2, 0, 0),
            ],
            0,
        );
        assert_eq!(
            result.unwrap_err(),
            ChainError::Malformed { head: 0, count: 2 }
        );
    }
}
