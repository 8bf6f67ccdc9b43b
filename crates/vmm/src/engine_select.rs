//! Picking the CPU engine for `--engine auto|kvm|emulator`.

use lodge_emulator::EmulatorEngine;
use lodge_engine::{Engine, EngineError};
use lodge_kvm::{self as kvm, KvmEngine, KvmFlavor};

use lodge_contract::EngineChoice;

/// The engine chosen and a sentence saying why, for the user.
pub struct SelectedEngine {
    pub engine: Box<dyn Engine>,
    pub reason: String,
}

/// Creates the engine `choice` asks for. `auto` takes KVM when it can run Linux guests and
/// the software engine otherwise (no `/dev/kvm`, or PVM, whose ring-0 interpretation is too
/// slow for a Linux guest to reach userspace).
pub fn select(choice: EngineChoice) -> Result<SelectedEngine, EngineError> {
    match choice {
        EngineChoice::Kvm => {
            let engine = KvmEngine::new()?;
            let reason = match engine.flavor() {
                KvmFlavor::Hardware => "requested".to_owned(),
                KvmFlavor::Pvm => {
                    "requested; note this host's KVM is PVM: Linux guests will not reach userspace"
                        .to_owned()
                }
            };
            Ok(SelectedEngine {
                engine: Box::new(engine),
                reason,
            })
        }
        EngineChoice::Emulator => Ok(SelectedEngine {
            engine: Box::new(EmulatorEngine::new()),
            reason: "requested".into(),
        }),
        EngineChoice::Auto => {
            let unusable = match kvm::probe() {
                Ok(KvmFlavor::Hardware) => match KvmEngine::new() {
                    Ok(engine) => {
                        return Ok(SelectedEngine {
                            engine: Box::new(engine),
                            reason: "hardware virtualization is available".into(),
                        })
                    }
                    Err(e) => e.to_string(),
                },
                Ok(KvmFlavor::Pvm) => {
                    "/dev/kvm is PVM, which cannot run Linux guests to userspace".into()
                }
                Err(reason) => reason,
            };
            Ok(SelectedEngine {
                engine: Box::new(EmulatorEngine::new()),
                reason: unusable,
            })
        }
    }
}
