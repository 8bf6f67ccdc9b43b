//! What other threads tell a running vCPU: interrupt edges and stop requests, plus the
//! wake-up for a vCPU sleeping in HLT.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

thread_local! {
    static ON_VCPU_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Bit set in the pending word when a stop was requested.
const STOP: u32 = 1 << 16;
/// Edges on PIC inputs 0-15.
const LINES: u32 = 0xffff;

/// Shared between the vCPU thread, interrupt lines and the stopper.
#[derive(Debug, Default)]
pub struct Signals {
    pending: AtomicU32,
    /// Bumped by interrupts raised from other threads: a device may have written guest memory
    /// (DMA) before raising it, so decoded code must be checked against memory again.
    dma_epoch: AtomicU64,
    sleeping: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Signals {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an edge on PIC input `irq` and wakes the vCPU.
    pub fn raise(&self, irq: u32) {
        if !ON_VCPU_THREAD.with(Cell::get) {
            self.dma_epoch.fetch_add(1, Ordering::SeqCst);
        }
        self.pending.fetch_or(1 << (irq & 15), Ordering::SeqCst);
        self.notify();
    }

    /// The current DMA epoch (see `dma_epoch`).
    #[inline]
    pub fn dma_epoch(&self) -> u64 {
        self.dma_epoch.load(Ordering::Relaxed)
    }

    /// Marks the calling thread as the vCPU thread: interrupts it raises (devices emulated
    /// synchronously during port or MMIO accesses) cannot follow a concurrent DMA.
    pub fn enter_vcpu_thread() {
        ON_VCPU_THREAD.with(|c| c.set(true));
    }

    /// Asks the vCPU to stop and wakes it.
    pub fn stop(&self) {
        self.pending.fetch_or(STOP, Ordering::SeqCst);
        self.notify();
    }

    /// Clears a stop request.
    pub fn resume(&self) {
        self.pending.fetch_and(!STOP, Ordering::SeqCst);
    }

    /// Whether anything is pending (cheap; polled between blocks).
    #[inline]
    pub fn any(&self) -> bool {
        self.pending.load(Ordering::Relaxed) != 0
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.pending.load(Ordering::SeqCst) & STOP != 0
    }

    /// Takes the interrupt edges raised since the last call.
    pub fn take_lines(&self) -> u32 {
        if self.pending.load(Ordering::Relaxed) & LINES == 0 {
            return 0;
        }
        self.pending.fetch_and(!LINES, Ordering::SeqCst) & LINES
    }

    fn notify(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.wake.notify_all();
        }
    }

    /// Sleeps until something is pending or `timeout` passes.
    pub fn wait(&self, timeout: Option<Duration>) {
        let guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sleeping.store(true, Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) == 0 {
            // A raise() between the check and the wait cannot be lost: it takes the lock
            // before notifying, and we hold it until wait releases it.
            let _guard = match timeout {
                Some(t) => self
                    .wake
                    .wait_timeout(guard, t)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0),
                None => self.wake.wait(guard).unwrap_or_else(|e| e.into_inner()),
            };
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn raise_wakes_a_waiter() {
        let signals = Arc::new(Signals::new());
        let other = signals.clone();
        let start = Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.raise(4);
        });
        while signals.take_lines() == 0 {
            signals.wait(Some(Duration::from_secs(5)));
        }
        assert!(start.elapsed() < Duration::from_secs(4));
        t.join().unwrap();
    }

    #[test]
    fn stop_is_sticky_until_resume() {
        let signals = Signals::new();
        signals.stop();
        assert!(signals.stop_requested());
        assert_eq!(signals.take_lines(), 0);
        assert!(signals.stop_requested());
        signals.resume();
        assert!(!signals.any());
    }
}
