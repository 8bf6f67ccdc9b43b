//! Random test cases: an instruction form (iced `Code`) with random operands, and a random
//! machine state that keeps its memory operands inside the test data (or just across the
//! guard page, to test faults).

use iced_x86::{
    Code, Encoder, EncodingKind, Instruction, MemorySize, Mnemonic, OpCodeOperandKind as K, OpKind,
    Register,
};

use super::native::*;

/// Deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A value with the boundary cases instructions get wrong most often.
    pub fn interesting(&mut self) -> u64 {
        const SPECIAL: [u64; 14] = [
            0,
            1,
            2,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000_0000_0000,
        ];
        match self.below(8) {
            0 => SPECIAL[self.below(SPECIAL.len() as u64) as usize],
            1 => u64::MAX - self.below(4),
            2 => self.below(64),
            3 => self.next() & 0xffff_ffff,
            _ => self.next(),
        }
    }
}

/// Base register, optional (index register, scale), displacement.
type MemoryOperand = (usize, Option<(usize, u32)>, i64);

/// A generated test.
pub struct Case {
    pub inst: Instruction,
    pub bytes: Vec<u8>,
    pub state: MachineState,
}

const GPR64: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn gpr(size: usize, index: usize, high: bool) -> Register {
    let full = GPR64[index];
    match size {
        8 => full,
        4 => full.full_register32(),
        2 => reg_at(Register::AX as u32 as usize + index),
        _ if high && index < 4 => reg_at(Register::AH as u32 as usize + index),
        _ => match index {
            0..=3 => reg_at(Register::AL as u32 as usize + index),
            4..=7 => reg_at(Register::SPL as u32 as usize + index - 4),
            _ => reg_at(Register::R8L as u32 as usize + index - 8),
        },
    }
}

fn reg_at(i: usize) -> Register {
    Register::values().nth(i).unwrap()
}

/// Registers whose values the generator sets for addressing; not picked as random operands
/// in a way that breaks that (RSP is never an explicit operand).
struct Reserved {
    regs: Vec<usize>,
}

fn random_gpr_index(rng: &mut Rng, reserved: &Reserved) -> usize {
    loop {
        let i = rng.below(16) as usize;
        if i != 4 && !reserved.regs.contains(&i) {
            return i;
        }
    }
}

/// Generates one case for `code`, or None if the form cannot be tested this way.
pub fn generate(code: Code, rng: &mut Rng) -> Option<Case> {
    for _ in 0..20 {
        if let Some(case) = try_generate(code, rng) {
            return Some(case);
        }
    }
    None
}

/// MOVS/STOS/LODS/CMPS/SCAS (MOVSD and CMPSD only by `Code`: the names are shared with SSE2).
pub fn is_string(mnemonic: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        mnemonic,
        Movsb
            | Movsw
            | Movsq
            | Stosb
            | Stosw
            | Stosd
            | Stosq
            | Lodsb
            | Lodsw
            | Lodsd
            | Lodsq
            | Cmpsb
            | Cmpsw
            | Cmpsq
            | Scasb
            | Scasw
            | Scasd
            | Scasq
    )
}

fn try_generate(code: Code, rng: &mut Rng) -> Option<Case> {
    let info = code.op_code();
    if !info.mode64() || info.encoding() != EncodingKind::Legacy {
        return None;
    }
    let mnemonic = code.mnemonic();
    let string = is_string(mnemonic) || matches!(code, Code::Movsd_m32_m32 | Code::Cmpsd_m32_m32);
    let mut reserved = Reserved { regs: vec![] };
    if string {
        reserved.regs.extend([1, 6, 7]);
    }
    if mnemonic == Mnemonic::Xlatb {
        reserved.regs.push(3);
    }
    // Registers the fixups below overwrite must not address memory.
    if (0..info.op_count()).any(|n| info.op_kind(n) == K::cl) {
        reserved.regs.push(1);
    }
    if matches!(mnemonic, Mnemonic::Div | Mnemonic::Idiv) || is_string_compare(mnemonic) {
        reserved.regs.extend([0, 2]);
    }
    let mut inst = Instruction::default();
    inst.set_code(code);
    let mut memory: Option<MemoryOperand> = None;
    let mut uses_high_byte = false;
    let mut needs_rex = false;
    for n in 0..info.op_count() {
        let kind = info.op_kind(n);
        let reg_size = match kind {
            K::r8_reg | K::r8_opcode | K::r8_or_mem => Some(1),
            K::r16_reg | K::r16_rm | K::r16_opcode | K::r16_reg_mem | K::r16_or_mem => Some(2),
            K::r32_reg | K::r32_rm | K::r32_opcode | K::r32_reg_mem | K::r32_or_mem => Some(4),
            K::r64_reg | K::r64_rm | K::r64_opcode | K::r64_reg_mem | K::r64_or_mem => Some(8),
            _ => None,
        };
        let or_mem = matches!(
            kind,
            K::r8_or_mem
                | K::r16_or_mem
                | K::r32_or_mem
                | K::r64_or_mem
                | K::xmm_or_mem
                | K::mm_or_mem
        );
        if (or_mem && rng.chance(50)) || kind == K::mem {
            // Memory operand.
            let base = random_gpr_index(rng, &reserved);
            reserved.regs.push(base);
            let index = if rng.chance(40) {
                let i = random_gpr_index(rng, &reserved);
                reserved.regs.push(i);
                Some((i, [1, 2, 4, 8][rng.below(4) as usize]))
            } else {
                None
            };
            let disp = match rng.below(3) {
                0 => 0,
                1 => rng.below(256) as i64 - 128,
                _ => rng.below(0x1000) as i64 - 0x800,
            };
            inst.set_op_kind(n, OpKind::Memory);
            inst.set_memory_base(GPR64[base]);
            if let Some((i, scale)) = index {
                inst.set_memory_index(GPR64[i]);
                inst.set_memory_index_scale(scale);
            }
            inst.set_memory_displacement64(disp as u64);
            inst.set_memory_displ_size(if disp == 0 {
                0
            } else if (-128..128).contains(&disp) {
                1
            } else {
                4
            });
            memory = Some((base, index, disp));
            continue;
        }
        if let Some(size) = reg_size {
            let index = random_gpr_index(rng, &reserved);
            let high = size == 1 && index < 4 && rng.chance(30);
            uses_high_byte |= high;
            needs_rex |= index >= 8 || (size == 1 && (4..8).contains(&index) && !high);
            inst.set_op_kind(n, OpKind::Register);
            inst.set_op_register(n, gpr(size, index, high));
            continue;
        }
        match kind {
            K::xmm_reg | K::xmm_rm | K::xmm_or_mem => {
                inst.set_op_kind(n, OpKind::Register);
                inst.set_op_register(
                    n,
                    reg_at(Register::XMM0 as u32 as usize + rng.below(16) as usize),
                );
            }
            K::mm_reg | K::mm_rm | K::mm_or_mem => {
                inst.set_op_kind(n, OpKind::Register);
                inst.set_op_register(
                    n,
                    reg_at(Register::MM0 as u32 as usize + rng.below(8) as usize),
                );
            }
            K::al | K::cl | K::ax | K::dx | K::eax | K::rax => {
                let r = match kind {
                    K::al => Register::AL,
                    K::cl => Register::CL,
                    K::ax => Register::AX,
                    K::dx => Register::DX,
                    K::eax => Register::EAX,
                    _ => Register::RAX,
                };
                inst.set_op_kind(n, OpKind::Register);
                inst.set_op_register(n, r);
            }
            K::imm8 => {
                inst.set_op_kind(n, OpKind::Immediate8);
                inst.set_immediate8(rng.next() as u8);
            }
            K::imm8_const_1 => {
                inst.set_op_kind(n, OpKind::Immediate8);
                inst.set_immediate8(1);
            }
            K::imm8sex16 => {
                inst.set_op_kind(n, OpKind::Immediate8to16);
                inst.set_immediate8to16(rng.next() as i8 as i16);
            }
            K::imm8sex32 => {
                inst.set_op_kind(n, OpKind::Immediate8to32);
                inst.set_immediate8to32(rng.next() as i8 as i32);
            }
            K::imm8sex64 => {
                inst.set_op_kind(n, OpKind::Immediate8to64);
                inst.set_immediate8to64(rng.next() as i8 as i64);
            }
            K::imm16 => {
                inst.set_op_kind(n, OpKind::Immediate16);
                inst.set_immediate16(rng.interesting() as u16);
            }
            K::imm32 => {
                inst.set_op_kind(n, OpKind::Immediate32);
                inst.set_immediate32(rng.interesting() as u32);
            }
            K::imm32sex64 => {
                inst.set_op_kind(n, OpKind::Immediate32to64);
                inst.set_immediate32to64(rng.interesting() as i32 as i64);
            }
            K::imm64 => {
                inst.set_op_kind(n, OpKind::Immediate64);
                inst.set_immediate64(rng.interesting());
            }
            K::st0 => {
                inst.set_op_kind(n, OpKind::Register);
                inst.set_op_register(n, Register::ST0);
            }
            K::sti_opcode => {
                inst.set_op_kind(n, OpKind::Register);
                inst.set_op_register(
                    n,
                    reg_at(Register::ST0 as u32 as usize + rng.below(8) as usize),
                );
            }
            K::seg_rSI => inst.set_op_kind(n, OpKind::MemorySegRSI),
            K::es_rDI => inst.set_op_kind(n, OpKind::MemoryESRDI),
            K::seg_rDI => inst.set_op_kind(n, OpKind::MemorySegRDI),
            K::seg_rBX_al => {
                inst.set_op_kind(n, OpKind::Memory);
                inst.set_memory_base(Register::RBX);
                inst.set_memory_index(Register::AL);
                inst.set_memory_index_scale(1);
            }
            _ => return None,
        }
    }
    if uses_high_byte && needs_rex {
        return None;
    }
    if string {
        if info.can_use_rep_prefix() && rng.chance(60) {
            inst.set_has_rep_prefix(true);
        } else if info.can_use_repne_prefix() && rng.chance(40) {
            inst.set_has_repne_prefix(true);
        }
    }
    if matches!(mnemonic, Mnemonic::Shld | Mnemonic::Shrd)
        && inst.op_kind(2) == OpKind::Immediate8
        && info.op_kind(0) != K::r32_or_mem
        && info.op_kind(0) != K::r64_or_mem
    {
        // SHLD/SHRD of 16-bit operands by more than 16 is undefined.
        inst.set_immediate8(rng.below(17) as u8);
    }
    if memory.is_some() && info.can_use_lock_prefix() && rng.chance(30) {
        inst.set_has_lock_prefix(true);
    }
    let mut encoder = Encoder::new(64);
    encoder.encode(&inst, INSN).ok()?;
    let bytes = encoder.take_buffer();
    // Decode back so the instruction carries everything the decoder would set.
    let mut decoder = iced_x86::Decoder::with_ip(64, &bytes, INSN, iced_x86::DecoderOptions::NONE);
    let decoded = decoder.decode();
    if decoded.is_invalid() || decoded.code() != code {
        return None;
    }

    let mut regs = [0u64; 16];
    for r in regs.iter_mut() {
        *r = rng.interesting();
    }
    regs[4] = STACK + 0x1000 + (rng.below(0x100) * 8);
    let mut rflags = 0x202 | (rng.next() & 0x8d5);
    if string {
        let backwards = rng.chance(30);
        if backwards {
            rflags |= 0x400;
        }
        regs[1] = if decoded.has_rep_prefix() || decoded.has_repne_prefix() {
            rng.below(40)
        } else {
            rng.next()
        };
        regs[6] = DATA + 0x600 + rng.below(0x200);
        regs[7] = DATA + 0x1000 + rng.below(0x200);
        if rng.chance(20) {
            // Make comparisons find equal data.
            regs[7] = regs[6];
        }
    }
    if matches!(mnemonic, Mnemonic::Enter | Mnemonic::Leave) {
        regs[5] = STACK + 0x1400 + rng.below(0x80) * 8;
    }
    if mnemonic == Mnemonic::Xlatb {
        regs[3] = DATA + rng.below(0x1000);
    }
    if let Some((base, index, disp)) = memory {
        let size = decoded.memory_size().size().max(1) as u64;
        let target = if rng.chance(5) {
            // Straddle the end of the data into the guard page.
            GUARD - rng.below(size.max(2) - 1) - 1
        } else {
            let offset = rng.below(DATA_SIZE - size - 64);
            if rng.chance(75) {
                DATA + (offset & !15)
            } else {
                DATA + offset
            }
        };
        let mut base_value = target.wrapping_sub(disp as u64);
        if let Some((i, scale)) = index {
            let v = rng.below(64);
            regs[i] = v;
            base_value = base_value.wrapping_sub(v * u64::from(scale));
        }
        regs[base] = base_value;
    }
    fixups(&decoded, rng, &mut regs);
    let float = is_float(&decoded);
    let mut xmm = [0u128; 16];
    for x in xmm.iter_mut() {
        let mut half = || {
            if float && rng.chance(70) {
                float_bits(rng)
            } else {
                rng.interesting()
            }
        };
        *x = (u128::from(half()) << 64) | u128::from(half());
    }
    let mut data = vec![0u8; DATA_SIZE as usize];
    for chunk in data.chunks_mut(8) {
        let v = if float && rng.chance(70) {
            float_bits(rng)
        } else {
            rng.interesting()
        }
        .to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut mxcsr = 0x1f80;
    if float && rng.chance(40) {
        // Rounding control, flush-to-zero, denormals-are-zero.
        mxcsr |= (rng.below(4) as u32) << 13;
        if rng.chance(25) {
            mxcsr |= 1 << 15;
        }
        if rng.chance(25) {
            mxcsr |= 1 << 6;
        }
    }
    if is_string_compare(mnemonic) && rng.chance(70) {
        // Short strings over a small alphabet, so elements match, terminate and order.
        for x in xmm.iter_mut() {
            *x = string_bytes(rng);
        }
        for chunk in data.chunks_mut(16) {
            let v = string_bytes(rng).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        for r in [0, 2] {
            if !reserved.regs.contains(&r) {
                regs[r] = (rng.below(40) as i64 - 20) as u64;
            }
        }
    }
    let x87 = x87_state(rng);
    let mut stack = vec![0u8; STACK_SIZE as usize];
    for chunk in stack.chunks_mut(8) {
        let v = rng.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    if matches!(mnemonic, Mnemonic::Popf | Mnemonic::Popfq) {
        // Single-stepping (TF) and alignment checking (AC) are not emulated; keep them off.
        let top = (regs[4] - STACK) as usize;
        let value = u64::from_le_bytes(stack[top..top + 8].try_into().unwrap()) & !0x4_0100;
        stack[top..top + 8].copy_from_slice(&value.to_le_bytes());
    }
    Some(Case {
        inst: decoded,
        bytes,
        state: MachineState {
            regs,
            rflags,
            xmm,
            mxcsr,
            x87,
            data,
            stack,
        },
    })
}

/// Input adjustments so that more cases exercise the interesting path.
fn fixups(inst: &Instruction, rng: &mut Rng, regs: &mut [u64; 16]) {
    let size = if inst.op_count() > 0 && inst.op_kind(0) == OpKind::Register {
        inst.op0_register().size()
    } else {
        inst.memory_size().size()
    };
    match inst.mnemonic() {
        // Most random dividends overflow; often make the high half small.
        Mnemonic::Div | Mnemonic::Idiv if rng.chance(70) => {
            let negative = rng.chance(50) && inst.mnemonic() == Mnemonic::Idiv;
            if size == 1 {
                regs[0] = (regs[0] & !0xff00) | if negative { 0xff00 } else { 0 };
            } else {
                regs[2] = if negative { u64::MAX } else { 0 };
            }
        }
        // Bit offsets into memory: keep them near the operand most of the time.
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
            if inst.op_kind(0) == OpKind::Memory
                && inst.op_kind(1) == OpKind::Register
                && rng.chance(80) =>
        {
            let r = (inst.op1_register().full_register() as u32 - Register::RAX as u32) as usize;
            if !matches!(r, 4) && inst.memory_base() != inst.op1_register().full_register() {
                regs[r] = (rng.below(512) as i64 - 256) as u64;
            }
        }
        // SHLD/SHRD of 16-bit operands by more than 16 is undefined.
        Mnemonic::Shld | Mnemonic::Shrd if size == 2 && inst.op_kind(2) == OpKind::Register => {
            regs[1] = rng.below(17);
        }
        // Counts in CL (only: RCX may address memory in the other forms).
        Mnemonic::Shl
        | Mnemonic::Shr
        | Mnemonic::Sar
        | Mnemonic::Rol
        | Mnemonic::Ror
        | Mnemonic::Rcl
        | Mnemonic::Rcr
            if inst.op1_kind() == OpKind::Register
                && inst.op1_register() == Register::CL
                && rng.chance(70) =>
        {
            regs[1] = (regs[1] & !0xff) | rng.below(70);
        }
        _ => {}
    }
    let _ = MemorySize::Unknown;
}

/// PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM.
fn is_string_compare(mnemonic: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        mnemonic,
        Pcmpestri | Pcmpestri64 | Pcmpestrm | Pcmpestrm64 | Pcmpistri | Pcmpistrm
    )
}

/// 16 bytes drawn from a few letters, zero, and the sign-boundary bytes.
fn string_bytes(rng: &mut Rng) -> u128 {
    const ALPHABET: [u8; 8] = [0, b'a', b'b', b'c', b'd', 0x7f, 0x80, 0xff];
    let zero_chance = rng.below(20);
    let mut bytes = [0u8; 16];
    for b in bytes.iter_mut() {
        *b = if rng.below(100) < zero_chance {
            0
        } else {
            ALPHABET[1 + rng.below(7) as usize]
        };
    }
    u128::from_le_bytes(bytes)
}

/// Whether the instruction works on floating-point values.
fn is_float(inst: &Instruction) -> bool {
    let m = format!("{:?}", inst.mnemonic());
    m.starts_with('F')
        || m.ends_with("ps")
        || m.ends_with("pd")
        || m.ends_with("ss")
        || (m.ends_with("sd")
            && inst.code() != Code::Movsd_m32_m32
            && inst.code() != Code::Cmpsd_m32_m32)
        || m.starts_with("Cvt")
        || m.contains("comis")
}

/// Bits of a float64 (or two float32s) worth testing.
fn float_bits(rng: &mut Rng) -> u64 {
    const F64: [f64; 22] = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1.5,
        2.0,
        3.0,
        -4.5,
        0.1,
        1.0 / 3.0,
        1e10,
        -1e-10,
        2147483648.0,
        9.223_372_036_854_776e18,
        -9.223_372_036_854_776e18,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        f64::INFINITY,
        f64::NEG_INFINITY,
        123456.789,
    ];
    const F32: [f32; 16] = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        1.5,
        3.0,
        -4.5,
        0.1,
        1e10,
        2147483648.0,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45,
        f32::INFINITY,
        65504.0,
    ];
    match rng.below(6) {
        0 => F64[rng.below(F64.len() as u64) as usize].to_bits(),
        1 => {
            let a = F32[rng.below(F32.len() as u64) as usize].to_bits();
            let b = F32[rng.below(F32.len() as u64) as usize].to_bits();
            u64::from(a) | (u64::from(b) << 32)
        }
        2 => [
            0x7ff8_0000_0000_0000,
            0x7ff0_0000_0000_0001,
            0xfff8_0000_0000_0000,
            0x7fc0_0000_7f80_0001,
        ][rng.below(4) as usize],
        3 => {
            // A normal double with a moderate exponent.
            let exponent = 1023 + rng.below(80) - 40;
            (rng.next() & 0x800f_ffff_ffff_ffff) | (exponent << 52)
        }
        4 => {
            let e = 127 + rng.below(40) as u32 - 20;
            let a = (rng.next() as u32 & 0x807f_ffff) | (e << 23);
            let b = (rng.next() as u32 & 0x807f_ffff) | (e << 23);
            u64::from(a) | (u64::from(b) << 32)
        }
        _ => rng.interesting(),
    }
}

/// Converts a float64 to the 80-bit format (normals, zeros, infinities and NaNs exactly).
fn f80(v: f64) -> [u8; 10] {
    let bits = v.to_bits();
    let sign = (bits >> 63) as u16;
    let exponent = ((bits >> 52) & 0x7ff) as u16;
    let fraction = bits & 0xf_ffff_ffff_ffff;
    let (e, mantissa) = match exponent {
        0 if fraction == 0 => (0, 0),
        0 => {
            // Denormal double: value = fraction * 2^-1074; normalise.
            let lz = fraction.leading_zeros();
            ((63 - lz as i32 - 1074 + 16383) as u16, fraction << lz)
        }
        0x7ff => (0x7fff, (1 << 63) | (fraction << 11)),
        _ => (exponent + 16383 - 1023, (1 << 63) | (fraction << 11)),
    };
    let mut out = [0u8; 10];
    out[..8].copy_from_slice(&mantissa.to_le_bytes());
    out[8..].copy_from_slice(&((sign << 15) | e).to_le_bytes());
    out
}

/// A random x87 state: exceptions masked, random rounding/precision sometimes, most
/// registers valid.
fn x87_state(rng: &mut Rng) -> X87State {
    let mut fcw = 0x037f;
    if rng.chance(30) {
        fcw = 0x007f | ([0u16, 2, 3][rng.below(3) as usize] << 8) | ((rng.below(4) as u16) << 10);
    }
    let top = rng.below(8) as u16;
    let fsw = (top << 11)
        | if rng.chance(20) {
            (rng.next() as u16) & 0x4700
        } else {
            0
        };
    let mut ftw = 0u8;
    let mut st = [[0u8; 10]; 8];
    for (i, reg) in st.iter_mut().enumerate() {
        let valid = if i < 2 {
            rng.chance(90)
        } else {
            rng.chance(50)
        };
        if valid {
            ftw |= 1 << ((top as usize + i) & 7);
        }
        *reg = match rng.below(10) {
            0 => {
                let mut r = [0u8; 10];
                for b in r.iter_mut() {
                    *b = rng.next() as u8;
                }
                r
            }
            _ => f80(f64::from_bits(float_bits(rng))),
        };
    }
    X87State { fcw, fsw, ftw, st }
}
