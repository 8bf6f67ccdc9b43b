//! The guest-physical memory map shared by both engines.
//!
//! ```text
//! 0x0000_0500  GDT (boot segments)          0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top               0x0000_9000  page tables (PML4, PDPT, 4 PDs)
//! 0x0002_0000  kernel command line          0x0009_fc00  MP table (EBDA), to 0xa0000
//! 0x0010_0000  high memory: kernel, then initrd at the top of low RAM
//! 0xc000_0000  MMIO gap: boot timer + power button (0xd000_0000), virtio-mmio devices
//!              (0xd000_1000...), I/O APIC, local APIC
//! 0x1_0000_0000  RAM beyond 3 GiB continues here
//! ```

/// GDT with the boot code/data segments.
pub const GDT_START: u64 = 0x500;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (the kernel switches stacks immediately).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// First of the boot page tables: PML4, then PDPT, then four page directories.
pub const PML4_START: u64 = 0x9000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Longest command line the x86 kernel accepts (`COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of memory above the legacy hole.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Where bzImage kernels are loaded (their `code32_start`).
pub const BZIMAGE_LOAD_ADDRESS: u64 = HIGH_MEMORY_START;
/// Start of the MMIO gap below 4 GiB; RAM above this address is relocated past 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Boot timer device (written by the guest's init).
pub const BOOT_TIMER_START: u64 = 0xd000_0000;
/// Size of the boot timer's window.
pub const BOOT_TIMER_SIZE: u64 = 0x100;
/// Power button (polled by the guest's init; pressed for a graceful shutdown).
pub const POWER_BUTTON_START: u64 = 0xd000_0100;
/// Size of the power button's window.
pub const POWER_BUTTON_SIZE: u64 = 0x100;
/// First virtio-mmio device; each takes [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = lodge_devices::virtio::MMIO_SIZE;
/// Most virtio-mmio devices a VM can have (keeps them below the I/O APIC).
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 64;
/// I/O APIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Highest address an initrd may end at (the kernel's default `initrd_addr_max`).
pub const INITRD_ADDRESS_MAX: u64 = 0x7fff_ffff;

/// Interrupt lines with a fixed legacy owner: the PIT (0), keyboard (1), the PIC cascade (2),
/// the serial ports (3, 4) and the RTC (8). Devices lodge adds get the others.
pub const LEGACY_IRQS: [u32; 6] = [0, 1, 2, 3, 4, 8];

/// The interrupt lines virtio devices get, in order, on a controller with `lines` inputs
/// (`InterruptModel::lines`): from 5 up, skipping the legacy ones.
pub fn device_irqs(lines: u32) -> impl Iterator<Item = u32> {
    (5..lines).filter(|irq| !LEGACY_IRQS.contains(irq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_get_the_lines_legacy_hardware_leaves_free() {
        let pic: Vec<u32> = device_irqs(16).collect();
        assert_eq!(pic, [5, 6, 7, 9, 10, 11, 12, 13, 14, 15]);
        let ioapic: Vec<u32> = device_irqs(24).collect();
        assert_eq!(ioapic.len(), 18);
        assert_eq!(ioapic.last(), Some(&23));
    }
}
