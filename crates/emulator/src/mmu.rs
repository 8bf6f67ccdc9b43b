//! 4-level paging: the page walk, permission checks and page-fault error codes.

use crate::memory::PhysicalMemory;

/// What an access does with the memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Execute,
}

/// The paging controls a walk depends on.
#[derive(Clone, Copy, Debug, Default)]
pub struct PagingMode {
    pub cr3: u64,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub write_protect: bool,
    /// EFER.NXE: the XD bit is honoured (else it is reserved).
    pub no_execute: bool,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the accessed byte.
    pub phys: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Writes are allowed for this privilege (and the dirty bit is set).
    pub writable: bool,
    /// Instruction fetches are allowed.
    pub executable: bool,
}

/// Page-fault error code bits.
pub mod error_code {
    pub const PRESENT: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const USER: u32 = 1 << 2;
    pub const RESERVED: u32 = 1 << 3;
    pub const FETCH: u32 = 1 << 4;
}

/// Physical address width reported by CPUID; PTE bits above it are reserved.
pub const PHYS_ADDR_BITS: u32 = 40;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;
const PTE_NO_EXECUTE: u64 = 1 << 63;
/// Physical frame bits 12..PHYS_ADDR_BITS.
const ADDR_MASK: u64 = ((1u64 << PHYS_ADDR_BITS) - 1) & !0xfff;
/// Bits PHYS_ADDR_BITS..51 must be zero in every entry.
const HIGH_RESERVED: u64 = ((1u64 << 52) - 1) & !((1u64 << PHYS_ADDR_BITS) - 1);

/// Whether `addr` is canonical for 48-bit linear addresses.
#[inline(always)]
pub fn is_canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

/// Translates `linear` for an access of `kind` at user (`user == true`) or supervisor
/// privilege, setting accessed and dirty bits. Returns the page-fault error code on failure.
pub fn walk(
    mem: &PhysicalMemory,
    mode: &PagingMode,
    linear: u64,
    kind: AccessKind,
    user: bool,
) -> Result<Translation, u32> {
    let mut fault = 0;
    if kind == AccessKind::Write {
        fault |= error_code::WRITE;
    }
    if user {
        fault |= error_code::USER;
    }
    if kind == AccessKind::Execute && mode.no_execute {
        fault |= error_code::FETCH;
    }
    let reserved_xd = if mode.no_execute { 0 } else { PTE_NO_EXECUTE };

    let mut table = mode.cr3 & ADDR_MASK;
    let mut writable = true;
    let mut user_ok = true;
    let mut no_execute = false;
    // Entries to mark accessed once the walk has succeeded, and the leaf.
    let mut visited = [(0u64, 0u64); 4];
    let mut level = 4;
    let (leaf_addr, leaf, page_size) = loop {
        let shift = 12 + 9 * (level - 1);
        let index = (linear >> shift) & 0x1ff;
        let entry_addr = table + index * 8;
        let entry = mem.read_u64(entry_addr);
        if entry & PTE_PRESENT == 0 {
            return Err(fault);
        }
        let mut reserved = entry & (HIGH_RESERVED | reserved_xd);
        let large = entry & PTE_LARGE != 0;
        if large {
            match level {
                4 => reserved |= PTE_LARGE,
                3 => reserved |= entry & 0x3fff_e000,
                2 => reserved |= entry & 0x1f_e000,
                _ => {}
            }
        }
        if reserved != 0 {
            return Err(fault | error_code::PRESENT | error_code::RESERVED);
        }
        writable &= entry & PTE_WRITABLE != 0;
        user_ok &= entry & PTE_USER != 0;
        no_execute |= entry & PTE_NO_EXECUTE != 0 && mode.no_execute;
        visited[4 - level] = (entry_addr, entry);
        if level == 1 || large {
            break (entry_addr, entry, 1u64 << shift);
        }
        table = entry & ADDR_MASK;
        level -= 1;
    };

    let denied = match kind {
        AccessKind::Read => user && !user_ok,
        AccessKind::Write => (user && !user_ok) || (!writable && (user || mode.write_protect)),
        AccessKind::Execute => (user && !user_ok) || no_execute,
    };
    if denied {
        return Err(fault | error_code::PRESENT);
    }

    for &(addr, entry) in &visited[..=(4 - level)] {
        if addr != leaf_addr && entry & PTE_ACCESSED == 0 {
            mem.write_u64(addr, entry | PTE_ACCESSED);
        }
    }
    let may_write = (!user || user_ok) && (writable || (!user && !mode.write_protect));
    let mut new_leaf = leaf | PTE_ACCESSED;
    if kind == AccessKind::Write {
        new_leaf |= PTE_DIRTY;
    }
    if new_leaf != leaf {
        mem.write_u64(leaf_addr, new_leaf);
    }
    let frame = leaf & ADDR_MASK & !(page_size - 1);
    Ok(Translation {
        phys: frame | (linear & (page_size - 1)),
        page_size,
        // A write through a clean page must walk again to set the dirty bit.
        writable: may_write && new_leaf & PTE_DIRTY != 0,
        executable: !no_execute && (!user || user_ok),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodge_bus::IoBus;
    use std::sync::Arc;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    const PML4: u64 = 0x1000;
    const PDPT: u64 = 0x2000;
    const PD: u64 = 0x3000;
    const PT: u64 = 0x4000;

    fn memory() -> PhysicalMemory {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        PhysicalMemory::new(ram, Arc::new(IoBus::new()))
    }

    /// Maps 0x40_0000 (4K page in PT) and 0x20_0000 (2M page) with `flags` at every level.
    fn tables(mem: &PhysicalMemory, upper: u64, leaf: u64) {
        mem.write_u64(PML4, PDPT | upper);
        mem.write_u64(PDPT, PD | upper);
        mem.write_u64(PD + 8, 0x60_0000 | leaf | PTE_LARGE);
        mem.write_u64(PD + 16, PT | upper);
        mem.write_u64(PT, 0x9000 | leaf);
    }

    fn mode() -> PagingMode {
        PagingMode {
            cr3: PML4,
            write_protect: true,
            no_execute: true,
        }
    }

    #[test]
    fn translates_4k_and_2m_pages_and_sets_accessed_and_dirty() {
        let mem = memory();
        tables(&mem, 0x7, 0x7);
        let t = walk(&mem, &mode(), 0x40_0123, AccessKind::Read, true).unwrap();
        assert_eq!(t.phys, 0x9123);
        assert_eq!(t.page_size, 4096);
        assert!(!t.writable, "a clean page needs a write walk to set D");
        assert_eq!(mem.read_u64(PT) & (PTE_ACCESSED | PTE_DIRTY), PTE_ACCESSED);
        assert_ne!(mem.read_u64(PML4) & PTE_ACCESSED, 0);
        let t = walk(&mem, &mode(), 0x40_0123, AccessKind::Write, true).unwrap();
        assert!(t.writable);
        assert_ne!(mem.read_u64(PT) & PTE_DIRTY, 0);
        let t = walk(&mem, &mode(), 0x2f_ffff, AccessKind::Execute, false).unwrap();
        assert_eq!(t.phys, 0x6f_ffff);
        assert_eq!(t.page_size, 0x20_0000);
    }

    #[test]
    fn reports_page_fault_error_codes() {
        let mem = memory();
        // Not present.
        assert_eq!(
            walk(&mem, &mode(), 0x40_0000, AccessKind::Write, true),
            Err(0b110)
        );
        // Supervisor-only, read-only, no-execute leaf.
        tables(&mem, 0x7, 0x1 | PTE_NO_EXECUTE);
        let m = mode();
        assert_eq!(
            walk(&mem, &m, 0x40_0000, AccessKind::Read, true),
            Err(0b101)
        );
        assert_eq!(
            walk(&mem, &m, 0x40_0000, AccessKind::Write, false),
            Err(0b011)
        );
        assert_eq!(
            walk(&mem, &m, 0x40_0000, AccessKind::Execute, false),
            Err(0b10001)
        );
        assert!(walk(&mem, &m, 0x40_0000, AccessKind::Read, false).is_ok());
        // CR0.WP clear: the supervisor may write read-only pages.
        let no_wp = PagingMode {
            write_protect: false,
            ..m
        };
        assert!(
            walk(&mem, &no_wp, 0x40_0000, AccessKind::Write, false)
                .unwrap()
                .writable
        );
        // XD without EFER.NXE is a reserved bit.
        let no_nx = PagingMode {
            no_execute: false,
            ..m
        };
        assert_eq!(
            walk(&mem, &no_nx, 0x40_0000, AccessKind::Read, false),
            Err(0b1001)
        );
        // Reserved physical-address bits.
        mem.write_u64(PT, 0x9001 | (1 << 45));
        assert_eq!(
            walk(&mem, &m, 0x40_0000, AccessKind::Read, false),
            Err(0b1001)
        );
    }

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x0000_7fff_ffff_ffff));
        assert!(is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(0x0000_8000_0000_0000));
    }
}
