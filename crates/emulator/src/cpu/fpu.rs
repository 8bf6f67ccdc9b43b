//! x87 and SSE register state, FXSAVE/FXRSTOR, LDMXCSR/STMXCSR.

use iced_x86::{Code, Instruction, Mnemonic};

use super::op::{Handler, Op};
use super::{cr0, cr4, Cpu, Event};

/// MXCSR after reset.
pub const MXCSR_DEFAULT: u32 = 0x1f80;
/// MXCSR bits that exist (including DAZ).
pub const MXCSR_MASK: u32 = 0xffff;
/// x87 control word after FNINIT.
pub const FCW_DEFAULT: u16 = 0x037f;

/// The floating-point and vector state.
#[derive(Debug, Clone)]
pub struct Fpu {
    pub xmm: [u128; 16],
    pub mxcsr: u32,
    pub fcw: u16,
    /// Status word; TOP is bits 11-13.
    pub fsw: u16,
    /// Abridged tag word: bit i set when physical register i holds a value.
    pub ftw: u8,
    /// Physical registers R0-R7 in 80-bit extended format.
    pub st: [[u8; 10]; 8],
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            xmm: [0; 16],
            mxcsr: MXCSR_DEFAULT,
            fcw: FCW_DEFAULT,
            fsw: 0,
            ftw: 0,
            st: [[0; 10]; 8],
            fop: 0,
            fip: 0,
            fdp: 0,
        }
    }
}

impl Fpu {
    /// FNINIT: x87 state to defaults (SSE state untouched).
    pub fn reset_x87(&mut self) {
        self.fcw = FCW_DEFAULT;
        self.fsw = 0;
        self.ftw = 0;
        self.fop = 0;
        self.fip = 0;
        self.fdp = 0;
    }

    /// The 512-byte FXSAVE image (64-bit format when `wide`).
    pub fn fxsave_image(&self, wide: bool) -> [u8; 512] {
        let mut img = [0u8; 512];
        img[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        img[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        img[4] = self.ftw;
        img[6..8].copy_from_slice(&self.fop.to_le_bytes());
        if wide {
            img[8..16].copy_from_slice(&self.fip.to_le_bytes());
            img[16..24].copy_from_slice(&self.fdp.to_le_bytes());
        } else {
            img[8..12].copy_from_slice(&(self.fip as u32).to_le_bytes());
            img[16..20].copy_from_slice(&(self.fdp as u32).to_le_bytes());
        }
        img[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        img[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
        // ST(i) in stack order.
        let top = self.top();
        for i in 0..8 {
            let phys = (top + i) & 7;
            img[32 + i * 16..32 + i * 16 + 10].copy_from_slice(&self.st[phys]);
        }
        for (i, x) in self.xmm.iter().enumerate() {
            img[160 + i * 16..176 + i * 16].copy_from_slice(&x.to_le_bytes());
        }
        img
    }

    /// Loads an FXSAVE image; fails (#GP) when MXCSR has reserved bits set.
    pub fn fxrstor_image(&mut self, img: &[u8; 512], wide: bool) -> Result<(), Event> {
        let word = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
        let dword = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
        let qword = |o: usize| u64::from(dword(o)) | (u64::from(dword(o + 4)) << 32);
        let mxcsr = dword(24);
        if mxcsr & !MXCSR_MASK != 0 {
            return Err(Event::gp(0));
        }
        self.mxcsr = mxcsr;
        self.fcw = word(0);
        self.fsw = word(2);
        // ES and B follow the pending flags and masks.
        self.fsw &= !0x8080;
        if self.fsw & 0x3f & !(self.fcw & 0x3f) != 0 {
            self.fsw |= 0x8080;
        }
        self.ftw = img[4];
        self.fop = word(6) & 0x7ff;
        if wide {
            self.fip = qword(8);
            self.fdp = qword(16);
        } else {
            self.fip = u64::from(dword(8));
            self.fdp = u64::from(dword(16));
        }
        let top = self.top();
        for i in 0..8 {
            let phys = (top + i) & 7;
            self.st[phys].copy_from_slice(&img[32 + i * 16..32 + i * 16 + 10]);
        }
        for (i, x) in self.xmm.iter_mut().enumerate() {
            let mut b = [0u8; 16];
            b.copy_from_slice(&img[160 + i * 16..176 + i * 16]);
            *x = u128::from_le_bytes(b);
        }
        Ok(())
    }

    /// The x87 stack top.
    #[inline]
    pub fn top(&self) -> usize {
        usize::from((self.fsw >> 11) & 7)
    }
}

impl Cpu {
    /// Checks that SSE instructions may run (#UD without OSFXSR or with CR0.EM, #NM with TS).
    #[inline]
    pub fn check_sse(&self) -> Result<(), Event> {
        if self.arch.cr0 & cr0::EM != 0 || self.arch.cr4 & cr4::OSFXSR == 0 {
            return Err(Event::ud());
        }
        if self.arch.cr0 & cr0::TS != 0 {
            return Err(Event::nm());
        }
        Ok(())
    }

    /// Checks that x87 instructions may run (#NM with CR0.EM or CR0.TS).
    #[inline]
    pub fn check_x87(&self) -> Result<(), Event> {
        if self.arch.cr0 & (cr0::EM | cr0::TS) != 0 {
            return Err(Event::nm());
        }
        Ok(())
    }

    /// Checks that WAIT may run: it ignores CR0.EM and faults on CR0.TS only with CR0.MP.
    #[inline]
    pub fn check_wait(&self) -> Result<(), Event> {
        if self.arch.cr0 & (cr0::MP | cr0::TS) == cr0::MP | cr0::TS {
            return Err(Event::nm());
        }
        Ok(())
    }
}

/// The address of an FXSAVE/FXRSTOR area, after the checks both make (#NM with CR0.EM or
/// CR0.TS, #GP unless 16-byte aligned).
fn fxsave_area(cpu: &Cpu, op: &Op) -> Result<u64, Event> {
    if cpu.arch.cr0 & (cr0::EM | cr0::TS) != 0 {
        return Err(Event::nm());
    }
    let addr = cpu.ea(op);
    if addr & 15 != 0 {
        return Err(Event::gp(0));
    }
    Ok(addr)
}

/// FXSAVE / FXSAVE64 m512.
pub fn fxsave<const WIDE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = fxsave_area(cpu, op)?;
    let img = cpu.arch.fpu.fxsave_image(WIDE);
    let user = cpu.mmu.user;
    cpu.write_bytes(addr, &img, user)
}

/// FXRSTOR / FXRSTOR64 m512.
pub fn fxrstor<const WIDE: bool>(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    let addr = fxsave_area(cpu, op)?;
    let mut img = [0u8; 512];
    let user = cpu.mmu.user;
    cpu.read_bytes(addr, &mut img, user)?;
    cpu.arch.fpu.fxrstor_image(&img, WIDE)
}

/// LDMXCSR m32.
pub fn ldmxcsr(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let addr = cpu.ea(op);
    let value = cpu.read::<4>(addr)? as u32;
    if value & !MXCSR_MASK != 0 {
        return Err(Event::gp(0));
    }
    cpu.arch.fpu.mxcsr = value;
    Ok(())
}

/// STMXCSR m32.
pub fn stmxcsr(cpu: &mut Cpu, op: &Op) -> Result<(), Event> {
    cpu.check_sse()?;
    let addr = cpu.ea(op);
    let value = u64::from(cpu.arch.fpu.mxcsr);
    cpu.write::<4>(addr, value)
}

/// The handler for FXSAVE/FXRSTOR/LDMXCSR/STMXCSR, if `inst` is one.
pub fn select(inst: &Instruction) -> Option<Handler> {
    Some(match inst.code() {
        Code::Fxsave_m512byte => fxsave::<false> as Handler,
        Code::Fxsave64_m512byte => fxsave::<true>,
        Code::Fxrstor_m512byte => fxrstor::<false>,
        Code::Fxrstor64_m512byte => fxrstor::<true>,
        _ => match inst.mnemonic() {
            Mnemonic::Ldmxcsr => ldmxcsr,
            Mnemonic::Stmxcsr => stmxcsr,
            _ => return None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_roundtrip() {
        let mut fpu = Fpu::default();
        fpu.xmm[3] = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
        fpu.fsw = 5 << 11;
        fpu.st[5] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        fpu.ftw = 0x20;
        let img = fpu.fxsave_image(true);
        assert_eq!(
            &img[32..42],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            "ST(0) is physical register TOP"
        );
        let mut other = Fpu::default();
        other.fxrstor_image(&img, true).unwrap();
        assert_eq!(other.xmm, fpu.xmm);
        assert_eq!(other.st, fpu.st);
        assert_eq!(other.ftw, 0x20);
        let mut bad = img;
        bad[27] = 0xff;
        assert!(other.fxrstor_image(&bad, true).is_err());
    }
}
