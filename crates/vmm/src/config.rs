//! A VM's configuration: what `lodge run` takes from flags or a JSON file, validated before
//! anything is allocated.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Smallest guest memory lodge accepts.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 32;
/// The command line used when none is given: serial console, i8042 reset for `reboot`, and
/// an immediate reboot (ending the VM) on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors from reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Kernel file not found: {0}")]
    KernelNotFound(PathBuf),
    #[error("Initrd file not found: {0}")]
    InitrdNotFound(PathBuf),
    #[error("Disk image not found: {0}")]
    DiskNotFound(PathBuf),
    #[error("Disk {0} is listed twice")]
    DuplicateDisk(PathBuf),
    #[error("Memory {mib} MiB is too small (minimum {} MiB)", MIN_MEMORY >> 20)]
    MemoryTooSmall { mib: u64 },
    #[error("Memory {mib} MiB is more than the host's {host_mib} MiB")]
    MemoryTooLarge { mib: u64, host_mib: u64 },
    #[error("Invalid vCPU count {0} (1 to {MAX_VCPUS})")]
    InvalidVcpus(u32),
    #[error("Invalid memory size '{0}' (examples: 256M, 1G, 512 for MiB)")]
    InvalidMemorySize(String),
    #[error("Unknown engine '{0}' (expected kvm, emulator or auto)")]
    UnknownEngine(String),
    #[error("Invalid console '{0}' (expected stdio, file:PATH or none)")]
    InvalidConsole(String),
    #[error("Invalid disk '{0}' (expected PATH or PATH,readonly)")]
    InvalidDisk(String),
    #[error("Cannot read config file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid config file {path}")]
    ParseFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Everything needed to build and boot one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vmlinux (ELF) or bzImage.
    pub kernel: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Replaces [`DEFAULT_CMDLINE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Appended to the command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub append: Vec<String>,
    #[serde(default = "default_vcpus")]
    pub cpus: u8,
    #[serde(default = "default_memory")]
    pub memory: MemorySize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub engine: EngineChoice,
    #[serde(default)]
    pub console: ConsoleConfig,
    /// Also append serial output to a size-capped log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<ConsoleLogConfig>,
    /// Serve the serial console to clients of this Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<PathBuf>,
    /// Accept control requests (status, pause, resume, shutdown, stop) on this Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Write why the VM ended to this file (JSON) when the VMM exits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_file: Option<PathBuf>,
}

/// A console log that rotates to `PATH.1` when it grows past `limit` bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleLogConfig {
    pub path: PathBuf,
    #[serde(default = "default_console_log_limit")]
    pub limit: u64,
}

fn default_console_log_limit() -> u64 {
    1 << 20
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory() -> MemorySize {
    MemorySize(256 << 20)
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            append: Vec::new(),
            cpus: default_vcpus(),
            memory: default_memory(),
            disks: Vec::new(),
            rng: false,
            engine: EngineChoice::Auto,
            console: ConsoleConfig::Stdio,
            console_log: None,
            console_socket: None,
            api_socket: None,
            exit_file: None,
        }
    }

    /// Reads a JSON configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::ParseFile {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks the configuration against the files on disk and the host's memory.
    pub fn validate(&self, host_memory: u64) -> Result<(), ConfigError> {
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelNotFound(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdNotFound(initrd.clone()));
            }
        }
        if self.cpus == 0 || self.cpus > MAX_VCPUS {
            return Err(ConfigError::InvalidVcpus(self.cpus.into()));
        }
        let memory = self.memory.bytes();
        if memory < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall { mib: memory >> 20 });
        }
        if memory > host_memory {
            return Err(ConfigError::MemoryTooLarge {
                mib: memory >> 20,
                host_mib: host_memory >> 20,
            });
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if !disk.path.exists() {
                return Err(ConfigError::DiskNotFound(disk.path.clone()));
            }
            if self.disks[..index].iter().any(|d| d.path == disk.path) {
                return Err(ConfigError::DuplicateDisk(disk.path.clone()));
            }
        }
        Ok(())
    }

    /// The full kernel command line, before devices and the engine add theirs.
    pub fn base_cmdline(&self) -> String {
        let mut cmdline = self
            .cmdline
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
            .to_owned();
        for extra in &self.append {
            if !extra.is_empty() {
                cmdline.push(' ');
                cmdline.push_str(extra);
            }
        }
        cmdline
    }
}

/// A disk image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `PATH` or `PATH,readonly` (also `ro`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, options) = match s.split_once(',') {
            Some((path, options)) => (path, Some(options)),
            None => (s, None),
        };
        if path.is_empty() {
            return Err(ConfigError::InvalidDisk(s.to_owned()));
        }
        let read_only = match options {
            None => false,
            Some("readonly" | "ro" | "read-only") => true,
            Some(_) => return Err(ConfigError::InvalidDisk(s.to_owned())),
        };
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// A size in bytes, written `256M`, `1G`, `1024K` or a plain number of MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MemorySize(pub u64);

impl MemorySize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for MemorySize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ConfigError::InvalidMemorySize(s.to_owned());
        let trimmed = s.trim();
        let unit_start = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(unit_start);
        let number: u64 = digits.parse().map_err(|_| invalid())?;
        let shift = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "M" | "MB" | "MIB" => 20,
            "K" | "KB" | "KIB" => 10,
            "G" | "GB" | "GIB" => 30,
            "T" | "TB" | "TIB" => 40,
            _ => return Err(invalid()),
        };
        number
            .checked_mul(1 << shift)
            .map(MemorySize)
            .ok_or_else(invalid)
    }
}

impl fmt::Display for MemorySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1 << 30) {
            write!(f, "{}G", self.0 >> 30)
        } else if self.0.is_multiple_of(1 << 20) {
            write!(f, "{}M", self.0 >> 20)
        } else {
            write!(f, "{}K", self.0 >> 10)
        }
    }
}

impl Serialize for MemorySize {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Mib(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Mib(mib) => mib
                .checked_mul(1 << 20)
                .map(MemorySize)
                .ok_or_else(|| serde::de::Error::custom("memory size overflows")),
            Raw::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Which engine to run the VM on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// KVM when it can run Linux guests here, else the software engine.
    #[default]
    Auto,
    Kvm,
    Emulator,
}

impl FromStr for EngineChoice {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "emulator" => Ok(Self::Emulator),
            other => Err(ConfigError::UnknownEngine(other.to_owned())),
        }
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The terminal: output to stdout, keyboard input to the guest.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded.
    None,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::InvalidConsole(s.to_owned())),
            },
        }
    }
}

impl fmt::Display for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdio => f.write_str("stdio"),
            Self::None => f.write_str("none"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

impl Serialize for ConsoleConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ConsoleConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Total RAM of this host, from `/proc/meminfo`.
pub fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(u64::MAX, |kib| kib << 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn existing_file() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(b"x").unwrap();
        file
    }

    #[test]
    fn parses_memory_sizes() {
        assert_eq!("256M".parse::<MemorySize>().unwrap().bytes(), 256 << 20);
        assert_eq!("1G".parse::<MemorySize>().unwrap().bytes(), 1 << 30);
        assert_eq!("2GiB".parse::<MemorySize>().unwrap().bytes(), 2 << 30);
        assert_eq!("512".parse::<MemorySize>().unwrap().bytes(), 512 << 20);
        assert_eq!("65536K".parse::<MemorySize>().unwrap().bytes(), 64 << 20);
        for bad in ["", "M", "12X", "-5M", "1.5G", "99999999999999999999T"] {
            assert!(bad.parse::<MemorySize>().is_err(), "{bad} accepted");
        }
        assert_eq!(MemorySize(256 << 20).to_string(), "256M");
        assert_eq!(MemorySize(2 << 30).to_string(), "2G");
    }

    #[test]
    fn parses_disks_engines_and_consoles() {
        let disk: DiskConfig = "/tmp/a.img,readonly".parse().unwrap();
        assert!(disk.read_only);
        assert_eq!(disk.path, PathBuf::from("/tmp/a.img"));
        assert!(!"/tmp/a.img".parse::<DiskConfig>().unwrap().read_only);
        assert!("/tmp/a.img,bogus".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert_eq!("kvm".parse::<EngineChoice>().unwrap(), EngineChoice::Kvm);
        let err = "qemu".parse::<EngineChoice>().unwrap_err().to_string();
        assert_eq!(
            err,
            "Unknown engine 'qemu' (expected kvm, emulator or auto)"
        );
        assert_eq!(
            "file:/tmp/c.log".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/tmp/c.log".into())
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let kernel = existing_file();
        let mut config = VmConfig::new(kernel.path());
        assert!(config.validate(1 << 34).is_ok());

        config.memory = MemorySize(32 << 20);
        assert_eq!(
            config.validate(1 << 34).unwrap_err().to_string(),
            "Memory 32 MiB is too small (minimum 64 MiB)"
        );
        config.memory = MemorySize(1 << 40);
        assert_eq!(
            config.validate(16 << 30).unwrap_err().to_string(),
            "Memory 1048576 MiB is more than the host's 16384 MiB"
        );
        config.memory = MemorySize(256 << 20);

        config.disks.push("/nonexistent/disk.img".parse().unwrap());
        assert_eq!(
            config.validate(1 << 34).unwrap_err().to_string(),
            "Disk image not found: /nonexistent/disk.img"
        );
        config.disks = vec![
            DiskConfig::from_str(kernel.path().to_str().unwrap()).unwrap(),
            DiskConfig::from_str(kernel.path().to_str().unwrap()).unwrap(),
        ];
        assert!(matches!(
            config.validate(1 << 34),
            Err(ConfigError::DuplicateDisk(_))
        ));
        config.disks.clear();

        config.cpus = 0;
        assert!(matches!(
            config.validate(1 << 34),
            Err(ConfigError::InvalidVcpus(0))
        ));
        config.cpus = 1;

        config.kernel = "/nonexistent/vmlinux".into();
        assert_eq!(
            config.validate(1 << 34).unwrap_err().to_string(),
            "Kernel file not found: /nonexistent/vmlinux"
        );
    }

    #[test]
    fn json_round_trips_and_rejects_unknown_fields() {
        let mut config = VmConfig::new("/boot/vmlinux");
        config.disks.push("/d.img,ro".parse().unwrap());
        config.console = ConsoleConfig::File("/tmp/x".into());
        config.append.push("quiet".into());
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);

        let parsed: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "memory": 512, "engine": "emulator"}"#)
                .unwrap();
        assert_eq!(parsed.memory.bytes(), 512 << 20);
        assert_eq!(parsed.engine, EngineChoice::Emulator);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "memroy": 1}"#).is_err());
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel": "/k", "engine": "x"}"#).is_err());
    }

    #[test]
    fn cmdline_is_default_plus_appended_args() {
        let mut config = VmConfig::new("/k");
        config.append = vec!["quiet".into(), "guest.cmd=true".into()];
        assert_eq!(
            config.base_cmdline(),
            format!("{DEFAULT_CMDLINE} quiet guest.cmd=true")
        );
        config.cmdline = Some("console=ttyS0".into());
        assert_eq!(config.base_cmdline(), "console=ttyS0 quiet guest.cmd=true");
    }

    #[test]
    fn host_memory_is_read() {
        assert!(host_memory() > MIN_MEMORY);
    }
}
