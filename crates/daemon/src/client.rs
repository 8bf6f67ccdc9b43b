//! A small HTTP client for the API, over the Unix socket or TCP (with a bearer token), used
//! by the `lodge` CLI and the tests.

use std::path::PathBuf;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::WebSocketStream;

use crate::model::ErrorBody;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    /// `host:port`, with the bearer token.
    Tcp {
        address: String,
        token: Option<String>,
    },
}

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("Cannot connect to the lodge daemon at {target}")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with the daemon failed")]
    Http(#[from] hyper::Error),
    #[error("Invalid request")]
    Request(#[from] hyper::http::Error),
    #[error("WebSocket failed")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// The API answered with an error.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("Unexpected response from the daemon (status {status})")]
    BadResponse {
        status: u16,
        #[source]
        source: serde_json::Error,
    },
}

/// A response as received.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

impl RawResponse {
    /// The body as JSON (any value).
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body).map_err(|source| ClientError::BadResponse {
            status: self.status.as_u16(),
            source,
        })
    }
}

/// A stream to the daemon, Unix or TCP.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// One client; each request uses a fresh connection.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
}

impl Client {
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self::new(Endpoint::Unix(path.into()))
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let response = self.send(Method::GET, path, None, None).await?;
        decode(response)
    }

    /// A request with an optional JSON body, decoded.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request bodies serialize"));
        let response = self
            .send(
                method,
                path,
                body.as_ref().map(|_| "application/json"),
                body.clone(),
            )
            .await?;
        decode(response)
    }

    /// A request whose success has no body (204).
    pub async fn call_empty(&self, method: Method, path: &str) -> Result<(), ClientError> {
        let response = self.send(method, path, None, None).await?;
        check(&response)?;
        Ok(())
    }

    /// Any request, returned whatever its status.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let response = self.open(method, path, content_type, body).await?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.into_body().collect().await?.to_bytes();
        Ok(RawResponse {
            status,
            content_type,
            body,
        })
    }

    /// A request whose body is read as it arrives (`logs?follow=true`). Errors (non-2xx)
    /// are read whole and returned as [`ClientError::Api`].
    pub async fn stream(&self, path: &str) -> Result<Incoming, ClientError> {
        let response = self.open(Method::GET, path, None, None).await?;
        if response.status().is_success() {
            return Ok(response.into_body());
        }
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        check(&RawResponse {
            status,
            content_type: None,
            body,
        })
        .map(|_| unreachable!("non-success status passed the check"))
    }

    /// Opens a WebSocket at `path` (the console).
    pub async fn websocket(
        &self,
        path: &str,
    ) -> Result<WebSocketStream<Box<dyn Connection>>, ClientError> {
        let stream = self.connect().await?;
        let mut request = format!("ws://lodge{path}").into_client_request()?;
        if let Some(token) = self.token() {
            // A token from the environment may hold bytes a header cannot carry.
            let value = format!("Bearer {token}")
                .parse()
                .map_err(hyper::http::Error::from)?;
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((websocket, _)) => Ok(websocket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let body = response.body().clone().unwrap_or_default();
                check(&RawResponse {
                    status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
                    content_type: None,
                    body: body.into(),
                })?;
                Err(ClientError::Api {
                    status,
                    code: "websocket".to_owned(),
                    message: "The daemon refused the WebSocket".to_owned(),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn open(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "lodge");
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        if let Some(token) = self.token() {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        Ok(sender.send_request(request).await?)
    }

    async fn connect(&self) -> Result<Box<dyn Connection>, ClientError> {
        match &self.endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Connection>)
                .map_err(|source| ClientError::Connect {
                    target: path.display().to_string(),
                    source,
                }),
            Endpoint::Tcp { address, .. } => TcpStream::connect(address)
                .await
                .map(|s| {
                    let _ = s.set_nodelay(true);
                    Box::new(s) as Box<dyn Connection>
                })
                .map_err(|source| ClientError::Connect {
                    target: address.clone(),
                    source,
                }),
        }
    }

    fn token(&self) -> Option<&str> {
        match &self.endpoint {
            Endpoint::Tcp { token, .. } => token.as_deref(),
            Endpoint::Unix(_) => None,
        }
    }
}

/// Turns a non-2xx response into [`ClientError::Api`] with the API's code and message.
pub fn check(response: &RawResponse) -> Result<&RawResponse, ClientError> {
    if response.status.is_success() {
        return Ok(response);
    }
    let status = response.status.as_u16();
    match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(body) => Err(ClientError::Api {
            status,
            code: body.error.code,
            message: body.error.message,
        }),
        Err(_) => Err(ClientError::Api {
            status,
            code: "unknown".to_owned(),
            message: format!(
                "The daemon answered {}: {}",
                response.status,
                String::from_utf8_lossy(&response.body).trim()
            ),
        }),
    }
}

fn decode<T: DeserializeOwned>(response: RawResponse) -> Result<T, ClientError> {
    check(&response)?;
    serde_json::from_slice(&response.body).map_err(|source| ClientError::BadResponse {
        status: response.status.as_u16(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_no_header_can_carry_is_an_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = Client::new(Endpoint::Tcp {
            address: listener.local_addr().unwrap().to_string(),
            token: Some("line\nbreak".to_owned()),
        });
        assert!(matches!(
            client.websocket("/v1/vms/a/console").await,
            Err(ClientError::Request(_))
        ));
        assert!(matches!(
            client.get::<serde_json::Value>("/v1/host").await,
            Err(ClientError::Request(_))
        ));
    }
}
