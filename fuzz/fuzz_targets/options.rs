//! Fuzz target `options`: node options in both syntaxes, opened in a graph
//! (see `blkgraph_fuzz::options`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| blkgraph_fuzz::options::run(data));
