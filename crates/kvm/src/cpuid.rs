//! The CPUID a KVM guest sees.
//!
//! Start from `KVM_GET_SUPPORTED_CPUID` (what both the host CPU and KVM can give a guest) and
//! change only what must describe this VM rather than the host:
//!
//! | leaf | change | why |
//! |---|---|---|
//! | 0x1 | EBX[31:24] = vCPU index, EBX[23:16] = vCPU count, ECX.HYPERVISOR set, ECX.MONITOR cleared | APIC IDs match the MP table; guests know they are virtual; MWAIT would halt the vCPU inside KVM |
//! | 0x4 | EAX[31:26] = vCPU count − 1, EAX[25:14] = 0 | one core per vCPU, no SMT siblings |
//! | 0x6 | zeroed | no thermal or power management |
//! | 0xa | zeroed | no PMU: guests must not program host counters |
//! | 0xb | one SMT level of width 1, one core level of width `count`; EDX = x2APIC ID | topology matches leaf 0x4 |
//!
//! On PVM hosts (whose instruction emulator fails on some instructions at guest ring 0) it also
//! hides XSAVE/OSXSAVE and leaf 0xd, POPCNT, SMEP, SMAP, FSGSBASE, RDPID and RDTSCP.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use lodge_engine::EngineError;

/// Rewrites the supported CPUID list for one vCPU of a VM.
#[derive(Debug, Clone, Copy)]
pub struct CpuidFilter {
    /// vCPUs in the VM.
    pub vcpu_count: u8,
    /// Hide the features PVM's emulator cannot handle.
    pub avoid_pvm_emulation_gaps: bool,
}

const ECX_MONITOR: u32 = 1 << 3;
const ECX_POPCNT: u32 = 1 << 23;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF7_EBX_FSGSBASE: u32 = 1 << 0;
const LEAF7_EBX_SMEP: u32 = 1 << 7;
const LEAF7_EBX_SMAP: u32 = 1 << 20;
const LEAF7_ECX_RDPID: u32 = 1 << 22;
const EXT_EDX_RDTSCP: u32 = 1 << 27;

impl CpuidFilter {
    /// The CPUID for vCPU `index`.
    pub fn apply(&self, supported: &CpuId, index: u8) -> Result<CpuId, EngineError> {
        let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
        for entry in &mut entries {
            self.filter_entry(entry, index);
        }
        CpuId::from_entries(&entries)
            .map_err(|_| EngineError::Unsupported("Too many CPUID entries".into()))
    }

    fn filter_entry(&self, entry: &mut kvm_cpuid_entry2, index: u8) {
        let count = u32::from(self.vcpu_count);
        match entry.function {
            0x1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (count << 16);
                entry.ecx = (entry.ecx | ECX_HYPERVISOR) & !ECX_MONITOR;
                if self.avoid_pvm_emulation_gaps {
                    entry.ecx &= !(ECX_POPCNT | ECX_XSAVE | ECX_OSXSAVE);
                }
            }
            0x4 => {
                entry.eax = (entry.eax & 0x0000_3fff) | ((count - 1) << 26);
            }
            0x6 | 0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x7 if entry.index == 0 && self.avoid_pvm_emulation_gaps => {
                entry.ebx &= !(LEAF7_EBX_FSGSBASE | LEAF7_EBX_SMEP | LEAF7_EBX_SMAP);
                entry.ecx &= !LEAF7_ECX_RDPID;
            }
            0xb => {
                // Level type in ECX[15:8]: 1 = SMT, 2 = core.
                let (shift, logical, level_type) = match entry.index {
                    0 => (0, 1, 1),
                    1 => (bit_width(count), count, 2),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = logical;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
                entry.edx = u32::from(index);
            }
            0xd if self.avoid_pvm_emulation_gaps => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0x8000_0001 if self.avoid_pvm_emulation_gaps => {
                entry.edx &= !EXT_EDX_RDTSCP;
            }
            _ => {}
        }
    }
}

/// Bits needed to number `count` items (the x2APIC ID shift for a topology level).
fn bit_width(count: u32) -> u32 {
    32 - count.saturating_sub(1).leading_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            entry(
                0x1,
                0,
                [
                    0x906ea,
                    0xff00_0800,
                    ECX_MONITOR | ECX_POPCNT | ECX_XSAVE,
                    0,
                ],
            ),
            entry(0x6, 0, [1, 2, 3, 4]),
            entry(
                0x7,
                0,
                [
                    0,
                    LEAF7_EBX_SMEP | LEAF7_EBX_SMAP | 1 << 3,
                    LEAF7_ECX_RDPID,
                    0,
                ],
            ),
            entry(0xb, 0, [9, 9, 9, 9]),
            entry(0xb, 1, [9, 9, 9, 9]),
            entry(0x8000_0001, 0, [0, 0, 0, EXT_EDX_RDTSCP | 1 << 29]),
        ])
        .unwrap()
    }

    #[test]
    fn identifies_the_vcpu_and_the_hypervisor() {
        let filter = CpuidFilter {
            vcpu_count: 4,
            avoid_pvm_emulation_gaps: false,
        };
        let cpuid = filter.apply(&host(), 2).unwrap();
        let leaf1 = find(&cpuid, 0x1, 0);
        assert_eq!(leaf1.ebx >> 24, 2);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ecx & ECX_MONITOR, 0);
        assert_ne!(leaf1.ecx & ECX_POPCNT, 0, "only PVM hides POPCNT");
        assert_eq!(find(&cpuid, 0x6, 0).eax, 0);
        let core_level = find(&cpuid, 0xb, 1);
        assert_eq!((core_level.eax, core_level.ebx, core_level.edx), (2, 4, 2));
        assert_eq!(core_level.ecx, (2 << 8) | 1);
    }

    #[test]
    fn hides_what_pvm_cannot_emulate() {
        let filter = CpuidFilter {
            vcpu_count: 1,
            avoid_pvm_emulation_gaps: true,
        };
        let cpuid = filter.apply(&host(), 0).unwrap();
        assert_eq!(find(&cpuid, 0x1, 0).ecx & (ECX_POPCNT | ECX_XSAVE), 0);
        let leaf7 = find(&cpuid, 0x7, 0);
        assert_eq!(leaf7.ebx, 1 << 3, "unrelated leaf 7 features stay");
        assert_eq!(leaf7.ecx, 0);
        assert_eq!(find(&cpuid, 0x8000_0001, 0).edx, 1 << 29);
    }

    #[test]
    fn bit_width_matches_topology_shifts() {
        assert_eq!(bit_width(1), 0);
        assert_eq!(bit_width(2), 1);
        assert_eq!(bit_width(3), 2);
        assert_eq!(bit_width(4), 2);
        assert_eq!(bit_width(5), 3);
    }
}
