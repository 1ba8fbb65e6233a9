//! Fuzz target `nbd`: an NBD client's bytes, served by the real server over a socket pair
//! (see `blkgraph_fuzz::nbd`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: blkgraph_fuzz::nbd::init(),
    |data: &[u8]| blkgraph_fuzz::nbd::run(data)
);
