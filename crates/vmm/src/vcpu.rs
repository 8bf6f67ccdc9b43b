//! vCPU threads: each runs its vCPU until the guest or the VMM ends it, and parks while the
//! VM is paused.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lodge_bus::MachineRequest;
use lodge_engine::{Vcpu, VcpuExit, VcpuStopper};

use crate::exit::{ExitReason, ExitSignal};

/// Shared run state of all vCPUs: running, paused or shutting down.
#[derive(Default)]
pub struct VcpuGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
struct GateState {
    paused: bool,
    exiting: bool,
    /// vCPU threads that have not returned.
    live: usize,
    /// Of those, the ones waiting in `park`.
    parked: usize,
}

/// Returned by [`VcpuGate::pause`] when a vCPU keeps running past the deadline.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{running} of {live} vCPUs still running after {timeout:?}")]
pub struct PauseTimeout {
    pub running: usize,
    pub live: usize,
    pub timeout: Duration,
}

impl VcpuGate {
    /// Pauses every vCPU and waits up to `timeout` until each has parked, so that when it
    /// returns `Ok` no guest code runs until [`VcpuGate::resume`]. On a timeout the pause
    /// stays in effect and the late vCPUs park when they next leave the engine.
    pub fn pause(
        &self,
        stoppers: &[Arc<dyn VcpuStopper>],
        timeout: Duration,
    ) -> Result<(), PauseTimeout> {
        let mut state = self.lock();
        state.paused = true;
        // Stopping under the lock: a vCPU clears its stop request under the same lock, so it
        // cannot clear this one after leaving a previous pause.
        stoppers.iter().for_each(|s| s.stop());
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |s| s.parked < s.live && !s.exiting)
            .unwrap_or_else(|e| e.into_inner());
        if state.parked < state.live && !state.exiting {
            return Err(PauseTimeout {
                running: state.live - state.parked,
                live: state.live,
                timeout,
            });
        }
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.changed.notify_all();
    }

    /// Makes every vCPU thread return.
    pub fn exit(&self, stoppers: &[Arc<dyn VcpuStopper>]) {
        let mut state = self.lock();
        state.exiting = true;
        stoppers.iter().for_each(|s| s.stop());
        drop(state);
        self.changed.notify_all();
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Called by a vCPU thread after `run` returned `Stopped`: waits while paused and returns
    /// whether the thread should keep running.
    fn park(&self, stopper: &dyn VcpuStopper) -> bool {
        let mut state = self.lock();
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !state.exiting {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
        if state.exiting {
            return false;
        }
        stopper.resume();
        true
    }

    /// Counts a vCPU thread as live until the returned guard drops, so a pause does not wait
    /// for vCPUs that have ended.
    fn enter(self: &Arc<Self>) -> LiveVcpu {
        self.lock().live += 1;
        LiveVcpu { gate: self.clone() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct LiveVcpu {
    gate: Arc<VcpuGate>,
}

impl Drop for LiveVcpu {
    fn drop(&mut self) {
        self.gate.lock().live -= 1;
        self.gate.changed.notify_all();
    }
}

/// Starts vCPU `index` on its own thread. When the guest or the engine ends it, the thread
/// asks the VMM to end the VM through `exit`.
pub fn spawn(
    index: u8,
    mut vcpu: Box<dyn Vcpu>,
    gate: Arc<VcpuGate>,
    exit: Arc<ExitSignal>,
) -> std::io::Result<JoinHandle<()>> {
    let stopper = vcpu.stopper();
    let live = gate.enter();
    std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let _live = live;
            let reason = loop {
                match vcpu.run() {
                    Ok(VcpuExit::Stopped) => {
                        if !gate.park(stopper.as_ref()) {
                            return;
                        }
                    }
                    Ok(VcpuExit::Halted) => {
                        tracing::info!("vCPU {index} halted with interrupts disabled");
                        break ExitReason::GuestPowerOff;
                    }
                    Ok(VcpuExit::Shutdown) => break ExitReason::GuestPowerOff,
                    Ok(VcpuExit::Requested(MachineRequest::Reset)) => break ExitReason::GuestReset,
                    Ok(VcpuExit::Requested(MachineRequest::PowerOff)) => {
                        break ExitReason::GuestPowerOff
                    }
                    Ok(VcpuExit::TripleFault) => {
                        let state = vcpu.state().unwrap_or_default();
                        break ExitReason::TripleFault(Box::new(state));
                    }
                    Err(error) => {
                        // The causes too: "KVM run vCPU failed" alone hides the errno.
                        let causes: Vec<String> =
                            std::iter::successors(Some(&error as &dyn std::error::Error), |e| {
                                e.source()
                            })
                            .map(ToString::to_string)
                            .collect();
                        break ExitReason::EngineFailure(format!(
                            "vCPU {index}: {}",
                            causes.join(": ")
                        ));
                    }
                }
            };
            exit.request(reason);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::Duration;

    use lodge_engine::{CpuState, EngineError};

    /// A vCPU that spins until stopped, counting its runs, and exits after `exit_after` runs.
    struct FakeVcpu {
        stopper: Arc<FakeStopper>,
        runs: Arc<AtomicU32>,
        exit_after: u32,
    }

    #[derive(Default)]
    struct FakeStopper {
        stop: AtomicBool,
    }

    impl VcpuStopper for FakeStopper {
        fn stop(&self) {
            self.stop.store(true, Ordering::SeqCst);
        }
        fn resume(&self) {
            self.stop.store(false, Ordering::SeqCst);
        }
    }

    impl Vcpu for FakeVcpu {
        fn set_state(&mut self, _: &CpuState) -> Result<(), EngineError> {
            Ok(())
        }
        fn state(&self) -> Result<CpuState, EngineError> {
            Ok(CpuState::default())
        }
        fn run(&mut self) -> Result<VcpuExit, EngineError> {
            let runs = self.runs.fetch_add(1, Ordering::SeqCst) + 1;
            if runs >= self.exit_after {
                return Ok(VcpuExit::TripleFault);
            }
            while !self.stopper.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Stopped)
        }
        fn stopper(&self) -> Arc<dyn VcpuStopper> {
            self.stopper.clone()
        }
    }

    struct Started {
        thread: JoinHandle<()>,
        stopper: Arc<dyn VcpuStopper>,
    }

    fn start(exit_after: u32) -> (Started, Arc<VcpuGate>, Arc<AtomicU32>, Arc<ExitSignal>) {
        let runs = Arc::new(AtomicU32::new(0));
        let vcpu = FakeVcpu {
            stopper: Arc::default(),
            runs: runs.clone(),
            exit_after,
        };
        let stopper = vcpu.stopper();
        let gate = Arc::new(VcpuGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let thread = spawn(0, Box::new(vcpu), gate.clone(), exit.clone()).unwrap();
        (Started { thread, stopper }, gate, runs, exit)
    }

    fn wait_for(what: impl Fn() -> bool) {
        for _ in 0..2000 {
            if what() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("condition not reached");
    }

    #[test]
    fn pause_parks_and_resume_runs_again() {
        let (vcpu, gate, runs, _exit) = start(u32::MAX);
        wait_for(|| runs.load(Ordering::SeqCst) == 1);
        gate.pause(std::slice::from_ref(&vcpu.stopper), Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            gate.lock().parked,
            1,
            "pause returns once the vCPU has parked"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a paused vCPU does not run");
        assert!(gate.is_paused());
        gate.resume();
        wait_for(|| runs.load(Ordering::SeqCst) == 2);
        gate.exit(std::slice::from_ref(&vcpu.stopper));
        vcpu.thread.join().unwrap();
    }

    #[test]
    fn exit_stops_a_paused_vcpu() {
        let (vcpu, gate, runs, exit) = start(u32::MAX);
        wait_for(|| runs.load(Ordering::SeqCst) == 1);
        gate.pause(std::slice::from_ref(&vcpu.stopper), Duration::from_secs(5))
            .unwrap();
        gate.exit(std::slice::from_ref(&vcpu.stopper));
        vcpu.thread.join().unwrap();
        assert_eq!(exit.reason(), None, "a requested exit is not a guest event");
    }

    /// A vCPU whose engine fails at once.
    struct FailingVcpu;

    impl Vcpu for FailingVcpu {
        fn set_state(&mut self, _: &CpuState) -> Result<(), EngineError> {
            Ok(())
        }
        fn state(&self) -> Result<CpuState, EngineError> {
            Ok(CpuState::default())
        }
        fn run(&mut self) -> Result<VcpuExit, EngineError> {
            Err(EngineError::Host {
                operation: "Running the vCPU",
                source: std::io::Error::from_raw_os_error(libc::EFAULT),
            })
        }
        fn stopper(&self) -> Arc<dyn VcpuStopper> {
            Arc::new(FakeStopper::default())
        }
    }

    #[test]
    fn engine_failures_are_reported_with_their_causes() {
        let gate = Arc::new(VcpuGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let thread = spawn(3, Box::new(FailingVcpu), gate, exit.clone()).unwrap();
        thread.join().unwrap();
        let cause = std::io::Error::from_raw_os_error(libc::EFAULT).to_string();
        assert_eq!(
            exit.reason(),
            Some(ExitReason::EngineFailure(format!(
                "vCPU 3: Running the vCPU failed: {cause}"
            )))
        );
    }

    /// A vCPU that ignores stop requests, as one stuck in a device handler would.
    struct DeafVcpu {
        release: Arc<AtomicBool>,
    }

    impl Vcpu for DeafVcpu {
        fn set_state(&mut self, _: &CpuState) -> Result<(), EngineError> {
            Ok(())
        }
        fn state(&self) -> Result<CpuState, EngineError> {
            Ok(CpuState::default())
        }
        fn run(&mut self) -> Result<VcpuExit, EngineError> {
            while !self.release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Stopped)
        }
        fn stopper(&self) -> Arc<dyn VcpuStopper> {
            Arc::new(FakeStopper::default())
        }
    }

    #[test]
    fn pause_reports_vcpus_that_do_not_park_in_time() {
        let release = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(VcpuGate::default());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let vcpu = DeafVcpu {
            release: release.clone(),
        };
        let stopper = vcpu.stopper();
        let thread = spawn(0, Box::new(vcpu), gate.clone(), exit).unwrap();
        let timeout = Duration::from_millis(50);
        assert_eq!(
            gate.pause(std::slice::from_ref(&stopper), timeout),
            Err(PauseTimeout {
                running: 1,
                live: 1,
                timeout
            })
        );
        assert!(gate.is_paused(), "the pause stays in effect");
        release.store(true, Ordering::SeqCst);
        wait_for(|| gate.lock().parked == 1);
        gate.exit(std::slice::from_ref(&stopper));
        thread.join().unwrap();
    }

    #[test]
    fn pause_does_not_wait_for_ended_vcpus() {
        let (vcpu, gate, _runs, _exit) = start(1);
        vcpu.thread.join().unwrap();
        assert_eq!(gate.lock().live, 0);
        gate.pause(std::slice::from_ref(&vcpu.stopper), Duration::ZERO)
            .unwrap();
    }

    #[test]
    fn guest_exit_is_reported_and_signalled() {
        let (vcpu, _gate, _runs, exit) = start(1);
        vcpu.thread.join().unwrap();
        assert!(matches!(exit.reason(), Some(ExitReason::TripleFault(_))));
        assert_eq!(exit.event().read().unwrap(), 1);
    }
}
