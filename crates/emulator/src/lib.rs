//! The software x86-64 engine: an interpreter implementing lodge's [`Engine`] traits for hosts
//! without usable hardware virtualization.
//!
//! * The CPU (module `cpu`) executes 64-bit long mode: it decodes guest code once with `iced-x86`
//!   into cached blocks of pre-resolved handlers, keeps arithmetic flags lazily, and reaches
//!   guest RAM through a software TLB of host pointers.
//! * Interrupts come from an emulated 8259 PIC pair and 8254 PIT ([`InterruptModel::Pic`]):
//!   CPUID reports no local APIC, so Linux runs in PIC mode.
//! * Everything that is not RAM or an engine-owned port goes to the VM's [`IoBus`].

mod cpu;
pub mod cpuid;
mod memory;
mod mmu;
mod msr;
mod pic;
mod pit;
mod platform;
mod signals;
mod tlb;

use std::sync::Arc;

use lodge_bus::{InterruptError, InterruptLine, IoBus};
use lodge_engine::{
    CpuState, Engine, EngineError, EngineKind, InterruptModel, Vcpu, VcpuExit, VcpuStopper, Vm,
    VmSpec,
};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use cpu::{CodeCache, Cpu, RunExit};
use memory::PhysicalMemory;
use signals::Signals;

/// The software engine.
#[derive(Debug, Default, Clone, Copy)]
pub struct EmulatorEngine;

impl EmulatorEngine {
    pub fn new() -> Self {
        EmulatorEngine
    }
}

impl Engine for EmulatorEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Emulator
    }

    fn create_vm(&self, spec: VmSpec) -> Result<Arc<dyn Vm>, EngineError> {
        if spec.vcpu_count != 1 {
            return Err(EngineError::Unsupported(format!(
                "The software engine runs exactly one vCPU ({} requested)",
                spec.vcpu_count
            )));
        }
        Ok(Arc::new(EmulatorVm {
            memory: spec.memory,
            io: spec.io,
            signals: Arc::new(Signals::new()),
            vcpu_created: std::sync::atomic::AtomicBool::new(false),
        }))
    }
}

/// A VM of the software engine.
pub struct EmulatorVm {
    memory: GuestMemoryMmap,
    io: Arc<IoBus>,
    signals: Arc<Signals>,
    vcpu_created: std::sync::atomic::AtomicBool,
}

impl Vm for EmulatorVm {
    fn interrupt_model(&self) -> InterruptModel {
        InterruptModel::Pic
    }

    fn interrupt_line(&self, irq: u32) -> Result<Arc<dyn InterruptLine>, EngineError> {
        if irq >= 16 || irq == 2 {
            return Err(EngineError::Unsupported(format!(
                "PIC input {irq} cannot be a device interrupt"
            )));
        }
        Ok(Arc::new(PicLine {
            irq,
            signals: self.signals.clone(),
        }))
    }

    fn register_mmio_notifier(
        &self,
        _addr: u64,
        _value: u32,
        _event: &EventFd,
    ) -> Result<bool, EngineError> {
        Ok(false)
    }

    fn create_vcpu(&self, index: u8) -> Result<Box<dyn Vcpu>, EngineError> {
        if index != 0 {
            return Err(EngineError::Unsupported(format!(
                "vCPU {index}: only vCPU 0 exists"
            )));
        }
        if self
            .vcpu_created
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Err(EngineError::Unsupported("vCPU 0 already exists".into()));
        }
        let mem = PhysicalMemory::new(self.memory.clone(), self.io.clone());
        Ok(Box::new(EmulatorVcpu {
            cpu: Box::new(Cpu::new(mem)),
            cache: CodeCache::new(),
            signals: self.signals.clone(),
        }))
    }
}

/// An input of the PIC, raised by a device.
struct PicLine {
    irq: u32,
    signals: Arc<Signals>,
}

impl InterruptLine for PicLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.signals.raise(self.irq);
        Ok(())
    }
}

/// The vCPU of the software engine.
pub struct EmulatorVcpu {
    cpu: Box<Cpu>,
    cache: CodeCache,
    signals: Arc<Signals>,
}

impl EmulatorVcpu {
    /// Instructions executed so far.
    pub fn instructions(&self) -> u64 {
        self.cpu.icount
    }
}

impl Vcpu for EmulatorVcpu {
    fn set_state(&mut self, state: &CpuState) -> Result<(), EngineError> {
        self.cpu.set_state(state);
        // Memory may have been rewritten behind the engine's back (a new image or snapshot).
        self.cache.clear(&mut self.cpu);
        Ok(())
    }

    fn state(&self) -> Result<CpuState, EngineError> {
        Ok(self.cpu.state())
    }

    fn run(&mut self) -> Result<VcpuExit, EngineError> {
        let start = std::time::Instant::now();
        let (icount, halted) = (self.cpu.icount, self.cpu.stats.halted_ns);
        let exit = self.cpu.run(&mut self.cache, &self.signals);
        let busy = start.elapsed().as_nanos() as u64 - (self.cpu.stats.halted_ns - halted);
        let executed = self.cpu.icount - icount;
        let s = self.cpu.stats;
        tracing::info!(
            "Software engine executed {executed} instructions in {:.3} s busy ({:.0} M/s), {:.3} s halted; \
             {} blocks translated ({} cached, {} instructions, {} resets), \
             {} blocks reached through links and {} through lookups, {} page walks, \
             {} TLB flushes, {} code invalidations, {} exceptions, {} interrupts",
            busy as f64 / 1e9,
            executed as f64 * 1e3 / busy.max(1) as f64,
            (s.halted_ns - halted) as f64 / 1e9,
            s.blocks_translated,
            self.cache.len(),
            self.cache.instructions(),
            s.code_cache_resets,
            s.linked_blocks,
            s.looked_up_blocks,
            s.page_walks,
            self.cpu.mmu.tlb.flushes,
            s.code_invalidations,
            s.exceptions,
            s.interrupts,
        );
        match exit {
            RunExit::Stopped => Ok(VcpuExit::Stopped),
            RunExit::Halted => Ok(VcpuExit::Halted),
            RunExit::TripleFault => Ok(VcpuExit::TripleFault),
            RunExit::Requested(request) => Ok(VcpuExit::Requested(request)),
            RunExit::Fatal(reason) => Err(EngineError::Guest {
                reason,
                state: Box::new(self.cpu.state()),
            }),
        }
    }

    fn stopper(&self) -> Arc<dyn VcpuStopper> {
        Arc::new(Stopper {
            signals: self.signals.clone(),
        })
    }
}

struct Stopper {
    signals: Arc<Signals>,
}

impl VcpuStopper for Stopper {
    fn stop(&self) {
        self.signals.stop();
    }

    fn resume(&self) {
        self.signals.resume();
    }
}
