//! RFLAGS with lazily computed arithmetic flags.
//!
//! Most instructions set all six arithmetic flags (CF, PF, AF, ZF, SF, OF) and most of those
//! flags are overwritten before anything reads them. So an arithmetic instruction only records
//! what it did (the operation, operand size, operands and result); a flag is computed when a
//! `jcc`, `setcc`, `pushf`, ... reads it, and the common conditions after `cmp`/`sub`/`test`
//! are evaluated straight from the recorded operands.

/// Carry flag.
pub const CF: u64 = 1 << 0;
/// Always-one bit 1.
pub const FIXED: u64 = 1 << 1;
/// Parity flag.
pub const PF: u64 = 1 << 2;
/// Auxiliary (BCD) carry flag.
pub const AF: u64 = 1 << 4;
/// Zero flag.
pub const ZF: u64 = 1 << 6;
/// Sign flag.
pub const SF: u64 = 1 << 7;
/// Trap flag.
pub const TF: u64 = 1 << 8;
/// Interrupt enable flag.
pub const IF: u64 = 1 << 9;
/// Direction flag.
pub const DF: u64 = 1 << 10;
/// Overflow flag.
pub const OF: u64 = 1 << 11;
/// I/O privilege level (two bits).
pub const IOPL: u64 = 3 << 12;
/// Nested task.
pub const NT: u64 = 1 << 14;
/// Resume flag.
pub const RF: u64 = 1 << 16;
/// Virtual-8086 mode.
pub const VM: u64 = 1 << 17;
/// Alignment check.
pub const AC: u64 = 1 << 18;
/// Virtual interrupt flag.
pub const VIF: u64 = 1 << 19;
/// Virtual interrupt pending.
pub const VIP: u64 = 1 << 20;
/// CPUID available.
pub const ID: u64 = 1 << 21;

/// The six flags computed lazily.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
/// Every bit software can change through POPF at CPL 0 (VM and RF are never set by POPF).
pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | AC | VIF | VIP | ID;

/// What the last flag-setting instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlagOp {
    /// The arithmetic flags are in `Flags::bits`.
    Materialized,
    /// `res = a + b`.
    Add,
    /// `res = a + b + carry` (carry in `aux`).
    Adc,
    /// `res = a - b` (also CMP and NEG with `a = 0`).
    Sub,
    /// `res = a - b - carry` (carry in `aux`).
    Sbb,
    /// AND/OR/XOR/TEST: CF = OF = AF = 0.
    Logic,
    /// `res = a + 1`; CF is the old CF (in `aux`).
    Inc,
    /// `res = a - 1`; CF is the old CF (in `aux`).
    Dec,
    /// ZF/SF/PF from `res`; CF, OF and AF are bits 0, 1 and 2 of `aux` (shifts, multiplies).
    Custom,
}

/// RFLAGS: the non-arithmetic bits always live in `bits`; the arithmetic ones are in `bits`
/// only when `op` is [`FlagOp::Materialized`].
#[derive(Clone, Copy, Debug)]
pub struct Flags {
    pub bits: u64,
    pub op: FlagOp,
    /// Operand size in bits (8, 16, 32, 64).
    pub size: u32,
    pub res: u64,
    pub a: u64,
    pub b: u64,
    pub aux: u64,
}

impl Default for Flags {
    fn default() -> Self {
        Flags {
            bits: FIXED,
            op: FlagOp::Materialized,
            size: 64,
            res: 0,
            a: 0,
            b: 0,
            aux: 0,
        }
    }
}

/// Whether the low byte of `value` has an even number of set bits.
#[inline(always)]
pub fn parity(value: u64) -> bool {
    (value as u8).count_ones() & 1 == 0
}

impl Flags {
    /// Records an operation whose flags are computed later. Operands and result must already
    /// be truncated to `size` bits.
    #[inline(always)]
    pub fn set_lazy(&mut self, op: FlagOp, size: u32, res: u64, a: u64, b: u64) {
        self.op = op;
        self.size = size;
        self.res = res;
        self.a = a;
        self.b = b;
    }

    /// Records an INC or DEC, which keep CF.
    #[inline(always)]
    pub fn set_inc_dec(&mut self, op: FlagOp, size: u32, res: u64, a: u64) {
        let carry = self.carry();
        self.aux = carry as u64;
        self.set_lazy(op, size, res, a, 1);
    }

    /// Records a result whose CF, OF and AF are given (ZF, SF and PF come from `res`).
    #[inline(always)]
    pub fn set_custom(
        &mut self,
        size: u32,
        res: u64,
        carry: bool,
        overflow: bool,
        aux_carry: bool,
    ) {
        self.op = FlagOp::Custom;
        self.size = size;
        self.res = res;
        self.aux = u64::from(carry) | (u64::from(overflow) << 1) | (u64::from(aux_carry) << 2);
    }

    /// Records an ADC or SBB with its carry in.
    #[inline(always)]
    pub fn set_with_carry(&mut self, op: FlagOp, size: u32, res: u64, a: u64, b: u64, carry: bool) {
        self.aux = carry as u64;
        self.set_lazy(op, size, res, a, b);
    }

    /// The full RFLAGS value.
    #[inline]
    pub fn get(&self) -> u64 {
        match self.op {
            FlagOp::Materialized => self.bits,
            _ => (self.bits & !ARITH) | self.arith(),
        }
    }

    /// Replaces RFLAGS (the caller masks what may change).
    #[inline]
    pub fn set(&mut self, value: u64) {
        self.bits = (value & !(1 << 1 | 1 << 3 | 1 << 5 | 1 << 15)) | FIXED;
        self.bits &= (1 << 22) - 1;
        self.op = FlagOp::Materialized;
    }

    /// Turns the lazy state into bits (before an instruction changes only some flags).
    #[inline]
    pub fn materialize(&mut self) {
        if self.op != FlagOp::Materialized {
            self.bits = (self.bits & !ARITH) | self.arith();
            self.op = FlagOp::Materialized;
        }
    }

    /// Sets the arithmetic flags in `mask` to the ones in `value` (others unchanged).
    #[inline]
    pub fn set_arith(&mut self, mask: u64, value: u64) {
        self.materialize();
        self.bits = (self.bits & !mask) | (value & mask);
    }

    /// Sets or clears one flag.
    #[inline]
    pub fn set_flag(&mut self, flag: u64, on: bool) {
        if flag & ARITH != 0 {
            self.materialize();
        }
        if on {
            self.bits |= flag;
        } else {
            self.bits &= !flag;
        }
    }

    /// A non-arithmetic flag (IF, DF, TF, ...).
    #[inline(always)]
    pub fn system(&self, flag: u64) -> bool {
        self.bits & flag != 0
    }

    #[inline(always)]
    fn sign_bit(&self) -> u64 {
        1u64 << (self.size - 1)
    }

    /// CF.
    #[inline]
    pub fn carry(&self) -> bool {
        let (a, b, res) = (self.a, self.b, self.res);
        match self.op {
            FlagOp::Materialized => self.bits & CF != 0,
            FlagOp::Add => res < a,
            FlagOp::Adc => {
                if self.aux != 0 {
                    res <= a
                } else {
                    res < a
                }
            }
            FlagOp::Sub => a < b,
            FlagOp::Sbb => {
                if self.aux != 0 {
                    a <= b
                } else {
                    a < b
                }
            }
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.aux != 0,
            FlagOp::Custom => self.aux & 1 != 0,
        }
    }

    #[inline]
    fn zero(&self) -> bool {
        match self.op {
            FlagOp::Materialized => self.bits & ZF != 0,
            _ => self.res == 0,
        }
    }

    #[inline]
    fn sign(&self) -> bool {
        match self.op {
            FlagOp::Materialized => self.bits & SF != 0,
            _ => self.res & self.sign_bit() != 0,
        }
    }

    #[inline]
    fn overflow(&self) -> bool {
        let (a, b, res) = (self.a, self.b, self.res);
        let sign = self.sign_bit();
        match self.op {
            FlagOp::Materialized => self.bits & OF != 0,
            FlagOp::Add | FlagOp::Adc | FlagOp::Inc => (a ^ res) & (b ^ res) & sign != 0,
            FlagOp::Sub | FlagOp::Sbb | FlagOp::Dec => (a ^ b) & (a ^ res) & sign != 0,
            FlagOp::Logic => false,
            FlagOp::Custom => self.aux & 2 != 0,
        }
    }

    #[inline]
    fn parity_flag(&self) -> bool {
        match self.op {
            FlagOp::Materialized => self.bits & PF != 0,
            _ => parity(self.res),
        }
    }

    #[inline]
    fn aux_carry(&self) -> bool {
        match self.op {
            FlagOp::Materialized => self.bits & AF != 0,
            FlagOp::Logic => false,
            FlagOp::Custom => self.aux & 4 != 0,
            _ => (self.a ^ self.b ^ self.res) & 0x10 != 0,
        }
    }

    fn arith(&self) -> u64 {
        let mut f = 0;
        if self.carry() {
            f |= CF;
        }
        if self.parity_flag() {
            f |= PF;
        }
        if self.aux_carry() {
            f |= AF;
        }
        if self.zero() {
            f |= ZF;
        }
        if self.sign() {
            f |= SF;
        }
        if self.overflow() {
            f |= OF;
        }
        f
    }

    /// Evaluates condition code `cc` (the low nibble of a Jcc/SETcc/CMOVcc opcode: 0 = O,
    /// 1 = NO, 2 = B, ..., 15 = G).
    #[inline(always)]
    pub fn condition(&self, cc: u8) -> bool {
        let negate = cc & 1 != 0;
        let sign = self.sign_bit();
        let value = match (self.op, cc >> 1) {
            (FlagOp::Sub, 1) => self.a < self.b,
            (FlagOp::Sub, 2) | (FlagOp::Logic, 2) => self.res == 0,
            (FlagOp::Sub, 3) => self.a <= self.b,
            (FlagOp::Sub, 6) => (self.a ^ sign) < (self.b ^ sign),
            (FlagOp::Sub, 7) => (self.a ^ sign) <= (self.b ^ sign),
            (FlagOp::Logic, 1) => false,
            (FlagOp::Logic, 3) => self.res == 0,
            (FlagOp::Logic, 4) | (FlagOp::Logic, 6) => self.res & sign != 0,
            (FlagOp::Logic, 7) => self.res == 0 || self.res & sign != 0,
            (_, 0) => self.overflow(),
            (_, 1) => self.carry(),
            (_, 2) => self.zero(),
            (_, 3) => self.carry() || self.zero(),
            (_, 4) => self.sign(),
            (_, 5) => self.parity_flag(),
            (_, 6) => self.sign() != self.overflow(),
            _ => self.zero() || self.sign() != self.overflow(),
        };
        value != negate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size_mask(bits: u32) -> u64 {
        if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    fn eager(op: FlagOp, size: u32, a: u64, b: u64, carry: bool) -> (u64, u64) {
        let mask = size_mask(size);
        let (res, wide) = match op {
            FlagOp::Add => (a.wrapping_add(b) & mask, a as u128 + b as u128),
            FlagOp::Adc => {
                let w = a as u128 + b as u128 + carry as u128;
                (w as u64 & mask, w)
            }
            FlagOp::Sub => (a.wrapping_sub(b) & mask, 0),
            FlagOp::Sbb => (a.wrapping_sub(b).wrapping_sub(carry as u64) & mask, 0),
            _ => unreachable!(),
        };
        let mut f = 0;
        let cf = match op {
            FlagOp::Add | FlagOp::Adc => wide > mask as u128,
            FlagOp::Sub => a < b,
            _ => (a as u128) < b as u128 + carry as u128,
        };
        if cf {
            f |= CF;
        }
        let sa = ((a << (64 - size)) as i64 >> (64 - size)) as i128;
        let sb = ((b << (64 - size)) as i64 >> (64 - size)) as i128;
        let sr = match op {
            FlagOp::Add => sa + sb,
            FlagOp::Adc => sa + sb + carry as i128,
            FlagOp::Sub => sa - sb,
            _ => sa - sb - carry as i128,
        };
        let min = -(1i128 << (size - 1));
        let max = (1i128 << (size - 1)) - 1;
        if sr < min || sr > max {
            f |= OF;
        }
        if res == 0 {
            f |= ZF;
        }
        if res >> (size - 1) & 1 == 1 {
            f |= SF;
        }
        if parity(res) {
            f |= PF;
        }
        if (a ^ b ^ res) & 0x10 != 0 {
            f |= AF;
        }
        (res, f)
    }

    #[test]
    fn lazy_flags_match_an_eager_model() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let specials = [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff_ffff,
            u64::MAX,
            1 << 63,
        ];
        for size in [8u32, 16, 32, 64] {
            let mask = size_mask(size);
            for i in 0..4000 {
                let a = if i % 3 == 0 {
                    specials[i % specials.len()]
                } else {
                    next()
                } & mask;
                let b = if i % 5 == 0 {
                    specials[(i / 5) % specials.len()]
                } else {
                    next()
                } & mask;
                let carry = next() & 1 == 1;
                for op in [FlagOp::Add, FlagOp::Adc, FlagOp::Sub, FlagOp::Sbb] {
                    let (res, want) = eager(op, size, a, b, carry);
                    let mut flags = Flags::default();
                    flags.set_with_carry(op, size, res, a, b, carry);
                    assert_eq!(
                        flags.get() & ARITH,
                        want,
                        "{op:?} size {size} a {a:#x} b {b:#x} c {carry}"
                    );
                    for cc in 0..16u8 {
                        let mut m = Flags::default();
                        m.set(want);
                        assert_eq!(
                            flags.condition(cc),
                            m.condition(cc),
                            "{op:?} cc {cc} a {a:#x} b {b:#x}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn logic_conditions_match_materialized_flags() {
        for res in [0u64, 1, 0x80, 0xff, 0x7f] {
            let mut flags = Flags::default();
            flags.set_lazy(FlagOp::Logic, 8, res, 0, 0);
            let mut m = Flags::default();
            m.set(flags.get());
            assert_eq!(flags.get() & (CF | OF | AF), 0);
            for cc in 0..16u8 {
                assert_eq!(flags.condition(cc), m.condition(cc), "res {res:#x} cc {cc}");
            }
        }
    }

    #[test]
    fn inc_keeps_carry() {
        let mut flags = Flags::default();
        flags.set(CF);
        flags.set_inc_dec(FlagOp::Inc, 8, 0, 0xff);
        assert_eq!(flags.get() & (CF | ZF | OF), CF | ZF);
        flags.set_inc_dec(FlagOp::Dec, 8, 0x7f, 0x80);
        assert_eq!(flags.get() & (CF | OF | SF), CF | OF);
    }
}
