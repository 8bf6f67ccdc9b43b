//! Segment descriptors and the control transfers that load them: segment register moves,
//! far returns and jumps, IRETQ, SYSCALL/SYSRET, SWAPGS, LTR/LLDT.

use lodge_engine::Segment;
use tracing::warn;

use super::flags::{self, AC, DF, ID, IF, IOPL, NT, RF, TF, VIF, VIP, VM};
use super::op::Op;
use super::{gpr, seg, Cpu, Event};
use crate::msr::efer;

/// The flat 4 GiB segment SYSCALL and SYSRET load without reading a descriptor: 64-bit
/// code (execute/read, accessed) or data (read/write, accessed) at privilege `dpl`.
fn flat_segment(selector: u16, dpl: u8, code: bool) -> Segment {
    Segment {
        selector,
        base: 0,
        limit: 0xffff_ffff,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !code,
        s: true,
        l: code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// A segment register's value after loading a null selector.
pub fn null_segment(selector: u16) -> Segment {
    Segment {
        selector,
        unusable: true,
        ..Default::default()
    }
}

impl Cpu {
    /// Reads the 8-byte descriptor for `selector` from the GDT or LDT.
    pub fn read_descriptor(&mut self, selector: u16) -> Result<u64, Event> {
        let (base, limit) = if selector & 4 != 0 {
            if self.arch.ldtr.unusable {
                return Err(Event::gp(u32::from(selector & !3)));
            }
            (self.arch.ldtr.base, u64::from(self.arch.ldtr.limit))
        } else {
            (self.arch.gdtr.base, u64::from(self.arch.gdtr.limit))
        };
        let offset = u64::from(selector & !7);
        if offset + 7 > limit {
            return Err(Event::gp(u32::from(selector & !3)));
        }
        self.read_system::<8>(base.wrapping_add(offset))
    }

    /// Reads and decodes a code/data descriptor.
    pub fn load_descriptor(&mut self, selector: u16) -> Result<Segment, Event> {
        let raw = self.read_descriptor(selector)?;
        Ok(Segment::from_descriptor(selector, raw))
    }

    /// Sets the accessed bit of a descriptor, as loading it does.
    fn mark_accessed(&mut self, selector: u16, descriptor: &Segment) -> Result<(), Event> {
        if descriptor.type_ & 1 != 0 {
            return Ok(());
        }
        let base = if selector & 4 != 0 {
            self.arch.ldtr.base
        } else {
            self.arch.gdtr.base
        };
        let addr = base.wrapping_add(u64::from(selector & !7) + 5);
        let access = self.read_system::<1>(addr)?;
        self.write_bytes(addr, &[(access as u8) | 1], false)
    }

    /// Loads segment register `index` (not CS) with `selector`, with the protected-mode
    /// checks of MOV/POP to a segment register.
    pub fn load_segment(&mut self, index: usize, selector: u16) -> Result<(), Event> {
        let cpl = self.cpl();
        let rpl = (selector & 3) as u8;
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            // Null selector: fine for data segments; for SS only in 64-bit mode below CPL 3.
            if index == seg::SS && (cpl == 3 || rpl != cpl || !self.long_mode_code()) {
                return Err(Event::gp(0));
            }
            let mut null = null_segment(selector);
            if index == seg::SS {
                null.dpl = cpl;
            }
            self.arch.segs[index] = null;
            self.update_segment_bases();
            return Ok(());
        }
        let mut descriptor = self.load_descriptor(selector)?;
        let code = descriptor.type_ & 0x8 != 0;
        let writable = descriptor.type_ & 0x2 != 0;
        let conforming = code && descriptor.type_ & 0x4 != 0;
        if !descriptor.s {
            return Err(Event::gp(error));
        }
        if index == seg::SS {
            if code || !writable || rpl != cpl || descriptor.dpl != cpl {
                return Err(Event::gp(error));
            }
            if !descriptor.present {
                return Err(Event::ss(error));
            }
        } else {
            // Data or readable code; non-conforming ones need enough privilege.
            if code && !writable {
                return Err(Event::gp(error));
            }
            if !conforming && (rpl > descriptor.dpl || cpl > descriptor.dpl) {
                return Err(Event::gp(error));
            }
            if !descriptor.present {
                return Err(Event::np(error));
            }
        }
        self.mark_accessed(selector, &descriptor)?;
        descriptor.type_ |= 1;
        self.arch.segs[index] = descriptor;
        self.update_segment_bases();
        Ok(())
    }

    /// Loads CS for a far transfer to privilege `new_cpl` (`selector` already checked to be
    /// a code segment the transfer may reach).
    fn set_code_segment(
        &mut self,
        selector: u16,
        mut descriptor: Segment,
        new_cpl: u8,
    ) -> Result<(), Event> {
        if !descriptor.l || descriptor.db {
            // Compatibility mode is not emulated. Any process can reach it (Linux's GDT has a
            // 32-bit user code segment), so it must not end the VM: the transfer fails like
            // one to an unusable segment, and the guest kernel kills the process.
            if self.warned.insert(super::warning::COMPATIBILITY_MODE) {
                warn!(
                    "Far transfer to 32-bit code segment {selector:#x}: compatibility mode is \
                     not supported, raising #GP"
                );
            }
            return Err(Event::gp(u32::from(selector & !3)));
        }
        descriptor.selector = (selector & !3) | u16::from(new_cpl);
        descriptor.type_ |= 1;
        self.arch.segs[seg::CS] = descriptor;
        self.mmu.user = new_cpl == 3;
        self.update_segment_bases();
        Ok(())
    }

    /// Checks a code segment descriptor for a far JMP/RET/IRET to privilege `rpl`.
    fn check_code_target(
        &mut self,
        selector: u16,
        rpl: u8,
        returning: bool,
    ) -> Result<Segment, Event> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            return Err(Event::gp(0));
        }
        let d = self.load_descriptor(selector)?;
        if !d.s || d.type_ & 0x8 == 0 {
            return Err(Event::gp(error));
        }
        let conforming = d.type_ & 0x4 != 0;
        let cpl = self.cpl();
        let ok = if returning {
            rpl >= cpl
                && if conforming {
                    d.dpl <= rpl
                } else {
                    d.dpl == rpl
                }
        } else if conforming {
            d.dpl <= cpl
        } else {
            rpl <= cpl && d.dpl == cpl
        };
        if !ok {
            return Err(Event::gp(error));
        }
        if !d.present {
            return Err(Event::np(error));
        }
        Ok(d)
    }

    /// Checks the SS selector popped by a return to privilege `cpl`.
    fn check_stack_target(&mut self, selector: u16, cpl: u8) -> Result<Segment, Event> {
        let error = u32::from(selector & !3);
        if selector & !3 == 0 {
            // 64-bit mode allows a null SS when returning to CPL 0-2.
            if cpl == 3 || (selector & 3) as u8 != cpl {
                return Err(Event::gp(error));
            }
            let mut null = null_segment(selector);
            null.dpl = cpl;
            return Ok(null);
        }
        let d = self.load_descriptor(selector)?;
        if !d.s
            || d.type_ & 0x8 != 0
            || d.type_ & 0x2 == 0
            || (selector & 3) as u8 != cpl
            || d.dpl != cpl
        {
            return Err(Event::gp(error));
        }
        if !d.present {
            return Err(Event::ss(error));
        }
        Ok(d)
    }

    /// Nulls data segment registers the new (outer) privilege may not use.
    fn drop_inaccessible_segments(&mut self, cpl: u8) {
        for index in [seg::ES, seg::DS, seg::FS, seg::GS] {
            let s = self.arch.segs[index];
            let conforming_code = s.type_ & 0xc == 0xc;
            if !s.unusable && !conforming_code && s.dpl < cpl {
                // Keep FS/GS bases: in 64-bit mode they come from MSRs the kernel manages.
                let base = s.base;
                self.arch.segs[index] = null_segment(0);
                if index == seg::FS || index == seg::GS {
                    self.arch.segs[index].base = base;
                }
            }
        }
        self.update_segment_bases();
    }

    /// IRETQ (and IRETD in 64-bit mode): pops RIP, CS, RFLAGS, RSP and SS.
    pub fn iret(&mut self, size: usize) -> Result<(), Event> {
        if self.arch.flags.system(NT) {
            return Err(Event::gp(0));
        }
        let rsp = self.arch.regs[gpr::RSP];
        let mut words = [0u64; 5];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self
                .read_sized(rsp.wrapping_add((i * size) as u64), size)
                .map_err(Event::into_stack_fault)?;
        }
        let [rip, cs, rflags, new_rsp, ss] = words;
        let (cs, ss) = (cs as u16, ss as u16);
        let new_cpl = (cs & 3) as u8;
        let cpl = self.cpl();
        if new_cpl < cpl {
            return Err(Event::gp(u32::from(cs & !3)));
        }
        let code = self.check_code_target(cs, new_cpl, true)?;
        let stack = self.check_stack_target(ss, new_cpl)?;
        if !crate::mmu::is_canonical(rip) {
            return Err(Event::gp(0));
        }
        self.set_code_segment(cs, code, new_cpl)?;
        self.arch.segs[seg::SS] = stack;
        self.set_flags_privileged(rflags, cpl, size);
        self.arch.regs[gpr::RSP] = new_rsp;
        self.arch.rip = rip;
        if new_cpl > cpl {
            self.drop_inaccessible_segments(new_cpl);
        }
        Ok(())
    }

    /// Sets RFLAGS as IRET/POPF do at privilege `cpl` (IOPL only at CPL 0, IF up to IOPL).
    pub fn set_flags_privileged(&mut self, value: u64, cpl: u8, size: usize) {
        let old = self.arch.flags.get();
        let mut mask = flags::ARITH | TF | DF | NT | AC | ID;
        if size == 2 {
            mask &= 0xffff;
        }
        let iopl = ((old & IOPL) >> 12) as u8;
        if cpl == 0 {
            mask |= IOPL | VIF | VIP;
        }
        if cpl <= iopl {
            mask |= IF;
        }
        mask &= !(VM | RF);
        let new = (old & !mask) | (value & mask);
        self.arch.flags.set(new);
    }

    /// Far return (RETF): pops RIP and CS (and RSP/SS when going outward), then `pop_bytes`.
    pub fn far_return(&mut self, size: usize, pop_bytes: u64) -> Result<(), Event> {
        let rsp = self.arch.regs[gpr::RSP];
        let read = |cpu: &mut Cpu, offset: u64| {
            cpu.read_sized(rsp.wrapping_add(offset), size)
                .map_err(Event::into_stack_fault)
        };
        let rip = read(self, 0)?;
        let cs = read(self, size as u64)? as u16;
        let new_cpl = (cs & 3) as u8;
        let cpl = self.cpl();
        if new_cpl < cpl {
            return Err(Event::gp(u32::from(cs & !3)));
        }
        let code = self.check_code_target(cs, new_cpl, true)?;
        if !crate::mmu::is_canonical(rip) {
            return Err(Event::gp(0));
        }
        if new_cpl == cpl {
            self.set_code_segment(cs, code, new_cpl)?;
            self.arch.rip = rip;
            self.arch.regs[gpr::RSP] = rsp.wrapping_add(2 * size as u64 + pop_bytes);
            return Ok(());
        }
        let sp_offset = 2 * size as u64 + pop_bytes;
        let new_rsp = read(self, sp_offset)?;
        let ss = read(self, sp_offset + size as u64)? as u16;
        let stack = self.check_stack_target(ss, new_cpl)?;
        self.set_code_segment(cs, code, new_cpl)?;
        self.arch.segs[seg::SS] = stack;
        self.arch.rip = rip;
        self.arch.regs[gpr::RSP] = new_rsp.wrapping_add(pop_bytes);
        self.drop_inaccessible_segments(new_cpl);
        Ok(())
    }

    /// Far JMP to a code segment at the same privilege (call gates are not supported).
    pub fn far_jump(&mut self, selector: u16, rip: u64) -> Result<(), Event> {
        let rpl = (selector & 3) as u8;
        let code = self.check_code_target(selector, rpl, false)?;
        if !crate::mmu::is_canonical(rip) {
            return Err(Event::gp(0));
        }
        let cpl = self.cpl();
        self.set_code_segment(selector, code, cpl)?;
        self.arch.rip = rip;
        Ok(())
    }

    /// SYSCALL.
    pub fn syscall(&mut self) -> Result<(), Event> {
        if self.arch.efer & efer::SCE == 0 || !self.long_mode_code() {
            return Err(Event::ud());
        }
        let star = self.arch.msr.star;
        // Selectors are 16-bit registers: STAR-derived ones wrap.
        let selector = ((star >> 32) & 0xfffc) as u16;
        self.arch.regs[gpr::RCX] = self.arch.rip;
        let rflags = self.arch.flags.get();
        self.arch.regs[gpr::R11] = rflags & !RF;
        self.arch.segs[seg::CS] = flat_segment(selector, 0, true);
        self.arch.segs[seg::SS] = flat_segment(selector.wrapping_add(8), 0, false);
        self.arch.flags.set(rflags & !self.arch.msr.sfmask & !RF);
        self.arch.rip = self.arch.msr.lstar;
        self.mmu.user = false;
        self.update_segment_bases();
        Ok(())
    }

    /// SYSRET (to 64-bit code with REX.W, else to compatibility mode, which is unsupported).
    pub fn sysret(&mut self, to_64bit: bool) -> Result<(), Event> {
        if self.arch.efer & efer::SCE == 0 || !self.long_mode_code() {
            return Err(Event::ud());
        }
        if self.cpl() != 0 {
            return Err(Event::gp(0));
        }
        if !to_64bit {
            return Err(Event::fatal(
                "SYSRET to compatibility mode is not supported",
            ));
        }
        let rip = self.arch.regs[gpr::RCX];
        if !crate::mmu::is_canonical(rip) {
            return Err(Event::gp(0));
        }
        let base = ((self.arch.msr.star >> 48) & 0xffff) as u16;
        self.arch.segs[seg::CS] = flat_segment(base.wrapping_add(16) | 3, 3, true);
        // SS is loaded flat as on Intel CPUs; AVL and L (meaningless for SS) stay.
        let old_ss = self.arch.segs[seg::SS];
        self.arch.segs[seg::SS] = Segment {
            avl: old_ss.avl,
            l: old_ss.l,
            ..flat_segment(base.wrapping_add(8) | 3, 3, false)
        };
        let r11 = self.arch.regs[gpr::R11];
        self.arch
            .flags
            .set((r11 & flags::WRITABLE & !RF & !VM) | flags::FIXED);
        self.arch.rip = rip;
        self.mmu.user = true;
        self.update_segment_bases();
        Ok(())
    }

    /// SWAPGS.
    pub fn swapgs(&mut self) -> Result<(), Event> {
        if self.cpl() != 0 {
            return Err(Event::gp(0));
        }
        std::mem::swap(
            &mut self.arch.segs[seg::GS].base,
            &mut self.arch.msr.kernel_gs_base,
        );
        self.update_segment_bases();
        Ok(())
    }

    /// Reads a 16-byte long-mode system descriptor (TSS or LDT) from the GDT.
    fn read_system_descriptor(&mut self, selector: u16) -> Result<(Segment, u64), Event> {
        let error = u32::from(selector & !3);
        if selector & 4 != 0 {
            return Err(Event::gp(error));
        }
        let offset = u64::from(selector & !7);
        if offset + 15 > u64::from(self.arch.gdtr.limit) {
            return Err(Event::gp(error));
        }
        let low = self.read_system::<8>(self.arch.gdtr.base.wrapping_add(offset))?;
        let high = self.read_system::<8>(self.arch.gdtr.base.wrapping_add(offset + 8))?;
        let mut d = Segment::from_descriptor(selector, low);
        d.base |= (high & 0xffff_ffff) << 32;
        Ok((d, self.arch.gdtr.base.wrapping_add(offset)))
    }

    /// LTR.
    pub fn load_task_register(&mut self, selector: u16) -> Result<(), Event> {
        if self.cpl() != 0 {
            return Err(Event::gp(0));
        }
        if selector & !3 == 0 {
            return Err(Event::gp(0));
        }
        let (d, addr) = self.read_system_descriptor(selector)?;
        // Available 64-bit TSS.
        if d.s || d.type_ != 0x9 {
            return Err(Event::gp(u32::from(selector & !3)));
        }
        if !d.present {
            return Err(Event::np(u32::from(selector & !3)));
        }
        // Mark busy (the descriptor may wrap around the end of the address space).
        let access_byte = addr.wrapping_add(5);
        let access = self.read_system::<1>(access_byte)? as u8;
        self.write_bytes(access_byte, &[access | 0x2], false)?;
        let mut tr = d;
        tr.type_ = 0xb;
        self.arch.tr = tr;
        Ok(())
    }

    /// LLDT.
    pub fn load_ldt(&mut self, selector: u16) -> Result<(), Event> {
        if self.cpl() != 0 {
            return Err(Event::gp(0));
        }
        if selector & !3 == 0 {
            self.arch.ldtr = null_segment(selector);
            return Ok(());
        }
        let (d, _) = self.read_system_descriptor(selector)?;
        if d.s || d.type_ != 0x2 {
            return Err(Event::gp(u32::from(selector & !3)));
        }
        if !d.present {
            return Err(Event::np(u32::from(selector & !3)));
        }
        self.arch.ldtr = d;
        Ok(())
    }
}

/// MOV Sreg, r/m16.
pub fn mov_to_segment(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let index = op.r[0] as usize;
    if index == seg::CS || index > seg::GS {
        return Err(Event::ud());
    }
    let selector = cpu.read_operand::<2>(op, 1)? as u16;
    cpu.load_segment(index, selector)
}

/// MOV r/m, Sreg.
pub fn mov_from_segment(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let index = op.r[1] as usize;
    if index > seg::GS {
        return Err(Event::ud());
    }
    let selector = u64::from(cpu.arch.segs[index].selector);
    if op.is_memory(0) {
        let addr = cpu.ea(op);
        cpu.write::<2>(addr, selector)
    } else {
        // A register destination receives the zero-extended selector at 32/64-bit size.
        match op.inst.op0_register().size() {
            2 => cpu.set_gpr::<2>(op.r[0], selector),
            4 => cpu.set_gpr::<4>(op.r[0], selector),
            _ => cpu.set_gpr::<8>(op.r[0], selector),
        }
        Ok(())
    }
}

/// PUSH FS/GS.
pub fn push_segment(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let index = op.r[0] as usize & 7;
    let selector = u64::from(cpu.arch.segs.get(index).map_or(0, |s| s.selector));
    match op.inst.stack_pointer_increment() {
        -2 => cpu.push::<2>(selector),
        _ => cpu.push::<8>(selector),
    }
}

/// POP FS/GS.
pub fn pop_segment(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let index = op.r[0] as usize;
    if index != seg::FS && index != seg::GS {
        return Err(Event::ud());
    }
    let size = if op.inst.stack_pointer_increment() == 2 {
        2
    } else {
        8
    };
    let rsp = cpu.arch.regs[gpr::RSP];
    let selector = if size == 2 {
        cpu.stack_read::<2>(rsp)?
    } else {
        cpu.stack_read::<8>(rsp)?
    };
    cpu.load_segment(index, selector as u16)?;
    cpu.arch.regs[gpr::RSP] = rsp.wrapping_add(size);
    Ok(())
}

/// Keeps the assertion that interrupt-flag handling here matches flags::IF.
const _: () = assert!(IF == 1 << 9);
