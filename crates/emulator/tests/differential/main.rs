//! Differential tests: every user-mode instruction form the engine implements runs on the host
//! CPU and in the engine from the same random states; registers, flags (minus the
//! architecturally undefined ones), XMM registers, MXCSR, memory and exceptions must match.
//!
//! Seeded and reproducible: `LODGE_DIFF_SEED` changes the seed, `LODGE_DIFF_CASES` the number
//! of cases per instruction form. A failure names the instruction, its bytes and the inputs.

#[path = "../common/mod.rs"]
mod common;
mod engine;
mod generate;
mod native;
mod undefined;

use std::sync::Once;

use iced_x86::{Code, Formatter, IntelFormatter, Mnemonic, OpKind, Register};

use engine::Engine;
use generate::{generate, Case, Rng};
use native::{MachineState, Native, Outcome};
use undefined::{Ignored, Vendor};

fn seed() -> u64 {
    std::env::var("LODGE_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1234)
}

fn cases(default: usize) -> usize {
    std::env::var("LODGE_DIFF_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// RFLAGS bits compared: CF, PF, AF, ZF, SF, OF, DF.
const COMPARED_FLAGS: u64 = 0xcd5;

/// The vendor of this host, printed once per test binary.
fn host_vendor() -> Vendor {
    static PRINTED: Once = Once::new();
    let vendor = Vendor::of_host();
    PRINTED.call_once(|| println!("differential: host CPU vendor {}", vendor.describe()));
    vendor
}

fn describe(case: &Case) -> String {
    let mut text = String::new();
    IntelFormatter::new().format(&case.inst, &mut text);
    format!("{text}  [{:02x?}]", case.bytes)
}

fn compare(
    case: &Case,
    ignored: Ignored,
    native: &Outcome,
    engine: &Outcome,
) -> Result<(), String> {
    match (native, engine) {
        (Outcome::Completed(n), Outcome::Completed(e)) => compare_states(case, ignored, n, e),
        (
            Outcome::Faulted {
                vector: nv,
                error_code: ne,
                address: na,
                regs: nr,
            },
            Outcome::Faulted {
                vector: ev,
                error_code: ee,
                address: ea,
                regs: er,
            },
        ) => {
            if nv != ev {
                return Err(format!("host raised vector {nv}, engine {ev}"));
            }
            if *nv == 14 {
                // The page, not the byte: where in the page a multi-part access (FNSTENV,
                // FRSTOR, ...) reports its fault differs between CPUs.
                if na >> 12 != ea >> 12 {
                    return Err(format!("#PF address: host {na:#x}, engine {ea:#x}"));
                }
                // Outside the test region the two address spaces differ: the host has
                // nothing there, the engine its supervisor-only kernel. Compare the present
                // bit only inside it.
                let same_mappings = (native::REGION..native::REGION + 0x20_0000).contains(na);
                let compared = if same_mappings { 0x7 } else { 0x6 };
                if (ne & compared) != (ee & compared) {
                    return Err(format!("#PF error code: host {ne:#x}, engine {ee:#x}"));
                }
            }
            if nr != er {
                return Err(format!(
                    "registers at the fault differ:\n  host   {nr:x?}\n  engine {er:x?}"
                ));
            }
            Ok(())
        }
        (Outcome::Faulted { vector, .. }, Outcome::Completed(_)) => {
            Err(format!("host raised vector {vector}, engine completed"))
        }
        (Outcome::Completed(_), Outcome::Faulted { vector, .. }) => {
            Err(format!("engine raised vector {vector}, host completed"))
        }
    }
}

fn compare_states(
    case: &Case,
    ignored: Ignored,
    n: &MachineState,
    e: &MachineState,
) -> Result<(), String> {
    let mut problems = Vec::new();
    const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let (skipped_register, skipped_memory) = destination(case, ignored);
    for (index, (name, (a, b))) in NAMES
        .iter()
        .zip(n.regs.iter().zip(e.regs.iter()))
        .enumerate()
    {
        if a != b && skipped_register != Some(index) {
            problems.push(format!("{name}: host {a:#x}, engine {b:#x}"));
        }
    }
    let mask = COMPARED_FLAGS & !ignored.flags;
    if n.rflags & mask != e.rflags & mask {
        problems.push(format!(
            "rflags (mask {mask:#x}): host {:#x}, engine {:#x}",
            n.rflags & mask,
            e.rflags & mask
        ));
    }
    for i in 0..16 {
        if n.xmm[i] != e.xmm[i] {
            problems.push(format!(
                "xmm{i}: host {:#034x}, engine {:#034x}",
                n.xmm[i], e.xmm[i]
            ));
        }
    }
    if n.mxcsr != e.mxcsr {
        problems.push(format!("mxcsr: host {:#x}, engine {:#x}", n.mxcsr, e.mxcsr));
    }
    let fsw_mask = !undefined::undefined_conditions(&case.inst);
    if n.x87.fcw != e.x87.fcw
        || n.x87.fsw & fsw_mask != e.x87.fsw & fsw_mask
        || n.x87.ftw != e.x87.ftw
    {
        problems.push(format!(
            "x87 control/status/tags: host {:#x}/{:#x}/{:#x}, engine {:#x}/{:#x}/{:#x} (status mask {fsw_mask:#x})",
            n.x87.fcw, n.x87.fsw, n.x87.ftw, e.x87.fcw, e.x87.fsw, e.x87.ftw
        ));
    }
    for i in 0..8 {
        if n.x87.st[i] != e.x87.st[i] {
            problems.push(format!(
                "st({i}): host {:02x?}, engine {:02x?}",
                n.x87.st[i], e.x87.st[i]
            ));
        }
    }
    for (name, a, b, base) in [
        ("data", &n.data, &e.data, native::DATA),
        ("stack", &n.stack, &e.stack, native::STACK),
    ] {
        let skipped = |i: usize| skipped_memory.contains(&(base + i as u64));
        if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i] && !skipped(i)) {
            problems.push(format!(
                "{name} at {:#x}: host {:02x?}, engine {:02x?}",
                base + i as u64,
                &a[i..(i + 8).min(a.len())],
                &b[i..(i + 8).min(b.len())]
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n  "))
    }
}

/// The general-purpose register index, or the memory range, of a destination whose result
/// is not compared.
fn destination(case: &Case, ignored: Ignored) -> (Option<usize>, std::ops::Range<u64>) {
    if !ignored.destination {
        return (None, 0..0);
    }
    let inst = &case.inst;
    if inst.op_kind(0) == OpKind::Register {
        let register = inst.op0_register().full_register();
        return (Some(register.number()), 0..0);
    }
    let regs = &case.state.regs;
    let address = inst.virtual_address(0, 0, |register: Register, _, _| {
        let full = register.full_register();
        (full.is_gpr64()).then(|| regs[full.number()])
    });
    match address {
        Some(start) => (None, start..start + inst.memory_size().size() as u64),
        None => (None, 0..0),
    }
}

/// Runs `per_code` cases for every instruction form whose mnemonic passes `filter`.
fn check(name: &str, per_code: usize, filter: impl Fn(Code) -> bool) {
    let mut native = match Native::new() {
        Ok(n) => n,
        Err(e) => {
            println!("SKIPPED {name}: the host runner needs a fixed mapping ({e})");
            return;
        }
    };
    let mut engine = Engine::new();
    let vendor = host_vendor();
    let mut rng = Rng::new(
        seed()
            ^ name
                .bytes()
                .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
    );
    let mut failures = Vec::new();
    let mut untested = Vec::new();
    let mut forms = 0;
    let mut total = 0;
    for code in Code::values() {
        // Forms needing features the engine does not report raise #UD by design; the host
        // has them.
        if !filter(code)
            || !code
                .cpuid_features()
                .iter()
                .all(|f| lodge_emulator::cpuid::supports(*f))
        {
            continue;
        }
        let mut tested = false;
        let mut failed_here = 0;
        for _ in 0..per_code {
            let Some(case) = generate(code, &mut rng) else {
                break;
            };
            tested = true;
            total += 1;
            let n = native.run(&case.bytes, &case.state);
            let e = engine.run(&case.bytes, &case.state);
            if let Err(problem) = compare(&case, undefined::ignored(&case, vendor), &n, &e) {
                failed_here += 1;
                if failed_here <= 2 {
                    failures.push(format!(
                        "{}\n  inputs: regs {:x?} rflags {:#x}\n  {problem}",
                        describe(&case),
                        case.state.regs,
                        case.state.rflags
                    ));
                }
            }
        }
        forms += usize::from(tested);
        if !tested {
            untested.push(format!("{code:?}"));
        }
    }
    println!(
        "{name}: {forms} instruction forms, {total} cases, {} failing",
        failures.len()
    );
    assert!(forms > 0, "{name}: no instruction form was generated");
    if !untested.is_empty() {
        println!(
            "{name}: forms the generator cannot build: {}",
            untested.join(" ")
        );
    }
    if !failures.is_empty() {
        let shown: Vec<_> = failures.iter().take(40).cloned().collect();
        panic!(
            "{name}: {} failures (seed {:#x}):\n{}",
            failures.len(),
            seed(),
            shown.join("\n")
        );
    }
}

#[test]
fn integer_arithmetic_and_logic() {
    use Mnemonic::*;
    check("alu", cases(300), |c| {
        matches!(
            c.mnemonic(),
            Add | Or | Adc | Sbb | And | Sub | Xor | Cmp | Test | Inc | Dec | Neg | Not
        )
    });
}

#[test]
fn shifts_and_rotates() {
    use Mnemonic::*;
    check("shift", cases(400), |c| {
        matches!(
            c.mnemonic(),
            Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
        )
    });
}

#[test]
fn multiply_and_divide() {
    use Mnemonic::*;
    check("muldiv", cases(400), |c| {
        matches!(c.mnemonic(), Mul | Imul | Div | Idiv)
    });
}

#[test]
fn bit_operations() {
    use Mnemonic::*;
    // TZCNT is not compared: the engine reports no BMI1 and runs it as BSF, the host has BMI1.
    check("bits", cases(300), |c| {
        matches!(
            c.mnemonic(),
            Bt | Bts | Btr | Btc | Bsf | Bsr | Popcnt | Lzcnt | Bswap
        )
    });
}

#[test]
fn data_movement() {
    use Mnemonic::*;
    check("data", cases(200), |c| {
        let m = c.mnemonic();
        matches!(
            m,
            Mov | Movzx
                | Movsx
                | Movsxd
                | Lea
                | Xchg
                | Xadd
                | Cmpxchg
                | Cmpxchg8b
                | Cmpxchg16b
                | Movnti
                | Cbw
                | Cwde
                | Cdqe
                | Cwd
                | Cdq
                | Cqo
                | Lahf
                | Sahf
                | Xlatb
                | Push
                | Pop
                | Pushf
                | Pushfq
                | Popf
                | Popfq
                | Enter
                | Leave
                | Clc
                | Stc
                | Cmc
                | Cld
                | Std
                | Nop
        ) || format!("{m:?}").starts_with("Cmov")
            || format!("{m:?}").starts_with("Set")
    });
}

#[test]
fn string_instructions() {
    check("string", cases(300), |c| {
        matches!(c, Code::Movsd_m32_m32 | Code::Cmpsd_m32_m32) || generate::is_string(c.mnemonic())
    });
}

fn sse_integer_or_move(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Paddb
            | Paddw
            | Paddd
            | Paddq
            | Psubb
            | Psubw
            | Psubd
            | Psubq
            | Paddsb
            | Paddsw
            | Paddusb
            | Paddusw
            | Psubsb
            | Psubsw
            | Psubusb
            | Psubusw
            | Pmullw
            | Pmulhw
            | Pmulhuw
            | Pmuludq
            | Pmaddwd
            | Pavgb
            | Pavgw
            | Pminub
            | Pmaxub
            | Pminsw
            | Pmaxsw
            | Psadbw
            | Pcmpeqb
            | Pcmpeqw
            | Pcmpeqd
            | Pcmpgtb
            | Pcmpgtw
            | Pcmpgtd
            | Pand
            | Pandn
            | Por
            | Pxor
            | Andps
            | Andpd
            | Andnps
            | Andnpd
            | Orps
            | Orpd
            | Xorps
            | Xorpd
            | Punpcklbw
            | Punpcklwd
            | Punpckldq
            | Punpcklqdq
            | Punpckhbw
            | Punpckhwd
            | Punpckhdq
            | Punpckhqdq
            | Unpcklps
            | Unpckhps
            | Unpcklpd
            | Unpckhpd
            | Packsswb
            | Packssdw
            | Packuswb
            | Psllw
            | Pslld
            | Psllq
            | Psrlw
            | Psrld
            | Psrlq
            | Psraw
            | Psrad
            | Pslldq
            | Psrldq
            | Pshufd
            | Pshufhw
            | Pshuflw
            | Shufps
            | Shufpd
            | Movaps
            | Movapd
            | Movdqa
            | Movups
            | Movupd
            | Movdqu
            | Movntps
            | Movntpd
            | Movntdq
            | Movss
            | Movlps
            | Movlpd
            | Movhps
            | Movhpd
            | Movhlps
            | Movlhps
            | Movd
            | Movq
            | Movmskps
            | Movmskpd
            | Pmovmskb
            | Pextrw
            | Pinsrw
            | Ldmxcsr
            | Stmxcsr
    )
}

/// Whether an instruction form uses MMX registers (compared in the `mmx` group).
fn uses_mmx(code: Code) -> bool {
    (0..code.op_code().op_count()).any(|i| {
        matches!(
            code.op_code().op_kind(i),
            iced_x86::OpCodeOperandKind::mm_reg
                | iced_x86::OpCodeOperandKind::mm_rm
                | iced_x86::OpCodeOperandKind::mm_or_mem
        )
    })
}

#[test]
fn sse_integer_and_moves() {
    check("sse-int", cases(200), |c| {
        (sse_integer_or_move(c.mnemonic())
            || (c.mnemonic() == Mnemonic::Movsd && c != Code::Movsd_m32_m32))
            && !uses_mmx(c)
    });
}

#[test]
fn sse_floating_point() {
    use Mnemonic::*;
    check("sse-float", cases(300), |c| {
        let m = c.mnemonic();
        !uses_mmx(c)
            && (matches!(
                m,
                Addps
                    | Addpd
                    | Addss
                    | Addsd
                    | Subps
                    | Subpd
                    | Subss
                    | Subsd
                    | Mulps
                    | Mulpd
                    | Mulss
                    | Mulsd
                    | Divps
                    | Divpd
                    | Divss
                    | Divsd
                    | Minps
                    | Minpd
                    | Minss
                    | Minsd
                    | Maxps
                    | Maxpd
                    | Maxss
                    | Maxsd
                    | Sqrtps
                    | Sqrtpd
                    | Sqrtss
                    | Sqrtsd
                    | Rcpps
                    | Rcpss
                    | Rsqrtps
                    | Rsqrtss
                    | Cmpps
                    | Cmppd
                    | Cmpss
                    | Comiss
                    | Ucomiss
                    | Comisd
                    | Ucomisd
                    | Cvtss2sd
                    | Cvtsd2ss
                    | Cvtps2pd
                    | Cvtpd2ps
                    | Cvtdq2ps
                    | Cvtps2dq
                    | Cvttps2dq
                    | Cvtdq2pd
                    | Cvtpd2dq
                    | Cvttpd2dq
                    | Cvtsi2ss
                    | Cvtsi2sd
                    | Cvtss2si
                    | Cvtsd2si
                    | Cvttss2si
                    | Cvttsd2si
            ) || (m == Cmpsd && c != Code::Cmpsd_m32_m32))
    });
}

/// Whether a form needs `feature` and is not an MMX form (those are the `mmx` group's).
fn needs(c: Code, feature: iced_x86::CpuidFeature) -> bool {
    c.cpuid_features().contains(&feature)
        && !uses_mmx(c)
        && c.op_code().encoding() == iced_x86::EncodingKind::Legacy
}

#[test]
fn mmx() {
    use Mnemonic::*;
    // MASKMOVQ stores through an implicit rDI, like MASKMOVDQU, which the generator does not
    // place; 3DNow! is not implemented.
    check("mmx", cases(150), |c| {
        (uses_mmx(c) || c.mnemonic() == Emms)
            && c.mnemonic() != Maskmovq
            && !c.cpuid_features().contains(&iced_x86::CpuidFeature::D3NOW)
    });
}

#[test]
fn sse3() {
    check("sse3", cases(300), |c| {
        needs(c, iced_x86::CpuidFeature::SSE3)
            && !matches!(c.mnemonic(), Mnemonic::Monitor | Mnemonic::Mwait)
    });
}

#[test]
fn ssse3() {
    check("ssse3", cases(300), |c| {
        needs(c, iced_x86::CpuidFeature::SSSE3)
    });
}

#[test]
fn sse4_1() {
    check("sse4.1", cases(300), |c| {
        needs(c, iced_x86::CpuidFeature::SSE4_1)
    });
}

#[test]
fn sse4_2() {
    check("sse4.2", cases(400), |c| {
        needs(c, iced_x86::CpuidFeature::SSE4_2)
    });
}

#[test]
fn x87() {
    check("x87", cases(200), |c| {
        let name = format!("{:?}", c.mnemonic());
        let op_code = c.op_code();
        name.starts_with('F')
            // FSTPNCE (D9 D8+i) is undocumented; the engine runs it as FSTP ST(i).
            && !matches!(c.mnemonic(), Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 | Mnemonic::Femms | Mnemonic::Fstpnce)
            && op_code.encoding() == iced_x86::EncodingKind::Legacy
            && c.cpuid_features().iter().all(|f| matches!(f, iced_x86::CpuidFeature::FPU | iced_x86::CpuidFeature::FPU387 | iced_x86::CpuidFeature::FPU287 | iced_x86::CpuidFeature::CMOV))
    });
}
