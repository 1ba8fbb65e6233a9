//! blkgraph's daemon: a vhost-user-blk backend whose guest I/O runs through
//! an in-process block graph.

#![deny(missing_docs)]

pub mod cli;
pub mod control;
pub mod daemon;
mod daemonize;
pub mod export;
pub mod exports;
pub mod iothreads;
pub mod listen_fd;
pub mod metrics;
pub mod nbd;
mod pidfile;
mod sd_notify;
mod signals;
mod state_file;
pub mod stats;
pub mod vhost_user_blk;
