//! `/v1/vms/{name}/logs` and `/v1/vms/{name}/console`: the serial console, recorded and live.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{ApiError, ApiQuery, AppState};
use crate::inventory::Inventory;
use crate::model::{ErrorBody, LogsQuery};

/// How often a followed log is checked for new output.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// The VM's console output (the capped log, old rotation included). With `follow`, the
/// response stays open and streams new output until the VM stops.
#[utoipa::path(get, path = "/v1/vms/{name}/logs", tag = "console",
    params(("name" = String, Path), LogsQuery),
    responses(
        (status = 200, description = "Console output", content_type = "text/plain", body = String),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
    ))]
pub async fn logs(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let (id, [old, current]) = inventory.console_logs(&name)?;
    let mut text = tokio::fs::read(&old).await.unwrap_or_default();
    let current_bytes = tokio::fs::read(&current).await.unwrap_or_default();
    let position = current_bytes.len() as u64;
    text.extend_from_slice(&current_bytes);
    if let Some(lines) = query.lines {
        text = last_lines(&text, lines).to_vec();
    }
    let body = if query.follow {
        let first =
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(text)) });
        let rest = follow(inventory, id, current, old, position);
        Body::from_stream(first.chain(rest))
    } else {
        Body::from(text)
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response())
}

/// Streams what is appended to `current` after `position`, across rotations, until the VM
/// is no longer active and everything is sent.
fn follow(
    inventory: Arc<Inventory>,
    id: i64,
    current: PathBuf,
    old: PathBuf,
    position: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(Some(position), move |state| {
        let inventory = inventory.clone();
        let current = current.clone();
        let old = old.clone();
        async move {
            let mut position = state?;
            loop {
                let active = inventory.is_active(id);
                let length = tokio::fs::metadata(&current).await.map_or(0, |m| m.len());
                let mut chunk = Vec::new();
                if length < position {
                    // Rotated: the rest of the file we were reading is now the old one.
                    chunk = read_from(&old, position).await;
                    position = 0;
                }
                if length > position {
                    let more = read_from(&current, position).await;
                    position += more.len() as u64;
                    chunk.extend_from_slice(&more);
                }
                if !chunk.is_empty() {
                    return Some((Ok(Bytes::from(chunk)), Some(position)));
                }
                if !active {
                    return None;
                }
                tokio::time::sleep(FOLLOW_INTERVAL).await;
            }
        }
    })
}

async fn read_from(path: &std::path::Path, position: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    if let Ok(mut file) = tokio::fs::File::open(path).await {
        if file.seek(SeekFrom::Start(position)).await.is_ok() {
            let _ = file.read_to_end(&mut bytes).await;
        }
    }
    bytes
}

fn last_lines(text: &[u8], count: usize) -> &[u8] {
    let trimmed = text.strip_suffix(b"\n").unwrap_or(text);
    let start = trimmed
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, &b)| b == b'\n')
        .nth(count.saturating_sub(1))
        .map_or(0, |(index, _)| index + 1);
    if count == 0 {
        &text[text.len()..]
    } else {
        &text[start..]
    }
}

/// Attach to the serial console of a running VM over a WebSocket: binary messages from the
/// client go to the guest's serial input, console output comes back as binary messages.
#[utoipa::path(get, path = "/v1/vms/{name}/console", tag = "console",
    params(("name" = String, Path)),
    responses(
        (status = 101, description = "WebSocket established"),
        (status = 400, description = "Not a WebSocket request", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 500, description = "The VMM's console socket failed", body = ErrorBody),
    ))]
pub async fn attach(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let socket = inventory.console_socket(&name)?;
    let upgrade = upgrade.map_err(|rejection| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "The console needs a WebSocket upgrade: {}",
                rejection.body_text()
            ),
        )
    })?;
    let stream = UnixStream::connect(&socket).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "vmm_error",
            format!("Cannot connect to the console of '{name}': {e}"),
        )
    })?;
    Ok(upgrade.on_upgrade(move |websocket| bridge(websocket, stream)))
}

/// Copies bytes both ways until either side closes.
async fn bridge(websocket: WebSocket, stream: UnixStream) {
    let (mut ws_send, mut ws_receive) = websocket.split();
    let (mut unix_read, mut unix_write) = stream.into_split();
    let to_client = async {
        let mut buffer = vec![0u8; 4096];
        loop {
            match unix_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(count) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buffer[..count]));
                    if ws_send.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_send.send(Message::Close(None)).await;
    };
    let to_guest = async {
        while let Some(Ok(message)) = ws_receive.next().await {
            let bytes = match message {
                Message::Binary(bytes) => bytes,
                Message::Text(text) => Bytes::copy_from_slice(text.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if unix_write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = to_client => {}
        _ = to_guest => {}
    }
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn keeps_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
    }
}
