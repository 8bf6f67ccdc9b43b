//! Bit instructions: BT, BTS, BTR, BTC, BSF, BSR, POPCNT, LZCNT, and TZCNT (which runs as
//! BSF: CPUID reports no BMI1, and on such CPUs that encoding is BSF with an ignored REP
//! prefix).

use iced_x86::{Instruction, Mnemonic};

use super::flags::{CF, ZF};

use super::op::{by_word_size, kind, mask, sign_extend, size0, Handler, Op, IMM, MEM, REG};
use super::{Cpu, Event};

pub const BT: u8 = 0;
pub const BTS: u8 = 1;
pub const BTR: u8 = 2;
pub const BTC: u8 = 3;

#[inline(always)]
fn apply<const OP: u8>(value: u64, bit: u64) -> u64 {
    match OP {
        BTS => value | (1 << bit),
        BTR => value & !(1 << bit),
        BTC => value ^ (1 << bit),
        _ => value,
    }
}

/// BT/BTS/BTR/BTC r/m, r/imm. A register bit offset into memory may address outside the
/// operand (signed, in units of the operand size).
pub fn bit_test<const OP: u8, const B: usize, const DST: u8, const SRC: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let bits = (B * 8) as u64;
    let offset = if SRC == REG {
        cpu.gpr::<B>(op.r[1])
    } else {
        op.inst.immediate(1) & 0xff
    };
    let (bit, value) = if DST == REG {
        let bit = offset & (bits - 1);
        let value = cpu.gpr::<B>(op.r[0]);
        if OP != BT {
            cpu.set_gpr::<B>(op.r[0], apply::<OP>(value, bit));
        }
        (bit, value)
    } else {
        let mut addr = cpu.ea(op);
        let bit = offset & (bits - 1);
        if SRC == REG {
            let units = (sign_extend::<B>(offset) as i64) >> bits.trailing_zeros();
            addr = addr.wrapping_add((units as u64).wrapping_mul(B as u64));
        }
        if OP == BT {
            (bit, cpu.read::<B>(addr)?)
        } else {
            let place = cpu.locate::<B>(addr)?;
            let value = cpu.place_read::<B>(place)?;
            cpu.place_write::<B>(place, apply::<OP>(value, bit))?;
            (bit, value)
        }
    };
    cpu.arch.flags.set_flag(CF, (value >> bit) & 1 != 0);
    Ok(())
}

/// BSF (FORWARD) or BSR: ZF = (source == 0), destination unchanged then.
pub fn bit_scan<const FORWARD: bool, const B: usize, const SRC: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let src = cpu.source::<B, SRC>(op, 1)?;
    if src == 0 {
        // A zero result sets ZF.
        cpu.arch
            .flags
            .set_custom((B * 8) as u32, 0, false, false, false);
        return Ok(());
    }
    let index = if FORWARD {
        src.trailing_zeros()
    } else {
        63 - src.leading_zeros()
    };
    cpu.set_gpr::<B>(op.r[0], u64::from(index));
    cpu.arch
        .flags
        .set_custom((B * 8) as u32, 1, false, false, false);
    Ok(())
}

/// LZCNT r, r/m: CF = (source == 0), ZF = (result == 0).
pub fn lzcnt<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let src = cpu.source::<B, SRC>(op, 1)?;
    let count = u64::from(src.leading_zeros()) - (64 - (B as u64) * 8);
    cpu.set_gpr::<B>(op.r[0], count);
    cpu.arch.flags.set_arith(
        CF | ZF,
        if src == 0 { CF } else { 0 } | if count == 0 { ZF } else { 0 },
    );
    Ok(())
}

/// POPCNT r, r/m.
pub fn popcnt<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let src = cpu.source::<B, SRC>(op, 1)?;
    let count = u64::from((src & mask::<B>()).count_ones());
    cpu.set_gpr::<B>(op.r[0], count);
    // ZF = (src == 0); every other arithmetic flag is cleared.
    cpu.arch
        .flags
        .set_arith(super::flags::ARITH, if src == 0 { ZF } else { 0 });
    Ok(())
}

/// The forms of BT/BTS/BTR/BTC: register or memory, bit offset in a register or immediate.
macro_rules! bt_forms {
    ($op:ident, $size:expr, $dst:expr, $src:expr) => {
        match ($dst, $src) {
            (REG, REG) => by_word_size!($size, bit_test::<$op, _, REG, REG>),
            (REG, _) => by_word_size!($size, bit_test::<$op, _, REG, IMM>),
            (_, REG) => by_word_size!($size, bit_test::<$op, _, MEM, REG>),
            (_, _) => by_word_size!($size, bit_test::<$op, _, MEM, IMM>),
        }
    };
}

/// The register and memory forms of `f::<B, SRC>` and `f::<FORWARD, B, SRC>` (no byte forms).
macro_rules! rm_forms {
    ($size:expr, $src:expr, $f:ident::<_>) => {
        match $src {
            REG => by_word_size!($size, $f::<_, REG>),
            _ => by_word_size!($size, $f::<_, MEM>),
        }
    };
    ($size:expr, $src:expr, $f:ident::<$forward:literal, _>) => {
        match $src {
            REG => by_word_size!($size, $f::<$forward, _, REG>),
            _ => by_word_size!($size, $f::<$forward, _, MEM>),
        }
    };
}

/// The handler for a bit instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let size = size0(inst);
    let h = match inst.mnemonic() {
        Mnemonic::Bt => bt_forms!(BT, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Bts => bt_forms!(BTS, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Btr => bt_forms!(BTR, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Btc => bt_forms!(BTC, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Bsf | Mnemonic::Tzcnt => rm_forms!(size, kind(inst, 1), bit_scan::<true, _>),
        Mnemonic::Bsr => rm_forms!(size, kind(inst, 1), bit_scan::<false, _>),
        Mnemonic::Lzcnt => rm_forms!(size, kind(inst, 1), lzcnt::<_>),
        Mnemonic::Popcnt => rm_forms!(size, kind(inst, 1), popcnt::<_>),
        _ => return None,
    };
    Some(h)
}
