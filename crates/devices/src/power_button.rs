//! A paravirtual power button: the host presses it to ask for a graceful shutdown; the
//! guest's init polls it (`devmem 0xd0000100 8`) and shuts down when it reads 1.
//!
//! Guests without the poller never see it, which is why a supervisor forces the VM off after a
//! timeout. Writing 0 releases the button.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use lodge_bus::BusDevice;

/// The button's register window.
pub struct PowerButton {
    pressed: Arc<AtomicBool>,
}

/// Presses the button from any thread.
#[derive(Clone)]
pub struct PowerButtonHandle {
    pressed: Arc<AtomicBool>,
}

impl PowerButton {
    pub fn new() -> Self {
        Self {
            pressed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle for the host side.
    pub fn handle(&self) -> PowerButtonHandle {
        PowerButtonHandle {
            pressed: self.pressed.clone(),
        }
    }
}

impl Default for PowerButton {
    fn default() -> Self {
        Self::new()
    }
}

impl PowerButtonHandle {
    /// Asks the guest to shut down.
    pub fn press(&self) {
        self.pressed.store(true, Ordering::SeqCst);
    }

    /// Whether the button is pressed and not yet released by the guest.
    pub fn is_pressed(&self) -> bool {
        self.pressed.load(Ordering::SeqCst)
    }
}

impl BusDevice for PowerButton {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = u8::from(self.pressed.load(Ordering::SeqCst));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&0) {
            self.pressed.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_after_a_press_until_released() {
        let mut button = PowerButton::new();
        let handle = button.handle();
        let mut value = [0xffu8; 4];
        button.read(0, &mut value);
        assert_eq!(value, [0; 4]);
        handle.press();
        button.read(0, &mut value);
        assert_eq!(value, [1, 0, 0, 0]);
        let mut byte = [0u8; 1];
        button.read(0, &mut byte);
        assert_eq!(byte, [1]);
        button.read(8, &mut byte);
        assert_eq!(byte, [0], "only offset 0 is the button");
        button.write(0, &[0]);
        assert!(!handle.is_pressed());
        button.read(0, &mut byte);
        assert_eq!(byte, [0]);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut button = PowerButton::new();
        button.read(0, &mut []);
        button.write(0, &[]);
        button.write(0xff, &[1, 2, 3]);
        assert!(!button.handle().is_pressed());
    }
}
