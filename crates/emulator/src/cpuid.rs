//! What CPUID reports: exactly the features the engine implements.
//!
//! The guest sees a GenuineIntel family-6 CPU at the x86-64-v2 level (MMX, SSE to SSE4.2,
//! POPCNT, CMPXCHG16B, LAHF/SAHF), no local APIC (the PIC is the interrupt controller), no
//! XSAVE or AVX, and a TSC whose frequency is given in leaf 0x15 so Linux trusts it instead of
//! calibrating.
//!
//! SSE3 and SSE4.1 floating-point instructions (HADDPS, ROUNDPS, ...) run on the host's FPU
//! like the SSE2 ones do, so the SSE3-SSE4.2 group is reported only when the host has SSE4.1
//! (every x86-64 CPU since 2008); without it the guest sees an SSE2 CPU.

use iced_x86::CpuidFeature;

/// TSC frequency reported to the guest (Hz): the TSC counts nanoseconds.
pub const TSC_HZ: u64 = 1_000_000_000;

const FAMILY: u32 = 6;
const MODEL: u32 = 0x3f;
const STEPPING: u32 = 2;

/// Leaf 1 EDX.
mod edx1 {
    pub const FPU: u32 = 1 << 0;
    pub const PSE: u32 = 1 << 3;
    pub const TSC: u32 = 1 << 4;
    pub const MSR: u32 = 1 << 5;
    pub const PAE: u32 = 1 << 6;
    pub const CX8: u32 = 1 << 8;
    pub const PGE: u32 = 1 << 13;
    pub const CMOV: u32 = 1 << 15;
    pub const PAT: u32 = 1 << 16;
    pub const CLFSH: u32 = 1 << 19;
    pub const FXSR: u32 = 1 << 24;
    pub const MMX: u32 = 1 << 23;
    pub const SSE: u32 = 1 << 25;
    pub const SSE2: u32 = 1 << 26;
}

/// Leaf 1 ECX.
mod ecx1 {
    pub const SSE3: u32 = 1 << 0;
    pub const SSSE3: u32 = 1 << 9;
    pub const SSE4_1: u32 = 1 << 19;
    pub const SSE4_2: u32 = 1 << 20;
    pub const CX16: u32 = 1 << 13;
    pub const POPCNT: u32 = 1 << 23;
}

/// Leaf 0x8000_0001 EDX and ECX.
mod ext1 {
    pub const SYSCALL: u32 = 1 << 11;
    pub const NX: u32 = 1 << 20;
    pub const PAGE_1GB: u32 = 1 << 26;
    pub const RDTSCP: u32 = 1 << 27;
    pub const LM: u32 = 1 << 29;
    pub const LAHF_LM: u32 = 1 << 0;
    pub const LZCNT: u32 = 1 << 5;
}

/// Leaf 7 EBX/EDX: string-operation hints (no new instructions).
mod leaf7 {
    pub const ERMS: u32 = 1 << 9;
    pub const FSRM: u32 = 1 << 4;
}

/// Returns EAX, EBX, ECX, EDX for CPUID leaf `leaf`, subleaf `subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    match leaf {
        0 => {
            let v = vendor(b"GenuineIntel");
            [0x16, v[0], v[2], v[1]]
        }
        1 => {
            let eax = (STEPPING) | ((MODEL & 0xf) << 4) | (FAMILY << 8) | ((MODEL >> 4) << 16);
            // CLFLUSH line size 8 * 8 = 64 bytes, one logical processor, APIC ID 0.
            let ebx = (8 << 8) | (1 << 16);
            let mut ecx = ecx1::CX16 | ecx1::POPCNT;
            if host_runs_sse4() {
                ecx |= ecx1::SSE3 | ecx1::SSSE3 | ecx1::SSE4_1 | ecx1::SSE4_2;
            }
            let edx = edx1::FPU
                | edx1::PSE
                | edx1::TSC
                | edx1::MSR
                | edx1::PAE
                | edx1::CX8
                | edx1::PGE
                | edx1::CMOV
                | edx1::MMX
                | edx1::PAT
                | edx1::CLFSH
                | edx1::FXSR
                | edx1::SSE
                | edx1::SSE2;
            [eax, ebx, ecx, edx]
        }
        7 if subleaf == 0 => [0, leaf7::ERMS, 0, leaf7::FSRM],
        // Core crystal 1 GHz, TSC/crystal ratio 1/1: the TSC runs at 1 GHz.
        0x15 => [1, 1, TSC_HZ as u32, 0],
        // Base, maximum and bus frequencies in MHz.
        0x16 => [
            (TSC_HZ / 1_000_000) as u32,
            (TSC_HZ / 1_000_000) as u32,
            100,
            0,
        ],
        0x8000_0000 => [0x8000_0008, 0, 0, 0],
        0x8000_0001 => [
            0,
            0,
            ext1::LAHF_LM | ext1::LZCNT,
            ext1::SYSCALL | ext1::NX | ext1::PAGE_1GB | ext1::RDTSCP | ext1::LM,
        ],
        0x8000_0002..=0x8000_0004 => brand(leaf - 0x8000_0002),
        // Invariant TSC.
        0x8000_0007 => [0, 0, 0, 1 << 8],
        // 48-bit linear, 40-bit physical addresses.
        0x8000_0008 => [(48 << 8) | crate::mmu::PHYS_ADDR_BITS, 0, 0, 0],
        _ => [0; 4],
    }
}

fn vendor(name: &[u8; 12]) -> [u32; 3] {
    let word = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
    [word(0), word(4), word(8)]
}

fn brand(part: u32) -> [u32; 4] {
    let mut text = [0u8; 48];
    let name = b"lodge software x86-64 CPU";
    text[..name.len()].copy_from_slice(name);
    let chunk = &text[(part as usize) * 16..(part as usize + 1) * 16];
    let word = |i: usize| u32::from_le_bytes([chunk[i], chunk[i + 1], chunk[i + 2], chunk[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// Whether an instruction needing `feature` may run. Instructions needing anything else raise
/// #UD, as on a CPU without the feature.
pub fn supports(feature: CpuidFeature) -> bool {
    use CpuidFeature::*;
    if matches!(feature, SSE3 | SSSE3 | SSE4_1 | SSE4_2) {
        return host_runs_sse4();
    }
    matches!(
        feature,
        INTEL8086
            | INTEL186
            | INTEL286
            | INTEL386
            | INTEL486
            | LZCNT
            | MMX
            | X64
            | CPUID
            | CMOV
            | CX8
            | CMPXCHG16B
            | CLFSH
            | FPU
            | FPU287
            | FPU387
            | FXSR
            | MSR
            | MULTIBYTENOP
            | PAUSE
            | POPCNT
            | RDTSCP
            | SSE
            | SSE2
            | SYSCALL
            | TSC
    )
}

/// Whether the host can run the SSE3 and SSE4.1 floating-point instructions the engine
/// executes on its behalf.
fn host_runs_sse4() -> bool {
    std::arch::is_x86_feature_detected!("sse3") && std::arch::is_x86_feature_detected!("sse4.1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_intel_with_tsc_frequency() {
        let [max, ebx, ecx, edx] = cpuid(0, 0);
        assert!(max >= 0x15);
        let mut name = Vec::new();
        for r in [ebx, edx, ecx] {
            name.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(name, b"GenuineIntel");
        let [den, num, hz, _] = cpuid(0x15, 0);
        assert_eq!(u64::from(hz) * u64::from(num) / u64::from(den), TSC_HZ);
    }

    #[test]
    fn no_apic_no_xsave_but_long_mode() {
        let [_, _, ecx, edx] = cpuid(1, 0);
        assert_eq!(edx & (1 << 9), 0, "APIC");
        assert_eq!(ecx & (1 << 26), 0, "XSAVE");
        assert_ne!(edx & edx1::SSE2, 0);
        assert_ne!(cpuid(0x8000_0001, 0)[3] & ext1::LM, 0);
        assert!(supports(CpuidFeature::SSE2));
        assert!(!supports(CpuidFeature::AVX));
    }

    #[test]
    fn reports_the_x86_64_v2_level() {
        let [_, _, ecx, edx] = cpuid(1, 0);
        assert_ne!(edx & edx1::MMX, 0, "MMX");
        assert_ne!(ecx & ecx1::POPCNT, 0);
        assert_ne!(ecx & ecx1::CX16, 0);
        assert_ne!(cpuid(0x8000_0001, 0)[2] & ext1::LAHF_LM, 0);
        if host_runs_sse4() {
            for bit in [ecx1::SSE3, ecx1::SSSE3, ecx1::SSE4_1, ecx1::SSE4_2] {
                assert_ne!(ecx & bit, 0, "bit {bit:#x}");
            }
            assert!(supports(CpuidFeature::SSE4_2));
        } else {
            println!("host has no SSE4.1: the engine reports an SSE2 CPU");
        }
        // Nothing beyond v2.
        assert_eq!(ecx & (1 << 28), 0, "AVX");
        assert_eq!(ecx & (1 << 12), 0, "FMA");
        assert_eq!(ecx & (1 << 22), 0, "MOVBE");
        assert_eq!(
            cpuid(7, 0)[1] & ((1 << 3) | (1 << 5) | (1 << 8)),
            0,
            "BMI1/AVX2/BMI2"
        );
    }
}
