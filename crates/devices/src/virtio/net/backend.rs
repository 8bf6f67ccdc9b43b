//! Where a virtio-net device's frames go: a tap device, or a stream socket speaking QEMU's
//! length-prefixed protocol (what `passt` serves).
//!
//! Every frame crosses this boundary with a 12-byte `virtio_net_hdr_v1` in front: the tap
//! reads and writes one itself (`IFF_VNET_HDR`); for a stream socket the backend adds a zeroed
//! header on receive and drops it on send (that peer supports no offloads).

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;

/// Bytes of the `virtio_net_hdr_v1` in front of every frame (with VIRTIO_F_VERSION_1).
pub const VNET_HEADER_SIZE: usize = 12;
/// The largest frame a backend carries: a 64 KiB GSO packet plus its Ethernet header.
pub const MAX_FRAME_SIZE: usize = 65_535 + 14;

/// `TUN_F_*`: the offloads the reader of a tap accepts (`TUNSETOFFLOAD`).
pub mod offload {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
}

/// A network backend, polled by the device on the event loop.
pub trait NetBackend: Send {
    /// The descriptor to watch for readability (edge-triggered: read until `WouldBlock`).
    fn as_raw_fd(&self) -> RawFd;

    /// Reads one frame, header first, into `buffer` (at least
    /// `VNET_HEADER_SIZE + MAX_FRAME_SIZE` bytes); returns its length. `WouldBlock` when none
    /// is waiting; any other error means the backend is gone.
    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize>;

    /// Sends one frame, header first. `WouldBlock` drops it (a full queue, like a busy wire).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;

    /// Whether the backend understands checksum and segmentation offloads in the header.
    fn supports_offloads(&self) -> bool;

    /// Tells the backend which offloads (`offload::*`) the guest accepts on receive.
    fn set_offloads(&mut self, flags: u32) -> io::Result<()>;
}

/// Errors opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("Cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    #[error("Cannot attach to tap {name}")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("Tap name {0:?} is empty or longer than 15 bytes")]
    TapName(String),
    #[error("Cannot set up the tap's virtio-net header")]
    VnetHeader(#[source] io::Error),
    #[error("Descriptor {0} is not an open tap or socket")]
    BadDescriptor(RawFd),
    #[error("Cannot make the backend non-blocking")]
    NonBlocking(#[source] io::Error),
}

// From <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: a name and flags.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _padding: [u8; 22],
}

/// A tap device with `IFF_VNET_HDR`.
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if the caller may) the tap `name`.
    pub fn open(name: &str) -> Result<Tap, BackendError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(BackendError::TapName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(BackendError::OpenTun)?;
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _padding: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `request` is, on our tun fd.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if result < 0 {
            return Err(BackendError::Attach {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        Self::finish(file, name.to_owned())
    }

    /// Takes over a tap opened by someone else (the daemon, which has the privileges), which
    /// must have `IFF_VNET_HDR`.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, BackendError> {
        let raw = fd.as_raw_fd();
        let file = File::from(fd);
        let mut request = InterfaceRequest {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _padding: [0; 22],
        };
        // SAFETY: TUNGETIFF writes an ifreq, which `request` is.
        let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut request) };
        if result < 0 || request.flags & IFF_VNET_HDR == 0 || request.flags & IFF_TAP == 0 {
            return Err(BackendError::BadDescriptor(raw));
        }
        let end = request.name.iter().position(|&b| b == 0).unwrap_or(0);
        let name = String::from_utf8_lossy(&request.name[..end]).into_owned();
        set_nonblocking(file.as_raw_fd())?;
        Self::finish(file, name)
    }

    fn finish(file: File, name: String) -> Result<Tap, BackendError> {
        let size = VNET_HEADER_SIZE as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(BackendError::VnetHeader(io::Error::last_os_error()));
        }
        let mut tap = Tap { file, name };
        // No offloads towards the guest until it acknowledges them.
        tap.set_offloads(0).map_err(BackendError::VnetHeader)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tap's descriptor, for handing to another process.
    pub fn into_fd(self) -> OwnedFd {
        self.file.into()
    }
}

impl NetBackend for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        self.file.read(buffer)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let written = self.file.write(frame)?;
        if written != frame.len() {
            return Err(io::Error::new(ErrorKind::WriteZero, "short write to tap"));
        }
        Ok(())
    }

    fn supports_offloads(&self) -> bool {
        true
    }

    fn set_offloads(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let result = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A stream socket carrying frames as a 4-byte big-endian length and the frame (QEMU's
/// `-netdev stream` and passt's protocol).
pub struct StreamBackend {
    socket: UnixStream,
    /// Bytes received but not yet returned as frames.
    pending: Vec<u8>,
}

impl StreamBackend {
    /// Uses a connected stream socket.
    pub fn new(socket: UnixStream) -> Result<StreamBackend, BackendError> {
        socket
            .set_nonblocking(true)
            .map_err(BackendError::NonBlocking)?;
        Ok(StreamBackend {
            socket,
            pending: Vec::new(),
        })
    }

    /// A complete frame at the start of `pending`, if one has arrived: its length.
    fn complete_frame(&self) -> Option<usize> {
        let length = u32::from_be_bytes(self.pending.get(..4)?.try_into().ok()?) as usize;
        (self.pending.len() >= 4 + length).then_some(length)
    }
}

impl NetBackend for StreamBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn receive(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(length) = self.complete_frame() {
                if length > MAX_FRAME_SIZE || length + VNET_HEADER_SIZE > buffer.len() {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!("peer sent a {length}-byte frame"),
                    ));
                }
                buffer[..VNET_HEADER_SIZE].fill(0);
                buffer[VNET_HEADER_SIZE..VNET_HEADER_SIZE + length]
                    .copy_from_slice(&self.pending[4..4 + length]);
                self.pending.drain(..4 + length);
                return Ok(VNET_HEADER_SIZE + length);
            }
            if self.pending.len() >= 4 {
                let length = u32::from_be_bytes(self.pending[..4].try_into().unwrap()) as usize;
                if length > MAX_FRAME_SIZE {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        format!("peer announced a {length}-byte frame"),
                    ));
                }
            }
            let mut chunk = [0u8; 65536];
            match self.socket.read(&mut chunk) {
                Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "peer closed")),
                Ok(count) => self.pending.extend_from_slice(&chunk[..count]),
                Err(error) => return Err(error),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let payload = &frame[VNET_HEADER_SIZE.min(frame.len())..];
        let mut message = Vec::with_capacity(4 + payload.len());
        message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        message.extend_from_slice(payload);
        // A frame is written whole or not at all: a partial write would corrupt the stream.
        // The socket buffer holds many frames, so waiting briefly for room is rare.
        let mut written = 0;
        let mut waited = 0;
        while written < message.len() {
            match self.socket.write(&message[written..]) {
                Ok(count) => written += count,
                Err(error) if error.kind() == ErrorKind::WouldBlock && written == 0 => {
                    return Err(error)
                }
                Err(error) if error.kind() == ErrorKind::WouldBlock && waited < 1000 => {
                    waited += 1;
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    fn supports_offloads(&self) -> bool {
        false
    }

    fn set_offloads(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
}

/// Takes ownership of descriptor `fd` handed over by a supervisor.
///
/// # Safety
/// `fd` must be an open descriptor that nothing else owns or closes.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the caller guarantees `fd` is open and ours alone.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_nonblocking(fd: RawFd) -> Result<(), BackendError> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(BackendError::NonBlocking(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_frames_are_length_prefixed_both_ways() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut backend = StreamBackend::new(ours).unwrap();
        let mut frame = vec![0u8; VNET_HEADER_SIZE];
        frame.extend_from_slice(b"0123456789abcdef");
        backend.send(&frame).unwrap();
        let mut wire = [0u8; 20];
        theirs.read_exact(&mut wire).unwrap();
        assert_eq!(&wire[..4], &16u32.to_be_bytes());
        assert_eq!(&wire[4..], b"0123456789abcdef");

        // Two frames, the second split across writes.
        theirs.write_all(&3u32.to_be_bytes()).unwrap();
        theirs.write_all(b"abc").unwrap();
        theirs.write_all(&[0, 0, 0, 2, b'x']).unwrap();
        let mut buffer = vec![0u8; VNET_HEADER_SIZE + MAX_FRAME_SIZE];
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(backend.receive(&mut buffer).unwrap(), VNET_HEADER_SIZE + 3);
        assert_eq!(&buffer[VNET_HEADER_SIZE..VNET_HEADER_SIZE + 3], b"abc");
        let error = backend.receive(&mut buffer).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::WouldBlock);
        theirs.write_all(b"y").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(backend.receive(&mut buffer).unwrap(), VNET_HEADER_SIZE + 2);
        assert_eq!(&buffer[VNET_HEADER_SIZE..VNET_HEADER_SIZE + 2], b"xy");
    }

    #[test]
    fn stream_peers_announcing_huge_frames_are_refused() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut backend = StreamBackend::new(ours).unwrap();
        theirs.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let mut buffer = vec![0u8; VNET_HEADER_SIZE + MAX_FRAME_SIZE];
        std::thread::sleep(std::time::Duration::from_millis(20));
        let error = backend.receive(&mut buffer).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_frame() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut backend = StreamBackend::new(ours).unwrap();
        drop(theirs);
        let mut buffer = vec![0u8; VNET_HEADER_SIZE + MAX_FRAME_SIZE];
        let error = backend.receive(&mut buffer).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::UnexpectedEof);
    }

    #[test]
    fn tap_names_are_checked_before_anything_opens() {
        assert!(matches!(Tap::open(""), Err(BackendError::TapName(_))));
        assert!(matches!(
            Tap::open("a-name-longer-than-15"),
            Err(BackendError::TapName(_))
        ));
    }

    #[test]
    fn a_tap_opened_as_root_carries_frames_with_headers() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            println!("SKIP a_tap_opened_as_root_carries_frames_with_headers: needs root and /dev/net/tun");
            return;
        }
        let name = format!("lodgetest{}", std::process::id() % 100_000);
        let mut tap = Tap::open(&name).unwrap();
        assert_eq!(tap.name(), name);
        tap.set_offloads(offload::CSUM | offload::TSO4).unwrap();
        // Nothing arrives on a tap that is down.
        let mut buffer = vec![0u8; VNET_HEADER_SIZE + MAX_FRAME_SIZE];
        assert_eq!(
            tap.receive(&mut buffer).unwrap_err().kind(),
            ErrorKind::WouldBlock
        );
        // A duplicate of its descriptor is accepted as a handed-over tap.
        // SAFETY: dup returns a new descriptor we own.
        let duplicate = unsafe { libc::dup(tap.as_raw_fd()) };
        // SAFETY: `duplicate` is open and owned by nobody else.
        let adopted = Tap::from_fd(unsafe { adopt_fd(duplicate) }).unwrap();
        assert_eq!(adopted.name(), name);
    }
}
