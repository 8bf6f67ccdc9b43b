//! MMX: the eight 64-bit registers MM0-MM7, which are the mantissas of the x87 physical
//! registers R0-R7, and the MMX forms of the SSE/SSE2/SSSE3 integer instructions.
//!
//! Every MMX instruction except EMMS switches the x87 unit to MMX use when it completes: TOP
//! becomes 0 and every register is tagged valid. Writing MMn sets the exponent and sign of
//! Rn to all ones, as the hardware does, so x87 code reading it sees a NaN. EMMS tags every
//! register empty. The lane arithmetic is the XMM code's (`sse::binary_op_64`).

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::host_fp as host;
use super::op::{Handler, Op};
use super::sse::{self, BINARY_OPS, MMX_BINARY, MMX_SHIFT_IMM};
use super::{cr0, vector, Cpu, Event};

/// x87 status word: exception summary (a pending unmasked exception).
const ES: u16 = 0x80;
/// x87 status word: TOP.
const TOP: u16 = 0x3800;

impl Cpu {
    /// Checks that an MMX instruction may run: #UD with CR0.EM, #NM with CR0.TS, #MF with a
    /// pending x87 exception.
    fn mmx_check(&self) -> Result<(), Event> {
        if self.arch.cr0 & cr0::EM != 0 {
            return Err(Event::ud());
        }
        if self.arch.cr0 & cr0::TS != 0 {
            return Err(Event::nm());
        }
        if self.arch.fpu.fsw & ES != 0 {
            return Err(Event::exception(vector::MF, None));
        }
        Ok(())
    }

    /// As `mmx_check` for instructions that also use XMM registers (CR4.OSFXSR too).
    fn mmx_sse_check(&self) -> Result<(), Event> {
        self.check_sse()?;
        self.mmx_check()
    }

    /// The x87 unit switches to MMX use: TOP = 0, every register valid.
    fn mmx_transition(&mut self) {
        self.arch.fpu.fsw &= !TOP;
        self.arch.fpu.ftw = 0xff;
    }

    /// MMn.
    fn mm(&self, n: usize) -> u64 {
        let r = &self.arch.fpu.st[n & 7];
        u64::from_le_bytes([r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]])
    }

    /// Writes MMn (exponent and sign all ones) and completes the MMX transition.
    fn set_mm(&mut self, n: usize, value: u64) {
        let r = &mut self.arch.fpu.st[n & 7];
        r[..8].copy_from_slice(&value.to_le_bytes());
        r[8] = 0xff;
        r[9] = 0xff;
        self.mmx_transition();
    }

    /// Operand `n` of an MMX instruction: an MM register or 8 bytes of memory.
    fn mm_operand(&mut self, op: &Op, n: u32) -> Result<u64, Event> {
        if op.inst.op_kind(n) == OpKind::Register {
            Ok(self.mm(usize::from(op.r[n as usize & 3])))
        } else {
            let addr = self.ea(op);
            self.read::<8>(addr)
        }
    }
}

/// Register number of operand `n` (MM or XMM: the caller knows which).
fn reg(op: &Op, n: usize) -> usize {
    usize::from(op.r[n & 3])
}

/// `mm = mm OP mm/m64`.
pub fn binary<const OP: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let src = cpu.mm_operand(op, 1)?;
    let d = reg(op, 0);
    let result = sse::binary_op_64(BINARY_OPS[OP as usize], cpu.mm(d), src);
    cpu.set_mm(d, result);
    Ok(())
}

/// Lane shift of an MM register by an immediate.
pub fn shift_imm<const OP: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let d = reg(op, 0);
    let count = op.inst.immediate(1) & 0xff;
    let result = sse::shift_lanes(BINARY_OPS[OP as usize], u128::from(cpu.mm(d)), count);
    cpu.set_mm(d, result as u64);
    Ok(())
}

/// EMMS: every x87 register empty.
fn emms(cpu: &mut Cpu, _: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    cpu.arch.fpu.fsw &= !TOP;
    cpu.arch.fpu.ftw = 0;
    Ok(())
}

/// MOVD/MOVQ with an MM operand: MM from MM, a general register or memory; MM to a general
/// register or memory; MOVQ2DQ and MOVDQ2Q between MM and XMM registers.
fn move_mm<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let inst = &op.inst;
    let xmm = (0..2).any(|n| inst.op_kind(n) == OpKind::Register && inst.op_register(n).is_xmm());
    if xmm {
        cpu.mmx_sse_check()?;
    } else {
        cpu.mmx_check()?;
    }
    let mask = if B == 4 { 0xffff_ffff } else { u64::MAX };
    let value = match inst.op_kind(1) {
        OpKind::Register if inst.op1_register().is_mm() => cpu.mm(reg(op, 1)),
        OpKind::Register if inst.op1_register().is_xmm() => {
            cpu.arch.fpu.xmm[reg(op, 1) & 15] as u64
        }
        OpKind::Register => cpu.gpr::<8>(op.r[1]),
        _ => {
            let addr = cpu.ea(op);
            if B == 4 {
                cpu.read::<4>(addr)?
            } else {
                cpu.read::<8>(addr)?
            }
        }
    } & mask;
    match inst.op_kind(0) {
        OpKind::Register if inst.op0_register().is_mm() => cpu.set_mm(reg(op, 0), value),
        OpKind::Register if inst.op0_register().is_xmm() => {
            cpu.arch.fpu.xmm[reg(op, 0) & 15] = u128::from(value);
            cpu.mmx_transition();
        }
        OpKind::Register => {
            if B == 4 {
                cpu.set_gpr::<4>(op.r[0], value);
            } else {
                cpu.set_gpr::<8>(op.r[0], value);
            }
            cpu.mmx_transition();
        }
        _ => {
            let addr = cpu.ea(op);
            if B == 4 {
                cpu.write::<4>(addr, value)?;
            } else {
                cpu.write::<8>(addr, value)?;
            }
            cpu.mmx_transition();
        }
    }
    Ok(())
}

/// PSHUFW mm, mm/m64, imm8.
fn pshufw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let src = cpu.mm_operand(op, 1)?;
    let imm = op.inst.immediate(2);
    let result = (0..4).fold(0u64, |acc, i| {
        let word = (src >> (16 * ((imm >> (2 * i)) & 3))) & 0xffff;
        acc | (word << (16 * i))
    });
    cpu.set_mm(reg(op, 0), result);
    Ok(())
}

/// PEXTRW r32, mm, imm8.
fn pextrw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let word = (cpu.mm(reg(op, 1)) >> (16 * (op.inst.immediate(2) & 3))) & 0xffff;
    cpu.set_gpr::<8>(op.r[0], word);
    cpu.mmx_transition();
    Ok(())
}

/// PINSRW mm, r32/m16, imm8.
fn pinsrw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let word = if op.inst.op_kind(1) == OpKind::Register {
        cpu.gpr::<2>(op.r[1])
    } else {
        let addr = cpu.ea(op);
        cpu.read::<2>(addr)?
    };
    let d = reg(op, 0);
    let shift = 16 * (op.inst.immediate(2) & 3);
    let value = (cpu.mm(d) & !(0xffff << shift)) | (word << shift);
    cpu.set_mm(d, value);
    Ok(())
}

/// PMOVMSKB r32, mm.
fn pmovmskb(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let v = cpu.mm(reg(op, 1));
    let mask = (0..8).fold(0u64, |m, i| m | (((v >> (8 * i + 7)) & 1) << i));
    cpu.set_gpr::<8>(op.r[0], mask);
    cpu.mmx_transition();
    Ok(())
}

/// MASKMOVQ mm1, mm2: stores the bytes of mm1 selected by mm2's sign bits at [rDI].
fn maskmovq(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let data = cpu.mm(reg(op, 1)).to_le_bytes();
    let mask = cpu.mm(reg(op, 2)).to_le_bytes();
    let base = (cpu.arch.regs[super::gpr::RDI] & op.addr_mask)
        .wrapping_add(cpu.mmu.seg_base[op.seg as usize & 7]);
    for i in 0..8 {
        if mask[i] & 0x80 != 0 {
            cpu.write::<1>(base.wrapping_add(i as u64), u64::from(data[i]))?;
        }
    }
    cpu.mmx_transition();
    Ok(())
}

/// PALIGNR mm, mm/m64, imm8: the concatenation dst:src shifted right by imm8 bytes.
fn palignr(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_check()?;
    let src = cpu.mm_operand(op, 1)?;
    let d = reg(op, 0);
    let joined = (u128::from(cpu.mm(d)) << 64) | u128::from(src);
    let shift = op.inst.immediate(2) & 0xff;
    let result = if shift >= 16 {
        0
    } else {
        (joined >> (8 * shift)) as u64
    };
    cpu.set_mm(d, result);
    Ok(())
}

/// CVTPI2PS xmm, mm/m64 and CVTPI2PD xmm, mm/m64 (`DOUBLE`): two signed doublewords to
/// floating point. Only a register source switches the x87 unit to MMX use.
fn from_packed_int<const DOUBLE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let register = op.inst.op_kind(1) == OpKind::Register;
    if register {
        cpu.mmx_sse_check()?;
    } else {
        cpu.check_sse()?;
    }
    let src = u128::from(cpu.mm_operand(op, 1)?);
    let d = reg(op, 0) & 15;
    let mxcsr = cpu.arch.fpu.mxcsr;
    let (converted, after) = if DOUBLE {
        host::cvtdq2pd(0, src, mxcsr)
    } else {
        host::cvtdq2ps(0, src, mxcsr)
    };
    super::sse_float::commit_flags(cpu, after)?;
    cpu.arch.fpu.xmm[d] = if DOUBLE {
        converted
    } else {
        (cpu.arch.fpu.xmm[d] & !u128::from(u64::MAX)) | (converted & u128::from(u64::MAX))
    };
    if register {
        cpu.mmx_transition();
    }
    Ok(())
}

/// CVT(T)PS2PI mm, xmm/m64 and CVT(T)PD2PI mm, xmm/m128: two values to signed doublewords
/// (`KIND`: bit 0 = double, bit 1 = truncate).
fn to_packed_int<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.mmx_sse_check()?;
    let double = KIND & 1 != 0;
    let src = cpu.xmm_operand(op, 1, if double { 16 } else { 8 }, true)?;
    let src = if double {
        src
    } else {
        src & u128::from(u64::MAX)
    };
    let f = match KIND {
        0 => host::cvtps2dq,
        1 => host::cvtpd2dq,
        2 => host::cvttps2dq,
        _ => host::cvttpd2dq,
    };
    let (converted, after) = f(0, src, cpu.arch.fpu.mxcsr);
    super::sse_float::commit_flags(cpu, after)?;
    cpu.set_mm(reg(op, 0), converted as u64);
    Ok(())
}

/// Whether any operand of `inst` is an MMX register.
pub fn uses_mmx(inst: &Instruction) -> bool {
    (0..inst.op_count()).any(|i| inst.op_kind(i) == OpKind::Register && inst.op_register(i).is_mm())
}

/// The handler of an MMX instruction (EMMS, or any instruction with an MM operand).
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    if inst.mnemonic() == Emms {
        return Some(emms);
    }
    let memory_source_conversion = matches!(
        inst.code(),
        Code::Cvtpi2ps_xmm_mmm64 | Code::Cvtpi2pd_xmm_mmm64
    ) && inst.op_kind(1) == OpKind::Memory;
    if !uses_mmx(inst) && !memory_source_conversion {
        return None;
    }
    if let Some(operation) = sse::lane_operation(inst.mnemonic()) {
        let table = if sse::is_immediate_shift(inst) {
            MMX_SHIFT_IMM
        } else {
            MMX_BINARY
        };
        return Some(table[operation as usize]);
    }
    let handler: Handler = match inst.mnemonic() {
        Movd => move_mm::<4>,
        Movq | Movntq | Movq2dq | Movdq2q => move_mm::<8>,
        Pshufw => pshufw,
        Pextrw => pextrw,
        Pinsrw => pinsrw,
        Pmovmskb => pmovmskb,
        Maskmovq => maskmovq,
        Palignr => palignr,
        Cvtpi2ps => from_packed_int::<false>,
        Cvtpi2pd => from_packed_int::<true>,
        Cvtps2pi => to_packed_int::<0>,
        Cvtpd2pi => to_packed_int::<1>,
        Cvttps2pi => to_packed_int::<2>,
        Cvttpd2pi => to_packed_int::<3>,
        _ => return None,
    };
    Some(handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::sse::Binary;

    #[test]
    fn unpack_high_and_pack_see_the_64_bit_layout() {
        let a = 0x0706_0504_0302_0100;
        let b = 0x1716_1514_1312_1110;
        assert_eq!(
            sse::binary_op_64(Binary::UnpackHighB, a, b),
            0x1707_1606_1505_1404
        );
        assert_eq!(
            sse::binary_op_64(
                Binary::PackSSWB,
                0x0001_0002_7fff_8000,
                0x0003_0004_0005_0006
            ),
            0x0304_0506_0102_7f80
        );
        assert_eq!(
            sse::binary_op_64(Binary::HAddW, 0x0004_0003_0002_0001, 0x0040_0030_0020_0010),
            0x0070_0030_0007_0003
        );
    }

    #[test]
    fn shuffle_uses_three_index_bits() {
        let a = 0x0706_0504_0302_0100;
        assert_eq!(
            sse::binary_op_64(Binary::ShuffleB, a, 0x8009_0a0b_0001_0203),
            0x0001_0203_0001_0203
        );
    }
}
