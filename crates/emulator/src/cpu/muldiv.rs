//! MUL, IMUL (one, two and three operands), DIV, IDIV.

use iced_x86::{Instruction, Mnemonic};

use super::op::{by_size, by_word_size, kind, mask, sign_extend, size0, Handler, Op, MEM, REG};
use super::{Cpu, Event};

/// Splits a double-width product into the accumulator registers.
#[inline(always)]
fn store_double<const B: usize>(cpu: &mut Cpu, low: u64, high: u64) {
    if B == 1 {
        cpu.set_gpr::<2>(0, (low & 0xff) | ((high & 0xff) << 8));
    } else {
        cpu.set_gpr::<B>(0, low);
        cpu.set_gpr::<B>(2, high);
    }
}

/// MUL r/m: unsigned rDX:rAX = rAX * src.
pub fn mul<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let src = cpu.source::<B, SRC>(op, 0)?;
    let a = cpu.gpr::<B>(0);
    let product = u128::from(a) * u128::from(src);
    let bits = B * 8;
    let low = product as u64 & mask::<B>();
    let high = (product >> bits) as u64 & mask::<B>();
    store_double::<B>(cpu, low, high);
    let overflow = high != 0;
    cpu.arch
        .flags
        .set_custom(bits as u32, low, overflow, overflow, false);
    Ok(())
}

/// IMUL r/m: signed rDX:rAX = rAX * src.
pub fn imul1<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let src = sign_extend::<B>(cpu.source::<B, SRC>(op, 0)?) as i64;
    let a = sign_extend::<B>(cpu.gpr::<B>(0)) as i64;
    let product = i128::from(a) * i128::from(src);
    let bits = B * 8;
    let low = product as u64 & mask::<B>();
    let high = (product >> bits) as u64 & mask::<B>();
    store_double::<B>(cpu, low, high);
    let overflow = i128::from(sign_extend::<B>(low) as i64) != product;
    cpu.arch
        .flags
        .set_custom(bits as u32, low, overflow, overflow, false);
    Ok(())
}

/// IMUL r, r/m (two operands) and IMUL r, r/m, imm (three operands).
pub fn imul<const B: usize, const SRC: u8, const THREE: bool>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let src = sign_extend::<B>(cpu.source::<B, SRC>(op, 1)?) as i64;
    let other = if THREE {
        sign_extend::<B>(op.inst.immediate(2) & mask::<B>()) as i64
    } else {
        sign_extend::<B>(cpu.gpr::<B>(op.r[0])) as i64
    };
    let product = i128::from(src) * i128::from(other);
    let low = product as u64 & mask::<B>();
    let overflow = i128::from(sign_extend::<B>(low) as i64) != product;
    cpu.set_gpr::<B>(op.r[0], low);
    cpu.arch
        .flags
        .set_custom((B * 8) as u32, low, overflow, overflow, false);
    Ok(())
}

/// The double-width dividend rDX:rAX (AX for bytes).
#[inline(always)]
fn dividend<const B: usize>(cpu: &Cpu) -> u128 {
    if B == 1 {
        u128::from(cpu.gpr::<2>(0))
    } else {
        (u128::from(cpu.gpr::<B>(2)) << (B * 8)) | u128::from(cpu.gpr::<B>(0))
    }
}

/// Stores quotient and remainder.
#[inline(always)]
fn store_division<const B: usize>(cpu: &mut Cpu, quotient: u64, remainder: u64) {
    if B == 1 {
        cpu.set_gpr::<2>(0, (quotient & 0xff) | ((remainder & 0xff) << 8));
    } else {
        cpu.set_gpr::<B>(0, quotient);
        cpu.set_gpr::<B>(2, remainder);
    }
}

/// DIV r/m (#DE on division by zero or a quotient that does not fit).
pub fn div<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let divisor = u128::from(cpu.source::<B, SRC>(op, 0)?);
    if divisor == 0 {
        return Err(Event::de());
    }
    let n = dividend::<B>(cpu);
    let quotient = n / divisor;
    if quotient > u128::from(mask::<B>()) {
        return Err(Event::de());
    }
    store_division::<B>(cpu, quotient as u64, (n % divisor) as u64);
    Ok(())
}

/// IDIV r/m.
pub fn idiv<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let divisor = i128::from(sign_extend::<B>(cpu.source::<B, SRC>(op, 0)?) as i64);
    if divisor == 0 {
        return Err(Event::de());
    }
    let bits = B * 8;
    let raw = dividend::<B>(cpu);
    // Sign-extend the 2*bits-wide dividend.
    let shift = 128 - 2 * bits as u32;
    let n = ((raw << shift) as i128) >> shift;
    let (Some(quotient), Some(remainder)) = (n.checked_div(divisor), n.checked_rem(divisor)) else {
        return Err(Event::de());
    };
    let min = -(1i128 << (bits - 1));
    let max = (1i128 << (bits - 1)) - 1;
    if quotient < min || quotient > max {
        return Err(Event::de());
    }
    store_division::<B>(
        cpu,
        quotient as u64 & mask::<B>(),
        remainder as u64 & mask::<B>(),
    );
    Ok(())
}

/// The register and memory forms of a one-operand multiply or divide.
macro_rules! rm_forms {
    ($f:ident, $size:expr, $src:expr) => {
        match $src {
            REG => by_size!($size, $f::<_, REG>),
            _ => by_size!($size, $f::<_, MEM>),
        }
    };
}

/// The handler for a multiply or divide, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let h = match inst.mnemonic() {
        Mnemonic::Mul => rm_forms!(mul, size0(inst), kind(inst, 0)),
        Mnemonic::Div => rm_forms!(div, size0(inst), kind(inst, 0)),
        Mnemonic::Idiv => rm_forms!(idiv, size0(inst), kind(inst, 0)),
        Mnemonic::Imul if inst.op_count() == 1 => rm_forms!(imul1, size0(inst), kind(inst, 0)),
        Mnemonic::Imul => {
            let size = size0(inst);
            match (kind(inst, 1), inst.op_count() == 3) {
                (REG, false) => by_word_size!(size, imul::<_, REG, false>),
                (_, false) => by_word_size!(size, imul::<_, MEM, false>),
                (REG, true) => by_word_size!(size, imul::<_, REG, true>),
                (_, true) => by_word_size!(size, imul::<_, MEM, true>),
            }
        }
        _ => return None,
    };
    Some(h)
}
