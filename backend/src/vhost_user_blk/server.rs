//! The listening socket of a vhost-user-blk export: one frontend at a time,
//! and the next one after it disconnects.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vmm_sys_util::epoll::EventSet;

use super::device::VhostUserBlkDevice;

/// Binds the socket at `path` (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> io::Result<Listener> {
    let listener = Listener::new(path, true).map_err(|e| io::Error::other(format!("{e}")))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves frontends on `listener` until the process exits.
pub fn spawn(
    device: Arc<VhostUserBlkDevice>,
    mut listener: Listener,
    id: String,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vub-{id}"))
        .spawn(move || loop {
            if let Err(e) = serve_one(&device, &mut listener, &id) {
                log::error!("export {id}: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            device.disconnected();
        })
}

fn serve_one(
    device: &Arc<VhostUserBlkDevice>,
    listener: &mut Listener,
    id: &str,
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
    log::info!("export {id}: frontend connected");
    match daemon.wait() {
        Ok(()) => {}
        Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {}
        Err(e) => log::warn!("export {id}: frontend session ended: {e}"),
    }
    log::info!("export {id}: frontend disconnected");
    Ok(())
}
