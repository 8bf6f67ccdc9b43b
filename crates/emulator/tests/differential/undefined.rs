//! Results the architecture leaves undefined, and which of them a comparison with the host
//! may rely on.
//!
//! The engine reports `GenuineIntel` and produces what Intel CPUs produce where the manuals
//! leave a result undefined. On an Intel host the test therefore compares those results too
//! (only what iced-x86 marks undefined for every input is skipped), so the engine keeps
//! matching the vendor it claims to be. On any other host every architecturally undefined
//! result is skipped: the host is not the reference for them.
//!
//! iced-x86 knows what an instruction form leaves undefined whatever its inputs; what depends
//! on the inputs (a shift count, a zero source) is worked out here, from the Intel SDM's
//! pseudocode.

use iced_x86::{Instruction, Mnemonic, OpKind, Register, RflagsBits};

use super::generate::Case;

/// A CPU vendor, from CPUID leaf 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

impl Vendor {
    /// The vendor of the CPU this test runs on.
    pub fn of_host() -> Vendor {
        let leaf = std::arch::x86_64::__cpuid(0);
        let mut id = Vec::with_capacity(12);
        for register in [leaf.ebx, leaf.edx, leaf.ecx] {
            id.extend_from_slice(&register.to_le_bytes());
        }
        match &id[..] {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" => Vendor::Amd,
            _ => Vendor::Other,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Vendor::Intel => {
                "GenuineIntel (compared with what Intel does where the architecture is silent)"
            }
            Vendor::Amd => "AuthenticAMD (architecturally undefined results not compared)",
            Vendor::Other => "not Intel or AMD (architecturally undefined results not compared)",
        }
    }
}

/// RFLAGS bits.
pub mod flag {
    pub const CF: u64 = 0x1;
    pub const PF: u64 = 0x4;
    pub const AF: u64 = 0x10;
    pub const ZF: u64 = 0x40;
    pub const SF: u64 = 0x80;
    pub const OF: u64 = 0x800;
    pub const ARITHMETIC: u64 = CF | PF | AF | ZF | SF | OF;
}

/// What is not compared for one case.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ignored {
    /// RFLAGS bits.
    pub flags: u64,
    /// The destination operand (register or memory).
    pub destination: bool,
}

/// What is not compared for `case` on a host of `vendor`.
pub fn ignored(case: &Case, vendor: Vendor) -> Ignored {
    let mut ignored = Ignored {
        flags: always_undefined_flags(&case.inst),
        destination: false,
    };
    if vendor != Vendor::Intel {
        let depending = undefined_for_inputs(&case.inst, &case.state.regs);
        ignored.flags |= depending.flags;
        ignored.destination |= depending.destination;
    }
    ignored
}

/// x87 condition codes (in FSW bit positions) the instruction leaves undefined.
pub fn undefined_conditions(inst: &Instruction) -> u16 {
    map_bits(
        inst.rflags_undefined(),
        &[
            (RflagsBits::C0, 0x100),
            (RflagsBits::C1, 0x200),
            (RflagsBits::C2, 0x400),
            (RflagsBits::C3, 0x4000),
        ],
    ) as u16
}

/// Flags iced-x86 marks undefined for the form, whatever the inputs.
fn always_undefined_flags(inst: &Instruction) -> u64 {
    map_bits(
        inst.rflags_undefined(),
        &[
            (RflagsBits::OF, flag::OF),
            (RflagsBits::SF, flag::SF),
            (RflagsBits::ZF, flag::ZF),
            (RflagsBits::AF, flag::AF),
            (RflagsBits::CF, flag::CF),
            (RflagsBits::PF, flag::PF),
        ],
    )
}

/// Results undefined for these particular inputs (`regs` before the instruction).
fn undefined_for_inputs(inst: &Instruction, regs: &[u64; 16]) -> Ignored {
    use Mnemonic::*;
    let bits = operand_bits(inst);
    let mut ignored = Ignored::default();
    match inst.mnemonic() {
        Rol | Ror | Rcl | Rcr | Shl | Sal | Shr | Sar => {
            let count = masked_count(inst, 1, regs, bits);
            // A zero count changes nothing; one defines OF; any other leaves OF undefined
            // (for RCL/RCR too when the count modulo 9 or 17 is 0 and nothing rotates).
            if count > 1 {
                ignored.flags |= flag::OF;
            }
            if matches!(inst.mnemonic(), Shl | Sal | Shr | Sar) && count != 0 {
                ignored.flags |= flag::AF;
                // SHL/SHR by at least the operand width: CF is undefined (8 and 16 bits).
                if count >= bits && inst.mnemonic() != Sar {
                    ignored.flags |= flag::CF;
                }
            }
        }
        Shld | Shrd => {
            let count = masked_count(inst, 2, regs, bits);
            if count > bits {
                ignored.flags |= flag::ARITHMETIC;
                ignored.destination = true;
            } else if count != 0 {
                ignored.flags |= flag::AF;
                if count > 1 {
                    ignored.flags |= flag::OF;
                }
            }
        }
        Bsf | Bsr if source_value(inst, regs) == Some(0) => {
            ignored.flags |= flag::ARITHMETIC & !flag::ZF;
            ignored.destination = true;
        }
        _ => {}
    }
    ignored
}

/// The count operand `index` masked as the CPU masks it (to 6 bits for 64-bit operands, 5
/// otherwise). A memory source of BSF/BSR is not looked at: the generator keeps its value
/// in the data area, which this function does not see.
fn masked_count(inst: &Instruction, index: u32, regs: &[u64; 16], bits: u32) -> u32 {
    let raw = match inst.op_kind(index) {
        OpKind::Immediate8 => u64::from(inst.immediate8()),
        OpKind::Register if inst.op_register(index) == Register::CL => regs[1] & 0xff,
        // D0/D1 forms: an implicit count of 1.
        _ => 1,
    };
    let mask = if bits == 64 { 0x3f } else { 0x1f };
    (raw & mask) as u32
}

/// The value of a register source operand (operand 1), if it is a register.
fn source_value(inst: &Instruction, regs: &[u64; 16]) -> Option<u64> {
    if inst.op_count() < 2 || inst.op_kind(1) != OpKind::Register {
        return None;
    }
    let register = inst.op1_register();
    let index = register.full_register().number();
    let value = *regs.get(index)?;
    Some(match register.size() {
        2 => value & 0xffff,
        4 => value & 0xffff_ffff,
        _ => value,
    })
}

/// Width in bits of operand 0.
fn operand_bits(inst: &Instruction) -> u32 {
    let bytes = if inst.op_kind(0) == OpKind::Register {
        inst.op0_register().size()
    } else {
        inst.memory_size().size()
    };
    bytes as u32 * 8
}

/// The bits of `table` (iced bit, architectural bit) whose iced bit is set in `bits`.
fn map_bits(bits: u32, table: &[(u32, u64)]) -> u64 {
    table
        .iter()
        .filter(|(iced, _)| bits & iced != 0)
        .fold(0, |mask, (_, bit)| mask | bit)
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::*;

    use super::super::native::{MachineState, INSN};
    use super::*;

    /// A case for the one instruction `emit` assembles, with `regs` as inputs.
    fn case(regs: [u64; 16], emit: impl FnOnce(&mut CodeAssembler)) -> Case {
        let mut asm = CodeAssembler::new(64).unwrap();
        emit(&mut asm);
        let bytes = asm.assemble(INSN).unwrap();
        let inst = iced_x86::Decoder::with_ip(64, &bytes, INSN, 0).decode();
        Case {
            inst,
            bytes,
            state: MachineState {
                regs,
                rflags: 0x202,
                xmm: [0; 16],
                mxcsr: 0x1f80,
                x87: Default::default(),
                data: Vec::new(),
                stack: Vec::new(),
            },
        }
    }

    fn on_both(case: &Case) -> (Ignored, Ignored) {
        (ignored(case, Vendor::Intel), ignored(case, Vendor::Amd))
    }

    #[test]
    fn multi_bit_rotates_leave_of_to_the_vendor() {
        // 0x49 & 0x1f = 9: RCL of a byte by 9 rotates nothing, yet OF is undefined.
        let rcl_by_9 = case([0; 16], |a| a.rcl(al, 0x49u32).unwrap());
        let (intel, amd) = on_both(&rcl_by_9);
        assert_eq!(intel.flags & flag::OF, 0, "Intel: OF compared");
        assert_eq!(amd.flags & flag::OF, flag::OF, "AMD: OF not compared");
        assert!(!amd.destination);

        let rcl_by_1 = case([0; 16], |a| a.rcl(al, 1u32).unwrap());
        let (intel, amd) = on_both(&rcl_by_1);
        assert_eq!(
            (intel.flags | amd.flags) & flag::OF,
            0,
            "a 1-bit rotate defines OF"
        );

        // By CL: the count comes from RCX.
        let mut regs = [0; 16];
        regs[1] = 0x100 | 3;
        let ror_by_cl = case(regs, |a| a.ror(rdx, cl).unwrap());
        assert_eq!(ignored(&ror_by_cl, Vendor::Amd).flags & flag::OF, flag::OF);
        // Masked to 0 for a 64-bit operand: nothing changes, nothing is undefined.
        let ror_by_64 = case([0; 16], |a| a.ror(rdx, 0x40u32).unwrap());
        let (intel, amd) = on_both(&ror_by_64);
        assert_eq!((intel.flags | amd.flags) & flag::OF, 0);
    }

    #[test]
    fn shifts_leave_of_af_and_wide_cf_undefined() {
        let shl_by_5 = case([0; 16], |a| a.shl(eax, 5u32).unwrap());
        let amd = ignored(&shl_by_5, Vendor::Amd);
        assert_eq!(amd.flags & (flag::OF | flag::AF), flag::OF | flag::AF);
        assert_eq!(amd.flags & flag::CF, 0);
        let shr_byte_by_12 = case([0; 16], |a| a.shr(bl, 12u32).unwrap());
        assert_eq!(
            ignored(&shr_byte_by_12, Vendor::Amd).flags & flag::CF,
            flag::CF
        );
        let sar_byte_by_12 = case([0; 16], |a| a.sar(bl, 12u32).unwrap());
        assert_eq!(ignored(&sar_byte_by_12, Vendor::Amd).flags & flag::CF, 0);
        let shl_by_1 = case([0; 16], |a| a.shl(eax, 1u32).unwrap());
        assert_eq!(ignored(&shl_by_1, Vendor::Amd).flags & flag::OF, 0);
    }

    #[test]
    fn shld_past_the_operand_width_is_undefined() {
        let shld_16_by_20 = case([0; 16], |a| a.shld(ax, bx, 20u32).unwrap());
        let (intel, amd) = on_both(&shld_16_by_20);
        assert!(amd.destination);
        assert_eq!(amd.flags & flag::ARITHMETIC, flag::ARITHMETIC);
        assert!(!intel.destination);
        let shld_32_by_20 = case([0; 16], |a| a.shld(eax, ebx, 20u32).unwrap());
        let amd = ignored(&shld_32_by_20, Vendor::Amd);
        assert!(!amd.destination);
        assert_eq!(amd.flags & (flag::OF | flag::AF), flag::OF | flag::AF);
        assert_eq!(amd.flags & (flag::ZF | flag::SF | flag::CF), 0);
    }

    #[test]
    fn bit_scans_of_zero_leave_the_destination_undefined() {
        let mut regs = [0; 16];
        regs[3] = 0xffff_ffff_0000_0000; // EBX is zero, RBX is not
        let bsf_zero = case(regs, |a| a.bsf(eax, ebx).unwrap());
        let (intel, amd) = on_both(&bsf_zero);
        assert!(amd.destination);
        assert_eq!(amd.flags & flag::ZF, 0, "ZF says the source was zero");
        assert!(!intel.destination);
        let bsr_nonzero = case(regs, |a| a.bsr(rax, rbx).unwrap());
        assert!(!ignored(&bsr_nonzero, Vendor::Amd).destination);
    }

    #[test]
    fn form_wide_undefined_flags_are_skipped_on_every_vendor() {
        let mul = case([0; 16], |a| a.mul(rbx).unwrap());
        let (intel, amd) = on_both(&mul);
        for ignored in [intel, amd] {
            assert_eq!(
                ignored.flags & (flag::SF | flag::ZF | flag::AF | flag::PF),
                flag::SF | flag::ZF | flag::AF | flag::PF
            );
            assert_eq!(ignored.flags & (flag::CF | flag::OF), 0);
        }
    }
}
