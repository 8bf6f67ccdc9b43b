//! Floating-point arithmetic executed by the host FPU, so results, rounding, denormal
//! handling and exception flags are exactly those of real hardware.
//!
//! Every function loads the guest's control word (x87) or MXCSR with all exceptions masked,
//! runs one instruction on register or local-memory operands, reads back the status, and
//! restores the host's control state. The x87 stack is left empty, as the ABI requires.

use std::arch::asm;
use std::arch::x86_64::__m128;

/// An 80-bit extended-precision value as stored in memory.
pub type F80 = [u8; 10];

/// A 28-byte FLDENV image that sets the guest's control word (exceptions masked) and
/// condition codes on the host FPU, with an empty stack.
pub type Env = [u8; 28];

/// The environment an x87 operation runs under.
pub fn env(cw: u16, sw: u16) -> Env {
    let mut e = [0u8; 28];
    e[0..2].copy_from_slice(&(cw | 0x3f).to_le_bytes());
    e[4..6].copy_from_slice(&(sw & (SW_C0 | SW_C1 | SW_C2 | SW_C3)).to_le_bytes());
    e[8..10].copy_from_slice(&0xffffu16.to_le_bytes());
    e
}

/// x87 condition codes.
pub const SW_C0: u16 = 1 << 8;
pub const SW_C1: u16 = 1 << 9;
pub const SW_C2: u16 = 1 << 10;
pub const SW_C3: u16 = 1 << 14;

#[inline(always)]
fn to_m128(v: u128) -> __m128 {
    // SAFETY: __m128 is 16 plain bytes; every bit pattern is valid.
    unsafe { std::mem::transmute::<u128, __m128>(v) }
}

#[inline(always)]
fn from_m128(v: __m128) -> u128 {
    // SAFETY: as above.
    unsafe { std::mem::transmute::<__m128, u128>(v) }
}

/// Runs the x87 instructions `$body` on the host FPU under the guest environment `$env`
/// (its control word with every exception masked, its condition codes, an empty stack) and
/// returns the status word `$body` stores in AX. `$operands` name the buffers the template
/// uses. Afterwards pending exceptions are cleared and the host's control word is restored.
macro_rules! x87_asm {
    ($env:expr, [$($body:tt)*], $($operands:tt)*) => {{
        let mut saved_cw = 0u16;
        let status: u16;
        // SAFETY: the instructions read and write only the buffers in `$operands`, each
        // large enough for the memory format used on it, and leave the x87 stack empty as
        // the ABI requires (every wrapper stores or pops what it pushes); exceptions stay
        // masked, so nothing traps, and the host control word is restored.
        unsafe {
            asm!(
                "fnstcw word ptr [{saved}]",
                "fldenv [{env}]",
                $($body)*
                "fnclex",
                "fldcw word ptr [{saved}]",
                saved = in(reg) &mut saved_cw,
                env = in(reg) $env.as_ptr(),
                $($operands)*
                out("ax") status,
                out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                options(nostack),
            );
        }
        status
    }};
}

/// Defines `fn name(a, b, env) -> (result, status)`: `b` is pushed first, then `a`, so the
/// instruction sees ST(0) = a, ST(1) = b; `$extra_pop` discards what is left after the result.
macro_rules! x87_two {
    ($name:ident, $insn:literal, $extra_pop:literal) => {
        pub fn $name(a: &F80, b: &F80, env: &Env) -> (F80, u16) {
            let mut result = [0u8; 10];
            let status = x87_asm!(
                env,
                [
                    "fld tbyte ptr [{b}]",
                    "fld tbyte ptr [{a}]",
                    $insn,
                    "fnstsw ax",
                    "fstp tbyte ptr [{r}]",
                    $extra_pop,
                ],
                a = in(reg) a.as_ptr(),
                b = in(reg) b.as_ptr(),
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_two!(fadd, "fadd st(0), st(1)", "fstp st(0)");
x87_two!(fsub, "fsub st(0), st(1)", "fstp st(0)");
x87_two!(fmul, "fmul st(0), st(1)", "fstp st(0)");
x87_two!(fdiv, "fdiv st(0), st(1)", "fstp st(0)");
x87_two!(fprem, "fprem", "fstp st(0)");
x87_two!(fprem1, "fprem1", "fstp st(0)");
x87_two!(fscale, "fscale", "fstp st(0)");
// These compute from ST(1) and ST(0) and pop once: `a` is ST(0) (x), `b` is ST(1) (y).
x87_two!(fyl2x, "fyl2x", "");
x87_two!(fyl2xp1, "fyl2xp1", "");
x87_two!(fpatan, "fpatan", "");
x87_two!(fcom, "fcom st(1)", "fstp st(0)");
x87_two!(fucom, "fucom st(1)", "fstp st(0)");

/// Defines `fn name(a, m, env) -> (result, status)`: ST(0) = a, then `$insn` with the memory
/// operand `m` (the instruction's own memory form, so exception precedence is the hardware's).
macro_rules! x87_memory {
    ($name:ident, $insn:literal, $bytes:literal) => {
        pub fn $name(a: &F80, m: &[u8], env: &Env) -> (F80, u16) {
            let mut operand = [0u8; 8];
            let n = m.len().min($bytes);
            operand[..n].copy_from_slice(&m[..n]);
            let mut result = [0u8; 10];
            let status = x87_asm!(
                env,
                [
                    "fld tbyte ptr [{a}]",
                    concat!($insn, " [{m}]"),
                    "fnstsw ax",
                    "fstp tbyte ptr [{r}]",
                ],
                a = in(reg) a.as_ptr(),
                m = in(reg) operand.as_ptr(),
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_memory!(fadd_m32, "fadd dword ptr", 4);
x87_memory!(fadd_m64, "fadd qword ptr", 8);
x87_memory!(fsub_m32, "fsub dword ptr", 4);
x87_memory!(fsub_m64, "fsub qword ptr", 8);
x87_memory!(fsubr_m32, "fsubr dword ptr", 4);
x87_memory!(fsubr_m64, "fsubr qword ptr", 8);
x87_memory!(fmul_m32, "fmul dword ptr", 4);
x87_memory!(fmul_m64, "fmul qword ptr", 8);
x87_memory!(fdiv_m32, "fdiv dword ptr", 4);
x87_memory!(fdiv_m64, "fdiv qword ptr", 8);
x87_memory!(fdivr_m32, "fdivr dword ptr", 4);
x87_memory!(fdivr_m64, "fdivr qword ptr", 8);
x87_memory!(fiadd_m16, "fiadd word ptr", 2);
x87_memory!(fiadd_m32, "fiadd dword ptr", 4);
x87_memory!(fisub_m16, "fisub word ptr", 2);
x87_memory!(fisub_m32, "fisub dword ptr", 4);
x87_memory!(fisubr_m16, "fisubr word ptr", 2);
x87_memory!(fisubr_m32, "fisubr dword ptr", 4);
x87_memory!(fimul_m16, "fimul word ptr", 2);
x87_memory!(fimul_m32, "fimul dword ptr", 4);
x87_memory!(fidiv_m16, "fidiv word ptr", 2);
x87_memory!(fidiv_m32, "fidiv dword ptr", 4);
x87_memory!(fidivr_m16, "fidivr word ptr", 2);
x87_memory!(fidivr_m32, "fidivr dword ptr", 4);
x87_memory!(fcom_m32, "fcom dword ptr", 4);
x87_memory!(fcom_m64, "fcom qword ptr", 8);
x87_memory!(ficom_m16, "ficom word ptr", 2);
x87_memory!(ficom_m32, "ficom dword ptr", 4);

/// Defines `fn name(a, env) -> (result, status)` for a one-operand instruction on ST(0).
macro_rules! x87_one {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: &F80, env: &Env) -> (F80, u16) {
            let mut result = [0u8; 10];
            let status = x87_asm!(
                env,
                [
                    "fld tbyte ptr [{a}]",
                    $insn,
                    "fnstsw ax",
                    "fstp tbyte ptr [{r}]",
                ],
                a = in(reg) a.as_ptr(),
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_one!(fsqrt, "fsqrt");
x87_one!(frndint, "frndint");
x87_one!(f2xm1, "f2xm1");
x87_one!(fsin, "fsin");
x87_one!(fcos, "fcos");
x87_one!(ftst, "ftst");

/// Defines `fn name(a, env) -> (st0, st1, status)` for instructions leaving two values.
macro_rules! x87_one_two {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: &F80, env: &Env) -> (F80, F80, u16) {
            let mut top = [0u8; 10];
            let mut below = [0u8; 10];
            let status = x87_asm!(
                env,
                [
                    "fld tbyte ptr [{a}]",
                    $insn,
                    "fnstsw ax",
                    "fstp tbyte ptr [{t}]",
                    "fstp tbyte ptr [{u}]",
                ],
                a = in(reg) a.as_ptr(),
                t = in(reg) top.as_mut_ptr(),
                u = in(reg) below.as_mut_ptr(),
            );
            (top, below, status)
        }
    };
}

x87_one_two!(fptan, "fptan");
x87_one_two!(fsincos, "fsincos");
x87_one_two!(fxtract, "fxtract");

/// Defines `fn name(env) -> (value, status)` for constant loads (rounded per the control word).
macro_rules! x87_const {
    ($name:ident, $insn:literal) => {
        pub fn $name(env: &Env) -> (F80, u16) {
            let mut result = [0u8; 10];
            let status = x87_asm!(
                env,
                [$insn, "fnstsw ax", "fstp tbyte ptr [{r}]",],
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_const!(fld1, "fld1");
x87_const!(fldl2t, "fldl2t");
x87_const!(fldl2e, "fldl2e");
x87_const!(fldpi, "fldpi");
x87_const!(fldlg2, "fldlg2");
x87_const!(fldln2, "fldln2");

/// Defines a load of `$bytes` bytes of a memory format into extended precision.
macro_rules! x87_load {
    ($name:ident, $insn:literal, $bytes:literal) => {
        pub fn $name(src: &[u8; $bytes], env: &Env) -> (F80, u16) {
            let mut result = [0u8; 10];
            let status = x87_asm!(
                env,
                [
                    concat!($insn, " [{s}]"),
                    "fnstsw ax",
                    "fstp tbyte ptr [{r}]",
                ],
                s = in(reg) src.as_ptr(),
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_load!(load_f32, "fld dword ptr", 4);
x87_load!(load_f64, "fld qword ptr", 8);
x87_load!(load_i16, "fild word ptr", 2);
x87_load!(load_i32, "fild dword ptr", 4);
x87_load!(load_i64, "fild qword ptr", 8);
x87_load!(load_bcd, "fbld tbyte ptr", 10);

/// Defines a store of ST(0) converted to a `$bytes`-byte memory format.
macro_rules! x87_store {
    ($name:ident, $insn:literal, $bytes:literal) => {
        pub fn $name(value: &F80, env: &Env) -> ([u8; $bytes], u16) {
            let mut result = [0u8; $bytes];
            let status = x87_asm!(
                env,
                [
                    "fld tbyte ptr [{v}]",
                    concat!($insn, " [{r}]"),
                    "fnstsw ax",
                ],
                v = in(reg) value.as_ptr(),
                r = in(reg) result.as_mut_ptr(),
            );
            (result, status)
        }
    };
}

x87_store!(store_f32, "fstp dword ptr", 4);
x87_store!(store_f64, "fstp qword ptr", 8);
x87_store!(store_i16, "fistp word ptr", 2);
x87_store!(store_i32, "fistp dword ptr", 4);
x87_store!(store_i64, "fistp qword ptr", 8);
x87_store!(store_bcd, "fbstp tbyte ptr", 10);
x87_store!(store_i16_truncated, "fisttp word ptr", 2);
x87_store!(store_i32_truncated, "fisttp dword ptr", 4);
x87_store!(store_i64_truncated, "fisttp qword ptr", 8);

/// Runs the SSE instructions `$body` under the guest MXCSR `$mxcsr` with every exception
/// masked, on the operands `$operands`, and returns the MXCSR afterwards (the exception flags
/// the body raised). The host's MXCSR is restored.
macro_rules! sse_asm {
    ($mxcsr:expr, [$($body:tt)*], $($operands:tt)*) => {{
        let mut host = 0u32;
        let mut guest = $mxcsr | 0x1f80;
        // SAFETY: the instructions work on register operands only; MXCSR is switched around
        // them (every exception masked, so nothing traps) and the host's is restored.
        unsafe {
            asm!(
                "stmxcsr dword ptr [{host}]",
                "ldmxcsr dword ptr [{guest}]",
                $($body)*
                "stmxcsr dword ptr [{guest}]",
                "ldmxcsr dword ptr [{host}]",
                host = in(reg) &mut host,
                guest = in(reg) &mut guest,
                $($operands)*
                options(nostack),
            );
        }
        guest
    }};
}

/// Defines `fn name(a, b, mxcsr) -> (result, mxcsr)` running `$insn a, b` (`dst = dst OP src`).
macro_rules! sse_two {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: u128, b: u128, mxcsr: u32) -> (u128, u32) {
            let mut x = to_m128(a);
            let after = sse_asm!(
                mxcsr,
                [concat!($insn, " {x}, {y}"),],
                x = inout(xmm_reg) x,
                y = in(xmm_reg) to_m128(b),
            );
            (from_m128(x), after)
        }
    };
}

sse_two!(addps, "addps");
sse_two!(addpd, "addpd");
sse_two!(addss, "addss");
sse_two!(addsd, "addsd");
sse_two!(subps, "subps");
sse_two!(subpd, "subpd");
sse_two!(subss, "subss");
sse_two!(subsd, "subsd");
sse_two!(mulps, "mulps");
sse_two!(mulpd, "mulpd");
sse_two!(mulss, "mulss");
sse_two!(mulsd, "mulsd");
sse_two!(divps, "divps");
sse_two!(divpd, "divpd");
sse_two!(divss, "divss");
sse_two!(divsd, "divsd");
sse_two!(minps, "minps");
sse_two!(minpd, "minpd");
sse_two!(minss, "minss");
sse_two!(minsd, "minsd");
sse_two!(maxps, "maxps");
sse_two!(maxpd, "maxpd");
sse_two!(maxss, "maxss");
sse_two!(maxsd, "maxsd");
sse_two!(sqrtps, "sqrtps");
sse_two!(sqrtpd, "sqrtpd");
sse_two!(sqrtss, "sqrtss");
sse_two!(sqrtsd, "sqrtsd");
sse_two!(rcpps, "rcpps");
sse_two!(rcpss, "rcpss");
sse_two!(rsqrtps, "rsqrtps");
sse_two!(rsqrtss, "rsqrtss");
sse_two!(cvtss2sd, "cvtss2sd");
sse_two!(cvtsd2ss, "cvtsd2ss");
sse_two!(cvtps2pd, "cvtps2pd");
sse_two!(cvtpd2ps, "cvtpd2ps");
sse_two!(cvtdq2ps, "cvtdq2ps");
sse_two!(cvtps2dq, "cvtps2dq");
sse_two!(cvttps2dq, "cvttps2dq");
sse_two!(cvtdq2pd, "cvtdq2pd");
sse_two!(cvtpd2dq, "cvtpd2dq");
sse_two!(cvttpd2dq, "cvttpd2dq");
sse_two!(addsubps, "addsubps");
sse_two!(addsubpd, "addsubpd");
sse_two!(haddps, "haddps");
sse_two!(haddpd, "haddpd");
sse_two!(hsubps, "hsubps");
sse_two!(hsubpd, "hsubpd");

/// Runs `$insn x, y, $imm` under the guest MXCSR: the instructions whose immediate selects
/// the operation (CMPPS predicates, ROUNDPS rounding control) need one instance per value.
macro_rules! sse_imm_with {
    ($insn:literal, $imm:literal, $mxcsr:ident, $x:ident, $y:ident) => {
        sse_asm!(
            $mxcsr,
            [concat!($insn, " {x}, {y}, ", $imm),],
            x = inout(xmm_reg) $x,
            y = in(xmm_reg) $y,
        )
    };
}

/// Defines `fn name(a, b, control, mxcsr)` for ROUNDPS/ROUNDPD/ROUNDSS/ROUNDSD: the control
/// immediate's four meaningful bits each get their own instance.
macro_rules! sse_round {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: u128, b: u128, control: u8, mxcsr: u32) -> (u128, u32) {
            let mut x = to_m128(a);
            let y = to_m128(b);
            let after = match control & 15 {
                0 => sse_imm_with!($insn, "0", mxcsr, x, y),
                1 => sse_imm_with!($insn, "1", mxcsr, x, y),
                2 => sse_imm_with!($insn, "2", mxcsr, x, y),
                3 => sse_imm_with!($insn, "3", mxcsr, x, y),
                4 => sse_imm_with!($insn, "4", mxcsr, x, y),
                5 => sse_imm_with!($insn, "5", mxcsr, x, y),
                6 => sse_imm_with!($insn, "6", mxcsr, x, y),
                7 => sse_imm_with!($insn, "7", mxcsr, x, y),
                8 => sse_imm_with!($insn, "8", mxcsr, x, y),
                9 => sse_imm_with!($insn, "9", mxcsr, x, y),
                10 => sse_imm_with!($insn, "10", mxcsr, x, y),
                11 => sse_imm_with!($insn, "11", mxcsr, x, y),
                12 => sse_imm_with!($insn, "12", mxcsr, x, y),
                13 => sse_imm_with!($insn, "13", mxcsr, x, y),
                14 => sse_imm_with!($insn, "14", mxcsr, x, y),
                _ => sse_imm_with!($insn, "15", mxcsr, x, y),
            };
            (from_m128(x), after)
        }
    };
}

sse_round!(roundps, "roundps");
sse_round!(roundpd, "roundpd");
sse_round!(roundss, "roundss");
sse_round!(roundsd, "roundsd");

/// Defines the eight predicates of a CMPPS/CMPPD/CMPSS/CMPSD family (the predicate is an
/// immediate of the instruction, so each gets its own instance).
macro_rules! sse_compare {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: u128, b: u128, predicate: u8, mxcsr: u32) -> (u128, u32) {
            let mut x = to_m128(a);
            let y = to_m128(b);
            let after = match predicate & 7 {
                0 => sse_imm_with!($insn, "0", mxcsr, x, y),
                1 => sse_imm_with!($insn, "1", mxcsr, x, y),
                2 => sse_imm_with!($insn, "2", mxcsr, x, y),
                3 => sse_imm_with!($insn, "3", mxcsr, x, y),
                4 => sse_imm_with!($insn, "4", mxcsr, x, y),
                5 => sse_imm_with!($insn, "5", mxcsr, x, y),
                6 => sse_imm_with!($insn, "6", mxcsr, x, y),
                _ => sse_imm_with!($insn, "7", mxcsr, x, y),
            };
            (from_m128(x), after)
        }
    };
}

sse_compare!(cmpps, "cmpps");
sse_compare!(cmppd, "cmppd");
sse_compare!(cmpss, "cmpss");
sse_compare!(cmpsd, "cmpsd");

/// Defines COMISS/UCOMISS/COMISD/UCOMISD: returns the flags (in LAHF layout: SF ZF 0 AF 0 PF
/// 1 CF) and MXCSR.
macro_rules! sse_comi {
    ($name:ident, $insn:literal) => {
        pub fn $name(a: u128, b: u128, mxcsr: u32) -> (u8, u32) {
            let ax: u16;
            // LAHF copies the flags the comparison set.
            let after = sse_asm!(
                mxcsr,
                [concat!($insn, " {x}, {y}"), "lahf",],
                x = in(xmm_reg) to_m128(a),
                y = in(xmm_reg) to_m128(b),
                out("ax") ax,
            );
            ((ax >> 8) as u8, after)
        }
    };
}

sse_comi!(comiss, "comiss");
sse_comi!(ucomiss, "ucomiss");
sse_comi!(comisd, "comisd");
sse_comi!(ucomisd, "ucomisd");

/// Defines an integer-to-scalar conversion (`cvtsi2ss/sd`, 32- or 64-bit source).
macro_rules! sse_from_int {
    ($name:ident, $insn:literal, $modifier:literal) => {
        pub fn $name(a: u128, value: u64, mxcsr: u32) -> (u128, u32) {
            let mut x = to_m128(a);
            let after = sse_asm!(
                mxcsr,
                [concat!($insn, " {x}, {v", $modifier, "}"),],
                x = inout(xmm_reg) x,
                v = in(reg) value,
            );
            (from_m128(x), after)
        }
    };
}

sse_from_int!(cvtsi2ss_32, "cvtsi2ss", ":e");
sse_from_int!(cvtsi2ss_64, "cvtsi2ss", "");
sse_from_int!(cvtsi2sd_32, "cvtsi2sd", ":e");
sse_from_int!(cvtsi2sd_64, "cvtsi2sd", "");

/// Defines a scalar-to-integer conversion (`cvt(t)ss2si`, `cvt(t)sd2si`, 32- or 64-bit).
macro_rules! sse_to_int {
    ($name:ident, $insn:literal, $modifier:literal) => {
        pub fn $name(a: u128, mxcsr: u32) -> (u64, u32) {
            let mut out = 0u64;
            let after = sse_asm!(
                mxcsr,
                [concat!($insn, " {o", $modifier, "}, {x}"),],
                x = in(xmm_reg) to_m128(a),
                o = inout(reg) out,
            );
            (out, after)
        }
    };
}

sse_to_int!(cvtss2si_32, "cvtss2si", ":e");
sse_to_int!(cvtss2si_64, "cvtss2si", "");
sse_to_int!(cvttss2si_32, "cvttss2si", ":e");
sse_to_int!(cvttss2si_64, "cvttss2si", "");
sse_to_int!(cvtsd2si_32, "cvtsd2si", ":e");
sse_to_int!(cvtsd2si_64, "cvtsd2si", "");
sse_to_int!(cvttsd2si_32, "cvttsd2si", ":e");
sse_to_int!(cvttsd2si_64, "cvttsd2si", "");

#[cfg(test)]
mod tests {
    use super::*;

    fn f80_of(v: f64) -> F80 {
        load_f64(&v.to_le_bytes(), &env(0x37f, 0)).0
    }

    fn f64_of(v: &F80) -> f64 {
        f64::from_le_bytes(store_f64(v, &env(0x37f, 0)).0)
    }

    #[test]
    fn x87_arithmetic_and_status() {
        let (r, sw) = fadd(&f80_of(1.5), &f80_of(2.25), &env(0x37f, 0));
        assert_eq!(f64_of(&r), 3.75);
        assert_eq!(sw & 0x3f, 0);
        let (r, sw) = fdiv(&f80_of(1.0), &f80_of(0.0), &env(0x37f, 0));
        assert_eq!(f64_of(&r), f64::INFINITY);
        assert_ne!(sw & 0x4, 0, "zero divide");
        let (_, sw) = fcom(&f80_of(1.0), &f80_of(2.0), &env(0x37f, 0));
        assert_eq!(sw & (SW_C0 | SW_C2 | SW_C3), SW_C0, "1 < 2");
        let (s, c, _) = fsincos(&f80_of(0.0), &env(0x37f, 0));
        assert_eq!(f64_of(&s), 1.0, "ST(0) = cos");
        assert_eq!(f64_of(&c), 0.0);
        let (pi, _) = fldpi(&env(0x37f, 0));
        assert_eq!(f64_of(&pi), std::f64::consts::PI);
    }

    #[test]
    fn sse_arithmetic_and_mxcsr() {
        let (r, m) = addsd(1.5f64.to_bits() as u128, 2.0f64.to_bits() as u128, 0x1f80);
        assert_eq!(f64::from_bits(r as u64), 3.5);
        assert_eq!(m & 0x3f, 0);
        let (_, m) = divss(1.0f32.to_bits() as u128, 0, 0x1f80);
        assert_ne!(m & 0x4, 0, "zero divide flag");
        let (flags, _) = ucomisd(1.0f64.to_bits() as u128, 2.0f64.to_bits() as u128, 0x1f80);
        assert_eq!(flags & 0x41, 0x01, "CF set, ZF clear");
        let (v, _) = cvttsd2si_64(1e10f64.to_bits() as u128, 0x1f80);
        assert_eq!(v, 10_000_000_000);
        let (x, _) = cvtsi2sd_32(0, (-3i32) as u32 as u64, 0x1f80);
        assert_eq!(f64::from_bits(x as u64), -3.0);
    }
}
