//! Asynchronous I/O: the per-thread executor, its io_uring reactor and a
//! thread pool for `aio=threads`.
//!
//! Every thread that issues block I/O runs an [`Executor`]: a queue worker of
//! the vhost-user device, the NBD server, or a control-plane thread through
//! [`block_on`]. Node operations are futures; a driver that submits I/O to
//! io_uring does so on the reactor of the executor that polls it, so a request
//! never changes threads. One eventfd per executor tells its event loop that
//! there is work: io_uring posts it on completions, and wakers from other
//! threads write it.

mod detached;
mod executor;
mod join;
mod mutex;
mod pool;
mod sleep;
mod uring;
mod watch;

pub use detached::{race, spawn_detached, Detached, Either};
pub use executor::{block_on, Executor, Notifier};
pub use join::{join_all, InFlight, IoFuture, JoinAll};
pub use mutex::{AsyncMutex, Guard, Lock};
pub(crate) use pool::{run_blocking, BlockingOp};
pub use sleep::sleep;
pub(crate) use uring::{submit, Keepalive, UringOp};
pub(crate) use watch::{SharedWatch, WatchUse};
