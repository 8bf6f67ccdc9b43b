//! The control socket a supervisor (the lodge daemon) drives a VMM process through; the
//! protocol is [`lodge_contract::control`].

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lodge_contract::control::{handle_line, MAX_REQUEST_LINE};

use crate::machine::MachineHandle;
use crate::unix_socket::UnixSocketListener;

/// Serves the control socket from the VMM's event loop. A client that lets its replies pile
/// up unread is disconnected: the event loop never waits for one.
pub struct ControlSocket {
    listener: UnixSocketListener,
    machine: MachineHandle,
    connections: HashMap<RawFd, Connection>,
}

struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl ControlSocket {
    /// Binds the socket at `path`, replacing a stale one.
    pub fn bind(path: &Path, machine: MachineHandle) -> std::io::Result<Self> {
        Ok(Self {
            listener: UnixSocketListener::bind(path)?,
            machine,
            connections: HashMap::new(),
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Self {
            listener,
            connections,
            ..
        } = self;
        listener.accept_pending("Control socket", |stream| {
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                let connection = Connection {
                    stream,
                    pending: Vec::new(),
                };
                connections.insert(connection.stream.as_raw_fd(), connection);
            }
        });
    }

    fn serve(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(mut connection) = self.connections.remove(&fd) else {
            return;
        };
        if self.answer(&mut connection) {
            self.connections.insert(fd, connection);
        } else {
            let _ = ops.remove(Events::new(&connection.stream, EventSet::IN));
        }
    }

    /// Reads what the client sent and answers each complete line as it arrives; false when
    /// the connection is to be closed.
    fn answer(&self, connection: &mut Connection) -> bool {
        let mut buffer = [0u8; 1024];
        loop {
            match connection.stream.read(&mut buffer) {
                Ok(0) => return false,
                Ok(n) => connection.pending.extend_from_slice(&buffer[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            while let Some(end) = connection.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = connection.pending.drain(..=end).collect();
                let reply = handle_line(&self.machine, &line[..end]).to_line();
                // The socket is non-blocking: a reply that does not fit means the client has
                // stopped reading.
                if connection.stream.write_all(&reply).is_err() {
                    return false;
                }
            }
            if connection.pending.len() > MAX_REQUEST_LINE {
                return false;
            }
        }
    }
}

impl MutEventSubscriber for ControlSocket {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else {
            self.serve(events.fd(), ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("Cannot watch the control socket: {e:?}");
        }
    }
}
