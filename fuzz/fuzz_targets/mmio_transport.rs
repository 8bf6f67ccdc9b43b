//! The virtio-mmio register window driven by arbitrary accesses, guest memory writes and
//! queue notifications.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodge_devices::fuzzing::mmio_transport(data);
});
