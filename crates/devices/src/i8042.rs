//! An i8042 keyboard controller with no keyboard or mouse behind it.
//!
//! It exists for one thing: Linux booted with `reboot=k` resets the machine by pulsing the
//! controller's reset line (command 0xFE on port 0x64), which calls the [`ResetHandler`]
//! given at construction, on the vCPU thread. The VMM's handler raises a machine reset on
//! the bus, and the engine ends the vCPU's run right after the `out` that pulsed the line:
//! Linux moves on to other reset methods within microseconds (the real-mode restart among
//! them), and none of that may run. The other controller
//! commands Linux sends while probing are answered the way a controller without a mouse port
//! would, so the probe finishes at once instead of waiting for timeouts; guests should still
//! be booted with `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd`, because no keyboard
//! answers and no interrupt is ever raised.
//!
//! The device decodes ports 0x60 to 0x64: insert it at [`I8042_PORT`] with length
//! [`I8042_PORT_COUNT`]; ports 0x61 to 0x63 are not part of the controller and read 0xff. To
//! leave those ports to other devices (0x61 is the PIT's gate and speaker port), split it with
//! [`I8042Controller::into_ports`] and insert each [`I8042Port`] with length 1.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lodge_bus::BusDevice;

use crate::logging::LogLimiter;

/// The controller's data port; the command/status port is four ports above.
pub const I8042_PORT: u16 = 0x60;
/// Ports from the data port to the command port, inclusive.
pub const I8042_PORT_COUNT: u64 = 5;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KEYBOARD_UNLOCKED: u8 = 0x10;

// Controller commands.
const COMMAND_READ_CONFIG: u8 = 0x20;
const COMMAND_WRITE_CONFIG: u8 = 0x60;
const COMMAND_DISABLE_AUX: u8 = 0xa7;
const COMMAND_ENABLE_AUX: u8 = 0xa8;
const COMMAND_TEST_AUX: u8 = 0xa9;
const COMMAND_SELF_TEST: u8 = 0xaa;
const COMMAND_TEST_KEYBOARD: u8 = 0xab;
const COMMAND_DISABLE_KEYBOARD: u8 = 0xad;
const COMMAND_ENABLE_KEYBOARD: u8 = 0xae;
const COMMAND_READ_INPUT_PORT: u8 = 0xc0;
const COMMAND_READ_OUTPUT_PORT: u8 = 0xd0;
const COMMAND_WRITE_OUTPUT_PORT: u8 = 0xd1;
const COMMAND_WRITE_KEYBOARD_OUTPUT: u8 = 0xd2;
const COMMAND_WRITE_AUX_OUTPUT: u8 = 0xd3;
const COMMAND_WRITE_AUX: u8 = 0xd4;
const COMMAND_READ_TEST_INPUTS: u8 = 0xe0;

const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;
/// "Clock line stuck low": what a controller answers when no mouse port is wired.
const PORT_TEST_CLOCK_STUCK: u8 = 0x02;

// Controller configuration byte bits.
const CONFIG_KEYBOARD_INTERRUPT: u8 = 0x01;
const CONFIG_SYSTEM_FLAG: u8 = 0x04;
const CONFIG_KEYBOARD_DISABLED: u8 = 0x10;
const CONFIG_AUX_DISABLED: u8 = 0x20;
const CONFIG_TRANSLATE: u8 = 0x40;

/// Output port bit 0 drives the CPU reset line (active low); bit 1 is the A20 gate.
const OUTPUT_PORT_RESET_RELEASED: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// Bytes the output buffer holds; a guest that never reads can't grow it further.
const OUTPUT_BUFFER_CAPACITY: usize = 16;

/// What the controller calls each time the guest pulses the reset line.
pub type ResetHandler = Box<dyn FnMut() + Send>;

/// The i8042 controller; see the module documentation.
pub struct I8042Controller {
    reset: ResetHandler,
    config: u8,
    output_port: u8,
    status: u8,
    output: VecDeque<u8>,
    last_output: u8,
    /// The command whose parameter the next data-port write is.
    awaiting_parameter: Option<u8>,
    ignored_log: LogLimiter,
}

impl I8042Controller {
    /// Creates a controller that calls `reset` each time the guest pulses the reset line.
    pub fn new(reset: ResetHandler) -> Self {
        Self {
            reset,
            config: CONFIG_KEYBOARD_INTERRUPT | CONFIG_SYSTEM_FLAG | CONFIG_TRANSLATE,
            output_port: OUTPUT_PORT_RESET_RELEASED | OUTPUT_PORT_A20,
            status: STATUS_SYSTEM_FLAG | STATUS_KEYBOARD_UNLOCKED,
            output: VecDeque::new(),
            last_output: 0,
            awaiting_parameter: None,
            ignored_log: LogLimiter::new(),
        }
    }

    /// Splits the controller into its data port (0x60) and command/status port (0x64), for
    /// buses where they are inserted separately.
    pub fn into_ports(self) -> (I8042Port, I8042Port) {
        let controller = Arc::new(Mutex::new(self));
        let data = I8042Port {
            controller: controller.clone(),
            offset: DATA_OFFSET,
        };
        let command = I8042Port {
            controller,
            offset: COMMAND_OFFSET,
        };
        (data, command)
    }

    fn read_status(&self) -> u8 {
        let mut status = self.status;
        if !self.output.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        // An empty buffer reads back its last byte, as the real latch does.
        if let Some(byte) = self.output.pop_front() {
            self.last_output = byte;
        }
        self.last_output
    }

    fn push_output(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_BUFFER_CAPACITY {
            self.output.push_back(byte);
        }
    }

    fn write_command(&mut self, command: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        self.awaiting_parameter = None;
        match command {
            COMMAND_READ_CONFIG => self.push_output(self.config),
            COMMAND_WRITE_CONFIG
            | COMMAND_WRITE_OUTPUT_PORT
            | COMMAND_WRITE_KEYBOARD_OUTPUT
            | COMMAND_WRITE_AUX_OUTPUT
            | COMMAND_WRITE_AUX => self.awaiting_parameter = Some(command),
            COMMAND_DISABLE_AUX => self.config |= CONFIG_AUX_DISABLED,
            COMMAND_ENABLE_AUX => self.config &= !CONFIG_AUX_DISABLED,
            COMMAND_TEST_AUX => self.push_output(PORT_TEST_CLOCK_STUCK),
            COMMAND_SELF_TEST => {
                self.status |= STATUS_SYSTEM_FLAG;
                self.push_output(SELF_TEST_PASSED);
            }
            COMMAND_TEST_KEYBOARD => self.push_output(PORT_TEST_PASSED),
            COMMAND_DISABLE_KEYBOARD => self.config |= CONFIG_KEYBOARD_DISABLED,
            COMMAND_ENABLE_KEYBOARD => self.config &= !CONFIG_KEYBOARD_DISABLED,
            COMMAND_READ_INPUT_PORT | COMMAND_READ_TEST_INPUTS => self.push_output(0),
            COMMAND_READ_OUTPUT_PORT => self.push_output(self.output_port),
            // 0xf0-0xff pulse the output lines whose bit is clear; bit 0 is the reset line.
            0xf0..=0xff if command & OUTPUT_PORT_RESET_RELEASED == 0 => self.signal_reset(),
            0xf0..=0xff => {}
            _ => self.log_ignored("command", command),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.awaiting_parameter.take() {
            Some(COMMAND_WRITE_CONFIG) => {
                self.config = value;
                self.status = (self.status & !STATUS_SYSTEM_FLAG) | (value & CONFIG_SYSTEM_FLAG);
            }
            Some(COMMAND_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                if value & OUTPUT_PORT_RESET_RELEASED == 0 {
                    self.signal_reset();
                }
            }
            // Echoed on the keyboard channel even when asked for the mouse one: a loopback
            // answer without the mouse-data status bit tells Linux at once that there is no
            // mouse port (a silent controller would cost it a timeout).
            Some(COMMAND_WRITE_KEYBOARD_OUTPUT) | Some(COMMAND_WRITE_AUX_OUTPUT) => {
                self.push_output(value)
            }
            // No mouse is attached: the byte goes nowhere.
            Some(_) => {}
            // A command for the keyboard, which is not there.
            None => self.log_ignored("keyboard byte", value),
        }
    }

    fn signal_reset(&mut self) {
        tracing::info!("Guest pulsed the i8042 reset line");
        (self.reset)();
    }

    fn log_ignored(&mut self, what: &str, value: u8) {
        if let Some(suppressed) = self.ignored_log.check() {
            tracing::debug!(suppressed, "i8042: ignored {what} {value:#04x}");
        }
    }
}

impl BusDevice for I8042Controller {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.read_data(),
            (COMMAND_OFFSET, 1) => self.read_status(),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA_OFFSET, [value]) => self.write_data(*value),
            (COMMAND_OFFSET, [command]) => self.write_command(*command),
            _ => {}
        }
    }
}

/// One port of a controller split with [`I8042Controller::into_ports`]; insert it with
/// length 1.
pub struct I8042Port {
    controller: Arc<Mutex<I8042Controller>>,
    /// The port's offset in the unsplit controller.
    offset: u64,
}

impl BusDevice for I8042Port {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            data.fill(0xff);
            return;
        }
        let mut controller = self
            .controller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        controller.read(self.offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut controller = self
            .controller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        controller.write(self.offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A controller and how often it reset since the last [`reset_count`].
    fn controller() -> (I8042Controller, Arc<AtomicU64>) {
        let resets = Arc::new(AtomicU64::new(0));
        let counter = resets.clone();
        let device = I8042Controller::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        (device, resets)
    }

    fn read(device: &mut I8042Controller, offset: u64) -> u8 {
        let mut data = [0u8];
        device.read(offset, &mut data);
        data[0]
    }

    /// Sends `command` and returns the byte it answered, the way Linux's i8042_command does.
    fn command(device: &mut I8042Controller, command: u8) -> Option<u8> {
        device.write(COMMAND_OFFSET, &[command]);
        (read(device, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0).then(|| read(device, DATA_OFFSET))
    }

    fn reset_count(resets: &AtomicU64) -> u64 {
        resets.swap(0, Ordering::SeqCst)
    }

    #[test]
    fn reboot_k_sequence_signals_reset() {
        let (mut device, resets) = controller();
        // kb_wait(): the input buffer must read empty.
        assert_eq!(read(&mut device, COMMAND_OFFSET) & 0x02, 0);
        device.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(reset_count(&resets), 1);
        // Pulsing only other lines does not reset.
        device.write(COMMAND_OFFSET, &[0xfd]);
        device.write(COMMAND_OFFSET, &[0xff]);
        assert_eq!(reset_count(&resets), 0);
    }

    #[test]
    fn clearing_the_output_port_reset_bit_resets() {
        let (mut device, resets) = controller();
        assert_eq!(command(&mut device, COMMAND_READ_OUTPUT_PORT), Some(0x03));
        device.write(COMMAND_OFFSET, &[COMMAND_WRITE_OUTPUT_PORT]);
        device.write(DATA_OFFSET, &[0x02]);
        assert_eq!(reset_count(&resets), 1);
    }

    #[test]
    fn answers_the_linux_probe() {
        let (mut device, _) = controller();
        let status = read(&mut device, COMMAND_OFFSET);
        assert_ne!(status, 0xff, "Linux treats 0xff as no controller");
        assert_eq!(status & STATUS_OUTPUT_FULL, 0);
        assert_eq!(command(&mut device, COMMAND_SELF_TEST), Some(0x55));
        assert_eq!(command(&mut device, COMMAND_TEST_KEYBOARD), Some(0x00));

        let config = command(&mut device, COMMAND_READ_CONFIG).unwrap();
        assert_eq!(config & CONFIG_SYSTEM_FLAG, CONFIG_SYSTEM_FLAG);
        device.write(COMMAND_OFFSET, &[COMMAND_WRITE_CONFIG]);
        device.write(DATA_OFFSET, &[0x65]);
        assert_eq!(command(&mut device, COMMAND_READ_CONFIG), Some(0x65));

        device.write(COMMAND_OFFSET, &[COMMAND_DISABLE_KEYBOARD]);
        device.write(COMMAND_OFFSET, &[COMMAND_DISABLE_AUX]);
        assert_eq!(command(&mut device, COMMAND_READ_CONFIG), Some(0x75));
        device.write(COMMAND_OFFSET, &[COMMAND_ENABLE_KEYBOARD]);
        device.write(COMMAND_OFFSET, &[COMMAND_ENABLE_AUX]);
        assert_eq!(command(&mut device, COMMAND_READ_CONFIG), Some(0x45));
    }

    #[test]
    fn reports_no_mouse_port_without_timeouts() {
        let (mut device, _) = controller();
        // Linux's loopback test: the echo comes back without the mouse-data bit.
        device.write(COMMAND_OFFSET, &[COMMAND_WRITE_AUX_OUTPUT]);
        device.write(DATA_OFFSET, &[0x5a]);
        let status = read(&mut device, COMMAND_OFFSET);
        assert_eq!(status & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(status & 0x20, 0);
        assert_eq!(read(&mut device, DATA_OFFSET), 0x5a);
        assert_eq!(
            command(&mut device, COMMAND_TEST_AUX),
            Some(PORT_TEST_CLOCK_STUCK)
        );
    }

    #[test]
    fn output_buffer_is_bounded_and_rereads_the_last_byte() {
        let (mut device, _) = controller();
        for _ in 0..100 {
            device.write(COMMAND_OFFSET, &[COMMAND_SELF_TEST]);
        }
        assert_eq!(device.output.len(), OUTPUT_BUFFER_CAPACITY);
        for _ in 0..OUTPUT_BUFFER_CAPACITY {
            assert_eq!(read(&mut device, DATA_OFFSET), 0x55);
        }
        assert_eq!(read(&mut device, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut device, DATA_OFFSET), 0x55);
    }

    #[test]
    fn split_ports_reach_one_controller() {
        let (controller, resets) = controller();
        let (mut data, mut command) = controller.into_ports();
        command.write(0, &[COMMAND_SELF_TEST]);
        let mut byte = [0u8];
        command.read(0, &mut byte);
        assert_eq!(byte[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        data.read(0, &mut byte);
        assert_eq!(byte[0], SELF_TEST_PASSED);
        data.read(1, &mut byte);
        assert_eq!(byte[0], 0xff);
        command.write(1, &[0xfe]);
        assert_eq!(reset_count(&resets), 0, "reset from a foreign offset");
        command.write(0, &[0xfe]);
        assert_eq!(reset_count(&resets), 1);
    }

    #[test]
    fn other_ports_and_sizes_are_harmless() {
        let (mut device, resets) = controller();
        let mut wide = [0u8; 4];
        device.read(DATA_OFFSET, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        device.read(1, &mut wide[..1]);
        assert_eq!(wide[0], 0xff);
        device.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
        device.write(2, &[0xfe]);
        device.write(u64::MAX, &[]);
        assert_eq!(reset_count(&resets), 0);
        // Keyboard commands go nowhere.
        device.write(DATA_OFFSET, &[0xf2]);
        assert_eq!(read(&mut device, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }
}
