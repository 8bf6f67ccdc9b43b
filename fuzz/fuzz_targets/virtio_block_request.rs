//! virtio-blk requests built from arbitrary bytes: types, sectors, buffer layouts, flags,
//! `next` links, indirect tables and available-ring indexes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    lodge_devices::fuzzing::virtio_block_request(data);
});
