//! A KVM vCPU: its boot-time setup, the run loop and how other threads stop it.

use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use lodge_bus::IoBus;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::kvm_error;
use super::regs::{apply_sregs, cpu_state, to_kvm_regs};
use lodge_engine::{CpuState, EngineError, Vcpu, VcpuExit, VcpuStopper};

/// MSRs set before the first run, as a BIOS would leave them for Linux.
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),           // IA32_SYSENTER_CS
    (0x175, 0),           // IA32_SYSENTER_ESP
    (0x176, 0),           // IA32_SYSENTER_EIP
    (0xc000_0081, 0),     // STAR
    (0xc000_0082, 0),     // LSTAR
    (0xc000_0083, 0),     // CSTAR
    (0xc000_0084, 0),     // SFMASK
    (0xc000_0102, 0),     // KERNEL_GS_BASE
    (0x10, 0),            // IA32_TSC
    (0x1a0, 1),           // IA32_MISC_ENABLE: fast strings
    (0x2ff, 1 << 11 | 6), // MTRRdefType: MTRRs on, default write-back
];

/// Local APIC register offsets and delivery modes for LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// A vCPU backed by a KVM vCPU fd.
pub struct KvmVcpu {
    fd: VcpuFd,
    io: Arc<IoBus>,
    stopper: Arc<KvmStopper>,
    /// The vCPU's `kvm_run` mapping, for fields `VcpuFd::run` does not expose.
    run_ptr: *mut kvm_run,
}

// SAFETY: `run_ptr` points into the vCPU's own mmap, which lives as long as `fd` and is only
// dereferenced by the thread that currently owns the `KvmVcpu` (in `run`).
unsafe impl Send for KvmVcpu {}

impl KvmVcpu {
    pub(super) fn new(
        mut fd: VcpuFd,
        index: u8,
        cpuid: &CpuId,
        io: Arc<IoBus>,
        run_size: usize,
    ) -> Result<Self, EngineError> {
        // The CPUID must be in place before the guest enters long mode (KVM on PVM relies on it).
        fd.set_cpuid2(cpuid).map_err(kvm_error("KVM set CPUID"))?;
        set_boot_msrs(&fd)?;
        set_local_interrupts(&fd)?;
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(kvm_error("KVM set FPU"))?;
        install_kick_handler()?;
        let run_ptr = fd.get_kvm_run() as *mut kvm_run;
        tracing::debug!(index, run_size, "KVM vCPU created");
        Ok(Self {
            fd,
            io,
            stopper: Arc::new(KvmStopper::default()),
            run_ptr,
        })
    }

    fn guest_failure(&self, reason: String) -> EngineError {
        match self.state() {
            Ok(state) => EngineError::Guest {
                reason,
                state: Box::new(state),
            },
            Err(e) => EngineError::Unsupported(format!("{reason} (registers unreadable: {e})")),
        }
    }

    fn internal_error_suberror(&self) -> u32 {
        // SAFETY: called right after KVM_EXIT_INTERNAL_ERROR, so `internal` is active.
        unsafe { (*self.run_ptr).__bindgen_anon_1.internal.suberror }
    }
}

impl Vcpu for KvmVcpu {
    fn set_state(&mut self, state: &CpuState) -> Result<(), EngineError> {
        let mut sregs = self.fd.get_sregs().map_err(kvm_error("KVM get sregs"))?;
        apply_sregs(&mut sregs, &state.sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_error("KVM set sregs"))?;
        self.fd
            .set_regs(&to_kvm_regs(&state.regs))
            .map_err(kvm_error("KVM set regs"))
    }

    fn state(&self) -> Result<CpuState, EngineError> {
        let regs = self.fd.get_regs().map_err(kvm_error("KVM get regs"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_error("KVM get sregs"))?;
        Ok(cpu_state(&regs, &sregs))
    }

    fn run(&mut self) -> Result<VcpuExit, EngineError> {
        let _running = self.stopper.enter(self.run_ptr);
        loop {
            if self.stopper.requested.load(Ordering::Acquire) {
                return Ok(VcpuExit::Stopped);
            }
            let failure = match self.fd.run() {
                Ok(KvmExit::IoIn(port, data)) => {
                    // SAFETY: this is the exit `run` just returned.
                    let element_size = unsafe { io_element_size(self.run_ptr) };
                    for element in data.chunks_mut(element_size) {
                        self.io.pio_read(port, element);
                    }
                    continue;
                }
                Ok(KvmExit::IoOut(port, data)) => {
                    // SAFETY: this is the exit `run` just returned.
                    let element_size = unsafe { io_element_size(self.run_ptr) };
                    for element in data.chunks(element_size) {
                        self.io.pio_write(port, element);
                    }
                    match self.io.requests.pending() {
                        Some(request) => return Ok(VcpuExit::Requested(request)),
                        None => continue,
                    }
                }
                Ok(KvmExit::MmioRead(addr, data)) => {
                    self.io.mmio_read(addr, data);
                    continue;
                }
                Ok(KvmExit::MmioWrite(addr, data)) => {
                    self.io.mmio_write(addr, data);
                    match self.io.requests.pending() {
                        Some(request) => return Ok(VcpuExit::Requested(request)),
                        None => continue,
                    }
                }
                Ok(KvmExit::Hlt) => return Ok(VcpuExit::Halted),
                Ok(KvmExit::Shutdown) => return Ok(VcpuExit::TripleFault),
                Ok(KvmExit::SystemEvent(
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET,
                    _,
                )) => return Ok(VcpuExit::Shutdown),
                Ok(KvmExit::Intr) => continue,
                Ok(KvmExit::InternalError) => {
                    let suberror = self.internal_error_suberror();
                    format!(
                        "KVM internal error (suberror {suberror}: {})",
                        describe_suberror(suberror)
                    )
                }
                Ok(KvmExit::FailEntry(reason, cpu)) => {
                    format!("KVM entry failed (hardware reason {reason:#x} on CPU {cpu})")
                }
                Ok(other) => format!("Unexpected KVM exit {other:?}"),
                Err(e) if e.errno() == libc::EINTR => {
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(source) => return Err(kvm_error("KVM run vCPU")(source)),
            };
            return Err(self.guest_failure(failure));
        }
    }

    fn stopper(&self) -> Arc<dyn VcpuStopper> {
        self.stopper.clone()
    }
}

/// Stops a KVM vCPU by setting a flag and kicking its thread out of `KVM_RUN` with a signal.
///
/// A guest `hlt` does not exit to userspace when the irqchip is in the kernel, so the flag
/// alone would never be seen; the signal makes `KVM_RUN` return `EINTR`. Its handler also sets
/// `immediate_exit` so a signal landing between the flag check and the ioctl is not lost.
#[derive(Default)]
pub(super) struct KvmStopper {
    requested: AtomicBool,
    /// The thread inside `run`, if any. Held locked while signalling so the thread cannot
    /// leave `run` (and exit) in between.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KvmStopper {
    fn enter(&self, run_ptr: *mut kvm_run) -> RunningGuard<'_> {
        KVM_RUN.with(|cell| cell.set(run_ptr));
        // SAFETY: pthread_self has no preconditions.
        let this_thread = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(this_thread);
        RunningGuard { stopper: self }
    }
}

impl VcpuStopper for KvmStopper {
    fn stop(&self) {
        self.requested.store(true, Ordering::Release);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: the thread is alive: it is inside `run`, and it cannot clear its entry
            // (and go on to exit) while we hold the lock.
            unsafe { libc::pthread_kill(thread, SIGRTMIN()) };
        }
    }

    fn resume(&self) {
        self.requested.store(false, Ordering::Release);
    }
}

struct RunningGuard<'a> {
    stopper: &'a KvmStopper,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        *self
            .stopper
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        KVM_RUN.with(|cell| cell.set(null_mut()));
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|cell| {
        let run = cell.get();
        if !run.is_null() {
            // SAFETY: the pointer was set by this thread's `run` and is cleared before the
            // vCPU (and its mapping) can go away; a volatile byte store is signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

fn install_kick_handler() -> Result<(), EngineError> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), handle_kick).map_err(|e| EngineError::Host {
            operation: "Installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        });
    });
    result
}

fn set_boot_msrs(fd: &VcpuFd) -> Result<(), EngineError> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|_| EngineError::Unsupported("Too many boot MSRs".into()))?;
    let written = fd.set_msrs(&msrs).map_err(kvm_error("KVM set MSRs"))?;
    if written != entries.len() {
        let failed = entries.get(written).map_or(0, |e| e.index);
        return Err(EngineError::Unsupported(format!(
            "KVM refused MSR {failed:#x}"
        )));
    }
    Ok(())
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a BIOS does for virtual-wire mode.
fn set_local_interrupts(fd: &VcpuFd) -> Result<(), EngineError> {
    let mut lapic = fd.get_lapic().map_err(kvm_error("KVM get LAPIC"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: &mut [i8] = &mut lapic.regs[offset..offset + 4];
        let mut value = u32::from_le_bytes([
            bytes[0] as u8,
            bytes[1] as u8,
            bytes[2] as u8,
            bytes[3] as u8,
        ]);
        value = (value & !0x700) | (mode << 8);
        for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *dst = src as i8;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_error("KVM set LAPIC"))
}

/// The size of one element of the port access (`rep ins`/`outs` move several) that the last
/// `KVM_RUN` exited for.
///
/// # Safety
/// `run` must be the vCPU's live `kvm_run` mapping and its last exit a `KVM_EXIT_IO`, so that
/// `io` is the active union member.
unsafe fn io_element_size(run: *const kvm_run) -> usize {
    // SAFETY: guaranteed by the caller; `size` lies apart from the data KVM exposes as a slice.
    usize::from(unsafe { (*run).__bindgen_anon_1.io.size }).max(1)
}

fn describe_suberror(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        _ => "unknown",
    }
}
