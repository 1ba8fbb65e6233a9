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
//! the other properties are accepted and kept for `qom-get`-style
//! compatibility.

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
    /// An export runs on it.
    InUse(String),
}

impl std::fmt::Display for IothreadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IothreadError::Duplicate(id) => write!(
                f,
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ),
            IothreadError::NotFound(id) => write!(f, "iothread \"{id}\" not found"),
            IothreadError::InUse(id) => write!(f, "object '{id}' is in use, can not be deleted"),
        }
    }
}

impl std::error::Error for IothreadError {}

#[derive(Default)]
struct Iothread {
    options: IothreadOptions,
    /// Exports that named it.
    users: Vec<String>,
}

/// The iothread objects.
#[derive(Default)]
pub struct Iothreads {
    list: Mutex<BTreeMap<String, Iothread>>,
}

impl Iothreads {
    /// Adds iothread `id`.
    pub fn add(&self, id: &str, options: IothreadOptions) -> Result<(), IothreadError> {
        let mut list = self.list.lock();
        if list.contains_key(id) {
            return Err(IothreadError::Duplicate(id.to_string()));
        }
        list.insert(
            id.to_string(),
            Iothread {
                options,
                users: Vec::new(),
            },
        );
        Ok(())
    }

    /// Whether iothread `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.list.lock().contains_key(id)
    }

    /// Removes iothread `id`, which no export may use.
    pub fn remove(&self, id: &str) -> Result<(), IothreadError> {
        let mut list = self.list.lock();
        match list.get(id) {
            None => Err(IothreadError::NotFound(id.to_string())),
            Some(t) if !t.users.is_empty() => Err(IothreadError::InUse(id.to_string())),
            Some(_) => {
                list.remove(id);
                Ok(())
            }
        }
    }

    /// Export `export` runs on iothread `id`: its options.
    pub fn attach(&self, id: &str, export: &str) -> Result<IothreadOptions, IothreadError> {
        let mut list = self.list.lock();
        let t = list
            .get_mut(id)
            .ok_or_else(|| IothreadError::NotFound(id.to_string()))?;
        t.users.push(export.to_string());
        Ok(t.options)
    }

    /// Export `export` is gone.
    pub fn detach(&self, export: &str) {
        for t in self.list.lock().values_mut() {
            t.users.retain(|u| u != export);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_iothread_in_use_stays() {
        let t = Iothreads::default();
        t.add("io0", IothreadOptions::default()).unwrap();
        assert_eq!(
            t.add("io0", IothreadOptions::default()),
            Err(IothreadError::Duplicate("io0".into()))
        );
        t.attach("io0", "exp0").unwrap();
        assert_eq!(t.remove("io0"), Err(IothreadError::InUse("io0".into())));
        assert!(t.attach("io1", "exp1").is_err());
        t.detach("exp0");
        t.remove("io0").unwrap();
        assert!(!t.contains("io0"));
    }
}
