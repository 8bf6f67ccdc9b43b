//! The exit record: why a VMM ended, left in a file for a supervisor that may not be its
//! parent.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// What the exit file says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// One line for people ("Guest reset", "Stopped: received SIGTERM", an error).
    pub reason: String,
    /// The VMM's process exit status.
    pub status: i32,
    #[serde(default)]
    pub boot_time_ms: Option<u64>,
}

impl ExitRecord {
    /// Writes the record atomically (temporary file, then rename) so a reader never sees half.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        std::fs::write(&temporary, json)?;
        std::fs::rename(&temporary, path)
    }

    /// Reads the record, if the VMM wrote a readable one.
    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exit.json");
        assert_eq!(ExitRecord::read(&path), None);
        let record = ExitRecord {
            reason: "Guest reset".into(),
            status: 0,
            boot_time_ms: Some(812),
        };
        record.write(&path).unwrap();
        assert_eq!(ExitRecord::read(&path), Some(record));
        assert!(!dir.path().join("exit.json.tmp").exists());
        std::fs::write(&path, "{").unwrap();
        assert_eq!(ExitRecord::read(&path), None);
    }
}
