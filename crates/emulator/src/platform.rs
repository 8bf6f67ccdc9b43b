//! The platform devices the software engine keeps beside its vCPU (under KVM the kernel has
//! them): the 8259 PIC pair, the 8254 PIT, and the host clock they and the TSC count in. The
//! run loop drives them between blocks.

use std::time::{Duration, Instant};

use crate::pic::Pic;
use crate::pit::Pit;
use crate::signals::Signals;

/// The interrupt controller and timer the run loop drives between blocks (under KVM the
/// kernel has them), and the host clock they and the TSC count in.
pub struct Platform {
    pub pic: Pic,
    pub pit: Pit,
    pub clock: Clock,
}

impl Platform {
    pub fn new() -> Self {
        Self {
            pic: Pic::new(),
            pit: Pit::new(),
            clock: Clock::new(),
        }
    }

    /// Takes interrupt edges raised by devices on other threads into the PIC.
    pub fn collect_interrupts(&mut self, signals: &Signals) {
        let lines = signals.take_lines();
        if lines != 0 {
            for irq in 0..16 {
                if lines & (1 << irq) != 0 {
                    self.pic.raise(irq);
                }
            }
        }
    }

    /// Raises the timer interrupt when the PIT's output fired since the last poll.
    pub fn poll_timer(&mut self) {
        let now = self.clock.now();
        if self.pit.poll(now) {
            self.pic.raise(0);
        }
    }

    /// How long a halted vCPU may sleep before the PIT fires (None: no deadline).
    pub fn time_to_next_timer(&self) -> Option<Duration> {
        let now = self.clock.now();
        self.pit
            .deadline()
            .map(|due| Duration::from_nanos(due.saturating_sub(now)))
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::new()
    }
}

/// Host monotonic time since the VM started.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
        }
    }

    /// Nanoseconds since the clock was created.
    #[inline]
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
