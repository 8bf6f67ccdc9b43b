//! String instructions (MOVS, STOS, LODS, CMPS, SCAS, INS, OUTS) with REP/REPE/REPNE.
//!
//! `rep movs` and `rep stos` with DF clear copy or fill whole page-sized runs on host memory;
//! everything else goes element by element. A long REP instruction stops after a bounded
//! amount of work and restarts itself, so interrupts and stop requests are not delayed.

use iced_x86::{Code, Instruction, Mnemonic};

use super::flags::{FlagOp, DF};
use super::op::{by_size, mask, Handler, Op};
use super::{gpr, Cpu, Event};
use crate::memory::{PAGE_OFFSET_MASK, PAGE_SIZE};

pub const MOVS: u8 = 0;
pub const STOS: u8 = 1;
pub const LODS: u8 = 2;
pub const CMPS: u8 = 3;
pub const SCAS: u8 = 4;
pub const INS: u8 = 5;
pub const OUTS: u8 = 6;

/// No prefix, REP/REPE, REPNE.
pub const ONCE: u8 = 0;
pub const REPE: u8 = 1;
pub const REPNE: u8 = 2;

/// Elements processed before a REP instruction yields.
const ELEMENTS_PER_RUN: u64 = 4096;
/// Bytes processed by the bulk path before a REP instruction yields.
const BYTES_PER_RUN: u64 = 256 * 1024;

#[inline(always)]
fn address_mask<const A32: bool>() -> u64 {
    if A32 {
        0xffff_ffff
    } else {
        u64::MAX
    }
}

#[inline(always)]
fn set_index<const A32: bool>(cpu: &mut Cpu, reg: usize, value: u64) {
    cpu.arch.regs[reg] = value & address_mask::<A32>();
}

/// One string instruction.
pub fn string<const KIND: u8, const B: usize, const REP: u8, const A32: bool>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    if matches!(KIND, INS | OUTS) {
        let iopl = ((cpu.arch.flags.get() & super::flags::IOPL) >> 12) as u8;
        if cpu.cpl() > iopl {
            return Err(Event::gp(0));
        }
    }
    let step = if cpu.arch.flags.system(DF) {
        (B as u64).wrapping_neg()
    } else {
        B as u64
    };
    let amask = address_mask::<A32>();
    if REP == ONCE {
        return element::<KIND, B, A32>(cpu, op, step).map(|_| ());
    }
    if matches!(KIND, MOVS | STOS) && step == B as u64 {
        return bulk::<KIND, B, A32>(cpu, op);
    }
    let mut done = 0;
    while cpu.arch.regs[gpr::RCX] & amask != 0 {
        if done == ELEMENTS_PER_RUN {
            cpu.arch.rip = op.inst.ip();
            cpu.break_block = true;
            return Ok(());
        }
        let equal = element::<KIND, B, A32>(cpu, op, step)?;
        let count = (cpu.arch.regs[gpr::RCX] & amask).wrapping_sub(1);
        set_index::<A32>(cpu, gpr::RCX, count);
        done += 1;
        if matches!(KIND, CMPS | SCAS) && (REP == REPE) != equal {
            break;
        }
    }
    Ok(())
}

/// One iteration; returns whether a comparison found equality (CMPS/SCAS).
#[inline(always)]
fn element<const KIND: u8, const B: usize, const A32: bool>(
    cpu: &mut Cpu,
    op: &Op,
    step: u64,
) -> Result<bool, Event> {
    let amask = address_mask::<A32>();
    let rsi = cpu.arch.regs[gpr::RSI] & amask;
    let rdi = cpu.arch.regs[gpr::RDI] & amask;
    let src = rsi.wrapping_add(cpu.mmu.seg_base[op.seg as usize & 7]);
    let mut equal = false;
    match KIND {
        MOVS => {
            let v = cpu.read::<B>(src)?;
            cpu.write::<B>(rdi, v)?;
            set_index::<A32>(cpu, gpr::RSI, rsi.wrapping_add(step));
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(step));
        }
        STOS => {
            let v = cpu.gpr::<B>(0);
            cpu.write::<B>(rdi, v)?;
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(step));
        }
        LODS => {
            let v = cpu.read::<B>(src)?;
            cpu.set_gpr::<B>(0, v);
            set_index::<A32>(cpu, gpr::RSI, rsi.wrapping_add(step));
        }
        CMPS => {
            let a = cpu.read::<B>(src)?;
            let b = cpu.read::<B>(rdi)?;
            let r = a.wrapping_sub(b) & mask::<B>();
            cpu.arch
                .flags
                .set_lazy(FlagOp::Sub, (B * 8) as u32, r, a, b);
            equal = r == 0;
            set_index::<A32>(cpu, gpr::RSI, rsi.wrapping_add(step));
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(step));
        }
        SCAS => {
            let a = cpu.gpr::<B>(0);
            let b = cpu.read::<B>(rdi)?;
            let r = a.wrapping_sub(b) & mask::<B>();
            cpu.arch
                .flags
                .set_lazy(FlagOp::Sub, (B * 8) as u32, r, a, b);
            equal = r == 0;
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(step));
        }
        INS => {
            // Check the destination before the port read has side effects.
            let place = cpu.locate::<B>(rdi)?;
            let port = cpu.arch.regs[gpr::RDX] as u16;
            let v = cpu.port_read(port, B);
            cpu.place_write::<B>(place, v)?;
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(step));
        }
        _ => {
            let v = cpu.read::<B>(src)?;
            let port = cpu.arch.regs[gpr::RDX] as u16;
            cpu.port_write(port, B, v);
            set_index::<A32>(cpu, gpr::RSI, rsi.wrapping_add(step));
        }
    }
    Ok(equal)
}

/// Host address for `len` bytes at `linear` if the TLB allows a fast access of that kind.
#[inline]
fn fast_host(cpu: &Cpu, linear: u64, len: u64, write: bool) -> Option<usize> {
    let entry = cpu.mmu.tlb.entry(linear, cpu.mmu.user);
    let tag = if write { entry.write } else { entry.read };
    (tag == cpu.mmu.tlb.tag(linear) && (linear & PAGE_OFFSET_MASK) + len <= PAGE_SIZE)
        .then(|| linear.wrapping_add(entry.addend) as usize)
}

/// REP MOVS / REP STOS with DF clear.
fn bulk<const KIND: u8, const B: usize, const A32: bool>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let amask = address_mask::<A32>();
    let mut budget = BYTES_PER_RUN;
    loop {
        let count = cpu.arch.regs[gpr::RCX] & amask;
        if count == 0 {
            return Ok(());
        }
        if budget == 0 {
            cpu.arch.rip = op.inst.ip();
            cpu.break_block = true;
            return Ok(());
        }
        let rsi = cpu.arch.regs[gpr::RSI] & amask;
        let rdi = cpu.arch.regs[gpr::RDI] & amask;
        let src = rsi.wrapping_add(cpu.mmu.seg_base[op.seg as usize & 7]);
        // Elements that fit in the current destination (and source) page.
        let mut room = PAGE_SIZE - (rdi & PAGE_OFFSET_MASK);
        if KIND == MOVS {
            room = room.min(PAGE_SIZE - (src & PAGE_OFFSET_MASK));
        }
        let elements = (room / B as u64).min(count).min(budget / B as u64 + 1);
        let bytes = elements * B as u64;
        let wrapped = A32 && (rdi + bytes > 1 << 32 || (KIND == MOVS && rsi + bytes > 1 << 32));
        let host_dst = if elements > 0 && !wrapped {
            fast_host(cpu, rdi, bytes, true)
        } else {
            None
        };
        let host_src = if KIND == MOVS {
            host_dst.and_then(|_| fast_host(cpu, src, bytes, false))
        } else {
            None
        };
        let fast = match KIND {
            MOVS => match (host_dst, host_src) {
                // A forward copy onto a later overlapping destination replicates data; leave
                // that to the element loop.
                (Some(d), Some(s)) if !(d > s && d < s + bytes as usize) => {
                    // SAFETY: both ranges were checked by `fast_host` to lie within single
                    // guest RAM pages whose TLB entries allow this access (see
                    // `Cpu::read`); `copy` handles overlap like a forward element copy
                    // does when the destination is not after the source.
                    unsafe { std::ptr::copy(s as *const u8, d as *mut u8, bytes as usize) };
                    true
                }
                _ => false,
            },
            _ => match host_dst {
                Some(d) => {
                    let value = cpu.gpr::<B>(0);
                    if B == 1 {
                        // SAFETY: as above, the destination range is inside one RAM page.
                        unsafe { std::ptr::write_bytes(d as *mut u8, value as u8, bytes as usize) };
                    } else {
                        let pattern = value.to_le_bytes();
                        for i in 0..elements as usize {
                            // SAFETY: as above; each element lies inside the checked range.
                            unsafe {
                                std::ptr::copy_nonoverlapping(
                                    pattern.as_ptr(),
                                    (d + i * B) as *mut u8,
                                    B,
                                );
                            }
                        }
                    }
                    true
                }
                None => false,
            },
        };
        if fast {
            set_index::<A32>(cpu, gpr::RDI, rdi.wrapping_add(bytes));
            if KIND == MOVS {
                set_index::<A32>(cpu, gpr::RSI, rsi.wrapping_add(bytes));
            }
            set_index::<A32>(cpu, gpr::RCX, count - elements);
            budget = budget.saturating_sub(bytes);
        } else {
            // One element through the normal path (page crossing, MMIO, code pages, faults).
            element::<KIND, B, A32>(cpu, op, B as u64)?;
            let count = (cpu.arch.regs[gpr::RCX] & amask).wrapping_sub(1);
            set_index::<A32>(cpu, gpr::RCX, count);
            budget = budget.saturating_sub(B as u64);
        }
    }
}

/// The handler for a string instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let (kind, size) = match inst.mnemonic() {
        Mnemonic::Movsb => (MOVS, 1),
        Mnemonic::Movsw => (MOVS, 2),
        Mnemonic::Movsd if inst.code() == Code::Movsd_m32_m32 => (MOVS, 4),
        Mnemonic::Movsq => (MOVS, 8),
        Mnemonic::Stosb => (STOS, 1),
        Mnemonic::Stosw => (STOS, 2),
        Mnemonic::Stosd => (STOS, 4),
        Mnemonic::Stosq => (STOS, 8),
        Mnemonic::Lodsb => (LODS, 1),
        Mnemonic::Lodsw => (LODS, 2),
        Mnemonic::Lodsd => (LODS, 4),
        Mnemonic::Lodsq => (LODS, 8),
        Mnemonic::Cmpsb => (CMPS, 1),
        Mnemonic::Cmpsw => (CMPS, 2),
        Mnemonic::Cmpsd if inst.code() == Code::Cmpsd_m32_m32 => (CMPS, 4),
        Mnemonic::Cmpsq => (CMPS, 8),
        Mnemonic::Scasb => (SCAS, 1),
        Mnemonic::Scasw => (SCAS, 2),
        Mnemonic::Scasd => (SCAS, 4),
        Mnemonic::Scasq => (SCAS, 8),
        Mnemonic::Insb => (INS, 1),
        Mnemonic::Insw => (INS, 2),
        Mnemonic::Insd => (INS, 4),
        Mnemonic::Outsb => (OUTS, 1),
        Mnemonic::Outsw => (OUTS, 2),
        Mnemonic::Outsd => (OUTS, 4),
        _ => return None,
    };
    let rep = if inst.has_repne_prefix() && matches!(kind, CMPS | SCAS) {
        REPNE
    } else if inst.has_rep_prefix() || inst.has_repe_prefix() || inst.has_repne_prefix() {
        REPE
    } else {
        ONCE
    };
    let a32 = super::op::is_addr32(inst);
    macro_rules! forms {
        ($k:ident) => {
            match (rep, a32) {
                (ONCE, false) => by_size!(size, string::<$k, _, ONCE, false>),
                (REPE, false) => by_size!(size, string::<$k, _, REPE, false>),
                (_, false) => by_size!(size, string::<$k, _, REPNE, false>),
                (ONCE, true) => by_size!(size, string::<$k, _, ONCE, true>),
                (REPE, true) => by_size!(size, string::<$k, _, REPE, true>),
                (_, true) => by_size!(size, string::<$k, _, REPNE, true>),
            }
        };
    }
    Some(match kind {
        MOVS => forms!(MOVS),
        STOS => forms!(STOS),
        LODS => forms!(LODS),
        CMPS => forms!(CMPS),
        SCAS => forms!(SCAS),
        INS => forms!(INS),
        _ => forms!(OUTS),
    })
}
