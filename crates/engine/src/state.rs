//! Engine-neutral x86-64 register state.

use std::fmt;

/// General-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Registers {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type (4 bits: for code/data, accessed/writable/conforming/executable).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (32-bit when set, for non-64-bit segments).
    pub db: bool,
    /// Code/data (true) or system (false) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Limit granularity is 4 KiB.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// Decodes a GDT entry (the 8-byte descriptor) loaded with `selector`.
    pub fn from_descriptor(selector: u16, descriptor: u64) -> Self {
        let limit_low = descriptor & 0xffff;
        let limit_high = (descriptor >> 48) & 0xf;
        let g = (descriptor >> 55) & 1 == 1;
        let mut limit = ((limit_high << 16) | limit_low) as u32;
        if g {
            limit = (limit << 12) | 0xfff;
        }
        let base = ((descriptor >> 16) & 0xff_ffff) | (((descriptor >> 56) & 0xff) << 24);
        let access = (descriptor >> 40) & 0xff;
        Segment {
            base,
            limit,
            selector,
            type_: (access & 0xf) as u8,
            s: (access >> 4) & 1 == 1,
            dpl: ((access >> 5) & 3) as u8,
            present: (access >> 7) & 1 == 1,
            avl: (descriptor >> 52) & 1 == 1,
            l: (descriptor >> 53) & 1 == 1,
            db: (descriptor >> 54) & 1 == 1,
            g,
            unusable: (access >> 7) & 1 == 0,
        }
    }
}

/// A GDTR or IDTR value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, descriptor-table, control registers and EFER.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
}

/// The architectural state the VMM sets at boot and prints when a guest fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuState {
    pub regs: Registers,
    pub sregs: SpecialRegisters,
}

impl fmt::Display for CpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.regs;
        let s = &self.sregs;
        writeln!(
            f,
            "RIP={:016x} RFLAGS={:016x} CPL={}",
            r.rip,
            r.rflags,
            s.cs.selector & 3
        )?;
        writeln!(
            f,
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}",
            r.rax, r.rbx, r.rcx, r.rdx
        )?;
        writeln!(
            f,
            "RSI={:016x} RDI={:016x} RSP={:016x} RBP={:016x}",
            r.rsi, r.rdi, r.rsp, r.rbp
        )?;
        writeln!(
            f,
            "R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}",
            r.r8, r.r9, r.r10, r.r11
        )?;
        writeln!(
            f,
            "R12={:016x} R13={:016x} R14={:016x} R15={:016x}",
            r.r12, r.r13, r.r14, r.r15
        )?;
        for (name, seg) in [
            ("CS", &s.cs),
            ("SS", &s.ss),
            ("DS", &s.ds),
            ("ES", &s.es),
            ("FS", &s.fs),
            ("GS", &s.gs),
            ("TR", &s.tr),
        ] {
            writeln!(
                f,
                "{name}={:04x} base={:016x} limit={:08x} type={:x} dpl={} l={} db={}",
                seg.selector, seg.base, seg.limit, seg.type_, seg.dpl, seg.l as u8, seg.db as u8
            )?;
        }
        writeln!(
            f,
            "GDT={:016x}/{:04x} IDT={:016x}/{:04x}",
            s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
        )?;
        write!(
            f,
            "CR0={:016x} CR2={:016x} CR3={:016x} CR4={:016x} EFER={:016x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_64_bit_code_descriptor() {
        // Flat 64-bit kernel code: base 0, limit 0xfffff pages, present, DPL 0, type 0xb, L=1.
        let seg = Segment::from_descriptor(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert!(seg.present && seg.s && seg.l && seg.g && !seg.db);
        assert_eq!(seg.dpl, 0);
        assert!(!seg.unusable);
    }

    #[test]
    fn decodes_base_and_byte_granular_limit() {
        let seg = Segment::from_descriptor(0x18, 0x1200_8956_7800_0067);
        assert_eq!(seg.base, 0x1256_7800);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.type_, 0x9);
        assert!(!seg.s && !seg.g);
    }

    #[test]
    fn dump_names_every_register() {
        let dump = CpuState::default().to_string();
        for name in ["RIP=", "RAX=", "R15=", "CS=", "TR=", "CR3=", "EFER="] {
            assert!(dump.contains(name), "{name} missing from {dump}");
        }
    }
}
