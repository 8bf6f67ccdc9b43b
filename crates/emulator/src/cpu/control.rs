//! Control transfers: JMP, Jcc, CALL, RET, LOOP/JRCXZ, INT n/INT3/INT1, IRET, SYSCALL/SYSRET,
//! far RET/JMP/CALL.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::op::{Handler, Op, MEM, REG};
use super::{gpr, vector, Cpu, Event};

/// JMP rel.
pub fn jmp(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.arch.rip = op.inst.near_branch_target();
    Ok(())
}

/// Jcc rel with condition code `CC` (the opcode's low nibble): one handler per condition,
/// so the condition's evaluation is specialised.
pub fn jcc<const CC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    if cpu.arch.flags.condition(CC) {
        cpu.arch.rip = op.inst.near_branch_target();
    }
    Ok(())
}

/// JMP r/m64.
pub fn jmp_indirect<const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let target = cpu.source::<8, SRC>(op, 0)?;
    if !crate::mmu::is_canonical(target) {
        return Err(Event::gp(0));
    }
    cpu.arch.rip = target;
    Ok(())
}

/// CALL rel.
pub fn call(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let ret = cpu.arch.rip;
    cpu.push::<8>(ret)?;
    cpu.arch.rip = op.inst.near_branch_target();
    Ok(())
}

/// CALL r/m64.
pub fn call_indirect<const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let target = cpu.source::<8, SRC>(op, 0)?;
    if !crate::mmu::is_canonical(target) {
        return Err(Event::gp(0));
    }
    let ret = cpu.arch.rip;
    cpu.push::<8>(ret)?;
    cpu.arch.rip = target;
    Ok(())
}

/// RET / RET imm16.
pub fn ret<const IMM: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let rsp = cpu.arch.regs[gpr::RSP];
    let target = cpu.stack_read::<8>(rsp)?;
    if !crate::mmu::is_canonical(target) {
        return Err(Event::gp(0));
    }
    let extra = if IMM {
        op.inst.immediate(0) & 0xffff
    } else {
        0
    };
    cpu.arch.regs[gpr::RSP] = rsp.wrapping_add(8 + extra);
    cpu.arch.rip = target;
    Ok(())
}

/// LOOP/LOOPE/LOOPNE/JRCXZ (`ADDR32`: ECX is the counter).
pub fn loop_<const KIND: u8, const ADDR32: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let mask = if ADDR32 { 0xffff_ffff } else { u64::MAX };
    let count = cpu.arch.regs[gpr::RCX] & mask;
    let taken = if KIND == 3 {
        count == 0
    } else {
        let count = count.wrapping_sub(1) & mask;
        // The masked count: with ECX the upper half is cleared, as a 32-bit write does.
        cpu.arch.regs[gpr::RCX] = count;
        let zf = cpu.arch.flags.condition(4);
        count != 0
            && match KIND {
                1 => zf,
                2 => !zf,
                _ => true,
            }
    };
    if taken {
        cpu.arch.rip = op.inst.near_branch_target();
    }
    Ok(())
}

/// INT imm8.
pub fn int(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.raise_software(op.inst.immediate(0) as u8)
}

/// INT3.
pub fn int3(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    cpu.raise_software(vector::BP)
}

/// INT1 (ICEBP): a #DB trap without the gate privilege check.
pub fn int1(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    match cpu.raise(super::Exception {
        vector: vector::DB,
        error_code: None,
        address: 0,
    }) {
        Ok(()) => Ok(()),
        Err(e) => Err(e),
    }
}

/// IRET with operand size `B`.
pub fn iret<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    cpu.iret(B)
}

/// SYSCALL.
pub fn syscall(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    cpu.syscall()
}

/// SYSRET / SYSRETQ.
pub fn sysret<const TO_64: bool>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    cpu.sysret(TO_64)
}

/// RETF / RETF imm16 with operand size `B`.
pub fn retf<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let extra = if op.inst.op_count() > 0 {
        op.inst.immediate(0) & 0xffff
    } else {
        0
    };
    cpu.far_return(B, extra)
}

/// Reads the far pointer operand m16:16/32/64 (`B`-byte offset, then the selector).
fn far_pointer<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(u16, u64), Event> {
    let addr = cpu.ea(op);
    let offset = cpu.read::<B>(addr)?;
    let selector = cpu.read::<2>(addr.wrapping_add(B as u64))? as u16;
    Ok((selector, offset))
}

/// JMP FAR m16:64 / m16:32 / m16:16.
pub fn jmp_far<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let (selector, offset) = far_pointer::<B>(cpu, op)?;
    cpu.far_jump(selector, offset)
}

/// CALL FAR m16:64 / m16:32 / m16:16 (same privilege).
pub fn call_far<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let (selector, offset) = far_pointer::<B>(cpu, op)?;
    let cs = u64::from(cpu.arch.segs[super::seg::CS].selector);
    let ret = cpu.arch.rip;
    let rsp = cpu.arch.regs[gpr::RSP];
    let saved_cs = cpu.arch.segs[super::seg::CS];
    let saved_user = cpu.mmu.user;
    cpu.far_jump(selector, offset)?;
    let pushed = cpu.push::<B>(cs).and_then(|_| cpu.push::<B>(ret));
    if let Err(e) = pushed {
        cpu.arch.regs[gpr::RSP] = rsp;
        cpu.arch.segs[super::seg::CS] = saved_cs;
        cpu.mmu.user = saved_user;
        cpu.update_segment_bases();
        return Err(e);
    }
    Ok(())
}

/// The handler for a control transfer, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let handler = select_unchecked(inst)?;
    // A relative target is fixed at decode time, so only branches that could fault on it
    // pay for the check.
    if inst.op_count() > 0
        && inst.op0_kind() == OpKind::NearBranch64
        && !crate::mmu::is_canonical(inst.near_branch_target())
    {
        return Some(relative_branch_to_non_canonical);
    }
    Some(handler)
}

/// A relative JMP, CALL, Jcc or LOOP whose target is not canonical: taking it raises #GP(0)
/// at the branch, before any of its effects.
fn relative_branch_to_non_canonical(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    if matches!(op.inst.mnemonic(), Mnemonic::Jmp | Mnemonic::Call) {
        return Err(Event::gp(0));
    }
    // Jcc and LOOP: run the branch, then undo it if it was taken (LOOP's count included).
    let rcx = cpu.arch.regs[gpr::RCX];
    let handler = select_unchecked(&op.inst).ok_or_else(|| Event::fatal("Branch vanished"))?;
    handler(cpu, op)?;
    if cpu.arch.rip == op.inst.near_branch_target() {
        cpu.arch.regs[gpr::RCX] = rcx;
        return Err(Event::gp(0));
    }
    Ok(())
}

fn select_unchecked(inst: &Instruction) -> Option<Handler> {
    let h = match inst.mnemonic() {
        Mnemonic::Jmp => match inst.op_kind(0) {
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16 => jmp as Handler,
            OpKind::Register => jmp_indirect::<REG>,
            OpKind::Memory if inst.is_jmp_far_indirect() => match far_offset_size(inst) {
                8 => jmp_far::<8>,
                4 => jmp_far::<4>,
                _ => jmp_far::<2>,
            },
            OpKind::Memory => jmp_indirect::<MEM>,
            _ => return None,
        },
        Mnemonic::Call => match inst.op_kind(0) {
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16 => call as Handler,
            OpKind::Register => call_indirect::<REG>,
            OpKind::Memory if inst.is_call_far_indirect() => match far_offset_size(inst) {
                8 => call_far::<8>,
                4 => call_far::<4>,
                _ => call_far::<2>,
            },
            OpKind::Memory => call_indirect::<MEM>,
            _ => return None,
        },
        Mnemonic::Ret => {
            if inst.op_count() == 1 {
                ret::<true>
            } else {
                ret::<false>
            }
        }
        Mnemonic::Retf => match inst.code() {
            iced_x86::Code::Retfq | iced_x86::Code::Retfq_imm16 => retf::<8> as Handler,
            iced_x86::Code::Retfd | iced_x86::Code::Retfd_imm16 => retf::<4>,
            _ => retf::<2>,
        },
        Mnemonic::Jo => jcc::<0>,
        Mnemonic::Jno => jcc::<1>,
        Mnemonic::Jb => jcc::<2>,
        Mnemonic::Jae => jcc::<3>,
        Mnemonic::Je => jcc::<4>,
        Mnemonic::Jne => jcc::<5>,
        Mnemonic::Jbe => jcc::<6>,
        Mnemonic::Ja => jcc::<7>,
        Mnemonic::Js => jcc::<8>,
        Mnemonic::Jns => jcc::<9>,
        Mnemonic::Jp => jcc::<10>,
        Mnemonic::Jnp => jcc::<11>,
        Mnemonic::Jl => jcc::<12>,
        Mnemonic::Jge => jcc::<13>,
        Mnemonic::Jle => jcc::<14>,
        Mnemonic::Jg => jcc::<15>,
        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz => {
            let addr32 = is_ecx_form(inst);
            let k = match inst.mnemonic() {
                Mnemonic::Loope => 1,
                Mnemonic::Loopne => 2,
                Mnemonic::Jrcxz | Mnemonic::Jecxz => 3,
                _ => 0,
            };
            match (k, addr32) {
                (0, false) => loop_::<0, false> as Handler,
                (1, false) => loop_::<1, false>,
                (2, false) => loop_::<2, false>,
                (3, false) => loop_::<3, false>,
                (0, true) => loop_::<0, true>,
                (1, true) => loop_::<1, true>,
                (2, true) => loop_::<2, true>,
                (_, _) => loop_::<3, true>,
            }
        }
        Mnemonic::Int => int,
        Mnemonic::Int3 => int3,
        Mnemonic::Int1 => int1,
        Mnemonic::Iretq => iret::<8>,
        Mnemonic::Iretd => iret::<4>,
        Mnemonic::Iret => iret::<2>,
        Mnemonic::Syscall => syscall,
        Mnemonic::Sysretq => sysret::<true>,
        Mnemonic::Sysret => sysret::<false>,
        _ => return None,
    };
    Some(h)
}

/// The offset size of a far pointer operand (m16:64, m16:32 or m16:16).
fn far_offset_size(inst: &Instruction) -> usize {
    inst.memory_size().size().saturating_sub(2)
}

/// Whether a LOOP/JRCXZ uses ECX (a 0x67 prefix in 64-bit mode).
fn is_ecx_form(inst: &Instruction) -> bool {
    use iced_x86::Code::*;
    matches!(
        inst.code(),
        Loopne_rel8_64_ECX | Loope_rel8_64_ECX | Loop_rel8_64_ECX | Jecxz_rel8_64
    )
}
