//! Fuzz target `nbd_client`: an NBD server's bytes, read by blkgraph's NBD
//! client node (see `blkgraph_fuzz::nbd_client`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: blkgraph_fuzz::nbd_client::init(),
    |data: &[u8]| blkgraph_fuzz::nbd_client::run(data)
);
