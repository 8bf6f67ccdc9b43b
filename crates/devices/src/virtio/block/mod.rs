//! virtio-blk backed by a raw image file.
//!
//! One request queue, served on the event loop thread with synchronous positioned I/O that
//! moves data straight between the file and guest memory. The image is opened with an advisory
//! lock (exclusive for read-write, shared for read-only) so that two VMs cannot write one image.

mod request;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{read_config_bytes, Activation, DeviceError, VirtioDevice, COMMON_FEATURES};
use request::{handle_chain, Disk, RequestLogs};

/// Bytes per sector, the unit of virtio-blk offsets and of the capacity.
pub const SECTOR_SIZE: u64 = 512;

/// One request queue, of at most 256 entries.
const QUEUE_MAX_SIZES: &[u16] = &[256];
/// Data buffers per request the driver may use (advertised as `seg_max`).
const SEGMENT_MAX: u32 = 128;
/// Length of the virtio-blk configuration space the device fills: capacity, size_max, seg_max,
/// geometry and blk_size.
const CONFIG_SPACE_SIZE: usize = 24;

/// What to attach as a virtio block device.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// The raw image (a regular file or a block device).
    pub path: PathBuf,
    /// Whether the guest may only read.
    pub read_only: bool,
    /// The serial number the guest reads with GET_ID (at most 20 bytes; may be empty).
    pub id: String,
}

/// Errors from opening a block device's image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("Failed to open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("Disk image {path} is in use by another process (locked)")]
    Locked { path: PathBuf },
    /// Taking the lock failed for another reason.
    #[error("Failed to lock disk image {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image's size could not be determined.
    #[error("Failed to get the size of disk image {path}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The id does not fit in the 20 bytes virtio-blk has for it.
    #[error("Disk id {id:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    IdTooLong { id: String },
}

/// A virtio block device.
pub struct VirtioBlock {
    disk: Disk,
    features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    active: Option<Activation>,
    logs: RequestLogs,
}

impl VirtioBlock {
    /// Opens and locks the image described by `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let BlockConfig {
            path,
            read_only,
            id,
        } = config;
        if id.len() > VIRTIO_BLK_ID_BYTES as usize {
            return Err(BlockError::IdTooLong { id });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        lock(&file, read_only).map_err(|source| {
            if source.kind() == std::io::ErrorKind::WouldBlock {
                BlockError::Locked { path: path.clone() }
            } else {
                BlockError::Lock {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        // A block device's metadata says 0 bytes; seeking to the end works for both.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "Disk image {} is {size} bytes, not a whole number of sectors: the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        let disk = Disk {
            file,
            read_only,
            capacity: size / SECTOR_SIZE,
            id: id_bytes,
        };
        Ok(Self::with_disk(disk))
    }

    /// A device serving `file` as it is: no lock taken, no id. For the fuzzing entry points.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_file(file: File, read_only: bool) -> std::io::Result<Self> {
        let size = (&file).seek(SeekFrom::End(0))?;
        Ok(Self::with_disk(Disk {
            file,
            read_only,
            capacity: size / SECTOR_SIZE,
            id: [0; VIRTIO_BLK_ID_BYTES as usize],
        }))
    }

    fn with_disk(disk: Disk) -> Self {
        let mut features = COMMON_FEATURES
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config_space = [0u8; CONFIG_SPACE_SIZE];
        config_space[0..8].copy_from_slice(&disk.capacity.to_le_bytes());
        // size_max (8..12) and geometry (16..20) stay zero: not offered.
        config_space[12..16].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        config_space[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Self {
            disk,
            features,
            config_space,
            active: None,
            logs: RequestLogs::default(),
        }
    }

    /// The disk's size in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with VIRTIO_BLK_F_CONFIG_WCE (not offered).
        if let Some(suppressed) = self.logs.guest.check() {
            tracing::warn!(
                suppressed,
                "virtio-blk: ignored a {}-byte config write at {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        self.active = Some(activation);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let active = self.active.as_mut().ok_or(DeviceError::NotActivated)?;
        let (disk, logs) = (&mut self.disk, &mut self.logs);
        active.process_queue(index, |chain, memory| {
            handle_chain(chain, memory, disk, logs)
        })
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

/// Takes an advisory lock on the whole image without waiting for it.
fn lock(file: &File, shared: bool) -> std::io::Result<()> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock only reads the descriptor number, which `file` keeps open for the call.
    let result = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests;
