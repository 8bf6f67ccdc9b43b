//! The OpenAPI document, generated from the handlers and models, served at
//! `/v1/openapi.json` and checked in as `docs/openapi.json`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use super::{console, disks, host, networks, vms};
use crate::model;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "lodge",
        description = "Manage VMs and disks on a lodge host. Served on a Unix socket \
            (default /run/lodge/lodge.sock; access by file permissions) and optionally on TCP, \
            where every request needs `Authorization: Bearer <token>`. Errors are \
            `{\"error\": {\"code\", \"message\"}}`; the codes are listed in docs/api.md.",
        license(name = "Apache-2.0"),
    ),
    paths(
        document,
        host::info,
        vms::list, vms::create, vms::show, vms::update, vms::delete,
        vms::start, vms::stop, vms::kill, vms::pause, vms::resume, vms::restart,
        console::logs, console::attach,
        disks::list, disks::create, disks::show, disks::delete,
        networks::list, networks::create, networks::show, networks::delete,
        networks::add_port_forward, networks::remove_port_forward,
    ),
    components(schemas(
        model::Vm, model::VmState, model::EngineChoice, model::EngineKind, model::DiskAttachment,
        model::CreateVm,
        model::UpdateVm, model::VmRuntime, model::VmExit, model::Disk, model::DiskState,
        model::ImportProgress, model::CreateDisk, model::HostInfo, model::ErrorBody,
        model::ErrorDetail, model::NicRequest, model::VmNic, model::PortForward,
        model::NetworkMode, model::CreateNetwork, model::Network, model::Lease,
    )),
    modifiers(&BearerToken),
    tags(
        (name = "vms", description = "The VM inventory"),
        (name = "lifecycle", description = "Running VMs"),
        (name = "console", description = "Serial console and its log"),
        (name = "disks", description = "Disk images"),
        (name = "networks", description = "Virtual switches: bridges, DHCP, NAT or isolation"),
        (name = "host", description = "Host capacity"),
    ),
)]
pub struct ApiDoc;

struct BearerToken;

impl Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Unix socket clients need no token; TCP clients need the bearer token.
        let security = vec![
            SecurityRequirement::default(),
            SecurityRequirement::new("bearer", Vec::<String>::new()),
        ];
        let unauthorized = ResponseBuilder::new()
            .description("TCP only: missing or wrong bearer token")
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                operation.security = Some(security.clone());
                operation
                    .responses
                    .responses
                    .insert("401".to_owned(), RefOr::T(unauthorized.clone()));
            }
        }
    }
}

/// The document as pretty JSON with a final newline (the form checked in).
pub fn openapi_json() -> &'static str {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| {
        let mut json = ApiDoc::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes");
        json.push('\n');
        json
    })
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "host",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi_json())
}
