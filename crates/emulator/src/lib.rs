//! The software x86-64 engine (being written on the `emulator` branch).

use std::sync::Arc;

use lodge_engine::{Engine, EngineError, EngineKind, Vm, VmSpec};

/// The software engine.
#[derive(Default)]
pub struct EmulatorEngine;

impl EmulatorEngine {
    pub fn new() -> Self {
        Self
    }
}

impl Engine for EmulatorEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Emulator
    }

    fn create_vm(&self, _spec: VmSpec) -> Result<Arc<dyn Vm>, EngineError> {
        Err(EngineError::Unavailable(
            "the software engine is not part of this build yet".into(),
        ))
    }
}
