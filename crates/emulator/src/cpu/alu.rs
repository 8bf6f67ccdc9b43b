//! Two-operand arithmetic and logic (ADD, OR, ADC, SBB, AND, SUB, XOR, CMP, TEST) and the
//! one-operand INC, DEC, NEG, NOT.

use iced_x86::{Instruction, Mnemonic};

use super::flags::FlagOp;
use super::op::{by_size, kind, mask, size0, Handler, Op, IMM, MEM, REG};
use super::{Cpu, Event};

pub const ADD: u8 = 0;
pub const OR: u8 = 1;
pub const ADC: u8 = 2;
pub const SBB: u8 = 3;
pub const AND: u8 = 4;
pub const SUB: u8 = 5;
pub const XOR: u8 = 6;
pub const CMP: u8 = 7;
pub const TEST: u8 = 8;

pub const INC: u8 = 0;
pub const DEC: u8 = 1;
pub const NEG: u8 = 2;
pub const NOT: u8 = 3;

/// Computes `a OP b` at `B` bytes and records the flags.
#[inline(always)]
fn compute<const OP: u8, const B: usize>(cpu: &mut Cpu, a: u64, b: u64) -> u64 {
    let m = mask::<B>();
    let bits = (B * 8) as u32;
    match OP {
        ADD => {
            let r = a.wrapping_add(b) & m;
            cpu.arch.flags.set_lazy(FlagOp::Add, bits, r, a, b);
            r
        }
        ADC => {
            let carry = cpu.arch.flags.carry();
            let r = a.wrapping_add(b).wrapping_add(u64::from(carry)) & m;
            cpu.arch
                .flags
                .set_with_carry(FlagOp::Adc, bits, r, a, b, carry);
            r
        }
        SUB | CMP => {
            let r = a.wrapping_sub(b) & m;
            cpu.arch.flags.set_lazy(FlagOp::Sub, bits, r, a, b);
            r
        }
        SBB => {
            let carry = cpu.arch.flags.carry();
            let r = a.wrapping_sub(b).wrapping_sub(u64::from(carry)) & m;
            cpu.arch
                .flags
                .set_with_carry(FlagOp::Sbb, bits, r, a, b, carry);
            r
        }
        AND | TEST => {
            let r = a & b;
            cpu.arch.flags.set_lazy(FlagOp::Logic, bits, r, 0, 0);
            r
        }
        OR => {
            let r = a | b;
            cpu.arch.flags.set_lazy(FlagOp::Logic, bits, r, 0, 0);
            r
        }
        _ => {
            let r = a ^ b;
            cpu.arch.flags.set_lazy(FlagOp::Logic, bits, r, 0, 0);
            r
        }
    }
}

/// `dst OP= src` with `dst` a register or memory and `src` a register, memory or immediate.
pub fn binary<const OP: u8, const B: usize, const DST: u8, const SRC: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let writes = OP != CMP && OP != TEST;
    let src = cpu.source::<B, SRC>(op, 1)?;
    if DST == REG {
        let dst = cpu.gpr::<B>(op.r[0]);
        let r = compute::<OP, B>(cpu, dst, src);
        if writes {
            cpu.set_gpr::<B>(op.r[0], r);
        }
    } else {
        let addr = cpu.ea(op);
        if writes {
            let place = cpu.locate::<B>(addr)?;
            let dst = cpu.place_read::<B>(place)?;
            let r = compute::<OP, B>(cpu, dst, src);
            cpu.place_write::<B>(place, r)?;
        } else {
            let dst = cpu.read::<B>(addr)?;
            compute::<OP, B>(cpu, dst, src);
        }
    }
    Ok(())
}

#[inline(always)]
fn compute_unary<const OP: u8, const B: usize>(cpu: &mut Cpu, a: u64) -> u64 {
    let m = mask::<B>();
    let bits = (B * 8) as u32;
    match OP {
        INC => {
            let r = a.wrapping_add(1) & m;
            cpu.arch.flags.set_inc_dec(FlagOp::Inc, bits, r, a);
            r
        }
        DEC => {
            let r = a.wrapping_sub(1) & m;
            cpu.arch.flags.set_inc_dec(FlagOp::Dec, bits, r, a);
            r
        }
        NEG => {
            let r = 0u64.wrapping_sub(a) & m;
            cpu.arch.flags.set_lazy(FlagOp::Sub, bits, r, 0, a);
            r
        }
        _ => !a & m,
    }
}

/// INC/DEC/NEG/NOT of a register or memory operand.
pub fn unary<const OP: u8, const B: usize, const DST: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    if DST == REG {
        let a = cpu.gpr::<B>(op.r[0]);
        let r = compute_unary::<OP, B>(cpu, a);
        cpu.set_gpr::<B>(op.r[0], r);
    } else {
        let addr = cpu.ea(op);
        let place = cpu.locate::<B>(addr)?;
        let a = cpu.place_read::<B>(place)?;
        let r = compute_unary::<OP, B>(cpu, a);
        cpu.place_write::<B>(place, r)?;
    }
    Ok(())
}

/// The forms of a two-operand ALU instruction: register or memory destination, register,
/// memory or immediate source.
macro_rules! binary_forms {
    ($op:ident, $size:expr, $dst:expr, $src:expr) => {
        match ($dst, $src) {
            (REG, REG) => by_size!($size, binary::<$op, _, REG, REG>),
            (REG, MEM) => by_size!($size, binary::<$op, _, REG, MEM>),
            (REG, _) => by_size!($size, binary::<$op, _, REG, IMM>),
            (_, REG) => by_size!($size, binary::<$op, _, MEM, REG>),
            (_, _) => by_size!($size, binary::<$op, _, MEM, IMM>),
        }
    };
}

macro_rules! unary_forms {
    ($op:ident, $size:expr, $dst:expr) => {
        match $dst {
            REG => by_size!($size, unary::<$op, _, REG>),
            _ => by_size!($size, unary::<$op, _, MEM>),
        }
    };
}

/// The handler for an ALU instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let size = size0(inst);
    let dst = kind(inst, 0);
    let h = match inst.mnemonic() {
        Mnemonic::Add => binary_forms!(ADD, size, dst, kind(inst, 1)),
        Mnemonic::Or => binary_forms!(OR, size, dst, kind(inst, 1)),
        Mnemonic::Adc => binary_forms!(ADC, size, dst, kind(inst, 1)),
        Mnemonic::Sbb => binary_forms!(SBB, size, dst, kind(inst, 1)),
        Mnemonic::And => binary_forms!(AND, size, dst, kind(inst, 1)),
        Mnemonic::Sub => binary_forms!(SUB, size, dst, kind(inst, 1)),
        Mnemonic::Xor => binary_forms!(XOR, size, dst, kind(inst, 1)),
        Mnemonic::Cmp => binary_forms!(CMP, size, dst, kind(inst, 1)),
        Mnemonic::Test => binary_forms!(TEST, size, dst, kind(inst, 1)),
        Mnemonic::Inc => unary_forms!(INC, size, dst),
        Mnemonic::Dec => unary_forms!(DEC, size, dst),
        Mnemonic::Neg => unary_forms!(NEG, size, dst),
        Mnemonic::Not => unary_forms!(NOT, size, dst),
        _ => return None,
    };
    Some(h)
}
