//! Fuzz target `qmp_stream`: a QMP client's byte stream, read in chunks,
//! through the control socket's decoder and session (see
//! `blkgraph_fuzz::qmp`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blkgraph_fuzz::qmp::run(data));
