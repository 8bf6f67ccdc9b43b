//! The zero page (`struct boot_params`): setup header, command line, initrd and the e820
//! memory map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::BootError;
use crate::layout::{CMDLINE_START, EBDA_START, HIGH_MEMORY_START, ZERO_PAGE_START};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const BOOT_FLAG: u16 = 0xaa55;
const HEADER_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
/// Most entries `boot_params.e820_table` holds.
const E820_MAX_ENTRIES: usize = 128;

/// Writes the zero page. `header` is a bzImage's setup header; vmlinux kernels get a minimal
/// one.
pub(super) fn write(
    memory: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or(setup_header {
            boot_flag: BOOT_FLAG,
            header: HEADER_MAGIC,
            kernel_alignment: 0x100_0000,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((start, size)) = initrd {
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(memory);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES) as u8;
    memory
        .write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::Write {
            what: "the zero page",
            source,
        })
}

/// The e820 map for `memory`: conventional memory up to the EBDA, the EBDA and legacy BIOS
/// area reserved, then every RAM region from 1 MiB up.
pub fn e820_map(memory: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
    ];
    for region in memory.iter() {
        let start = region.start_addr().raw_value().max(HIGH_MEMORY_START);
        let end = region.last_addr().raw_value() + 1;
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}
