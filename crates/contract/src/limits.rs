//! The limits every layer checks a VM's settings against, and the host's memory.
//!
//! The CLI, the daemon's API and the VMM all call these checks, so a VM the daemon accepts is
//! one its VMM will build, and the messages are the same wherever a value is refused.

use crate::{ByteSize, EngineKind};

/// Least guest memory lodge accepts.
pub const MIN_MEMORY: ByteSize = ByteSize::from_bytes(64 << 20);
/// Most guest memory lodge accepts (1 PiB): far above any host, it keeps arithmetic on
/// sizes free of overflow.
pub const MAX_MEMORY: ByteSize = ByteSize::from_bytes(1 << 50);
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Longest kernel command line a user may give (`cmdline` plus `append`). The kernel takes
/// 2048 bytes in all, and the VMM adds the default command line when none is given, the
/// devices it announces (about 35 bytes per virtio device) and its engine's arguments: half
/// is left for those so a VM that passes this check always boots.
pub const MAX_USER_CMDLINE: usize = 1024;

/// A setting outside the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("Invalid vCPU count {0} (1 to {MAX_VCPUS})")]
    Vcpus(u32),
    #[error("The {engine} engine runs at most {max} vCPU(s) ({requested} requested)")]
    EngineVcpus {
        engine: EngineKind,
        max: u32,
        requested: u32,
    },
    #[error("Memory {} MiB is too small (minimum {} MiB)", .0.mib(), MIN_MEMORY.mib())]
    MemoryTooSmall(ByteSize),
    #[error("Memory {} MiB is too large (maximum {} MiB)", .0.mib(), MAX_MEMORY.mib())]
    MemoryTooLarge(ByteSize),
    #[error("Memory {} MiB is more than the host's {} MiB", .memory.mib(), .host.mib())]
    MemoryAboveHost { memory: ByteSize, host: ByteSize },
    #[error("Kernel command line is {0} bytes (at most {MAX_USER_CMDLINE})")]
    CmdlineTooLong(usize),
    #[error("Kernel command line contains a NUL byte")]
    CmdlineNul,
}

/// Most vCPUs `engine` runs.
pub fn max_vcpus(engine: EngineKind) -> u32 {
    match engine {
        EngineKind::Kvm => MAX_VCPUS,
        // One vCPU until the software engine has local APICs and SMP.
        EngineKind::Emulator => 1,
    }
}

/// Checks a vCPU count, for `engine` when it is known.
pub fn check_vcpus(cpus: u32, engine: Option<EngineKind>) -> Result<(), LimitError> {
    if cpus == 0 || cpus > MAX_VCPUS {
        return Err(LimitError::Vcpus(cpus));
    }
    match engine {
        Some(engine) if cpus > max_vcpus(engine) => Err(LimitError::EngineVcpus {
            engine,
            max: max_vcpus(engine),
            requested: cpus,
        }),
        _ => Ok(()),
    }
}

/// Checks a guest memory size against lodge's limits (not against the host).
pub fn check_memory(memory: ByteSize) -> Result<(), LimitError> {
    if memory < MIN_MEMORY {
        Err(LimitError::MemoryTooSmall(memory))
    } else if memory > MAX_MEMORY {
        Err(LimitError::MemoryTooLarge(memory))
    } else {
        Ok(())
    }
}

/// Checks that `memory` fits in the host's RAM (`host`, from [`host_memory`]).
pub fn check_memory_on_host(memory: ByteSize, host: Option<ByteSize>) -> Result<(), LimitError> {
    match host {
        Some(host) if memory > host => Err(LimitError::MemoryAboveHost { memory, host }),
        _ => Ok(()),
    }
}

/// Checks what a user adds to the kernel command line.
pub fn check_cmdline(cmdline: Option<&str>, append: &[String]) -> Result<(), LimitError> {
    let length = cmdline.map_or(0, str::len) + append.iter().map(|a| a.len() + 1).sum::<usize>();
    if length > MAX_USER_CMDLINE {
        return Err(LimitError::CmdlineTooLong(length));
    }
    if cmdline
        .into_iter()
        .chain(append.iter().map(String::as_str))
        .any(|t| t.contains('\0'))
    {
        return Err(LimitError::CmdlineNul);
    }
    Ok(())
}

/// Total RAM of this host (`/proc/meminfo` MemTotal), or None when it cannot be read.
pub fn host_memory() -> Option<ByteSize> {
    parse_meminfo_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo_total(meminfo: &str) -> Option<ByteSize> {
    let kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024).map(ByteSize::from_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(n: u64) -> ByteSize {
        ByteSize::from_mib(n).unwrap()
    }

    #[test]
    fn vcpus_are_checked_per_engine() {
        assert_eq!(check_vcpus(1, None), Ok(()));
        assert_eq!(check_vcpus(32, Some(EngineKind::Kvm)), Ok(()));
        assert_eq!(check_vcpus(0, None), Err(LimitError::Vcpus(0)));
        assert_eq!(
            check_vcpus(33, None).unwrap_err().to_string(),
            "Invalid vCPU count 33 (1 to 32)"
        );
        assert_eq!(
            check_vcpus(2, Some(EngineKind::Emulator))
                .unwrap_err()
                .to_string(),
            "The emulator engine runs at most 1 vCPU(s) (2 requested)"
        );
    }

    #[test]
    fn memory_is_checked_against_limits_and_host() {
        assert_eq!(check_memory(mib(64)), Ok(()));
        assert_eq!(
            check_memory(mib(16)).unwrap_err().to_string(),
            "Memory 16 MiB is too small (minimum 64 MiB)"
        );
        assert!(check_memory(ByteSize::from_bytes(u64::MAX)).is_err());
        assert_eq!(check_memory_on_host(mib(100), Some(mib(100))), Ok(()));
        assert_eq!(check_memory_on_host(mib(100), None), Ok(()));
        assert_eq!(
            check_memory_on_host(mib(1 << 20), Some(mib(16384)))
                .unwrap_err()
                .to_string(),
            "Memory 1048576 MiB is more than the host's 16384 MiB"
        );
    }

    #[test]
    fn cmdline_length_and_nul_are_checked() {
        assert_eq!(check_cmdline(Some("quiet"), &["a=b".into()]), Ok(()));
        assert_eq!(
            check_cmdline(Some(&"x".repeat(1000)), &["y".repeat(100)]),
            Err(LimitError::CmdlineTooLong(1101))
        );
        assert_eq!(
            check_cmdline(None, &["a\0b".into()]),
            Err(LimitError::CmdlineNul)
        );
    }

    #[test]
    fn host_memory_is_read() {
        assert_eq!(
            parse_meminfo_total("MemFree: 1 kB\nMemTotal:  2048 kB\n"),
            Some(mib(2))
        );
        assert_eq!(parse_meminfo_total("MemTotal: lots\n"), None);
        assert!(host_memory().unwrap() > MIN_MEMORY);
    }
}
