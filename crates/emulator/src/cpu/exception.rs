//! Exceptions and interrupt delivery through the long-mode IDT.

use super::flags::{AC, IF, NT, RF, TF, VM};
use super::{gpr, seg, Cpu};

/// Exception vectors.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;
    pub const CP: u8 = 21;
}

/// A fault or trap raised by an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    /// 16 bits hold every error code this CPU produces (selector errors and page-fault bits
    /// 0-4), and keep `Result<(), Event>`, which every handler returns, in two registers.
    pub error_code: Option<u16>,
    /// The faulting linear address: CR2 for a page fault; for the #GP of a non-canonical
    /// address that address (never 0), so a stack access can turn it into #SS.
    pub address: u64,
}

/// Why execution of a block stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Deliver an exception (RIP points at the faulting instruction).
    Exception(Exception),
    /// HLT executed (RIP points after it).
    Halt,
    /// The CPU shut down (triple fault).
    TripleFault,
    /// Something the engine cannot emulate and cannot turn into a guest exception (boxed
    /// twice to keep the event small).
    Fatal(Box<Box<str>>),
}

// Handlers return `Result<(), Event>` per instruction: in registers, not through memory.
const _: () = assert!(std::mem::size_of::<Result<(), Event>>() <= 16);

impl Event {
    #[inline]
    pub fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Event::Exception(Exception {
            vector,
            error_code: error_code.map(|code| code as u16),
            address: 0,
        })
    }
    #[inline]
    pub fn gp(code: u32) -> Self {
        Self::exception(vector::GP, Some(code))
    }
    #[inline]
    pub fn ud() -> Self {
        Self::exception(vector::UD, None)
    }
    #[inline]
    pub fn de() -> Self {
        Self::exception(vector::DE, None)
    }
    #[inline]
    pub fn ss(code: u32) -> Self {
        Self::exception(vector::SS, Some(code))
    }
    #[inline]
    pub fn np(code: u32) -> Self {
        Self::exception(vector::NP, Some(code))
    }
    #[inline]
    pub fn ts(code: u32) -> Self {
        Self::exception(vector::TS, Some(code))
    }
    #[inline]
    pub fn nm() -> Self {
        Self::exception(vector::NM, None)
    }
    /// The #GP(0) of an access to non-canonical `address`.
    #[inline]
    pub fn non_canonical(address: u64) -> Self {
        Event::Exception(Exception {
            vector: vector::GP,
            error_code: Some(0),
            address,
        })
    }
    /// The same fault seen by a stack-segment access: a non-canonical address is #SS(0).
    #[inline]
    pub fn into_stack_fault(self) -> Self {
        match self {
            Event::Exception(Exception {
                vector: vector::GP,
                address,
                ..
            }) if address != 0 => Self::ss(0),
            other => other,
        }
    }
    #[inline]
    pub fn page_fault(address: u64, code: u32) -> Self {
        Event::Exception(Exception {
            vector: vector::PF,
            error_code: Some(code as u16),
            address,
        })
    }
    pub fn fatal(reason: impl Into<String>) -> Self {
        Event::Fatal(Box::new(reason.into().into_boxed_str()))
    }
}

/// What raised an interrupt, which decides privilege checks and the EXT bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A hardware interrupt from the PIC.
    External,
    /// INT n, INT3, INTO: the gate's DPL must allow the CPL.
    Software,
    /// A CPU exception.
    Exception,
}

/// Exceptions whose error code is pushed.
fn has_error_code(vector: u8) -> bool {
    use vector::*;
    matches!(vector, DF | TS | NP | SS | GP | PF | AC | CP)
}

fn is_contributory(vector: u8) -> bool {
    use vector::*;
    matches!(vector, DE | TS | NP | SS | GP)
}

impl Cpu {
    /// Delivers a CPU exception, escalating to #DF and triple fault as the architecture does.
    /// RIP must point at the faulting instruction.
    pub fn raise(&mut self, exception: Exception) -> Result<(), Event> {
        let mut current = exception;
        // A benign exception followed by another is handled serially; bound the chain.
        for _ in 0..4 {
            if current.vector == vector::PF {
                self.arch.cr2 = current.address;
            }
            let code = if has_error_code(current.vector) {
                Some(u32::from(current.error_code.unwrap_or(0)))
            } else {
                None
            };
            let second = match self.deliver(current.vector, code, Source::Exception) {
                Ok(()) => return Ok(()),
                Err(Event::Exception(second)) => second,
                Err(other) => return Err(other),
            };
            if current.vector == vector::DF {
                return Err(Event::TripleFault);
            }
            let double = (is_contributory(current.vector) && is_contributory(second.vector))
                || (current.vector == vector::PF
                    && (second.vector == vector::PF || is_contributory(second.vector)));
            current = if double {
                Exception {
                    vector: vector::DF,
                    error_code: Some(0),
                    address: 0,
                }
            } else {
                second
            };
        }
        Err(Event::TripleFault)
    }

    /// Delivers an external interrupt with `vector`.
    pub fn raise_external(&mut self, vector: u8) -> Result<(), Event> {
        match self.deliver(vector, None, Source::External) {
            Ok(()) => Ok(()),
            Err(Event::Exception(e)) => self.raise(e),
            Err(other) => Err(other),
        }
    }

    /// Delivers a software interrupt (INT n); RIP must already point after the instruction.
    pub fn raise_software(&mut self, vector: u8) -> Result<(), Event> {
        self.deliver(vector, None, Source::Software)
    }

    /// Transfers control through IDT entry `vector`, pushing the interrupted context.
    fn deliver(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        source: Source,
    ) -> Result<(), Event> {
        if self.arch.efer & crate::msr::efer::LMA == 0 {
            return Err(Event::fatal(format!(
                "Interrupt {vector:#x} outside long mode is not supported"
            )));
        }
        let ext = u32::from(source == Source::External);
        let idt_error = (u32::from(vector) << 3) | 2 | ext;
        let offset = u64::from(vector) * 16;
        if offset + 15 > u64::from(self.arch.idtr.limit) {
            return Err(Event::gp(idt_error));
        }
        let low = self.read_system::<8>(self.arch.idtr.base.wrapping_add(offset))?;
        let high = self.read_system::<8>(self.arch.idtr.base.wrapping_add(offset + 8))?;
        let gate_type = (low >> 40) & 0xf;
        let gate_dpl = ((low >> 45) & 3) as u8;
        let present = (low >> 47) & 1 == 1;
        if gate_type != 0xe && gate_type != 0xf {
            return Err(Event::gp(idt_error));
        }
        if source == Source::Software && gate_dpl < self.cpl() {
            return Err(Event::gp(idt_error));
        }
        if !present {
            return Err(Event::np(idt_error));
        }
        let selector = (low >> 16) as u16;
        let target = (low & 0xffff) | ((low >> 32) & 0xffff_0000) | (high << 32);
        let ist = (low >> 32) & 7;

        let selector_error = u32::from(selector & !3) | ext;
        if selector & !3 == 0 {
            return Err(Event::gp(ext));
        }
        let code = self.load_descriptor(selector).map_err(|e| match e {
            // Outside the table: the error code names the selector and the EXT bit. Page
            // faults reading the table stay page faults.
            Event::Exception(x) if x.vector == vector::GP => Event::gp(selector_error),
            other => other,
        })?;
        // Must be a present 64-bit code segment no less privileged than the CPL.
        if !code.s || code.type_ & 0x8 == 0 || !code.l || code.db || code.dpl > self.cpl() {
            return Err(Event::gp(selector_error));
        }
        if !code.present {
            return Err(Event::np(selector_error));
        }
        let conforming = code.type_ & 0x4 != 0;
        let old_cpl = self.cpl();
        let new_cpl = if conforming { old_cpl } else { code.dpl };

        let old_rsp = self.arch.regs[gpr::RSP];
        let mut rsp = old_rsp;
        if ist != 0 {
            rsp = self.read_tss(0x24 + (ist - 1) * 8, ext)?;
        } else if new_cpl < old_cpl {
            rsp = self.read_tss(4 + u64::from(new_cpl) * 8, ext)?;
        }
        rsp &= !0xf;

        let rflags = self.arch.flags.get();
        let mut frame = [0u64; 6];
        frame[5] = u64::from(self.arch.segs[seg::SS].selector);
        frame[4] = old_rsp;
        frame[3] = rflags;
        frame[2] = u64::from(self.arch.segs[seg::CS].selector);
        frame[1] = self.arch.rip;
        let words = match error_code {
            Some(code) => {
                frame[0] = u64::from(code);
                6
            }
            None => 5,
        };
        let start = 6 - words;
        let mut bytes = [0u8; 48];
        for (i, word) in frame[start..].iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
        let new_rsp = rsp.wrapping_sub(words as u64 * 8);
        if !crate::mmu::is_canonical(new_rsp) {
            return Err(Event::ss(0));
        }
        self.write_bytes(new_rsp, &bytes[..words * 8], new_cpl == 3)
            .map_err(Event::into_stack_fault)?;

        // Commit.
        let mut cs = code;
        cs.selector = (selector & !3) | u16::from(new_cpl);
        self.arch.segs[seg::CS] = cs;
        if new_cpl != old_cpl {
            let mut ss = lodge_engine::Segment {
                selector: u16::from(new_cpl),
                ..Default::default()
            };
            ss.unusable = true;
            ss.dpl = new_cpl;
            ss.db = false;
            ss.s = true;
            ss.type_ = 3;
            ss.present = false;
            self.arch.segs[seg::SS] = ss;
        }
        self.arch.regs[gpr::RSP] = new_rsp;
        self.arch.rip = target;
        let mut new_flags = rflags & !(TF | NT | RF | VM | AC);
        if gate_type == 0xe {
            new_flags &= !IF;
        }
        self.arch.flags.set(new_flags);
        self.mmu.user = new_cpl == 3;
        self.update_segment_bases();
        Ok(())
    }

    /// Reads a 64-bit field of the TSS at `offset`.
    fn read_tss(&mut self, offset: u64, ext: u32) -> Result<u64, Event> {
        if offset + 7 > u64::from(self.arch.tr.limit) || self.arch.tr.unusable {
            return Err(Event::ts(u32::from(self.arch.tr.selector & !3) | ext));
        }
        self.read_system::<8>(self.arch.tr.base.wrapping_add(offset))
    }
}
