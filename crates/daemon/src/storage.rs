//! Raw disk images: blank sparse files and sparse-aware imports.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of a sector; image sizes are multiples of it.
pub const SECTOR: u64 = 512;
/// Bytes copied per read during an import.
const CHUNK: usize = 1 << 20;

/// Errors from image files.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("Size {0} is not a positive multiple of {SECTOR} bytes")]
    InvalidSize(u64),
    #[error("Image file {0} already exists")]
    Exists(String),
    #[error("Cannot read source image {path}")]
    Source {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Source {0} is not a regular file or block device")]
    NotAFile(String),
    #[error(
        "Source {0} is a qcow2 image; convert it first: qemu-img convert -O raw SOURCE OUT.raw"
    )]
    Qcow2(String),
    #[error("Cannot write image {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Creates a blank raw image of `size` bytes that allocates nothing until written.
pub fn create_sparse(path: &Path, size: u64) -> Result<(), StorageError> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(StorageError::InvalidSize(size));
    }
    let file = create_new(path)?;
    file.set_len(size)
        .map_err(|source| write_error(path, source))?;
    file.sync_all().map_err(|source| write_error(path, source))
}

/// Checks an import source and returns its size.
pub fn inspect_source(source: &Path) -> Result<u64, StorageError> {
    let read_error = |error| StorageError::Source {
        path: source.display().to_string(),
        source: error,
    };
    // Checked before opening: opening a FIFO would block until a writer comes.
    let metadata = std::fs::metadata(source).map_err(read_error)?;
    let file_type = metadata.file_type();
    let is_block_device = std::os::unix::fs::FileTypeExt::is_block_device(&file_type);
    if !file_type.is_file() && !is_block_device {
        return Err(StorageError::NotAFile(source.display().to_string()));
    }
    let mut file = File::open(source).map_err(read_error)?;
    let size = if is_block_device {
        let end = file.seek(SeekFrom::End(0)).map_err(read_error)?;
        file.seek(SeekFrom::Start(0)).map_err(read_error)?;
        end
    } else {
        metadata.len()
    };
    let mut magic = [0u8; 4];
    if file.read_exact(&mut magic).is_ok() && &magic == b"QFI\xfb" {
        return Err(StorageError::Qcow2(source.display().to_string()));
    }
    Ok(size)
}

/// Copies `source` to a new image at `target`, keeping holes: only data regions of the
/// source are read (SEEK_DATA/SEEK_HOLE), and zero-filled chunks are skipped, so a sparse
/// image stays sparse. `copied` counts the bytes done (holes included). Returns the size,
/// rounded up to a whole sector.
pub fn import(source: &Path, target: &Path, copied: &AtomicU64) -> Result<u64, StorageError> {
    let read_error = |error| StorageError::Source {
        path: source.display().to_string(),
        source: error,
    };
    let size = inspect_source(source)?;
    let mut input = File::open(source).map_err(read_error)?;
    let mut output = create_new(target)?;
    let write = |error| write_error(target, error);
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let (data_start, data_end) = match data_region(&input, offset, size) {
            Some(region) => region,
            None => break,
        };
        copied.store(data_start, Ordering::Relaxed);
        input
            .seek(SeekFrom::Start(data_start))
            .map_err(read_error)?;
        let mut position = data_start;
        while position < data_end {
            let want = ((data_end - position) as usize).min(CHUNK);
            let chunk = &mut buffer[..want];
            input.read_exact(chunk).map_err(read_error)?;
            if chunk.iter().any(|&b| b != 0) {
                output.seek(SeekFrom::Start(position)).map_err(write)?;
                output.write_all(chunk).map_err(write)?;
            }
            position += want as u64;
            copied.store(position, Ordering::Relaxed);
        }
        offset = data_end;
    }
    let rounded = size.div_ceil(SECTOR) * SECTOR;
    output.set_len(rounded).map_err(write)?;
    output.sync_all().map_err(write)?;
    copied.store(size, Ordering::Relaxed);
    Ok(rounded)
}

/// Host storage an image uses.
pub fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The next data region at or after `offset`, or None when only a hole is left. Files
/// systems without SEEK_DATA report the whole rest as data.
fn data_region(file: &File, offset: u64, size: u64) -> Option<(u64, u64)> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a file descriptor this function borrows; it only moves the offset.
    let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error();
        // ENXIO: no data after offset.
        return if errno == Some(libc::ENXIO) {
            None
        } else {
            Some((offset, size))
        };
    }
    let start = start as u64;
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
    let end = if end < 0 {
        size
    } else {
        (end as u64).min(size)
    };
    (start < size).then_some((start, end))
}

fn create_new(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                StorageError::Exists(path.display().to_string())
            } else {
                write_error(path, source)
            }
        })
}

fn write_error(path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Write {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_images_are_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.raw");
        create_sparse(&path, 1 << 30).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);
        assert!(allocated_bytes(&path) < 1 << 20);
        assert!(matches!(
            create_sparse(&path, 1 << 20),
            Err(StorageError::Exists(_))
        ));
        assert!(matches!(
            create_sparse(&dir.path().join("b"), 1000),
            Err(StorageError::InvalidSize(1000))
        ));
    }

    #[test]
    fn import_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.raw");
        let mut file = File::create(&source).unwrap();
        file.set_len(64 << 20).unwrap();
        file.seek(SeekFrom::Start(3 << 20)).unwrap();
        file.write_all(b"hello").unwrap();
        file.seek(SeekFrom::Start((64 << 20) - 5)).unwrap();
        file.write_all(b"tail!").unwrap();
        drop(file);

        let target = dir.path().join("dst.raw");
        let copied = AtomicU64::new(0);
        assert_eq!(import(&source, &target, &copied).unwrap(), 64 << 20);
        assert_eq!(copied.load(Ordering::Relaxed), 64 << 20);
        assert_eq!(
            std::fs::read(&source).unwrap(),
            std::fs::read(&target).unwrap()
        );
        assert!(allocated_bytes(&target) < 8 << 20, "import filled holes");
    }

    #[test]
    fn import_refuses_qcow2_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let qcow = dir.path().join("a.qcow2");
        std::fs::write(&qcow, b"QFI\xfb\0\0\0\x03").unwrap();
        let copied = AtomicU64::new(0);
        assert!(matches!(
            import(&qcow, &dir.path().join("x"), &copied),
            Err(StorageError::Qcow2(_))
        ));
        assert!(matches!(
            import(dir.path(), &dir.path().join("y"), &copied),
            Err(StorageError::NotAFile(_))
        ));
        assert!(matches!(
            import(&dir.path().join("missing"), &dir.path().join("z"), &copied),
            Err(StorageError::Source { .. })
        ));
    }
}
