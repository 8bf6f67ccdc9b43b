//! One VM from configuration to exit: build memory, devices and vCPUs, boot, run the event
//! loop until the guest or the host ends it.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use lodge_bus::IoBus;
use lodge_contract::control::ControlTarget;
use lodge_contract::{ConsoleConfig, EngineKind, MachineConfig, RunState, VmmStatus};
use lodge_devices::serial::SerialConsole;
use lodge_devices::virtio::{BlockConfig, VirtioBlock, VirtioRng};
use lodge_devices::{BootTimeHandle, PowerButtonHandle};
use lodge_engine::{Engine, EngineError, InterruptModel, Vcpu, VcpuStopper, Vm, VmSpec};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use vm_memory::GuestMemoryMmap;

use crate::boot::{self, BootError, LoadedKernel};
use crate::console::{self, StdinInput};
use crate::console_sinks::{ConsoleFanout, ConsoleTaps};
use crate::device_manager::{DeviceError, DeviceManager, Subscriber};
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::{self, MemoryError};
use crate::vcpu::{self, PauseTimeout, VcpuGate};

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("Cannot build {0} vCPUs")]
    VcpuCount(u32),
    #[error("Cannot create the VM")]
    CreateVm(#[source] EngineError),
    #[error("Cannot create vCPU {index}")]
    CreateVcpu {
        index: u8,
        #[source]
        source: EngineError,
    },
    #[error("Cannot set the boot vCPU's registers")]
    SetBootState(#[source] EngineError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
    #[error("Cannot open disk {path}")]
    Disk {
        path: std::path::PathBuf,
        #[source]
        source: lodge_devices::virtio::BlockError,
    },
    #[error(transparent)]
    Nic(#[from] crate::net::NicError),
    #[error("Cannot open the console output")]
    ConsoleOutput(#[source] std::io::Error),
    #[error("Cannot read the console input")]
    ConsoleInput(#[source] std::io::Error),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("Cannot set up the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("Cannot start a vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] nix::Error),
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// How the VM is attached to the process running it.
#[derive(Debug, Clone)]
pub struct MachineOptions {
    /// When the process started (the boot timer measures from here).
    pub start: Instant,
    /// Forward stdin to the serial console (only with `console: stdio`).
    pub console_input: bool,
    /// End the VM on SIGINT, SIGTERM and SIGHUP (blocks them in every thread).
    pub handle_signals: bool,
}

impl Default for MachineOptions {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            console_input: false,
            handle_signals: false,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunSummary {
    pub reason: ExitReason,
    /// Time from process start to the guest's "userspace started" write, if it came.
    pub boot_time: Option<Duration>,
}

/// How long a pause waits for the vCPUs to park: the emulator checks for stop requests
/// between blocks and KVM returns at once on its kick signal, so only a vCPU stuck in a
/// device handler takes longer. Shorter than the daemon's control request timeout, so
/// the daemon hears why.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Controls a running VM from other threads.
#[derive(Clone)]
pub struct MachineHandle {
    gate: Arc<VcpuGate>,
    stoppers: Arc<Mutex<Vec<Arc<dyn VcpuStopper>>>>,
    exit: Arc<ExitSignal>,
    boot_time: BootTimeHandle,
    power_button: PowerButtonHandle,
    engine: EngineKind,
}

impl MachineHandle {
    /// Stops the VM; `run` returns with [`ExitReason::Stopped`].
    pub fn stop(&self, why: &str) {
        self.exit.request(ExitReason::Stopped(why.to_owned()));
    }

    /// Parks every vCPU and returns once all have parked, or with an error naming how many
    /// still run after [`PAUSE_TIMEOUT`] (the pause stays in effect for them).
    pub fn pause(&self) -> Result<(), PauseTimeout> {
        let stoppers = self.stoppers.lock().unwrap_or_else(|e| e.into_inner());
        self.gate.pause(&stoppers, PAUSE_TIMEOUT)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.gate.resume();
    }

    /// Whether a pause is in effect.
    pub fn is_paused(&self) -> bool {
        self.gate.is_paused()
    }
}

/// The control socket's requests, on this VM.
impl ControlTarget for MachineHandle {
    fn pause(&self) -> Result<(), String> {
        MachineHandle::pause(self).map_err(|e| e.to_string())
    }

    fn resume(&self) {
        MachineHandle::resume(self);
    }

    /// The guest decides when to power off.
    fn press_power_button(&self) {
        self.power_button.press();
    }

    fn stop(&self) {
        MachineHandle::stop(self, "stop requested on the control socket");
    }

    fn status(&self) -> VmmStatus {
        VmmStatus {
            state: if self.is_paused() {
                RunState::Paused
            } else {
                RunState::Running
            },
            boot_time_ms: self.boot_time.boot_time().map(|t| t.as_millis() as u64),
            pid: std::process::id(),
            engine: self.engine,
        }
    }
}

/// A VM ready to run.
pub struct Machine {
    // Field order matters for drop: vCPUs and devices go before the engine VM and memory.
    vcpus: Vec<Box<dyn Vcpu>>,
    devices: DeviceManager,
    engine_vm: Arc<dyn Vm>,
    _memory: GuestMemoryMmap,
    loaded: LoadedKernel,
    cmdline: String,
    options: MachineOptions,
    console_is_stdio: bool,
    console_taps: Arc<ConsoleTaps>,
    handle: MachineHandle,
    /// Served by the event loop besides the devices (a supervisor's sockets).
    extra_subscribers: Vec<Subscriber>,
    /// Processes the devices need (passt), ended with the machine.
    _helpers: Vec<crate::net::Helper>,
}

impl Machine {
    /// Builds the VM `config` describes on `engine`. The config must have been validated.
    pub fn build(
        config: &MachineConfig,
        engine: &dyn Engine,
        options: MachineOptions,
    ) -> Result<Self, MachineError> {
        let vcpu_count =
            u8::try_from(config.cpus).map_err(|_| MachineError::VcpuCount(config.cpus))?;
        let memory = memory::allocate(config.memory.bytes())?;
        // Kernel and initrd first: a bad image is reported before anything else is set up.
        let loaded = boot::load_images(&memory, &config.kernel, config.initrd.as_deref())?;
        let io = Arc::new(IoBus::new());
        let engine_vm = engine
            .create_vm(VmSpec {
                memory: memory.clone(),
                vcpu_count,
                io: io.clone(),
            })
            .map_err(MachineError::CreateVm)?;

        let primary = console::output(&config.console).map_err(MachineError::ConsoleOutput)?;
        let console_taps = Arc::new(ConsoleTaps::default());
        let output = Box::new(ConsoleFanout::new(primary, console_taps.clone()));
        let exit = Arc::new(ExitSignal::new().map_err(MachineError::EventFd)?);
        let mut devices = DeviceManager::new(engine_vm.as_ref(), io, output, options.start)?;
        for (index, disk) in config.disks.iter().enumerate() {
            let block = VirtioBlock::new(BlockConfig {
                path: disk.path.clone(),
                read_only: disk.read_only,
                id: disk_id(index, &disk.path),
            })
            .map_err(|source| MachineError::Disk {
                path: disk.path.clone(),
                source,
            })?;
            devices.add_virtio(engine_vm.as_ref(), &memory, Box::new(block))?;
        }
        if config.rng {
            devices.add_virtio(engine_vm.as_ref(), &memory, Box::new(VirtioRng::new()))?;
        }
        let mut helpers = Vec::new();
        for (index, nic_config) in config.nics.iter().enumerate() {
            let nic = crate::net::build(index, nic_config)?;
            tracing::info!("NIC {index}: {nic_config}, MAC {}", nic.mac);
            helpers.extend(nic.helper);
            devices.add_virtio(engine_vm.as_ref(), &memory, Box::new(nic.device))?;
        }

        let mut cmdline = config.base_cmdline();
        for arg in devices
            .cmdline_args()
            .iter()
            .chain(&engine_vm.kernel_args())
        {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        let mp_table = match engine_vm.interrupt_model() {
            InterruptModel::Apic => Some(vcpu_count),
            InterruptModel::Pic => None,
        };
        let boot_state = boot::write_boot_parameters(&memory, &loaded, &cmdline, mp_table)?;

        let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
        for index in 0..vcpu_count {
            let vcpu = engine_vm
                .create_vcpu(index)
                .map_err(|source| MachineError::CreateVcpu { index, source })?;
            vcpus.push(vcpu);
        }
        // Application processors wait for the boot processor's INIT/SIPI.
        vcpus[0]
            .set_state(&boot_state)
            .map_err(MachineError::SetBootState)?;

        let handle = MachineHandle {
            gate: Arc::new(VcpuGate::default()),
            stoppers: Arc::new(Mutex::new(vcpus.iter().map(|v| v.stopper()).collect())),
            exit,
            boot_time: devices.boot_time(),
            power_button: devices.power_button(),
            engine: engine.kind(),
        };
        Ok(Self {
            vcpus,
            devices,
            engine_vm,
            _memory: memory,
            loaded,
            cmdline,
            console_is_stdio: config.console == ConsoleConfig::Stdio,
            console_taps,
            options,
            handle,
            extra_subscribers: Vec::new(),
            _helpers: helpers,
        })
    }

    /// The kernel command line the guest boots with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Where the kernel and initrd were loaded.
    pub fn loaded_kernel(&self) -> &LoadedKernel {
        &self.loaded
    }

    /// A handle to pause, resume or stop the VM while it runs.
    pub fn handle(&self) -> MachineHandle {
        self.handle.clone()
    }

    /// Where serial output goes besides the primary console.
    pub fn console_taps(&self) -> Arc<ConsoleTaps> {
        self.console_taps.clone()
    }

    /// The serial console (to feed it input).
    pub fn serial(&self) -> Arc<Mutex<SerialConsole>> {
        self.devices.serial()
    }

    /// Adds something for the event loop to serve while the VM runs.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.extra_subscribers.push(subscriber);
    }

    /// Runs the VM until the guest or the host ends it.
    pub fn run(self) -> Result<RunSummary, MachineError> {
        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(MachineError::EventLoop)?;
        let exit = self.handle.exit.clone();
        let watcher = ExitWatcher {
            exit: exit.clone(),
            signals: if self.options.handle_signals {
                Some(block_exit_signals().map_err(MachineError::Signals)?)
            } else {
                None
            },
        };
        event_manager.add_subscriber(Arc::new(Mutex::new(watcher)));
        for subscriber in self
            .devices
            .subscribers()
            .iter()
            .chain(&self.extra_subscribers)
        {
            event_manager.add_subscriber(subscriber.clone());
        }
        if self.options.console_input && self.console_is_stdio {
            let input = StdinInput::new(self.devices.serial(), exit.clone())
                .map_err(MachineError::ConsoleInput)?;
            event_manager.add_subscriber(Arc::new(Mutex::new(input)));
        }

        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.into_iter().enumerate() {
            match vcpu::spawn(index as u8, vcpu, self.handle.gate.clone(), exit.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop_and_join(&self.handle, threads);
                    return Err(MachineError::SpawnVcpu(e));
                }
            }
        }
        let result = loop {
            if let Some(reason) = exit.reason() {
                break Ok(reason);
            }
            if let Err(e) = event_manager.run_with_timeout(1000) {
                break Err(MachineError::EventLoop(e));
            }
        };
        stop_and_join(&self.handle, threads);
        drop(self.engine_vm);
        Ok(RunSummary {
            reason: result?,
            boot_time: self.devices.boot_time().boot_time(),
        })
    }
}

fn stop_and_join(handle: &MachineHandle, threads: Vec<JoinHandle<()>>) {
    let stoppers = handle
        .stoppers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    handle.gate.exit(&stoppers);
    for thread in threads {
        if thread.join().is_err() {
            tracing::error!("A vCPU thread panicked");
        }
    }
}

/// The serial number a disk reports (`/sys/block/vdX/serial`): its file name, 20 bytes at most.
fn disk_id(index: usize, path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("disk{index}"));
    name.chars().take(20).collect()
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts) and returns a
/// signalfd that reads them.
fn block_exit_signals() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
}

/// Wakes the event loop for exit requests and host signals.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
    signals: Option<SignalFd>,
}

const WATCH_EXIT: u32 = 0;
const WATCH_SIGNALS: u32 = 1;

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            WATCH_EXIT => {
                let _ = self.exit.event().read();
            }
            WATCH_SIGNALS => {
                if let Some(Ok(Some(info))) = self.signals.as_mut().map(|s| s.read_signal()) {
                    let name = Signal::try_from(info.ssi_signo as i32)
                        .map(|s| s.as_str())
                        .unwrap_or("signal");
                    self.exit
                        .request(ExitReason::Stopped(format!("received {name}")));
                }
            }
            _ => {}
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, data: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                tracing::error!("Cannot watch fd {fd}: {e:?}");
            }
        };
        add(self.exit.event().as_raw_fd(), WATCH_EXIT);
        if let Some(signals) = &self.signals {
            add(signals.as_raw_fd(), WATCH_SIGNALS);
        }
    }
}
