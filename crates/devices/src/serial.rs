//! The serial console: a 16550A UART (COM1) built on `vm-superio`.
//!
//! The UART's receive FIFO holds 64 bytes, while a user pasting into the console (or a script
//! feeding it) may send kilobytes at once. [`SerialConsole`] keeps the excess in a bounded
//! pending queue and moves it into the FIFO each time the guest has drained it, so input is
//! never lost unless the pending queue itself overflows.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::Arc;

use lodge_bus::{BusDevice, InterruptError, InterruptLine};
use vm_superio::serial::{Error as UartError, NoEvents};
use vm_superio::{Serial, Trigger};

use crate::logging::LogLimiter;

/// First port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of ports a 16550 decodes.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// The interrupt line COM1 is wired to.
pub const COM1_IRQ: u32 = 4;
/// How many input bytes wait outside the UART's FIFO before new ones are dropped.
pub const PENDING_INPUT_CAPACITY: usize = 64 * 1024;

/// Size of the 16550A receive FIFO (vm-superio's, which it does not export).
const FIFO_SIZE: usize = 64;
/// Offset of the receive buffer register (when the divisor latch is not selected).
const DATA_OFFSET: u8 = 0;
/// Offset of the line control register; bit 7 selects the divisor latch at offsets 0 and 1.
const LINE_CONTROL_OFFSET: u8 = 3;
const LINE_CONTROL_DIVISOR_LATCH: u8 = 0x80;

/// A 16550A UART whose output goes to a writer and whose input comes from
/// [`SerialConsole::enqueue_input`].
pub struct SerialConsole {
    uart: Serial<LineTrigger, NoEvents, Box<dyn Write + Send>>,
    pending: VecDeque<u8>,
    pending_capacity: usize,
    dropped_input_log: LogLimiter,
    output_error_log: LogLimiter,
    interrupt_error_log: LogLimiter,
}

impl SerialConsole {
    /// Creates a UART raising `interrupt` and writing guest output to `output`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, output: Box<dyn Write + Send>) -> Self {
        Self::with_pending_capacity(interrupt, output, PENDING_INPUT_CAPACITY)
    }

    fn with_pending_capacity(
        interrupt: Arc<dyn InterruptLine>,
        output: Box<dyn Write + Send>,
        pending_capacity: usize,
    ) -> Self {
        Self {
            uart: Serial::new(LineTrigger(interrupt), output),
            pending: VecDeque::new(),
            pending_capacity,
            dropped_input_log: LogLimiter::new(),
            output_error_log: LogLimiter::new(),
            interrupt_error_log: LogLimiter::new(),
        }
    }

    /// Queues `bytes` for the guest to read and returns how many were accepted.
    ///
    /// Bytes go into the UART's FIFO while it has room (raising the receive interrupt if the
    /// guest enabled it) and otherwise wait in a pending queue that is moved into the FIFO as
    /// the guest drains it. Only when the pending queue is full are bytes dropped, with a
    /// rate-limited warning.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.pending_capacity.saturating_sub(self.pending.len());
        let accepted = bytes.len().min(room);
        self.pending.extend(bytes.iter().take(accepted));
        let dropped = bytes.len() - accepted;
        if dropped > 0 {
            if let Some(suppressed) = self.dropped_input_log.check() {
                tracing::warn!(
                    dropped,
                    suppressed,
                    "Serial input queue full ({} bytes): dropping input",
                    self.pending_capacity
                );
            }
        }
        self.refill_fifo();
        accepted
    }

    /// Number of input bytes waiting outside the UART's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn refill_fifo(&mut self) {
        while !self.pending.is_empty() && self.uart.fifo_capacity() > 0 {
            let (front, _) = self.pending.as_slices();
            let count = front.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&front[..count]) {
                // In loopback mode the UART takes no external input: keep it for later.
                Ok(0) => break,
                Ok(written) => {
                    self.pending.drain(..written);
                }
                Err(UartError::Trigger(error)) => {
                    // The bytes are in the FIFO; only the interrupt got lost.
                    self.pending.drain(..count);
                    self.log_interrupt_error(&error);
                }
                Err(UartError::FullFifo) | Err(UartError::IOError(_)) => break,
            }
        }
    }

    fn divisor_latch_selected(&mut self) -> bool {
        // Reading the line control register has no side effects.
        self.uart.read(LINE_CONTROL_OFFSET) & LINE_CONTROL_DIVISOR_LATCH != 0
    }

    fn read_register(&mut self, offset: u8) -> u8 {
        let receive_read = offset == DATA_OFFSET && !self.divisor_latch_selected();
        let value = self.uart.read(offset);
        // Refilling only once the FIFO is empty raises one interrupt per FIFO-full instead of
        // one per byte: the receive interrupt is re-armed by each read of the data register.
        if receive_read && self.uart.fifo_capacity() == FIFO_SIZE {
            self.refill_fifo();
        }
        value
    }

    fn write_register(&mut self, offset: u8, value: u8) {
        match self.uart.write(offset, value) {
            Ok(()) => {}
            Err(UartError::Trigger(error)) => self.log_interrupt_error(&error),
            Err(UartError::IOError(error)) => {
                if let Some(suppressed) = self.output_error_log.check() {
                    tracing::warn!(%error, suppressed, "Serial output lost a byte");
                }
            }
            Err(UartError::FullFifo) => {}
        }
    }

    fn log_interrupt_error(&mut self, error: &InterruptError) {
        if let Some(suppressed) = self.interrupt_error_log.check() {
            tracing::warn!(%error, suppressed, "Serial interrupt failed");
        }
    }
}

impl BusDevice for SerialConsole {
    /// Wider accesses behave as on an ISA bus: one byte per consecutive port.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (index, byte) in data.iter_mut().enumerate() {
            *byte = match register_offset(offset, index) {
                Some(register) => self.read_register(register),
                None => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (index, byte) in data.iter().enumerate() {
            if let Some(register) = register_offset(offset, index) {
                self.write_register(register, *byte);
            }
        }
    }
}

/// The UART register at `offset + index`, if it is one of the eight.
fn register_offset(offset: u64, index: usize) -> Option<u8> {
    let port = offset.checked_add(u64::try_from(index).ok()?)?;
    if port < SERIAL_PORT_COUNT {
        u8::try_from(port).ok()
    } else {
        None
    }
}

/// Adapts an [`InterruptLine`] to what `vm-superio` raises interrupts with.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const IER_RECEIVE_DATA: u8 = 0x01;
    const IIR_RECEIVE_DATA: u8 = 0x04;
    const LSR_DATA_READY: u8 = 0x01;

    #[derive(Default)]
    struct CountingLine(AtomicUsize);

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct SharedOutput(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedOutput {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, Arc<CountingLine>, SharedOutput) {
        let line = Arc::new(CountingLine::default());
        let output = SharedOutput::default();
        let console = SerialConsole::new(line.clone(), Box::new(output.clone()));
        (console, line, output)
    }

    fn read_byte(console: &mut SerialConsole, offset: u64) -> u8 {
        let mut data = [0u8];
        console.read(offset, &mut data);
        data[0]
    }

    /// Reads everything the guest driver would, the way the 8250 driver does: while the line
    /// status says data is ready.
    fn drain(console: &mut SerialConsole) -> Vec<u8> {
        let mut received = Vec::new();
        while read_byte(console, LSR) & LSR_DATA_READY != 0 {
            received.push(read_byte(console, 0));
        }
        received
    }

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut console, _, output) = console();
        for byte in b"hello\n" {
            console.write(0, &[*byte]);
        }
        assert_eq!(output.0.lock().unwrap().as_slice(), b"hello\n");
    }

    #[test]
    fn divisor_latch_writes_are_not_output() {
        let (mut console, _, output) = console();
        console.write(LCR, &[0x80]);
        console.write(0, &[0x0c]);
        console.write(LCR, &[0x03]);
        console.write(0, b"x");
        assert_eq!(output.0.lock().unwrap().as_slice(), b"x");
    }

    #[test]
    fn input_reaches_the_receive_register_with_an_interrupt() {
        let (mut console, line, _) = console();
        console.write(IER, &[IER_RECEIVE_DATA]);
        let before = line.0.load(Ordering::SeqCst);
        assert_eq!(console.enqueue_input(b"ab"), 2);
        assert!(
            line.0.load(Ordering::SeqCst) > before,
            "no interrupt raised"
        );
        assert_eq!(read_byte(&mut console, IIR) & 0x0f, IIR_RECEIVE_DATA);
        assert_eq!(drain(&mut console), b"ab");
        assert_eq!(read_byte(&mut console, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn a_large_paste_is_not_lost() {
        let (mut console, line, _) = console();
        console.write(IER, &[IER_RECEIVE_DATA]);
        let paste: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(console.enqueue_input(&paste), paste.len());
        assert_eq!(console.pending_input(), paste.len() - FIFO_SIZE);
        let received = drain(&mut console);
        assert_eq!(received, paste);
        assert_eq!(console.pending_input(), 0);
        // One interrupt per FIFO refill, not one per byte.
        let interrupts = line.0.load(Ordering::SeqCst);
        assert!(
            interrupts >= paste.len() / FIFO_SIZE,
            "{interrupts} interrupts"
        );
        assert!(interrupts < paste.len() / 8, "{interrupts} interrupts");
    }

    #[test]
    fn input_beyond_the_pending_capacity_is_dropped() {
        let line = Arc::new(CountingLine::default());
        let mut console =
            SerialConsole::with_pending_capacity(line, Box::new(std::io::sink()), 100);
        let accepted = console.enqueue_input(&[7u8; 300]);
        // The pending queue counts the bytes on their way to the FIFO too.
        assert_eq!(accepted, 100);
        assert_eq!(drain(&mut console).len(), 100);
        assert_eq!(console.enqueue_input(b"more"), 4);
        assert_eq!(drain(&mut console), b"more");
    }

    #[test]
    fn input_waits_while_the_guest_is_in_loopback() {
        let (mut console, _, _) = console();
        console.write(4, &[0x10]); // MCR: loopback
        console.enqueue_input(b"later");
        assert_eq!(console.pending_input(), 5);
        console.write(4, &[0x08]);
        console.enqueue_input(b"!");
        assert_eq!(drain(&mut console), b"later!");
    }

    #[test]
    fn odd_sizes_and_offsets_do_not_panic() {
        let (mut console, _, _) = console();
        let mut wide = [0u8; 8];
        console.read(0, &mut wide);
        console.read(6, &mut wide[..4]);
        assert_eq!(&wide[2..4], &[0xff, 0xff]);
        console.write(7, &[1, 2, 3, 4]);
        console.read(u64::MAX, &mut wide);
        console.write(u64::MAX, &[1, 2]);
        // The scratch register took the first byte only.
        assert_eq!(read_byte(&mut console, 7), 1);
    }
}
