//! The REST API: routes, the JSON error shape, request extractors that answer in that
//! shape, and bearer-token authentication for TCP.

mod console;
mod disks;
mod host;
mod networks;
mod openapi;
mod vms;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;

use crate::inventory::{Inventory, InventoryError};
use crate::model::{ErrorBody, ErrorDetail};

pub use openapi::{openapi_json, ApiDoc};

/// Shared state of the handlers.
pub type AppState = Arc<Inventory>;

/// All routes, with JSON errors for unknown paths and methods.
pub fn router(inventory: Arc<Inventory>) -> Router {
    let body_limit = inventory.config().body_limit;
    Router::new()
        .route("/v1/openapi.json", get(openapi::document))
        .route("/v1/host", get(host::info))
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route(
            "/v1/vms/{name}",
            get(vms::show).patch(vms::update).delete(vms::delete),
        )
        .route("/v1/vms/{name}/start", post(vms::start))
        .route("/v1/vms/{name}/stop", post(vms::stop))
        .route("/v1/vms/{name}/kill", post(vms::kill))
        .route("/v1/vms/{name}/pause", post(vms::pause))
        .route("/v1/vms/{name}/resume", post(vms::resume))
        .route("/v1/vms/{name}/restart", post(vms::restart))
        .route("/v1/vms/{name}/logs", get(console::logs))
        .route("/v1/vms/{name}/console", get(console::attach))
        .route("/v1/disks", get(disks::list).post(disks::create))
        .route("/v1/disks/{name}", get(disks::show).delete(disks::delete))
        .route("/v1/networks", get(networks::list).post(networks::create))
        .route(
            "/v1/networks/{name}",
            get(networks::show).delete(networks::delete),
        )
        .route(
            "/v1/vms/{name}/port-forwards",
            post(networks::add_port_forward),
        )
        .route(
            "/v1/vms/{name}/port-forwards/{host_port}",
            axum::routing::delete(networks::remove_port_forward),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn(move |request, next| {
            refuse_large_bodies(body_limit, request, next)
        }))
        .with_state(inventory)
}

/// Most bytes of an oversized body read (and dropped) before answering 413, so that a
/// client still sending gets the response instead of a broken connection.
const DRAIN_LIMIT: u64 = 64 << 20;

/// Answers 413 to a request whose declared length is over `limit`.
async fn refuse_large_bodies(limit: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => {
            if length <= DRAIN_LIMIT {
                let mut body = request.into_body().into_data_stream();
                while let Some(Ok(_)) = futures_util::StreamExt::next(&mut body).await {}
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("Request body of {length} bytes is over the limit of {limit} bytes"),
            )
            .into_response()
        }
        _ => next.run(request).await,
    }
}

/// The routes behind a bearer token check, for TCP.
pub fn router_with_token(inventory: Arc<Inventory>, token: String) -> Router {
    let token: Arc<str> = token.into();
    router(inventory).layer(axum::middleware::from_fn(move |request, next| {
        let token = token.clone();
        async move { require_token(&token, request, next).await }
    }))
}

async fn require_token(token: &str, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match presented {
        Some(presented) if constant_time_eq(presented.as_bytes(), token.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Wrong bearer token",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Missing 'Authorization: Bearer <token>' header",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An error response: `{"error": {"code", "message"}}` with its status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_owned(),
                    message: message.into(),
                },
            },
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl From<InventoryError> for ApiError {
    fn from(error: InventoryError) -> Self {
        let (status, code) = error.status_and_code();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let message = crate::inventory::error_chain(&error);
        if status.is_server_error() {
            tracing::error!("{message}");
        }
        Self::new(status, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// `Json` whose rejections use the API's error shape: 413 for a body over the limit, 415
/// without a JSON content type, 400 for everything else (syntax, types, unknown fields).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "Request body is too large",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Expected a request with 'Content-Type: application/json'",
        ),
        _ => ApiError::invalid(rejection.body_text()),
    }
}

/// `Query` whose rejections use the API's error shape (400).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(rejection)),
        }
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::invalid(rejection.body_text())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such API path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed on this path",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
    }
}
