//! Starting, stopping and watching VMM processes, and re-adopting them after a daemon
//! restart.

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsRawFd;

use lodge_contract::{
    ByteSize, ConsoleConfig, ConsoleLogConfig, ControlRequest, DiskConfig, ExitRecord as VmmExit,
    MachineConfig, NicBackend, NicConfig, RunState, Supervision, VmConfig,
};
use tokio::sync::watch;

use super::{create_dir, lock, Inventory, InventoryError, Result};
use crate::config::VmPaths;
use crate::db::{now_ms, ExitRecord, RuntimeRecord, VmRecord};
use crate::model::{DiskState, Vm, VmState};
use crate::supervisor::{self, PidWatch};
use crate::vmm;

/// How long the VMM gets to end after a `stop` request before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Bytes of console log kept with a crash report.
const CONSOLE_TAIL: u64 = 2048;
/// How long the daemon keeps asking a running VMM for its boot time.
const BOOT_TIME_WAIT: Duration = Duration::from_secs(600);

/// The VMM process of an active VM.
pub struct Process {
    id: i64,
    pid: u32,
    start_ticks: Option<u64>,
    paths: VmPaths,
    /// The daemon asked the VMM to end, so an exit without a report is a stop, not a crash.
    stop_requested: AtomicBool,
    /// Becomes true once the exit has been recorded in the database.
    exited: watch::Sender<bool>,
}

/// What [`Inventory::reconcile`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    pub adopted: usize,
    pub vanished: usize,
    pub interrupted_imports: usize,
}

impl Process {
    /// Waits until the exit is recorded; false after `timeout`.
    async fn wait_exit(&self, timeout: Duration) -> bool {
        let mut exited = self.exited.subscribe();
        let result = tokio::time::timeout(timeout, exited.wait_for(|done| *done)).await;
        result.is_ok()
    }
}

impl Inventory {
    /// Brings the runtime in line with the database after a (re)start: VMs whose VMM still
    /// runs are adopted and watched again, the others get their exit recorded; imports cut
    /// short by the restart are marked failed.
    pub fn reconcile(self: &Arc<Self>) -> Result<Reconciled> {
        let mut summary = Reconciled {
            interrupted_imports: self.fail_interrupted_imports()?,
            ..Reconciled::default()
        };
        let vms = self.db().vms()?;
        for vm in vms.into_iter().filter(|vm| vm.state.is_active()) {
            let paths = self.vm_paths(vm.id);
            let runtime = vm.runtime.clone();
            let ticks = runtime.as_ref().and_then(|r| r.start_ticks);
            let pid = runtime
                .as_ref()
                .and_then(|r| r.pid)
                .filter(|&pid| supervisor::is_alive(pid, ticks))
                .or_else(|| supervisor::find_by_config(&paths.vmm_config()));
            let watch = pid.and_then(|pid| PidWatch::open(pid).ok().map(|watch| (pid, watch)));
            let stopping = vm.state == VmState::Stopping;
            // Checked again after opening the pidfd: a pid reused in between is caught here.
            let Some((pid, watch)) = watch.filter(|(pid, _)| {
                let ticks = ticks.filter(|_| runtime.as_ref().and_then(|r| r.pid) == Some(*pid));
                supervisor::is_alive(*pid, ticks)
            }) else {
                let (state, exit) = exit_outcome(&paths, stopping, None, false);
                tracing::warn!(vm = vm.name, reason = exit.reason, "VMM process is gone");
                let _ = std::fs::remove_dir_all(&paths.run);
                self.db().set_exited(vm.id, state, &exit)?;
                summary.vanished += 1;
                continue;
            };
            let start_ticks = supervisor::start_ticks(pid);
            if runtime.as_ref().and_then(|r| r.pid) != Some(pid) {
                self.db().set_runtime(
                    vm.id,
                    &RuntimeRecord {
                        pid: Some(pid),
                        start_ticks,
                        started_at: runtime.as_ref().map_or_else(now_ms, |r| r.started_at),
                        engine: None,
                        boot_time_ms: None,
                    },
                )?;
            }
            let process = self.register(vm.id, pid, start_ticks, paths);
            process.stop_requested.store(stopping, Ordering::Relaxed);
            let inventory = self.clone();
            let watched = process.clone();
            tokio::spawn(async move {
                if let Err(e) = watch.exited().await {
                    tracing::error!(pid, "Cannot watch VMM process: {e}");
                }
                inventory.record_exit(&watched, None);
            });
            tokio::spawn(self.clone().watch_readiness(process.clone()));
            if stopping {
                let timeout = self.config.stop_timeout;
                tokio::spawn(self.clone().graceful_stop(process, timeout, false));
            }
            tracing::info!(vm = vm.name, pid, "Adopted running VMM");
            summary.adopted += 1;
        }
        Ok(summary)
    }

    /// Starts a stopped or crashed VM: 202-style, it returns once the VMM process runs
    /// (state `starting`); the state becomes `running` when the VMM answers.
    pub async fn start_vm(self: &Arc<Self>, name: &str) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        self.start_locked(&record).await?;
        self.vm(name)
    }

    /// Asks the guest to shut down, and forces the VMM to stop after `timeout`.
    pub async fn stop_vm(self: &Arc<Self>, name: &str, timeout: Option<Duration>) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        match record.state {
            VmState::Stopping => return self.vm(name),
            VmState::Stopped | VmState::Crashed => {
                return Err(wrong_state(&record, "it is not running"))
            }
            VmState::Starting | VmState::Running | VmState::Paused => {}
        }
        let Some(process) = self.process(id) else {
            return self.forget_lost_process(&record);
        };
        process.stop_requested.store(true, Ordering::Relaxed);
        self.db().transition(
            id,
            &[VmState::Starting, VmState::Running, VmState::Paused],
            VmState::Stopping,
        )?;
        let timeout = timeout.unwrap_or(self.config.stop_timeout);
        let paused = record.state == VmState::Paused;
        tokio::spawn(self.clone().graceful_stop(process, timeout, paused));
        self.vm(name)
    }

    /// Ends the VMM now and returns once the VM is `stopped`.
    pub async fn kill_vm(self: &Arc<Self>, name: &str) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        if !record.state.is_active() {
            return Err(wrong_state(&record, "it is not running"));
        }
        self.kill_locked(&record).await?;
        self.vm(name)
    }

    pub async fn pause_vm(self: &Arc<Self>, name: &str) -> Result<Vm> {
        self.pause_or_resume(name, ControlRequest::Pause {}).await
    }

    pub async fn resume_vm(self: &Arc<Self>, name: &str) -> Result<Vm> {
        self.pause_or_resume(name, ControlRequest::Resume {}).await
    }

    /// Stops the VM gracefully (as [`Inventory::stop_vm`]) and starts it again; a VM that
    /// is not active is just started.
    pub async fn restart_vm(self: &Arc<Self>, name: &str, timeout: Option<Duration>) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        match record.state {
            VmState::Stopped | VmState::Crashed => {
                self.start_locked(&record).await?;
                return self.vm(name);
            }
            VmState::Starting | VmState::Stopping => {
                return Err(wrong_state(&record, "wait until it is running or stopped"))
            }
            VmState::Running | VmState::Paused => {}
        }
        let Some(process) = self.process(id) else {
            return self.forget_lost_process(&record);
        };
        process.stop_requested.store(true, Ordering::Relaxed);
        self.db()
            .transition(id, &[VmState::Running, VmState::Paused], VmState::Stopping)?;
        let timeout = timeout.unwrap_or(self.config.stop_timeout);
        let paused = record.state == VmState::Paused;
        let inventory = self.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            inventory
                .clone()
                .graceful_stop(process, timeout, paused)
                .await;
            if let Err(e) = inventory.start_vm(&name).await {
                tracing::error!(vm = name, "Restart failed to start the VM again: {e}");
            }
        });
        self.vm(&record.name)
    }

    /// Deletes a VM that is not active (or, with `force`, kills it first), with its
    /// console log and files. Its disks stay.
    pub async fn delete_vm(self: &Arc<Self>, name: &str, force: bool) -> Result<()> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        if record.state.is_active() {
            if !force {
                return Err(wrong_state(&record, "stop it first or delete with force"));
            }
            self.kill_locked(&record).await?;
        }
        self.db().delete_vm(id)?;
        if !record.settings.nics.is_empty() {
            self.refresh_host_network();
        }
        let paths = self.vm_paths(id);
        let _ = std::fs::remove_dir_all(&paths.data);
        let _ = std::fs::remove_dir_all(&paths.run);
        lock_map_remove(self, id);
        Ok(())
    }

    /// The console socket of an active VM.
    pub fn console_socket(&self, name: &str) -> Result<std::path::PathBuf> {
        let record = self.record(name)?;
        if !matches!(record.state, VmState::Running | VmState::Paused) {
            return Err(wrong_state(
                &record,
                "the console is available while it runs",
            ));
        }
        Ok(self.vm_paths(record.id).console_socket())
    }

    /// The console log files of a VM (old rotation first) and its id.
    pub fn console_logs(&self, name: &str) -> Result<(i64, [std::path::PathBuf; 2])> {
        let record = self.record(name)?;
        let paths = self.vm_paths(record.id);
        Ok((record.id, [paths.console_log_old(), paths.console_log()]))
    }

    /// The VM with this id exists and is active.
    pub fn is_active(&self, id: i64) -> bool {
        self.db()
            .vm_by_id(id)
            .ok()
            .flatten()
            .is_some_and(|vm| vm.state.is_active())
    }

    async fn start_locked(self: &Arc<Self>, record: &VmRecord) -> Result<()> {
        if record.state.is_active() {
            return Err(wrong_state(record, "it is already started"));
        }
        if !record.settings.nics.is_empty() && !self.config.host_network {
            return Err(InventoryError::HostNetworkingOff(
                "VMs with NICs cannot start",
            ));
        }
        {
            let _start = self.start_lock.lock().await;
            // Under the start lock, like the capacity check: two VMs starting at once
            // cannot both pass it for the same writable disk.
            self.check_disks_usable(record)?;
            let allocated = self
                .db()
                .vms()?
                .iter()
                .filter(|vm| vm.state.is_active() && vm.id != record.id)
                .map(|vm| vm.settings.memory_mib)
                .sum();
            let settings = &record.settings;
            self.host
                .check_start(&record.name, settings.cpus, settings.memory_mib, allocated)?;
            let db = self.db();
            if !db.transition(
                record.id,
                &[VmState::Stopped, VmState::Crashed],
                VmState::Starting,
            )? {
                return Err(wrong_state(record, "it is already started"));
            }
            db.set_runtime(
                record.id,
                &RuntimeRecord {
                    pid: None,
                    start_ticks: None,
                    started_at: now_ms(),
                    engine: None,
                    boot_time_ms: None,
                },
            )?;
        }
        let spawned = match self.open_taps(record).await {
            Ok(taps) => self.spawn_vmm(record, &taps),
            Err(error) => Err(error),
        };
        if let Err(error) = spawned {
            let exit = ExitRecord {
                at: now_ms(),
                status: None,
                reason: format!("Cannot start the VMM: {}", error_chain(&error)),
                console_tail: None,
            };
            self.db().set_exited(record.id, VmState::Crashed, &exit)?;
            return Err(error);
        }
        Ok(())
    }

    /// Spawns the VMM with the VM's tap descriptors (`taps`, in NIC order), which it inherits.
    fn spawn_vmm(self: &Arc<Self>, record: &VmRecord, taps: &[std::os::fd::OwnedFd]) -> Result<()> {
        let paths = self.vm_paths(record.id);
        create_dir(&paths.data)?;
        create_dir(&paths.run)?;
        for stale in [
            paths.exit_file(),
            paths.api_socket(),
            paths.console_socket(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let config = self.vmm_config(record, &paths, taps);
        let config_path = paths.vmm_config();
        // Fails only for a path that is not UTF-8 (a state or run directory given so).
        let json = serde_json::to_vec_pretty(&config).map_err(|e| InventoryError::Io {
            path: config_path.display().to_string(),
            source: e.into(),
        })?;
        write_file(&config_path, &json)?;
        let inherited: Vec<i32> = taps.iter().map(|tap| tap.as_raw_fd()).collect();
        let mut child = supervisor::spawn(
            &self.config.vmm_binary,
            &config_path,
            &paths.vmm_log(),
            &inherited,
        )?;
        let pid = child.id().unwrap_or(0);
        let start_ticks = supervisor::start_ticks(pid);
        self.db().set_runtime(
            record.id,
            &RuntimeRecord {
                pid: Some(pid),
                start_ticks,
                started_at: now_ms(),
                engine: None,
                boot_time_ms: None,
            },
        )?;
        let _ = std::fs::write(paths.pidfile(), format!("{pid}\n"));
        let process = self.register(record.id, pid, start_ticks, paths);
        tracing::info!(vm = record.name, pid, "Started VMM");
        let inventory = self.clone();
        let watched = process.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            inventory.record_exit(&watched, status);
        });
        tokio::spawn(self.clone().watch_readiness(process));
        Ok(())
    }

    /// The VM's command line additions; a distribution guest also learns its name.
    fn append_for(&self, record: &VmRecord) -> Vec<String> {
        let mut append = record.settings.append.clone();
        if record.settings.image.is_some() {
            append.push(format!("lodge.hostname={}", record.name));
        }
        append
    }

    fn vmm_config(
        &self,
        record: &VmRecord,
        paths: &VmPaths,
        taps: &[std::os::fd::OwnedFd],
    ) -> VmConfig {
        let settings = &record.settings;
        let nics = settings
            .nics
            .iter()
            .zip(taps)
            .map(|(nic, tap)| NicConfig {
                backend: NicBackend::TapFd {
                    fd: tap.as_raw_fd(),
                },
                mac: nic.mac.parse().ok(),
                mtu: lodge_contract::net::DEFAULT_MTU,
            })
            .collect();
        let machine = MachineConfig {
            // Empty: `lodge run` boots the default guest image.
            kernel: settings.kernel.clone().unwrap_or_default().into(),
            initrd: settings.initrd.clone().map(Into::into),
            cmdline: settings.cmdline.clone(),
            append: self.append_for(record),
            cpus: settings.cpus,
            // Checked against the limits when the settings were saved.
            memory: ByteSize::from_mib(settings.memory_mib).unwrap_or_default(),
            disks: settings
                .disks
                .iter()
                .zip(&record.disk_paths)
                .map(|(attachment, path)| DiskConfig {
                    path: path.into(),
                    read_only: attachment.read_only,
                })
                .collect(),
            root_disk: settings.image.is_some(),
            rng: settings.rng,
            nics,
            engine: settings.engine,
            console: ConsoleConfig::None,
        };
        let supervision = Supervision {
            api_socket: Some(paths.api_socket()),
            console_socket: Some(paths.console_socket()),
            console_log: Some(ConsoleLogConfig {
                path: paths.console_log(),
                limit: self.config.console_log_limit,
            }),
            exit_file: Some(paths.exit_file()),
        };
        VmConfig {
            machine,
            supervision,
        }
    }

    /// Refuses disks still importing, and a disk written by another active VM (or written
    /// by this one while another active VM uses it).
    fn check_disks_usable(&self, record: &VmRecord) -> Result<()> {
        let db = self.db();
        let others: Vec<VmRecord> = db
            .vms()?
            .into_iter()
            .filter(|vm| vm.state.is_active() && vm.id != record.id)
            .collect();
        for attachment in &record.settings.disks {
            let disk = db
                .disk(&attachment.disk)?
                .ok_or_else(|| InventoryError::AttachedDiskNotFound(attachment.disk.clone()))?;
            if disk.state != DiskState::Ready {
                return Err(InventoryError::DiskNotReady {
                    disk: disk.name,
                    state: disk.state.as_str(),
                });
            }
            let users: Vec<&str> = others
                .iter()
                .filter(|vm| {
                    vm.settings.disks.iter().any(|other| {
                        other.disk == attachment.disk && !(other.read_only && attachment.read_only)
                    })
                })
                .map(|vm| vm.name.as_str())
                .collect();
            if !users.is_empty() {
                return Err(InventoryError::DiskInUse {
                    disk: disk.name,
                    vms: format!("active VM(s) {} with write access", users.join(", ")),
                });
            }
        }
        Ok(())
    }

    async fn pause_or_resume(self: &Arc<Self>, name: &str, request: ControlRequest) -> Result<Vm> {
        let id = self.record(name)?.id;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let record = self.record(name)?;
        let (from, to, hint) = match request {
            ControlRequest::Pause {} => (
                VmState::Running,
                VmState::Paused,
                "only a running VM can be paused",
            ),
            _ => (
                VmState::Paused,
                VmState::Running,
                "only a paused VM can be resumed",
            ),
        };
        if record.state != from {
            return Err(wrong_state(&record, hint));
        }
        let socket = self.vm_paths(id).api_socket();
        if let Err(source) = vmm::request(&socket, request).await {
            if request == (ControlRequest::Pause {}) {
                // A pause the VMM could not complete still holds the vCPUs that did park;
                // the inventory says running, so the VM must run.
                let _ = vmm::request(&socket, ControlRequest::Resume {}).await;
            }
            return Err(InventoryError::Vmm {
                name: record.name.clone(),
                source,
            });
        }
        self.db().transition(id, &[from], to)?;
        self.vm(name)
    }

    async fn kill_locked(self: &Arc<Self>, record: &VmRecord) -> Result<()> {
        let Some(process) = self.process(record.id) else {
            self.forget_lost_process(record)?;
            return Ok(());
        };
        process.stop_requested.store(true, Ordering::Relaxed);
        self.db().transition(
            record.id,
            &[VmState::Starting, VmState::Running, VmState::Paused],
            VmState::Stopping,
        )?;
        self.force_stop(&process).await;
        Ok(())
    }

    /// An active VM without a process can only come from a failed adoption; record it as
    /// stopped so it can be started again.
    fn forget_lost_process(&self, record: &VmRecord) -> Result<Vm> {
        let exit = ExitRecord {
            at: now_ms(),
            status: None,
            reason: "The daemon lost track of the VMM process".to_owned(),
            console_tail: None,
        };
        self.db().set_exited(record.id, VmState::Stopped, &exit)?;
        self.vm(&record.name)
    }

    /// Power button, then a forced stop after `timeout`.
    async fn graceful_stop(
        self: Arc<Self>,
        process: Arc<Process>,
        timeout: Duration,
        paused: bool,
    ) {
        let socket = process.paths.api_socket();
        if paused {
            // A paused guest cannot answer the power button.
            let _ = vmm::request(&socket, ControlRequest::Resume {}).await;
        }
        match vmm::request(&socket, ControlRequest::Shutdown {}).await {
            Ok(_) => {
                if process.wait_exit(timeout).await {
                    return;
                }
                tracing::info!(
                    pid = process.pid,
                    "Guest did not shut down in time; stopping it"
                );
            }
            Err(e) => tracing::info!(pid = process.pid, "Cannot ask the guest to shut down: {e}"),
        }
        self.force_stop(&process).await;
    }

    /// `stop` request, then SIGKILL; returns once the exit is recorded.
    async fn force_stop(&self, process: &Process) {
        process.stop_requested.store(true, Ordering::Relaxed);
        let _ = vmm::request(&process.paths.api_socket(), ControlRequest::Stop {}).await;
        if process.wait_exit(STOP_GRACE).await {
            return;
        }
        if supervisor::is_alive(process.pid, process.start_ticks) {
            tracing::warn!(pid = process.pid, "VMM did not stop; killing it");
            supervisor::kill(process.pid);
        }
        if !process.wait_exit(STOP_GRACE * 2).await {
            tracing::error!(pid = process.pid, "VMM process did not end after SIGKILL");
        }
    }

    /// Polls the control socket until the VMM answers (`starting` → `running`), then
    /// until it reports the guest's boot time.
    async fn watch_readiness(self: Arc<Self>, process: Arc<Process>) {
        let mut exited = process.exited.subscribe();
        let socket = process.paths.api_socket();
        let mut interval = Duration::from_millis(5);
        let deadline = tokio::time::Instant::now() + BOOT_TIME_WAIT;
        loop {
            if *exited.borrow() {
                return;
            }
            if let Ok(status) = vmm::request(&socket, ControlRequest::Status {}).await {
                let state = match status.state {
                    RunState::Paused => VmState::Paused,
                    RunState::Running => VmState::Running,
                };
                {
                    let db = self.db();
                    let _ = db.transition(process.id, &[VmState::Starting], state);
                    let _ =
                        db.set_runtime_info(process.id, Some(status.engine), status.boot_time_ms);
                }
                if status.boot_time_ms.is_some() || tokio::time::Instant::now() > deadline {
                    return;
                }
                interval = Duration::from_millis(500);
            } else {
                interval = (interval * 2).min(Duration::from_millis(250));
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = exited.wait_for(|done| *done) => return,
            }
        }
    }

    fn register(
        &self,
        id: i64,
        pid: u32,
        start_ticks: Option<u64>,
        paths: VmPaths,
    ) -> Arc<Process> {
        let process = Arc::new(Process {
            id,
            pid,
            start_ticks,
            paths,
            stop_requested: AtomicBool::new(false),
            exited: watch::Sender::new(false),
        });
        lock(&self.processes).insert(id, process.clone());
        process
    }

    fn process(&self, id: i64) -> Option<Arc<Process>> {
        lock(&self.processes).get(&id).cloned()
    }

    /// Records how a VMM ended; `status` is known when it was the daemon's child.
    fn record_exit(&self, process: &Arc<Process>, status: Option<ExitStatus>) {
        let stop_requested = process.stop_requested.load(Ordering::Relaxed);
        let (state, exit) = exit_outcome(&process.paths, stop_requested, status, true);
        {
            let mut processes = lock(&self.processes);
            if processes
                .get(&process.id)
                .is_some_and(|p| Arc::ptr_eq(p, process))
            {
                processes.remove(&process.id);
            }
        }
        tracing::info!(pid = process.pid, state = %state, reason = exit.reason, "VMM ended");
        // Before the state change: once the VM is inactive a new start may create the run
        // directory again, and its VMM's sockets must not be removed with the old ones.
        let _ = std::fs::remove_dir_all(&process.paths.run);
        if let Err(e) = self.db().set_exited(process.id, state, &exit) {
            tracing::error!("Cannot record the end of VMM {}: {e}", process.pid);
        }
        process.exited.send_replace(true);
    }
}

fn lock_map_remove(inventory: &Inventory, id: i64) {
    lock(&inventory.vm_locks).remove(&id);
}

/// Decides `stopped` or `crashed` from the exit report, the wait status and whether the
/// daemon asked for the stop.
fn exit_outcome(
    paths: &VmPaths,
    stop_requested: bool,
    status: Option<ExitStatus>,
    was_watched: bool,
) -> (VmState, ExitRecord) {
    let report = VmmExit::read(&paths.exit_file());
    let (state, exit_status, reason) = match (&report, status) {
        (Some(report), _) => {
            let state = if report.status == 0 {
                VmState::Stopped
            } else {
                VmState::Crashed
            };
            (state, Some(report.status), report.reason.clone())
        }
        (None, _) if stop_requested => (
            VmState::Stopped,
            status.and_then(|s| s.code()),
            "Stopped by the daemon".to_owned(),
        ),
        (None, Some(status)) => {
            let how = match (status.code(), status.signal()) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(signal)) => format!("was killed by signal {signal}"),
                _ => "ended".to_owned(),
            };
            let last_line = last_line(&paths.vmm_log());
            let reason = match last_line {
                Some(line) => format!("The VMM {how} without an exit report: {line}"),
                None => format!("The VMM {how} without an exit report"),
            };
            (VmState::Crashed, status.code(), reason)
        }
        (None, None) => {
            let reason = if was_watched {
                "The VMM process vanished without an exit report"
            } else {
                "The VMM process was gone when the daemon started"
            };
            (VmState::Crashed, None, reason.to_owned())
        }
    };
    let console_tail = (state == VmState::Crashed).then(|| console_tail(paths));
    (
        state,
        ExitRecord {
            at: now_ms(),
            status: exit_status,
            reason,
            console_tail,
        },
    )
}

/// The last [`CONSOLE_TAIL`] bytes of console output, across the rotation.
fn console_tail(paths: &VmPaths) -> String {
    let mut tail = tail_bytes(&paths.console_log(), CONSOLE_TAIL);
    if (tail.len() as u64) < CONSOLE_TAIL {
        let mut older = tail_bytes(&paths.console_log_old(), CONSOLE_TAIL - tail.len() as u64);
        older.extend_from_slice(&tail);
        tail = older;
    }
    String::from_utf8_lossy(&tail).into_owned()
}

fn tail_bytes(path: &Path, count: u64) -> Vec<u8> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let length = file.metadata().map_or(0, |m| m.len());
    let mut bytes = Vec::new();
    if file
        .seek(SeekFrom::Start(length.saturating_sub(count)))
        .is_ok()
    {
        let _ = file.take(count).read_to_end(&mut bytes);
    }
    bytes
}

fn last_line(path: &Path) -> Option<String> {
    let tail = tail_bytes(path, 1024);
    String::from_utf8_lossy(&tail)
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .map(|line| line.trim().to_owned())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| InventoryError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn wrong_state(record: &VmRecord, hint: &'static str) -> InventoryError {
    InventoryError::WrongState {
        name: record.name.clone(),
        state: record.state,
        hint,
    }
}

/// An error and its causes on one line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
