//! The boot timer: the guest's init writes to it when userspace starts, so every boot reports
//! its time to init the same way, whichever engine ran it.
//!
//! Guest init runs `devmem 0xd0000000 8 123`: a one-byte write of [`BOOT_TIMER_MAGIC`] at
//! offset 0. The device records the time elapsed since the start instant it was given, logs
//! it, and makes it readable through a [`BootTimeHandle`] (the device itself sits on the MMIO
//! bus behind a mutex).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lodge_bus::BusDevice;

/// The byte guest init writes.
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// The boot timer MMIO device.
pub struct BootTimer {
    start: Instant,
    boot_time: Arc<OnceLock<Duration>>,
}

/// Reads the recorded boot time from outside the bus.
#[derive(Clone, Debug)]
pub struct BootTimeHandle {
    boot_time: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// A timer measuring from `start` (when the VMM began building the VM).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time: Arc::new(OnceLock::new()),
        }
    }

    /// A handle that reads the boot time this timer records.
    pub fn handle(&self) -> BootTimeHandle {
        BootTimeHandle {
            boot_time: self.boot_time.clone(),
        }
    }
}

impl BootTimeHandle {
    /// Time from start to the guest's first write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_TIMER_MAGIC] {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.boot_time.set(elapsed).is_ok() {
            // Debug only: `lodge run` prints it on exit and the daemon reports it.
            tracing::debug!("Guest userspace started after {} ms", elapsed.as_millis());
        } else {
            tracing::debug!(
                "Guest wrote the boot timer again after {} ms",
                elapsed.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_first_magic_write() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut timer = BootTimer::new(start);
        let handle = timer.handle();
        assert_eq!(handle.boot_time(), None);
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let first = handle.boot_time().expect("boot time recorded");
        assert!(first >= Duration::from_millis(5));
        assert!(first <= start.elapsed());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        assert_eq!(handle.boot_time(), Some(first));
    }

    #[test]
    fn ignores_other_writes() {
        let mut timer = BootTimer::new(Instant::now());
        let handle = timer.handle();
        timer.write(0, &[122]);
        timer.write(1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, &[BOOT_TIMER_MAGIC, 0]);
        timer.write(0, &u32::from(BOOT_TIMER_MAGIC).to_le_bytes());
        timer.write(u64::MAX, &[]);
        assert_eq!(handle.boot_time(), None);
    }

    #[test]
    fn reads_return_zero() {
        let mut timer = BootTimer::new(Instant::now());
        timer.write(0, &[BOOT_TIMER_MAGIC]);
        let mut data = [0xaau8; 8];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 8]);
        timer.read(0xfff, &mut data[..1]);
        assert_eq!(data[0], 0);
    }
}
