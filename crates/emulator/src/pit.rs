//! The 8254 programmable interval timer (ports 0x40-0x43) and system control port B (0x61),
//! driven by host monotonic time.
//!
//! Channel 0 drives IRQ 0 (modes 0, 2, 3 and 4, which Linux's i8253 clockevent uses for
//! periodic and one-shot ticks); channel 2's gate is port 0x61 bit 0 and its output is
//! readable in bit 5 (the kernel may calibrate against it). Channel 1 (DRAM refresh) counts
//! but drives nothing.

/// Input clock of the 8254, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Converts PIT ticks to nanoseconds.
fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000_000 / PIT_HZ as u128) as u64
}

/// Converts nanoseconds to PIT ticks.
fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * PIT_HZ as u128 / 1_000_000_000) as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Latch,
    Low,
    High,
    LowHigh,
}

#[derive(Debug, Clone)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// Count written by the guest (0 means 65536).
    reload: u32,
    /// When counting started (ns), if it has.
    start: Option<u64>,
    /// Count and output frozen while the gate is low (channel 2).
    frozen: Option<(u16, bool)>,
    gate: bool,
    latched: Option<u16>,
    status_latch: Option<u8>,
    read_high_next: bool,
    write_high_next: bool,
    write_low: u8,
    null_count: bool,
    /// The output before counting starts (after a control-word write).
    idle_output: bool,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            mode: 0,
            access: Access::LowHigh,
            bcd: false,
            reload: 0x10000,
            start: None,
            frozen: None,
            gate: true,
            latched: None,
            status_latch: None,
            read_high_next: false,
            write_high_next: false,
            write_low: 0,
            null_count: true,
            idle_output: false,
        }
    }
}

impl Channel {
    fn period(&self) -> u64 {
        u64::from(self.reload)
    }

    /// Ticks since counting started.
    fn elapsed(&self, now: u64) -> Option<u64> {
        self.start
            .map(|start| ns_to_ticks(now.saturating_sub(start)))
    }

    /// The counter value and the output at `now`.
    fn state(&self, now: u64) -> (u16, bool) {
        if let Some(frozen) = self.frozen {
            return frozen;
        }
        let Some(ticks) = self.elapsed(now) else {
            return (self.reload as u16, self.idle_output);
        };
        let n = self.period();
        match self.mode {
            // Interrupt on terminal count: output goes high at 0 and stays.
            0 => ((n.wrapping_sub(ticks)) as u16, ticks >= n),
            // Rate generator: output low for the one tick when the count is 1.
            2 | 6 => {
                let phase = ticks % n;
                ((n - phase) as u16, n - phase != 1)
            }
            // Square wave: high for the first half of each period.
            3 | 7 => {
                let phase = ticks % n;
                let half = n.div_ceil(2);
                let within = phase % half;
                ((n - 2 * within) as u16, phase < half)
            }
            // Software/hardware strobe and one-shot: output low for one tick at terminal count.
            4 | 5 => ((n.wrapping_sub(ticks)) as u16, ticks != n),
            // Hardware-retriggerable one-shot: low while counting.
            _ => ((n.wrapping_sub(ticks)) as u16, ticks >= n),
        }
    }

    /// When the output next rises after `now` (the IRQ 0 edge), for channel 0.
    fn next_rising_edge(&self, now: u64) -> Option<u64> {
        if self.frozen.is_some() {
            return None;
        }
        let start = self.start?;
        let n = self.period();
        let ticks = self.elapsed(now)?;
        let edge_tick = match self.mode {
            0 => (ticks < n).then_some(n)?,
            4 | 5 => (ticks <= n).then_some(n + 1)?,
            2 | 6 => (ticks / n + 1) * n,
            3 | 7 => (ticks / n + 1) * n,
            _ => return None,
        };
        Some(start + ticks_to_ns(edge_tick))
    }

    fn write_control(&mut self, value: u8) {
        let access = match (value >> 4) & 3 {
            0 => Access::Latch,
            1 => Access::Low,
            2 => Access::High,
            _ => Access::LowHigh,
        };
        self.access = access;
        self.mode = (value >> 1) & 7;
        self.bcd = value & 1 != 0;
        self.start = None;
        self.frozen = None;
        self.latched = None;
        self.status_latch = None;
        self.read_high_next = false;
        self.write_high_next = false;
        self.null_count = true;
        self.idle_output = self.mode != 0;
    }

    fn latch(&mut self, now: u64) {
        if self.latched.is_none() {
            self.latched = Some(self.state(now).0);
            self.read_high_next = false;
        }
    }

    fn write_count(&mut self, value: u8, now: u64) {
        let count = match self.access {
            Access::Low => u32::from(value),
            Access::High => u32::from(value) << 8,
            Access::LowHigh if !self.write_high_next => {
                self.write_low = value;
                self.write_high_next = true;
                return;
            }
            Access::LowHigh => {
                self.write_high_next = false;
                u32::from(self.write_low) | (u32::from(value) << 8)
            }
            Access::Latch => return,
        };
        let count = if self.bcd { from_bcd(count) } else { count };
        self.reload = if count == 0 { 0x10000 } else { count };
        self.null_count = false;
        self.frozen = None;
        // Modes 1 and 5 wait for a gate edge; the others start counting now.
        if matches!(self.mode, 1 | 5) {
            self.start = None;
        } else if self.gate {
            self.start = Some(now);
        } else {
            self.start = None;
            self.frozen = Some((self.reload as u16, self.mode != 0));
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(status) = self.status_latch.take() {
            return status;
        }
        let value = match self.latched {
            Some(v) => v,
            None => self.state(now).0,
        };
        let value = if self.bcd { to_bcd(value) } else { value };
        match self.access {
            Access::Low => {
                self.latched = None;
                value as u8
            }
            Access::High => {
                self.latched = None;
                (value >> 8) as u8
            }
            _ => {
                if self.read_high_next {
                    self.read_high_next = false;
                    self.latched = None;
                    (value >> 8) as u8
                } else {
                    self.read_high_next = true;
                    value as u8
                }
            }
        }
    }

    fn status(&self, now: u64) -> u8 {
        let access = match self.access {
            Access::Latch => 0,
            Access::Low => 1,
            Access::High => 2,
            Access::LowHigh => 3,
        };
        let out = self.state(now).1;
        (u8::from(out) << 7)
            | (u8::from(self.null_count) << 6)
            | (access << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if gate {
            match (self.mode, self.frozen.take()) {
                // Mode 0 and 4 resume counting where they stopped.
                (0 | 4, Some((count, _))) => {
                    let done = u64::from(self.reload).saturating_sub(u64::from(count));
                    self.start = Some(now.saturating_sub(ticks_to_ns(done)));
                }
                (0 | 4, None) => {}
                // The other modes (re)load the count on a rising gate.
                _ => {
                    if !self.null_count {
                        self.start = Some(now);
                    }
                }
            }
        } else if self.start.is_some() {
            let (count, out) = self.state(now);
            let out = if matches!(self.mode, 2 | 3 | 6 | 7) {
                true
            } else {
                out
            };
            self.frozen = Some((count, out));
            self.start = None;
        }
    }
}

fn from_bcd(value: u32) -> u32 {
    let digits = [
        value & 0xf,
        (value >> 4) & 0xf,
        (value >> 8) & 0xf,
        (value >> 12) & 0xf,
    ];
    digits.iter().rev().fold(0, |acc, d| acc * 10 + d.min(&9))
}

fn to_bcd(value: u16) -> u16 {
    let v = value % 10000;
    (v % 10) | ((v / 10 % 10) << 4) | ((v / 100 % 10) << 8) | ((v / 1000) << 12)
}

/// The timer and port 0x61.
#[derive(Debug, Default)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written.
    port_b: u8,
    /// Channel 0's next IRQ time (ns), if one is due.
    irq_deadline: Option<u64>,
}

impl Pit {
    pub fn new() -> Self {
        let mut pit = Pit::default();
        pit.channels[2].gate = false;
        pit
    }

    /// Whether `port` belongs to the PIT or port B.
    pub fn owns_port(port: u16) -> bool {
        matches!(port, 0x40..=0x43 | 0x61)
    }

    pub fn read_port(&mut self, port: u16, now: u64) -> u8 {
        match port {
            0x40..=0x42 => self.channels[usize::from(port - 0x40)].read(now),
            0x61 => {
                let out2 = self.channels[2].state(now).1;
                // Bit 4 toggles with DRAM refresh, every 15 us.
                let refresh = (now / 15_085) & 1 == 1;
                (self.port_b & 0x0f) | (u8::from(refresh) << 4) | (u8::from(out2) << 5)
            }
            _ => 0xff,
        }
    }

    pub fn write_port(&mut self, port: u16, value: u8, now: u64) {
        match port {
            0x40..=0x42 => {
                let index = usize::from(port - 0x40);
                self.channels[index].write_count(value, now);
                if index == 0 {
                    self.rearm(now);
                }
            }
            0x43 => {
                let select = value >> 6;
                if select == 3 {
                    // Read-back command (bits 1-3 select channels; bit 5 = no count latch,
                    // bit 4 = no status latch).
                    for (i, ch) in self.channels.iter_mut().enumerate() {
                        if value & (2 << i) != 0 {
                            if value & 0x20 == 0 {
                                ch.latch(now);
                            }
                            if value & 0x10 == 0 && ch.status_latch.is_none() {
                                ch.status_latch = Some(ch.status(now));
                            }
                        }
                    }
                    return;
                }
                let ch = &mut self.channels[usize::from(select)];
                if (value >> 4) & 3 == 0 {
                    ch.latch(now);
                } else {
                    ch.write_control(value);
                    if select == 0 {
                        self.rearm(now);
                    }
                }
            }
            0x61 => {
                self.port_b = value & 0x0f;
                self.channels[2].set_gate(value & 1 != 0, now);
            }
            _ => {}
        }
    }

    fn rearm(&mut self, now: u64) {
        self.irq_deadline = self.channels[0].next_rising_edge(now);
    }

    /// When IRQ 0 is next due, if ever.
    pub fn deadline(&self) -> Option<u64> {
        self.irq_deadline
    }

    /// Returns whether IRQ 0 fired since the last call (missed periods are coalesced).
    pub fn poll(&mut self, now: u64) -> bool {
        match self.irq_deadline {
            Some(due) if due <= now => {
                self.irq_deadline = self.channels[0].next_rising_edge(now);
                if self.irq_deadline == Some(due) {
                    // The edge is exactly now; look past it.
                    self.irq_deadline = self.channels[0].next_rising_edge(now + 1);
                }
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn program(pit: &mut Pit, control: u8, count: u16, now: u64) {
        pit.write_port(0x43, control, now);
        pit.write_port(0x40 + u16::from(control >> 6), count as u8, now);
        pit.write_port(0x40 + u16::from(control >> 6), (count >> 8) as u8, now);
    }

    #[test]
    fn periodic_mode_2_fires_every_period() {
        let mut pit = Pit::new();
        // Linux's periodic tick: mode 2, LATCH for HZ=1000.
        program(&mut pit, 0x34, 1193, 0);
        assert!(!pit.poll(MS / 2));
        assert!(pit.poll(MS + 1000));
        assert!(!pit.poll(MS + 2000));
        let next = pit.deadline().unwrap();
        assert!((1_999_000..2_001_000).contains(&next), "{next}");
        // Missed periods coalesce into one interrupt.
        assert!(pit.poll(10 * MS + 10));
        assert!(!pit.poll(10 * MS + 20));
    }

    #[test]
    fn one_shot_mode_4_fires_once() {
        let mut pit = Pit::new();
        program(&mut pit, 0x38, 11932, 0);
        assert!(!pit.poll(9 * MS));
        assert!(pit.poll(11 * MS));
        assert!(!pit.poll(100 * MS));
        assert_eq!(pit.deadline(), None);
    }

    #[test]
    fn mode_0_counts_down_and_latches() {
        let mut pit = Pit::new();
        program(&mut pit, 0x30, 0x1000, 0);
        pit.write_port(0x43, 0x00, MS); // latch channel 0
        let low = pit.read_port(0x40, 50 * MS);
        let high = pit.read_port(0x40, 50 * MS);
        let count = u16::from(low) | (u16::from(high) << 8);
        assert_eq!(count, 0x1000 - 1193);
        assert!(pit.poll(4 * MS));
    }

    #[test]
    fn channel_2_gate_and_output_on_port_b() {
        let mut pit = Pit::new();
        // The kernel's PIT calibration: gate on, mode 0, count, wait for OUT2.
        pit.write_port(0x61, 0x01, 0);
        program(&mut pit, 0xb0, 1193, 0);
        assert_eq!(pit.read_port(0x61, MS / 2) & 0x20, 0);
        assert_eq!(pit.read_port(0x61, MS + 1000) & 0x20, 0x20);
        // Gate low freezes the count.
        program(&mut pit, 0xb0, 0xffff, 2 * MS);
        pit.write_port(0x61, 0x00, 3 * MS);
        pit.write_port(0x43, 0x80, 9 * MS);
        let count =
            u16::from(pit.read_port(0x42, 9 * MS)) | (u16::from(pit.read_port(0x42, 9 * MS)) << 8);
        assert_eq!(count, 0xffff - 1193);
    }

    #[test]
    fn read_back_status() {
        let mut pit = Pit::new();
        program(&mut pit, 0x34, 100, 0);
        pit.write_port(0x43, 0xe2, 10); // read back status of channel 0
        assert_eq!(pit.read_port(0x40, 10) & 0x3f, 0x34);
    }

    #[test]
    fn bcd_roundtrip() {
        assert_eq!(from_bcd(0x1234), 1234);
        assert_eq!(to_bcd(1234), 0x1234);
    }
}
