//! The host-side vhost-user-blk test driver.
//!
//! Shared by several test binaries, each of which uses a part of it.
#![allow(dead_code)]

pub mod blk;
pub mod driver;
