//! The host-side vhost-user-blk test driver.

pub mod blk;
pub mod driver;
