//! The interpreter: architectural state, memory access, decoding and execution.

mod access;
mod alu;
mod bits;
mod cache;
mod control;
mod data;
mod decode;
mod exception;
pub mod flags;
mod fpu;
mod host_fp;
mod mmx;
mod muldiv;
mod op;
mod run;
mod segment;
mod shift;
mod sse;
mod sse_ext;
mod sse_float;
mod sse_string;
mod string;
mod system;
mod x87;

use std::collections::HashSet;

use lodge_engine::{CpuState, DescriptorTable, Registers, Segment, SpecialRegisters};

pub use cache::CodeCache;
pub use exception::{vector, Event, Exception};
pub use run::RunExit;

use crate::memory::PhysicalMemory;
use crate::mmu::PagingMode;
use crate::msr::{efer, Msrs};
use crate::platform::Platform;
use crate::tlb::Tlb;
use flags::Flags;
use fpu::Fpu;

/// A hasher for page-aligned addresses and small keys (the default SipHash is needlessly slow
/// for lookups on the interpreter's paths, and no key here is chosen by an attacker who could
/// exploit collisions beyond slowing its own VM).
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// Hash builder for [`FastHasher`].
pub type FastHash = std::hash::BuildHasherDefault<FastHasher>;
/// A set of physical page addresses.
pub type PageSet = HashSet<u64, FastHash>;

/// Indices of the segment registers (the x86 encoding).
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
}

/// Indices of general-purpose registers.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R11: usize = 11;
}

/// CR0 bits.
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const WP: u64 = 1 << 16;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Bits the guest may set: everything the reported CPU supports.
    pub const WRITABLE: u64 =
        (1 << 0) | (1 << 1) | TSD | DE | PSE | PAE | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT;
}

/// Keys of one-time warnings in `Cpu::warned`, above every iced instruction code.
pub mod warning {
    pub const DR7_BREAKPOINTS: u16 = 0xffff;
    pub const COMPATIBILITY_MODE: u16 = 0xfffe;
}

/// One vCPU: its architectural state, how it reaches memory, the platform devices its run
/// loop drives, and bookkeeping of the interpreter.
pub struct Cpu {
    pub arch: ArchState,
    pub mmu: Mmu,
    pub platform: Platform,
    /// Set by a write to a page with decoded code (or an access that ended the machine):
    /// stop the block after this instruction.
    pub break_block: bool,
    /// Instructions retired.
    pub icount: u64,
    /// Instruction codes already reported as unimplemented, and `warning` keys.
    pub warned: HashSet<u16>,
    pub stats: Stats,
}

/// What a guest can observe of one vCPU and what [`CpuState`] (and a snapshot) carries: a
/// plain struct of registers, so a code generator can address its fields.
pub struct ArchState {
    /// RAX..R15 in 0..16; 16..32 read as zero (an absent base or index register).
    pub regs: [u64; 32],
    pub rip: u64,
    pub flags: Flags,
    pub segs: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub msr: Msrs,
    pub fpu: Fpu,
    /// Added to host nanoseconds to give the TSC.
    pub tsc_offset: u64,
    /// Interrupts are inhibited until the next block (after STI).
    pub interrupt_shadow: bool,
}

/// How the vCPU reaches guest memory: RAM and the buses, the software TLB, the pages holding
/// decoded code, and what is derived from the control and segment registers for every access.
pub struct Mmu {
    pub mem: PhysicalMemory,
    pub tlb: Tlb,
    /// Physical pages holding decoded instructions (writes there take the slow path).
    pub code_pages: PageSet,
    /// Pages with decoded code written since the last block.
    pub code_writes: Vec<u64>,
    /// Derived from CR0, CR3 and EFER.
    pub paging: PagingMode,
    /// Segment base applied to effective addresses, by segment index (only FS and GS are
    /// non-zero in 64-bit mode; 6 and 7 stay zero). Derived from the segment registers.
    pub seg_base: [u64; 8],
    /// CPL is 3. Derived from CS.
    pub user: bool,
}

/// Counters for performance work (logged at debug level when `run` returns).
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub blocks_translated: u64,
    /// Blocks reached through a link from the block before (no lookup).
    pub linked_blocks: u64,
    /// Blocks looked up by address (TLB, jump cache, map).
    pub looked_up_blocks: u64,
    pub page_walks: u64,
    pub code_invalidations: u64,
    /// Times the decoded-code cache was full and started over.
    pub code_cache_resets: u64,
    pub exceptions: u64,
    pub interrupts: u64,
    /// Time spent sleeping in HLT.
    pub halted_ns: u64,
}

impl Cpu {
    pub fn new(mem: PhysicalMemory) -> Self {
        let mut cpu = Cpu {
            arch: ArchState {
                regs: [0; 32],
                rip: 0xfff0,
                flags: Flags::default(),
                segs: [Segment::default(); 6],
                ldtr: Segment::default(),
                tr: Segment::default(),
                gdtr: DescriptorTable::default(),
                idtr: DescriptorTable {
                    base: 0,
                    limit: 0xffff,
                },
                cr0: cr0::ET | cr0::NW | cr0::CD,
                cr2: 0,
                cr3: 0,
                cr4: 0,
                cr8: 0,
                efer: 0,
                dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
                msr: Msrs::default(),
                fpu: Fpu::default(),
                tsc_offset: 0,
                interrupt_shadow: false,
            },
            mmu: Mmu {
                mem,
                tlb: Tlb::new(),
                code_pages: PageSet::default(),
                code_writes: Vec::new(),
                paging: PagingMode::default(),
                seg_base: [0; 8],
                user: false,
            },
            platform: Platform::new(),
            break_block: false,
            icount: 0,
            warned: HashSet::new(),
            stats: Stats::default(),
        };
        cpu.update_modes();
        cpu
    }

    /// The current privilege level.
    #[inline]
    pub fn cpl(&self) -> u8 {
        self.arch.segs[seg::CS].dpl
    }

    /// Whether the CPU executes 64-bit code.
    pub fn long_mode_code(&self) -> bool {
        self.arch.efer & efer::LMA != 0 && self.arch.segs[seg::CS].l
    }

    /// Recomputes what is derived from control registers and segments: paging controls,
    /// effective-address segment bases, the privilege. Flushes the TLB.
    pub fn update_modes(&mut self) {
        self.mmu.paging = PagingMode {
            cr3: self.arch.cr3,
            write_protect: self.arch.cr0 & cr0::WP != 0,
            no_execute: self.arch.efer & efer::NXE != 0,
        };
        self.update_segment_bases();
        self.mmu.user = self.cpl() == 3;
        self.mmu.tlb.flush();
    }

    /// Refreshes the effective-address bases after a segment or base MSR change.
    pub fn update_segment_bases(&mut self) {
        self.mmu.seg_base = [0; 8];
        if self.arch.efer & efer::LMA != 0 && self.arch.segs[seg::CS].l {
            self.mmu.seg_base[seg::FS] = self.arch.segs[seg::FS].base;
            self.mmu.seg_base[seg::GS] = self.arch.segs[seg::GS].base;
        } else {
            for (i, s) in self.arch.segs.iter().enumerate() {
                self.mmu.seg_base[i] = s.base;
            }
        }
    }

    /// Whether paging translates addresses.
    #[inline]
    pub fn paging_enabled(&self) -> bool {
        self.arch.cr0 & cr0::PG != 0
    }

    /// The time-stamp counter.
    pub fn tsc(&self) -> u64 {
        self.platform.clock.now().wrapping_add(self.arch.tsc_offset)
    }

    /// The engine-neutral register state.
    pub fn state(&self) -> CpuState {
        let r = &self.arch.regs;
        CpuState {
            regs: Registers {
                rax: r[0],
                rcx: r[1],
                rdx: r[2],
                rbx: r[3],
                rsp: r[4],
                rbp: r[5],
                rsi: r[6],
                rdi: r[7],
                r8: r[8],
                r9: r[9],
                r10: r[10],
                r11: r[11],
                r12: r[12],
                r13: r[13],
                r14: r[14],
                r15: r[15],
                rip: self.arch.rip,
                rflags: self.arch.flags.get(),
            },
            sregs: SpecialRegisters {
                es: self.arch.segs[seg::ES],
                cs: self.arch.segs[seg::CS],
                ss: self.arch.segs[seg::SS],
                ds: self.arch.segs[seg::DS],
                fs: self.arch.segs[seg::FS],
                gs: self.arch.segs[seg::GS],
                tr: self.arch.tr,
                ldt: self.arch.ldtr,
                gdt: self.arch.gdtr,
                idt: self.arch.idtr,
                cr0: self.arch.cr0,
                cr2: self.arch.cr2,
                cr3: self.arch.cr3,
                cr4: self.arch.cr4,
                cr8: self.arch.cr8,
                efer: self.arch.efer,
            },
        }
    }

    /// Replaces the register state (the TLB is flushed; decoded code is the caller's to drop).
    pub fn set_state(&mut self, state: &CpuState) {
        let r = &state.regs;
        self.arch.regs = [0; 32];
        self.arch.regs[..16].copy_from_slice(&[
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ]);
        self.arch.rip = r.rip;
        self.arch.flags.set(r.rflags);
        let s = &state.sregs;
        self.arch.segs = [s.es, s.cs, s.ss, s.ds, s.fs, s.gs];
        self.arch.tr = s.tr;
        self.arch.ldtr = s.ldt;
        self.arch.gdtr = s.gdt;
        self.arch.idtr = s.idt;
        self.arch.cr0 = s.cr0 | cr0::ET;
        self.arch.cr2 = s.cr2;
        self.arch.cr3 = s.cr3;
        self.arch.cr4 = s.cr4;
        self.arch.cr8 = s.cr8;
        self.arch.efer = s.efer;
        if self.arch.efer & efer::LME != 0 && self.arch.cr0 & cr0::PG != 0 {
            self.arch.efer |= efer::LMA;
        }
        self.arch.interrupt_shadow = false;
        self.update_modes();
    }
}
