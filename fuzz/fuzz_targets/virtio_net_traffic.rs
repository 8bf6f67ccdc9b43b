//! virtio-net driven by arbitrary receive and transmit chains, queue notifications and frames
//! from the backend's peer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodge_devices::fuzzing::virtio_net_traffic(data);
});
