//! The legacy 8259A programmable interrupt controller pair (master on 0x20, slave on 0xa0,
//! cascaded on master input 2), as Linux programs it: ICW1-4, OCW1 masks, OCW2 EOIs and
//! rotations, OCW3 register reads, auto-EOI. Every input is edge-triggered: a device's
//! `InterruptLine::trigger` is one edge. Poll mode and special fully nested mode are accepted
//! and ignored (logged once).

use tracing::debug;

/// The two chips.
#[derive(Debug, Default)]
pub struct Pic {
    chips: [Chip; 2],
    /// Whether a request reaches the CPU (recomputed after every change).
    output: bool,
    /// Edge/level control registers (ports 0x4d0/0x4d1); stored for reads, inputs stay edges.
    elcr: [u8; 2],
}

#[derive(Debug, Clone)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    vector_base: u8,
    /// IRQ with the lowest priority (7 until a rotation).
    lowest_priority: u8,
    /// Which ICW the next data-port write is (0 = initialized, OCW1 goes to the mask).
    init_step: u8,
    needs_icw3: bool,
    needs_icw4: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    read_isr: bool,
    special_mask: bool,
    poll: bool,
}

impl Default for Chip {
    fn default() -> Self {
        Chip {
            irr: 0,
            isr: 0,
            imr: 0xff,
            vector_base: 0,
            lowest_priority: 7,
            init_step: 0,
            needs_icw3: false,
            needs_icw4: false,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            read_isr: false,
            special_mask: false,
            poll: false,
        }
    }
}

impl Chip {
    /// Priority rank of `irq`: 0 is the highest.
    fn rank(&self, irq: u8) -> u8 {
        (irq + 7 - self.lowest_priority) & 7
    }

    /// The highest-priority bit set in `bits`.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8u8)
            .map(|r| (self.lowest_priority + 1 + r) & 7)
            .find(|irq| bits & (1 << irq) != 0)
    }

    /// The request this chip would raise now, if any. `cascade_input` is the slave's output
    /// (only for the master's IRQ 2).
    fn pending(&self, cascade_input: bool) -> Option<u8> {
        let mut irr = self.irr;
        if cascade_input {
            irr |= 1 << 2;
        }
        let irq = self.highest(irr & !self.imr)?;
        let in_service = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        match self.highest(in_service) {
            Some(busy) if self.rank(busy) <= self.rank(irq) => None,
            _ => Some(irq),
        }
    }

    fn acknowledge(&mut self, irq: u8) {
        self.irr &= !(1 << irq);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest_priority = irq;
            }
        } else {
            self.isr |= 1 << irq;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1.
            *self = Chip {
                vector_base: self.vector_base,
                imr: 0,
                init_step: 2,
                needs_icw3: value & 0x02 == 0,
                needs_icw4: value & 0x01 != 0,
                ..Chip::default()
            };
            if value & 0x08 != 0 {
                debug!("8259: level-triggered mode requested; inputs stay edge-triggered");
            }
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x02 != 0 {
                self.read_isr = value & 0x01 != 0;
            }
            self.poll = value & 0x04 != 0;
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            let level = value & 7;
            match value >> 5 {
                0b001 | 0b101 => {
                    if let Some(irq) = self.highest(self.isr) {
                        self.isr &= !(1 << irq);
                        if value >> 5 == 0b101 {
                            self.lowest_priority = irq;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << level),
                0b111 => {
                    self.isr &= !(1 << level);
                    self.lowest_priority = level;
                }
                0b110 => self.lowest_priority = level,
                0b100 => self.rotate_on_auto_eoi = true,
                0b000 => self.rotate_on_auto_eoi = false,
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_step {
            2 => {
                self.vector_base = value & 0xf8;
                self.init_step = if self.needs_icw3 {
                    3
                } else if self.needs_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => self.init_step = if self.needs_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = value & 0x02 != 0;
                if value & 0x10 != 0 {
                    debug!("8259: special fully nested mode requested; ignored");
                }
                self.init_step = 0;
            }
            _ => self.imr = value,
        }
    }

    fn read_command(&mut self) -> u8 {
        if self.poll {
            // Poll command: acknowledge the highest request, as if it were INTA.
            self.poll = false;
            return match self.pending(false) {
                Some(irq) => {
                    self.acknowledge(irq);
                    0x80 | irq
                }
                None => 0,
            };
        }
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }
}

impl Pic {
    pub fn new() -> Self {
        Self::default()
    }

    /// An edge on input `irq` (0-15).
    pub fn raise(&mut self, irq: u32) {
        if let Some(chip) = self.chips.get_mut((irq / 8) as usize) {
            chip.irr |= 1 << (irq % 8);
        }
        self.update();
    }

    /// Whether an interrupt request reaches the CPU.
    #[inline]
    pub fn has_interrupt(&self) -> bool {
        self.output
    }

    fn update(&mut self) {
        self.output = self.chips[0]
            .pending(self.chips[1].pending(false).is_some())
            .is_some();
    }

    /// The CPU's interrupt acknowledge: returns the vector to deliver, if any.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.acknowledge_inner();
        self.update();
        vector
    }

    fn acknowledge_inner(&mut self) -> Option<u8> {
        let slave = self.chips[1].pending(false);
        let irq = self.chips[0].pending(slave.is_some())?;
        if irq == 2 {
            if let Some(slave_irq) = slave {
                self.chips[1].acknowledge(slave_irq);
                self.chips[0].acknowledge(2);
                return Some(self.chips[1].vector_base | slave_irq);
            }
        }
        self.chips[0].acknowledge(irq);
        Some(self.chips[0].vector_base | irq)
    }

    /// Whether `port` belongs to the PIC.
    pub fn owns_port(port: u16) -> bool {
        matches!(port, 0x20 | 0x21 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1)
    }

    pub fn read_port(&mut self, port: u16) -> u8 {
        let value = self.read_port_inner(port);
        self.update();
        value
    }

    fn read_port_inner(&mut self, port: u16) -> u8 {
        match port {
            0x20 => self.chips[0].read_command(),
            0x21 => self.chips[0].imr,
            0xa0 => self.chips[1].read_command(),
            0xa1 => self.chips[1].imr,
            0x4d0 => self.elcr[0],
            0x4d1 => self.elcr[1],
            _ => 0xff,
        }
    }

    pub fn write_port(&mut self, port: u16, value: u8) {
        self.write_port_inner(port, value);
        self.update();
    }

    fn write_port_inner(&mut self, port: u16, value: u8) {
        match port {
            0x20 => self.chips[0].write_command(value),
            0x21 => self.chips[0].write_data(value),
            0xa0 => self.chips[1].write_command(value),
            0xa1 => self.chips[1].write_data(value),
            // IRQ 0, 1, 2 and 8, 13 cannot be level-triggered.
            0x4d0 => self.elcr[0] = value & 0xf8,
            0x4d1 => self.elcr[1] = value & 0xde,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Programs both chips the way Linux's init_8259A does.
    fn linux_init(auto_eoi: bool) -> Pic {
        let mut pic = Pic::new();
        pic.write_port(0x21, 0xff);
        pic.write_port(0xa1, 0xff);
        pic.write_port(0x20, 0x11);
        pic.write_port(0x21, 0x30);
        pic.write_port(0x21, 0x04);
        pic.write_port(0x21, if auto_eoi { 0x03 } else { 0x01 });
        pic.write_port(0xa0, 0x11);
        pic.write_port(0xa1, 0x38);
        pic.write_port(0xa1, 0x02);
        pic.write_port(0xa1, 0x01);
        pic.write_port(0x21, 0xfb);
        pic.write_port(0xa1, 0xff);
        pic
    }

    #[test]
    fn masks_read_back() {
        let mut pic = linux_init(false);
        assert_eq!(pic.read_port(0x21), 0xfb);
        assert_eq!(pic.read_port(0xa1), 0xff);
        pic.write_port(0x21, 0xa5);
        assert_eq!(pic.read_port(0x21), 0xa5);
    }

    #[test]
    fn delivers_by_priority_and_honours_eoi() {
        let mut pic = linux_init(false);
        pic.write_port(0x21, 0x00);
        pic.raise(4);
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        // IRQ 0 in service blocks IRQ 4.
        assert!(!pic.has_interrupt());
        pic.write_port(0x20, 0x60); // specific EOI for IRQ 0
        assert_eq!(pic.acknowledge(), Some(0x34));
        pic.write_port(0x20, 0x20); // non-specific EOI
        assert!(!pic.has_interrupt());
        assert_eq!(pic.acknowledge(), None);
    }

    #[test]
    fn masked_edges_are_latched() {
        let mut pic = linux_init(false);
        pic.raise(5);
        assert!(!pic.has_interrupt());
        pic.write_port(0x20, 0x0a); // OCW3: read IRR
        assert_eq!(pic.read_port(0x20), 1 << 5);
        pic.write_port(0x21, 0xdb);
        assert_eq!(pic.acknowledge(), Some(0x35));
        pic.write_port(0x20, 0x0b); // OCW3: read ISR
        assert_eq!(pic.read_port(0x20), 1 << 5);
    }

    #[test]
    fn cascades_the_slave() {
        let mut pic = linux_init(false);
        pic.write_port(0xa1, 0xfd); // unmask IRQ 9
        pic.raise(9);
        assert!(pic.has_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x39));
        pic.write_port(0xa0, 0x61);
        pic.write_port(0x20, 0x62);
        assert!(!pic.has_interrupt());
        pic.write_port(0x20, 0x0b);
        assert_eq!(pic.read_port(0x20), 0);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut pic = linux_init(true);
        pic.write_port(0x21, 0x00);
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x30));
    }

    #[test]
    fn rotation_changes_priority() {
        let mut pic = linux_init(false);
        pic.write_port(0x21, 0x00);
        pic.write_port(0x20, 0xc3); // set priority: IRQ 3 lowest, so IRQ 4 highest
        pic.raise(1);
        pic.raise(5);
        assert_eq!(pic.acknowledge(), Some(0x35));
    }

    #[test]
    fn poll_mode_acknowledges() {
        let mut pic = linux_init(false);
        pic.write_port(0x21, 0x00);
        pic.raise(3);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x83);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x00, "IRQ 3 in service now");
    }
}
