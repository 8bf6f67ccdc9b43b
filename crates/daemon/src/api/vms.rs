//! `/v1/vms`: define, inspect, change and run VMs.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, ApiJson, ApiQuery, AppState};
use crate::model::{CreateVm, DeleteQuery, ErrorBody, StopQuery, UpdateVm, Vm};

/// List VMs, by name.
#[utoipa::path(get, path = "/v1/vms", tag = "vms",
    responses((status = 200, description = "All VMs", body = [Vm])))]
pub async fn list(State(inventory): State<AppState>) -> Result<Json<Vec<Vm>>, ApiError> {
    Ok(Json(inventory.list_vms()?))
}

/// Define a VM (state `stopped`).
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses(
        (status = 201, description = "Defined", body = Vm),
        (status = 400, description = "Invalid request or unknown disk", body = ErrorBody),
        (status = 409, description = "Name taken", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Exceeds host capacity", body = ErrorBody),
    ))]
pub async fn create(
    State(inventory): State<AppState>,
    ApiJson(request): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::CREATED, Json(inventory.create_vm(request)?)))
}

/// Inspect a VM.
#[utoipa::path(get, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The VM", body = Vm),
        (status = 404, description = "Unknown VM", body = ErrorBody),
    ))]
pub async fn show(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(inventory.vm(&name)?))
}

/// Change settings of a VM that is not running.
#[utoipa::path(patch, path = "/v1/vms/{name}", tag = "vms", params(("name" = String, Path)),
    request_body = UpdateVm,
    responses(
        (status = 200, description = "Updated", body = Vm),
        (status = 400, description = "Invalid request or unknown disk", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "The VM is active", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Exceeds host capacity", body = ErrorBody),
    ))]
pub async fn update(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiJson(request): ApiJson<UpdateVm>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(inventory.update_vm(&name, request).await?))
}

/// Delete a VM (its disks stay). An active VM is refused unless `force`, which kills it.
#[utoipa::path(delete, path = "/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path), DeleteQuery),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "The VM is active", body = ErrorBody),
    ))]
pub async fn delete(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> Result<StatusCode, ApiError> {
    inventory.delete_vm(&name, query.force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Start a VM. Returns once its VMM process runs (state `starting`); poll the VM until it
/// is `running` (or `crashed`).
#[utoipa::path(post, path = "/v1/vms/{name}/start", tag = "lifecycle",
    params(("name" = String, Path)),
    responses(
        (status = 202, description = "Starting", body = Vm),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Already active, or a disk is busy", body = ErrorBody),
        (status = 422, description = "Exceeds host capacity", body = ErrorBody),
        (status = 500, description = "The VMM could not be started", body = ErrorBody),
    ))]
pub async fn start(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    Ok((StatusCode::ACCEPTED, Json(inventory.start_vm(&name).await?)))
}

/// Stop a VM gracefully: the guest is asked to shut down and the VMM is forced to stop
/// after the timeout. Returns at once (state `stopping`).
#[utoipa::path(post, path = "/v1/vms/{name}/stop", tag = "lifecycle",
    params(("name" = String, Path), StopQuery),
    responses(
        (status = 202, description = "Stopping", body = Vm),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Not running", body = ErrorBody),
    ))]
pub async fn stop(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<StopQuery>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let timeout = query.timeout.map(Duration::from_secs);
    Ok((
        StatusCode::ACCEPTED,
        Json(inventory.stop_vm(&name, timeout).await?),
    ))
}

/// Stop a VM's VMM now; returns once the VM is `stopped`.
#[utoipa::path(post, path = "/v1/vms/{name}/kill", tag = "lifecycle",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "Stopped", body = Vm),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Not running", body = ErrorBody),
    ))]
pub async fn kill(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(inventory.kill_vm(&name).await?))
}

/// Pause a running VM's vCPUs.
#[utoipa::path(post, path = "/v1/vms/{name}/pause", tag = "lifecycle",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "Paused", body = Vm),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Not running, or the VMM refused", body = ErrorBody),
        (status = 500, description = "The VMM did not answer", body = ErrorBody),
    ))]
pub async fn pause(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(inventory.pause_vm(&name).await?))
}

/// Resume a paused VM.
#[utoipa::path(post, path = "/v1/vms/{name}/resume", tag = "lifecycle",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "Running", body = Vm),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Not paused, or the VMM refused", body = ErrorBody),
        (status = 500, description = "The VMM did not answer", body = ErrorBody),
    ))]
pub async fn resume(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(inventory.resume_vm(&name).await?))
}

/// Restart a VM: a graceful stop (as `stop`) then a start, in the background. A VM that is
/// not active is just started.
#[utoipa::path(post, path = "/v1/vms/{name}/restart", tag = "lifecycle",
    params(("name" = String, Path), StopQuery),
    responses(
        (status = 202, description = "Restarting", body = Vm),
        (status = 400, description = "Invalid query", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Starting or stopping", body = ErrorBody),
        (status = 422, description = "Exceeds host capacity", body = ErrorBody),
    ))]
pub async fn restart(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<StopQuery>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let timeout = query.timeout.map(Duration::from_secs);
    Ok((
        StatusCode::ACCEPTED,
        Json(inventory.restart_vm(&name, timeout).await?),
    ))
}
