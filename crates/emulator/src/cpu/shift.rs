//! Shifts and rotates: SHL/SAL, SHR, SAR, ROL, ROR, RCL, RCR, SHLD, SHRD.

use iced_x86::{Instruction, Mnemonic};

use super::flags::{CF, OF};
use super::op::{
    by_size, by_word_size, kind, mask, sign, sign_extend, size0, Handler, Op, IMM, MEM, REG,
};
use super::{Cpu, Event};

pub const SHL: u8 = 0;
pub const SHR: u8 = 1;
pub const SAR: u8 = 2;
pub const ROL: u8 = 3;
pub const ROR: u8 = 4;
pub const RCL: u8 = 5;
pub const RCR: u8 = 6;

/// Shifts `a` by the masked, non-zero `count` and records flags.
#[inline(always)]
fn compute<const OP: u8, const B: usize>(cpu: &mut Cpu, a: u64, count: u32) -> u64 {
    let bits = (B * 8) as u32;
    let m = mask::<B>();
    let msb = |v: u64| v & sign::<B>() != 0;
    match OP {
        SHL => {
            let r = if count >= 64 { 0 } else { (a << count) & m };
            let cf = count <= bits && (a >> (bits - count)) & 1 != 0;
            cpu.arch.flags.set_custom(bits, r, cf, msb(r) != cf, false);
            r
        }
        SHR => {
            let r = if count >= 64 { 0 } else { a >> count };
            let cf = count <= bits && (a >> (count - 1)) & 1 != 0;
            cpu.arch.flags.set_custom(bits, r, cf, msb(a), false);
            r
        }
        SAR => {
            let s = sign_extend::<B>(a) as i64;
            let r = (s >> count.min(63)) as u64 & m;
            let cf = (s >> (count - 1).min(63)) & 1 != 0;
            cpu.arch.flags.set_custom(bits, r, cf, false, false);
            r
        }
        ROL | ROR => {
            let c = count % bits;
            let r = if OP == ROL {
                ((a << c) | (a >> ((bits - c) % bits))) & m
            } else {
                ((a >> c) | (a << ((bits - c) % bits))) & m
            };
            let (cf, of) = if OP == ROL {
                let cf = r & 1 != 0;
                (cf, msb(r) != cf)
            } else {
                (msb(r), msb(r) != ((r >> (bits - 2)) & 1 != 0))
            };
            cpu.arch
                .flags
                .set_arith(CF | OF, if cf { CF } else { 0 } | if of { OF } else { 0 });
            r
        }
        _ => {
            // Rotate through carry: a (bits+1)-bit rotation of CF:a. A rotation by a multiple
            // of bits+1 changes nothing, flags included.
            let c = count % (bits + 1);
            if c == 0 {
                return a;
            }
            let carry = cpu.arch.flags.carry();
            let wide = u128::from(a) | (u128::from(carry) << bits);
            let width_mask = (1u128 << (bits + 1)) - 1;
            let rotated = if OP == RCL {
                ((wide << c) | (wide >> (bits + 1 - c))) & width_mask
            } else {
                ((wide >> c) | (wide << (bits + 1 - c))) & width_mask
            };
            let r = rotated as u64 & m;
            let cf = (rotated >> bits) & 1 != 0;
            let of = if OP == RCL {
                msb(r) != cf
            } else {
                msb(a) != carry
            };
            cpu.arch
                .flags
                .set_arith(CF | OF, if cf { CF } else { 0 } | if of { OF } else { 0 });
            r
        }
    }
}

/// The count of a shift by CL or by immediate operand `n`, masked to 6 bits for 64-bit
/// operands and to 5 bits otherwise.
#[inline(always)]
fn shift_count<const B: usize, const CNT: u8>(cpu: &Cpu, op: &Op, n: u32) -> u32 {
    let raw = if CNT == REG {
        cpu.arch.regs[super::gpr::RCX] as u32
    } else {
        op.inst.immediate(n) as u32
    };
    raw & if B == 8 { 0x3f } else { 0x1f }
}

/// A shift or rotate of operand 0 by operand 1 (CL or an immediate, including the implicit 1).
pub fn shift<const OP: u8, const B: usize, const DST: u8, const CNT: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let count = shift_count::<B, CNT>(cpu, op, 1);
    if DST == REG {
        let a = cpu.gpr::<B>(op.r[0]);
        // A 32-bit destination is written (zero-extended) even when the count is 0.
        let r = if count != 0 {
            compute::<OP, B>(cpu, a, count)
        } else {
            a
        };
        cpu.set_gpr::<B>(op.r[0], r);
    } else {
        let addr = cpu.ea(op);
        let place = cpu.locate::<B>(addr)?;
        if count != 0 {
            let a = cpu.place_read::<B>(place)?;
            let r = compute::<OP, B>(cpu, a, count);
            cpu.place_write::<B>(place, r)?;
        }
    }
    Ok(())
}

/// SHLD/SHRD: shifts operand 0, filling from operand 1, by operand 2 (CL or immediate).
pub fn double<const LEFT: bool, const B: usize, const DST: u8, const CNT: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let count = shift_count::<B, CNT>(cpu, op, 2);
    let src = cpu.gpr::<B>(op.r[1]);
    let place = if DST == REG {
        None
    } else {
        let addr = cpu.ea(op);
        Some(cpu.locate::<B>(addr)?)
    };
    if count == 0 {
        if DST == REG {
            // A 32-bit destination is still written (zero-extended).
            let v = cpu.gpr::<B>(op.r[0]);
            cpu.set_gpr::<B>(op.r[0], v);
        }
        return Ok(());
    }
    let dst = match place {
        None => cpu.gpr::<B>(op.r[0]),
        Some(p) => cpu.place_read::<B>(p)?,
    };
    let bits = (B * 8) as u32;
    let m = mask::<B>();
    // Counts above the operand size (16-bit operands only) are undefined; they behave as
    // a shift through dst:src:dst, which is what the hardware does.
    let (r, cf) = match (LEFT, count <= bits) {
        (true, true) => {
            let r = ((dst << count) | (src >> (bits - count))) & m;
            (r, (dst >> (bits - count)) & 1 != 0)
        }
        (false, true) => {
            let r = ((dst >> count) | (src << (bits - count))) & m;
            (r, (dst >> (count - 1)) & 1 != 0)
        }
        (true, false) => {
            let wide = (u128::from(dst) << 32) | (u128::from(src) << 16) | u128::from(dst);
            let shifted = wide << count;
            ((shifted >> 32) as u64 & m, (shifted >> 48) & 1 != 0)
        }
        (false, false) => {
            let wide = u128::from(dst) | (u128::from(src) << 16) | (u128::from(dst) << 32);
            ((wide >> count) as u64 & m, (wide >> (count - 1)) & 1 != 0)
        }
    };
    let of = (r ^ dst) & sign::<B>() != 0;
    cpu.arch.flags.set_custom(bits, r, cf, of, false);
    match place {
        None => cpu.set_gpr::<B>(op.r[0], r),
        Some(p) => cpu.place_write::<B>(p, r)?,
    }
    Ok(())
}

/// The forms of a shift or rotate: register or memory, count in CL or an immediate.
macro_rules! shift_forms {
    ($op:ident, $size:expr, $dst:expr, $count:expr) => {
        match ($dst, $count) {
            (REG, REG) => by_size!($size, shift::<$op, _, REG, REG>),
            (REG, _) => by_size!($size, shift::<$op, _, REG, IMM>),
            (_, REG) => by_size!($size, shift::<$op, _, MEM, REG>),
            (_, _) => by_size!($size, shift::<$op, _, MEM, IMM>),
        }
    };
}

/// The forms of SHLD/SHRD (no byte form).
macro_rules! double_forms {
    ($left:literal, $size:expr, $dst:expr, $count:expr) => {
        match ($dst, $count) {
            (REG, REG) => by_word_size!($size, double::<$left, _, REG, REG>),
            (REG, _) => by_word_size!($size, double::<$left, _, REG, IMM>),
            (_, REG) => by_word_size!($size, double::<$left, _, MEM, REG>),
            (_, _) => by_word_size!($size, double::<$left, _, MEM, IMM>),
        }
    };
}

/// The handler for a shift or rotate, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let size = size0(inst);
    let dst = kind(inst, 0);
    let h = match inst.mnemonic() {
        Mnemonic::Shl | Mnemonic::Sal => shift_forms!(SHL, size, dst, kind(inst, 1)),
        Mnemonic::Shr => shift_forms!(SHR, size, dst, kind(inst, 1)),
        Mnemonic::Sar => shift_forms!(SAR, size, dst, kind(inst, 1)),
        Mnemonic::Rol => shift_forms!(ROL, size, dst, kind(inst, 1)),
        Mnemonic::Ror => shift_forms!(ROR, size, dst, kind(inst, 1)),
        Mnemonic::Rcl => shift_forms!(RCL, size, dst, kind(inst, 1)),
        Mnemonic::Rcr => shift_forms!(RCR, size, dst, kind(inst, 1)),
        Mnemonic::Shld => double_forms!(true, size, dst, kind(inst, 2)),
        Mnemonic::Shrd => double_forms!(false, size, dst, kind(inst, 2)),
        _ => return None,
    };
    Some(h)
}
