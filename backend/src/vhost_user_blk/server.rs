//! The listening socket of a vhost-user-blk export: one frontend at a time,
//! and the next one after it disconnects, until the export is deleted.

use std::io;
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use vhost::vhost_user::{BackendListener, Error as VhostError, Listener};

use super::channel;
use super::device::VhostUserBlkDevice;
use super::handler::Handler;

/// Binds the socket at `path` with mode 0600, replacing a stale one (see
/// [`blkgraph_ctl::bind_unix_socket`]). The listener does not remove the
/// socket when dropped: whoever bound it does.
pub fn bind(path: &Path) -> io::Result<Listener> {
    blkgraph_ctl::bind_unix_socket(path).map(Listener::from)
}

#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// The connection of the current session, to shut it down.
    session: Mutex<Option<UnixStream>>,
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
            if let Some(conn) = session.as_ref() {
                let _ = conn.shutdown(Shutdown::Both);
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
    let handler = Handler::new(device.clone())?;
    let handler = Arc::new(std::sync::Mutex::new(handler));
    let mut backend_listener = BackendListener::new(listener, handler)
        .map_err(|e| io::Error::other(format!("cannot listen: {e}")))?;
    let mut conn = loop {
        match backend_listener.accept() {
            Ok(Some(conn)) => break conn,
            Ok(None) => continue,
            Err(e) => return Err(io::Error::other(format!("accept failed: {e}"))),
        }
    };
    {
        let mut session = shared.session.lock();
        let stream = conn.try_clone_connection()?;
        if shared.stopping.load(Ordering::SeqCst) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        *session = Some(stream);
    }
    log::info!("export {id}: frontend connected");
    let result = loop {
        match channel::peek(conn.as_raw_fd()) {
            Ok(Some(channel)) => device.set_channel(channel),
            Ok(None) => {}
            Err(e) => break VhostError::SocketBroken(e),
        }
        if let Err(e) = conn.handle_request() {
            break e;
        }
    };
    *shared.session.lock() = None;
    match result {
        VhostError::Disconnected | VhostError::PartialMessage | VhostError::SocketBroken(_) => {}
        e if shared.stopping.load(Ordering::SeqCst) => log::debug!("export {id}: {e}"),
        e => log::warn!("export {id}: frontend session ended: {e}"),
    }
    // The handler goes with the connection: its queue threads end, and the
    // device forgets the session.
    drop(conn);
    log::info!("export {id}: frontend disconnected");
    Ok(())
}
