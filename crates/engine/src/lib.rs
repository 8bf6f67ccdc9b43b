//! The CPU engine seam.
//!
//! Everything above this crate (memory layout, boot parameters, devices) is shared by all
//! engines. An engine decides only how a vCPU runs guest code and how an interrupt reaches it:
//!
//! * [`Engine`] creates a [`Vm`] for a guest memory map and an [`IoBus`];
//! * a [`Vm`] hands out [`InterruptLine`]s and [`Vcpu`]s;
//! * a [`Vcpu`] runs until something the VMM must decide on happens ([`VcpuExit`]), handling
//!   port and MMIO accesses itself by calling the [`IoBus`].
//!
//! Engines: the KVM engine (`lodge-kvm`, hardware virtualization) and the software engine
//! (`lodge-emulator`). Neither is a dependency of this crate, so each compiles only what it
//! uses.

mod state;

use std::sync::Arc;

use lodge_bus::{InterruptLine, IoBus, MachineRequest};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use lodge_contract::EngineKind;
pub use state::{CpuState, DescriptorTable, Registers, Segment, SpecialRegisters};

/// How interrupts reach the vCPUs; the VMM builds the firmware tables to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptModel {
    /// Local APICs, an I/O APIC (24 pins) and a legacy PIC. The VMM writes an MP table so the
    /// guest finds the I/O APIC.
    Apic,
    /// A legacy 8259 PIC pair (16 lines) and an 8254 PIT; CPUID reports no APIC and no MP
    /// table is written. Single vCPU only.
    Pic,
}

impl InterruptModel {
    /// Interrupt lines of the controller devices are wired to (I/O APIC pins or PIC inputs);
    /// which device gets which line is the VMM's layout.
    pub fn lines(self) -> u32 {
        match self {
            InterruptModel::Apic => 24,
            InterruptModel::Pic => 16,
        }
    }
}

/// What an engine needs to create a VM.
pub struct VmSpec {
    /// Guest RAM; addresses outside it are MMIO.
    pub memory: GuestMemoryMmap,
    /// Number of vCPUs the VM will have.
    pub vcpu_count: u8,
    /// Where vCPUs send port and MMIO accesses.
    pub io: Arc<IoBus>,
}

/// A CPU engine.
pub trait Engine: Send + Sync {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;

    /// Creates a VM with the given memory and buses.
    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, EngineError>;
}

/// One VM inside an engine.
pub trait Vm: Send + Sync {
    /// How interrupts are delivered.
    fn interrupt_model(&self) -> InterruptModel;

    /// The line a device raises to interrupt the guest on `irq` (a PIC line or I/O APIC pin).
    fn interrupt_line(&self, irq: u32) -> Result<Arc<dyn InterruptLine>, EngineError>;

    /// Asks the engine to signal `event` directly when the guest writes `value` (4 bytes) to the
    /// MMIO address `addr`, without a trip through the [`IoBus`] (a KVM ioeventfd).
    ///
    /// Returns `Ok(false)` when the engine has no such fast path; the write then reaches the
    /// bus and the device signals the event itself.
    fn register_mmio_notifier(
        &self,
        addr: u64,
        value: u32,
        event: &EventFd,
    ) -> Result<bool, EngineError>;

    /// Extra kernel command-line arguments this engine needs (for example to avoid
    /// instructions a hypervisor cannot emulate).
    fn kernel_args(&self) -> Vec<String> {
        Vec::new()
    }

    /// Creates vCPU number `index` (0 is the boot processor).
    fn create_vcpu(&self, index: u8) -> Result<Box<dyn Vcpu>, EngineError>;
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// [`VcpuStopper::stop`] was called; the vCPU can be run again.
    Stopped,
    /// The guest halted with interrupts disabled: nothing can wake it.
    Halted,
    /// The guest triple-faulted (a CPU reset on real hardware).
    TripleFault,
    /// The guest asked for a reset or power-off through the engine (not through a device).
    Shutdown,
    /// A device asked for a [`MachineRequest`] during the last access; the instruction that
    /// made it completed and nothing after it ran.
    Requested(MachineRequest),
}

/// A virtual CPU. Owned by one thread at a time.
pub trait Vcpu: Send {
    /// Sets the register state the vCPU starts from.
    fn set_state(&mut self, state: &CpuState) -> Result<(), EngineError>;

    /// Reads the current register state.
    fn state(&self) -> Result<CpuState, EngineError>;

    /// Runs guest code until an exit the VMM must handle. Port and MMIO accesses are sent to
    /// the VM's [`IoBus`] without returning.
    fn run(&mut self) -> Result<VcpuExit, EngineError>;

    /// A handle other threads use to make [`Vcpu::run`] return [`VcpuExit::Stopped`].
    fn stopper(&self) -> Arc<dyn VcpuStopper>;
}

/// Stops a running vCPU from another thread.
pub trait VcpuStopper: Send + Sync {
    /// Makes the current or next [`Vcpu::run`] call return [`VcpuExit::Stopped`] promptly, even
    /// if the guest is halted waiting for an interrupt.
    fn stop(&self);

    /// Clears a stop request so the vCPU can run again.
    fn resume(&self);
}

/// Errors from an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot be used on this host.
    #[error("Engine unavailable: {0}")]
    Unavailable(String),
    /// A host system call (an ioctl on `/dev/kvm`, say) failed.
    #[error("{operation} failed")]
    Host {
        /// What was being done, capitalized ("Creating an eventfd").
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The requested configuration is not supported by this engine.
    #[error("Unsupported configuration: {0}")]
    Unsupported(String),
    /// The guest did something the engine cannot continue from.
    #[error("Guest failure: {reason}\n{state}")]
    Guest {
        reason: String,
        state: Box<CpuState>,
    },
}
