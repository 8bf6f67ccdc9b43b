//! Devices: legacy (serial, i8042, boot timer) and virtio-mmio (block, rng).
