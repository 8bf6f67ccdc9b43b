//! The contract between the lodge daemon, the CLI and the VMM process.
//!
//! Everything that crosses the daemon↔VMM boundary is defined here once and used by both
//! sides (and by the daemon's test double):
//!
//! * [`VmConfig`]: the JSON file `lodge run --config` reads, split into what builds the
//!   machine ([`MachineConfig`]) and what supervises it ([`Supervision`]);
//! * [`control`]: the control socket's requests and replies;
//! * [`ExitRecord`]: the file a VMM leaves behind when it ends;
//! * [`EngineChoice`] / [`EngineKind`], [`ByteSize`] and the [`limits`] every layer checks.
//!
//! This crate knows nothing of KVM, tokio or the software engine, so any layer may use it.

pub mod config;
pub mod control;
mod engine;
mod exit;
pub mod limits;
pub mod net;
mod size;

pub use config::{
    ConfigError, ConsoleConfig, ConsoleLogConfig, DiskConfig, MachineConfig, Supervision, VmConfig,
};
pub use control::{ControlReply, ControlRequest, RunState, VmmStatus};
pub use engine::{EngineChoice, EngineKind, UnknownEngine};
pub use exit::ExitRecord;
pub use net::{MacAddress, NetError, NicBackend, NicConfig, PortForward};
pub use size::{ByteSize, SizeError, SizeUnit};
