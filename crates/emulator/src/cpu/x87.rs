//! The x87 FPU: register stack, tags, status and control words in software; the arithmetic
//! itself runs on the host FPU (`host_fp`), so results are exact 80-bit values with the
//! guest's precision and rounding control.
//!
//! Exceptions are computed masked. An exception the guest left unmasked sets ES in the status
//! word and raises #MF at the next waiting x87 instruction (the destination is then left as
//! the masked response would leave it, a simplification of the hardware's pre-computation
//! behaviour).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::host_fp::{self as host, F80, SW_C0, SW_C1, SW_C2, SW_C3};
use super::op::{Handler, Op};
use super::{flags, vector, Cpu, Event};

const IE: u16 = 0x1;
const SF: u16 = 0x40;
const ES: u16 = 0x80;
const BUSY: u16 = 0x8000;
const CONDITION: u16 = SW_C0 | SW_C1 | SW_C2 | SW_C3;
/// The "real indefinite" QNaN returned by masked invalid operations.
const INDEFINITE: F80 = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];
const ZERO: F80 = [0; 10];

impl Cpu {
    fn st_index(&self, i: usize) -> usize {
        (self.arch.fpu.top() + i) & 7
    }

    fn st_empty(&self, i: usize) -> bool {
        self.arch.fpu.ftw & (1 << self.st_index(i)) == 0
    }

    fn st(&self, i: usize) -> F80 {
        self.arch.fpu.st[self.st_index(i)]
    }

    fn set_st(&mut self, i: usize, value: F80) {
        let p = self.st_index(i);
        self.arch.fpu.st[p] = value;
        self.arch.fpu.ftw |= 1 << p;
    }

    fn set_top(&mut self, top: usize) {
        self.arch.fpu.fsw = (self.arch.fpu.fsw & !0x3800) | (((top & 7) as u16) << 11);
    }

    fn fpu_pop(&mut self) {
        let p = self.st_index(0);
        self.arch.fpu.ftw &= !(1 << p);
        let top = self.arch.fpu.top() + 1;
        self.set_top(top);
    }

    fn invalid_masked(&self) -> bool {
        self.arch.fpu.fcw & IE != 0
    }

    /// Records a stack overflow (C1 = 1) or underflow (C1 = 0).
    fn stack_fault(&mut self, overflow: bool) {
        self.arch.fpu.fsw =
            (self.arch.fpu.fsw & !SW_C1) | IE | SF | if overflow { SW_C1 } else { 0 };
        self.check_unmasked();
    }

    /// Merges a host status word: exception flags accumulate; the condition codes in
    /// `conditions` are replaced.
    fn merge_status(&mut self, status: u16, conditions: u16) {
        self.arch.fpu.fsw =
            (self.arch.fpu.fsw & !conditions) | (status & conditions) | (status & 0x3f);
        self.check_unmasked();
    }

    fn check_unmasked(&mut self) {
        if self.arch.fpu.fsw & 0x3f & !(self.arch.fpu.fcw & 0x3f) != 0 {
            self.arch.fpu.fsw |= ES | BUSY;
        }
    }

    /// A waiting instruction reports a pending unmasked exception as #MF.
    fn wait_check(&self) -> Result<(), Event> {
        if self.arch.fpu.fsw & ES != 0 {
            return Err(Event::exception(vector::MF, None));
        }
        Ok(())
    }
}

/// Reads the raw bytes of the instruction's memory operand (faults come first).
fn read_operand_bytes(cpu: &mut Cpu, op: &Op) -> Result<([u8; 10], usize), Event> {
    let addr = cpu.ea(op);
    cpu.arch.fpu.fdp = addr;
    let size = op.inst.memory_size().size().min(10);
    let mut bytes = [0u8; 10];
    let user = cpu.mmu.user;
    cpu.read_bytes(addr, &mut bytes[..size], user)?;
    Ok((bytes, size))
}

/// Converts a memory operand of an FLD/FILD/FBLD to extended precision on the host.
fn convert_load(mnemonic: Mnemonic, bytes: &[u8; 10], size: usize, cw: &host::Env) -> (F80, u16) {
    let b = bytes;
    match (mnemonic, size) {
        (Mnemonic::Fbld, _) => host::load_bcd(b, cw),
        (Mnemonic::Fild, 2) => host::load_i16(&[b[0], b[1]], cw),
        (Mnemonic::Fild, 4) => host::load_i32(&[b[0], b[1], b[2], b[3]], cw),
        (Mnemonic::Fild, _) => {
            host::load_i64(&[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]], cw)
        }
        (_, 4) => host::load_f32(&[b[0], b[1], b[2], b[3]], cw),
        (_, 8) => host::load_f64(&[b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]], cw),
        _ => (*b, 0),
    }
}

impl Cpu {
    /// Whether pushing would overwrite a valid register (stack overflow).
    fn push_overflows(&self) -> bool {
        !self.st_empty(7)
    }

    /// Pushes without checking for overflow (the caller has).
    fn push_unchecked(&mut self, value: F80) {
        let top = self.arch.fpu.top() + 7;
        self.set_top(top);
        self.set_st(0, value);
    }

    /// The masked response to a stack fault on an instruction writing ST(`dest`): the
    /// indefinite QNaN. Returns false (write nothing) when invalid-operation is unmasked.
    fn indefinite_into(&mut self, dest: usize) -> bool {
        if self.invalid_masked() {
            self.set_st(dest, INDEFINITE);
            true
        } else {
            false
        }
    }
}

/// The handler of an x87 instruction, chosen once at decode. Each begins as its kind of
/// instruction begins: WAIT checks CR0.MP/TS; the non-waiting control forms (FNINIT, FNSTENV,
/// FLDCW, ...) only check CR0.EM/TS; the waiting control forms also report a pending unmasked
/// exception; every other instruction does both and records its address in FIP ([`enter`]).
pub fn select(inst: &Instruction) -> Option<Handler> {
    use iced_x86::CpuidFeature::{FPU, FPU287, FPU287XL_ONLY, FPU387};
    use Mnemonic::*;
    let x87 = matches!(inst.mnemonic(), Wait | Fisttp)
        || inst
            .cpuid_features()
            .iter()
            .any(|f| matches!(f, FPU | FPU287 | FPU287XL_ONLY | FPU387));
    if !x87 {
        return None;
    }
    let handler: Handler = match inst.mnemonic() {
        Wait => |cpu, _| {
            cpu.check_wait()?;
            cpu.wait_check()
        },
        Fninit => |cpu, _| {
            cpu.check_x87()?;
            cpu.arch.fpu.reset_x87();
            Ok(())
        },
        Finit => |cpu, _| {
            waiting(cpu)?;
            cpu.arch.fpu.reset_x87();
            Ok(())
        },
        Fnclex => |cpu, _| {
            cpu.check_x87()?;
            clear_exceptions(cpu);
            Ok(())
        },
        Fclex => |cpu, _| {
            waiting(cpu)?;
            clear_exceptions(cpu);
            Ok(())
        },
        Fnstcw => |cpu, op| {
            cpu.check_x87()?;
            store_control_word(cpu, op)
        },
        Fstcw => |cpu, op| {
            waiting(cpu)?;
            store_control_word(cpu, op)
        },
        Fnstsw => |cpu, op| {
            cpu.check_x87()?;
            store_status_word(cpu, op)
        },
        Fstsw => |cpu, op| {
            waiting(cpu)?;
            store_status_word(cpu, op)
        },
        Fnstenv => |cpu, op| {
            cpu.check_x87()?;
            store_environment(cpu, op)
        },
        Fstenv => |cpu, op| {
            waiting(cpu)?;
            store_environment(cpu, op)
        },
        Fnsave => |cpu, op| {
            cpu.check_x87()?;
            save(cpu, op)
        },
        Fsave => |cpu, op| {
            waiting(cpu)?;
            save(cpu, op)
        },
        Fldcw => |cpu, op| {
            cpu.check_x87()?;
            load_control_word_from(cpu, op)
        },
        Fldenv => |cpu, op| {
            cpu.check_x87()?;
            load_environment_from(cpu, op)
        },
        Frstor => |cpu, op| {
            cpu.check_x87()?;
            restore(cpu, op)
        },
        Fnop => |cpu, op| {
            cpu.check_x87()?;
            cpu.arch.fpu.fip = op.inst.ip();
            Ok(())
        },
        // 8087/80287 controls, no-ops since the 80387.
        Feni | Fneni | Fdisi | Fndisi | Fsetpm | Fnsetpm => |cpu, op| enter(cpu, op).map(drop),
        Ffree | Ffreep => free,
        Fincstp | Fdecstp => move_top,
        Fld if inst.op_kind(0) == OpKind::Register => load_register,
        Fld | Fild | Fbld => load_memory,
        Fldz | Fld1 | Fldpi | Fldl2e | Fldl2t | Fldlg2 | Fldln2 => load_constant,
        Fst | Fstp | Fist | Fistp | Fisttp | Fbstp => |cpu, op| {
            enter(cpu, op)?;
            store(cpu, op, op.inst.mnemonic())
        },
        // The undocumented alias D9 D8+i of FSTP ST(i).
        Fstpnce => |cpu, op| {
            enter(cpu, op)?;
            store(cpu, op, Mnemonic::Fstp)
        },
        Fxch => exchange,
        Fchs | Fabs => change_sign,
        Fxam => examine,
        Ftst => test,
        Fadd | Faddp | Fiadd | Fsub | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr | Fmul | Fmulp
        | Fimul | Fdiv | Fdivp | Fidiv | Fdivr | Fdivrp | Fidivr => |cpu, op| {
            enter(cpu, op)?;
            arithmetic(cpu, op, op.inst.mnemonic())
        },
        Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp | Fcomi | Fcomip
        | Fucomi | Fucomip => |cpu, op| {
            enter(cpu, op)?;
            compare(cpu, op, op.inst.mnemonic())
        },
        Fsqrt | Frndint | F2xm1 | Fsin | Fcos => unary,
        Fptan | Fsincos | Fxtract => two_results,
        Fprem | Fprem1 | Fscale | Fyl2x | Fyl2xp1 | Fpatan => binary,
        Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu => {
            conditional_move
        }
        _ => |cpu, op| {
            enter(cpu, op)?;
            super::system::unimplemented(cpu, op)
        },
    };
    Some(handler)
}

/// The start of a waiting control instruction: #NM, then a pending unmasked exception.
fn waiting(cpu: &mut Cpu) -> Result<(), Event> {
    cpu.check_x87()?;
    cpu.wait_check()
}

/// The start of every computing instruction: as [`waiting`], then FIP is this instruction.
/// Returns the host environment for the guest's control and status words.
#[inline]
fn enter(cpu: &mut Cpu, op: &Op) -> Result<host::Env, Event> {
    waiting(cpu)?;
    cpu.arch.fpu.fip = op.inst.ip();
    Ok(host::env(cpu.arch.fpu.fcw, cpu.arch.fpu.fsw))
}

fn clear_exceptions(cpu: &mut Cpu) {
    cpu.arch.fpu.fsw &= !(0x7f | ES | BUSY);
}

fn store_control_word(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    let value = u64::from(cpu.arch.fpu.fcw);
    cpu.write::<2>(addr, value)
}

fn load_control_word_from(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    cpu.arch.fpu.fcw = load_control_word(cpu.read::<2>(addr)? as u16);
    cpu.arch.fpu.fsw &= !(ES | BUSY);
    cpu.check_unmasked();
    Ok(())
}

fn store_status_word(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let sw = u64::from(cpu.arch.fpu.fsw);
    if op.inst.op_kind(0) == OpKind::Register {
        cpu.set_gpr::<2>(0, sw);
        Ok(())
    } else {
        let addr = cpu.ea(op);
        cpu.write::<2>(addr, sw)
    }
}

fn store_environment(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    let env = environment(cpu, op.inst.memory_size().size() == 14);
    let user = cpu.mmu.user;
    cpu.write_bytes(addr, &env, user)?;
    cpu.arch.fpu.fcw |= 0x3f;
    Ok(())
}

fn load_environment_from(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    let short = op.inst.memory_size().size() == 14;
    let mut env = [0u8; 28];
    let user = cpu.mmu.user;
    cpu.read_bytes(addr, &mut env[..if short { 14 } else { 28 }], user)?;
    load_environment(cpu, &env, short);
    Ok(())
}

/// FNSAVE/FSAVE.
fn save(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    let short = op.inst.memory_size().size() == 94;
    let mut image = environment(cpu, short);
    for i in 0..8 {
        image.extend_from_slice(&cpu.st(i));
    }
    let user = cpu.mmu.user;
    cpu.write_bytes(addr, &image, user)?;
    cpu.arch.fpu.reset_x87();
    Ok(())
}

/// FRSTOR.
fn restore(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    let short = op.inst.memory_size().size() == 94;
    let env_len = if short { 14 } else { 28 };
    let mut image = [0u8; 108];
    let user = cpu.mmu.user;
    cpu.read_bytes(addr, &mut image[..env_len + 80], user)?;
    let mut env = [0u8; 28];
    env[..env_len].copy_from_slice(&image[..env_len]);
    load_environment(cpu, &env, short);
    for i in 0..8 {
        let p = cpu.st_index(i);
        cpu.arch.fpu.st[p].copy_from_slice(&image[env_len + i * 10..env_len + 10 + i * 10]);
    }
    Ok(())
}

/// FFREE/FFREEP.
fn free(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    let p = cpu.st_index(op.r[0] as usize & 7);
    cpu.arch.fpu.ftw &= !(1 << p);
    if op.inst.mnemonic() == Mnemonic::Ffreep {
        cpu.fpu_pop();
    }
    Ok(())
}

/// FINCSTP/FDECSTP.
fn move_top(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    let step = if op.inst.mnemonic() == Mnemonic::Fincstp {
        1
    } else {
        7
    };
    let top = cpu.arch.fpu.top() + step;
    cpu.set_top(top);
    cpu.arch.fpu.fsw &= !SW_C1;
    Ok(())
}

/// FLD ST(i).
fn load_register(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    let i = op.r[0] as usize & 7;
    if cpu.st_empty(i) {
        cpu.stack_fault(false);
        if cpu.invalid_masked() {
            cpu.push_unchecked(INDEFINITE);
        }
    } else if cpu.push_overflows() {
        cpu.stack_fault(true);
        if cpu.invalid_masked() {
            cpu.push_unchecked(INDEFINITE);
        }
    } else {
        let v = cpu.st(i);
        cpu.arch.fpu.fsw &= !SW_C1;
        cpu.push_unchecked(v);
    }
    Ok(())
}

/// FLD/FILD/FBLD from memory.
fn load_memory(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let cw = &enter(cpu, op)?;
    let (bytes, size) = read_operand_bytes(cpu, op)?;
    if cpu.push_overflows() {
        cpu.stack_fault(true);
        if cpu.invalid_masked() {
            cpu.push_unchecked(INDEFINITE);
        }
    } else {
        let (v, sw) = convert_load(op.inst.mnemonic(), &bytes, size, cw);
        cpu.merge_status(sw, SW_C1);
        cpu.push_unchecked(v);
    }
    Ok(())
}

/// FLDZ, FLD1, FLDPI and the other constants.
fn load_constant(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    use Mnemonic::*;
    let cw = &enter(cpu, op)?;
    if cpu.push_overflows() {
        cpu.stack_fault(true);
        if cpu.invalid_masked() {
            cpu.push_unchecked(INDEFINITE);
        }
        return Ok(());
    }
    let (v, sw) = match op.inst.mnemonic() {
        Fldz => (ZERO, 0),
        Fld1 => host::fld1(cw),
        Fldpi => host::fldpi(cw),
        Fldl2e => host::fldl2e(cw),
        Fldl2t => host::fldl2t(cw),
        Fldlg2 => host::fldlg2(cw),
        _ => host::fldln2(cw),
    };
    cpu.merge_status(sw, SW_C1);
    cpu.push_unchecked(v);
    Ok(())
}

/// FXCH.
fn exchange(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    let i = op.r[1] as usize & 7;
    let (a, b) = (cpu.st_empty(0), cpu.st_empty(i));
    if a || b {
        cpu.stack_fault(false);
        if !cpu.invalid_masked() {
            return Ok(());
        }
    } else {
        cpu.arch.fpu.fsw &= !SW_C1;
    }
    let x = if a { INDEFINITE } else { cpu.st(0) };
    let y = if b { INDEFINITE } else { cpu.st(i) };
    cpu.set_st(0, y);
    cpu.set_st(i, x);
    Ok(())
}

/// FCHS/FABS.
fn change_sign(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    if cpu.st_empty(0) {
        cpu.stack_fault(false);
        cpu.indefinite_into(0);
        return Ok(());
    }
    let mut v = cpu.st(0);
    v[9] = if op.inst.mnemonic() == Mnemonic::Fchs {
        v[9] ^ 0x80
    } else {
        v[9] & 0x7f
    };
    cpu.set_st(0, v);
    cpu.arch.fpu.fsw &= !SW_C1;
    Ok(())
}

/// FXAM.
fn examine(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    enter(cpu, op)?;
    let v = cpu.st(0);
    let class = if cpu.st_empty(0) {
        SW_C3 | SW_C0
    } else {
        classify(&v)
    };
    let sign = if v[9] & 0x80 != 0 { SW_C1 } else { 0 };
    cpu.arch.fpu.fsw = (cpu.arch.fpu.fsw & !CONDITION) | class | sign;
    Ok(())
}

/// FTST.
fn test(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let cw = &enter(cpu, op)?;
    if cpu.st_empty(0) {
        cpu.stack_fault(false);
        cpu.arch.fpu.fsw |= SW_C0 | SW_C2 | SW_C3;
    } else {
        let (_, sw) = host::ftst(&cpu.st(0), cw);
        cpu.merge_status(sw, CONDITION);
    }
    Ok(())
}

/// FSQRT, FRNDINT, F2XM1, FSIN, FCOS: ST(0) in place.
fn unary(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    use Mnemonic::*;
    let cw = &enter(cpu, op)?;
    if cpu.st_empty(0) {
        cpu.arch.fpu.fsw &= !SW_C2;
        cpu.stack_fault(false);
        cpu.indefinite_into(0);
        return Ok(());
    }
    let v = cpu.st(0);
    let mnemonic = op.inst.mnemonic();
    let (r, sw) = match mnemonic {
        Fsqrt => host::fsqrt(&v, cw),
        Frndint => host::frndint(&v, cw),
        F2xm1 => host::f2xm1(&v, cw),
        Fsin => host::fsin(&v, cw),
        _ => host::fcos(&v, cw),
    };
    cpu.merge_status(sw, SW_C1 | SW_C2);
    // Out of range (C2): the operand stays.
    if sw & SW_C2 == 0 || !matches!(mnemonic, Fsin | Fcos) {
        cpu.set_st(0, r);
    }
    Ok(())
}

/// FPTAN, FSINCOS, FXTRACT: ST(0) replaced and a second result pushed.
fn two_results(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    use Mnemonic::*;
    let cw = &enter(cpu, op)?;
    let fault = if cpu.st_empty(0) {
        Some(false)
    } else if cpu.push_overflows() {
        Some(true)
    } else {
        None
    };
    if let Some(overflow) = fault {
        cpu.arch.fpu.fsw &= !SW_C2;
        cpu.stack_fault(overflow);
        if cpu.invalid_masked() {
            cpu.set_st(0, INDEFINITE);
            cpu.push_unchecked(INDEFINITE);
        }
        return Ok(());
    }
    let v = cpu.st(0);
    let mnemonic = op.inst.mnemonic();
    let (top, below, sw) = match mnemonic {
        Fptan => host::fptan(&v, cw),
        Fsincos => host::fsincos(&v, cw),
        _ => host::fxtract(&v, cw),
    };
    cpu.merge_status(sw, SW_C1 | SW_C2);
    // C2 set: operand out of range, ST(0) unchanged and nothing pushed.
    if mnemonic != Fxtract && sw & SW_C2 != 0 {
        return Ok(());
    }
    cpu.set_st(0, below);
    cpu.push_unchecked(top);
    Ok(())
}

/// FPREM, FPREM1, FSCALE (ST(0) op ST(1) into ST(0)); FYL2X, FYL2XP1, FPATAN (into ST(1),
/// then pop).
fn binary(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    use Mnemonic::*;
    let cw = &enter(cpu, op)?;
    let mnemonic = op.inst.mnemonic();
    let pops = matches!(mnemonic, Fyl2x | Fyl2xp1 | Fpatan);
    if cpu.st_empty(0) || cpu.st_empty(1) {
        if matches!(mnemonic, Fprem | Fprem1) {
            cpu.arch.fpu.fsw &= !SW_C2;
        }
        cpu.stack_fault(false);
        if cpu.invalid_masked() {
            if pops {
                cpu.fpu_pop();
            }
            cpu.set_st(0, INDEFINITE);
        }
        return Ok(());
    }
    let (a, b) = (cpu.st(0), cpu.st(1));
    let (r, sw) = match mnemonic {
        Fprem => host::fprem(&a, &b, cw),
        Fprem1 => host::fprem1(&a, &b, cw),
        Fscale => host::fscale(&a, &b, cw),
        Fyl2x => host::fyl2x(&a, &b, cw),
        Fyl2xp1 => host::fyl2xp1(&a, &b, cw),
        _ => host::fpatan(&a, &b, cw),
    };
    let conditions = match mnemonic {
        // An invalid operation leaves the quotient bits (C0, C3) alone.
        Fprem | Fprem1 if sw & IE != 0 => SW_C1 | SW_C2,
        Fprem | Fprem1 => CONDITION,
        _ => SW_C1,
    };
    cpu.merge_status(sw, conditions);
    if pops {
        cpu.fpu_pop();
    }
    cpu.set_st(0, r);
    Ok(())
}

/// FCMOVcc.
fn conditional_move(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    use Mnemonic::*;
    enter(cpu, op)?;
    let i = op.r[1] as usize & 7;
    let cc = match op.inst.mnemonic() {
        Fcmovb => 2,
        Fcmove => 4,
        Fcmovbe => 6,
        Fcmovu => 10,
        Fcmovnb => 3,
        Fcmovne => 5,
        Fcmovnbe => 7,
        _ => 11,
    };
    if cpu.st_empty(0) || cpu.st_empty(i) {
        cpu.stack_fault(false);
        cpu.indefinite_into(0);
        return Ok(());
    }
    if cpu.arch.flags.condition(cc) {
        let v = cpu.st(i);
        cpu.set_st(0, v);
    }
    Ok(())
}

/// FST/FSTP/FIST/FISTP/FBSTP.
fn store(cpu: &mut Cpu, op: &Op, mnemonic: Mnemonic) -> Result<(), Event> {
    use Mnemonic::*;
    let inst = &op.inst;
    let pop = matches!(mnemonic, Fstp | Fistp | Fisttp | Fbstp);
    let cw = &host::env(cpu.arch.fpu.fcw, cpu.arch.fpu.fsw);
    if inst.op_kind(0) == OpKind::Register {
        let i = op.r[0] as usize & 7;
        if cpu.st_empty(0) {
            cpu.stack_fault(false);
            if !cpu.indefinite_into(i) {
                return Ok(());
            }
        } else {
            let v = cpu.st(0);
            cpu.set_st(i, v);
            cpu.arch.fpu.fsw &= !SW_C1;
        }
        if pop {
            cpu.fpu_pop();
        }
        return Ok(());
    }
    let addr = cpu.ea(op);
    cpu.arch.fpu.fdp = addr;
    let size = if mnemonic == Fbstp {
        10
    } else {
        inst.memory_size().size()
    };
    // The destination must be writable before anything changes.
    cpu.check_writable_range(addr, size)?;
    let empty = cpu.st_empty(0);
    let value = if empty {
        cpu.stack_fault(false);
        if !cpu.invalid_masked() {
            return Ok(());
        }
        INDEFINITE
    } else {
        cpu.st(0)
    };
    let mut bytes = [0u8; 10];
    let status = match (mnemonic, size) {
        (Fbstp, _) => {
            let (b, sw) = host::store_bcd(&value, cw);
            bytes = b;
            sw
        }
        (Fist | Fistp, 2) => {
            let (b, sw) = host::store_i16(&value, cw);
            bytes[..2].copy_from_slice(&b);
            sw
        }
        (Fist | Fistp, 4) => {
            let (b, sw) = host::store_i32(&value, cw);
            bytes[..4].copy_from_slice(&b);
            sw
        }
        (Fist | Fistp, _) => {
            let (b, sw) = host::store_i64(&value, cw);
            bytes[..8].copy_from_slice(&b);
            sw
        }
        (Fisttp, 2) => {
            let (b, sw) = host::store_i16_truncated(&value, cw);
            bytes[..2].copy_from_slice(&b);
            sw
        }
        (Fisttp, 4) => {
            let (b, sw) = host::store_i32_truncated(&value, cw);
            bytes[..4].copy_from_slice(&b);
            sw
        }
        (Fisttp, _) => {
            let (b, sw) = host::store_i64_truncated(&value, cw);
            bytes[..8].copy_from_slice(&b);
            sw
        }
        (_, 4) => {
            let (b, sw) = host::store_f32(&value, cw);
            bytes[..4].copy_from_slice(&b);
            sw
        }
        (_, 8) => {
            let (b, sw) = host::store_f64(&value, cw);
            bytes[..8].copy_from_slice(&b);
            sw
        }
        _ => {
            bytes = value;
            0
        }
    };
    let user = cpu.mmu.user;
    cpu.write_bytes(addr, &bytes[..size], user)?;
    if !empty {
        cpu.merge_status(status, SW_C1);
    }
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

/// FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR and their popping and integer forms.
fn arithmetic(cpu: &mut Cpu, op: &Op, mnemonic: Mnemonic) -> Result<(), Event> {
    use Mnemonic::*;
    let inst = &op.inst;
    let cw = &host::env(cpu.arch.fpu.fcw, cpu.arch.fpu.fsw);
    if inst.op_kind(0) == OpKind::Memory {
        let (bytes, size) = read_operand_bytes(cpu, op)?;
        if cpu.st_empty(0) {
            cpu.stack_fault(false);
            cpu.indefinite_into(0);
            return Ok(());
        }
        let f = match (mnemonic, size) {
            (Fadd, 4) => host::fadd_m32,
            (Fadd, _) => host::fadd_m64,
            (Fsub, 4) => host::fsub_m32,
            (Fsub, _) => host::fsub_m64,
            (Fsubr, 4) => host::fsubr_m32,
            (Fsubr, _) => host::fsubr_m64,
            (Fmul, 4) => host::fmul_m32,
            (Fmul, _) => host::fmul_m64,
            (Fdiv, 4) => host::fdiv_m32,
            (Fdiv, _) => host::fdiv_m64,
            (Fdivr, 4) => host::fdivr_m32,
            (Fdivr, _) => host::fdivr_m64,
            (Fiadd, 2) => host::fiadd_m16,
            (Fiadd, _) => host::fiadd_m32,
            (Fisub, 2) => host::fisub_m16,
            (Fisub, _) => host::fisub_m32,
            (Fisubr, 2) => host::fisubr_m16,
            (Fisubr, _) => host::fisubr_m32,
            (Fimul, 2) => host::fimul_m16,
            (Fimul, _) => host::fimul_m32,
            (Fidiv, 2) => host::fidiv_m16,
            (Fidiv, _) => host::fidiv_m32,
            (Fidivr, 2) => host::fidivr_m16,
            _ => host::fidivr_m32,
        };
        let (r, sw) = f(&cpu.st(0), &bytes[..size], cw);
        cpu.merge_status(sw, SW_C1);
        cpu.set_st(0, r);
        return Ok(());
    }
    // Register forms: ST(0) op= ST(i), or ST(i) op= ST(0) (optionally popping).
    let (dest, x, y) = if inst.op_register(0) == iced_x86::Register::ST0
        && inst.op_count() == 2
        && inst.op_register(1) != iced_x86::Register::ST0
    {
        (0, 0, op.r[1] as usize & 7)
    } else if inst.op_count() == 2 {
        let i = op.r[0] as usize & 7;
        (i, i, 0)
    } else {
        (0, 0, 0)
    };
    let pop = matches!(mnemonic, Faddp | Fsubp | Fsubrp | Fmulp | Fdivp | Fdivrp);
    if cpu.st_empty(x) || cpu.st_empty(y) {
        cpu.stack_fault(false);
        if cpu.indefinite_into(dest) && pop {
            cpu.fpu_pop();
        }
        return Ok(());
    }
    let reverse = matches!(mnemonic, Fsubr | Fsubrp | Fdivr | Fdivrp);
    let (a, b) = if reverse {
        (cpu.st(y), cpu.st(x))
    } else {
        (cpu.st(x), cpu.st(y))
    };
    let (r, sw) = match mnemonic {
        Fadd | Faddp => host::fadd(&a, &b, cw),
        Fsub | Fsubp | Fsubr | Fsubrp => host::fsub(&a, &b, cw),
        Fmul | Fmulp => host::fmul(&a, &b, cw),
        _ => host::fdiv(&a, &b, cw),
    };
    cpu.merge_status(sw, SW_C1);
    cpu.set_st(dest, r);
    if pop {
        cpu.fpu_pop();
    }
    Ok(())
}

/// FCOM/FUCOM/FICOM (and popping forms), FCOMI/FUCOMI (setting EFLAGS).
fn compare(cpu: &mut Cpu, op: &Op, mnemonic: Mnemonic) -> Result<(), Event> {
    use Mnemonic::*;
    let inst = &op.inst;
    let cw = &host::env(cpu.arch.fpu.fcw, cpu.arch.fpu.fsw);
    let pops = match mnemonic {
        Fcompp | Fucompp => 2,
        Fcomp | Fucomp | Ficomp | Fcomip | Fucomip => 1,
        _ => 0,
    };
    let sets_eflags = matches!(mnemonic, Fcomi | Fcomip | Fucomi | Fucomip);
    let memory = if inst.op_kind(0) == OpKind::Memory {
        Some(read_operand_bytes(cpu, op)?)
    } else {
        None
    };
    let other = match mnemonic {
        Fcompp | Fucompp => 1,
        _ if memory.is_some() => 0,
        // FCOM ST(i) / FCOMI ST(0), ST(i): the other register is the last operand.
        _ => op.r[inst.op_count().saturating_sub(1) as usize & 3] as usize & 7,
    };
    let sw = if cpu.st_empty(0) || (memory.is_none() && cpu.st_empty(other)) {
        cpu.stack_fault(false);
        SW_C0 | SW_C2 | SW_C3
    } else {
        let a = cpu.st(0);
        let sw = match memory {
            Some((bytes, size)) => {
                let f = match (mnemonic, size) {
                    (Ficom | Ficomp, 2) => host::ficom_m16,
                    (Ficom | Ficomp, _) => host::ficom_m32,
                    (_, 4) => host::fcom_m32,
                    _ => host::fcom_m64,
                };
                f(&a, &bytes[..size], cw).1
            }
            None => {
                let b = cpu.st(other);
                if matches!(mnemonic, Fucom | Fucomp | Fucompp | Fucomi | Fucomip) {
                    host::fucom(&a, &b, cw).1
                } else {
                    host::fcom(&a, &b, cw).1
                }
            }
        };
        cpu.merge_status(sw & 0x3f, 0);
        sw
    };
    if sets_eflags {
        let mut f = 0;
        if sw & SW_C0 != 0 {
            f |= flags::CF;
        }
        if sw & SW_C2 != 0 {
            f |= flags::PF;
        }
        if sw & SW_C3 != 0 {
            f |= flags::ZF;
        }
        cpu.arch.flags.set_arith(flags::ARITH, f);
    } else {
        cpu.arch.fpu.fsw = (cpu.arch.fpu.fsw & !CONDITION) | (sw & (SW_C0 | SW_C2 | SW_C3));
    }
    for _ in 0..pops {
        cpu.fpu_pop();
    }
    Ok(())
}

/// The control word as loaded: reserved bit 6 reads as one, bits 7 and 13-15 as zero.
fn load_control_word(value: u16) -> u16 {
    (value & 0x1f3f) | 0x40
}

/// FXAM's class (C3, C2, C0) of a non-empty register.
fn classify(v: &F80) -> u16 {
    let exponent = u16::from_le_bytes([v[8], v[9]]) & 0x7fff;
    let mantissa = u64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
    let integer_bit = mantissa >> 63 == 1;
    match exponent {
        0 if mantissa == 0 => SW_C3,
        0 => SW_C3 | SW_C2,
        0x7fff if !integer_bit => 0,
        0x7fff if mantissa << 1 == 0 => SW_C2 | SW_C0,
        0x7fff => SW_C0,
        _ if integer_bit => SW_C2,
        _ => 0,
    }
}

/// The full 16-bit tag word (2 bits per physical register).
fn full_tag_word(cpu: &Cpu) -> u16 {
    (0..8).fold(0u16, |tags, p| {
        let tag = if cpu.arch.fpu.ftw & (1 << p) == 0 {
            3
        } else {
            let v = &cpu.arch.fpu.st[p];
            match classify(v) {
                c if c == SW_C3 => 1,
                c if c == SW_C2 => 0,
                _ => 2,
            }
        };
        tags | (tag << (2 * p))
    })
}

/// The FSTENV image: 28 bytes (32-bit format) or 14 bytes (16-bit format, `short`).
fn environment(cpu: &Cpu, short: bool) -> Vec<u8> {
    let tags = full_tag_word(cpu);
    if short {
        let mut env = vec![0u8; 14];
        env[0..2].copy_from_slice(&cpu.arch.fpu.fcw.to_le_bytes());
        env[2..4].copy_from_slice(&cpu.arch.fpu.fsw.to_le_bytes());
        env[4..6].copy_from_slice(&tags.to_le_bytes());
        env[6..8].copy_from_slice(&(cpu.arch.fpu.fip as u16).to_le_bytes());
        env[10..12].copy_from_slice(&(cpu.arch.fpu.fdp as u16).to_le_bytes());
        return env;
    }
    let mut env = vec![0u8; 28];
    for (offset, value) in [(0, cpu.arch.fpu.fcw), (4, cpu.arch.fpu.fsw), (8, tags)] {
        env[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
        env[offset + 2..offset + 4].copy_from_slice(&[0xff, 0xff]);
    }
    env[12..16].copy_from_slice(&(cpu.arch.fpu.fip as u32).to_le_bytes());
    env[18..20].copy_from_slice(&cpu.arch.fpu.fop.to_le_bytes());
    env[20..24].copy_from_slice(&(cpu.arch.fpu.fdp as u32).to_le_bytes());
    env[26..28].copy_from_slice(&[0xff, 0xff]);
    env
}

fn load_environment(cpu: &mut Cpu, env: &[u8; 28], short: bool) {
    let word = |o: usize| u16::from_le_bytes([env[o], env[o + 1]]);
    let (fcw, fsw, tags) = if short {
        (word(0), word(2), word(4))
    } else {
        (word(0), word(4), word(8))
    };
    cpu.arch.fpu.fcw = load_control_word(fcw);
    // ES and B are recomputed from the loaded flags and masks.
    cpu.arch.fpu.fsw = fsw & !(ES | BUSY);
    cpu.arch.fpu.ftw = (0..8).fold(0u8, |t, p| {
        if (tags >> (2 * p)) & 3 != 3 {
            t | (1 << p)
        } else {
            t
        }
    });
    if short {
        cpu.arch.fpu.fip = u64::from(word(6));
        cpu.arch.fpu.fdp = u64::from(word(10));
    } else {
        cpu.arch.fpu.fip = u64::from(u32::from_le_bytes([env[12], env[13], env[14], env[15]]));
        cpu.arch.fpu.fop = word(18) & 0x7ff;
        cpu.arch.fpu.fdp = u64::from(u32::from_le_bytes([env[20], env[21], env[22], env[23]]));
    }
    cpu.check_unmasked();
}
