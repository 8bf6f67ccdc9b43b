//! Where serial output goes besides the primary console: a size-capped log and the clients of
//! the console socket, which also feed the guest's serial input.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lodge_devices::serial::SerialConsole;

use crate::unix_socket::UnixSocketListener;

/// Serial output fanned out to the primary console and the [`ConsoleTaps`].
pub struct ConsoleFanout {
    primary: Box<dyn Write + Send>,
    taps: Arc<ConsoleTaps>,
}

impl ConsoleFanout {
    pub fn new(primary: Box<dyn Write + Send>, taps: Arc<ConsoleTaps>) -> Self {
        Self { primary, taps }
    }
}

impl Write for ConsoleFanout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The guest must never stall on a broken sink: each is best effort.
        if let Err(e) = self.primary.write_all(buf) {
            tracing::debug!("Console output failed: {e}");
        }
        self.taps.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.primary.flush();
        Ok(())
    }
}

/// Where serial output goes besides the primary console, attached by a supervisor before
/// the VM runs: a log, and the clients of the console socket.
#[derive(Default)]
pub struct ConsoleTaps {
    log: Mutex<Option<CappedLog>>,
    clients: ConsoleClients,
}

impl ConsoleTaps {
    /// Appends all further output to `log`.
    pub fn set_log(&self, log: CappedLog) {
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = Some(log);
    }

    fn write(&self, buf: &[u8]) {
        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            if let Err(e) = log.write_all(buf) {
                tracing::warn!("Console log write failed: {e}");
            }
        }
        self.clients.broadcast(buf);
    }
}

/// An append-only log that rotates to `PATH.1` when it would grow past its limit, so at most
/// about twice the limit is kept on disk.
pub struct CappedLog {
    path: PathBuf,
    limit: u64,
    file: File,
    size: u64,
}

impl CappedLog {
    pub fn open(path: &Path, limit: u64) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_owned(),
            limit: limit.max(1),
            file,
            size,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        std::fs::rename(&self.path, rotated)?;
        self.file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.limit {
            self.rotate()?;
        }
        let written = self.file.write(buf)?;
        self.size += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Connected console-socket clients, written from the vCPU thread that emulates the UART.
#[derive(Default)]
struct ConsoleClients {
    streams: Mutex<HashMap<RawFd, UnixStream>>,
}

impl ConsoleClients {
    /// Adds the write end of the client whose read end is `fd` (the key it is removed by).
    fn add(&self, fd: RawFd, stream: UnixStream) {
        self.lock().insert(fd, stream);
    }

    fn remove(&self, fd: RawFd) -> Option<UnixStream> {
        self.lock().remove(&fd)
    }

    /// Sends `bytes` to every client. A client whose socket buffer is full misses them (the
    /// guest never waits for a slow reader); one whose socket failed is dropped.
    fn broadcast(&self, bytes: &[u8]) {
        self.lock()
            .retain(|_, stream| match stream.write_all(bytes) {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => true,
                Err(_) => false,
            });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RawFd, UnixStream>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Accepts console-socket clients and forwards their input to the serial port.
pub struct ConsoleSocket {
    listener: UnixSocketListener,
    taps: Arc<ConsoleTaps>,
    serial: Arc<Mutex<SerialConsole>>,
    /// Clients' read ends, by fd (the write ends are in `clients`).
    readers: HashMap<RawFd, UnixStream>,
}

impl ConsoleSocket {
    /// Binds the socket at `path`, replacing a stale one.
    pub fn bind(
        path: &Path,
        taps: Arc<ConsoleTaps>,
        serial: Arc<Mutex<SerialConsole>>,
    ) -> io::Result<Self> {
        Ok(Self {
            listener: UnixSocketListener::bind(path)?,
            taps,
            serial,
            readers: HashMap::new(),
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Self {
            listener,
            taps,
            readers,
            ..
        } = self;
        listener.accept_pending("Console socket", |stream| {
            let writer = match stream.try_clone() {
                Ok(writer) => writer,
                Err(e) => {
                    tracing::warn!("Console client setup failed: {e}");
                    return;
                }
            };
            let fd = stream.as_raw_fd();
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                readers.insert(fd, stream);
                taps.clients.add(fd, writer);
            }
        });
    }

    fn read_client(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(stream) = self.readers.get_mut(&fd) else {
            return;
        };
        let mut buffer = [0u8; 4096];
        match stream.read(&mut buffer) {
            Ok(0) => self.disconnect(fd, ops),
            Ok(n) => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                serial.enqueue_input(&buffer[..n]);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => self.disconnect(fd, ops),
        }
    }

    fn disconnect(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(stream) = self.readers.remove(&fd) {
            let _ = ops.remove(Events::new(&stream, EventSet::IN));
        }
        self.taps.clients.remove(fd);
    }
}

impl MutEventSubscriber for ConsoleSocket {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.read_client(events.fd(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("Cannot watch the console socket: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_log_rotates_once_over_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write_all(b"0123456789").unwrap();
        log.write_all(b"abc").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"0123456789"
        );
        // Reopening continues from the current size.
        drop(log);
        let mut log = CappedLog::open(&path, 10).unwrap();
        log.write_all(b"defghij").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcdefghij");
        log.write_all(b"k").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"k");
        assert_eq!(
            std::fs::read(dir.path().join("console.log.1")).unwrap(),
            b"abcdefghij"
        );
    }

    #[test]
    fn broadcast_reaches_clients_and_drops_dead_ones() {
        let clients = ConsoleClients::default();
        let (a, mut a_peer) = UnixStream::pair().unwrap();
        let (b, b_peer) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        clients.add(a.as_raw_fd(), a);
        clients.add(b.as_raw_fd(), b);
        drop(b_peer);
        clients.broadcast(b"hello");
        let mut received = [0u8; 5];
        a_peer.read_exact(&mut received).unwrap();
        assert_eq!(&received, b"hello");
        assert_eq!(
            clients.lock().len(),
            1,
            "the client whose peer closed is dropped"
        );
    }

    #[test]
    fn a_full_client_does_not_block_the_guest() {
        let clients = ConsoleClients::default();
        let (a, _a_peer) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        clients.add(a.as_raw_fd(), a);
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..64 {
            clients.broadcast(&chunk);
        }
        assert_eq!(clients.lock().len(), 1);
    }

    #[test]
    fn a_client_that_disconnects_leaves_the_broadcast_list() {
        use event_manager::{EventManager, SubscriberOps};
        use lodge_bus::{InterruptError, InterruptLine};

        struct NoInterrupt;
        impl InterruptLine for NoInterrupt {
            fn trigger(&self) -> Result<(), InterruptError> {
                Ok(())
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let taps = Arc::new(ConsoleTaps::default());
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            Arc::new(NoInterrupt),
            Box::new(io::sink()),
        )));
        let socket = ConsoleSocket::bind(&path, taps.clone(), serial).unwrap();
        let mut events: EventManager<Arc<Mutex<ConsoleSocket>>> = EventManager::new().unwrap();
        events.add_subscriber(Arc::new(Mutex::new(socket)));

        let client = UnixStream::connect(&path).unwrap();
        events.run_with_timeout(1000).unwrap();
        assert_eq!(taps.clients.lock().len(), 1, "the client is not served");
        drop(client);
        events.run_with_timeout(1000).unwrap();
        assert_eq!(
            taps.clients.lock().len(),
            0,
            "the gone client still gets output"
        );
    }
}
