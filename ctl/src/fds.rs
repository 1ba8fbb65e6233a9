//! The file descriptors a client named with `getfd`: one store per
//! connection, as QEMU's monitor keeps them, closed when the connection
//! ends.

use std::collections::BTreeMap;
use std::os::unix::io::OwnedFd;

use crate::error::QmpError;

/// A connection's named file descriptors.
///
/// `getfd {"fdname": NAME}` stores the descriptor that came with the
/// command (sent as `SCM_RIGHTS` ancillary data on the control socket),
/// `closefd {"fdname": NAME}` closes it, and a command that takes a
/// descriptor by name ([`NamedFds::take`]) owns it from then on: it is no
/// longer in the store, whether the command succeeds or not. What is left
/// is closed when the connection ends.
#[derive(Debug, Default)]
pub struct NamedFds {
    fds: BTreeMap<String, OwnedFd>,
}

impl NamedFds {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `fd` as `name` (what `getfd` does). A name that starts with a
    /// digit is refused, as in QEMU, where it would read as a descriptor
    /// number; `fd` is then closed. A descriptor already stored under
    /// `name` is closed and replaced.
    pub fn insert(&mut self, name: &str, fd: OwnedFd) -> Result<(), QmpError> {
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        self.fds.insert(name.to_string(), fd);
        Ok(())
    }

    /// Closes the descriptor stored as `name` (what `closefd` does).
    pub fn close(&mut self, name: &str) -> Result<(), QmpError> {
        match self.fds.remove(name) {
            Some(_) => Ok(()),
            None => Err(QmpError::generic(format!(
                "File descriptor named '{name}' not found"
            ))),
        }
    }

    /// Takes the descriptor stored as `name` out of the store, for a
    /// command that uses it. The error is QEMU's for a name that `getfd`
    /// never stored (or that was taken or closed since); a descriptor
    /// number is never found, as numbers are not names.
    pub fn take(&mut self, name: &str) -> Result<OwnedFd, QmpError> {
        self.fds.remove(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' has not been found"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scm::tests::{closed, probe};

    #[test]
    fn insert_take_and_close() {
        let mut fds = NamedFds::new();
        let (a, peer_a) = probe();
        fds.insert("a", a).unwrap();
        let taken = fds.take("a").unwrap();
        // Taken once only.
        assert_eq!(
            fds.take("a").unwrap_err().desc,
            "File descriptor named 'a' has not been found"
        );
        assert!(!closed(&peer_a));
        drop(taken);
        assert!(closed(&peer_a));

        let (b, peer_b) = probe();
        fds.insert("b", b).unwrap();
        fds.close("b").unwrap();
        assert!(closed(&peer_b));
        assert_eq!(
            fds.close("b").unwrap_err(),
            QmpError::generic("File descriptor named 'b' not found")
        );
        assert_eq!(
            fds.take("b").unwrap_err().desc,
            "File descriptor named 'b' has not been found"
        );
    }

    #[test]
    fn a_name_is_not_a_number() {
        let mut fds = NamedFds::new();
        let (a, peer_a) = probe();
        let e = fds.insert("3rd", a).unwrap_err();
        assert_eq!(
            e,
            QmpError::generic("Parameter 'fdname' expects a name not starting with a digit")
        );
        assert!(closed(&peer_a));
        // Numbers are never found, not even the descriptor's own.
        let (b, peer_b) = probe();
        let raw_b = std::os::unix::io::AsRawFd::as_raw_fd(&b);
        fds.insert("b", b).unwrap();
        for name in [raw_b.to_string(), "-1".into(), "0".into()] {
            assert_eq!(
                fds.take(&name).unwrap_err().desc,
                format!("File descriptor named '{name}' has not been found")
            );
        }
        assert!(!closed(&peer_b));
        // Other names are fine, the empty one too (as in QEMU).
        let (c, _peer_c) = probe();
        fds.insert("", c).unwrap();
        fds.take("").unwrap();
    }

    #[test]
    fn replacing_closes_the_old_one_and_dropping_closes_all() {
        let mut fds = NamedFds::new();
        let (a, peer_a) = probe();
        let (b, peer_b) = probe();
        fds.insert("x", a).unwrap();
        fds.insert("x", b).unwrap();
        assert!(closed(&peer_a));
        assert!(!closed(&peer_b));
        let (c, peer_c) = probe();
        fds.insert("c", c).unwrap();
        drop(fds);
        assert!(closed(&peer_b) && closed(&peer_c));
    }
}
