//! Fuzz target `qmp_commands`: QMP commands run by the daemon's real command table on a small
//! graph (see `blkgraph_fuzz::qmp_commands`).
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: blkgraph_fuzz::qmp_commands::init(),
    |data: &[u8]| blkgraph_fuzz::qmp_commands::run(data)
);
