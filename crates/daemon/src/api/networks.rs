//! `/v1/networks`: virtual switches; and a VM's port forwards.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{ApiError, ApiJson, AppState};
use crate::model::{CreateNetwork, ErrorBody, Network, PortForward, Vm};

/// List networks, by name, with their leases.
#[utoipa::path(get, path = "/v1/networks", tag = "networks",
    responses((status = 200, description = "All networks", body = [Network])))]
pub async fn list(State(inventory): State<AppState>) -> Result<Json<Vec<Network>>, ApiError> {
    Ok(Json(inventory.list_networks()?))
}

/// Create a network: a bridge with the subnet's first address, a DHCP server and rules.
#[utoipa::path(post, path = "/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses(
        (status = 201, description = "Created", body = Network),
        (status = 400, description = "Invalid name or subnet", body = ErrorBody),
        (status = 409, description = "Name taken, subnet overlapping a network or a host route, bridge name taken, or host networking off", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
    ))]
pub async fn create(
    State(inventory): State<AppState>,
    ApiJson(request): ApiJson<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(inventory.create_network(request).await?),
    ))
}

/// Inspect a network and its leases.
#[utoipa::path(get, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path)),
    responses(
        (status = 200, description = "The network", body = Network),
        (status = 404, description = "Unknown network", body = ErrorBody),
    ))]
pub async fn show(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(inventory.network(&name)?))
}

/// Delete a network no VM uses, with its bridge and rules.
#[utoipa::path(delete, path = "/v1/networks/{name}", tag = "networks", params(("name" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown network", body = ErrorBody),
        (status = 409, description = "VMs have NICs on it", body = ErrorBody),
    ))]
pub async fn delete(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    inventory.delete_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Forward a TCP port of the host to the VM's first NIC (on a NAT network).
#[utoipa::path(post, path = "/v1/vms/{name}/port-forwards", tag = "vms", params(("name" = String, Path)),
    request_body = PortForward,
    responses(
        (status = 200, description = "The VM with its forwards", body = Vm),
        (status = 400, description = "No NIC, an isolated network, or port 0", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
        (status = 409, description = "Host port already forwarded", body = ErrorBody),
    ))]
pub async fn add_port_forward(
    State(inventory): State<AppState>,
    Path(name): Path<String>,
    ApiJson(forward): ApiJson<PortForward>,
) -> Result<Json<Vm>, ApiError> {
    inventory.add_port_forward(&name, forward)?;
    Ok(Json(inventory.vm(&name)?))
}

/// Remove a port forward.
#[utoipa::path(delete, path = "/v1/vms/{name}/port-forwards/{host_port}", tag = "vms",
    params(("name" = String, Path), ("host_port" = u16, Path)),
    responses(
        (status = 200, description = "The VM with its forwards", body = Vm),
        (status = 400, description = "No such forward", body = ErrorBody),
        (status = 404, description = "Unknown VM", body = ErrorBody),
    ))]
pub async fn remove_port_forward(
    State(inventory): State<AppState>,
    Path((name, host_port)): Path<(String, u16)>,
) -> Result<Json<Vm>, ApiError> {
    inventory.remove_port_forward(&name, host_port)?;
    Ok(Json(inventory.vm(&name)?))
}
