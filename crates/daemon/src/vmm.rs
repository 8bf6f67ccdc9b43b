//! The daemon's side of the VMM control socket ([`lodge_contract::control`]): one request,
//! one reply, within a deadline.

use std::path::Path;
use std::time::Duration;

use lodge_contract::control::InvalidReply;
use lodge_contract::{ControlReply, ControlRequest, VmmStatus};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// How long a control request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
    BadResponse(#[source] InvalidReply),
    #[error("The VMM refused: {0}")]
    Refused(String),
}

/// Sends one request and reads its reply.
pub async fn request(socket: &Path, request: ControlRequest) -> Result<VmmStatus, VmmError> {
    tokio::time::timeout(REQUEST_TIMEOUT, exchange(socket, request))
        .await
        .map_err(|_| VmmError::Timeout)?
}

async fn exchange(socket: &Path, request: ControlRequest) -> Result<VmmStatus, VmmError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| VmmError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    write.write_all(&request.to_line()).await?;
    let mut reader = BufReader::new(read);
    let mut reply = Vec::new();
    if reader.read_until(b'\n', &mut reply).await? == 0 {
        return Err(VmmError::Closed);
    }
    ControlReply::parse(&reply)
        .map_err(VmmError::BadResponse)?
        .into_result()
        .map_err(VmmError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodge_contract::{EngineKind, RunState};
    use tokio::net::UnixListener;

    /// Answers one connection with `reply` after reading a request line.
    async fn serve_once(listener: UnixListener, reply: &'static [u8]) -> Vec<u8> {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut request = Vec::new();
        BufReader::new(read)
            .read_until(b'\n', &mut request)
            .await
            .unwrap();
        write.write_all(reply).await.unwrap();
        request
    }

    #[tokio::test]
    async fn a_request_gets_the_status_or_the_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(serve_once(
            listener,
            b"{\"ok\":true,\"state\":\"paused\",\"boot_time_ms\":812,\"pid\":7,\"engine\":\"emulator\"}\n",
        ));
        let status = request(&path, ControlRequest::Pause {}).await.unwrap();
        assert_eq!(status.state, RunState::Paused);
        assert_eq!(status.boot_time_ms, Some(812));
        assert_eq!(status.engine, EngineKind::Emulator);
        assert_eq!(server.await.unwrap(), b"{\"request\":\"pause\"}\n");

        let listener = UnixListener::bind(dir.path().join("b.sock")).unwrap();
        tokio::spawn(serve_once(
            listener,
            b"{\"ok\":false,\"error\":\"Pause incomplete\"}\n",
        ));
        match request(&dir.path().join("b.sock"), ControlRequest::Pause {}).await {
            Err(VmmError::Refused(message)) => assert_eq!(message, "Pause incomplete"),
            other => panic!("{other:?}"),
        }

        let listener = UnixListener::bind(dir.path().join("c.sock")).unwrap();
        tokio::spawn(serve_once(listener, b"garbage\n"));
        assert!(matches!(
            request(&dir.path().join("c.sock"), ControlRequest::Status {}).await,
            Err(VmmError::BadResponse(_))
        ));
        assert!(matches!(
            request(&dir.path().join("missing.sock"), ControlRequest::Status {}).await,
            Err(VmmError::Connect { .. })
        ));
    }
}
