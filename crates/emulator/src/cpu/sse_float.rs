//! SSE/SSE2 floating-point arithmetic, comparisons and conversions, executed by the host
//! (`host_fp`) under the guest's MXCSR.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::host_fp as host;
use super::op::{Handler, Op};
use super::{cr4, flags, vector, Cpu, Event};

/// Accumulates the exception flags of a host operation into MXCSR; fails with #XM (or #UD
/// without CR4.OSXMMEXCPT) when one of them is unmasked, in which case nothing is written.
pub(super) fn commit_flags(cpu: &mut Cpu, after: u32) -> Result<(), Event> {
    let raised = after & 0x3f;
    cpu.arch.fpu.mxcsr |= raised;
    let unmasked = raised & !(cpu.arch.fpu.mxcsr >> 7) & 0x3f;
    if unmasked != 0 {
        return Err(if cpu.arch.cr4 & cr4::OSXMMEXCPT != 0 {
            Event::exception(vector::XM, None)
        } else {
            Event::ud()
        });
    }
    Ok(())
}

/// Size in bytes of the source operand when it is in memory.
fn source_size(op: &Op, n: u32) -> usize {
    if op.inst.op_kind(n) == OpKind::Memory {
        op.inst.memory_size().size()
    } else {
        16
    }
}

/// `dst = f(dst, src)` for arithmetic and XMM-to-XMM conversions.
#[inline(always)]
fn two(cpu: &mut Cpu, op: &Op, f: fn(u128, u128, u32) -> (u128, u32)) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let (result, after) = f(cpu.arch.fpu.xmm[d], src, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.arch.fpu.xmm[d] = result;
    Ok(())
}

/// CMPPS/CMPPD/CMPSS/CMPSD xmm, xmm/m, imm8 (`KIND` 0-3).
pub fn compare<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let predicate = op.inst.immediate(2) as u8;
    let f = match KIND {
        0 => host::cmpps,
        1 => host::cmppd,
        2 => host::cmpss,
        _ => host::cmpsd,
    };
    let (result, after) = f(cpu.arch.fpu.xmm[d], src, predicate, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.arch.fpu.xmm[d] = result;
    Ok(())
}

/// COMISS/UCOMISS/COMISD/UCOMISD: ZF, PF, CF from the comparison; OF, SF, AF cleared.
pub fn comi<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, false)?;
    let a = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)];
    let f = match KIND {
        0 => host::comiss,
        1 => host::ucomiss,
        2 => host::comisd,
        _ => host::ucomisd,
    };
    let (ah, after) = f(a, src, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    let ah = u64::from(ah);
    cpu.arch
        .flags
        .set_arith(flags::ARITH, ah & (flags::ZF | flags::PF | flags::CF));
    Ok(())
}

/// CVTSI2SS/CVTSI2SD xmm, r/m32 or r/m64 (`WIDE`).
pub fn from_int<const DOUBLE: bool, const WIDE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let value = if op.inst.op_kind(1) == OpKind::Register {
        if WIDE {
            cpu.gpr::<8>(op.r[1])
        } else {
            cpu.gpr::<4>(op.r[1])
        }
    } else {
        let addr = cpu.ea(op);
        if WIDE {
            cpu.read::<8>(addr)?
        } else {
            cpu.read::<4>(addr)?
        }
    };
    let d = Cpu::xmm_reg(op, 0);
    let f = match (DOUBLE, WIDE) {
        (false, false) => host::cvtsi2ss_32,
        (false, true) => host::cvtsi2ss_64,
        (true, false) => host::cvtsi2sd_32,
        (true, true) => host::cvtsi2sd_64,
    };
    let (result, after) = f(cpu.arch.fpu.xmm[d], value, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.arch.fpu.xmm[d] = result;
    Ok(())
}

/// CVT(T)SS2SI/CVT(T)SD2SI r32/r64, xmm/m (`KIND`: bit 0 = double, bit 1 = truncate,
/// bit 2 = 64-bit destination).
pub fn to_int<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = if KIND & 1 != 0 { 8 } else { 4 };
    let src = cpu.xmm_operand(op, 1, size, false)?;
    let f = match KIND {
        0 => host::cvtss2si_32,
        1 => host::cvtsd2si_32,
        2 => host::cvttss2si_32,
        3 => host::cvttsd2si_32,
        4 => host::cvtss2si_64,
        5 => host::cvtsd2si_64,
        6 => host::cvttss2si_64,
        _ => host::cvttsd2si_64,
    };
    let (value, after) = f(src, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    if KIND & 4 != 0 {
        cpu.set_gpr::<8>(op.r[0], value);
    } else {
        cpu.set_gpr::<4>(op.r[0], value);
    }
    Ok(())
}

/// ROUNDPS/ROUNDPD/ROUNDSS/ROUNDSD xmm, xmm/m, imm8 (`KIND` 0-3).
pub fn round<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let control = op.inst.immediate(2) as u8;
    let f = match KIND {
        0 => host::roundps,
        1 => host::roundpd,
        2 => host::roundss,
        _ => host::roundsd,
    };
    let (result, after) = f(cpu.arch.fpu.xmm[d], src, control, cpu.arch.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.arch.fpu.xmm[d] = result;
    Ok(())
}

/// DPPS/DPPD xmm, xmm/m128, imm8: the products of the lanes selected by imm8[7:4], summed
/// pairwise as the hardware does ((p0 + p1) + (p2 + p3)), into the lanes selected by
/// imm8[3:0] (the others zeroed). Unselected lanes take part as +0.0 and raise nothing.
pub fn dot_product<const DOUBLE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = cpu.xmm_operand(op, 1, 16, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let imm = op.inst.immediate(2) as u32;
    let (lanes, width) = if DOUBLE { (2, 64) } else { (4, 32) };
    let lane = |i: u32| -> u128 { (u128::MAX >> (128 - width)) << (i * width) };
    let mask = |bits: u32| {
        (0..lanes)
            .filter(|i| bits & (1 << i) != 0)
            .fold(0, |m, i| m | lane(i))
    };
    let selected = mask(imm >> 4);
    let mxcsr = cpu.arch.fpu.mxcsr;
    let a = cpu.arch.fpu.xmm[d] & selected;
    let b = src & selected;
    let (sum, after) = if DOUBLE {
        let (products, f1) = host::mulpd(a, b, mxcsr);
        let (sum, f2) = host::haddpd(products, products, mxcsr);
        (sum, f1 | f2)
    } else {
        let (products, f1) = host::mulps(a, b, mxcsr);
        let (pairs, f2) = host::haddps(products, products, mxcsr);
        let (sum, f3) = host::haddps(pairs, pairs, mxcsr);
        (sum, f1 | f2 | f3)
    };
    commit_flags(cpu, after)?;
    let total = sum & lane(0);
    let broadcast = (0..lanes).fold(0u128, |r, i| r | (total << (i * width)));
    cpu.arch.fpu.xmm[d] = broadcast & mask(imm);
    Ok(())
}

/// The handler for an SSE floating-point instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    if super::mmx::uses_mmx(inst) {
        return None;
    }
    if let Some(handler) = two_operand_handler(inst.mnemonic()) {
        return Some(handler);
    }
    let h: Handler = match inst.mnemonic() {
        Cmpps => compare::<0>,
        Cmppd => compare::<1>,
        Cmpss => compare::<2>,
        Cmpsd if inst.code() != iced_x86::Code::Cmpsd_m32_m32 => compare::<3>,
        Comiss => comi::<0>,
        Ucomiss => comi::<1>,
        Comisd => comi::<2>,
        Ucomisd => comi::<3>,
        Cvtsi2ss | Cvtsi2sd => {
            let wide = if inst.op_kind(1) == OpKind::Register {
                inst.op1_register().size() == 8
            } else {
                inst.memory_size().size() == 8
            };
            let double = inst.mnemonic() == Cvtsi2sd;
            match (double, wide) {
                (false, false) => from_int::<false, false>,
                (false, true) => from_int::<false, true>,
                (true, false) => from_int::<true, false>,
                (true, true) => from_int::<true, true>,
            }
        }
        Roundps => round::<0>,
        Roundpd => round::<1>,
        Roundss => round::<2>,
        Roundsd => round::<3>,
        Dpps => dot_product::<false>,
        Dppd => dot_product::<true>,
        Cvtss2si | Cvtsd2si | Cvttss2si | Cvttsd2si => {
            let mut kind = 0u8;
            if matches!(inst.mnemonic(), Cvtsd2si | Cvttsd2si) {
                kind |= 1;
            }
            if matches!(inst.mnemonic(), Cvttss2si | Cvttsd2si) {
                kind |= 2;
            }
            if inst.op0_register().size() == 8 {
                kind |= 4;
            }
            match kind {
                0 => to_int::<0>,
                1 => to_int::<1>,
                2 => to_int::<2>,
                3 => to_int::<3>,
                4 => to_int::<4>,
                5 => to_int::<5>,
                6 => to_int::<6>,
                _ => to_int::<7>,
            }
        }
        _ => return None,
    };
    Some(h)
}

/// The handler for an arithmetic or XMM-to-XMM conversion instruction, if `mnemonic` is one.
fn two_operand_handler(mnemonic: Mnemonic) -> Option<Handler> {
    use Mnemonic::*;
    let handler: Handler = match mnemonic {
        Addps => |cpu, op| two(cpu, op, host::addps),
        Addpd => |cpu, op| two(cpu, op, host::addpd),
        Addss => |cpu, op| two(cpu, op, host::addss),
        Addsd => |cpu, op| two(cpu, op, host::addsd),
        Subps => |cpu, op| two(cpu, op, host::subps),
        Subpd => |cpu, op| two(cpu, op, host::subpd),
        Subss => |cpu, op| two(cpu, op, host::subss),
        Subsd => |cpu, op| two(cpu, op, host::subsd),
        Mulps => |cpu, op| two(cpu, op, host::mulps),
        Mulpd => |cpu, op| two(cpu, op, host::mulpd),
        Mulss => |cpu, op| two(cpu, op, host::mulss),
        Mulsd => |cpu, op| two(cpu, op, host::mulsd),
        Divps => |cpu, op| two(cpu, op, host::divps),
        Divpd => |cpu, op| two(cpu, op, host::divpd),
        Divss => |cpu, op| two(cpu, op, host::divss),
        Divsd => |cpu, op| two(cpu, op, host::divsd),
        Minps => |cpu, op| two(cpu, op, host::minps),
        Minpd => |cpu, op| two(cpu, op, host::minpd),
        Minss => |cpu, op| two(cpu, op, host::minss),
        Minsd => |cpu, op| two(cpu, op, host::minsd),
        Maxps => |cpu, op| two(cpu, op, host::maxps),
        Maxpd => |cpu, op| two(cpu, op, host::maxpd),
        Maxss => |cpu, op| two(cpu, op, host::maxss),
        Maxsd => |cpu, op| two(cpu, op, host::maxsd),
        Sqrtps => |cpu, op| two(cpu, op, host::sqrtps),
        Sqrtpd => |cpu, op| two(cpu, op, host::sqrtpd),
        Sqrtss => |cpu, op| two(cpu, op, host::sqrtss),
        Sqrtsd => |cpu, op| two(cpu, op, host::sqrtsd),
        Rcpps => |cpu, op| two(cpu, op, host::rcpps),
        Rcpss => |cpu, op| two(cpu, op, host::rcpss),
        Rsqrtps => |cpu, op| two(cpu, op, host::rsqrtps),
        Rsqrtss => |cpu, op| two(cpu, op, host::rsqrtss),
        Cvtss2sd => |cpu, op| two(cpu, op, host::cvtss2sd),
        Cvtsd2ss => |cpu, op| two(cpu, op, host::cvtsd2ss),
        Cvtps2pd => |cpu, op| two(cpu, op, host::cvtps2pd),
        Cvtpd2ps => |cpu, op| two(cpu, op, host::cvtpd2ps),
        Cvtdq2ps => |cpu, op| two(cpu, op, host::cvtdq2ps),
        Cvtps2dq => |cpu, op| two(cpu, op, host::cvtps2dq),
        Cvttps2dq => |cpu, op| two(cpu, op, host::cvttps2dq),
        Cvtdq2pd => |cpu, op| two(cpu, op, host::cvtdq2pd),
        Cvtpd2dq => |cpu, op| two(cpu, op, host::cvtpd2dq),
        Cvttpd2dq => |cpu, op| two(cpu, op, host::cvttpd2dq),
        Addsubps => |cpu, op| two(cpu, op, host::addsubps),
        Addsubpd => |cpu, op| two(cpu, op, host::addsubpd),
        Haddps => |cpu, op| two(cpu, op, host::haddps),
        Haddpd => |cpu, op| two(cpu, op, host::haddpd),
        Hsubps => |cpu, op| two(cpu, op, host::hsubps),
        Hsubpd => |cpu, op| two(cpu, op, host::hsubpd),
        _ => return None,
    };
    Some(handler)
}
