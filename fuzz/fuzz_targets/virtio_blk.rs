//! Fuzz target `virtio_blk`: virtio-blk requests from arbitrary descriptor chains in guest memory,
//! parsed and run by the device's request code (see `blkgraph_fuzz::virtio_blk`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blkgraph_fuzz::virtio_blk::run(data));
