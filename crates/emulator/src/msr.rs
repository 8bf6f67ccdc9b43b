//! Model-specific registers the guest may use.

/// MSR numbers.
pub mod index {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const MTRR_CAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
}

/// EFER bits.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
    /// Bits software may set.
    pub const WRITABLE: u64 = SCE | LME | NXE;
}

/// MISC_ENABLE: fast strings enabled (bit 0); everything else clear.
pub const MISC_ENABLE_DEFAULT: u64 = 1;
/// The power-on PAT value.
pub const PAT_DEFAULT: u64 = 0x0007_0406_0007_0406;

/// MSRs stored without side effects (EFER, FS/GS base and the TSC live in the CPU).
#[derive(Debug, Clone)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
}

impl Default for Msrs {
    fn default() -> Self {
        Msrs {
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            tsc_aux: 0,
            pat: PAT_DEFAULT,
            misc_enable: MISC_ENABLE_DEFAULT,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
        }
    }
}

/// Whether every byte of a PAT value names a valid memory type (0, 1, 4, 5, 6, 7).
pub fn valid_pat(value: u64) -> bool {
    value
        .to_le_bytes()
        .iter()
        .all(|t| matches!(t, 0 | 1 | 4..=7))
}
