//! Helpers for tests that boot hand-assembled guests instead of Linux.

/// Physical address (and entry point) of the code in [`vmlinux_from_code`] images.
pub const TEST_KERNEL_ENTRY: u64 = 0x100_0000;

/// A minimal vmlinux-style ELF: one loadable segment at [`TEST_KERNEL_ENTRY`] holding `code`,
/// entered there in 64-bit mode like a Linux kernel.
pub fn vmlinux_from_code(code: &[u8]) -> Vec<u8> {
    const HEADER: usize = 0x40;
    const PROGRAM_HEADER: usize = 0x38;
    let load = TEST_KERNEL_ENTRY;
    let mut elf = vec![0u8; HEADER + PROGRAM_HEADER];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // ELF version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&load.to_le_bytes()); // e_entry
    elf[32..40].copy_from_slice(&(HEADER as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(HEADER as u16).to_le_bytes()); // e_ehsize
    elf[54..56].copy_from_slice(&(PROGRAM_HEADER as u16).to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = HEADER;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[ph + 4..ph + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    elf[ph + 8..ph + 16].copy_from_slice(&((HEADER + PROGRAM_HEADER) as u64).to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&load.to_le_bytes()); // p_vaddr
    elf[ph + 24..ph + 32].copy_from_slice(&load.to_le_bytes()); // p_paddr
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    elf.extend_from_slice(code);
    elf
}
