//! SSE3, SSSE3 and SSE4.1 instructions that are not plain lane operations: duplicating
//! moves, byte alignment, blends, PTEST, sign/zero extension, element insert and extract,
//! PHMINPOSUW and MPSADBW. (Lane operations are `sse::Binary`; floating-point ones are in
//! `sse_float`.)

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::op::{Handler, Op};
use super::sse::{b16, d4, from_d4, from_q2, from_w8, w8};
use super::{flags, Cpu, Event};

type V = u128;

/// The source operand (operand 1) with its memory size; 16-byte memory operands must be
/// aligned, smaller ones need not be.
fn source(cpu: &mut Cpu, op: &Op) -> Result<V, Event> {
    let size = if op.is_memory(1) {
        op.inst.memory_size().size()
    } else {
        16
    };
    cpu.xmm_operand(op, 1, size, true)
}

fn destination(op: &Op) -> usize {
    Cpu::xmm_reg(op, 0)
}

/// MOVSLDUP, MOVSHDUP, MOVDDUP.
fn duplicate<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = source(cpu, op)?;
    let result = match KIND {
        0 => {
            let s = d4(src);
            from_d4([s[0], s[0], s[2], s[2]])
        }
        1 => {
            let s = d4(src);
            from_d4([s[1], s[1], s[3], s[3]])
        }
        _ => from_q2([src as u64, src as u64]),
    };
    cpu.arch.fpu.xmm[destination(op)] = result;
    Ok(())
}

/// PALIGNR xmm, xmm/m128, imm8: the 32-byte concatenation dst:src shifted right by imm8
/// bytes, low half.
fn palignr(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = source(cpu, op)?;
    let d = destination(op);
    cpu.arch.fpu.xmm[d] = align_right(cpu.arch.fpu.xmm[d], src, op.inst.immediate(2) as u8);
    Ok(())
}

/// The low 16 bytes of `high:low` shifted right by `bytes` bytes.
fn align_right(high: V, low: V, bytes: u8) -> V {
    match bytes {
        0 => low,
        1..=15 => (low >> (8 * u32::from(bytes))) | (high << (8 * (16 - u32::from(bytes)))),
        16 => high,
        17..=31 => high >> (8 * (u32::from(bytes) - 16)),
        _ => 0,
    }
}

/// BLENDPS/BLENDPD/PBLENDW (lanes chosen by imm8) and BLENDVPS/BLENDVPD/PBLENDVB (by the
/// sign bits of XMM0's lanes). `LANE` is the lane size in bytes; `VARIABLE` selects by XMM0.
fn blend<const LANE: usize, const VARIABLE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = source(cpu, op)?;
    let d = destination(op);
    let dst = cpu.arch.fpu.xmm[d];
    let selector = cpu.arch.fpu.xmm[0];
    let imm = if VARIABLE {
        0
    } else {
        op.inst.immediate(2) as u32
    };
    let bits = LANE * 8;
    let lane_mask: V = if bits == 128 { !0 } else { (1 << bits) - 1 };
    let mut result = dst;
    for i in 0..16 / LANE {
        let chosen = if VARIABLE {
            (selector >> (i * bits + bits - 1)) & 1 != 0
        } else {
            (imm >> i) & 1 != 0
        };
        if chosen {
            let m = lane_mask << (i * bits);
            result = (result & !m) | (src & m);
        }
    }
    cpu.arch.fpu.xmm[d] = result;
    Ok(())
}

/// PTEST xmm, xmm/m128: ZF = (dst AND src) == 0, CF = (NOT dst AND src) == 0.
fn ptest(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = source(cpu, op)?;
    let dst = cpu.arch.fpu.xmm[destination(op)];
    let mut value = 0;
    if dst & src == 0 {
        value |= flags::ZF;
    }
    if !dst & src == 0 {
        value |= flags::CF;
    }
    cpu.arch.flags.set_arith(flags::ARITH, value);
    Ok(())
}

/// PMOVSX/PMOVZX: the low lanes of the source widened from `FROM` to `TO` bytes.
fn extend<const FROM: usize, const TO: usize, const SIGNED: bool>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = source(cpu, op)?;
    let lanes = 16 / TO;
    let mut result: V = 0;
    for i in 0..lanes {
        let raw = (src >> (i * FROM * 8)) as u64 & (u64::MAX >> (64 - FROM * 8));
        let value = if SIGNED {
            let shift = 64 - FROM * 8;
            (((raw << shift) as i64) >> shift) as u64
        } else {
            raw
        };
        let to_mask = u64::MAX >> (64 - TO * 8);
        result |= V::from(value & to_mask) << (i * TO * 8);
    }
    cpu.arch.fpu.xmm[destination(op)] = result;
    Ok(())
}

/// PEXTRB/PEXTRW/PEXTRD/PEXTRQ r/m, xmm, imm8 and EXTRACTPS r/m32, xmm, imm8 (`B`-byte lanes).
fn extract<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
    let lanes = 16 / B;
    let index = (op.inst.immediate(2) as usize) & (lanes - 1);
    let value = (v >> (index * B * 8)) as u64 & (u64::MAX >> (64 - B * 8));
    if op.inst.op_kind(0) == OpKind::Register {
        // Byte and word extracts zero-extend into the 32- or 64-bit register.
        if op.inst.op0_register().size() == 8 {
            cpu.set_gpr::<8>(op.r[0], value);
        } else {
            cpu.set_gpr::<4>(op.r[0], value);
        }
        return Ok(());
    }
    let addr = cpu.ea(op);
    match B {
        1 => cpu.write::<1>(addr, value),
        2 => cpu.write::<2>(addr, value),
        4 => cpu.write::<4>(addr, value),
        _ => cpu.write::<8>(addr, value),
    }
}

/// PINSRB/PINSRD/PINSRQ xmm, r/m, imm8 (`B`-byte lanes).
fn insert<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let value = if op.inst.op_kind(1) == OpKind::Register {
        cpu.gpr::<8>(op.r[1])
    } else {
        let addr = cpu.ea(op);
        match B {
            1 => cpu.read::<1>(addr)?,
            4 => cpu.read::<4>(addr)?,
            _ => cpu.read::<8>(addr)?,
        }
    };
    let lanes = 16 / B;
    let index = (op.inst.immediate(2) as usize) & (lanes - 1);
    let mask = V::from(u64::MAX >> (64 - B * 8)) << (index * B * 8);
    let d = destination(op);
    let placed = (V::from(value) << (index * B * 8)) & mask;
    cpu.arch.fpu.xmm[d] = (cpu.arch.fpu.xmm[d] & !mask) | placed;
    Ok(())
}

/// INSERTPS xmm, xmm/m32, imm8: a single (from the source lane imm8[7:6], or memory) into
/// lane imm8[5:4], then the lanes in imm8[3:0] zeroed.
fn insertps(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let imm = op.inst.immediate(2) as usize;
    let value = if op.is_memory(1) {
        let addr = cpu.ea(op);
        cpu.read::<4>(addr)? as u32
    } else {
        d4(cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)])[(imm >> 6) & 3]
    };
    let d = destination(op);
    let mut lanes = d4(cpu.arch.fpu.xmm[d]);
    lanes[(imm >> 4) & 3] = value;
    for (i, lane) in lanes.iter_mut().enumerate() {
        if imm & (1 << i) != 0 {
            *lane = 0;
        }
    }
    cpu.arch.fpu.xmm[d] = from_d4(lanes);
    Ok(())
}

/// PHMINPOSUW xmm, xmm/m128: the smallest unsigned word and its (lowest) index.
fn phminposuw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let words = w8(source(cpu, op)?);
    let (index, min) =
        words.iter().enumerate().fold(
            (0, words[0]),
            |best, (i, &w)| if w < best.1 { (i, w) } else { best },
        );
    cpu.arch.fpu.xmm[destination(op)] = V::from(min) | (V::from(index as u16) << 16);
    Ok(())
}

/// MPSADBW xmm, xmm/m128, imm8: eight sums of absolute differences between a 4-byte block of
/// the source (imm8[1:0]) and sliding 4-byte windows of the destination (from imm8[2]).
fn mpsadbw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = b16(source(cpu, op)?);
    let d = destination(op);
    let dst = b16(cpu.arch.fpu.xmm[d]);
    let imm = op.inst.immediate(2) as usize;
    let (src_at, dst_at) = ((imm & 3) * 4, ((imm >> 2) & 1) * 4);
    cpu.arch.fpu.xmm[d] = from_w8(std::array::from_fn(|i| {
        (0..4)
            .map(|j| u16::from(dst[dst_at + i + j].abs_diff(src[src_at + j])))
            .sum()
    }));
    Ok(())
}

/// The handler of an SSE3/SSSE3/SSE4.1 instruction that `sse::select` does not cover.
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    if super::mmx::uses_mmx(inst) {
        return None;
    }
    let handler: Handler = match inst.mnemonic() {
        Movsldup => duplicate::<0>,
        Movshdup => duplicate::<1>,
        Movddup => duplicate::<2>,
        Palignr => palignr,
        Blendps => blend::<4, false>,
        Blendpd => blend::<8, false>,
        Pblendw => blend::<2, false>,
        Blendvps => blend::<4, true>,
        Blendvpd => blend::<8, true>,
        Pblendvb => blend::<1, true>,
        Ptest => ptest,
        Pmovsxbw => extend::<1, 2, true>,
        Pmovsxbd => extend::<1, 4, true>,
        Pmovsxbq => extend::<1, 8, true>,
        Pmovsxwd => extend::<2, 4, true>,
        Pmovsxwq => extend::<2, 8, true>,
        Pmovsxdq => extend::<4, 8, true>,
        Pmovzxbw => extend::<1, 2, false>,
        Pmovzxbd => extend::<1, 4, false>,
        Pmovzxbq => extend::<1, 8, false>,
        Pmovzxwd => extend::<2, 4, false>,
        Pmovzxwq => extend::<2, 8, false>,
        Pmovzxdq => extend::<4, 8, false>,
        Pextrb => extract::<1>,
        Pextrw => extract::<2>,
        Pextrd | Extractps => extract::<4>,
        Pextrq => extract::<8>,
        Pinsrb => insert::<1>,
        Pinsrd => insert::<4>,
        Pinsrq => insert::<8>,
        Insertps => insertps,
        Phminposuw => phminposuw,
        Mpsadbw => mpsadbw,
        Movntdqa => super::sse::mov128::<true>,
        _ => return None,
    };
    Some(handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_right_covers_every_shift() {
        let high: V = 0x1f1e_1d1c_1b1a_1918_1716_1514_1312_1110;
        let low: V = 0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100;
        assert_eq!(align_right(high, low, 0), low);
        assert_eq!(align_right(high, low, 16), high);
        assert_eq!(b16(align_right(high, low, 3))[0], 0x03);
        assert_eq!(b16(align_right(high, low, 3))[15], 0x12);
        assert_eq!(b16(align_right(high, low, 20))[0], 0x14);
        assert_eq!(b16(align_right(high, low, 20))[12], 0);
        assert_eq!(align_right(high, low, 32), 0);
    }
}
