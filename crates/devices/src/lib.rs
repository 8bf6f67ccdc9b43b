//! Devices of a lodge VM.
//!
//! Legacy devices sit on the port I/O bus: the [`SerialConsole`] (COM1), the
//! [`I8042Controller`] (reset line only), the [`ResetControl`] register (port 0xCF9) and the
//! [`CmosRtc`]. The [`BootTimer`], the
//! [`PowerButton`] and the
//! virtio devices sit on the MMIO bus: [`virtio::MmioTransport`] carries any
//! [`virtio::VirtioDevice`], such as [`virtio::VirtioBlock`] and [`virtio::VirtioRng`].
//!
//! No device knows which CPU engine runs the guest. Each sees guest memory, its queues and an
//! [`lodge_bus::InterruptLine`]; register accesses arrive through [`lodge_bus::BusDevice`],
//! queue work happens on the VMM's event loop thread.
//!
//! The guest is hostile: every register access, descriptor chain and request is checked, and
//! a malformed one gets an error status or marks the device as needing a reset, with a
//! (rate-limited) log line; nothing a guest does panics or reaches outside its memory.

pub mod boot_timer;
pub mod i8042;
pub mod power_button;
pub mod reset_control;
pub mod rtc;
pub mod serial;
pub mod virtio;

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;

mod logging;

pub use boot_timer::{BootTimeHandle, BootTimer};
pub use i8042::{I8042Controller, I8042Port, ResetHandler};
pub use power_button::{PowerButton, PowerButtonHandle};
pub use reset_control::ResetControl;
pub use rtc::CmosRtc;
pub use serial::SerialConsole;
