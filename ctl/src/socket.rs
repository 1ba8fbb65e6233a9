//! Listening unix sockets that only their owner can reach: the control
//! socket, and the daemon's vhost-user and NBD sockets.

use std::fs;
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The mode of every socket [`bind_unix_socket`] creates.
const MODE: u32 = 0o600;

/// Binds a listening unix socket at `path` with mode 0600, replacing a
/// stale socket file (one nobody listens on).
///
/// Fails with `AddrInUse` if a server answers on `path`, and with
/// `AlreadyExists` if `path` exists and is not a socket: neither is
/// touched. The socket is created with mode 0600 under a temporary name in
/// the same directory and renamed to `path`, so it is never reachable with
/// a wider mode; if the temporary name does not fit in a socket address
/// while `path` does, it is bound in place, still created 0600.
pub fn bind_unix_socket(path: &Path) -> io::Result<UnixListener> {
    check_existing(path)?;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".blkgraph-{}-{}.sock",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    match listen_owner_only(&tmp) {
        Ok(listener) => {
            if let Err(e) = fs::rename(&tmp, path) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(listener)
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            remove_stale(path)?;
            listen_owner_only(path)
        }
        Err(e) => Err(e),
    }
}

/// Refuses to replace a live socket or a file that is not a socket.
fn check_existing(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "a running server listens on it",
        )),
        // Nobody listens: stale.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot check whether the socket there is stale: {e}"),
        )),
    }
}

/// Removes a stale socket file (see [`check_existing`]).
fn remove_stale(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Turns a -1 return of a libc call into the `errno` error.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Binds and listens at `path` with a socket whose node is created with
/// mode 0600 (Linux gives the node the mode of the socket's inode, less
/// the umask), then sets exactly 0600. Fails with `InvalidInput` if `path`
/// does not fit in a socket address.
fn listen_owner_only(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: sockaddr_un is plain integers and bytes: all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // The address keeps a terminating NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is too long for a unix socket",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: creates a socket; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on the descriptor `socket` owns.
    check(unsafe { libc::fchmod(socket.as_raw_fd(), MODE) })?;
    // SAFETY: `addr` is an initialised sockaddr_un and its size is passed;
    // the descriptor is owned by `socket`.
    check(unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    })?;
    let placed = fs::set_permissions(path, fs::Permissions::from_mode(MODE))
        // SAFETY: listen on the descriptor `socket` owns.
        .and_then(|()| check(unsafe { libc::listen(socket.as_raw_fd(), libc::SOMAXCONN) }));
    if let Err(e) = placed {
        let _ = fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(socket))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn binds_0600_and_replaces_only_stale_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket: bound, then its listener closed.
        drop(UnixListener::bind(&path).unwrap());
        let listener = bind_unix_socket(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        UnixStream::connect(&path).unwrap();
        // Only the socket is left in the directory.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s.sock")]);
        // A live socket is not taken over.
        let err = bind_unix_socket(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
    }

    #[test]
    fn refuses_to_replace_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        fs::write(&path, b"keep me").unwrap();
        let err = bind_unix_socket(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn binds_in_place_when_the_temporary_name_is_too_long() {
        let dir = tempfile::tempdir().unwrap();
        // A directory whose path leaves room for a 5-byte name in a socket
        // address (107 bytes and a NUL), not for the temporary name.
        let deep = dir
            .path()
            .join("d".repeat(107 - 6 - dir.path().as_os_str().len() - 1));
        fs::create_dir(&deep).unwrap();
        let path = deep.join("s.skt");
        assert_eq!(path.as_os_str().len(), 107);
        let _listener = bind_unix_socket(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        UnixStream::connect(&path).unwrap();
        let too_long = deep.join("s.sock");
        let err = bind_unix_socket(&too_long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
