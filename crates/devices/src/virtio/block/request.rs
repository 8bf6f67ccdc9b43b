//! Parsing, checking and executing one virtio-blk request.
//!
//! A request is a chain of: a 16-byte device-readable header (type, reserved, sector), data
//! buffers (device-readable for writes, device-writable for reads and GET_ID, none for
//! flushes) and a device-writable status buffer whose last byte receives the status. Linux
//! always frames requests this way; other framings are answered with VIRTIO_BLK_S_IOERR.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryError, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::{SECTOR_SIZE, SEGMENT_MAX};
use crate::logging::{error_chain, LogLimiter};
use crate::virtio::chain::{buffer_address, collect_chain, ChainError, CheckedChain};

/// Header, data buffers and status.
const MAX_DESCRIPTORS: usize = SEGMENT_MAX as usize + 2;
const HEADER_SIZE: u32 = 16;

/// The image a block device serves.
pub(super) struct Disk {
    pub file: File,
    pub read_only: bool,
    /// Size in sectors.
    pub capacity: u64,
    /// GET_ID answer, zero-padded.
    pub id: [u8; VIRTIO_BLK_ID_BYTES as usize],
}

/// Rate limits for the two kinds of trouble, so a guest's flood of bad requests cannot hide
/// a failing host disk.
#[derive(Default)]
pub(super) struct RequestLogs {
    pub guest: LogLimiter,
    pub host: LogLimiter,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// The chain itself is unusable.
    #[error("Malformed descriptor chain")]
    Chain(#[source] ChainError),
    /// No 16-byte device-readable header first.
    #[error("Request header is not a 16-byte device-readable buffer")]
    Header,
    /// A type this device does not implement.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// A read or write whose length is not a whole number of sectors.
    #[error("Data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    /// A read or write beyond the end of the disk.
    #[error("Sectors {sector}+{count} lie beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("Write to a read-only disk")]
    ReadOnly,
    /// A flush with data buffers.
    #[error("Flush request carries data buffers")]
    UnexpectedData,
    /// Reading the image into guest memory failed.
    #[error("Failed to read from the disk image")]
    Read(#[source] GuestMemoryError),
    /// Writing guest memory to the image failed.
    #[error("Failed to write to the disk image")]
    Write(#[source] GuestMemoryError),
    /// fdatasync failed.
    #[error("Failed to flush the disk image")]
    Flush(#[source] io::Error),
    /// Guest memory rejected an access the chain checks allowed (it should not happen).
    #[error("Failed to access guest memory")]
    Memory(#[source] GuestMemoryError),
}

impl RequestError {
    fn status(&self) -> u8 {
        let status = match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    /// Whether the host, not the guest, is to blame.
    fn is_host_failure(&self) -> bool {
        matches!(
            self,
            RequestError::Read(_) | RequestError::Write(_) | RequestError::Flush(_)
        )
    }
}

/// Executes the request in `chain` and returns the number of bytes written into its buffers
/// (0 when the chain is too broken to carry a status).
pub(super) fn handle_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    disk: &mut Disk,
    logs: &mut RequestLogs,
) -> u32 {
    let checked = match collect_chain(chain, MAX_DESCRIPTORS) {
        Ok(checked) => checked,
        Err(error) => {
            if let Some(suppressed) = logs.guest.check() {
                tracing::warn!(suppressed, "virtio-blk: dropped request: {error}");
            }
            return 0;
        }
    };
    let head = checked.head;
    let status = match checked.descriptors.split_last() {
        Some((status, _))
            if status.is_write_only()
                && status.len() > 0
                && checked.require_in_memory(memory, &[*status]).is_ok() =>
        {
            *status
        }
        _ => {
            if let Some(suppressed) = logs.guest.check() {
                tracing::warn!(
                    suppressed,
                    "virtio-blk: dropped request {head}: no device-writable status buffer in guest memory"
                );
            }
            return 0;
        }
    };
    let body = &checked.descriptors[..checked.descriptors.len() - 1];
    let outcome = Request::parse(&checked, body, memory, disk)
        .and_then(|request| request.execute(memory, disk));
    let (status_code, written) = match outcome {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(error) => {
            log_failure(logs, head, &error);
            (error.status(), 0)
        }
    };
    let status_address = buffer_address(&status, status.len() - 1);
    if let Err(error) = memory.write_obj(status_code, status_address) {
        if let Some(suppressed) = logs.guest.check() {
            tracing::warn!(
                suppressed,
                "virtio-blk: failed to write the status of request {head}: {error}"
            );
        }
        return written;
    }
    written.saturating_add(1)
}

enum RequestType {
    In,
    Out,
    Flush,
    GetId,
}

struct Request<'a> {
    kind: RequestType,
    /// Byte offset in the image (reads and writes).
    offset: u64,
    data: &'a [Descriptor],
}

impl<'a> Request<'a> {
    fn parse(
        chain: &CheckedChain,
        body: &'a [Descriptor],
        memory: &GuestMemoryMmap,
        disk: &Disk,
    ) -> Result<Self, RequestError> {
        chain
            .require_in_memory(memory, body)
            .map_err(RequestError::Chain)?;
        let (header, data) = body.split_first().ok_or(RequestError::Header)?;
        if header.is_write_only() || header.len() != HEADER_SIZE {
            return Err(RequestError::Header);
        }
        let mut bytes = [0u8; HEADER_SIZE as usize];
        memory
            .read_slice(&mut bytes, header.addr())
            .map_err(RequestError::Memory)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = bytes;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let direction = |writable| {
            chain
                .require_direction(data, writable)
                .map_err(RequestError::Chain)
        };
        let kind = match request_type {
            VIRTIO_BLK_T_IN => {
                direction(true)?;
                RequestType::In
            }
            VIRTIO_BLK_T_OUT => {
                if disk.read_only {
                    return Err(RequestError::ReadOnly);
                }
                direction(false)?;
                RequestType::Out
            }
            VIRTIO_BLK_T_FLUSH => {
                if !data.is_empty() {
                    return Err(RequestError::UnexpectedData);
                }
                RequestType::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                direction(true)?;
                RequestType::GetId
            }
            other => return Err(RequestError::Unsupported(other)),
        };
        let offset = match kind {
            RequestType::In | RequestType::Out => {
                let len = CheckedChain::total_len(data);
                if !len.is_multiple_of(SECTOR_SIZE) {
                    return Err(RequestError::Unaligned(len));
                }
                sector_offset(sector, len / SECTOR_SIZE, disk.capacity)?
            }
            RequestType::Flush | RequestType::GetId => 0,
        };
        Ok(Self { kind, offset, data })
    }

    fn execute(self, memory: &GuestMemoryMmap, disk: &mut Disk) -> Result<u32, RequestError> {
        let written = match self.kind {
            RequestType::In => {
                let mut file = FileAt::new(&disk.file, self.offset);
                for buffer in self.data.iter().filter(|d| d.len() > 0) {
                    memory
                        .read_exact_volatile_from(buffer.addr(), &mut file, buffer.len() as usize)
                        .map_err(RequestError::Read)?;
                }
                CheckedChain::total_len(self.data)
            }
            RequestType::Out => {
                let mut file = FileAt::new(&disk.file, self.offset);
                for buffer in self.data.iter().filter(|d| d.len() > 0) {
                    memory
                        .write_all_volatile_to(buffer.addr(), &mut file, buffer.len() as usize)
                        .map_err(RequestError::Write)?;
                }
                0
            }
            RequestType::Flush => {
                if !disk.read_only {
                    disk.file.sync_data().map_err(RequestError::Flush)?;
                }
                0
            }
            RequestType::GetId => {
                let mut remaining = &disk.id[..];
                let mut written = 0u64;
                for buffer in self.data {
                    let count = remaining.len().min(buffer.len() as usize);
                    let (now, later) = remaining.split_at(count);
                    memory
                        .write_slice(now, buffer.addr())
                        .map_err(RequestError::Memory)?;
                    written += count as u64;
                    remaining = later;
                }
                written
            }
        };
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }
}

fn log_failure(logs: &mut RequestLogs, head: u16, error: &RequestError) {
    let message = error_chain(error);
    if error.is_host_failure() {
        if let Some(suppressed) = logs.host.check() {
            tracing::error!(suppressed, "virtio-blk: request {head} failed: {message}");
        }
    } else if let Some(suppressed) = logs.guest.check() {
        tracing::warn!(suppressed, "virtio-blk: request {head} failed: {message}");
    }
}

/// The byte offset of `count` sectors from `sector`, if they all lie on the disk.
fn sector_offset(sector: u64, count: u64, capacity: u64) -> Result<u64, RequestError> {
    let out_of_range = RequestError::OutOfRange {
        sector,
        count,
        capacity,
    };
    match sector.checked_add(count) {
        Some(end) if end <= capacity => sector.checked_mul(SECTOR_SIZE).ok_or(out_of_range),
        _ => Err(out_of_range),
    }
}

/// A file accessed at an explicit offset (pread/pwrite) that moves forward with each access,
/// so guest memory can be read from or written to it without an intermediate buffer.
struct FileAt<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> FileAt<'a> {
    fn new(file: &'a File, offset: u64) -> Self {
        Self { file, offset }
    }

    fn offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::from(io::ErrorKind::InvalidInput)))
    }

    fn advance(&mut self, result: isize) -> Result<usize, VolatileMemoryError> {
        let count = usize::try_from(result)
            .map_err(|_| VolatileMemoryError::IOError(io::Error::last_os_error()))?;
        self.offset += count as u64;
        Ok(count)
    }
}

impl ReadVolatile for FileAt<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buffer: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buffer.ptr_guard_mut();
        // SAFETY: the guard keeps the slice's memory mapped, and a VolatileSlice is valid for
        // writes of its length; pread writes at most `buffer.len()` bytes there.
        let result = unsafe {
            libc::pread(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buffer.len(),
                offset,
            )
        };
        let count = self.advance(result)?;
        buffer.bitmap().mark_dirty(0, count);
        Ok(count)
    }
}

impl WriteVolatile for FileAt<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buffer: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.offset()?;
        let guard = buffer.ptr_guard();
        // SAFETY: the guard keeps the slice's memory mapped, and a VolatileSlice is valid for
        // reads of its length; pwrite reads at most `buffer.len()` bytes from there.
        let result = unsafe {
            libc::pwrite(
                self.file.as_raw_fd(),
                guard.as_ptr().cast(),
                buffer.len(),
                offset,
            )
        };
        self.advance(result)
    }
}
