//! SSE/SSE2 data movement and integer operations on XMM registers.
//!
//! Lanes are handled as little-endian arrays of the 128-bit register value. Floating-point
//! arithmetic lives in `sse_float`.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::op::{Handler, Op};
use super::{Cpu, Event};

type V = u128;

#[inline(always)]
pub(super) fn b16(x: V) -> [u8; 16] {
    x.to_le_bytes()
}
#[inline(always)]
pub(super) fn from_b16(b: [u8; 16]) -> V {
    V::from_le_bytes(b)
}
#[inline(always)]
pub(super) fn w8(x: V) -> [u16; 8] {
    let b = b16(x);
    std::array::from_fn(|i| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]))
}
#[inline(always)]
pub(super) fn from_w8(w: [u16; 8]) -> V {
    let mut b = [0u8; 16];
    for (i, v) in w.iter().enumerate() {
        b[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    from_b16(b)
}
#[inline(always)]
pub(super) fn d4(x: V) -> [u32; 4] {
    std::array::from_fn(|i| (x >> (32 * i)) as u32)
}
#[inline(always)]
pub(super) fn from_d4(d: [u32; 4]) -> V {
    d.iter()
        .enumerate()
        .fold(0, |acc, (i, v)| acc | (V::from(*v) << (32 * i)))
}
#[inline(always)]
pub(super) fn q2(x: V) -> [u64; 2] {
    [x as u64, (x >> 64) as u64]
}
#[inline(always)]
pub(super) fn from_q2(q: [u64; 2]) -> V {
    V::from(q[0]) | (V::from(q[1]) << 64)
}

fn map_b(a: V, b: V, f: impl Fn(u8, u8) -> u8) -> V {
    let (a, b) = (b16(a), b16(b));
    from_b16(std::array::from_fn(|i| f(a[i], b[i])))
}
fn map_w(a: V, b: V, f: impl Fn(u16, u16) -> u16) -> V {
    let (a, b) = (w8(a), w8(b));
    from_w8(std::array::from_fn(|i| f(a[i], b[i])))
}
fn map_d(a: V, b: V, f: impl Fn(u32, u32) -> u32) -> V {
    let (a, b) = (d4(a), d4(b));
    from_d4(std::array::from_fn(|i| f(a[i], b[i])))
}
fn map_q(a: V, b: V, f: impl Fn(u64, u64) -> u64) -> V {
    let (a, b) = (q2(a), q2(b));
    from_q2(std::array::from_fn(|i| f(a[i], b[i])))
}

pub(super) fn sat_i8(v: i32) -> u8 {
    v.clamp(-128, 127) as i8 as u8
}
pub(super) fn sat_u8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}
pub(super) fn sat_i16(v: i32) -> u16 {
    v.clamp(-32768, 32767) as i16 as u16
}
pub(super) fn sat_u16(v: i32) -> u16 {
    v.clamp(0, 65535) as u16
}

/// Declares the two-operand lane operations, `BINARY_OPS` (which maps a handler's const
/// parameter, `Binary as u8`, back to its operation), and the handler tables of the XMM and
/// MMX forms, indexed by `Binary as usize`.
macro_rules! binary_ops {
    ($($name:ident),* $(,)?) => {
        /// Two-operand lane operations (`dst = dst OP src`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Binary {
            $($name),*
        }

        pub(super) const BINARY_OPS: &[Binary] = &[$(Binary::$name),*];
        const XMM_BINARY: &[Handler] = &[$(binary::<{ Binary::$name as u8 }>),*];
        const XMM_SHIFT_IMM: &[Handler] = &[$(shift_imm::<{ Binary::$name as u8 }>),*];
        pub(super) const MMX_BINARY: &[Handler] =
            &[$(super::mmx::binary::<{ Binary::$name as u8 }>),*];
        pub(super) const MMX_SHIFT_IMM: &[Handler] =
            &[$(super::mmx::shift_imm::<{ Binary::$name as u8 }>),*];
    };
}

binary_ops!(
    AddB,
    AddW,
    AddD,
    AddQ,
    SubB,
    SubW,
    SubD,
    SubQ,
    AddSB,
    AddSW,
    AddUSB,
    AddUSW,
    SubSB,
    SubSW,
    SubUSB,
    SubUSW,
    MulLW,
    MulHW,
    MulHUW,
    MulUDQ,
    MAddWD,
    AvgB,
    AvgW,
    MinUB,
    MaxUB,
    MinSW,
    MaxSW,
    SadBW,
    CmpEqB,
    CmpEqW,
    CmpEqD,
    CmpGtB,
    CmpGtW,
    CmpGtD,
    And,
    AndN,
    Or,
    Xor,
    UnpackLowB,
    UnpackLowW,
    UnpackLowD,
    UnpackLowQ,
    UnpackHighB,
    UnpackHighW,
    UnpackHighD,
    UnpackHighQ,
    PackSSWB,
    PackSSDW,
    PackUSWB,
    ShiftLeftW,
    ShiftLeftD,
    ShiftLeftQ,
    ShiftRightW,
    ShiftRightD,
    ShiftRightQ,
    ShiftArithW,
    ShiftArithD,
    // SSSE3.
    ShuffleB,
    HAddW,
    HAddD,
    HAddSW,
    HSubW,
    HSubD,
    HSubSW,
    MAddUBSW,
    MulHRSW,
    SignB,
    SignW,
    SignD,
    AbsB,
    AbsW,
    AbsD,
    // SSE4.1.
    PackUSDW,
    CmpEqQ,
    MaxSB,
    MaxSD,
    MaxUW,
    MaxUD,
    MinSB,
    MinSD,
    MinUW,
    MinUD,
    MulDQ,
    MulLD,
    // SSE4.2.
    CmpGtQ,
);

pub(super) fn binary_op(op: Binary, a: V, b: V) -> V {
    use Binary::*;
    match op {
        AddB => map_b(a, b, u8::wrapping_add),
        AddW => map_w(a, b, u16::wrapping_add),
        AddD => map_d(a, b, u32::wrapping_add),
        AddQ => map_q(a, b, u64::wrapping_add),
        SubB => map_b(a, b, u8::wrapping_sub),
        SubW => map_w(a, b, u16::wrapping_sub),
        SubD => map_d(a, b, u32::wrapping_sub),
        SubQ => map_q(a, b, u64::wrapping_sub),
        AddSB => map_b(a, b, |x, y| sat_i8(i32::from(x as i8) + i32::from(y as i8))),
        AddSW => map_w(a, b, |x, y| {
            sat_i16(i32::from(x as i16) + i32::from(y as i16))
        }),
        AddUSB => map_b(a, b, |x, y| sat_u8(i32::from(x) + i32::from(y))),
        AddUSW => map_w(a, b, |x, y| sat_u16(i32::from(x) + i32::from(y))),
        SubSB => map_b(a, b, |x, y| sat_i8(i32::from(x as i8) - i32::from(y as i8))),
        SubSW => map_w(a, b, |x, y| {
            sat_i16(i32::from(x as i16) - i32::from(y as i16))
        }),
        SubUSB => map_b(a, b, |x, y| sat_u8(i32::from(x) - i32::from(y))),
        SubUSW => map_w(a, b, |x, y| sat_u16(i32::from(x) - i32::from(y))),
        MulLW => map_w(a, b, |x, y| x.wrapping_mul(y)),
        MulHW => map_w(a, b, |x, y| {
            ((i32::from(x as i16) * i32::from(y as i16)) >> 16) as u16
        }),
        MulHUW => map_w(a, b, |x, y| ((u32::from(x) * u32::from(y)) >> 16) as u16),
        MulUDQ => {
            let (x, y) = (d4(a), d4(b));
            from_q2([
                u64::from(x[0]) * u64::from(y[0]),
                u64::from(x[2]) * u64::from(y[2]),
            ])
        }
        MAddWD => {
            let (x, y) = (w8(a), w8(b));
            from_d4(std::array::from_fn(|i| {
                let p = |j: usize| i32::from(x[j] as i16) * i32::from(y[j] as i16);
                p(2 * i).wrapping_add(p(2 * i + 1)) as u32
            }))
        }
        AvgB => map_b(a, b, |x, y| ((u16::from(x) + u16::from(y) + 1) >> 1) as u8),
        AvgW => map_w(a, b, |x, y| ((u32::from(x) + u32::from(y) + 1) >> 1) as u16),
        MinUB => map_b(a, b, u8::min),
        MaxUB => map_b(a, b, u8::max),
        MinSW => map_w(a, b, |x, y| (x as i16).min(y as i16) as u16),
        MaxSW => map_w(a, b, |x, y| (x as i16).max(y as i16) as u16),
        SadBW => {
            let (x, y) = (b16(a), b16(b));
            let sum =
                |r: std::ops::Range<usize>| r.map(|i| u64::from(x[i].abs_diff(y[i]))).sum::<u64>();
            from_q2([sum(0..8), sum(8..16)])
        }
        CmpEqB => map_b(a, b, |x, y| if x == y { 0xff } else { 0 }),
        CmpEqW => map_w(a, b, |x, y| if x == y { 0xffff } else { 0 }),
        CmpEqD => map_d(a, b, |x, y| if x == y { u32::MAX } else { 0 }),
        CmpGtB => map_b(a, b, |x, y| if (x as i8) > (y as i8) { 0xff } else { 0 }),
        CmpGtW => map_w(
            a,
            b,
            |x, y| if (x as i16) > (y as i16) { 0xffff } else { 0 },
        ),
        CmpGtD => map_d(
            a,
            b,
            |x, y| if (x as i32) > (y as i32) { u32::MAX } else { 0 },
        ),
        And => a & b,
        AndN => !a & b,
        Or => a | b,
        Xor => a ^ b,
        UnpackLowB | UnpackHighB => {
            let (x, y) = (b16(a), b16(b));
            let base = if op == UnpackLowB { 0 } else { 8 };
            from_b16(std::array::from_fn(|i| {
                if i % 2 == 0 {
                    x[base + i / 2]
                } else {
                    y[base + i / 2]
                }
            }))
        }
        UnpackLowW | UnpackHighW => {
            let (x, y) = (w8(a), w8(b));
            let base = if op == UnpackLowW { 0 } else { 4 };
            from_w8(std::array::from_fn(|i| {
                if i % 2 == 0 {
                    x[base + i / 2]
                } else {
                    y[base + i / 2]
                }
            }))
        }
        UnpackLowD | UnpackHighD => {
            let (x, y) = (d4(a), d4(b));
            let base = if op == UnpackLowD { 0 } else { 2 };
            from_d4(std::array::from_fn(|i| {
                if i % 2 == 0 {
                    x[base + i / 2]
                } else {
                    y[base + i / 2]
                }
            }))
        }
        UnpackLowQ => from_q2([q2(a)[0], q2(b)[0]]),
        UnpackHighQ => from_q2([q2(a)[1], q2(b)[1]]),
        PackSSWB | PackUSWB => {
            let (x, y) = (w8(a), w8(b));
            let pack = |v: u16| {
                if op == PackSSWB {
                    sat_i8(i32::from(v as i16))
                } else {
                    sat_u8(i32::from(v as i16))
                }
            };
            from_b16(std::array::from_fn(|i| {
                if i < 8 {
                    pack(x[i])
                } else {
                    pack(y[i - 8])
                }
            }))
        }
        PackSSDW => {
            let (x, y) = (d4(a), d4(b));
            from_w8(std::array::from_fn(|i| {
                sat_i16(if i < 4 { x[i] as i32 } else { y[i - 4] as i32 }.clamp(-32768, 32767))
            }))
        }
        ShiftLeftW | ShiftLeftD | ShiftLeftQ | ShiftRightW | ShiftRightD | ShiftRightQ
        | ShiftArithW | ShiftArithD => shift_lanes(op, a, b as u64),
        ShuffleB => {
            let (x, y) = (b16(a), b16(b));
            from_b16(std::array::from_fn(|i| {
                if y[i] & 0x80 != 0 {
                    0
                } else {
                    x[usize::from(y[i] & 15)]
                }
            }))
        }
        HAddW | HAddSW | HSubW | HSubSW => {
            let (x, y) = (w8(a), w8(b));
            from_w8(std::array::from_fn(|i| {
                let s = if i < 4 { &x } else { &y };
                let (p, q) = (s[2 * (i % 4)] as i16, s[2 * (i % 4) + 1] as i16);
                match op {
                    HAddW => p.wrapping_add(q) as u16,
                    HAddSW => p.saturating_add(q) as u16,
                    HSubW => p.wrapping_sub(q) as u16,
                    _ => p.saturating_sub(q) as u16,
                }
            }))
        }
        HAddD | HSubD => {
            let (x, y) = (d4(a), d4(b));
            from_d4(std::array::from_fn(|i| {
                let s = if i < 2 { &x } else { &y };
                let (p, q) = (s[2 * (i % 2)], s[2 * (i % 2) + 1]);
                if op == HAddD {
                    p.wrapping_add(q)
                } else {
                    p.wrapping_sub(q)
                }
            }))
        }
        MAddUBSW => {
            let (x, y) = (b16(a), b16(b));
            from_w8(std::array::from_fn(|i| {
                let p = |j: usize| i32::from(x[j]) * i32::from(y[j] as i8);
                sat_i16(p(2 * i) + p(2 * i + 1))
            }))
        }
        MulHRSW => map_w(a, b, |x, y| {
            let product = i32::from(x as i16) * i32::from(y as i16);
            (((product >> 14) + 1) >> 1) as u16
        }),
        SignB => map_b(a, b, |x, y| {
            sign(i64::from(x as i8), i64::from(y as i8)) as u8
        }),
        SignW => map_w(a, b, |x, y| {
            sign(i64::from(x as i16), i64::from(y as i16)) as u16
        }),
        SignD => map_d(a, b, |x, y| {
            sign(i64::from(x as i32), i64::from(y as i32)) as u32
        }),
        AbsB => map_b(a, b, |_, y| (y as i8).unsigned_abs()),
        AbsW => map_w(a, b, |_, y| (y as i16).unsigned_abs()),
        AbsD => map_d(a, b, |_, y| (y as i32).unsigned_abs()),
        PackUSDW => {
            let (x, y) = (d4(a), d4(b));
            from_w8(std::array::from_fn(|i| {
                let v = if i < 4 { x[i] } else { y[i - 4] } as i32;
                v.clamp(0, 65535) as u16
            }))
        }
        CmpEqQ => map_q(a, b, |x, y| if x == y { u64::MAX } else { 0 }),
        CmpGtQ => map_q(
            a,
            b,
            |x, y| if (x as i64) > (y as i64) { u64::MAX } else { 0 },
        ),
        MaxSB => map_b(a, b, |x, y| (x as i8).max(y as i8) as u8),
        MaxSD => map_d(a, b, |x, y| (x as i32).max(y as i32) as u32),
        MaxUW => map_w(a, b, u16::max),
        MaxUD => map_d(a, b, u32::max),
        MinSB => map_b(a, b, |x, y| (x as i8).min(y as i8) as u8),
        MinSD => map_d(a, b, |x, y| (x as i32).min(y as i32) as u32),
        MinUW => map_w(a, b, u16::min),
        MinUD => map_d(a, b, u32::min),
        MulDQ => {
            let (x, y) = (d4(a), d4(b));
            let product = |i: usize| (i64::from(x[i] as i32) * i64::from(y[i] as i32)) as u64;
            from_q2([product(0), product(2)])
        }
        MulLD => map_d(a, b, u32::wrapping_mul),
    }
}

/// PSIGN: `value` negated, zeroed or kept as `selector` is negative, zero or positive.
fn sign(value: i64, selector: i64) -> i64 {
    match selector.signum() {
        -1 => value.wrapping_neg(),
        0 => 0,
        _ => value,
    }
}

/// `binary_op` on 64-bit MMX operands. Operations that combine lanes across the register
/// (unpacks of the high halves, packs, horizontal sums, byte shuffles) see the 64-bit layout;
/// the rest work lane by lane and simply ignore the upper half.
pub fn binary_op_64(op: Binary, a: u64, b: u64) -> u64 {
    use Binary::*;
    let (wide_a, wide_b) = (V::from(a), V::from(b));
    let result = match op {
        UnpackHighB => binary_op(UnpackLowB, wide_a >> 32, wide_b >> 32),
        UnpackHighW => binary_op(UnpackLowW, wide_a >> 32, wide_b >> 32),
        UnpackHighD => binary_op(UnpackLowD, wide_a >> 32, wide_b >> 32),
        PackSSWB | PackSSDW | PackUSWB | HAddW | HAddD | HAddSW | HSubW | HSubD | HSubSW => {
            binary_op(op, wide_a | (wide_b << 64), 0)
        }
        ShuffleB => {
            let (x, y) = (a.to_le_bytes(), b.to_le_bytes());
            return u64::from_le_bytes(std::array::from_fn(|i| {
                if y[i] & 0x80 != 0 {
                    0
                } else {
                    x[usize::from(y[i] & 7)]
                }
            }));
        }
        _ => binary_op(op, wide_a, wide_b),
    };
    result as u64
}

/// Shifts every lane of `a` by `count` (counts beyond the lane width zero it, or fill it
/// with the sign for arithmetic shifts).
pub(super) fn shift_lanes(op: Binary, a: V, count: u64) -> V {
    use Binary::*;
    match op {
        ShiftLeftW => from_w8(w8(a).map(|x| if count > 15 { 0 } else { x << count })),
        ShiftLeftD => from_d4(d4(a).map(|x| if count > 31 { 0 } else { x << count })),
        ShiftLeftQ => from_q2(q2(a).map(|x| if count > 63 { 0 } else { x << count })),
        ShiftRightW => from_w8(w8(a).map(|x| if count > 15 { 0 } else { x >> count })),
        ShiftRightD => from_d4(d4(a).map(|x| if count > 31 { 0 } else { x >> count })),
        ShiftRightQ => from_q2(q2(a).map(|x| if count > 63 { 0 } else { x >> count })),
        ShiftArithW => from_w8(w8(a).map(|x| ((x as i16) >> count.min(15)) as u16)),
        _ => from_d4(d4(a).map(|x| ((x as i32) >> count.min(31)) as u32)),
    }
}

impl Cpu {
    /// Reads XMM operand `n`: a register, or `size` bytes of memory (16-byte operands of
    /// `aligned` instructions must be 16-byte aligned).
    #[inline]
    pub fn xmm_operand(&mut self, op: &Op, n: u32, size: usize, aligned: bool) -> Result<V, Event> {
        if op.inst.op_kind(n) == OpKind::Register {
            return Ok(self.arch.fpu.xmm[op.r[n as usize & 3] as usize & 15]);
        }
        let addr = self.ea(op);
        match size {
            16 => {
                if aligned && addr & 15 != 0 {
                    return Err(Event::gp(0));
                }
                self.read_u128(addr)
            }
            8 => self.read::<8>(addr).map(V::from),
            4 => self.read::<4>(addr).map(V::from),
            _ => self.read::<2>(addr).map(V::from),
        }
    }

    /// Register number of XMM operand `n`.
    #[inline(always)]
    pub fn xmm_reg(op: &Op, n: usize) -> usize {
        op.r[n & 3] as usize & 15
    }
}

/// `xmm0 = xmm0 OP xmm1/m128`.
pub fn binary<const OP: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    // OP is a `Binary` discriminant, chosen at decode time.
    let operation = BINARY_OPS[OP as usize];
    let src = cpu.xmm_operand(op, 1, 16, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let src = match operation {
        // Shift counts come from the low quadword.
        Binary::ShiftLeftW
        | Binary::ShiftLeftD
        | Binary::ShiftLeftQ
        | Binary::ShiftRightW
        | Binary::ShiftRightD
        | Binary::ShiftRightQ
        | Binary::ShiftArithW
        | Binary::ShiftArithD => src & u128::from(u64::MAX),
        _ => src,
    };
    cpu.arch.fpu.xmm[d] = binary_op(operation, cpu.arch.fpu.xmm[d], src);
    Ok(())
}

/// `shift_imm` operations besides the `Binary` lane shifts: PSLLDQ and PSRLDQ shift the whole
/// register by bytes.
const SHIFT_LEFT_BYTES: u8 = 200;
const SHIFT_RIGHT_BYTES: u8 = 201;
const _: () = assert!(BINARY_OPS.len() < SHIFT_LEFT_BYTES as usize);

/// Lane shift by an immediate: PSLLW/D/Q, PSRLW/D/Q, PSRAW/D, PSLLDQ, PSRLDQ.
pub fn shift_imm<const OP: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let d = Cpu::xmm_reg(op, 0);
    let count = op.inst.immediate(1) & 0xff;
    let a = cpu.arch.fpu.xmm[d];
    cpu.arch.fpu.xmm[d] = match OP {
        SHIFT_LEFT_BYTES => {
            if count > 15 {
                0
            } else {
                a << (count * 8)
            }
        }
        SHIFT_RIGHT_BYTES => {
            if count > 15 {
                0
            } else {
                a >> (count * 8)
            }
        }
        _ => shift_lanes(BINARY_OPS[OP as usize], a, count),
    };
    Ok(())
}

/// PSHUFD/PSHUFHW/PSHUFLW xmm, xmm/m128, imm8 (`KIND` 0, 1, 2).
pub fn pshuf<const KIND: u8>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = cpu.xmm_operand(op, 1, 16, true)?;
    let imm = op.inst.immediate(2) as usize;
    let sel = |i: usize| (imm >> (2 * i)) & 3;
    let r = match KIND {
        0 => {
            let s = d4(src);
            from_d4(std::array::from_fn(|i| s[sel(i)]))
        }
        1 => {
            let s = w8(src);
            from_w8(std::array::from_fn(|i| {
                if i < 4 {
                    s[i]
                } else {
                    s[4 + sel(i - 4)]
                }
            }))
        }
        _ => {
            let s = w8(src);
            from_w8(std::array::from_fn(
                |i| if i < 4 { s[sel(i)] } else { s[i] },
            ))
        }
    };
    cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)] = r;
    Ok(())
}

/// SHUFPS/SHUFPD xmm, xmm/m128, imm8.
pub fn shufp<const DOUBLE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let src = cpu.xmm_operand(op, 1, 16, true)?;
    let d = Cpu::xmm_reg(op, 0);
    let dst = cpu.arch.fpu.xmm[d];
    let imm = op.inst.immediate(2) as usize;
    cpu.arch.fpu.xmm[d] = if DOUBLE {
        from_q2([q2(dst)[imm & 1], q2(src)[(imm >> 1) & 1]])
    } else {
        let (a, b) = (d4(dst), d4(src));
        from_d4([
            a[imm & 3],
            a[(imm >> 2) & 3],
            b[(imm >> 4) & 3],
            b[(imm >> 6) & 3],
        ])
    };
    Ok(())
}

/// Full-register moves: MOVAPS/MOVAPD/MOVDQA (aligned), MOVUPS/MOVUPD/MOVDQU, MOVNT*.
pub(super) fn mov128<const ALIGNED: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    if op.inst.op_kind(0) == OpKind::Register {
        let v = cpu.xmm_operand(op, 1, 16, ALIGNED)?;
        cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)] = v;
        Ok(())
    } else {
        let addr = cpu.ea(op);
        if ALIGNED && addr & 15 != 0 {
            return Err(Event::gp(0));
        }
        let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
        cpu.write_u128(addr, v)
    }
}

/// MOVSS/MOVSD (`B` = 4 or 8): a memory load zeroes the rest; register moves merge.
pub fn mov_scalar<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let lane: V = if B == 4 {
        0xffff_ffff
    } else {
        u128::from(u64::MAX)
    };
    match (op.inst.op_kind(0), op.inst.op_kind(1)) {
        (OpKind::Register, OpKind::Register) => {
            let src = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
            let d = Cpu::xmm_reg(op, 0);
            cpu.arch.fpu.xmm[d] = (cpu.arch.fpu.xmm[d] & !lane) | (src & lane);
        }
        (OpKind::Register, _) => {
            let v = cpu.xmm_operand(op, 1, B, false)?;
            cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)] = v;
        }
        _ => {
            let addr = cpu.ea(op);
            let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
            if B == 4 {
                cpu.write::<4>(addr, v as u64)?;
            } else {
                cpu.write::<8>(addr, v as u64)?;
            }
        }
    }
    Ok(())
}

/// MOVLPS/MOVLPD/MOVHPS/MOVHPD (memory forms), MOVHLPS, MOVLHPS.
pub fn mov_half<const HIGH: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let low_mask = u128::from(u64::MAX);
    if op.inst.op_kind(0) == OpKind::Register {
        let d = Cpu::xmm_reg(op, 0);
        let half = match op.inst.code() {
            Code::Movhlps_xmm_xmm => cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)] >> 64,
            Code::Movlhps_xmm_xmm => cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)] & low_mask,
            _ => cpu.xmm_operand(op, 1, 8, false)?,
        };
        cpu.arch.fpu.xmm[d] = if HIGH {
            (cpu.arch.fpu.xmm[d] & low_mask) | (half << 64)
        } else {
            (cpu.arch.fpu.xmm[d] & !low_mask) | half
        };
        Ok(())
    } else {
        let addr = cpu.ea(op);
        let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
        let half = if HIGH { (v >> 64) as u64 } else { v as u64 };
        cpu.write::<8>(addr, half)
    }
}

/// MOVD/MOVQ between XMM and general registers or memory, and MOVQ xmm, xmm/m64.
pub fn movd_movq<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let lane: V = if B == 4 {
        0xffff_ffff
    } else {
        u128::from(u64::MAX)
    };
    let to_xmm = op.inst.op_kind(0) == OpKind::Register && op.inst.op0_register().is_xmm();
    if to_xmm {
        let v = match op.inst.op_kind(1) {
            OpKind::Register if op.inst.op1_register().is_xmm() => {
                cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)] & lane
            }
            OpKind::Register => u128::from(if B == 4 {
                cpu.gpr::<4>(op.r[1])
            } else {
                cpu.gpr::<8>(op.r[1])
            }),
            _ => cpu.xmm_operand(op, 1, B, false)?,
        };
        cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)] = v;
        return Ok(());
    }
    let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)] & lane;
    match op.inst.op_kind(0) {
        OpKind::Register if op.inst.op0_register().is_xmm() => {
            cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)] = v
        }
        OpKind::Register => {
            if B == 4 {
                cpu.set_gpr::<4>(op.r[0], v as u64);
            } else {
                cpu.set_gpr::<8>(op.r[0], v as u64);
            }
        }
        _ => {
            let addr = cpu.ea(op);
            if B == 4 {
                cpu.write::<4>(addr, v as u64)?;
            } else {
                cpu.write::<8>(addr, v as u64)?;
            }
        }
    }
    Ok(())
}

/// MOVMSKPS/MOVMSKPD/PMOVMSKB r, xmm (`KIND` 4, 8, 1 = lane size).
pub fn movmsk<const KIND: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let v = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)];
    let lanes = 16 / KIND;
    let mask = (0..lanes).fold(0u64, |m, i| {
        m | ((((v >> (i * KIND * 8 + KIND * 8 - 1)) & 1) as u64) << i)
    });
    cpu.set_gpr::<8>(op.r[0], mask);
    Ok(())
}

/// PEXTRW r32/r64, xmm, imm8 (and the SSE4.1 memory form is not reported).
pub fn pextrw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let v = w8(cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)]);
    let word = u64::from(v[(op.inst.immediate(2) & 7) as usize]);
    cpu.set_gpr::<8>(op.r[0], word);
    Ok(())
}

/// PINSRW xmm, r32/m16, imm8.
pub fn pinsrw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let word = if op.inst.op_kind(1) == OpKind::Register {
        cpu.gpr::<2>(op.r[1])
    } else {
        let addr = cpu.ea(op);
        cpu.read::<2>(addr)?
    };
    let d = Cpu::xmm_reg(op, 0);
    let mut v = w8(cpu.arch.fpu.xmm[d]);
    v[(op.inst.immediate(2) & 7) as usize] = word as u16;
    cpu.arch.fpu.xmm[d] = from_w8(v);
    Ok(())
}

/// MASKMOVDQU xmm1, xmm2: stores the bytes of xmm1 selected by xmm2's sign bits at [rDI].
pub fn maskmovdqu(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let data = b16(cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 1)]);
    let mask = b16(cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 2)]);
    let base = (cpu.arch.regs[super::gpr::RDI] & op.addr_mask)
        .wrapping_add(cpu.mmu.seg_base[op.seg as usize & 7]);
    for i in 0..16 {
        if mask[i] & 0x80 != 0 {
            cpu.write::<1>(base.wrapping_add(i as u64), u64::from(data[i]))?;
        }
    }
    Ok(())
}

/// The lane operation of a two-operand integer or bitwise instruction, for its XMM and MMX
/// forms alike.
pub fn lane_operation(mnemonic: Mnemonic) -> Option<Binary> {
    use Binary::*;
    use Mnemonic::*;
    Some(match mnemonic {
        Paddb => AddB,
        Paddw => AddW,
        Paddd => AddD,
        Paddq => AddQ,
        Psubb => SubB,
        Psubw => SubW,
        Psubd => SubD,
        Psubq => SubQ,
        Paddsb => AddSB,
        Paddsw => AddSW,
        Paddusb => AddUSB,
        Paddusw => AddUSW,
        Psubsb => SubSB,
        Psubsw => SubSW,
        Psubusb => SubUSB,
        Psubusw => SubUSW,
        Pmullw => MulLW,
        Pmulhw => MulHW,
        Pmulhuw => MulHUW,
        Pmuludq => MulUDQ,
        Pmaddwd => MAddWD,
        Pavgb => AvgB,
        Pavgw => AvgW,
        Pminub => MinUB,
        Pmaxub => MaxUB,
        Pminsw => MinSW,
        Pmaxsw => MaxSW,
        Psadbw => SadBW,
        Pcmpeqb => CmpEqB,
        Pcmpeqw => CmpEqW,
        Pcmpeqd => CmpEqD,
        Pcmpgtb => CmpGtB,
        Pcmpgtw => CmpGtW,
        Pcmpgtd => CmpGtD,
        Pand | Andps | Andpd => Binary::And,
        Pandn | Andnps | Andnpd => AndN,
        Por | Orps | Orpd => Binary::Or,
        Pxor | Xorps | Xorpd => Binary::Xor,
        Punpcklbw => UnpackLowB,
        Punpcklwd => UnpackLowW,
        Punpckldq | Unpcklps => UnpackLowD,
        Punpcklqdq | Unpcklpd => UnpackLowQ,
        Punpckhbw => UnpackHighB,
        Punpckhwd => UnpackHighW,
        Punpckhdq | Unpckhps => UnpackHighD,
        Punpckhqdq | Unpckhpd => UnpackHighQ,
        Packsswb => PackSSWB,
        Packssdw => PackSSDW,
        Packuswb => PackUSWB,
        Psllw => ShiftLeftW,
        Pslld => ShiftLeftD,
        Psllq => ShiftLeftQ,
        Psrlw => ShiftRightW,
        Psrld => ShiftRightD,
        Psrlq => ShiftRightQ,
        Psraw => ShiftArithW,
        Psrad => ShiftArithD,
        Pshufb => ShuffleB,
        Phaddw => HAddW,
        Phaddd => HAddD,
        Phaddsw => HAddSW,
        Phsubw => HSubW,
        Phsubd => HSubD,
        Phsubsw => HSubSW,
        Pmaddubsw => MAddUBSW,
        Pmulhrsw => MulHRSW,
        Psignb => SignB,
        Psignw => SignW,
        Psignd => SignD,
        Pabsb => AbsB,
        Pabsw => AbsW,
        Pabsd => AbsD,
        Packusdw => PackUSDW,
        Pcmpeqq => CmpEqQ,
        Pcmpgtq => CmpGtQ,
        Pmaxsb => MaxSB,
        Pmaxsd => MaxSD,
        Pmaxuw => MaxUW,
        Pmaxud => MaxUD,
        Pminsb => MinSB,
        Pminsd => MinSD,
        Pminuw => MinUW,
        Pminud => MinUD,
        Pmuldq => MulDQ,
        Pmulld => MulLD,
        _ => return None,
    })
}

/// Whether `inst` is a lane shift by an immediate (PSLLW xmm, imm8 and friends).
pub fn is_immediate_shift(inst: &Instruction) -> bool {
    inst.op_count() == 2 && inst.op_kind(1) == OpKind::Immediate8
}

/// The handler for an SSE data-movement or integer instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    if super::mmx::uses_mmx(inst) {
        return None;
    }
    if let Some(operation) = lane_operation(inst.mnemonic()) {
        let table = if is_immediate_shift(inst) {
            XMM_SHIFT_IMM
        } else {
            XMM_BINARY
        };
        return Some(table[operation as usize]);
    }
    let xmm0 =
        inst.op_count() > 0 && inst.op_kind(0) == OpKind::Register && inst.op0_register().is_xmm();
    let h: Handler = match inst.mnemonic() {
        Pslldq => shift_imm::<SHIFT_LEFT_BYTES>,
        Psrldq => shift_imm::<SHIFT_RIGHT_BYTES>,
        Pshufd => pshuf::<0>,
        Pshufhw => pshuf::<1>,
        Pshuflw => pshuf::<2>,
        Shufps => shufp::<false>,
        Shufpd => shufp::<true>,
        Movaps | Movapd | Movdqa | Movntps | Movntpd | Movntdq => mov128::<true>,
        Movups | Movupd | Movdqu | Lddqu => mov128::<false>,
        Movss => mov_scalar::<4>,
        Movsd if inst.code() != Code::Movsd_m32_m32 => mov_scalar::<8>,
        Movlps | Movlpd | Movhlps => mov_half::<false>,
        Movhps | Movhpd | Movlhps => mov_half::<true>,
        Movd => movd_movq::<4>,
        Movq => movd_movq::<8>,
        Movmskps => movmsk::<4>,
        Movmskpd => movmsk::<8>,
        Pmovmskb => movmsk::<1>,
        Pextrw if inst.op_kind(0) == OpKind::Register && inst.op1_register().is_xmm() => pextrw,
        Pinsrw if xmm0 => pinsrw,
        Maskmovdqu => maskmovdqu,
        _ => return None,
    };
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_table_matches_the_enum() {
        for (i, op) in BINARY_OPS.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
    }

    #[test]
    fn lane_helpers_roundtrip() {
        let v: V = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff;
        assert_eq!(from_b16(b16(v)), v);
        assert_eq!(from_w8(w8(v)), v);
        assert_eq!(from_d4(d4(v)), v);
        assert_eq!(from_q2(q2(v)), v);
        assert_eq!(w8(v)[0], 0xeeff);
    }
}
