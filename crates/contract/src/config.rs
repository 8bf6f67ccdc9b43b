//! The VM configuration file: what `lodge run --config FILE` reads and the daemon writes.
//!
//! One flat JSON object, unknown fields refused. In memory it is two parts: the
//! [`MachineConfig`] that builds the VM, and the [`Supervision`] settings through which a
//! supervisor (the daemon) drives and watches the VMM process. The supervision fields are
//! [`Supervision::FIELDS`]; every other field belongs to the machine.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::limits::{self, LimitError};
use crate::{ByteSize, EngineChoice, SizeUnit, UnknownEngine};

/// The command line used when none is given: serial console, i8042 reset for `reboot`, and
/// an immediate reboot (ending the VM) on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Errors from reading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("No kernel given")]
    NoKernel,
    #[error("Kernel file not found: {0}")]
    KernelNotFound(PathBuf),
    #[error("Initrd file not found: {0}")]
    InitrdNotFound(PathBuf),
    #[error("Disk image not found: {0}")]
    DiskNotFound(PathBuf),
    #[error("Disk {0} is listed twice")]
    DuplicateDisk(PathBuf),
    #[error("The root file system is on the first disk, but there is no disk")]
    NoRootDisk,
    #[error("The root disk {0} is read-only")]
    ReadOnlyRootDisk(PathBuf),
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("Invalid vCPU count '{0}' (1 to {max})", max = limits::MAX_VCPUS)]
    InvalidVcpus(String),
    #[error("Invalid memory size '{0}' (examples: 256M, 1G, 512 for MiB)")]
    InvalidMemorySize(String),
    #[error(transparent)]
    UnknownEngine(#[from] UnknownEngine),
    #[error("Invalid console '{0}' (expected stdio, file:PATH or none)")]
    InvalidConsole(String),
    #[error("Invalid disk '{0}' (expected PATH or PATH,readonly)")]
    InvalidDisk(String),
    #[error(transparent)]
    Net(#[from] crate::NetError),
    #[error("MAC address {0} is given to two NICs")]
    DuplicateMac(crate::MacAddress),
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

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmConfig {
    pub machine: MachineConfig,
    pub supervision: Supervision,
}

/// Everything that builds and boots the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vmlinux (ELF) or bzImage. Empty: the default guest image, which `lodge run` resolves
    /// (building it on first use) before the machine is built.
    #[serde(default)]
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
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// virtio-blk devices, `/dev/vda` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskConfig>,
    /// The first disk holds the root file system: the kernel mounts `/dev/vda` read-write as
    /// `/` (`root=/dev/vda rw` is added to the command line) and runs its init.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub root_disk: bool,
    /// Adds a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// Network adapters (virtio-net), `eth0` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<crate::NicConfig>,
    #[serde(default)]
    pub engine: EngineChoice,
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// How a supervisor drives and watches the VMM process. All absent for a VM run by hand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supervision {
    /// Accept control requests ([`crate::control`]) on this Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Serve the serial console to clients of this Unix socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_socket: Option<PathBuf>,
    /// Also append serial output to a size-capped log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<ConsoleLogConfig>,
    /// Write an [`crate::ExitRecord`] here when the VMM ends.
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

/// A disk image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The terminal: output to stdout, keyboard input to the guest.
    #[default]
    Stdio,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Output discarded (a supervised VM's console goes to its log and socket).
    None,
}

impl VmConfig {
    /// Reads a configuration file.
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
}

impl MachineConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            ..Self::default()
        }
    }

    /// Whether the default guest image is asked for.
    pub fn uses_default_kernel(&self) -> bool {
        self.kernel.as_os_str().is_empty()
    }

    /// Checks the configuration against the limits, the files on disk and the host's memory
    /// (`host_memory`, from [`limits::host_memory`]).
    pub fn validate(&self, host_memory: Option<ByteSize>) -> Result<(), ConfigError> {
        if self.uses_default_kernel() {
            return Err(ConfigError::NoKernel);
        }
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelNotFound(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdNotFound(initrd.clone()));
            }
        }
        limits::check_vcpus(self.cpus, self.engine.kind())?;
        limits::check_memory(self.memory)?;
        limits::check_memory_on_host(self.memory, host_memory)?;
        for (index, disk) in self.disks.iter().enumerate() {
            if !disk.path.exists() {
                return Err(ConfigError::DiskNotFound(disk.path.clone()));
            }
            if self.disks[..index].iter().any(|d| d.path == disk.path) {
                return Err(ConfigError::DuplicateDisk(disk.path.clone()));
            }
        }
        for (index, nic) in self.nics.iter().enumerate() {
            if let Some(mac) = nic.mac {
                if self.nics[..index]
                    .iter()
                    .any(|other| other.mac == Some(mac))
                {
                    return Err(ConfigError::DuplicateMac(mac));
                }
            }
        }
        if self.root_disk {
            match self.disks.first() {
                None => return Err(ConfigError::NoRootDisk),
                Some(disk) if disk.read_only => {
                    return Err(ConfigError::ReadOnlyRootDisk(disk.path.clone()))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The kernel command line before devices and the engine add theirs.
    pub fn base_cmdline(&self) -> String {
        let mut cmdline = self
            .cmdline
            .as_deref()
            .unwrap_or(DEFAULT_CMDLINE)
            .to_owned();
        if self.root_disk {
            cmdline.push_str(" root=/dev/vda rw");
        }
        for extra in self.append.iter().filter(|extra| !extra.is_empty()) {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        cmdline
    }
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: None,
            append: Vec::new(),
            cpus: default_vcpus(),
            memory: default_memory(),
            disks: Vec::new(),
            root_disk: false,
            rng: false,
            nics: Vec::new(),
            engine: EngineChoice::default(),
            console: ConsoleConfig::default(),
        }
    }
}

impl Supervision {
    /// The configuration file's fields that belong to supervision.
    pub const FIELDS: [&'static str; 4] =
        ["api_socket", "console_socket", "console_log", "exit_file"];
}

/// `--cpus N`.
pub fn parse_vcpus(text: &str) -> Result<u32, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| ConfigError::InvalidVcpus(text.to_owned()))
}

/// `--memory SIZE`: a plain number is MiB.
pub fn parse_memory(text: &str) -> Result<ByteSize, ConfigError> {
    ByteSize::parse(text, SizeUnit::Mib)
        .map_err(|_| ConfigError::InvalidMemorySize(text.to_owned()))
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    /// `PATH` or `PATH,readonly` (also `ro`, `read-only`).
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

impl Serialize for VmConfig {
    /// One flat object: the machine's fields, then the supervision's.
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let machine = json_object::<_, S::Error>(&self.machine)?;
        let supervision = json_object::<_, S::Error>(&self.supervision)?;
        let mut map = serializer.serialize_map(Some(machine.len() + supervision.len()))?;
        for (key, value) in machine.iter().chain(&supervision) {
            map.serialize_entry(key, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for VmConfig {
    /// Splits the flat object by [`Supervision::FIELDS`]; each part refuses unknown fields.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut machine = serde_json::Map::deserialize(deserializer)?;
        let supervision: serde_json::Map<_, _> = Supervision::FIELDS
            .iter()
            .filter_map(|key| machine.remove_entry(*key))
            .collect();
        Ok(Self {
            machine: serde_json::from_value(machine.into()).map_err(D::Error::custom)?,
            supervision: serde_json::from_value(supervision.into()).map_err(D::Error::custom)?,
        })
    }
}

/// The fields of a struct serialized as a JSON object.
fn json_object<T: Serialize, E: serde::ser::Error>(
    value: &T,
) -> Result<serde_json::Map<String, serde_json::Value>, E> {
    match serde_json::to_value(value).map_err(E::custom)? {
        serde_json::Value::Object(map) => Ok(map),
        _ => Err(E::custom("a config part is not an object")),
    }
}

fn default_vcpus() -> u32 {
    1
}

fn default_memory() -> ByteSize {
    ByteSize::from_bytes(256 << 20)
}

fn default_console_log_limit() -> u64 {
    1 << 20
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

    fn mib(n: u64) -> ByteSize {
        ByteSize::from_mib(n).unwrap()
    }

    #[test]
    fn parses_disks_consoles_vcpus_and_memory() {
        let disk: DiskConfig = "/tmp/a.img,readonly".parse().unwrap();
        assert!(disk.read_only);
        assert_eq!(disk.path, PathBuf::from("/tmp/a.img"));
        assert!(!"/tmp/a.img".parse::<DiskConfig>().unwrap().read_only);
        assert!("/tmp/a.img,bogus".parse::<DiskConfig>().is_err());
        assert!(",ro".parse::<DiskConfig>().is_err());
        assert_eq!(
            "file:/tmp/c.log".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::File("/tmp/c.log".into())
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
        assert_eq!(parse_vcpus("4").unwrap(), 4);
        assert_eq!(
            parse_vcpus("many").unwrap_err().to_string(),
            "Invalid vCPU count 'many' (1 to 32)"
        );
        assert_eq!(parse_memory("512").unwrap(), mib(512));
        assert_eq!(
            parse_memory("lots").unwrap_err().to_string(),
            "Invalid memory size 'lots' (examples: 256M, 1G, 512 for MiB)"
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let kernel = existing_file();
        let host = Some(ByteSize::from_bytes(1 << 34));
        let mut config = MachineConfig::new(kernel.path());
        assert!(config.validate(host).is_ok());

        config.memory = mib(32);
        assert_eq!(
            config.validate(host).unwrap_err().to_string(),
            "Memory 32 MiB is too small (minimum 64 MiB)"
        );
        config.memory = mib(1 << 20);
        assert_eq!(
            config.validate(Some(mib(16384))).unwrap_err().to_string(),
            "Memory 1048576 MiB is more than the host's 16384 MiB"
        );
        config.memory = mib(256);

        config.disks.push("/nonexistent/disk.img".parse().unwrap());
        assert_eq!(
            config.validate(host).unwrap_err().to_string(),
            "Disk image not found: /nonexistent/disk.img"
        );
        let same = DiskConfig::from_str(kernel.path().to_str().unwrap()).unwrap();
        config.disks = vec![same.clone(), same];
        assert!(matches!(
            config.validate(host),
            Err(ConfigError::DuplicateDisk(_))
        ));
        config.disks.clear();

        config.cpus = 0;
        assert_eq!(
            config.validate(host).unwrap_err().to_string(),
            "Invalid vCPU count 0 (1 to 32)"
        );
        config.cpus = 1;

        config.kernel = "/nonexistent/vmlinux".into();
        assert_eq!(
            config.validate(host).unwrap_err().to_string(),
            "Kernel file not found: /nonexistent/vmlinux"
        );
        config.kernel = PathBuf::new();
        assert!(matches!(config.validate(host), Err(ConfigError::NoKernel)));
    }

    /// The file is flat, as the daemon has always written it: `kernel: ""` for the default
    /// guest image, memory in MiB, supervision fields beside the machine's.
    #[test]
    fn the_file_is_one_flat_object_split_in_two() {
        let mut config = VmConfig::default();
        config.machine.cpus = 2;
        config.machine.memory = mib(512);
        config.machine.disks.push("/d.img,ro".parse().unwrap());
        config.machine.console = ConsoleConfig::None;
        config.machine.append.push("quiet".into());
        config.supervision = Supervision {
            api_socket: Some("/run/api.sock".into()),
            console_socket: Some("/run/console.sock".into()),
            console_log: Some(ConsoleLogConfig {
                path: "/var/console.log".into(),
                limit: 4096,
            }),
            exit_file: Some("/var/exit.json".into()),
        };
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["kernel"], "");
        assert_eq!(json["memory"], 512);
        assert_eq!(json["console"], "none");
        assert_eq!(json["console_log"]["limit"], 4096);
        assert_eq!(json["api_socket"], "/run/api.sock");
        let keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in Supervision::FIELDS {
            assert!(keys.contains(&field), "{field} missing from {keys:?}");
        }
        assert_eq!(serde_json::from_value::<VmConfig>(json).unwrap(), config);
    }

    #[test]
    fn supervision_fields_are_exactly_the_supervision_struct() {
        let full = Supervision {
            api_socket: Some("a".into()),
            console_socket: Some("b".into()),
            console_log: Some(ConsoleLogConfig {
                path: "c".into(),
                limit: 1,
            }),
            exit_file: Some("d".into()),
        };
        let json = serde_json::to_value(full).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut fields = Supervision::FIELDS.to_vec();
        fields.sort_unstable();
        assert_eq!(keys, fields);
    }

    #[test]
    fn unknown_fields_are_refused_in_either_part() {
        let parse = |text: &str| serde_json::from_str::<VmConfig>(text);
        let config = parse(r#"{"kernel": "/k", "memory": 512, "engine": "emulator"}"#).unwrap();
        assert_eq!(config.machine.memory, mib(512));
        assert_eq!(config.machine.engine, EngineChoice::Emulator);
        assert_eq!(config.supervision, Supervision::default());
        let config = parse(r#"{"kernel": "/k", "exit_file": "/e"}"#).unwrap();
        assert_eq!(config.supervision.exit_file, Some("/e".into()));
        for bad in [
            r#"{"kernel": "/k", "memroy": 1}"#,
            r#"{"kernel": "/k", "engine": "x"}"#,
            r#"{"kernel": "/k", "console_log": {"path": "/l", "size": 1}}"#,
            r#"[1]"#,
        ] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn cmdline_is_default_plus_appended_args() {
        let mut config = MachineConfig::new("/k");
        config.append = vec!["quiet".into(), String::new(), "guest.cmd=true".into()];
        assert_eq!(
            config.base_cmdline(),
            format!("{DEFAULT_CMDLINE} quiet guest.cmd=true")
        );
        config.cmdline = Some("console=ttyS0".into());
        assert_eq!(config.base_cmdline(), "console=ttyS0 quiet guest.cmd=true");
    }

    #[test]
    fn a_root_disk_mounts_the_first_disk_read_write() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        let disk = dir.path().join("root.ext4");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&disk, b"d").unwrap();
        let mut config = MachineConfig::new(&kernel);
        config.root_disk = true;
        assert!(matches!(
            config.validate(None),
            Err(ConfigError::NoRootDisk)
        ));
        config.disks.push(DiskConfig {
            path: disk.clone(),
            read_only: true,
        });
        assert!(matches!(
            config.validate(None),
            Err(ConfigError::ReadOnlyRootDisk(_))
        ));
        config.disks[0].read_only = false;
        config.validate(None).unwrap();
        config.append = vec!["quiet".into()];
        assert_eq!(
            config.base_cmdline(),
            format!("{DEFAULT_CMDLINE} root=/dev/vda rw quiet")
        );
        // Only set in the file when true.
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["root_disk"], true);
        config.root_disk = false;
        assert!(serde_json::to_value(&config)
            .unwrap()
            .get("root_disk")
            .is_none());
    }
}
