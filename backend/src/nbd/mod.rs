//! The NBD server and NBD exports, as qemu-storage-daemon has them:
//! `nbd-server-start` / `--nbd-server`, `block-export-add` with
//! `type: nbd`, fixed newstyle negotiation, structured replies, metadata
//! contexts (`base:allocation`, `qemu:dirty-bitmap:NAME`).
//!
//! Threads: one accept thread per server, one thread per client
//! connection (handshake, then transmission with its own graph executor).
//! See docs/nbd.md.

mod bitmap;
mod client;
mod export;
mod handshake;
pub mod proto;
mod reply;
mod request;
mod server;
mod session;
mod socket;
mod transmission;

pub use bitmap::{find_bitmap, BitmapRef, BitmapSource};
pub use export::{NbdExport, NbdExportOptions};
pub use server::{NbdServer, NbdServerOptions, DEFAULT_HANDSHAKE_SECONDS};
pub use socket::ListenAddress;

#[cfg(test)]
mod tests;
