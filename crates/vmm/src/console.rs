//! The serial console's host side: where output goes, the terminal in raw mode, and keyboard
//! input with an escape sequence to quit.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lodge_devices::serial::SerialConsole;
use nix::sys::termios::{self, SetArg, Termios};

use crate::exit::{ExitReason, ExitSignal};
use lodge_contract::ConsoleConfig;

/// Ctrl-A: the console escape key (as in QEMU and screen). Ctrl-A x quits, Ctrl-A Ctrl-A
/// sends one Ctrl-A to the guest.
pub const ESCAPE_KEY: u8 = 0x01;

/// Opens where the guest's serial output goes.
pub fn output(config: &ConsoleConfig) -> io::Result<Box<dyn Write + Send>> {
    Ok(match config {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::None => Box::new(io::sink()),
        ConsoleConfig::File(path) => {
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        }
    })
}

/// The terminal in raw mode while the VM runs: keys (Ctrl-C included) go to the guest.
pub struct RawTerminal {
    original: Termios,
}

/// The terminal settings to restore if the process dies without unwinding.
static ORIGINAL_TERMIOS: OnceLock<libc::termios> = OnceLock::new();

impl RawTerminal {
    /// Puts stdin in raw mode; `None` when stdin is not a terminal.
    pub fn enter() -> Option<Self> {
        let stdin = io::stdin();
        let original = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = original.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        let _ = ORIGINAL_TERMIOS.set(libc::termios::from(original.clone()));
        RAW_MODE.store(true, Ordering::Relaxed);
        Some(Self { original })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.original);
        RAW_MODE.store(false, Ordering::Relaxed);
    }
}

/// Whether the terminal is in raw mode, where host messages must end lines with CR LF.
pub fn raw_mode_active() -> bool {
    RAW_MODE.load(Ordering::Relaxed)
}

static RAW_MODE: AtomicBool = AtomicBool::new(false);

/// Restores the terminal if [`RawTerminal::enter`] changed it (for panic hooks).
pub fn restore_terminal() {
    if let Some(original) = ORIGINAL_TERMIOS.get() {
        let original = Termios::from(*original);
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &original);
    }
}

/// Splits keyboard input into bytes for the guest and the quit request.
#[derive(Default)]
pub struct EscapeFilter {
    escape_pending: bool,
}

impl EscapeFilter {
    /// Filters `input`; returns the bytes to forward and whether the user asked to quit.
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut forward = Vec::with_capacity(input.len());
        for &byte in input {
            if self.escape_pending {
                self.escape_pending = false;
                match byte {
                    b'x' | b'X' => return (forward, true),
                    ESCAPE_KEY => forward.push(ESCAPE_KEY),
                    other => {
                        forward.push(ESCAPE_KEY);
                        forward.push(other);
                    }
                }
            } else if byte == ESCAPE_KEY {
                self.escape_pending = true;
            } else {
                forward.push(byte);
            }
        }
        (forward, false)
    }
}

/// Feeds stdin to the serial console.
pub struct StdinInput {
    /// Stdin's descriptor, read without `io::Stdin`'s buffer: bytes that buffer took from
    /// the descriptor would wait there, unseen by the event loop, until more input came.
    input: File,
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitSignal>,
    filter: EscapeFilter,
}

impl StdinInput {
    pub fn new(serial: Arc<Mutex<SerialConsole>>, exit: Arc<ExitSignal>) -> io::Result<Self> {
        let input = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        Ok(Self::from_file(input, serial, exit))
    }

    fn from_file(input: File, serial: Arc<Mutex<SerialConsole>>, exit: Arc<ExitSignal>) -> Self {
        Self {
            input,
            serial,
            exit,
            filter: EscapeFilter::default(),
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buffer = [0u8; 4096];
        match self.input.read(&mut buffer) {
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Ok(0) | Err(_) => {
                // End of input (or a broken stdin): the guest keeps running without it.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                let (bytes, quit) = self.filter.feed(&buffer[..n]);
                if !bytes.is_empty() {
                    let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                    serial.enqueue_input(&bytes);
                }
                if quit {
                    self.exit
                        .request(ExitReason::Stopped("console escape (Ctrl-A x)".into()));
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => {}
            // epoll refuses regular files and /dev/null: there is nothing to wait for.
            Err(event_manager::Error::Epoll(errno)) if errno.errno() == libc::EPERM => {
                tracing::info!("Console input off: stdin is not a terminal, pipe or socket");
            }
            Err(e) => tracing::warn!("Console input unavailable: {e}"),
        }
    }
}

/// Writes host text (log lines, messages) to stderr, with CR LF line ends while the terminal
/// is raw.
pub fn write_host_text(text: &[u8]) -> io::Result<()> {
    let mut stderr = io::stderr().lock();
    if !raw_mode_active() {
        return stderr.write_all(text);
    }
    for (index, line) in text.split(|b| *b == b'\n').enumerate() {
        if index > 0 {
            stderr.write_all(b"\r\n")?;
        }
        stderr.write_all(line)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_larger_than_one_read_reaches_the_guest_whole() {
        use event_manager::{EventManager, SubscriberOps};
        use lodge_bus::{InterruptError, InterruptLine};

        struct NoInterrupt;
        impl InterruptLine for NoInterrupt {
            fn trigger(&self) -> Result<(), InterruptError> {
                Ok(())
            }
        }

        let (reader, mut writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            Arc::new(NoInterrupt),
            Box::new(io::sink()),
        )));
        let exit = Arc::new(ExitSignal::new().unwrap());
        let input = StdinInput::from_file(
            File::from(std::os::fd::OwnedFd::from(reader)),
            serial.clone(),
            exit,
        );
        let mut events: EventManager<Arc<Mutex<StdinInput>>> = EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(input)));
        let paste = vec![b'p'; 10_000];
        writer.write_all(&paste).unwrap();
        // The UART's FIFO holds 64 bytes; the rest waits in the console's queue.
        let queued = || serial.lock().unwrap().pending_input() + 64;
        for _ in 0..10 {
            if queued() == paste.len() {
                break;
            }
            events.run_with_timeout(100).unwrap();
        }
        assert_eq!(queued(), paste.len());
    }

    #[test]
    fn escape_x_quits_and_keeps_earlier_bytes() {
        let mut filter = EscapeFilter::default();
        assert_eq!(filter.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(filter.feed(b"ab\x01x"), (b"ab".to_vec(), true));
    }

    #[test]
    fn escape_spans_reads_and_double_escape_sends_one() {
        let mut filter = EscapeFilter::default();
        assert_eq!(filter.feed(b"a\x01"), (b"a".to_vec(), false));
        assert_eq!(filter.feed(b"\x01b"), (b"\x01b".to_vec(), false));
        assert_eq!(filter.feed(b"\x01c"), (b"\x01c".to_vec(), false));
        assert_eq!(
            filter.feed(b"\x03"),
            (b"\x03".to_vec(), false),
            "Ctrl-C goes to the guest"
        );
    }
}
