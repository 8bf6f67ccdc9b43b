//! SSE/SSE2 floating-point arithmetic, comparisons and conversions, executed by the host
//! (`host_fp`) under the guest's MXCSR.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::host_fp as host;
use super::op::{Handler, Op};
use super::{cr4, flags, vector, Cpu, Event};

/// Accumulates the exception flags of a host operation into MXCSR; fails with #XM (or #UD
/// without CR4.OSXMMEXCPT) when one of them is unmasked, in which case nothing is written.
fn commit_flags(cpu: &mut Cpu, after: u32) -> Result<(), Event> {
    let raised = after & 0x3f;
    cpu.fpu.mxcsr |= raised;
    let unmasked = raised & !(cpu.fpu.mxcsr >> 7) & 0x3f;
    if unmasked != 0 {
        return Err(if cpu.cr4 & cr4::OSXMMEXCPT != 0 {
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
pub fn two<const F: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let f = TWO[F as usize];
    let (result, after) = f(cpu.fpu.xmm[d], src, cpu.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.fpu.xmm[d] = result;
    Ok(())
}

type TwoFn = fn(u128, u128, u32) -> (u128, u32);

const TWO: [TwoFn; 42] = [
    host::addps,
    host::addpd,
    host::addss,
    host::addsd,
    host::subps,
    host::subpd,
    host::subss,
    host::subsd,
    host::mulps,
    host::mulpd,
    host::mulss,
    host::mulsd,
    host::divps,
    host::divpd,
    host::divss,
    host::divsd,
    host::minps,
    host::minpd,
    host::minss,
    host::minsd,
    host::maxps,
    host::maxpd,
    host::maxss,
    host::maxsd,
    host::sqrtps,
    host::sqrtpd,
    host::sqrtss,
    host::sqrtsd,
    host::rcpps,
    host::rcpss,
    host::rsqrtps,
    host::rsqrtss,
    host::cvtss2sd,
    host::cvtsd2ss,
    host::cvtps2pd,
    host::cvtpd2ps,
    host::cvtdq2ps,
    host::cvtps2dq,
    host::cvttps2dq,
    host::cvtdq2pd,
    host::cvtpd2dq,
    host::cvttpd2dq,
];

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
    let (result, after) = f(cpu.fpu.xmm[d], src, predicate, cpu.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.fpu.xmm[d] = result;
    Ok(())
}

/// COMISS/UCOMISS/COMISD/UCOMISD: ZF, PF, CF from the comparison; OF, SF, AF cleared.
pub fn comi<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let size = source_size(op, 1);
    let src = cpu.xmm_operand(op, 1, size, false)?;
    let a = cpu.fpu.xmm[Cpu::xmm_reg(op, 0)];
    let f = match KIND {
        0 => host::comiss,
        1 => host::ucomiss,
        2 => host::comisd,
        _ => host::ucomisd,
    };
    let (ah, after) = f(a, src, cpu.fpu.mxcsr);
    commit_flags(cpu, after)?;
    let ah = u64::from(ah);
    cpu.flags
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
    let (result, after) = f(cpu.fpu.xmm[d], value, cpu.fpu.mxcsr);
    commit_flags(cpu, after)?;
    cpu.fpu.xmm[d] = result;
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
    let (value, after) = f(src, cpu.fpu.mxcsr);
    commit_flags(cpu, after)?;
    if KIND & 4 != 0 {
        cpu.set_gpr::<8>(op.r[0], value);
    } else {
        cpu.set_gpr::<4>(op.r[0], value);
    }
    Ok(())
}

/// The handler for an SSE floating-point instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    if (0..inst.op_count())
        .any(|i| inst.op_kind(i) == OpKind::Register && inst.op_register(i).is_mm())
    {
        return None;
    }
    let index: u8 = match inst.mnemonic() {
        Addps => 0,
        Addpd => 1,
        Addss => 2,
        Addsd => 3,
        Subps => 4,
        Subpd => 5,
        Subss => 6,
        Subsd => 7,
        Mulps => 8,
        Mulpd => 9,
        Mulss => 10,
        Mulsd => 11,
        Divps => 12,
        Divpd => 13,
        Divss => 14,
        Divsd => 15,
        Minps => 16,
        Minpd => 17,
        Minss => 18,
        Minsd => 19,
        Maxps => 20,
        Maxpd => 21,
        Maxss => 22,
        Maxsd => 23,
        Sqrtps => 24,
        Sqrtpd => 25,
        Sqrtss => 26,
        Sqrtsd => 27,
        Rcpps => 28,
        Rcpss => 29,
        Rsqrtps => 30,
        Rsqrtss => 31,
        Cvtss2sd => 32,
        Cvtsd2ss => 33,
        Cvtps2pd => 34,
        Cvtpd2ps => 35,
        Cvtdq2ps => 36,
        Cvtps2dq => 37,
        Cvttps2dq => 38,
        Cvtdq2pd => 39,
        Cvtpd2dq => 40,
        Cvttpd2dq => 41,
        Cmpps => return Some(compare::<0>),
        Cmppd => return Some(compare::<1>),
        Cmpss => return Some(compare::<2>),
        Cmpsd if inst.code() != iced_x86::Code::Cmpsd_m32_m32 => return Some(compare::<3>),
        Comiss => return Some(comi::<0>),
        Ucomiss => return Some(comi::<1>),
        Comisd => return Some(comi::<2>),
        Ucomisd => return Some(comi::<3>),
        Cvtsi2ss | Cvtsi2sd => {
            let wide = if inst.op_kind(1) == OpKind::Register {
                inst.op1_register().size() == 8
            } else {
                inst.memory_size().size() == 8
            };
            let double = inst.mnemonic() == Cvtsi2sd;
            return Some(match (double, wide) {
                (false, false) => from_int::<false, false>,
                (false, true) => from_int::<false, true>,
                (true, false) => from_int::<true, false>,
                (true, true) => from_int::<true, true>,
            });
        }
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
            return Some(match kind {
                0 => to_int::<0>,
                1 => to_int::<1>,
                2 => to_int::<2>,
                3 => to_int::<3>,
                4 => to_int::<4>,
                5 => to_int::<5>,
                6 => to_int::<6>,
                _ => to_int::<7>,
            });
        }
        _ => return None,
    };
    macro_rules! table {
        ($($i:literal)*) => {
            match index {
                $($i => two::<$i> as Handler,)*
                _ => return None,
            }
        };
    }
    Some(
        table!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40 41),
    )
}
