//! The vhost-user-blk export: a virtio-blk device served over a vhost-user
//! socket, straight from a graph node.

mod config;
mod device;
mod request;
mod server;
mod worker;

pub use device::{DeviceOptions, VhostUserBlkDevice};
pub use server::{bind, spawn, Server};
