//! Disk images in the storage directory.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{lock, Inventory, InventoryError, Result};
use crate::db::{rfc3339, DbError, DiskRecord};
use crate::model::{CreateDisk, Disk, DiskState, ImportProgress};
use crate::storage;

impl Inventory {
    pub fn list_disks(&self) -> Result<Vec<Disk>> {
        let records = self.db().disks()?;
        Ok(records.iter().map(|record| self.to_disk(record)).collect())
    }

    pub fn disk(&self, name: &str) -> Result<Disk> {
        Ok(self.to_disk(&self.disk_record(name)?))
    }

    /// Creates a blank sparse image or starts an import (the disk is `importing` until
    /// the copy is done).
    pub fn create_disk(self: &Arc<Self>, request: CreateDisk) -> Result<Disk> {
        crate::model::validate_name(&request.name).map_err(InventoryError::Invalid)?;
        match (request.size_bytes, request.source) {
            (Some(size), None) => self.create_blank_disk(&request.name, size),
            (None, Some(source)) => self.import_disk(&request.name, &source),
            _ => Err(InventoryError::Invalid(
                "Give either size_bytes (a blank disk) or source (an import)".to_owned(),
            )),
        }
    }

    fn create_blank_disk(&self, name: &str, size: u64) -> Result<Disk> {
        if size == 0 || !size.is_multiple_of(storage::SECTOR) {
            return Err(storage::StorageError::InvalidSize(size).into());
        }
        let path = self.paths.image(name);
        // The row claims the name first, so concurrent creates cannot share a file.
        let record = self.insert_disk(name, &path, size, DiskState::Ready)?;
        if let Err(e) = storage::create_sparse(&path, size) {
            let _ = self.db().delete_disk(record.id);
            return Err(e.into());
        }
        self.disk(name)
    }

    fn import_disk(self: &Arc<Self>, name: &str, source: &str) -> Result<Disk> {
        let source = PathBuf::from(source);
        if !source.is_absolute() {
            return Err(InventoryError::Invalid(format!(
                "Source path {} is not absolute",
                source.display()
            )));
        }
        let size = storage::inspect_source(&source)?;
        if size == 0 {
            return Err(storage::StorageError::InvalidSize(0).into());
        }
        let target = self.paths.image(name);
        let record = self.insert_disk(name, &target, size, DiskState::Importing)?;
        let copied = Arc::new(AtomicU64::new(0));
        lock(&self.imports).insert(record.id, copied.clone());
        let inventory = self.clone();
        tokio::task::spawn_blocking(move || {
            let result = storage::import(&source, &target, &copied);
            let db = inventory.db();
            let outcome = match &result {
                Ok(size) => db.set_disk_state(record.id, DiskState::Ready, *size, None),
                Err(e) => {
                    let _ = std::fs::remove_file(&target);
                    let message = super::lifecycle::error_chain(e);
                    tracing::warn!(disk = record.name, "Import failed: {message}");
                    db.set_disk_state(record.id, DiskState::Failed, size, Some(&message))
                }
            };
            drop(db);
            if let Err(e) = outcome {
                tracing::error!(disk = record.name, "Cannot record the import: {e}");
            }
            lock(&inventory.imports).remove(&record.id);
        });
        self.disk(name)
    }

    /// Creates the disk `name` from the distribution image `image`: the VMM binary builds the
    /// image (or takes it from its cache) and writes a private copy as the disk's file
    /// (`<vmm_binary> image create IMAGE --output PATH`). The disk is `importing` until then,
    /// `failed` with the builder's last words if it fails.
    pub(super) fn build_image_disk(self: &Arc<Self>, name: &str, image: &str) -> Result<Disk> {
        crate::model::validate_name(name).map_err(InventoryError::Invalid)?;
        let target = self.paths.image(name);
        let record = self.insert_disk(name, &target, 0, DiskState::Importing)?;
        let inventory = self.clone();
        let program = self.config().vmm_binary.clone();
        let image = image.to_owned();
        tracing::info!(disk = name, image, "Building the disk from an image");
        tokio::task::spawn_blocking(move || {
            let db_result = match build_image(&program, &image, &target) {
                Ok(size) => {
                    tracing::info!(disk = record.name, size, "Image disk ready");
                    inventory
                        .db()
                        .set_disk_state(record.id, DiskState::Ready, size, None)
                }
                Err(message) => {
                    let _ = std::fs::remove_file(&target);
                    tracing::warn!(disk = record.name, "Image build failed: {message}");
                    inventory
                        .db()
                        .set_disk_state(record.id, DiskState::Failed, 0, Some(&message))
                }
            };
            if let Err(e) = db_result {
                tracing::error!(disk = record.name, "Cannot record the image build: {e}");
            }
        });
        self.disk(name)
    }

    /// Deletes a disk and its image; refused while a VM has it attached or it is being
    /// imported.
    pub fn delete_disk(&self, name: &str) -> Result<()> {
        let record = self.disk_record(name)?;
        if record.state == DiskState::Importing {
            return Err(InventoryError::DiskNotReady {
                disk: record.name,
                state: "importing",
            });
        }
        if !record.attached_to.is_empty() {
            return Err(in_use(&record.name, &record.attached_to));
        }
        match self.db().delete_disk(record.id) {
            Ok(()) => {}
            // Attached between the check and the delete.
            Err(DbError::Sqlite(e)) if is_foreign_key_violation(&e) => {
                return Err(in_use(&record.name, &["another VM".to_owned()]))
            }
            Err(e) => return Err(e.into()),
        }
        match std::fs::remove_file(&record.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(InventoryError::Io {
                path: record.path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Marks imports that a daemon restart cut short as failed.
    pub(super) fn fail_interrupted_imports(&self) -> Result<usize> {
        let db = self.db();
        let mut count = 0;
        for disk in db.disks()? {
            if disk.state == DiskState::Importing {
                let _ = std::fs::remove_file(&disk.path);
                db.set_disk_state(
                    disk.id,
                    DiskState::Failed,
                    disk.size_bytes,
                    Some("The import was interrupted by a daemon restart"),
                )?;
                count += 1;
            }
        }
        Ok(count)
    }

    fn insert_disk(
        &self,
        name: &str,
        path: &Path,
        size: u64,
        state: DiskState,
    ) -> Result<DiskRecord> {
        self.db()
            .insert_disk(name, &path.display().to_string(), size, state)
            .map_err(|e| match e {
                DbError::NameTaken(name) => InventoryError::NameTaken { kind: "disk", name },
                other => other.into(),
            })
    }

    fn disk_record(&self, name: &str) -> Result<DiskRecord> {
        self.db()
            .disk(name)?
            .ok_or_else(|| InventoryError::DiskNotFound(name.to_owned()))
    }

    fn to_disk(&self, record: &DiskRecord) -> Disk {
        let copied = lock(&self.imports).get(&record.id).cloned();
        Disk {
            name: record.name.clone(),
            state: record.state,
            path: record.path.clone(),
            size_bytes: record.size_bytes,
            allocated_bytes: storage::allocated_bytes(Path::new(&record.path)),
            created_at: rfc3339(record.created_at),
            attached_to: record.attached_to.clone(),
            import_progress: copied.map(|copied| ImportProgress {
                copied_bytes: copied.load(Ordering::Relaxed),
                total_bytes: record.size_bytes,
            }),
            error: record.error.clone(),
        }
    }
}

/// Runs `<program> image create IMAGE --output TARGET`; returns the image's size, or the end
/// of the builder's messages.
fn build_image(program: &Path, image: &str, target: &Path) -> std::result::Result<u64, String> {
    let output = std::process::Command::new(program)
        .args(["image", "create", image, "--output"])
        .arg(target)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("Cannot run {}: {e}", program.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        return Err(format!(
            "The image build failed ({}): {tail}",
            output.status
        ));
    }
    std::fs::metadata(target)
        .map(|m| m.len())
        .map_err(|e| format!("The image build left no file at {}: {e}", target.display()))
}

fn in_use(disk: &str, vms: &[String]) -> InventoryError {
    InventoryError::DiskInUse {
        disk: disk.to_owned(),
        vms: format!("VM(s) {}; detach it first", vms.join(", ")),
    }
}

fn is_foreign_key_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _)
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY
    )
}
