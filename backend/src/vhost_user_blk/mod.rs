//! The vhost-user-blk export: a virtio-blk device served over a vhost-user
//! socket, straight from a graph node.

mod channel;
mod config;
mod device;
mod export;
mod handler;
mod inflight;
mod request;
mod server;
mod worker;

pub use device::{DeviceOptions, VhostUserBlkDevice};
pub use export::{start as start_export, SocketAddress, VhostUserBlkExport, DEFAULT_POLL_US};
pub use request::{Completion, DeviceLimits, GuestMemory, Request};
