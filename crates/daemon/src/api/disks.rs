//! `/v1/disks`: raw disk images in the storage directory.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, ApiJson, AppState};
use crate::model::{CreateDisk, Disk, ErrorBody};

/// List disks, by name.
#[utoipa::path(get, path = "/v1/disks", tag = "disks",
    responses((status = 200, description = "All disks", body = [Disk])))]
pub async fn list(State(inventory): State<AppState>) -> Result<Json<Vec<Disk>>, ApiError> {
    Ok(Json(inventory.list_disks()?))
}

/// Create a blank sparse disk (201) or import a raw image from a host path (202; the disk
/// is `importing`, with progress, until it is `ready` or `failed`).
#[utoipa::path(post, path = "/v1/disks", tag = "disks", request_body = CreateDisk,
    responses(
        (status = 201, description = "Created", body = Disk),
        (status = 202, description = "Import started", body = Disk),
        (status = 400, description = "Invalid request or unreadable source", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ))]
pub async fn create(
    State(inventory): State<AppState>,
    ApiJson(request): ApiJson<CreateDisk>,
) -> Result<(StatusCode, Json<Disk>), ApiError> {
    let status = if request.source.is_some() {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    let disk = inventory.create_disk(request)?;
    Ok((status, Json(disk)))
}

/// Inspect a disk.
#[utoipa::path(get, path = "/v1/disks/{name}", tag = "disks", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The disk", body = Disk),
        (status = 404, description = "Unknown disk", body = ErrorBody),
    ))]
pub async fn show(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Disk>, ApiError> {
    Ok(Json(inventory.disk(&name)?))
}

/// Delete a disk and its image; refused while attached to a VM or importing.
#[utoipa::path(delete, path = "/v1/disks/{name}", tag = "disks", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown disk", body = ErrorBody),
        (status = 409, description = "Attached or importing", body = ErrorBody),
    ))]
pub async fn delete(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    inventory.delete_disk(&name)?;
    Ok(StatusCode::NO_CONTENT)
}
