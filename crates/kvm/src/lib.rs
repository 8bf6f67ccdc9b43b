//! The KVM engine: guest code runs on the host CPU through `/dev/kvm`.
//!
//! The VM gets KVM's in-kernel irqchip (local APICs, an I/O APIC and a PIC pair) and PIT, so
//! timers and interrupt routing never leave the kernel. Devices interrupt through irqfds and
//! queue notifications arrive on ioeventfds; only register accesses of devices reach
//! userspace, where the vCPU thread dispatches them to the [`IoBus`].

mod cpuid;
mod regs;
mod vcpu;

use std::path::Path;
use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use lodge_bus::{EventFdInterrupt, InterruptLine, IoBus};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use lodge_engine::{Engine, EngineError, EngineKind, InterruptModel, Vcpu, Vm, VmSpec};

pub use cpuid::CpuidFilter;
pub use vcpu::KvmVcpu;

/// Where the KVM TSS lives (three pages below the 4 GiB boundary, inside the MMIO gap,
/// where QEMU and Firecracker put it too).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// What kind of KVM this host offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// PVM: guest ring 0 is interpreted by the host kernel. Small guests work; Linux guests
    /// are too slow to reach userspace.
    Pvm,
}

/// Whether KVM can be used here, and which kind.
pub fn probe() -> Result<KvmFlavor, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm does not exist".into());
    }
    if let Err(e) = Kvm::new() {
        return Err(format!("/dev/kvm cannot be opened: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        Ok(KvmFlavor::Pvm)
    } else {
        Ok(KvmFlavor::Hardware)
    }
}

/// The KVM engine.
pub struct KvmEngine {
    kvm: Kvm,
    flavor: KvmFlavor,
}

impl KvmEngine {
    /// Opens `/dev/kvm` and checks the capabilities lodge relies on.
    pub fn new() -> Result<Self, EngineError> {
        let flavor = probe().map_err(EngineError::Unavailable)?;
        let kvm = Kvm::new().map_err(kvm_error("Opening /dev/kvm"))?;
        if kvm.get_api_version() != 12 {
            return Err(EngineError::Unavailable(format!(
                "KVM API version {} (expected 12)",
                kvm.get_api_version()
            )));
        }
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Pit2, "PIT"),
            (Cap::ImmediateExit, "immediate exit"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(EngineError::Unavailable(format!("KVM lacks {name}")));
            }
        }
        Ok(Self { kvm, flavor })
    }

    /// Which kind of KVM this is.
    pub fn flavor(&self) -> KvmFlavor {
        self.flavor
    }
}

impl Engine for KvmEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kvm
    }

    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, EngineError> {
        let max_vcpus = self.kvm.get_max_vcpus();
        if spec.vcpu_count == 0 || usize::from(spec.vcpu_count) > max_vcpus {
            return Err(EngineError::Unsupported(format!(
                "{} vCPUs (KVM allows 1 to {max_vcpus})",
                spec.vcpu_count
            )));
        }
        let fd = self.kvm.create_vm().map_err(kvm_error("KVM create VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_error("KVM set TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_error("KVM create irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_error("KVM create PIT"))?;
        map_memory(&fd, &spec.memory)?;

        let supported = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("KVM get supported CPUID"))?;
        Ok(Arc::new(KvmVm {
            fd,
            io: spec.io,
            supported_cpuid: supported,
            filter: CpuidFilter {
                vcpu_count: spec.vcpu_count,
                avoid_pvm_emulation_gaps: self.flavor == KvmFlavor::Pvm,
            },
            run_size: self
                .kvm
                .get_vcpu_mmap_size()
                .map_err(kvm_error("KVM get vCPU mmap size"))?,
        }))
    }
}

/// A VM inside KVM.
struct KvmVm {
    fd: VmFd,
    io: Arc<IoBus>,
    supported_cpuid: CpuId,
    filter: CpuidFilter,
    run_size: usize,
}

impl Vm for KvmVm {
    fn interrupt_model(&self) -> InterruptModel {
        InterruptModel::Apic
    }

    fn interrupt_line(&self, irq: u32) -> Result<Arc<dyn InterruptLine>, EngineError> {
        // Pins 0 and 2 belong to the in-kernel PIT and the PIC cascade.
        if irq >= 24 || irq == 0 || irq == 2 {
            return Err(EngineError::Unsupported(format!("Interrupt line {irq}")));
        }
        let event = EventFd::new(EFD_NONBLOCK).map_err(|source| EngineError::Host {
            operation: "Creating an eventfd",
            source,
        })?;
        self.fd
            .register_irqfd(&event, irq)
            .map_err(kvm_error("KVM register irqfd"))?;
        Ok(Arc::new(EventFdInterrupt::new(event)))
    }

    fn register_mmio_notifier(
        &self,
        addr: u64,
        value: u32,
        event: &EventFd,
    ) -> Result<bool, EngineError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), value)
            .map_err(kvm_error("KVM register ioeventfd"))?;
        Ok(true)
    }

    fn kernel_args(&self) -> Vec<String> {
        if self.filter.avoid_pvm_emulation_gaps {
            // PVM's instruction emulator fails on XSAVE-family instructions; the CPUID filter
            // hides XSAVE too, `noxsave` also stops the kernel probing it. Feature 114
            // (LFENCE_RDTSC) is synthetic, so only the command line can clear it.
            vec!["noxsave".into(), "clearcpuid=114".into()]
        } else {
            Vec::new()
        }
    }

    fn create_vcpu(&self, index: u8) -> Result<Box<dyn Vcpu>, EngineError> {
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_error("KVM create vCPU"))?;
        let cpuid = self.filter.apply(&self.supported_cpuid, index)?;
        let vcpu = KvmVcpu::new(fd, index, &cpuid, self.io.clone(), self.run_size)?;
        Ok(Box::new(vcpu))
    }
}

fn map_memory(fd: &VmFd, memory: &GuestMemoryMmap) -> Result<(), EngineError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory.get_host_address(region.start_addr()).map_err(|_| {
            EngineError::Unsupported("Guest memory region without host mapping".into())
        })?;
        let descriptor = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `memory`, which the VMM keeps alive for
        // as long as the VM exists; the slots do not overlap because the regions don't.
        unsafe { fd.set_user_memory_region(descriptor) }
            .map_err(kvm_error("KVM set user memory region"))?;
    }
    Ok(())
}

/// A failed KVM ioctl as the engine-neutral error (KVM's errors are errno values).
fn kvm_error(operation: &'static str) -> impl Fn(kvm_ioctls::Error) -> EngineError {
    move |source| EngineError::Host {
        operation,
        source: std::io::Error::from_raw_os_error(source.errno()),
    }
}
