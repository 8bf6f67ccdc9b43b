//! One virtual machine: memory layout, x86-64 boot, devices, vCPU threads and the event loop.
//!
//! [`Machine::build`] turns a validated [`lodge_contract::MachineConfig`] into guest memory,
//! devices on the buses and vCPUs in their boot state on the chosen engine;
//! [`supervision::attach`] adds what a supervisor asked for (console log, console and control
//! sockets); [`Machine::run`] runs the VM until the guest resets or powers off, the engine
//! fails, or the host stops it.

pub mod boot;
pub mod console;
pub mod console_sinks;
pub mod control;
pub mod device_manager;
pub mod engine_select;
pub mod exit;
pub mod layout;
mod machine;
pub mod memory;
pub mod net;
pub mod supervision;
mod unix_socket;
mod vcpu;

pub use exit::ExitReason;
pub use machine::{
    Machine, MachineError, MachineHandle, MachineOptions, RunSummary, PAUSE_TIMEOUT,
};
pub use vcpu::PauseTimeout;
