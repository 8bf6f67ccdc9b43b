//! Guest-physical memory as the CPU sees it: RAM regions, and MMIO for everything else.

use std::sync::Arc;

use lodge_bus::IoBus;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};

/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// Mask selecting the offset inside a page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

/// One RAM region and where the host mapped it.
#[derive(Clone, Copy, Debug)]
struct RamRegion {
    start: u64,
    end: u64,
    host: usize,
}

/// Guest-physical address space: RAM and the MMIO bus.
pub struct PhysicalMemory {
    ram: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    io: Arc<IoBus>,
}

impl PhysicalMemory {
    /// Wraps the guest RAM and the bus that receives every other physical access.
    pub fn new(ram: GuestMemoryMmap, io: Arc<IoBus>) -> Self {
        let mut regions: Vec<RamRegion> = ram
            .iter()
            .filter_map(|region| {
                let host = region.get_host_address(MemoryRegionAddress(0)).ok()? as usize;
                let start = region.start_addr().0;
                Some(RamRegion {
                    start,
                    end: start + region.len(),
                    host,
                })
            })
            .collect();
        regions.sort_by_key(|r| r.start);
        PhysicalMemory { ram, regions, io }
    }

    /// The port and MMIO buses.
    pub fn io(&self) -> &IoBus {
        &self.io
    }

    /// The host address of the 4 KiB page at `page` (page aligned) when the whole page is RAM.
    ///
    /// The returned address stays valid as long as `self` (which holds the mapping) lives.
    #[inline]
    pub fn host_page(&self, page: u64) -> Option<usize> {
        let region = self
            .regions
            .iter()
            .find(|r| page >= r.start && page < r.end)?;
        (page.checked_add(PAGE_SIZE)? <= region.end)
            .then(|| region.host + (page - region.start) as usize)
    }

    /// Whether `addr` is RAM.
    pub fn is_ram(&self, addr: u64) -> bool {
        self.regions.iter().any(|r| addr >= r.start && addr < r.end)
    }

    /// Reads `data.len()` bytes at `addr` from RAM, or from the MMIO bus where it is not RAM.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        if self.ram.read_slice(data, GuestAddress(addr)).is_ok() {
            return;
        }
        if self.ram_overlaps(addr, data.len()) {
            // Straddles RAM and MMIO: go byte by byte.
            for (i, byte) in data.iter_mut().enumerate() {
                let a = addr.wrapping_add(i as u64);
                let mut one = [0u8];
                if self.ram.read_slice(&mut one, GuestAddress(a)).is_err() {
                    self.io.mmio_read(a, &mut one);
                }
                *byte = one[0];
            }
        } else {
            self.io.mmio_read(addr, data);
        }
    }

    /// Writes `data` at `addr` to RAM, or to the MMIO bus where it is not RAM.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if self.ram.write_slice(data, GuestAddress(addr)).is_ok() {
            return;
        }
        if self.ram_overlaps(addr, data.len()) {
            for (i, byte) in data.iter().enumerate() {
                let a = addr.wrapping_add(i as u64);
                if self.ram.write_slice(&[*byte], GuestAddress(a)).is_err() {
                    self.io.mmio_write(a, &[*byte]);
                }
            }
        } else {
            self.io.mmio_write(addr, data);
        }
    }

    /// The host address of `len` bytes at `addr` if they are RAM in one region.
    #[inline]
    fn host_range(&self, addr: u64, len: u64) -> Option<usize> {
        let region = self
            .regions
            .iter()
            .find(|r| addr >= r.start && addr < r.end)?;
        (addr.checked_add(len)? <= region.end).then(|| region.host + (addr - region.start) as usize)
    }

    /// Reads a little-endian u64 (page-table entries, descriptors).
    #[inline]
    pub fn read_u64(&self, addr: u64) -> u64 {
        if let Some(host) = self.host_range(addr, 8) {
            // SAFETY: `host_range` checked that the 8 bytes lie inside a mapped RAM region,
            // which stays mapped while `self` (holding the GuestMemoryMmap) lives. Guest RAM
            // holds plain bytes; concurrent device writes are the race described at
            // `cpu::access::host_load`.
            return unsafe { std::ptr::read_unaligned(host as *const u64) };
        }
        let mut b = [0u8; 8];
        self.read(addr, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a little-endian u64.
    #[inline]
    pub fn write_u64(&self, addr: u64, value: u64) {
        if let Some(host) = self.host_range(addr, 8) {
            // SAFETY: as in `read_u64`.
            unsafe { std::ptr::write_unaligned(host as *mut u64, value) };
            return;
        }
        self.write(addr, &value.to_le_bytes());
    }

    fn ram_overlaps(&self, addr: u64, len: usize) -> bool {
        let end = addr.saturating_add(len as u64);
        self.regions.iter().any(|r| addr < r.end && end > r.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodge_bus::BusDevice;
    use std::sync::Mutex;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + offset as u8);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn splits_ram_and_mmio() {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        let io = Arc::new(IoBus::new());
        io.mmio
            .insert(Arc::new(Mutex::new(Echo)), 0x2000, 0x1000)
            .unwrap();
        let mem = PhysicalMemory::new(ram, io);
        mem.write(0x1ffe, &[1, 2]);
        let mut b = [0u8; 4];
        mem.read(0x1ffe, &mut b);
        assert_eq!(b, [1, 2, 0x40, 0x41]);
        assert!(mem.host_page(0x1000).is_some());
        assert!(mem.host_page(0x2000).is_none());
        let mut far = [0u8; 2];
        mem.read(0x9000_0000, &mut far);
        assert_eq!(far, [0xff, 0xff]);
    }
}
