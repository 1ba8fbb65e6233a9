//! Permissions on edges, as QEMU's block layer has them: what a parent
//! needs from a node (`perm`) and what it lets other parents of the node do
//! (`shared`).

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// A set of permission bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Permission(u8);

impl Permission {
    /// The parent sees a complete, self-consistent image.
    pub const CONSISTENT_READ: Permission = Permission(1);
    /// The parent may change what the node reads back.
    pub const WRITE: Permission = Permission(2);
    /// The parent may write without changing what the node reads back.
    pub const WRITE_UNCHANGED: Permission = Permission(4);
    /// The parent may change the node's size.
    pub const RESIZE: Permission = Permission(8);
    /// No permission.
    pub const NONE: Permission = Permission(0);
    /// Every permission.
    pub const ALL: Permission = Permission(15);

    const NAMES: [(Permission, &'static str); 4] = [
        (Permission::CONSISTENT_READ, "consistent-read"),
        (Permission::WRITE, "write"),
        (Permission::WRITE_UNCHANGED, "write-unchanged"),
        (Permission::RESIZE, "resize"),
    ];

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Permission) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits, for keeping in an atomic.
    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    /// The set with these raw bits (unknown bits dropped).
    pub(crate) fn from_bits(bits: u8) -> Permission {
        Permission(bits & Permission::ALL.0)
    }

    /// QMP's names of the bits that are set.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl BitOr for Permission {
    type Output = Permission;
    fn bitor(self, rhs: Permission) -> Permission {
        Permission(self.0 | rhs.0)
    }
}

impl BitAnd for Permission {
    type Output = Permission;
    fn bitand(self, rhs: Permission) -> Permission {
        Permission(self.0 & rhs.0)
    }
}

impl Not for Permission {
    type Output = Permission;
    fn not(self) -> Permission {
        Permission(!self.0 & Permission::ALL.0)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(", "))
    }
}

/// Who holds an edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A node, by node-name.
    Node(String),
    /// An export, by id.
    Export(String),
    /// A block job, by id.
    Job(String),
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Node(n) => write!(f, "node '{n}'"),
            Parent::Export(e) => write!(f, "export '{e}'"),
            Parent::Job(j) => write!(f, "block job '{j}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_names() {
        let rw = Permission::CONSISTENT_READ | Permission::WRITE;
        assert!(rw.contains(Permission::WRITE));
        assert!(!rw.contains(Permission::RESIZE));
        assert_eq!(rw.names(), ["consistent-read", "write"]);
        assert_eq!(!rw, Permission::WRITE_UNCHANGED | Permission::RESIZE);
        assert_eq!((rw & !Permission::WRITE).to_string(), "consistent-read");
        assert!(Permission::NONE.is_empty());
    }
}
