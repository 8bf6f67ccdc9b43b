//! The long-mode environment the 64-bit boot protocol requires: identity-mapped page tables,
//! a GDT with `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), and the register state at entry.

use lodge_engine::{CpuState, DescriptorTable, Registers, Segment, SpecialRegisters};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{BOOT_STACK_POINTER, GDT_START, PML4_START, ZERO_PAGE_START};

/// Errors from writing the boot tables.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// The tables lie outside guest memory.
    #[error("Cannot write the boot page tables or GDT to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Bytes of memory the boot page tables identity-map (2 MiB pages).
pub const IDENTITY_MAPPED: u64 = 4 << 30;

const PDPT_START: u64 = PML4_START + 0x1000;
const PD_START: u64 = PDPT_START + 0x1000;
const PAGE_DIRECTORIES: u64 = IDENTITY_MAPPED >> 30;
const PRESENT_WRITABLE: u64 = 0x3;
const LARGE_PAGE: u64 = 0x80;

/// Selectors the boot protocol names.
const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// The boot GDT: two null entries so the code and data segments land on the protocol's
/// selectors, then a TSS (KVM refuses to enter a guest without a usable TR).
const GDT: [u64; 6] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code, DPL 0
    0x00cf_9300_0000_ffff, // 0x18: flat data, DPL 0
    0x0000_8b00_0000_0067, // 0x20: busy 64-bit TSS, base 0 (the kernel loads its own)
    0,                     // upper half of the 16-byte TSS descriptor
];
const IDT_START: u64 = GDT_START + (GDT.len() as u64) * 8;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Writes the page tables, GDT and an empty IDT.
pub fn write_tables(memory: &GuestMemoryMmap) -> Result<(), PagingError> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(PagingError::Write)
    };
    write(PDPT_START | PRESENT_WRITABLE, PML4_START)?;
    for directory in 0..PAGE_DIRECTORIES {
        let pd = PD_START + directory * 0x1000;
        write(pd | PRESENT_WRITABLE, PDPT_START + directory * 8)?;
        for entry in 0..512 {
            let physical = (directory << 30) | (entry << 21);
            write(physical | PRESENT_WRITABLE | LARGE_PAGE, pd + entry * 8)?;
        }
    }
    for (index, descriptor) in GDT.iter().enumerate() {
        write(*descriptor, GDT_START + index as u64 * 8)?;
    }
    write(0, IDT_START)
}

/// The register state at the kernel's 64-bit entry point.
pub fn boot_cpu_state(entry: u64) -> CpuState {
    let data = Segment::from_descriptor(BOOT_DS, GDT[usize::from(BOOT_DS >> 3)]);
    CpuState {
        regs: Registers {
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            rflags: 0x2,
            ..Default::default()
        },
        sregs: SpecialRegisters {
            cs: Segment::from_descriptor(BOOT_CS, GDT[usize::from(BOOT_CS >> 3)]),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr: Segment::from_descriptor(BOOT_TSS, GDT[usize::from(BOOT_TSS >> 3)]),
            ldt: Segment {
                unusable: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: GDT_START,
                limit: (GDT.len() * 8 - 1) as u16,
            },
            idt: DescriptorTable {
                base: IDT_START,
                limit: 7,
            },
            cr0: CR0_PE | CR0_ET | CR0_PG,
            cr3: PML4_START,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::allocate;

    /// Walks the boot tables like the MMU does for a 2 MiB page.
    fn translate(memory: &GuestMemoryMmap, virtual_address: u64) -> u64 {
        let read = |addr: u64| memory.read_obj::<u64>(GuestAddress(addr)).unwrap();
        let pml4e = read(PML4_START + ((virtual_address >> 39) & 0x1ff) * 8);
        assert_eq!(pml4e & 1, 1);
        let pdpte = read((pml4e & !0xfff) + ((virtual_address >> 30) & 0x1ff) * 8);
        assert_eq!(pdpte & 1, 1);
        let pde = read((pdpte & !0xfff) + ((virtual_address >> 21) & 0x1ff) * 8);
        assert_eq!(pde & 0x81, 0x81, "present 2 MiB page");
        (pde & !0x1f_ffff & 0x000f_ffff_ffff_ffff) | (virtual_address & 0x1f_ffff)
    }

    #[test]
    fn identity_maps_the_first_four_gibibytes() {
        let memory = allocate(64 << 20).unwrap();
        write_tables(&memory).unwrap();
        for addr in [
            0,
            0x7000,
            0x100_0000 + 0x1234,
            0xd000_0000,
            IDENTITY_MAPPED - 1,
        ] {
            assert_eq!(translate(&memory, addr), addr);
        }
    }

    #[test]
    fn entry_state_is_64_bit_protocol_compliant() {
        let state = boot_cpu_state(0x100_0000);
        assert_eq!(state.regs.rip, 0x100_0000);
        assert_eq!(state.regs.rsi, ZERO_PAGE_START);
        assert_eq!(state.sregs.cs.selector, 0x10);
        assert!(state.sregs.cs.l && !state.sregs.cs.db);
        assert_eq!(state.sregs.ds.selector, 0x18);
        assert_eq!(state.sregs.tr.type_, 0xb);
        assert_eq!(state.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(
            state.sregs.efer & (EFER_LME | EFER_LMA),
            EFER_LME | EFER_LMA
        );
        assert_eq!(state.sregs.cr3, PML4_START);
    }
}
