//! The listening socket of a vhost-user-blk export: one frontend at a time,
//! and the next one after it disconnects, until the export is deleted.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vmm_sys_util::epoll::EventSet;

use super::device::VhostUserBlkDevice;

/// Binds the socket at `path` with mode 0600, replacing a stale one (see
/// [`blkgraph_ctl::bind_unix_socket`]). The listener does not remove the
/// socket when dropped: whoever bound it does.
pub fn bind(path: &Path) -> io::Result<Listener> {
    blkgraph_ctl::bind_unix_socket(path).map(Listener::from)
}

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    session: Mutex<Option<ShutdownHandle>>,
}

/// A running export server.
pub struct Server {
    shared: Arc<Shared>,
    listener_fd: RawFd,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Whether a frontend is connected.
    pub fn is_connected(&self) -> bool {
        self.shared.session.lock().is_some()
    }

    /// Stops serving: the listener is shut down and a connected frontend
    /// is disconnected; returns once the server thread has ended.
    pub fn stop(&mut self) {
        {
            let session = self.shared.session.lock();
            self.shared.stopping.store(true, Ordering::SeqCst);
            if let Some(handle) = session.as_ref() {
                handle.shutdown();
            }
        }
        // SAFETY: shutdown on the listening socket this server owns; it makes
        // a blocked accept return.
        unsafe { libc::shutdown(self.listener_fd, libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves frontends on `listener` until [`Server::stop`].
pub fn spawn(
    device: Arc<VhostUserBlkDevice>,
    mut listener: Listener,
    id: String,
) -> io::Result<Server> {
    let shared = Arc::new(Shared::default());
    let listener_fd = listener.as_raw_fd();
    let theirs = shared.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vub-{id}"))
        .spawn(move || {
            while !theirs.stopping.load(Ordering::SeqCst) {
                if let Err(e) = serve_one(&device, &mut listener, &id, &theirs) {
                    if theirs.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    log::error!("export {id}: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                device.disconnected();
            }
        })?;
    Ok(Server {
        shared,
        listener_fd,
        thread: Some(thread),
    })
}

fn serve_one(
    device: &Arc<VhostUserBlkDevice>,
    listener: &mut Listener,
    id: &str,
    shared: &Shared,
) -> io::Result<()> {
    let mut daemon = VhostUserDaemon::new(
        format!("vhost-user-blk-{id}"),
        device.clone(),
        device.memory(),
    )
    .map_err(|e| io::Error::other(format!("cannot create the vhost-user daemon: {e}")))?;
    for (queue, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        handler.register_listener(
            device.completion_fd(queue),
            EventSet::IN,
            device.completion_event(),
        )?;
    }
    daemon
        .start(listener)
        .map_err(|e| io::Error::other(format!("accept failed: {e}")))?;
    {
        let mut session = shared.session.lock();
        if shared.stopping.load(Ordering::SeqCst) {
            daemon.request_shutdown();
        }
        *session = daemon.shutdown_handle();
    }
    log::info!("export {id}: frontend connected");
    let result = daemon.wait();
    *shared.session.lock() = None;
    match result {
        Ok(()) => {}
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {}
        Err(e) => log::warn!("export {id}: frontend session ended: {e}"),
    }
    log::info!("export {id}: frontend disconnected");
    Ok(())
}
