//! Data movement: MOV and its extending forms, LEA, XCHG, BSWAP, CMOVcc, SETcc, PUSH/POP,
//! PUSHF/POPF, LAHF/SAHF, sign extensions, ENTER/LEAVE, XLAT, CMPXCHG, CMPXCHG8B/16B, XADD.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::flags::{self, FlagOp, ZF};
use super::op::{by_size, kind, mask, sign_extend, size0, Handler, Op, IMM, MEM, REG};
use super::{gpr, Cpu, Event};

/// MOV dst, src.
pub fn mov<const B: usize, const DST: u8, const SRC: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let value = cpu.source::<B, SRC>(op, 1)?;
    if DST == REG {
        cpu.set_gpr::<B>(op.r[0], value);
        Ok(())
    } else {
        let addr = cpu.ea(op);
        cpu.write::<B>(addr, value)
    }
}

/// MOV with a 64-bit absolute address (moffs): `mov al/ax/eax/rax, [addr]` and back.
pub fn mov_moffs<const B: usize, const LOAD: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    if LOAD {
        let value = cpu.read::<B>(addr)?;
        cpu.set_gpr::<B>(0, value);
        Ok(())
    } else {
        let value = cpu.gpr::<B>(0);
        cpu.write::<B>(addr, value)
    }
}

/// MOVZX/MOVSX/MOVSXD: `D`-byte destination from an `S`-byte source.
pub fn extend<const D: usize, const S: usize, const SIGNED: bool, const SRC: u8>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    let value = cpu.source::<S, SRC>(op, 1)?;
    let value = if SIGNED {
        sign_extend::<S>(value)
    } else {
        value
    };
    cpu.set_gpr::<D>(op.r[0], value);
    Ok(())
}

/// LEA: the effective address without segment base.
pub fn lea<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    cpu.set_gpr::<B>(op.r[0], addr);
    Ok(())
}

/// XCHG (always locked with memory, which needs nothing more on one vCPU).
pub fn xchg<const B: usize, const MEMORY: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    if MEMORY {
        // Either operand may be the memory one.
        let reg = if op.is_memory(0) { op.r[1] } else { op.r[0] };
        let addr = cpu.ea(op);
        let place = cpu.locate::<B>(addr)?;
        let old = cpu.place_read::<B>(place)?;
        let value = cpu.gpr::<B>(reg);
        cpu.place_write::<B>(place, value)?;
        cpu.set_gpr::<B>(reg, old);
    } else {
        let a = cpu.gpr::<B>(op.r[0]);
        let b = cpu.gpr::<B>(op.r[1]);
        cpu.set_gpr::<B>(op.r[0], b);
        cpu.set_gpr::<B>(op.r[1], a);
    }
    Ok(())
}

/// BSWAP.
pub fn bswap<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let v = cpu.gpr::<B>(op.r[0]);
    let r = match B {
        4 => u64::from((v as u32).swap_bytes()),
        8 => v.swap_bytes(),
        // BSWAP of a 16-bit register is undefined; hardware clears it.
        _ => 0,
    };
    cpu.set_gpr::<B>(op.r[0], r);
    Ok(())
}

/// CMOVcc r, r/m. The source is read (and may fault) even when the condition is false, and
/// a 32-bit destination is zero-extended either way.
pub fn cmov<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let value = cpu.source::<B, SRC>(op, 1)?;
    let cc = op.inst.condition_code() as u8 - 1;
    if cpu.arch.flags.condition(cc) {
        cpu.set_gpr::<B>(op.r[0], value);
    } else if B == 4 {
        let old = cpu.gpr::<4>(op.r[0]);
        cpu.set_gpr::<4>(op.r[0], old);
    }
    Ok(())
}

/// SETcc r/m8.
pub fn setcc<const DST: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let cc = op.inst.condition_code() as u8 - 1;
    let value = u64::from(cpu.arch.flags.condition(cc));
    if DST == REG {
        cpu.set_gpr::<1>(op.r[0], value);
        Ok(())
    } else {
        let addr = cpu.ea(op);
        cpu.write::<1>(addr, value)
    }
}

/// PUSH r/m/imm (`B` is the stack operand size, 2 or 8).
pub fn push<const B: usize, const SRC: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let value = cpu.source::<B, SRC>(op, 0)?;
    cpu.push::<B>(value)
}

/// POP r/m. With a memory destination addressed through RSP, the address uses the
/// incremented RSP.
pub fn pop<const B: usize, const DST: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let rsp = cpu.arch.regs[gpr::RSP];
    let value = cpu.pop::<B>()?;
    if DST == REG {
        // POP RSP loads the popped value, not the incremented pointer.
        cpu.set_gpr::<B>(op.r[0], value);
        Ok(())
    } else {
        let addr = cpu.ea(op);
        if let Err(e) = cpu.write::<B>(addr, value) {
            cpu.arch.regs[gpr::RSP] = rsp;
            return Err(e);
        }
        Ok(())
    }
}

/// PUSHF/PUSHFQ (VM and RF read as zero).
pub fn pushf<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let value = cpu.arch.flags.get() & !(flags::VM | flags::RF);
    cpu.push::<B>(value)
}

/// POPF/POPFQ.
pub fn popf<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let value = cpu.pop::<B>()?;
    let cpl = cpu.cpl();
    cpu.set_flags_privileged(value, cpl, B);
    Ok(())
}

/// LAHF: AH = SF:ZF:0:AF:0:PF:1:CF.
pub fn lahf(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let f = cpu.arch.flags.get() & 0xff;
    cpu.set_gpr::<1>(super::op::HIGH_BYTE, f);
    Ok(())
}

/// SAHF: SF, ZF, AF, PF, CF from AH.
pub fn sahf(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let ah = cpu.gpr::<1>(super::op::HIGH_BYTE);
    let m = flags::SF | flags::ZF | flags::AF | flags::PF | flags::CF;
    cpu.arch.flags.set_arith(m, ah);
    Ok(())
}

/// CBW/CWDE/CDQE: sign-extend the low half of rAX into rAX (`B` = destination size).
pub fn widen_accumulator<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let v = match B {
        2 => sign_extend::<1>(cpu.gpr::<1>(0)),
        4 => sign_extend::<2>(cpu.gpr::<2>(0)),
        _ => sign_extend::<4>(cpu.gpr::<4>(0)),
    };
    cpu.set_gpr::<B>(0, v);
    Ok(())
}

/// CWD/CDQ/CQO: rDX = sign of rAX.
pub fn sign_into_rdx<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let negative = cpu.gpr::<B>(0) & super::op::sign::<B>() != 0;
    cpu.set_gpr::<B>(2, if negative { u64::MAX } else { 0 });
    Ok(())
}

/// LEAVE: RSP = RBP; pop RBP.
pub fn leave<const B: usize>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let rbp = cpu.arch.regs[gpr::RBP];
    let value = cpu.stack_read::<B>(rbp)?;
    cpu.arch.regs[gpr::RSP] = rbp.wrapping_add(B as u64);
    cpu.set_gpr::<B>(gpr::RBP as u8, value);
    Ok(())
}

/// ENTER imm16, imm8.
pub fn enter<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let size = op.inst.immediate(0) & 0xffff;
    let level = op.inst.immediate(1) & 0x1f;
    let rbp = cpu.arch.regs[gpr::RBP];
    let mut rsp = cpu.arch.regs[gpr::RSP].wrapping_sub(B as u64);
    cpu.stack_write::<B>(rsp, rbp)?;
    let frame = rsp;
    let mut walk = rbp;
    if level > 0 {
        for _ in 1..level {
            walk = walk.wrapping_sub(B as u64);
            let v = cpu.stack_read::<B>(walk)?;
            rsp = rsp.wrapping_sub(B as u64);
            cpu.stack_write::<B>(rsp, v)?;
        }
        rsp = rsp.wrapping_sub(B as u64);
        cpu.stack_write::<B>(rsp, frame)?;
    }
    let new_rsp = rsp.wrapping_sub(size);
    // The new stack top must be writable.
    cpu.stack_read::<1>(new_rsp)?;
    cpu.set_gpr::<B>(gpr::RBP as u8, frame);
    cpu.arch.regs[gpr::RSP] = new_rsp;
    Ok(())
}

/// XLAT: AL = [rBX + AL].
pub fn xlat(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let base = cpu.arch.regs[gpr::RBX] & op.addr_mask;
    let addr = base.wrapping_add(cpu.gpr::<1>(0)) & op.addr_mask;
    let addr = addr.wrapping_add(cpu.mmu.seg_base[op.seg as usize & 7]);
    let value = cpu.read::<1>(addr)?;
    cpu.set_gpr::<1>(0, value);
    Ok(())
}

/// CMPXCHG r/m, r.
pub fn cmpxchg<const B: usize, const DST: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let accumulator = cpu.gpr::<B>(0);
    let new = cpu.gpr::<B>(op.r[1]);
    let place = match DST {
        REG => None,
        _ => {
            let addr = cpu.ea(op);
            Some(cpu.locate::<B>(addr)?)
        }
    };
    let current = match place {
        None => cpu.gpr::<B>(op.r[0]),
        Some(place) => cpu.place_read::<B>(place)?,
    };
    let difference = accumulator.wrapping_sub(current) & mask::<B>();
    cpu.arch.flags.set_lazy(
        FlagOp::Sub,
        (B * 8) as u32,
        difference,
        accumulator,
        current,
    );
    let equal = current == accumulator;
    match place {
        None if equal => cpu.set_gpr::<B>(op.r[0], new),
        // The destination is written back unchanged, as the locked cycle does.
        Some(place) => cpu.place_write::<B>(place, if equal { new } else { current })?,
        None => {}
    }
    if !equal {
        cpu.set_gpr::<B>(0, current);
    }
    Ok(())
}

/// CMPXCHG8B/CMPXCHG16B m: compare rDX:rAX with memory, store rCX:rBX if equal.
pub fn cmpxchg_double<const WIDE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    if WIDE {
        if addr & 15 != 0 {
            return Err(Event::gp(0));
        }
        let low_place = cpu.locate::<8>(addr)?;
        let high_place = cpu.locate::<8>(addr.wrapping_add(8))?;
        let low = cpu.place_read::<8>(low_place)?;
        let high = cpu.place_read::<8>(high_place)?;
        let equal = low == cpu.arch.regs[gpr::RAX] && high == cpu.arch.regs[gpr::RDX];
        if equal {
            let (b, c) = (cpu.arch.regs[gpr::RBX], cpu.arch.regs[gpr::RCX]);
            cpu.place_write::<8>(low_place, b)?;
            cpu.place_write::<8>(high_place, c)?;
        } else {
            cpu.arch.regs[gpr::RAX] = low;
            cpu.arch.regs[gpr::RDX] = high;
        }
        cpu.arch.flags.set_flag(ZF, equal);
    } else {
        let place = cpu.locate::<8>(addr)?;
        let current = cpu.place_read::<8>(place)?;
        let expected = (cpu.arch.regs[gpr::RDX] << 32) | (cpu.arch.regs[gpr::RAX] & 0xffff_ffff);
        let equal = current == expected;
        if equal {
            let new = (cpu.arch.regs[gpr::RCX] << 32) | (cpu.arch.regs[gpr::RBX] & 0xffff_ffff);
            cpu.place_write::<8>(place, new)?;
        } else {
            cpu.arch.regs[gpr::RAX] = current & 0xffff_ffff;
            cpu.arch.regs[gpr::RDX] = current >> 32;
        }
        cpu.arch.flags.set_flag(ZF, equal);
    }
    Ok(())
}

/// XADD r/m, r.
pub fn xadd<const B: usize, const DST: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let bits = (B * 8) as u32;
    let src = cpu.gpr::<B>(op.r[1]);
    if DST == REG {
        let dst = cpu.gpr::<B>(op.r[0]);
        let sum = dst.wrapping_add(src) & mask::<B>();
        cpu.arch.flags.set_lazy(FlagOp::Add, bits, sum, dst, src);
        cpu.set_gpr::<B>(op.r[1], dst);
        cpu.set_gpr::<B>(op.r[0], sum);
    } else {
        let addr = cpu.ea(op);
        let place = cpu.locate::<B>(addr)?;
        let dst = cpu.place_read::<B>(place)?;
        let sum = dst.wrapping_add(src) & mask::<B>();
        cpu.place_write::<B>(place, sum)?;
        cpu.arch.flags.set_lazy(FlagOp::Add, bits, sum, dst, src);
        cpu.set_gpr::<B>(op.r[1], dst);
    }
    Ok(())
}

fn mov_forms(size: usize, dst: u8, src: u8) -> Handler {
    match (dst, src) {
        (REG, REG) => by_size!(size, mov::<_, REG, REG>),
        (REG, MEM) => by_size!(size, mov::<_, REG, MEM>),
        (REG, _) => by_size!(size, mov::<_, REG, IMM>),
        (_, REG) => by_size!(size, mov::<_, MEM, REG>),
        (_, _) => by_size!(size, mov::<_, MEM, IMM>),
    }
}

fn extend_forms(inst: &Instruction, signed: bool) -> Handler {
    let d = inst.op0_register().size();
    let s = if inst.op_kind(1) == OpKind::Register {
        inst.op1_register().size()
    } else {
        inst.memory_size().size()
    };
    let src = kind(inst, 1);
    macro_rules! f {
        ($d:literal, $s:literal) => {
            match (signed, src) {
                (false, REG) => extend::<$d, $s, false, REG> as Handler,
                (false, _) => extend::<$d, $s, false, MEM>,
                (true, REG) => extend::<$d, $s, true, REG>,
                (true, _) => extend::<$d, $s, true, MEM>,
            }
        };
    }
    match (d, s) {
        (2, 1) => f!(2, 1),
        (2, _) => f!(2, 2),
        (4, 1) => f!(4, 1),
        (4, 2) => f!(4, 2),
        (4, _) => f!(4, 4),
        (_, 1) => f!(8, 1),
        (_, 2) => f!(8, 2),
        (_, _) => f!(8, 4),
    }
}

/// The handler for a data-movement instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let size = size0(inst);
    let h = match inst.mnemonic() {
        Mnemonic::Mov => {
            let k0 = inst.op_kind(0);
            let k1 = inst.op_kind(1);
            if matches!(k0, OpKind::Register) && inst.op0_register().is_segment_register() {
                super::segment::mov_to_segment as Handler
            } else if matches!(k1, OpKind::Register) && inst.op1_register().is_segment_register() {
                super::segment::mov_from_segment
            } else if matches!(k0, OpKind::Register)
                && (inst.op0_register().is_cr() || inst.op0_register().is_dr())
            {
                super::system::mov_to_control
            } else if matches!(k1, OpKind::Register)
                && (inst.op1_register().is_cr() || inst.op1_register().is_dr())
            {
                super::system::mov_from_control
            } else if matches!(
                inst.code(),
                iced_x86::Code::Mov_AL_moffs8
                    | iced_x86::Code::Mov_AX_moffs16
                    | iced_x86::Code::Mov_EAX_moffs32
                    | iced_x86::Code::Mov_RAX_moffs64
            ) {
                by_size!(size, mov_moffs::<_, true>)
            } else if matches!(
                inst.code(),
                iced_x86::Code::Mov_moffs8_AL
                    | iced_x86::Code::Mov_moffs16_AX
                    | iced_x86::Code::Mov_moffs32_EAX
                    | iced_x86::Code::Mov_moffs64_RAX
            ) {
                by_size!(size, mov_moffs::<_, false>)
            } else {
                mov_forms(size, kind(inst, 0), kind(inst, 1))
            }
        }
        Mnemonic::Movnti => mov_forms(size, MEM, REG),
        Mnemonic::Movzx => extend_forms(inst, false),
        Mnemonic::Movsx | Mnemonic::Movsxd => extend_forms(inst, true),
        Mnemonic::Lea => by_size!(size, lea::<_>),
        Mnemonic::Xchg => {
            let memory = inst.op_kind(0) == OpKind::Memory || inst.op_kind(1) == OpKind::Memory;
            if memory {
                let size = if inst.op_kind(0) == OpKind::Memory {
                    inst.memory_size().size()
                } else {
                    size
                };
                by_size!(size, xchg::<_, true>)
            } else {
                by_size!(size, xchg::<_, false>)
            }
        }
        Mnemonic::Bswap => by_size!(size, bswap::<_>),
        Mnemonic::Cmovo
        | Mnemonic::Cmovno
        | Mnemonic::Cmovb
        | Mnemonic::Cmovae
        | Mnemonic::Cmove
        | Mnemonic::Cmovne
        | Mnemonic::Cmovbe
        | Mnemonic::Cmova
        | Mnemonic::Cmovs
        | Mnemonic::Cmovns
        | Mnemonic::Cmovp
        | Mnemonic::Cmovnp
        | Mnemonic::Cmovl
        | Mnemonic::Cmovge
        | Mnemonic::Cmovle
        | Mnemonic::Cmovg => match kind(inst, 1) {
            REG => by_size!(size, cmov::<_, REG>),
            _ => by_size!(size, cmov::<_, MEM>),
        },
        Mnemonic::Seto
        | Mnemonic::Setno
        | Mnemonic::Setb
        | Mnemonic::Setae
        | Mnemonic::Sete
        | Mnemonic::Setne
        | Mnemonic::Setbe
        | Mnemonic::Seta
        | Mnemonic::Sets
        | Mnemonic::Setns
        | Mnemonic::Setp
        | Mnemonic::Setnp
        | Mnemonic::Setl
        | Mnemonic::Setge
        | Mnemonic::Setle
        | Mnemonic::Setg => match kind(inst, 0) {
            REG => setcc::<REG> as Handler,
            _ => setcc::<MEM>,
        },
        Mnemonic::Push => {
            if inst.op_kind(0) == OpKind::Register && inst.op0_register().is_segment_register() {
                super::segment::push_segment as Handler
            } else {
                let stack = if inst.stack_pointer_increment() == -2 {
                    2
                } else {
                    8
                };
                match (stack, kind(inst, 0)) {
                    (2, REG) => push::<2, REG> as Handler,
                    (2, MEM) => push::<2, MEM>,
                    (2, _) => push::<2, IMM>,
                    (_, REG) => push::<8, REG>,
                    (_, MEM) => push::<8, MEM>,
                    (_, _) => push::<8, IMM>,
                }
            }
        }
        Mnemonic::Pop => {
            if inst.op_kind(0) == OpKind::Register && inst.op0_register().is_segment_register() {
                super::segment::pop_segment as Handler
            } else {
                let stack = if inst.stack_pointer_increment() == 2 {
                    2
                } else {
                    8
                };
                match (stack, kind(inst, 0)) {
                    (2, REG) => pop::<2, REG> as Handler,
                    (2, _) => pop::<2, MEM>,
                    (_, REG) => pop::<8, REG>,
                    (_, _) => pop::<8, MEM>,
                }
            }
        }
        Mnemonic::Pushf => pushf::<2> as Handler,
        Mnemonic::Pushfq => pushf::<8>,
        Mnemonic::Popf => popf::<2>,
        Mnemonic::Popfq => popf::<8>,
        Mnemonic::Lahf => lahf,
        Mnemonic::Sahf => sahf,
        Mnemonic::Cbw => widen_accumulator::<2>,
        Mnemonic::Cwde => widen_accumulator::<4>,
        Mnemonic::Cdqe => widen_accumulator::<8>,
        Mnemonic::Cwd => sign_into_rdx::<2>,
        Mnemonic::Cdq => sign_into_rdx::<4>,
        Mnemonic::Cqo => sign_into_rdx::<8>,
        Mnemonic::Leave => {
            if inst.code() == iced_x86::Code::Leavew {
                leave::<2>
            } else {
                leave::<8>
            }
        }
        Mnemonic::Enter => {
            if inst.code() == iced_x86::Code::Enterw_imm16_imm8 {
                enter::<2>
            } else {
                enter::<8>
            }
        }
        Mnemonic::Xlatb => xlat,
        Mnemonic::Cmpxchg => match kind(inst, 0) {
            REG => by_size!(size, cmpxchg::<_, REG>),
            _ => by_size!(size, cmpxchg::<_, MEM>),
        },
        Mnemonic::Cmpxchg8b => cmpxchg_double::<false>,
        Mnemonic::Cmpxchg16b => cmpxchg_double::<true>,
        Mnemonic::Xadd => match kind(inst, 0) {
            REG => by_size!(size, xadd::<_, REG>),
            _ => by_size!(size, xadd::<_, MEM>),
        },
        _ => return None,
    };
    Some(h)
}
