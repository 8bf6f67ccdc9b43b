//! `/v1/host`: the host's capacity and allocation.

use axum::extract::State;
use axum::Json;

use super::{ApiError, AppState};
use crate::model::HostInfo;

/// Host CPUs and memory, the overcommit policy, and what active VMs use.
#[utoipa::path(get, path = "/v1/host", tag = "host",
    responses((status = 200, description = "Host information", body = HostInfo)))]
pub async fn info(State(inventory): State<AppState>) -> Result<Json<HostInfo>, ApiError> {
    Ok(Json(inventory.host_info()?))
}
