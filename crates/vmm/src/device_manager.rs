//! Builds the VM's devices and places them on the buses: the legacy ones every guest gets and
//! one virtio-mmio window per virtio device, announced on the kernel command line.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::MutEventSubscriber;
use lodge_bus::{BusError, IoBus, MachineRequest};
use lodge_devices::i8042::I8042_PORT;
use lodge_devices::reset_control::RESET_CONTROL_PORT;
use lodge_devices::rtc::{RTC_PORT, RTC_PORT_COUNT};
use lodge_devices::serial::{COM1_IRQ, COM1_PORT, SERIAL_PORT_COUNT};
use lodge_devices::virtio::{self, MmioTransport, VirtioDevice, QUEUE_NOTIFY_OFFSET};
use lodge_devices::{
    BootTimeHandle, BootTimer, CmosRtc, I8042Controller, PowerButton, PowerButtonHandle,
    ResetControl, ResetHandler, SerialConsole,
};
use lodge_engine::{EngineError, Vm};
use vm_memory::GuestMemoryMmap;

use crate::layout::{
    self, BOOT_TIMER_SIZE, BOOT_TIMER_START, POWER_BUTTON_SIZE, POWER_BUTTON_START,
    VIRTIO_MMIO_MAX_DEVICES, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};

/// Errors from building devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("Cannot place a device on the bus")]
    Bus(#[from] BusError),
    #[error("Cannot get an interrupt line")]
    Interrupt(#[source] EngineError),
    #[error("Cannot register a queue notifier")]
    Notifier(#[source] EngineError),
    #[error("No interrupt line or MMIO window left for another virtio device")]
    TooManyDevices,
    #[error("Cannot create the virtio transport")]
    Transport(#[source] virtio::MmioError),
}

/// Subscribers the VMM's event loop must serve.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The devices of one VM.
pub struct DeviceManager {
    io: Arc<IoBus>,
    serial: Arc<Mutex<SerialConsole>>,
    boot_time: BootTimeHandle,
    power_button: PowerButtonHandle,
    subscribers: Vec<Subscriber>,
    cmdline_args: Vec<String>,
    virtio_count: u64,
}

impl DeviceManager {
    /// Creates the platform devices: COM1, the i8042 and the reset control register (both
    /// raising a machine reset on `io` when the guest resets the machine), the CMOS RTC, the
    /// boot timer and the power button.
    pub fn new(
        vm: &dyn Vm,
        io: Arc<IoBus>,
        console_output: Box<dyn Write + Send>,
        start: Instant,
    ) -> Result<Self, DeviceError> {
        let serial_irq = vm
            .interrupt_line(COM1_IRQ)
            .map_err(DeviceError::Interrupt)?;
        let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, console_output)));
        io.pio
            .insert(serial.clone(), u64::from(COM1_PORT), SERIAL_PORT_COUNT)?;

        let reset = || -> ResetHandler {
            let requests = io.requests.clone();
            Box::new(move || requests.raise(MachineRequest::Reset))
        };
        let i8042 = I8042Controller::new(reset());
        // Ports 0x60 and 0x64 only: 0x61 (port B) belongs to the PIT.
        let (data_port, command_port) = i8042.into_ports();
        let i8042_port = u64::from(I8042_PORT);
        io.pio
            .insert(Arc::new(Mutex::new(data_port)), i8042_port, 1)?;
        io.pio
            .insert(Arc::new(Mutex::new(command_port)), i8042_port + 4, 1)?;

        io.pio.insert(
            Arc::new(Mutex::new(ResetControl::new(reset()))),
            u64::from(RESET_CONTROL_PORT),
            1,
        )?;

        io.pio.insert(
            Arc::new(Mutex::new(CmosRtc::new())),
            u64::from(RTC_PORT),
            RTC_PORT_COUNT,
        )?;

        let boot_timer = BootTimer::new(start);
        let boot_time = boot_timer.handle();
        io.mmio.insert(
            Arc::new(Mutex::new(boot_timer)),
            BOOT_TIMER_START,
            BOOT_TIMER_SIZE,
        )?;

        let power_button = PowerButton::new();
        let power_button_handle = power_button.handle();
        io.mmio.insert(
            Arc::new(Mutex::new(power_button)),
            POWER_BUTTON_START,
            POWER_BUTTON_SIZE,
        )?;

        Ok(Self {
            io,
            serial,
            boot_time,
            power_button: power_button_handle,
            subscribers: Vec::new(),
            cmdline_args: Vec::new(),
            virtio_count: 0,
        })
    }

    /// Adds a virtio device in the next MMIO window, wired to the next free interrupt line.
    pub fn add_virtio(
        &mut self,
        vm: &dyn Vm,
        memory: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let irq = layout::device_irqs(vm.interrupt_model().lines())
            .nth(self.virtio_count as usize)
            .filter(|_| self.virtio_count < VIRTIO_MMIO_MAX_DEVICES)
            .ok_or(DeviceError::TooManyDevices)?;
        let base = VIRTIO_MMIO_START + self.virtio_count * VIRTIO_MMIO_SIZE;
        let interrupt = vm.interrupt_line(irq).map_err(DeviceError::Interrupt)?;
        let transport = MmioTransport::new(device, memory.clone(), interrupt)
            .map_err(DeviceError::Transport)?;
        for (queue, event) in transport.queue_notifiers() {
            vm.register_mmio_notifier(base + QUEUE_NOTIFY_OFFSET, queue, event)
                .map_err(DeviceError::Notifier)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.io
            .mmio
            .insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.subscribers.push(transport);
        self.cmdline_args
            .push(virtio::kernel_cmdline_arg(base, irq));
        self.virtio_count += 1;
        Ok(())
    }

    /// The serial console (for feeding it input).
    pub fn serial(&self) -> Arc<Mutex<SerialConsole>> {
        self.serial.clone()
    }

    /// When the guest's init reported userspace started.
    pub fn boot_time(&self) -> BootTimeHandle {
        self.boot_time.clone()
    }

    /// Presses the paravirtual power button the guest's init polls.
    pub fn power_button(&self) -> PowerButtonHandle {
        self.power_button.clone()
    }

    /// Devices whose work runs in the event loop.
    pub fn subscribers(&self) -> &[Subscriber] {
        &self.subscribers
    }

    /// `virtio_mmio.device=` arguments for every virtio device.
    pub fn cmdline_args(&self) -> &[String] {
        &self.cmdline_args
    }
}
