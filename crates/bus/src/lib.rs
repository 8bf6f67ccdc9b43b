//! The seam between CPU engines and devices.
//!
//! A vCPU (of any engine) turns a guest port or MMIO access that is not RAM into a call on an
//! [`IoBus`]; a device raises an interrupt through an [`InterruptLine`] without knowing which
//! engine delivers it (an irqfd for KVM, a direct call into the software engine's PIC).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vmm_sys_util::eventfd::EventFd;

/// A device reachable through a [`Bus`].
///
/// `offset` is relative to the base of the range the device was inserted at; `data.len()` is the
/// access size (1, 2, 4 or 8 bytes for guest instructions). Devices must tolerate any offset and
/// size inside their range: the guest chooses both.
pub trait BusDevice: Send {
    /// Fills `data` with the value read at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it (the event loop, for example).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("Range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    /// A range of length zero or one that wraps around the address space.
    #[error("Invalid range {base:#x}+{len:#x}")]
    InvalidRange { base: u64, len: u64 },
}

/// An address space (port I/O or MMIO) populated with devices at non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, BusEntry>>,
}

#[derive(Clone)]
struct BusEntry {
    len: u64,
    device: SharedDevice,
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = match base.checked_add(len) {
            Some(end) if len > 0 => end,
            _ => return Err(BusError::InvalidRange { base, len }),
        };
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let previous_overlaps = devices
            .range(..end)
            .next_back()
            .is_some_and(|(start, entry)| start + entry.len > base);
        if previous_overlaps {
            return Err(BusError::Overlap { base, len });
        }
        devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// Reads `data.len()` bytes at `addr`. Returns false (and leaves `data` alone) when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `addr`. Returns false when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }

    /// Whether any device covers `addr`.
    pub fn contains(&self, addr: u64) -> bool {
        self.resolve(addr, 1).is_some()
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        (end <= entry.len).then(|| (offset, entry.device.clone()))
    }
}

/// The two buses every vCPU sees, and the requests devices make of the whole machine.
#[derive(Default)]
pub struct IoBus {
    /// x86 port I/O (`in`/`out`).
    pub pio: Bus,
    /// Memory-mapped I/O: guest-physical addresses that are not RAM.
    pub mmio: Bus,
    /// Raised by a device during an access (the i8042's reset line, say). Every engine checks
    /// it after each access it forwards and ends the vCPU's run there, so no instruction after
    /// the one that asked runs.
    pub requests: Arc<MachineRequests>,
}

/// Something a device asks of the whole machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineRequest {
    Reset,
    PowerOff,
}

/// The first [`MachineRequest`] raised; it stays raised (the machine ends).
#[derive(Debug, Default)]
pub struct MachineRequests(AtomicU8);

impl MachineRequests {
    /// Raises `request` unless another one was raised first.
    pub fn raise(&self, request: MachineRequest) {
        let code = match request {
            MachineRequest::Reset => 1,
            MachineRequest::PowerOff => 2,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The request raised, if any.
    #[inline]
    pub fn pending(&self) -> Option<MachineRequest> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            1 => Some(MachineRequest::Reset),
            _ => Some(MachineRequest::PowerOff),
        }
    }
}

impl IoBus {
    /// Creates two empty buses.
    pub fn new() -> Self {
        Self::default()
    }

    /// Port read. Unclaimed ports read as all ones, as on an ISA bus with nothing decoding them.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }

    /// Port write. Writes to unclaimed ports are dropped.
    pub fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    /// MMIO read. Unclaimed addresses read as all ones.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }

    /// MMIO write. Writes to unclaimed addresses are dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

/// Errors from raising an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// Signalling the irqfd failed.
    #[error("Failed to signal the interrupt eventfd")]
    Signal(#[source] std::io::Error),
}

/// A device's interrupt output. Every line is edge-triggered: `trigger` delivers one interrupt.
pub trait InterruptLine: Send + Sync {
    /// Raises one interrupt.
    fn trigger(&self) -> Result<(), InterruptError>;
}

/// An interrupt line backed by an eventfd (a KVM irqfd, or anything polling the fd).
pub struct EventFdInterrupt {
    event: EventFd,
}

impl EventFdInterrupt {
    /// Wraps `event`; each trigger adds one to its counter.
    pub fn new(event: EventFd) -> Self {
        Self { event }
    }

    /// The underlying eventfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl InterruptLine for EventFdInterrupt {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.event.write(1).map_err(InterruptError::Signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder { last_write: None }))
    }

    #[test]
    fn dispatches_with_offsets() {
        let bus = Bus::new();
        let device = recorder();
        bus.insert(device.clone(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x104, &mut data));
        assert_eq!(data, [4, 4]);
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(device.lock().unwrap().last_write, Some((0xe, vec![1, 2])));
    }

    #[test]
    fn rejects_accesses_crossing_the_end() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x10e, &mut data));
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.write(u64::MAX, &[0; 4]));
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert!(bus.insert(recorder(), 0x10f, 1).is_err());
        assert!(bus.insert(recorder(), 0xf0, 0x11).is_err());
        assert!(bus.insert(recorder(), 0x0, 0x1000).is_err());
        assert!(bus.insert(recorder(), 0x110, 0x10).is_ok());
        assert!(bus.insert(recorder(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert!(bus.insert(recorder(), 0x1000, 0).is_err());
    }

    #[test]
    fn unclaimed_io_reads_all_ones() {
        let io = IoBus::new();
        let mut data = [0u8; 4];
        io.pio_read(0x80, &mut data);
        assert_eq!(data, [0xff; 4]);
        io.mmio_read(0xd000_0000, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn eventfd_interrupt_counts_triggers() {
        let line = EventFdInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.event().read().unwrap(), 2);
    }

    #[test]
    fn the_first_machine_request_wins_and_stays() {
        let requests = MachineRequests::default();
        assert_eq!(requests.pending(), None);
        requests.raise(MachineRequest::Reset);
        requests.raise(MachineRequest::PowerOff);
        assert_eq!(requests.pending(), Some(MachineRequest::Reset));
        assert_eq!(requests.pending(), Some(MachineRequest::Reset));
    }
}
