//! System instructions: CPUID, RDTSC(P), RDMSR/WRMSR, control and debug registers,
//! descriptor tables, INVLPG, HLT, port I/O, flag control, and the #UD fallback.

use iced_x86::{Instruction, Mnemonic, OpKind};
use tracing::{debug, warn};

use super::flags::{self, CF, DF, IF, IOPL};
use super::op::{size0, Handler, Op};
use super::{cr0, cr4, gpr, seg, Cpu, Event};
use crate::msr::{self, efer, index};
use crate::pic::Pic;
use crate::pit::Pit;

/// Raises #GP(0) unless the CPL is 0.
#[inline]
pub fn require_cpl0(cpu: &Cpu) -> Result<(), Event> {
    if cpu.cpl() != 0 {
        Err(Event::gp(0))
    } else {
        Ok(())
    }
}

/// Raises #GP(0) unless the CPL may use I/O and interrupt-flag instructions (CPL <= IOPL).
fn require_iopl(cpu: &mut Cpu) -> Result<(), Event> {
    let iopl = ((cpu.arch.flags.get() & IOPL) >> 12) as u8;
    if cpu.cpl() > iopl {
        Err(Event::gp(0))
    } else {
        Ok(())
    }
}

/// An instruction the engine does not implement: #UD, logged once per instruction form.
pub fn unimplemented(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let code = op.inst.code() as u16;
    if cpu.warned.insert(code) {
        let mut bytes = vec![0u8; op.inst.len()];
        let ip = op.inst.ip();
        let shown = cpu
            .read_bytes(ip, &mut bytes, cpu.mmu.user)
            .map(|_| format!("{bytes:02x?}"))
            .unwrap_or_default();
        warn!(
            "Unimplemented instruction {:?} {} at {ip:#x}: raising #UD",
            op.inst.code(),
            shown
        );
    }
    Err(Event::ud())
}

/// An instruction CPUID does not report: #UD like a CPU without the feature.
pub fn undefined(_cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    Err(Event::ud())
}

pub fn nop(_cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    Ok(())
}

pub fn cpuid(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    let [a, b, c, d] = crate::cpuid::cpuid(
        cpu.arch.regs[gpr::RAX] as u32,
        cpu.arch.regs[gpr::RCX] as u32,
    );
    cpu.arch.regs[gpr::RAX] = u64::from(a);
    cpu.arch.regs[gpr::RBX] = u64::from(b);
    cpu.arch.regs[gpr::RCX] = u64::from(c);
    cpu.arch.regs[gpr::RDX] = u64::from(d);
    Ok(())
}

pub fn rdtsc<const AUX: bool>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    if cpu.arch.cr4 & cr4::TSD != 0 && cpu.cpl() != 0 {
        return Err(Event::gp(0));
    }
    let tsc = cpu.tsc();
    cpu.arch.regs[gpr::RAX] = tsc & 0xffff_ffff;
    cpu.arch.regs[gpr::RDX] = tsc >> 32;
    if AUX {
        cpu.arch.regs[gpr::RCX] = cpu.arch.msr.tsc_aux & 0xffff_ffff;
    }
    Ok(())
}

pub fn rdmsr(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let number = cpu.arch.regs[gpr::RCX] as u32;
    let value = cpu.read_msr(number)?;
    cpu.arch.regs[gpr::RAX] = value & 0xffff_ffff;
    cpu.arch.regs[gpr::RDX] = value >> 32;
    Ok(())
}

pub fn wrmsr(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let number = cpu.arch.regs[gpr::RCX] as u32;
    let value = (cpu.arch.regs[gpr::RDX] << 32) | (cpu.arch.regs[gpr::RAX] & 0xffff_ffff);
    cpu.write_msr(number, value)
}

impl Cpu {
    /// RDMSR: unknown MSRs raise #GP(0) (the kernel probes with rdmsr_safe).
    pub fn read_msr(&mut self, number: u32) -> Result<u64, Event> {
        let m = &self.arch.msr;
        Ok(match number {
            index::TSC => self.tsc(),
            index::EFER => self.arch.efer,
            index::STAR => m.star,
            index::LSTAR => m.lstar,
            index::CSTAR => m.cstar,
            index::SFMASK => m.sfmask,
            index::FS_BASE => self.arch.segs[seg::FS].base,
            index::GS_BASE => self.arch.segs[seg::GS].base,
            index::KERNEL_GS_BASE => m.kernel_gs_base,
            index::TSC_AUX => m.tsc_aux,
            index::PAT => m.pat,
            index::MISC_ENABLE => m.misc_enable,
            index::SYSENTER_CS => m.sysenter_cs,
            index::SYSENTER_ESP => m.sysenter_esp,
            index::SYSENTER_EIP => m.sysenter_eip,
            index::BIOS_SIGN_ID => 0,
            index::PLATFORM_ID => 0,
            index::MTRR_CAP => 0,
            _ => {
                debug!("RDMSR {number:#x}: unknown MSR, #GP");
                return Err(Event::gp(0));
            }
        })
    }

    /// WRMSR.
    pub fn write_msr(&mut self, number: u32, value: u64) -> Result<(), Event> {
        let canonical = || {
            if crate::mmu::is_canonical(value) {
                Ok(())
            } else {
                Err(Event::gp(0))
            }
        };
        match number {
            index::TSC => self.arch.tsc_offset = value.wrapping_sub(self.platform.clock.now()),
            index::EFER => {
                if value & !efer::WRITABLE & !efer::LMA != 0 {
                    return Err(Event::gp(0));
                }
                let lma = self.arch.efer & efer::LMA;
                if (value ^ self.arch.efer) & efer::LME != 0 && self.paging_enabled() {
                    return Err(Event::gp(0));
                }
                self.arch.efer = (value & efer::WRITABLE) | lma;
                self.update_modes();
            }
            index::STAR => self.arch.msr.star = value,
            index::LSTAR => {
                canonical()?;
                self.arch.msr.lstar = value;
            }
            index::CSTAR => {
                canonical()?;
                self.arch.msr.cstar = value;
            }
            index::SFMASK => self.arch.msr.sfmask = value & 0xffff_ffff,
            index::FS_BASE => {
                canonical()?;
                self.arch.segs[seg::FS].base = value;
                self.update_segment_bases();
            }
            index::GS_BASE => {
                canonical()?;
                self.arch.segs[seg::GS].base = value;
                self.update_segment_bases();
            }
            index::KERNEL_GS_BASE => {
                canonical()?;
                self.arch.msr.kernel_gs_base = value;
            }
            index::TSC_AUX => {
                if value >> 32 != 0 {
                    return Err(Event::gp(0));
                }
                self.arch.msr.tsc_aux = value;
            }
            index::PAT => {
                if !msr::valid_pat(value) {
                    return Err(Event::gp(0));
                }
                self.arch.msr.pat = value;
            }
            index::MISC_ENABLE => self.arch.msr.misc_enable = value,
            index::SYSENTER_CS => self.arch.msr.sysenter_cs = value,
            index::SYSENTER_ESP => self.arch.msr.sysenter_esp = value,
            index::SYSENTER_EIP => self.arch.msr.sysenter_eip = value,
            index::BIOS_SIGN_ID => {}
            _ => {
                debug!("WRMSR {number:#x} = {value:#x}: unknown MSR, #GP");
                return Err(Event::gp(0));
            }
        }
        Ok(())
    }

    /// Writes a control register (MOV CRn, r64).
    pub fn write_control(&mut self, n: u8, value: u64) -> Result<(), Event> {
        match n {
            0 => {
                if value >> 32 != 0
                    || (value & cr0::PG != 0 && value & cr0::PE == 0)
                    || (value & cr0::NW != 0 && value & cr0::CD == 0)
                {
                    return Err(Event::gp(0));
                }
                let long = self.arch.efer & efer::LME != 0;
                if value & cr0::PG != 0 && long && self.arch.cr4 & cr4::PAE == 0 {
                    return Err(Event::gp(0));
                }
                if self.arch.efer & efer::LMA != 0 && value & cr0::PG == 0 {
                    return Err(Event::fatal(
                        "Leaving long mode (clearing CR0.PG) is not supported",
                    ));
                }
                self.arch.cr0 = value | cr0::ET;
                if value & cr0::PG != 0 && long {
                    self.arch.efer |= efer::LMA;
                }
                self.update_modes();
            }
            2 => self.arch.cr2 = value,
            3 => {
                if value >> crate::mmu::PHYS_ADDR_BITS != 0 {
                    return Err(Event::gp(0));
                }
                self.arch.cr3 = value;
                self.mmu.paging.cr3 = value;
                self.mmu.tlb.flush();
            }
            4 => {
                if value & !cr4::WRITABLE != 0
                    || (self.arch.efer & efer::LMA != 0 && value & cr4::PAE == 0)
                {
                    return Err(Event::gp(0));
                }
                self.arch.cr4 = value;
                self.update_modes();
            }
            8 => {
                if value >> 4 != 0 {
                    return Err(Event::gp(0));
                }
                self.arch.cr8 = value;
            }
            _ => return Err(Event::ud()),
        }
        Ok(())
    }

    /// Reads a control register.
    pub fn read_control(&self, n: u8) -> Result<u64, Event> {
        Ok(match n {
            0 => self.arch.cr0,
            2 => self.arch.cr2,
            3 => self.arch.cr3,
            4 => self.arch.cr4,
            8 => self.arch.cr8,
            _ => return Err(Event::ud()),
        })
    }

    /// Port read of `size` bytes: the engine's PIC/PIT, or the bus.
    pub fn port_read(&mut self, port: u16, size: usize) -> u64 {
        if Pic::owns_port(port) || Pit::owns_port(port) {
            let mut value = 0u64;
            for i in 0..size {
                let p = port.wrapping_add(i as u16);
                let byte = if Pic::owns_port(p) {
                    self.platform.pic.read_port(p)
                } else if Pit::owns_port(p) {
                    let now = self.platform.clock.now();
                    self.platform.pit.read_port(p, now)
                } else {
                    let mut b = [0u8];
                    self.mmu.mem.io().pio_read(p, &mut b);
                    b[0]
                };
                value |= u64::from(byte) << (8 * i);
            }
            return value;
        }
        let mut data = [0u8; 4];
        self.mmu.mem.io().pio_read(port, &mut data[..size]);
        self.after_device_access();
        u64::from(u32::from_le_bytes(data))
    }

    /// Port write of `size` bytes.
    pub fn port_write(&mut self, port: u16, size: usize, value: u64) {
        if Pic::owns_port(port) || Pit::owns_port(port) {
            for i in 0..size {
                let p = port.wrapping_add(i as u16);
                let byte = (value >> (8 * i)) as u8;
                if Pic::owns_port(p) {
                    self.platform.pic.write_port(p, byte);
                } else if Pit::owns_port(p) {
                    let now = self.platform.clock.now();
                    self.platform.pit.write_port(p, byte, now);
                } else {
                    self.mmu.mem.io().pio_write(p, &[byte]);
                }
            }
            return;
        }
        let data = (value as u32).to_le_bytes();
        self.mmu.mem.io().pio_write(port, &data[..size]);
        self.after_device_access();
    }
}

/// MOV CRn/DRn, r64.
pub fn mov_to_control(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let value = cpu.gpr::<8>(op.r[1]);
    let reg = op.inst.op0_register();
    if reg.is_cr() {
        cpu.write_control(op.r[0], value)
    } else {
        let n = op.r[0] as usize;
        match n {
            0..=3 => cpu.arch.dr[n] = value,
            4 | 5 if cpu.arch.cr4 & cr4::DE != 0 => return Err(Event::ud()),
            4 | 6 => {
                if value >> 32 != 0 {
                    return Err(Event::gp(0));
                }
                cpu.arch.dr[6] = value | 0xffff_0ff0;
            }
            5 | 7 => {
                if value >> 32 != 0 {
                    return Err(Event::gp(0));
                }
                if value & 0xff != 0 && cpu.warned.insert(super::warning::DR7_BREAKPOINTS) {
                    warn!("Hardware breakpoints enabled in DR7 ({value:#x}) are not emulated");
                }
                cpu.arch.dr[7] = value | 0x400;
            }
            _ => return Err(Event::ud()),
        }
        Ok(())
    }
}

/// MOV r64, CRn/DRn.
pub fn mov_from_control(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let reg = op.inst.op1_register();
    let value = if reg.is_cr() {
        cpu.read_control(op.r[1])?
    } else {
        match op.r[1] as usize {
            n @ 0..=3 => cpu.arch.dr[n],
            4 | 5 if cpu.arch.cr4 & cr4::DE != 0 => return Err(Event::ud()),
            4 | 6 => cpu.arch.dr[6],
            5 | 7 => cpu.arch.dr[7],
            _ => return Err(Event::ud()),
        }
    };
    cpu.set_gpr::<8>(op.r[0], value);
    Ok(())
}

/// LGDT/LIDT m16&64.
pub fn load_table<const IDT: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let addr = cpu.ea(op);
    let limit = cpu.read::<2>(addr)? as u16;
    let base = cpu.read::<8>(addr.wrapping_add(2))?;
    if !crate::mmu::is_canonical(base) {
        return Err(Event::gp(0));
    }
    let table = lodge_engine::DescriptorTable { base, limit };
    if IDT {
        cpu.arch.idtr = table;
    } else {
        cpu.arch.gdtr = table;
    }
    Ok(())
}

/// SGDT/SIDT m16&64.
pub fn store_table<const IDT: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let table = if IDT { cpu.arch.idtr } else { cpu.arch.gdtr };
    let addr = cpu.ea(op);
    let mut bytes = [0u8; 10];
    bytes[..2].copy_from_slice(&table.limit.to_le_bytes());
    bytes[2..].copy_from_slice(&table.base.to_le_bytes());
    let user = cpu.mmu.user;
    cpu.write_bytes(addr, &bytes, user)
}

/// LTR r/m16.
pub fn ltr(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let selector = cpu.read_operand::<2>(op, 0)? as u16;
    cpu.load_task_register(selector)
}

/// LLDT r/m16.
pub fn lldt(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let selector = cpu.read_operand::<2>(op, 0)? as u16;
    cpu.load_ldt(selector)
}

/// STR/SLDT r/m: a register gets the zero-extended selector, memory 16 bits.
pub fn store_selector<const LDT: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let selector = u64::from(if LDT {
        cpu.arch.ldtr.selector
    } else {
        cpu.arch.tr.selector
    });
    store_word_or_register(cpu, op, selector)
}

fn store_word_or_register(cpu: &mut Cpu, op: &Op, value: u64) -> Result<(), Event> {
    if op.is_memory(0) {
        let addr = cpu.ea(op);
        cpu.write::<2>(addr, value)
    } else {
        match op.inst.op0_register().size() {
            2 => cpu.set_gpr::<2>(op.r[0], value),
            4 => cpu.set_gpr::<4>(op.r[0], value),
            _ => cpu.set_gpr::<8>(op.r[0], value),
        }
        Ok(())
    }
}

/// SMSW r/m.
pub fn smsw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let value = cpu.arch.cr0 & if op.is_memory(0) { 0xffff } else { u64::MAX };
    store_word_or_register(cpu, op, value)
}

/// LMSW r/m16: sets PE/MP/EM/TS (PE cannot be cleared).
pub fn lmsw(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let value = cpu.read_operand::<2>(op, 0)?;
    let low = (cpu.arch.cr0 & !0xe) | (value & 0xf) | (cpu.arch.cr0 & cr0::PE);
    cpu.write_control(0, low)
}

/// CLTS.
pub fn clts(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    cpu.arch.cr0 &= !cr0::TS;
    Ok(())
}

/// INVLPG m.
pub fn invlpg(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    let addr = cpu.ea(op);
    cpu.mmu.tlb.flush_page(addr);
    Ok(())
}

/// WBINVD/INVD: no caches to write back.
pub fn privileged_nop(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)
}

/// CLFLUSH m8: checks the address like a read, flushes nothing.
pub fn clflush(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = cpu.ea(op);
    cpu.read::<1>(addr).map(|_| ())
}

/// HLT.
pub fn hlt(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_cpl0(cpu)?;
    Err(Event::Halt)
}

/// IN AL/AX/EAX, imm8/DX.
pub fn port_in<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_iopl(cpu)?;
    let port = if op.inst.op_kind(1) == OpKind::Register {
        cpu.arch.regs[gpr::RDX] as u16
    } else {
        op.inst.immediate(1) as u16
    };
    let value = cpu.port_read(port, B);
    cpu.set_gpr::<B>(0, value);
    Ok(())
}

/// OUT imm8/DX, AL/AX/EAX.
pub fn port_out<const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    require_iopl(cpu)?;
    let port = if op.inst.op_kind(0) == OpKind::Register {
        cpu.arch.regs[gpr::RDX] as u16
    } else {
        op.inst.immediate(0) as u16
    };
    let value = cpu.gpr::<B>(0);
    cpu.port_write(port, B, value);
    Ok(())
}

pub fn cli(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_iopl(cpu)?;
    cpu.arch.flags.set_flag(IF, false);
    Ok(())
}

pub fn sti(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    require_iopl(cpu)?;
    if !cpu.arch.flags.system(IF) {
        cpu.arch.interrupt_shadow = true;
    }
    cpu.arch.flags.set_flag(IF, true);
    Ok(())
}

/// CLC/STC/CMC/CLD/STD.
pub fn flag_op<const OP: u8>(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    match OP {
        0 => cpu.arch.flags.set_flag(CF, false),
        1 => cpu.arch.flags.set_flag(CF, true),
        2 => {
            let carry = cpu.arch.flags.carry();
            cpu.arch.flags.set_flag(CF, !carry);
        }
        3 => cpu.arch.flags.set_flag(DF, false),
        _ => cpu.arch.flags.set_flag(DF, true),
    }
    Ok(())
}

pub fn swapgs(cpu: &mut Cpu, _op: &Op) -> Result<(), Event> {
    cpu.swapgs()
}

/// LAR/LSL r, r/m16: access rights or limit of a descriptor the CPL may see; ZF on success.
pub fn lar_lsl<const LIMIT: bool, const B: usize>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let selector = if op.is_memory(1) {
        let addr = cpu.ea(op);
        cpu.read::<2>(addr)?
    } else {
        cpu.gpr::<2>(op.r[1])
    } as u16;
    let result = descriptor_visible(cpu, selector, |d, _| {
        let system_ok = match d.type_ {
            // LDT, available/busy TSS are valid for both in long mode; call gates for LAR.
            0x2 | 0x9 | 0xb => true,
            0xc => !LIMIT,
            _ => false,
        };
        d.s || system_ok
    })?;
    match result {
        Some(raw) => {
            let value = if LIMIT {
                let d = lodge_engine::Segment::from_descriptor(selector, raw);
                u64::from(d.limit)
            } else {
                (raw >> 32) & 0x00f0_ff00
            };
            cpu.set_gpr::<B>(op.r[0], value);
            cpu.arch.flags.set_flag(flags::ZF, true);
        }
        None => cpu.arch.flags.set_flag(flags::ZF, false),
    }
    Ok(())
}

/// VERR/VERW r/m16: ZF = the segment is readable/writable at the CPL.
pub fn verify<const WRITE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let selector = cpu.read_operand::<2>(op, 0)? as u16;
    let ok = descriptor_visible(cpu, selector, |d, _| {
        let code = d.type_ & 0x8 != 0;
        d.s && if WRITE {
            !code && d.type_ & 0x2 != 0
        } else {
            !code || d.type_ & 0x2 != 0
        }
    })?
    .is_some();
    cpu.arch.flags.set_flag(flags::ZF, ok);
    Ok(())
}

/// The raw descriptor for `selector` if it exists, passes `accept` and is visible at the
/// CPL and RPL (conforming code is always visible).
fn descriptor_visible(
    cpu: &mut Cpu,
    selector: u16,
    accept: impl Fn(&lodge_engine::Segment, u64) -> bool,
) -> Result<Option<u64>, Event> {
    if selector & !3 == 0 {
        return Ok(None);
    }
    let raw = match cpu.read_descriptor(selector) {
        Ok(raw) => raw,
        Err(Event::Exception(e)) if e.vector == super::vector::GP => return Ok(None),
        Err(e) => return Err(e),
    };
    let d = lodge_engine::Segment::from_descriptor(selector, raw);
    if !accept(&d, raw) {
        return Ok(None);
    }
    let conforming = d.s && d.type_ & 0xc == 0xc;
    let rpl = (selector & 3) as u8;
    if !conforming && (d.dpl < cpu.cpl() || d.dpl < rpl) {
        return Ok(None);
    }
    Ok(Some(raw))
}

/// The handler for a system instruction, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    let h = match inst.mnemonic() {
        Mnemonic::Cpuid => cpuid as Handler,
        Mnemonic::Rdtsc => rdtsc::<false>,
        Mnemonic::Rdtscp => rdtsc::<true>,
        Mnemonic::Rdmsr => rdmsr,
        Mnemonic::Wrmsr => wrmsr,
        Mnemonic::Lgdt => load_table::<false>,
        Mnemonic::Lidt => load_table::<true>,
        Mnemonic::Sgdt => store_table::<false>,
        Mnemonic::Sidt => store_table::<true>,
        Mnemonic::Ltr => ltr,
        Mnemonic::Lldt => lldt,
        Mnemonic::Str => store_selector::<false>,
        Mnemonic::Sldt => store_selector::<true>,
        Mnemonic::Smsw => smsw,
        Mnemonic::Lmsw => lmsw,
        Mnemonic::Clts => clts,
        Mnemonic::Invlpg => invlpg,
        Mnemonic::Wbinvd | Mnemonic::Invd => privileged_nop,
        Mnemonic::Clflush => clflush,
        Mnemonic::Hlt => hlt,
        Mnemonic::In => match size0(inst) {
            1 => port_in::<1>,
            2 => port_in::<2>,
            _ => port_in::<4>,
        },
        Mnemonic::Out => match inst.op1_register().size() {
            1 => port_out::<1>,
            2 => port_out::<2>,
            _ => port_out::<4>,
        },
        Mnemonic::Cli => cli,
        Mnemonic::Sti => sti,
        Mnemonic::Clc => flag_op::<0>,
        Mnemonic::Stc => flag_op::<1>,
        Mnemonic::Cmc => flag_op::<2>,
        Mnemonic::Cld => flag_op::<3>,
        Mnemonic::Std => flag_op::<4>,
        Mnemonic::Swapgs => swapgs,
        Mnemonic::Lar | Mnemonic::Lsl => {
            let limit = inst.mnemonic() == Mnemonic::Lsl;
            match (limit, size0(inst)) {
                (false, 2) => lar_lsl::<false, 2>,
                (false, 4) => lar_lsl::<false, 4>,
                (false, _) => lar_lsl::<false, 8>,
                (true, 2) => lar_lsl::<true, 2>,
                (true, 4) => lar_lsl::<true, 4>,
                (true, _) => lar_lsl::<true, 8>,
            }
        }
        Mnemonic::Verr => verify::<false>,
        Mnemonic::Verw => verify::<true>,
        Mnemonic::Nop
        | Mnemonic::Pause
        | Mnemonic::Lfence
        | Mnemonic::Mfence
        | Mnemonic::Sfence
        | Mnemonic::Prefetchnta
        | Mnemonic::Prefetcht0
        | Mnemonic::Prefetcht1
        | Mnemonic::Prefetcht2
        | Mnemonic::Prefetchw
        | Mnemonic::Prefetch
        | Mnemonic::Endbr64
        | Mnemonic::Endbr32 => nop,
        Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2 => undefined,
        _ => return None,
    };
    Some(h)
}
