//! Which CPU engine a VM asks for, and which one runs it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The engine a VM asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Engine))]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// KVM when it can run Linux guests on this host, else the software engine.
    #[default]
    Auto,
    Kvm,
    Emulator,
}

/// The engine that runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// lodge's software x86-64 engine.
    Emulator,
}

/// An engine name that is not one of the choices.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown engine '{0}' (expected kvm, emulator or auto)")]
pub struct UnknownEngine(pub String);

impl EngineChoice {
    pub const ALL: [EngineChoice; 3] = [Self::Auto, Self::Kvm, Self::Emulator];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Emulator => "emulator",
        }
    }

    /// The engine this choice names, if it names one.
    pub fn kind(self) -> Option<EngineKind> {
        match self {
            Self::Auto => None,
            Self::Kvm => Some(EngineKind::Kvm),
            Self::Emulator => Some(EngineKind::Emulator),
        }
    }
}

impl EngineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Emulator => "emulator",
        }
    }
}

impl FromStr for EngineChoice {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|choice| choice.as_str() == s)
            .ok_or_else(|| UnknownEngine(s.to_owned()))
    }
}

impl FromStr for EngineKind {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<EngineChoice>()?
            .kind()
            .ok_or_else(|| UnknownEngine(s.to_owned()))
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for choice in EngineChoice::ALL {
            assert_eq!(choice.as_str().parse::<EngineChoice>(), Ok(choice));
            assert_eq!(
                serde_json::to_string(&choice).unwrap(),
                format!("\"{choice}\"")
            );
        }
        assert_eq!("kvm".parse::<EngineKind>(), Ok(EngineKind::Kvm));
        assert_eq!(
            serde_json::to_string(&EngineKind::Emulator).unwrap(),
            "\"emulator\""
        );
        assert_eq!(
            "auto".parse::<EngineKind>(),
            Err(UnknownEngine("auto".into()))
        );
        assert_eq!(
            "qemu".parse::<EngineChoice>().unwrap_err().to_string(),
            "Unknown engine 'qemu' (expected kvm, emulator or auto)"
        );
    }
}
