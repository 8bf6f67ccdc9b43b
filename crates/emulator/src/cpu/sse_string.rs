//! SSE4.2: the packed string comparisons (PCMPESTRI, PCMPESTRM, PCMPISTRI, PCMPISTRM) and
//! CRC32 (the Castagnoli polynomial).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::op::{Handler, Op};
use super::{flags, gpr, Cpu, Event};

/// How a string comparison's imm8 reads its operands and aggregates the comparisons.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Control {
    /// Words instead of bytes.
    words: bool,
    signed: bool,
    aggregation: Aggregation,
    /// imm8[5:4].
    polarity: u8,
    /// imm8[6]: most significant index, or an expanded mask.
    most_significant: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aggregation {
    EqualAny,
    Ranges,
    EqualEach,
    EqualOrdered,
}

impl Control {
    fn new(imm: u8) -> Control {
        Control {
            words: imm & 1 != 0,
            signed: imm & 2 != 0,
            aggregation: match (imm >> 2) & 3 {
                0 => Aggregation::EqualAny,
                1 => Aggregation::Ranges,
                2 => Aggregation::EqualEach,
                _ => Aggregation::EqualOrdered,
            },
            polarity: (imm >> 4) & 3,
            most_significant: imm & 0x40 != 0,
        }
    }

    /// Elements per register: 16 bytes or 8 words.
    fn elements(self) -> usize {
        if self.words {
            8
        } else {
            16
        }
    }

    /// Element `i` of `v`, sign- or zero-extended.
    fn element(self, v: u128, i: usize) -> i32 {
        match (self.words, self.signed) {
            (false, false) => i32::from((v >> (8 * i)) as u8),
            (false, true) => i32::from((v >> (8 * i)) as u8 as i8),
            (true, false) => i32::from((v >> (16 * i)) as u16),
            (true, true) => i32::from((v >> (16 * i)) as u16 as i16),
        }
    }

    /// The length of an implicit (zero-terminated) operand.
    fn implicit_length(self, v: u128) -> usize {
        (0..self.elements())
            .find(|&i| self.element(v, i) == 0)
            .unwrap_or(self.elements())
    }

    /// The length of an explicit operand: |value| saturated to the element count.
    fn explicit_length(self, value: i64) -> usize {
        value.unsigned_abs().min(self.elements() as u64) as usize
    }
}

/// The result of a comparison: the bit per element of the second operand (IntRes2) and the
/// flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Comparison {
    result: u16,
    flags: u64,
}

/// Compares `a` (first operand, `len_a` valid elements) with `b` (second operand, `len_b`).
fn compare(control: Control, a: u128, len_a: usize, b: u128, len_b: usize) -> Comparison {
    let n = control.elements();
    let e = |v: u128, i: usize| control.element(v, i);
    let mut result: u16 = 0;
    for j in 0..n {
        let b_valid = j < len_b;
        let bit = match control.aggregation {
            Aggregation::EqualAny => b_valid && (0..len_a).any(|i| e(a, i) == e(b, j)),
            Aggregation::Ranges => {
                b_valid
                    && (0..n).step_by(2).any(|i| {
                        let lower = i < len_a && e(a, i) <= e(b, j);
                        let upper = i + 1 < len_a && e(a, i + 1) >= e(b, j);
                        lower && upper
                    })
            }
            Aggregation::EqualEach => match (j < len_a, b_valid) {
                (true, true) => e(a, j) == e(b, j),
                (false, false) => true,
                _ => false,
            },
            Aggregation::EqualOrdered => (0..n - j).all(|k| {
                if k >= len_a {
                    true
                } else {
                    j + k < len_b && e(a, k) == e(b, j + k)
                }
            }),
        };
        result |= u16::from(bit) << j;
    }
    let all: u16 = if n == 16 { u16::MAX } else { 0xff };
    let valid_b: u16 = if len_b >= 16 {
        u16::MAX
    } else {
        (1u16 << len_b) - 1
    };
    let result = match control.polarity {
        1 => !result & all,
        3 => result ^ valid_b,
        _ => result,
    };
    let mut f = 0;
    if result != 0 {
        f |= flags::CF;
    }
    if len_b < n {
        f |= flags::ZF;
    }
    if len_a < n {
        f |= flags::SF;
    }
    if result & 1 != 0 {
        f |= flags::OF;
    }
    Comparison { result, flags: f }
}

/// PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM (`EXPLICIT` lengths in rAX/rDX; `MASK` result in
/// XMM0, else an index in ECX).
fn string_compare<const EXPLICIT: bool, const MASK: bool>(
    cpu: &mut Cpu,
    op: &Op,
) -> Result<(), Event> {
    cpu.check_sse()?;
    let control = Control::new(op.inst.immediate(2) as u8);
    // The memory operand need not be aligned.
    let b = cpu.xmm_operand(op, 1, 16, false)?;
    let a = cpu.arch.fpu.xmm[Cpu::xmm_reg(op, 0)];
    let (len_a, len_b) = if EXPLICIT {
        let wide = matches!(
            op.inst.mnemonic(),
            Mnemonic::Pcmpestri64 | Mnemonic::Pcmpestrm64
        );
        let length = |v: u64| {
            if wide {
                v as i64
            } else {
                i64::from(v as u32 as i32)
            }
        };
        (
            control.explicit_length(length(cpu.arch.regs[gpr::RAX])),
            control.explicit_length(length(cpu.arch.regs[gpr::RDX])),
        )
    } else {
        (control.implicit_length(a), control.implicit_length(b))
    };
    let outcome = compare(control, a, len_a, b, len_b);
    let n = control.elements();
    if MASK {
        cpu.arch.fpu.xmm[0] = if control.most_significant {
            (0..n).fold(0u128, |acc, i| {
                let width = 128 / n;
                let lane = if width == 16 { 0xffff } else { 0xff };
                if outcome.result & (1 << i) != 0 {
                    acc | (lane << (i * width))
                } else {
                    acc
                }
            })
        } else {
            u128::from(outcome.result)
        };
    } else {
        let index = if outcome.result == 0 {
            n as u32
        } else if control.most_significant {
            15 - outcome.result.leading_zeros()
        } else {
            outcome.result.trailing_zeros()
        };
        cpu.arch.regs[gpr::RCX] = u64::from(index);
    }
    cpu.arch.flags.set_arith(flags::ARITH, outcome.flags);
    Ok(())
}

/// CRC32 r32/r64, r/m8/16/32/64: accumulates the source's bytes into the CRC-32C in the
/// destination's low 32 bits (`B` = source size).
fn crc32<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let value = if op.inst.op_kind(1) == OpKind::Register {
        cpu.gpr::<B>(op.r[1])
    } else {
        let addr = cpu.ea(op);
        cpu.read::<B>(addr)?
    };
    let crc = cpu.gpr::<4>(op.r[0]) as u32;
    let crc = crc32c(crc, &value.to_le_bytes()[..B]);
    // The 32-bit result is zero-extended, for the 64-bit forms too.
    cpu.set_gpr::<8>(op.r[0], u64::from(crc));
    Ok(())
}

/// CRC-32C (reflected polynomial 0x82F63B78) of `bytes`, continuing from `crc`, without the
/// final inversion, as the CRC32 instruction computes it.
pub fn crc32c(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    crc
}

/// The handler of an SSE4.2 string comparison or CRC32.
pub fn select(inst: &Instruction) -> Option<Handler> {
    use Mnemonic::*;
    let handler: Handler = match inst.mnemonic() {
        Pcmpestri | Pcmpestri64 => string_compare::<true, false>,
        Pcmpestrm | Pcmpestrm64 => string_compare::<true, true>,
        Pcmpistri => string_compare::<false, false>,
        Pcmpistrm => string_compare::<false, true>,
        Crc32 => {
            let size = if inst.op_kind(1) == OpKind::Register {
                inst.op1_register().size()
            } else {
                inst.memory_size().size()
            };
            match size {
                1 => crc32::<1>,
                2 => crc32::<2>,
                4 => crc32::<4>,
                _ => crc32::<8>,
            }
        }
        _ => return None,
    };
    Some(handler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C of "123456789" is 0xE3069283 (initial and final inversion).
        assert_eq!(!crc32c(!0, b"123456789"), 0xe306_9283);
    }

    #[test]
    fn equal_any_finds_the_first_matching_byte() {
        // strcspn-style: which bytes of b are in the set a = {'a', 'b'}?
        let control = Control::new(0x00);
        let a = u128::from_le_bytes(*b"ab\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let b = u128::from_le_bytes(*b"xxbxa\0yyyyyyyyyy");
        let len_a = control.implicit_length(a);
        let len_b = control.implicit_length(b);
        assert_eq!((len_a, len_b), (2, 5));
        let outcome = compare(control, a, len_a, b, len_b);
        assert_eq!(outcome.result, 0b10100);
        assert_eq!(outcome.flags, flags::CF | flags::ZF | flags::SF);
    }

    #[test]
    fn equal_ordered_finds_a_substring() {
        let control = Control::new(0x0c);
        let needle = u128::from_le_bytes(*b"lo\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let hay = u128::from_le_bytes(*b"hello world\0\0\0\0\0");
        let outcome = compare(
            control,
            needle,
            control.implicit_length(needle),
            hay,
            control.implicit_length(hay),
        );
        assert_eq!(outcome.result.trailing_zeros(), 3);
    }

    #[test]
    fn negative_polarity_masks_only_valid_elements() {
        let control = Control::new(0x38);
        // Equal each, masked negative: a byte differs where the strings differ.
        let a = u128::from_le_bytes(*b"abcd\0\0\0\0\0\0\0\0\0\0\0\0");
        let b = u128::from_le_bytes(*b"abXd\0\0\0\0\0\0\0\0\0\0\0\0");
        let outcome = compare(control, a, 4, b, 4);
        // Past the end both strings are "equal" and stay so.
        assert_eq!(outcome.result, 0xfff4);
    }
}
