//! The harnesses behind blkgraph's fuzz targets (`fuzz_targets/`), kept in a
//! library so that the targets stay one line each and the same code can
//! replay inputs without libFuzzer (`cargo test` here, or under valgrind).
//!
//! Each harness takes the raw bytes an outsider controls, feeds them through
//! the same entry points the daemon uses, and checks what must hold for any
//! input: errors are `Err` values with a text, never panics, and a refused
//! input changes nothing. A violated check panics, which libFuzzer reports
//! as a crash.
//!
//! The QMP harness needs `blkgraph_ctl::FuzzSession`, which exists only when
//! the crates are built with `--cfg fuzzing` (cargo-fuzz sets it; `run.py`
//! sets it for clippy and tests).

pub mod options;
pub mod qmp;
