//! Bit instructions: BT, BTS, BTR, BTC, BSF, BSR, POPCNT, LZCNT, and TZCNT (which runs as
//! BSF: CPUID reports no BMI1, and on such CPUs that encoding is BSF with an ignored REP
//! prefix).

use iced_x86::{Instruction, Mnemonic};

use super::flags::{CF, ZF};

use super::op::{kind, mask, sign_extend, size0, Handler, Op, IMM, MEM, REG};
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
    cpu.flags.set_flag(CF, (value >> bit) & 1 != 0);
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
        cpu.flags.set_custom((B * 8) as u32, 0, false, false, false);
        return Ok(());
    }
    let index = if FORWARD {
        src.trailing_zeros()
    } else {
        63 - src.leading_zeros()
    };
    cpu.set_gpr::<B>(op.r[0], u64::from(index));
    cpu.flags.set_custom((B * 8) as u32, 1, false, false, false);
    Ok(())
}

/// LZCNT r, r/m: CF = (source == 0), ZF = (result == 0).
pub fn lzcnt<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let src = cpu.source::<B, SRC>(op, 1)?;
    let count = u64::from(src.leading_zeros()) - (64 - (B as u64) * 8);
    cpu.set_gpr::<B>(op.r[0], count);
    cpu.flags.set_arith(
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
    // ZF = (src == 0); every other flag clear (PF is computed from a result of 1 or 0,
    // so use a result with odd parity).
    cpu.flags
        .set_arith(super::flags::ARITH, if src == 0 { ZF } else { 0 });
    Ok(())
}

macro_rules! bt_forms {
    ($op:expr, $size:expr, $dst:expr, $src:expr) => {{
        const O: u8 = $op;
        match ($size, $dst, $src) {
            (2, REG, REG) => bit_test::<O, 2, REG, REG> as Handler,
            (2, REG, _) => bit_test::<O, 2, REG, IMM>,
            (2, _, REG) => bit_test::<O, 2, MEM, REG>,
            (2, _, _) => bit_test::<O, 2, MEM, IMM>,
            (4, REG, REG) => bit_test::<O, 4, REG, REG>,
            (4, REG, _) => bit_test::<O, 4, REG, IMM>,
            (4, _, REG) => bit_test::<O, 4, MEM, REG>,
            (4, _, _) => bit_test::<O, 4, MEM, IMM>,
            (_, REG, REG) => bit_test::<O, 8, REG, REG>,
            (_, REG, _) => bit_test::<O, 8, REG, IMM>,
            (_, _, REG) => bit_test::<O, 8, MEM, REG>,
            (_, _, _) => bit_test::<O, 8, MEM, IMM>,
        }
    }};
}

macro_rules! scan_forms {
    ($forward:expr, $size:expr, $src:expr) => {{
        const F: bool = $forward;
        match ($size, $src) {
            (2, REG) => bit_scan::<F, 2, REG> as Handler,
            (2, _) => bit_scan::<F, 2, MEM>,
            (4, REG) => bit_scan::<F, 4, REG>,
            (4, _) => bit_scan::<F, 4, MEM>,
            (_, REG) => bit_scan::<F, 8, REG>,
            (_, _) => bit_scan::<F, 8, MEM>,
        }
    }};
}

/// The handler for a bit instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let size = size0(inst);
    let h = match inst.mnemonic() {
        Mnemonic::Bt => bt_forms!(BT, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Bts => bt_forms!(BTS, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Btr => bt_forms!(BTR, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Btc => bt_forms!(BTC, size, kind(inst, 0), kind(inst, 1)),
        Mnemonic::Bsf | Mnemonic::Tzcnt => scan_forms!(true, size, kind(inst, 1)),
        Mnemonic::Bsr => scan_forms!(false, size, kind(inst, 1)),
        Mnemonic::Lzcnt => match (size, kind(inst, 1)) {
            (2, REG) => lzcnt::<2, REG> as Handler,
            (2, _) => lzcnt::<2, MEM>,
            (4, REG) => lzcnt::<4, REG>,
            (4, _) => lzcnt::<4, MEM>,
            (_, REG) => lzcnt::<8, REG>,
            (_, _) => lzcnt::<8, MEM>,
        },
        Mnemonic::Popcnt => match (size, kind(inst, 1)) {
            (2, REG) => popcnt::<2, REG> as Handler,
            (2, _) => popcnt::<2, MEM>,
            (4, REG) => popcnt::<4, REG>,
            (4, _) => popcnt::<4, MEM>,
            (_, REG) => popcnt::<8, REG>,
            (_, _) => popcnt::<8, MEM>,
        },
        _ => return None,
    };
    Some(h)
}
