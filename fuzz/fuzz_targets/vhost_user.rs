//! Fuzz target `vhost_user`: a vhost-user frontend's messages, with the
//! descriptors they carry, to a real vhost-user-blk export (see
//! `blkgraph_fuzz::vhost_user`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: blkgraph_fuzz::vhost_user::init(),
    |data: &[u8]| blkgraph_fuzz::vhost_user::run(data)
);
