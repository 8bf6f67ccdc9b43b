//! Host capacity: how many CPUs and how much memory VMs may be given.

/// Refusals, each naming the numbers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CapacityError {
    #[error(
        "VM '{vm}' asks for {cpus} vCPUs but the host has {host_cpus} CPUs \
         (start the daemon with --cpu-overcommit to allow more)"
    )]
    TooManyVcpus {
        vm: String,
        cpus: u32,
        host_cpus: u32,
    },
    #[error(
        "VM '{vm}' asks for {memory_mib} MiB of memory but the host's capacity is \
         {capacity_mib} MiB ({host_mib} MiB × overcommit ratio {ratio})"
    )]
    VmTooLarge {
        vm: String,
        memory_mib: u64,
        capacity_mib: u64,
        host_mib: u64,
        ratio: f64,
    },
    #[error(
        "Starting VM '{vm}' needs {memory_mib} MiB of memory but only {free_mib} MiB of the \
         host's {capacity_mib} MiB capacity are free ({allocated_mib} MiB allocated to active VMs; \
         {host_mib} MiB × overcommit ratio {ratio})"
    )]
    NotEnoughFree {
        vm: String,
        memory_mib: u64,
        free_mib: u64,
        capacity_mib: u64,
        allocated_mib: u64,
        host_mib: u64,
        ratio: f64,
    },
}

/// The host's CPUs and memory, and the overcommit policy.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCapacity {
    pub cpus: u32,
    pub memory_mib: u64,
    pub memory_overcommit: f64,
    pub cpu_overcommit: bool,
}

impl HostCapacity {
    /// Reads the host's CPUs (online, as this process may use them) and memory
    /// (`/proc/meminfo` MemTotal).
    pub fn detect(memory_overcommit: f64, cpu_overcommit: bool) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            cpus,
            memory_mib: lodge_contract::limits::host_memory().map_or(0, |memory| memory.mib()),
            memory_overcommit,
            cpu_overcommit,
        }
    }

    /// Memory all active VMs may use together.
    pub fn memory_capacity_mib(&self) -> u64 {
        (self.memory_mib as f64 * self.memory_overcommit).round() as u64
    }

    /// Checks a VM on its own: could it ever start on this host?
    pub fn check_vm(&self, vm: &str, cpus: u32, memory_mib: u64) -> Result<(), CapacityError> {
        if !self.cpu_overcommit && cpus > self.cpus {
            return Err(CapacityError::TooManyVcpus {
                vm: vm.to_owned(),
                cpus,
                host_cpus: self.cpus,
            });
        }
        if memory_mib > self.memory_capacity_mib() {
            return Err(CapacityError::VmTooLarge {
                vm: vm.to_owned(),
                memory_mib,
                capacity_mib: self.memory_capacity_mib(),
                host_mib: self.memory_mib,
                ratio: self.memory_overcommit,
            });
        }
        Ok(())
    }

    /// Checks starting a VM while other VMs use `allocated_mib`.
    pub fn check_start(
        &self,
        vm: &str,
        cpus: u32,
        memory_mib: u64,
        allocated_mib: u64,
    ) -> Result<(), CapacityError> {
        self.check_vm(vm, cpus, memory_mib)?;
        let capacity_mib = self.memory_capacity_mib();
        let free_mib = capacity_mib.saturating_sub(allocated_mib);
        if memory_mib > free_mib {
            return Err(CapacityError::NotEnoughFree {
                vm: vm.to_owned(),
                memory_mib,
                free_mib,
                capacity_mib,
                allocated_mib,
                host_mib: self.memory_mib,
                ratio: self.memory_overcommit,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostCapacity {
        HostCapacity {
            cpus: 2,
            memory_mib: 1000,
            memory_overcommit: 1.5,
            cpu_overcommit: false,
        }
    }

    #[test]
    fn detects_this_host() {
        let host = HostCapacity::detect(1.0, false);
        assert!(host.cpus >= 1);
        assert!(host.memory_mib >= 64, "{host:?}");
    }

    #[test]
    fn refusals_name_the_numbers() {
        let host = host();
        assert!(host.check_vm("a", 2, 1500).is_ok());
        let err = host.check_vm("a", 3, 100).unwrap_err();
        assert_eq!(
            err.to_string(),
            "VM 'a' asks for 3 vCPUs but the host has 2 CPUs \
             (start the daemon with --cpu-overcommit to allow more)"
        );
        let err = host.check_vm("a", 1, 1501).unwrap_err().to_string();
        assert!(
            err.contains("1501 MiB") && err.contains("1500 MiB") && err.contains("1.5"),
            "{err}"
        );
        assert!(host.check_start("a", 1, 500, 1000).is_ok());
        let err = host.check_start("a", 1, 501, 1000).unwrap_err().to_string();
        assert!(
            err.contains("501 MiB") && err.contains("only 500 MiB"),
            "{err}"
        );

        let overcommit = HostCapacity {
            cpu_overcommit: true,
            ..host
        };
        assert!(overcommit.check_vm("a", 32, 100).is_ok());
    }
}
