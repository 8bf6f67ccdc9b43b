//! Why a VM ended, and how any thread asks the VMM's main loop to end it.

use std::fmt;
use std::sync::Mutex;

use lodge_engine::CpuState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq)]
pub enum ExitReason {
    /// The guest reset the machine (`reboot`): through the i8042 or the engine.
    GuestReset,
    /// The guest powered off, or halted with interrupts disabled.
    GuestPowerOff,
    /// The guest triple-faulted.
    TripleFault(Box<CpuState>),
    /// The host asked the VM to stop (a signal, the console escape, the control socket).
    Stopped(String),
    /// The engine failed; the message includes the guest registers when known.
    EngineFailure(String),
}

impl ExitReason {
    /// The process exit status `lodge run` ends with.
    pub fn exit_status(&self) -> i32 {
        match self {
            ExitReason::GuestReset | ExitReason::GuestPowerOff | ExitReason::Stopped(_) => 0,
            ExitReason::TripleFault(_) | ExitReason::EngineFailure(_) => 1,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestReset => f.write_str("Guest reset"),
            ExitReason::GuestPowerOff => f.write_str("Guest powered off"),
            ExitReason::TripleFault(state) => write!(f, "Guest triple fault\n{state}"),
            ExitReason::Stopped(why) => write!(f, "Stopped: {why}"),
            ExitReason::EngineFailure(why) => write!(f, "Engine failure: {why}"),
        }
    }
}

/// The first reason any thread gives for ending the VM, plus an eventfd that wakes the main
/// loop when one is given.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Asks the VM to end. Only the first reason is kept.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.event.write(1) {
            tracing::error!("Cannot wake the VMM main loop: {e}");
        }
    }

    /// The reason given, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd signalled on every request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let signal = ExitSignal::new().unwrap();
        assert_eq!(signal.reason(), None);
        signal.request(ExitReason::GuestReset);
        signal.request(ExitReason::Stopped("late".into()));
        assert_eq!(signal.reason(), Some(ExitReason::GuestReset));
        assert_eq!(signal.event().read().unwrap(), 2);
    }

    #[test]
    fn guest_initiated_ends_are_successful() {
        assert_eq!(ExitReason::GuestReset.exit_status(), 0);
        assert_eq!(ExitReason::GuestPowerOff.exit_status(), 0);
        assert_eq!(ExitReason::EngineFailure("x".into()).exit_status(), 1);
        assert_eq!(
            ExitReason::TripleFault(Box::default()).exit_status(),
            1,
            "a triple fault is reported as a failure"
        );
    }
}
