//! The PCI reset control register at port 0xCF9, which Linux uses for `reboot=p` (and which
//! firmware-less guests may try after the i8042): writing a value with the "reset CPU" bit
//! set resets the machine through the [`ResetHandler`].

use lodge_bus::BusDevice;

use crate::ResetHandler;

/// The register's port.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;

/// Bit 2 starts the reset; bits 1 (system reset) and 3 (full reset) choose its kind, which a
/// VM does not distinguish.
const RESET_CPU: u8 = 0x04;
const KEPT_BITS: u8 = 0x0a;

/// The reset control register.
pub struct ResetControl {
    reset: ResetHandler,
    value: u8,
}

impl ResetControl {
    /// Creates the register; `reset` is called on each write that starts a reset.
    pub fn new(reset: ResetHandler) -> Self {
        Self { reset, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Only 1-byte writes reach this register on hardware; a wider write to 0xCF8..0xCFB
        // is a PCI configuration address, which this machine does not have.
        if let [value] = data {
            self.value = value & KEPT_BITS;
            if value & RESET_CPU != 0 {
                tracing::info!("Guest reset the machine through port 0xcf9");
                (self.reset)();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_reset_cpu_bit_resets_and_the_kind_bits_read_back() {
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let mut register = ResetControl::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        // Linux's reboot=p: select a hard reset, then start it.
        register.write(0, &[0x02]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        let mut value = [0u8];
        register.read(0, &mut value);
        assert_eq!(value, [0x02]);
        register.write(0, &[0x06]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        register.write(0, &[0x0e]);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
        // A 4-byte write is not this register's.
        register.write(0, &[0x06, 0, 0, 0]);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }
}
