//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its
//! processors and the I/O APIC.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{EBDA_START, IOAPIC_START, LAPIC_START};

/// Errors from writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// More vCPUs than the table has room for in the EBDA.
    #[error("Too many vCPUs for the MP table: {0} (at most {MAX_VCPUS})")]
    TooManyVcpus(u8),
    /// The table lies outside guest memory.
    #[error("Cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// vCPUs whose entries fit in the 1 KiB the kernel scans at the EBDA.
pub const MAX_VCPUS: u8 = 32;

/// I/O APIC interrupt pins.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const SPEC_REVISION: u8 = 4;

/// Writes the floating pointer and configuration table at the start of the EBDA.
pub fn write(memory: &GuestMemoryMmap, vcpu_count: u8) -> Result<(), MpTableError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(MpTableError::TooManyVcpus(vcpu_count));
    }
    let table = build(vcpu_count);
    memory
        .write_slice(&table, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

/// The floating pointer followed by the configuration table, as placed at `EBDA_START`.
fn build(vcpu_count: u8) -> Vec<u8> {
    let ioapic_id = vcpu_count;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for id in 0..vcpu_count {
        let flags = 0x1 | if id == 0 { 0x2 } else { 0 }; // enabled, boot processor
        entries.extend_from_slice(&[0, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    for pin in 0..IOAPIC_PINS {
        // Interrupt type INT, conforming polarity/trigger, ISA bus IRQ `pin` → I/O APIC `pin`.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, pin, ioapic_id, pin]);
        entry_count += 1;
    }
    // LINT0 of every local APIC is the PIC (ExtINT); LINT1 is NMI.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let header_len = 44;
    let table_len = (header_len + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // checksum patched below
    table.extend_from_slice(b"LODGE   ");
    table.extend_from_slice(b"LODGE VM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&((EBDA_START + 16) as u32).to_le_bytes());
    floating.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::EBDA_START;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let bytes = build(4);
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table = &bytes[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_every_cpu_with_one_boot_processor() {
        let bytes = build(3);
        let table = &bytes[16..];
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
        let cpus: Vec<&[u8]> = table[44..44 + 60].chunks(20).collect();
        assert!(cpus.iter().all(|c| c[0] == 0));
        assert_eq!(cpus.iter().map(|c| c[1]).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(cpus.iter().filter(|c| c[3] & 2 != 0).count(), 1);
    }

    #[test]
    fn fits_in_the_ebda_kilobyte() {
        assert!(build(MAX_VCPUS).len() <= (0xa_0000 - EBDA_START) as usize);
    }

    #[test]
    fn rejects_too_many_vcpus() {
        let memory = crate::memory::allocate(64 << 20).unwrap();
        assert!(matches!(
            write(&memory, MAX_VCPUS + 1),
            Err(MpTableError::TooManyVcpus(33))
        ));
        assert!(write(&memory, 2).is_ok());
    }
}
