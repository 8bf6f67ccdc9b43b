//! A decoded instruction ready to execute, and operand access shared by the handlers.

use iced_x86::{Instruction, OpKind, Register};

use super::{Cpu, Event};

/// Executes one instruction. RIP already points at the next instruction; on an exception
/// the caller rewinds it.
pub type Handler = fn(&mut Cpu, &Op) -> Result<(), Event>;

/// A decoded instruction with its handler and pre-resolved operands.
#[derive(Clone)]
pub struct Op {
    pub handler: Handler,
    pub inst: Instruction,
    /// Memory operand: base and index register slots (16 = none, reads as zero), index
    /// scale as a shift, segment index (6 = none), address-size mask.
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub seg: u8,
    pub addr_mask: u64,
    /// Register operands 0..4: GPR slot (bit 4 = high byte register AH..BH), XMM number,
    /// segment index, or 0xff.
    pub r: [u8; 4],
}

/// The handler `f::<.., B, ..>` for an operand size of `size` bytes (1, 2, 4, else 8): the
/// size takes the place of the `_` among the const arguments.
macro_rules! by_size {
    // Arguments before the size are literals (`true`) or constants (`ADD`).
    ($size:expr, $f:ident::<$($pre:literal,)* _ $(, $post:tt)*>) => {
        by_size!(@ $size, $f, [$($pre),*], [$($post),*])
    };
    ($size:expr, $f:ident::<$($pre:ident,)* _ $(, $post:tt)*>) => {
        by_size!(@ $size, $f, [$($pre),*], [$($post),*])
    };
    (@ $size:expr, $f:ident, [$($pre:tt),*], [$($post:tt),*]) => {
        match $size {
            1 => $f::<$($pre,)* 1 $(, $post)*> as $crate::cpu::op::Handler,
            2 => $f::<$($pre,)* 2 $(, $post)*>,
            4 => $f::<$($pre,)* 4 $(, $post)*>,
            _ => $f::<$($pre,)* 8 $(, $post)*>,
        }
    };
}

/// As `by_size!` for instructions without a byte form (2, 4, else 8 bytes).
macro_rules! by_word_size {
    ($size:expr, $f:ident::<$($pre:literal,)* _ $(, $post:tt)*>) => {
        by_word_size!(@ $size, $f, [$($pre),*], [$($post),*])
    };
    ($size:expr, $f:ident::<$($pre:ident,)* _ $(, $post:tt)*>) => {
        by_word_size!(@ $size, $f, [$($pre),*], [$($post),*])
    };
    (@ $size:expr, $f:ident, [$($pre:tt),*], [$($post:tt),*]) => {
        match $size {
            2 => $f::<$($pre,)* 2 $(, $post)*> as $crate::cpu::op::Handler,
            4 => $f::<$($pre,)* 4 $(, $post)*>,
            _ => $f::<$($pre,)* 8 $(, $post)*>,
        }
    };
}

pub(crate) use {by_size, by_word_size};

/// Where an operand comes from, resolved at decode time.
pub const REG: u8 = 0;
pub const MEM: u8 = 1;
pub const IMM: u8 = 2;

/// GPR slot used for "no register" (always zero).
pub const NO_REG: u8 = 16;
/// Bit of a register reference selecting AH/CH/DH/BH.
pub const HIGH_BYTE: u8 = 0x10;

/// The mask of a `B`-byte operand.
#[inline(always)]
pub const fn mask<const B: usize>() -> u64 {
    if B >= 8 {
        u64::MAX
    } else {
        (1u64 << (B * 8)) - 1
    }
}

/// The sign bit of a `B`-byte operand.
#[inline(always)]
pub const fn sign<const B: usize>() -> u64 {
    1u64 << (B * 8 - 1)
}

/// Sign-extends a `B`-byte value to 64 bits.
#[inline(always)]
pub const fn sign_extend<const B: usize>(value: u64) -> u64 {
    let shift = 64 - B * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// Maps a register to the slot/number stored in `Op::r`.
pub fn register_ref(reg: Register) -> u8 {
    let n = reg as u32;
    let al = Register::AL as u32;
    let ax = Register::AX as u32;
    let eax = Register::EAX as u32;
    let rax = Register::RAX as u32;
    let xmm0 = Register::XMM0 as u32;
    let es = Register::ES as u32;
    let st0 = Register::ST0 as u32;
    let mm0 = Register::MM0 as u32;
    let cr0 = Register::CR0 as u32;
    let dr0 = Register::DR0 as u32;
    let v = if (al..al + 20).contains(&n) {
        let i = n - al;
        match i {
            4..=7 => (i - 4) | u32::from(HIGH_BYTE),
            8..=19 => i - 4,
            _ => i,
        }
    } else if (ax..ax + 16).contains(&n) {
        n - ax
    } else if (eax..eax + 16).contains(&n) {
        n - eax
    } else if (rax..rax + 16).contains(&n) {
        n - rax
    } else if (xmm0..xmm0 + 32).contains(&n) {
        n - xmm0
    } else if (es..es + 6).contains(&n) {
        n - es
    } else if (st0..st0 + 8).contains(&n) {
        n - st0
    } else if (mm0..mm0 + 8).contains(&n) {
        n - mm0
    } else if (cr0..cr0 + 16).contains(&n) {
        n - cr0
    } else if (dr0..dr0 + 16).contains(&n) {
        n - dr0
    } else {
        0xff
    };
    v as u8
}

/// Maps a base/index register to a GPR slot (RIP-relative addresses are already absolute).
fn address_register(reg: Register) -> u8 {
    match reg {
        Register::None | Register::RIP | Register::EIP => NO_REG,
        r => register_ref(r) & 0xf,
    }
}

impl Op {
    /// Resolves the operands of `inst` for `handler`.
    pub fn new(inst: Instruction, handler: Handler) -> Self {
        let mut r = [0xff; 4];
        for (i, slot) in r
            .iter_mut()
            .enumerate()
            .take((inst.op_count() as usize).min(4))
        {
            if inst.op_kind(i as u32) == OpKind::Register {
                *slot = register_ref(inst.op_register(i as u32));
            }
        }
        let seg = match inst.memory_segment() {
            Register::FS => super::seg::FS as u8,
            Register::GS => super::seg::GS as u8,
            Register::None => 6,
            other => register_ref(other),
        };
        let addr_mask = if is_addr32(&inst) {
            0xffff_ffff
        } else {
            u64::MAX
        };
        Op {
            handler,
            inst,
            base: address_register(inst.memory_base()),
            index: address_register(inst.memory_index()),
            scale: inst.memory_index_scale().trailing_zeros() as u8,
            seg,
            addr_mask,
            r,
        }
    }

    /// Whether operand `n` is in memory.
    #[inline(always)]
    pub fn is_memory(&self, n: u32) -> bool {
        self.inst.op_kind(n) == OpKind::Memory
    }
}

/// Whether an instruction uses 32-bit addressing (0x67 prefix), including string
/// instructions whose operands are implicit.
pub fn is_addr32(inst: &Instruction) -> bool {
    (0..inst.op_count()).any(|i| {
        matches!(
            inst.op_kind(i),
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI
        )
    }) || inst.memory_base().size() == 4
        || inst.memory_index().size() == 4
}

impl Cpu {
    /// Effective linear address of the memory operand.
    #[inline(always)]
    pub fn ea(&self, op: &Op) -> u64 {
        let a = op
            .inst
            .memory_displacement64()
            .wrapping_add(self.arch.regs[op.base as usize & 31])
            .wrapping_add(self.arch.regs[op.index as usize & 31] << op.scale);
        (a & op.addr_mask).wrapping_add(self.mmu.seg_base[op.seg as usize & 7])
    }

    /// Reads a `B`-byte general-purpose register.
    #[inline(always)]
    pub fn gpr<const B: usize>(&self, r: u8) -> u64 {
        let value = self.arch.regs[r as usize & 15];
        if B == 1 {
            (value >> (((r >> 4) & 1) * 8)) & 0xff
        } else {
            value & mask::<B>()
        }
    }

    /// Writes a `B`-byte general-purpose register (32-bit writes zero the upper half).
    #[inline(always)]
    pub fn set_gpr<const B: usize>(&mut self, r: u8, value: u64) {
        let slot = &mut self.arch.regs[r as usize & 15];
        match B {
            1 => {
                let shift = ((r >> 4) & 1) * 8;
                *slot = (*slot & !(0xff << shift)) | ((value & 0xff) << shift);
            }
            2 => *slot = (*slot & !0xffff) | (value & 0xffff),
            4 => *slot = value & 0xffff_ffff,
            _ => *slot = value,
        }
    }

    /// Reads operand `n` as `B` bytes when its kind (`REG`, `MEM` or `IMM`) is fixed at
    /// decode time, as a handler's const parameter.
    #[inline(always)]
    pub fn source<const B: usize, const KIND: u8>(
        &mut self,
        op: &Op,
        n: u32,
    ) -> Result<u64, Event> {
        match KIND {
            REG => Ok(self.gpr::<B>(op.r[n as usize & 3])),
            IMM => Ok(op.inst.immediate(n) & mask::<B>()),
            _ => {
                let addr = self.ea(op);
                self.read::<B>(addr)
            }
        }
    }

    /// Reads operand `n` (register, memory or immediate) as `B` bytes.
    #[inline(always)]
    pub fn read_operand<const B: usize>(&mut self, op: &Op, n: u32) -> Result<u64, Event> {
        match op.inst.op_kind(n) {
            OpKind::Register => Ok(self.gpr::<B>(op.r[n as usize & 3])),
            OpKind::Memory => {
                let addr = self.ea(op);
                self.read::<B>(addr)
            }
            _ => Ok(op.inst.immediate(n) & mask::<B>()),
        }
    }

    /// Pushes a `B`-byte value.
    #[inline(always)]
    pub fn push<const B: usize>(&mut self, value: u64) -> Result<(), Event> {
        let rsp = self.arch.regs[super::gpr::RSP].wrapping_sub(B as u64);
        self.stack_write::<B>(rsp, value)?;
        self.arch.regs[super::gpr::RSP] = rsp;
        Ok(())
    }

    /// Pops a `B`-byte value.
    #[inline(always)]
    pub fn pop<const B: usize>(&mut self) -> Result<u64, Event> {
        let rsp = self.arch.regs[super::gpr::RSP];
        let value = self.stack_read::<B>(rsp)?;
        self.arch.regs[super::gpr::RSP] = rsp.wrapping_add(B as u64);
        Ok(value)
    }
}

/// The kind (REG/MEM/IMM) of operand `n`.
pub fn kind(inst: &Instruction, n: u32) -> u8 {
    match inst.op_kind(n) {
        OpKind::Register => REG,
        OpKind::Memory => MEM,
        _ => IMM,
    }
}

/// Operand size in bytes of operand 0.
pub fn size0(inst: &Instruction) -> usize {
    match inst.op_kind(0) {
        OpKind::Register => inst.op0_register().size(),
        _ => inst.memory_size().size(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_registers_map_to_slots() {
        assert_eq!(register_ref(Register::AL), 0);
        assert_eq!(register_ref(Register::BH), 3 | HIGH_BYTE);
        assert_eq!(register_ref(Register::SPL), 4);
        assert_eq!(register_ref(Register::DIL), 7);
        assert_eq!(register_ref(Register::R8L), 8);
        assert_eq!(register_ref(Register::R15L), 15);
        assert_eq!(register_ref(Register::R9W), 9);
        assert_eq!(register_ref(Register::R10D), 10);
        assert_eq!(register_ref(Register::R11), 11);
        assert_eq!(register_ref(Register::XMM13), 13);
    }
}
