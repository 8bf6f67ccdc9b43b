//! The control socket through which a supervisor drives a VMM process.
//!
//! Newline-delimited JSON on a Unix socket: one request per line, one reply per line.
//!
//! ```text
//! → {"request":"status"}     ← {"ok":true,"state":"running","boot_time_ms":812,"pid":4242,"engine":"emulator"}
//! → {"request":"pause"}      ← {"ok":true,"state":"paused",...}   (also when already paused)
//! → {"request":"resume"}     ← {"ok":true,"state":"running",...}  (also when not paused)
//! → {"request":"shutdown"}   presses the power button; the guest decides when to go
//! → {"request":"stop"}       ends the VM now
//! → garbage                  ← {"ok":false,"error":"Invalid request: ..."}
//! ```

use serde::{Deserialize, Serialize};

use crate::EngineKind;

/// Longest request line a VMM accepts; a client sending more is disconnected.
pub const MAX_REQUEST_LINE: usize = 4096;

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    // Empty struct variants rather than unit ones: serde only rejects unknown fields there.
    Status {},
    Pause {},
    Resume {},
    /// Press the guest's power button (the guest may ignore it).
    Shutdown {},
    /// End the VM now.
    Stop {},
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// What a VMM reports after every successful request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStatus {
    pub state: RunState,
    /// Time from process start to the guest's "userspace started" write, once it came.
    pub boot_time_ms: Option<u64>,
    pub pid: u32,
    pub engine: EngineKind,
}

/// A reply line: the status after the request, or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlReply {
    Status(VmmStatus),
    Error(String),
}

/// A reply line that is not one.
#[derive(Debug, thiserror::Error)]
#[error("Invalid control reply")]
pub struct InvalidReply(#[source] serde_json::Error);

/// What a VMM does for each request. [`handle_line`] turns request lines into replies
/// the same way for every implementation.
pub trait ControlTarget {
    /// Parks every vCPU; the error says why some did not park.
    fn pause(&self) -> Result<(), String>;
    fn resume(&self);
    fn press_power_button(&self);
    /// Ends the VM now (the VMM exits soon after replying).
    fn stop(&self);
    fn status(&self) -> VmmStatus;
}

/// Carries out one request line (without its newline) on `target`. Pause and resume are
/// idempotent: the reply says the state the VM is in.
pub fn handle_line(target: &impl ControlTarget, line: &[u8]) -> ControlReply {
    let request = match ControlRequest::parse(line) {
        Ok(request) => request,
        Err(e) => return ControlReply::Error(format!("Invalid request: {e}")),
    };
    match request {
        ControlRequest::Status {} => {}
        ControlRequest::Pause {} => {
            if let Err(e) = target.pause() {
                return ControlReply::Error(format!("Pause incomplete: {e}"));
            }
        }
        ControlRequest::Resume {} => target.resume(),
        ControlRequest::Shutdown {} => target.press_power_button(),
        ControlRequest::Stop {} => target.stop(),
    }
    ControlReply::Status(target.status())
}

impl ControlRequest {
    /// The request as one line, newline included.
    pub fn to_line(self) -> Vec<u8> {
        let mut line = serde_json::to_vec(&self).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Parses a request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

impl ControlReply {
    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let value = match self {
            Self::Status(status) => {
                let mut value = serde_json::to_value(status).unwrap_or_default();
                if let serde_json::Value::Object(map) = &mut value {
                    map.insert("ok".into(), true.into());
                }
                value
            }
            Self::Error(error) => serde_json::json!({ "ok": false, "error": error }),
        };
        let mut line = value.to_string().into_bytes();
        line.push(b'\n');
        line
    }

    /// Parses a reply line (with or without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, InvalidReply> {
        #[derive(Deserialize)]
        struct Wire {
            ok: bool,
            #[serde(default)]
            error: Option<String>,
            #[serde(flatten)]
            rest: serde_json::Value,
        }
        let wire: Wire = serde_json::from_slice(line.trim_ascii()).map_err(InvalidReply)?;
        if wire.ok {
            serde_json::from_value(wire.rest)
                .map(Self::Status)
                .map_err(InvalidReply)
        } else {
            Ok(Self::Error(
                wire.error.unwrap_or_else(|| "no reason given".to_owned()),
            ))
        }
    }

    /// The status, or the VMM's reason for refusing.
    pub fn into_result(self) -> Result<VmmStatus, String> {
        match self {
            Self::Status(status) => Ok(status),
            Self::Error(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_their_documented_form() {
        let parse = |s: &str| ControlRequest::parse(s.as_bytes());
        assert_eq!(
            parse(r#"{"request":"status"}"#).unwrap(),
            ControlRequest::Status {}
        );
        assert_eq!(
            parse(r#"{"request":"shutdown"}"#).unwrap(),
            ControlRequest::Shutdown {}
        );
        assert_eq!(
            ControlRequest::Stop {}.to_line(),
            b"{\"request\":\"stop\"}\n"
        );
        assert!(parse(r#"{"request":"explode"}"#).is_err());
        assert!(parse(r#"{"request":"stop","now":true}"#).is_err());
        assert!(parse("not json").is_err());
    }

    #[derive(Default)]
    struct Recorder {
        calls: std::cell::RefCell<Vec<&'static str>>,
        refuse_pause: bool,
    }

    impl ControlTarget for Recorder {
        fn pause(&self) -> Result<(), String> {
            self.calls.borrow_mut().push("pause");
            if self.refuse_pause {
                Err("1 of 2 vCPUs still running".into())
            } else {
                Ok(())
            }
        }
        fn resume(&self) {
            self.calls.borrow_mut().push("resume");
        }
        fn press_power_button(&self) {
            self.calls.borrow_mut().push("button");
        }
        fn stop(&self) {
            self.calls.borrow_mut().push("stop");
        }
        fn status(&self) -> VmmStatus {
            VmmStatus {
                state: RunState::Running,
                boot_time_ms: Some(5),
                pid: 1,
                engine: EngineKind::Kvm,
            }
        }
    }

    #[test]
    fn request_lines_reach_the_target_and_get_a_reply() {
        let target = Recorder::default();
        for line in [
            r#"{"request":"pause"}"#,
            r#"{"request":"resume"}"#,
            r#"{"request":"shutdown"}"#,
            r#"{"request":"stop"}"#,
            r#"{"request":"status"}"#,
        ] {
            assert_eq!(
                handle_line(&target, line.as_bytes()),
                ControlReply::Status(target.status())
            );
        }
        assert_eq!(
            *target.calls.borrow(),
            ["pause", "resume", "button", "stop"]
        );
        let refusing = Recorder {
            refuse_pause: true,
            ..Recorder::default()
        };
        assert_eq!(
            handle_line(&refusing, br#"{"request":"pause"}"#),
            ControlReply::Error("Pause incomplete: 1 of 2 vCPUs still running".into())
        );
        match handle_line(&target, b"{\"request\":\"explode\"}") {
            ControlReply::Error(e) => assert!(e.starts_with("Invalid request: "), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            target.calls.borrow().len(),
            4,
            "a bad line reached the target"
        );
    }

    #[test]
    fn replies_have_their_documented_form_and_round_trip() {
        let status = ControlReply::Status(VmmStatus {
            state: RunState::Paused,
            boot_time_ms: None,
            pid: 7,
            engine: EngineKind::Emulator,
        });
        let line = status.to_line();
        let text = String::from_utf8(line.clone()).unwrap();
        assert!(text.ends_with('\n'));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"ok": true, "state": "paused", "boot_time_ms": null, "pid": 7, "engine": "emulator"})
        );
        assert_eq!(ControlReply::parse(&line).unwrap(), status);

        let error = ControlReply::Error("Invalid request".into());
        assert_eq!(
            error.to_line(),
            b"{\"error\":\"Invalid request\",\"ok\":false}\n"
        );
        assert_eq!(ControlReply::parse(&error.to_line()).unwrap(), error);
        assert_eq!(
            ControlReply::parse(br#"{"ok":false}"#)
                .unwrap()
                .into_result(),
            Err("no reason given".to_owned())
        );
        assert!(ControlReply::parse(b"garbage").is_err());
        assert!(ControlReply::parse(br#"{"ok":true,"state":"dancing"}"#).is_err());
    }
}
