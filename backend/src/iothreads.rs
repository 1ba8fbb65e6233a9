//! `iothread` objects, mapped onto blkgraph's threads.
//!
//! QEMU runs an export's requests in the event loop of the iothread its
//! `iothread=` names (all of them in one thread, unless `fixed-iothread`
//! is off and the guest's queues spread). blkgraph always runs every
//! virtqueue of a vhost-user-blk export and every NBD connection on a
//! thread of its own, with its own io_uring: an iothread object therefore
//! creates no thread. It carries the polling settings of the exports that
//! name it: `poll-max-ns` becomes how long each queue thread keeps polling
//! after its last request (the export's `x-poll-us`, unless given), and
//! the other properties are accepted. As in QEMU, deleting an iothread
//! leaves the exports that named it as they are.

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde::Deserialize;

/// The properties, as `--object iothread,help` lists them.
pub const IOTHREAD_PROPERTIES: &[&str] = &[
    "aio-max-batch=<int>",
    "poll-grow=<int>",
    "poll-max-ns=<int>",
    "poll-shrink=<int>",
    "thread-pool-max=<int>",
    "thread-pool-min=<int>",
];

/// An iothread's properties (QEMU's IothreadProperties).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct IothreadOptions {
    /// The longest a thread polls before it sleeps, in nanoseconds.
    #[serde(default)]
    pub poll_max_ns: Option<u64>,
    /// Accepted: blkgraph polls for a fixed time.
    #[serde(default)]
    pub poll_grow: Option<u64>,
    /// Accepted: blkgraph polls for a fixed time.
    #[serde(default)]
    pub poll_shrink: Option<u64>,
    /// Accepted: each io_uring submits what its queue has.
    #[serde(default)]
    pub aio_max_batch: Option<u64>,
    /// Accepted: blkgraph has no thread pool.
    #[serde(default)]
    pub thread_pool_min: Option<u64>,
    /// Accepted: blkgraph has no thread pool.
    #[serde(default)]
    pub thread_pool_max: Option<u64>,
}

/// Why an iothread could not be added or removed.
#[derive(Debug, PartialEq, Eq)]
pub enum IothreadError {
    /// An object with this id exists.
    Duplicate(String),
    /// No iothread has this id.
    NotFound(String),
}

impl std::fmt::Display for IothreadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IothreadError::Duplicate(id) => write!(
                f,
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ),
            IothreadError::NotFound(id) => write!(f, "iothread \"{id}\" not found"),
        }
    }
}

impl std::error::Error for IothreadError {}

/// The iothread objects.
#[derive(Default)]
pub struct Iothreads {
    list: Mutex<BTreeMap<String, IothreadOptions>>,
}

impl Iothreads {
    /// Adds iothread `id`.
    pub fn add(&self, id: &str, options: IothreadOptions) -> Result<(), IothreadError> {
        let mut list = self.list.lock();
        if list.contains_key(id) {
            return Err(IothreadError::Duplicate(id.to_string()));
        }
        list.insert(id.to_string(), options);
        Ok(())
    }

    /// Whether iothread `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.list.lock().contains_key(id)
    }

    /// Removes iothread `id`.
    pub fn remove(&self, id: &str) -> Result<(), IothreadError> {
        self.list
            .lock()
            .remove(id)
            .map(drop)
            .ok_or_else(|| IothreadError::NotFound(id.to_string()))
    }

    /// The options of iothread `id`, for an export that names it.
    pub fn options(&self, id: &str) -> Result<IothreadOptions, IothreadError> {
        self.list
            .lock()
            .get(id)
            .copied()
            .ok_or_else(|| IothreadError::NotFound(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iothreads_are_added_named_and_removed() {
        let t = Iothreads::default();
        let options = IothreadOptions {
            poll_max_ns: Some(5000),
            ..Default::default()
        };
        t.add("io0", options).unwrap();
        assert_eq!(
            t.add("io0", IothreadOptions::default()),
            Err(IothreadError::Duplicate("io0".into()))
        );
        assert_eq!(t.options("io0").unwrap().poll_max_ns, Some(5000));
        assert!(t.options("io1").is_err());
        t.remove("io0").unwrap();
        assert!(!t.contains("io0"));
        assert_eq!(t.remove("io0"), Err(IothreadError::NotFound("io0".into())));
    }
}
