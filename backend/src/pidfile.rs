//! The `--pidfile`: locked for the daemon's whole life, as
//! qemu-storage-daemon's (QEMU's `qemu_write_pidfile`), so that a second
//! daemon given the same file refuses to start instead of overwriting it.

use std::ffi::CStr;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why the pid file could not be taken or written; the texts are QSD's.
#[derive(Debug)]
pub enum PidFileError {
    /// Opening (or creating) the file failed.
    Create {
        /// The path given.
        path: PathBuf,
        /// The system error.
        source: io::Error,
    },
    /// The opened file could not be examined.
    Stat(io::Error),
    /// Another process holds the lock (`EAGAIN`), or locking failed.
    Lock(io::Error),
    /// Emptying the file failed.
    Truncate(io::Error),
    /// Writing the pid failed.
    Write(io::Error),
}

impl fmt::Display for PidFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("cannot create PID file: ")?;
        match self {
            PidFileError::Create { path, source } => write!(
                f,
                "Could not create '{}': {}",
                path.display(),
                os_text(source)
            ),
            PidFileError::Stat(e) => write!(f, "Cannot stat file: {}", os_text(e)),
            PidFileError::Lock(e) => write!(f, "Cannot lock pid file: {}", os_text(e)),
            PidFileError::Truncate(e) => {
                write!(f, "Failed to truncate pid file: {}", os_text(e))
            }
            PidFileError::Write(e) => write!(f, "Failed to write pid file: {}", os_text(e)),
        }
    }
}

impl std::error::Error for PidFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PidFileError::Create { source: e, .. }
            | PidFileError::Stat(e)
            | PidFileError::Lock(e)
            | PidFileError::Truncate(e)
            | PidFileError::Write(e) => Some(e),
        }
    }
}

/// The system's text for `e`, as C's `strerror` words it (QEMU's messages
/// end in it), without the " (os error N)" of `io::Error`'s display.
fn os_text(e: &io::Error) -> String {
    let Some(code) = e.raw_os_error() else {
        return e.to_string();
    };
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: `buf` is writable for the length passed; on success
    // strerror_r leaves a NUL-terminated string in it.
    if unsafe { libc::strerror_r(code, buf.as_mut_ptr(), buf.len()) } != 0 {
        return e.to_string();
    }
    // SAFETY: strerror_r succeeded, so `buf` holds a NUL-terminated string.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// A locked pid file. The lock lasts as long as this value, which the
/// daemon keeps until it exits; dropping it removes the file if the path
/// still names the file it locked.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
}

impl PidFile {
    /// Creates or opens `path` (mode 0600 if created), takes an exclusive
    /// lock on the whole file without waiting, makes sure `path` still
    /// names the locked file (another daemon may have removed or replaced
    /// it meanwhile: then it starts over), and empties it.
    pub fn lock(path: &Path) -> Result<PidFile, PidFileError> {
        let file = loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|source| PidFileError::Create {
                    path: path.to_path_buf(),
                    source,
                })?;
            let locked = file.metadata().map_err(PidFileError::Stat)?;
            lock(&file).map_err(PidFileError::Lock)?;
            match fs::metadata(path) {
                Ok(now) if same_file(&now, &locked) => break file,
                // Removed or replaced by whoever held the lock before.
                _ => continue,
            }
        };
        file.set_len(0).map_err(PidFileError::Truncate)?;
        Ok(PidFile {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Writes this process's id, once the daemon is ready.
    pub fn write_pid(&mut self) -> Result<(), PidFileError> {
        self.file
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(PidFileError::Write)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = match (fs::metadata(&self.path), self.file.metadata()) {
            (Ok(now), Ok(locked)) => same_file(&now, &locked),
            _ => false,
        };
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

/// Takes a write lock on all of `file`, failing with `EAGAIN` if another
/// holds one. It is an open file description lock: unlike a classic POSIX
/// record lock it is not dropped when some other descriptor of the file in
/// this process closes, and it conflicts with the POSIX locks of QEMU's
/// daemons just the same.
fn lock(file: &File) -> io::Result<()> {
    // SAFETY: flock is plain integers: all-zero is valid (whole file, pid 0
    // as open file description locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on the descriptor `file` owns, with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_only_the_holder_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.pid");
        fs::write(&path, "12345\n").unwrap();
        let mut first = PidFile::lock(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "", "emptied at once");
        let e = PidFile::lock(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot create PID file: Cannot lock pid file: Resource temporarily unavailable"
        );
        first.write_pid().unwrap();
        let pid = format!("{}\n", std::process::id());
        assert_eq!(fs::read_to_string(&path).unwrap(), pid);
        // Someone replaced the file: it is not ours to remove any more.
        fs::remove_file(&path).unwrap();
        fs::write(&path, "other\n").unwrap();
        drop(first);
        assert_eq!(fs::read_to_string(&path).unwrap(), "other\n");
        let second = PidFile::lock(&path).unwrap();
        drop(second);
        assert!(!path.exists());
    }

    #[test]
    fn creation_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let e = PidFile::lock(dir.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot create PID file: Could not create '{}': Is a directory",
                dir.path().display()
            )
        );
    }
}
