//! The daemon's model of the host: VMs and disks in the database, the VMM processes of the
//! active VMs, and the operations the API offers on them.
//!
//! Consistency rules: every state change of a VM is a compare-and-set in the database; the
//! lifecycle operations on one VM are serialized by a per-VM lock; the capacity and disk
//! checks of a start and the state change they allow happen under one lock, so two starts
//! cannot both take the last free memory or the same writable disk.

mod disks;
mod lifecycle;
pub mod networks;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use lodge_contract::{limits, ByteSize};

use crate::capacity::{CapacityError, HostCapacity};
use crate::config::{DaemonConfig, Paths, VmPaths};
use crate::db::{rfc3339, Db, DbError, VmRecord};
use crate::model::{
    CreateVm, DiskAttachment, HostInfo, UpdateVm, Vm, VmExit, VmRuntime, VmSettings, VmState,
};
use crate::storage::StorageError;
use crate::vmm::VmmError;

pub(crate) use lifecycle::error_chain;
pub use lifecycle::{Process, Reconciled};

/// Why an operation was refused or failed. [`InventoryError::status_and_code`] maps each to
/// the API's status and stable error code.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{0}")]
    Invalid(String),
    #[error("VM '{0}' does not exist")]
    VmNotFound(String),
    #[error("Disk '{0}' does not exist")]
    DiskNotFound(String),
    #[error("Disk '{0}' does not exist")]
    AttachedDiskNotFound(String),
    #[error("A {kind} named '{name}' already exists")]
    NameTaken { kind: &'static str, name: String },
    #[error("VM '{name}' is {state}; {hint}")]
    WrongState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    #[error("Disk '{disk}' is attached to {vms}")]
    DiskInUse { disk: String, vms: String },
    #[error("Disk '{disk}' is {state}")]
    DiskNotReady { disk: String, state: &'static str },
    #[error(transparent)]
    Capacity(#[from] CapacityError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("The VMM of '{name}' failed")]
    Vmm {
        name: String,
        #[source]
        source: VmmError,
    },
    #[error(transparent)]
    Spawn(#[from] crate::supervisor::SupervisorError),
    #[error("Cannot prepare {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Network '{0}' does not exist")]
    NetworkNotFound(String),
    #[error("Network '{network}' is used by {vms}; delete or change them first")]
    NetworkInUse { network: String, vms: String },
    #[error("Host networking is off (lodge daemon --no-host-network): {0}")]
    HostNetworkingOff(&'static str),
    #[error("{0}")]
    AddressConflict(String),
    #[error("Setting up the host network failed")]
    HostNetwork(#[source] crate::inventory::networks::HostNetworkError),
    #[error(transparent)]
    Db(DbError),
}

impl From<DbError> for InventoryError {
    fn from(error: DbError) -> Self {
        match error {
            DbError::DiskNotFound(name) => InventoryError::AttachedDiskNotFound(name),
            DbError::DuplicateDisk(name) => {
                InventoryError::Invalid(format!("Disk '{name}' is attached twice"))
            }
            DbError::NetworkNotFound(name) => {
                InventoryError::Invalid(format!("Network '{name}' does not exist"))
            }
            error @ (DbError::PoolExhausted(_) | DbError::MacTaken(_) | DbError::PortTaken(_)) => {
                InventoryError::AddressConflict(error.to_string())
            }
            other => InventoryError::Db(other),
        }
    }
}

impl InventoryError {
    /// The HTTP status and the stable error code of the API.
    pub fn status_and_code(&self) -> (u16, &'static str) {
        match self {
            InventoryError::Invalid(_) => (400, "invalid_request"),
            InventoryError::AttachedDiskNotFound(_) => (400, "unknown_disk"),
            InventoryError::VmNotFound(_) => (404, "vm_not_found"),
            InventoryError::DiskNotFound(_) => (404, "disk_not_found"),
            InventoryError::NameTaken { .. } => (409, "name_taken"),
            InventoryError::WrongState { .. } => (409, "invalid_state"),
            InventoryError::DiskInUse { .. } => (409, "disk_in_use"),
            InventoryError::DiskNotReady { .. } => (409, "disk_not_ready"),
            InventoryError::NetworkNotFound(_) => (404, "network_not_found"),
            InventoryError::NetworkInUse { .. } => (409, "network_in_use"),
            InventoryError::HostNetworkingOff(_) => (409, "host_networking_off"),
            InventoryError::AddressConflict(_) => (409, "address_conflict"),
            InventoryError::HostNetwork(_) => (500, "host_network_error"),
            InventoryError::Capacity(_) => (422, "insufficient_capacity"),
            InventoryError::Storage(
                StorageError::InvalidSize(_)
                | StorageError::Source { .. }
                | StorageError::NotAFile(_)
                | StorageError::Qcow2(_),
            ) => (400, "invalid_request"),
            InventoryError::Storage(_) => (500, "storage_error"),
            InventoryError::Vmm {
                source: VmmError::Refused(_),
                ..
            } => (409, "vmm_refused"),
            InventoryError::Vmm { .. } | InventoryError::Spawn(_) => (500, "vmm_error"),
            InventoryError::Io { .. } | InventoryError::Db(_) => (500, "internal"),
        }
    }
}

type Result<T, E = InventoryError> = std::result::Result<T, E>;

/// VMs, disks and VMM processes.
pub struct Inventory {
    config: DaemonConfig,
    paths: Paths,
    host: HostCapacity,
    db: Mutex<Db>,
    /// Held from a start's capacity check to its state change.
    start_lock: tokio::sync::Mutex<()>,
    /// Serializes lifecycle operations per VM id.
    vm_locks: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// The VMM processes of active VMs, by VM id.
    processes: Mutex<HashMap<i64, Arc<Process>>>,
    /// Bytes copied by running imports, by disk id.
    imports: Mutex<HashMap<i64, Arc<AtomicU64>>>,
    /// Bridges, DHCP servers and rules, once started (never with host networking off).
    host_network: std::sync::OnceLock<networks::HostNetwork>,
}

impl Inventory {
    /// Opens the database (creating directories as needed). Call [`Inventory::reconcile`]
    /// next, inside a Tokio runtime.
    pub fn open(config: DaemonConfig) -> Result<Arc<Self>> {
        let paths = config.paths();
        for dir in [
            paths.state_dir.clone(),
            paths.images(),
            paths.state_dir.join("vms"),
            paths.run_dir.join("vms"),
        ] {
            create_dir(&dir)?;
        }
        let db = Db::open(&paths.database())?;
        let host = HostCapacity::detect(config.memory_overcommit, config.cpu_overcommit);
        Ok(Arc::new(Self {
            config,
            paths,
            host,
            db: Mutex::new(db),
            start_lock: tokio::sync::Mutex::new(()),
            vm_locks: Mutex::new(HashMap::new()),
            processes: Mutex::new(HashMap::new()),
            imports: Mutex::new(HashMap::new()),
            host_network: std::sync::OnceLock::new(),
        }))
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    pub fn host(&self) -> &HostCapacity {
        &self.host
    }

    /// The host and what the VMs use of it.
    pub fn host_info(&self) -> Result<HostInfo> {
        let (vms, disks) = {
            let db = self.db();
            (db.vms()?, db.disks()?)
        };
        let active: Vec<&VmRecord> = vms.iter().filter(|vm| vm.state.is_active()).collect();
        Ok(HostInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cpus: self.host.cpus,
            memory_mib: self.host.memory_mib,
            memory_overcommit_ratio: self.host.memory_overcommit,
            cpu_overcommit: self.host.cpu_overcommit,
            memory_capacity_mib: self.host.memory_capacity_mib(),
            memory_allocated_mib: active.iter().map(|vm| vm.settings.memory_mib).sum(),
            vcpus_allocated: active.iter().map(|vm| vm.settings.cpus).sum(),
            vms_defined: vms.len() as u32,
            vms_active: active.len() as u32,
            disks: disks.len() as u32,
            kvm_present: Path::new("/dev/kvm").exists(),
            state_dir: self.paths.state_dir.display().to_string(),
        })
    }

    pub fn list_vms(&self) -> Result<Vec<Vm>> {
        Ok(self.db().vms()?.iter().map(to_vm).collect())
    }

    pub fn vm(&self, name: &str) -> Result<Vm> {
        self.record(name).map(|record| to_vm(&record))
    }

    /// Defines a VM (state `stopped`). With an image, also creates its root disk, which is
    /// `importing` until the image is copied in.
    pub fn create_vm(self: &Arc<Self>, request: CreateVm) -> Result<Vm> {
        crate::model::validate_name(&request.name).map_err(InventoryError::Invalid)?;
        let mut settings = VmSettings {
            cpus: request.cpus,
            memory_mib: request.memory_mib,
            disks: request.disks,
            kernel: request.kernel,
            initrd: request.initrd,
            cmdline: request.cmdline,
            append: request.append,
            engine: request.engine,
            rng: request.rng,
            image: request.image,
            nics: Vec::new(),
            port_forwards: Vec::new(),
        };
        let nics = self.nic_requests(request.nics)?;
        let root_disk = match &settings.image {
            Some(image) => {
                if !crate::model::IMAGES.contains(&image.as_str()) {
                    return Err(InventoryError::Invalid(format!(
                        "Unknown image '{image}' (lodge builds: {})",
                        crate::model::IMAGES.join(", ")
                    )));
                }
                let disk = format!("{}-root", request.name);
                settings.disks.insert(
                    0,
                    DiskAttachment {
                        disk: disk.clone(),
                        read_only: false,
                    },
                );
                Some(disk)
            }
            None => None,
        };
        validate_settings(&settings)?;
        self.host
            .check_vm(&request.name, settings.cpus, settings.memory_mib)?;
        if let (Some(disk), Some(image)) = (&root_disk, &settings.image) {
            // Refused before the disk exists, so a taken name leaves nothing behind.
            if self.db().vm(&request.name)?.is_some() {
                return Err(InventoryError::NameTaken {
                    kind: "VM",
                    name: request.name,
                });
            }
            self.build_image_disk(disk, image)?;
        }
        let record = self
            .db()
            .insert_vm(&request.name, &settings, &nics)
            .map_err(|e| match e {
                DbError::NameTaken(name) => InventoryError::NameTaken { kind: "VM", name },
                other => other.into(),
            })?;
        if !nics.is_empty() {
            self.refresh_host_network();
        }
        Ok(to_vm(&record))
    }

    /// Changes settings of a VM that is not active.
    pub async fn update_vm(&self, name: &str, update: UpdateVm) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        if record.state.is_active() {
            return Err(InventoryError::WrongState {
                name: record.name,
                state: record.state,
                hint: "stop it before changing its settings",
            });
        }
        let mut settings = record.settings.clone();
        let or_default = |value: String| (!value.is_empty()).then_some(value);
        if let Some(cpus) = update.cpus {
            settings.cpus = cpus;
        }
        if let Some(memory_mib) = update.memory_mib {
            settings.memory_mib = memory_mib;
        }
        if let Some(disks) = update.disks {
            settings.disks = disks;
        }
        if let Some(kernel) = update.kernel {
            settings.kernel = or_default(kernel);
        }
        if let Some(initrd) = update.initrd {
            settings.initrd = or_default(initrd);
        }
        if let Some(cmdline) = update.cmdline {
            settings.cmdline = or_default(cmdline);
        }
        if let Some(append) = update.append {
            settings.append = append;
        }
        if let Some(engine) = update.engine {
            settings.engine = engine;
        }
        if let Some(rng) = update.rng {
            settings.rng = rng;
        }
        validate_settings(&settings)?;
        self.host
            .check_vm(&record.name, settings.cpus, settings.memory_mib)?;
        let nics = match update.nics {
            Some(nics) => Some(self.nic_requests(Some(nics))?),
            None => None,
        };
        self.db()
            .update_vm_settings(id, &settings, nics.as_deref())?;
        if nics.is_some() {
            // Forwards follow the first NIC; one that moved networks keeps them only if valid.
            self.refresh_host_network();
        }
        self.vm(name)
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        // A panic while holding the lock leaves the connection usable: every change is a
        // single statement or a transaction that rolled back.
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, name: &str) -> Result<VmRecord> {
        self.db()
            .vm(name)?
            .ok_or_else(|| InventoryError::VmNotFound(name.to_owned()))
    }

    fn vm_lock(&self, id: i64) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.vm_locks).entry(id).or_default().clone()
    }

    fn vm_paths(&self, id: i64) -> VmPaths {
        self.paths.vm(id)
    }
}

/// Locks a std mutex, ignoring poisoning: the maps it guards stay consistent between
/// statements.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| InventoryError::Io {
        path: dir.display().to_string(),
        source,
    })
}

fn validate_settings(settings: &VmSettings) -> Result<()> {
    let invalid = |message: String| Err(InventoryError::Invalid(message));
    let limit = |error: limits::LimitError| InventoryError::Invalid(error.to_string());
    limits::check_vcpus(settings.cpus, settings.engine.kind()).map_err(limit)?;
    let memory = ByteSize::from_mib(settings.memory_mib).unwrap_or(ByteSize::from_bytes(u64::MAX));
    limits::check_memory(memory).map_err(limit)?;
    for (what, path) in [("Kernel", &settings.kernel), ("Initrd", &settings.initrd)] {
        if let Some(path) = path {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return invalid(format!("{what} path {} is not absolute", path.display()));
            }
            if !path.is_file() {
                return invalid(format!("{what} file not found: {}", path.display()));
            }
        }
    }
    limits::check_cmdline(settings.cmdline.as_deref(), &settings.append).map_err(limit)?;
    for attachment in &settings.disks {
        crate::model::validate_name(&attachment.disk).map_err(InventoryError::Invalid)?;
    }
    Ok(())
}

fn to_vm(record: &VmRecord) -> Vm {
    Vm {
        name: record.name.clone(),
        state: record.state,
        settings: record.settings.clone(),
        created_at: rfc3339(record.created_at),
        updated_at: rfc3339(record.updated_at),
        runtime: record
            .runtime
            .as_ref()
            .filter(|_| record.state.is_active())
            .and_then(|runtime| {
                Some(VmRuntime {
                    pid: runtime.pid?,
                    started_at: rfc3339(runtime.started_at),
                    engine: runtime.engine,
                    boot_time_ms: runtime.boot_time_ms,
                })
            }),
        last_exit: record.last_exit.as_ref().map(|exit| VmExit {
            at: rfc3339(exit.at),
            status: exit.status,
            reason: exit.reason.clone(),
            console_tail: exit.console_tail.clone(),
        }),
    }
}
