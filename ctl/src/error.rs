//! QMP error replies: `{"error": {"class": CLASS, "desc": TEXT}}`.

use std::fmt;

use serde::Serialize;

/// The `class` member of a QMP error reply.
///
/// Serializes as QEMU's class name (`"GenericError"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ErrorClass {
    /// Almost every error: the text says what went wrong.
    GenericError,
    /// The command does not exist, or may not be used now (before or after
    /// capabilities negotiation).
    CommandNotFound,
    /// A named device (here: a block backend or export) does not exist.
    DeviceNotFound,
    /// A device exists but is not active (for example, no job runs on it).
    DeviceNotActive,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
        }
    }

    /// The class with this wire name, if it is one of ours.
    pub fn from_name(name: &str) -> Option<ErrorClass> {
        [
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotFound,
            ErrorClass::DeviceNotActive,
        ]
        .into_iter()
        .find(|c| c.as_str() == name)
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A QMP error: what a command returns instead of a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable text (QEMU's wording where QEMU has one).
    pub desc: String,
}

impl QmpError {
    /// An error of class `class` with text `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError` with text `desc`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound` for an unknown command `name`, in QEMU's wording.
    pub fn command_not_found(name: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// A `DeviceNotFound` error with text `desc`.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// A `DeviceNotActive` error with text `desc`.
    pub fn device_not_active(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotActive, desc)
    }
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

impl std::error::Error for QmpError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_like_qemu() {
        let e = QmpError::command_not_found("frobnicate");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"class":"CommandNotFound","desc":"The command frobnicate has not been found"}"#
        );
        assert_eq!(
            serde_json::to_value(ErrorClass::DeviceNotActive).unwrap(),
            "DeviceNotActive"
        );
    }

    #[test]
    fn class_names_round_trip() {
        for c in [
            ErrorClass::GenericError,
            ErrorClass::CommandNotFound,
            ErrorClass::DeviceNotFound,
            ErrorClass::DeviceNotActive,
        ] {
            assert_eq!(ErrorClass::from_name(c.as_str()), Some(c));
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert_eq!(ErrorClass::from_name("KVMMissingCap"), None);
    }

    #[test]
    fn display_has_class_and_text() {
        let e = QmpError::generic("Parameter 'x' is missing");
        assert_eq!(e.to_string(), "GenericError: Parameter 'x' is missing");
    }
}
