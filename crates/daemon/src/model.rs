//! The API's resources and requests: what clients send and receive as JSON.
//!
//! Every request type denies unknown fields, so a misspelled setting is an error instead of
//! being silently ignored.

pub use lodge_contract::{EngineChoice, EngineKind};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, no process.
    Stopped,
    /// The VMM process is running but has not answered its control socket yet (the first
    /// start with the default guest image builds it, which takes minutes).
    Starting,
    Running,
    Paused,
    /// A graceful stop is in progress; the VMM is forced to stop after the timeout.
    Stopping,
    /// The VMM ended with a failure or vanished; `last_exit` says why.
    Crashed,
}

impl VmState {
    pub const ALL: [VmState; 6] = [
        VmState::Stopped,
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Crashed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }

    /// A VMM process exists (or is being started) for the VM.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A managed disk attached to a VM, in the order the guest sees them (`/dev/vda` first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskAttachment {
    /// Name of a disk from `/v1/disks`.
    pub disk: String,
    #[serde(default)]
    pub read_only: bool,
}

/// A request to define a VM.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    /// DNS-label-like: 1 to 63 of `a-z`, `0-9` and `-`, not starting or ending with `-`.
    pub name: String,
    #[serde(default = "default_cpus")]
    #[schema(default = 1, minimum = 1)]
    pub cpus: u32,
    #[serde(default = "default_memory_mib")]
    #[schema(default = 256, minimum = 64)]
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskAttachment>,
    /// Host path of a vmlinux or bzImage; absent: the default guest image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Replaces the default kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Appended to the kernel command line.
    #[serde(default)]
    pub append: Vec<String>,
    #[serde(default)]
    pub engine: EngineChoice,
    /// Adds a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Boot a distribution lodge builds (`debian`): the daemon creates the disk `NAME-root`
    /// from the cached image (state `importing` until it is ready), attaches it first as the
    /// root file system, and the guest takes its hostname from the VM's name at first boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Network adapters, `eth0` first. Absent: one NIC on the network `default` when the
    /// daemon manages host networking; `[]`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicRequest>>,
}

/// A NIC asked for at create: the network, and a MAC if not the daemon's choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicRequest {
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A VM's NIC: its network, its MAC and the address reserved for it there (what the
/// network's DHCP server gives it), both stable for the VM's life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmNic {
    pub network: String,
    pub mac: String,
    pub address: String,
}

/// A TCP port forward from the host to a VM's first NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
}

/// How a network reaches beyond its bridge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Guests reach outside through the host (masquerade); port forwards reach them.
    #[default]
    Nat,
    /// Guests reach only each other.
    Isolated,
}

impl NetworkMode {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Nat => "nat",
            NetworkMode::Isolated => "isolated",
        }
    }

    pub fn parse(text: &str) -> Option<NetworkMode> {
        match text {
            "nat" => Some(NetworkMode::Nat),
            "isolated" => Some(NetworkMode::Isolated),
            _ => None,
        }
    }
}

/// Body of `POST /v1/networks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateNetwork {
    pub name: String,
    /// An IPv4 subnet from /16 to /29, e.g. 10.10.0.0/24; the host takes the first address.
    pub subnet: String,
    #[serde(default)]
    pub mode: NetworkMode,
}

/// A virtual switch: a bridge on the host, its DHCP server and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: String,
    pub subnet: String,
    pub mode: NetworkMode,
    /// The host's address on it, the guests' gateway.
    pub gateway: String,
    /// The bridge's interface name on the host.
    pub bridge: String,
    pub created_at: String,
    /// Every NIC on it, with its reserved address.
    pub leases: Vec<Lease>,
}

/// A NIC's reserved address on a network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Lease {
    pub vm: String,
    pub mac: String,
    pub address: String,
}

/// The name of the network VMs join when they ask for none.
pub const DEFAULT_NETWORK: &str = "default";
/// Its subnet, when the host has no route that clashes with it.
pub const DEFAULT_SUBNET: &str = "10.44.0.0/24";

/// The distributions `CreateVm.image` accepts.
pub const IMAGES: &[&str] = &["debian"];

pub fn default_cpus() -> u32 {
    1
}

pub fn default_memory_mib() -> u64 {
    256
}

/// New settings for a stopped VM; absent fields keep their value. For `kernel`, `initrd`
/// and `cmdline` an empty string returns to the default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateVm {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskAttachment>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub append: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rng: Option<bool>,
    /// Replaces the NIC list. A NIC that stays on the same network at the same position (and
    /// asks for no other MAC) keeps its MAC and address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nics: Option<Vec<NicRequest>>,
}

/// The settings of a VM that its owner chooses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmSettings {
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<DiskAttachment>,
    /// Absent: the default guest image.
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub append: Vec<String>,
    pub engine: EngineChoice,
    pub rng: bool,
    /// The distribution the VM was created from; its first disk is then the root file system.
    pub image: Option<String>,
    /// Network adapters, `eth0` first.
    pub nics: Vec<VmNic>,
    pub port_forwards: Vec<PortForward>,
}

/// A VM as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub name: String,
    pub state: VmState,
    #[serde(flatten)]
    pub settings: VmSettings,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
    /// The VMM process, while the VM is active.
    pub runtime: Option<VmRuntime>,
    /// How the VMM process last ended.
    pub last_exit: Option<VmExit>,
}

/// The VMM process of an active VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmRuntime {
    pub pid: u32,
    pub started_at: String,
    /// The engine the VMM chose, once it has answered.
    pub engine: Option<EngineKind>,
    /// Time from process start to the guest's userspace, once reached.
    pub boot_time_ms: Option<u64>,
}

/// How a VMM process ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmExit {
    pub at: String,
    /// The process exit status, when known.
    pub status: Option<i32>,
    pub reason: String,
    /// The end of the console log when the VM crashed.
    pub console_tail: Option<String>,
}

/// Query of `POST /v1/vms/{name}/stop` and `/restart`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StopQuery {
    /// Seconds to wait for the guest to shut down before forcing the VMM to stop
    /// (default: the daemon's `--stop-timeout`).
    pub timeout: Option<u64>,
}

/// Query of `DELETE /v1/vms/{name}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Kill the VM first if it is active.
    #[serde(default)]
    pub force: bool,
}

/// Query of `GET /v1/vms/{name}/logs`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Keep the response open and stream new output until the VM stops.
    #[serde(default)]
    pub follow: bool,
    /// Only the last N lines.
    pub lines: Option<usize>,
}

/// Where a disk image is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum DiskState {
    Ready,
    /// Being copied in; see `import_progress`.
    Importing,
    /// The import failed; see `error`. Delete the disk to retry.
    Failed,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::Ready => "ready",
            DiskState::Importing => "importing",
            DiskState::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [DiskState::Ready, DiskState::Importing, DiskState::Failed]
            .into_iter()
            .find(|state| state.as_str() == text)
    }
}

/// A raw disk image in the daemon's storage directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    pub name: String,
    pub state: DiskState,
    /// Host path of the image.
    pub path: String,
    /// Size the guest sees.
    pub size_bytes: u64,
    /// Host storage the sparse image uses.
    pub allocated_bytes: u64,
    pub created_at: String,
    /// VMs this disk is attached to.
    pub attached_to: Vec<String>,
    pub import_progress: Option<ImportProgress>,
    pub error: Option<String>,
}

/// Progress of an import.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImportProgress {
    pub copied_bytes: u64,
    pub total_bytes: u64,
}

/// A request for a disk: either a blank sparse image of `size_bytes`, or an import (copy)
/// of the raw image at the host path `source`. Exactly one of the two is given.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDisk {
    pub name: String,
    /// Size of a blank image: a positive multiple of 512.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Absolute host path of a raw image to copy in (holes stay holes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The host's capacity and what is allocated of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostInfo {
    pub version: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub memory_overcommit_ratio: f64,
    /// VMs may have more vCPUs than the host has CPUs.
    pub cpu_overcommit: bool,
    /// `memory_mib × memory_overcommit_ratio`: what active VMs may use together.
    pub memory_capacity_mib: u64,
    /// Memory of the active VMs.
    pub memory_allocated_mib: u64,
    /// vCPUs of the active VMs.
    pub vcpus_allocated: u32,
    pub vms_defined: u32,
    pub vms_active: u32,
    pub disks: u32,
    /// `/dev/kvm` exists.
    pub kvm_present: bool,
    pub state_dir: String,
}

/// Every error response: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A stable, machine-readable `code` (see docs/api.md) and a human message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

/// Checks a VM or disk name: a DNS label (1 to 63 of `a-z`, `0-9`, `-`; no `-` at the ends).
pub fn validate_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "Invalid name '{}': use 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'",
            name.escape_debug()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for good in ["a", "web-1", "0", &"x".repeat(63)] {
            assert!(validate_name(good).is_ok(), "{good} refused");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "a b",
            &"x".repeat(64),
            "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn states_round_trip() {
        for state in VmState::ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(json, format!("\"{state}\""));
        }
        assert!(VmState::Running.is_active());
        assert!(!VmState::Crashed.is_active());
    }

    #[test]
    fn requests_deny_unknown_fields_and_fill_defaults() {
        let create: CreateVm = serde_json::from_str(r#"{"name": "a"}"#).unwrap();
        assert_eq!((create.cpus, create.memory_mib), (1, 256));
        assert_eq!(create.engine, EngineChoice::Auto);
        assert!(serde_json::from_str::<CreateVm>(r#"{"name": "a", "cpu": 2}"#).is_err());
        assert!(serde_json::from_str::<UpdateVm>(r#"{"memory": 2}"#).is_err());
        let attach = r#"{"name": "a", "disks": [{"disk": "d", "ro": true}]}"#;
        assert!(serde_json::from_str::<CreateVm>(attach).is_err());
    }
}
