//! The daemon's side of the VMM process contract: the configuration file given to
//! `lodge run --config`, the control socket protocol, and the exit report.
//!
//! Control protocol: newline-delimited JSON on a Unix socket, one request per line
//! (`{"request": "status" | "pause" | "resume" | "shutdown" | "stop"}`), one response per
//! line (`{"ok": true, "state", "boot_time_ms", "pid", "engine"}` or
//! `{"ok": false, "error"}`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `lodge_vmm::VmConfig` as the daemon writes it (the VMM denies unknown fields, so this
/// must stay a subset of its fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmConfig {
    /// Empty: the default guest image.
    pub kernel: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub append: Vec<String>,
    pub cpus: u32,
    /// MiB.
    pub memory: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<VmmDisk>,
    pub rng: bool,
    pub engine: String,
    /// Always `none`: the console goes to `console_log` and `console_socket`.
    pub console: String,
    pub api_socket: PathBuf,
    pub console_log: ConsoleLog,
    pub console_socket: PathBuf,
    pub exit_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmmDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The size-capped console log the VMM appends to (rotating to `PATH.1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsoleLog {
    pub path: PathBuf,
    pub limit: u64,
}

/// A control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Press the guest's power button.
    Shutdown,
    /// End the VMM now.
    Stop,
}

/// A successful control response.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VmmStatus {
    pub state: String,
    pub boot_time_ms: Option<u64>,
    pub pid: Option<u32>,
    pub engine: Option<String>,
}

/// What the VMM writes to its exit file when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitReport {
    pub reason: String,
    pub status: i32,
    #[serde(default)]
    pub boot_time_ms: Option<u64>,
}

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Cannot reach the VMM's control socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("The VMM's control socket failed")]
    Io(#[from] std::io::Error),
    #[error("The VMM did not answer in time")]
    Timeout,
    #[error("The VMM closed the control connection")]
    Closed,
    #[error("The VMM sent an invalid response")]
    BadResponse(#[source] serde_json::Error),
    #[error("The VMM refused: {0}")]
    Refused(String),
}

/// Sends one request and reads its response.
pub async fn request(socket: &Path, request: Request) -> Result<VmmStatus, VmmError> {
    tokio::time::timeout(REQUEST_TIMEOUT, request_inner(socket, request))
        .await
        .map_err(|_| VmmError::Timeout)?
}

async fn request_inner(socket: &Path, request: Request) -> Result<VmmStatus, VmmError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| VmmError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::json!({ "request": request }).to_string();
    line.push('\n');
    write.write_all(line.as_bytes()).await?;
    let mut reader = BufReader::new(read);
    let mut response = String::new();
    if reader.read_line(&mut response).await? == 0 {
        return Err(VmmError::Closed);
    }
    parse_response(&response)
}

fn parse_response(line: &str) -> Result<VmmStatus, VmmError> {
    #[derive(Deserialize)]
    struct Raw {
        ok: bool,
        #[serde(default)]
        error: Option<String>,
        #[serde(flatten)]
        rest: serde_json::Value,
    }
    let raw: Raw = serde_json::from_str(line.trim()).map_err(VmmError::BadResponse)?;
    if !raw.ok {
        return Err(VmmError::Refused(
            raw.error.unwrap_or_else(|| "no reason given".to_owned()),
        ));
    }
    serde_json::from_value(raw.rest).map_err(VmmError::BadResponse)
}

/// Reads the exit report, if the VMM wrote one.
pub fn read_exit_report(path: &Path) -> Option<ExitReport> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let status = parse_response(
            r#"{"ok":true,"state":"running","boot_time_ms":812,"pid":7,"engine":"emulator"}"#,
        )
        .unwrap();
        assert_eq!(status.state, "running");
        assert_eq!(status.boot_time_ms, Some(812));
        assert_eq!(status.engine.as_deref(), Some("emulator"));
        let status = parse_response(r#"{"ok":true,"state":"paused","boot_time_ms":null}"#).unwrap();
        assert_eq!(status.boot_time_ms, None);
        match parse_response(r#"{"ok":false,"error":"Already paused"}"#) {
            Err(VmmError::Refused(message)) => assert_eq!(message, "Already paused"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_response("garbage"),
            Err(VmmError::BadResponse(_))
        ));
    }

    #[test]
    fn requests_serialize_as_the_contract_says() {
        let line = serde_json::json!({ "request": Request::Shutdown }).to_string();
        assert_eq!(line, r#"{"request":"shutdown"}"#);
    }
}
