//! The control socket a supervisor (the lodge daemon) drives a VMM process through.
//!
//! Newline-delimited JSON: one request per line, one response per line.
//!
//! ```text
//! → {"request":"status"}     ← {"ok":true,"state":"running","boot_time_ms":812,"pid":4242,"engine":"emulator"}
//! → {"request":"pause"}      ← {"ok":true,"state":"paused",...}
//! → {"request":"resume"}
//! → {"request":"shutdown"}   presses the power button; the guest decides when to go
//! → {"request":"stop"}       ends the VM now
//! → garbage                  ← {"ok":false,"error":"Invalid request: ..."}
//! ```

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lodge_devices::{BootTimeHandle, PowerButtonHandle};
use lodge_engine::EngineKind;
use serde::{Deserialize, Serialize};

use crate::machine::MachineHandle;
use crate::unix_socket::UnixSocketListener;

/// Longest request line accepted; a client sending more is disconnected. A client that lets
/// its responses pile up unread is disconnected too: the event loop never waits for one.
const MAX_REQUEST: usize = 4096;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    // Empty struct variants rather than unit ones: serde only rejects unknown fields there.
    Status {},
    Pause {},
    Resume {},
    /// Ask the guest to power off (it may ignore it).
    Shutdown {},
    /// End the VM immediately.
    Stop {},
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// A control response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ControlResponse {
    Status {
        ok: bool,
        state: RunState,
        boot_time_ms: Option<u64>,
        pid: u32,
        engine: EngineKind,
    },
    Error {
        ok: bool,
        error: String,
    },
}

/// Serves the control socket from the VMM's event loop.
pub struct ControlSocket {
    listener: UnixSocketListener,
    machine: MachineHandle,
    boot_time: BootTimeHandle,
    power_button: PowerButtonHandle,
    engine: EngineKind,
    connections: HashMap<RawFd, Connection>,
}

struct Connection {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl ControlSocket {
    /// Binds the socket at `path`, replacing a stale one.
    pub fn bind(
        path: &Path,
        machine: MachineHandle,
        boot_time: BootTimeHandle,
        power_button: PowerButtonHandle,
        engine: EngineKind,
    ) -> std::io::Result<Self> {
        Ok(Self {
            listener: UnixSocketListener::bind(path)?,
            machine,
            boot_time,
            power_button,
            engine,
            connections: HashMap::new(),
        })
    }

    /// Carries out one request line.
    pub fn handle_line(&self, line: &[u8]) -> ControlResponse {
        let request: ControlRequest = match serde_json::from_slice(line) {
            Ok(request) => request,
            Err(e) => {
                return ControlResponse::Error {
                    ok: false,
                    error: format!("Invalid request: {e}"),
                }
            }
        };
        match request {
            ControlRequest::Status {} => {}
            ControlRequest::Pause {} => {
                if let Err(e) = self.machine.pause() {
                    return ControlResponse::Error {
                        ok: false,
                        error: format!("Pause incomplete: {e}"),
                    };
                }
            }
            ControlRequest::Resume {} => self.machine.resume(),
            ControlRequest::Shutdown {} => self.power_button.press(),
            ControlRequest::Stop {} => self.machine.stop("stop requested on the control socket"),
        }
        ControlResponse::Status {
            ok: true,
            state: if self.machine.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            boot_time_ms: self.boot_time.boot_time().map(|t| t.as_millis() as u64),
            pid: std::process::id(),
            engine: self.engine,
        }
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
                let mut reply = serde_json::to_vec(&self.handle_line(&line[..end]))
                    .unwrap_or_else(|_| b"{\"ok\":false,\"error\":\"Internal error\"}".to_vec());
                reply.push(b'\n');
                // The socket is non-blocking: a reply that does not fit means the client has
                // stopped reading.
                if connection.stream.write_all(&reply).is_err() {
                    return false;
                }
            }
            if connection.pending.len() > MAX_REQUEST {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_their_documented_form() {
        let parse = |s: &str| serde_json::from_str::<ControlRequest>(s);
        assert_eq!(
            parse(r#"{"request":"status"}"#).unwrap(),
            ControlRequest::Status {}
        );
        assert_eq!(
            parse(r#"{"request":"shutdown"}"#).unwrap(),
            ControlRequest::Shutdown {}
        );
        assert_eq!(
            serde_json::to_string(&ControlRequest::Stop {}).unwrap(),
            r#"{"request":"stop"}"#
        );
        assert!(parse(r#"{"request":"explode"}"#).is_err());
        assert!(parse(r#"{"request":"stop","now":true}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[test]
    fn responses_have_the_documented_shape() {
        let status = ControlResponse::Status {
            ok: true,
            state: RunState::Paused,
            boot_time_ms: None,
            pid: 7,
            engine: EngineKind::Emulator,
        };
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"ok":true,"state":"paused","boot_time_ms":null,"pid":7,"engine":"emulator"}"#
        );
        let error = ControlResponse::Error {
            ok: false,
            error: "Invalid request".into(),
        };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"ok":false,"error":"Invalid request"}"#
        );
    }
}
