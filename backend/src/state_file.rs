//! `--state-file PATH`: the daemon's configuration as it is now, written
//! atomically after every change a QMP command (or a job's end) makes, and
//! built again at the next start instead of the command line's objects,
//! nodes, NBD server and exports. A restart (an upgrade, a crash) then
//! comes back with what was added over QMP: filters inserted under a
//! guest, exports, bitmaps.
//!
//! What is kept: the objects and the NBD server as their commands gave
//! them, the nodes as [`Graph::blueprint`] gives them (with their edges as
//! they are now), the exports as they were given with the node they serve
//! now, and the dirty bitmaps. A bitmap stored in a qcow2 image comes back
//! from the image; any other comes back empty and inconsistent (its bits
//! were lost with the process, so it can only be removed) and
//! [`BITMAP_LOST_EVENT`] says so. Jobs are not kept, as in QEMU.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use blkgraph_ctl::Events;
use blkgraph_graph::options::Syntax;
use blkgraph_graph::{BitmapOptions, Graph, Options};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::exports::Exports;

/// The format version written, the only one read.
const VERSION: u64 = 1;

/// The event sent for each bitmap recreated inconsistent at start (a
/// blkgraph addition, named by QMP's convention for them).
pub const BITMAP_LOST_EVENT: &str = "__org.blkgraph_BLOCK_DIRTY_BITMAP_LOST";

/// Options as they were given, and how their values are typed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedOptions {
    /// QEMU's `key=value` form (every scalar a string), as on the command
    /// line; else JSON, as over QMP.
    #[serde(default)]
    pub keyval: bool,
    /// The options.
    pub options: Map<String, Value>,
}

impl SavedOptions {
    /// Saves `options`.
    pub fn of(options: &Options) -> Self {
        SavedOptions {
            keyval: options.syntax == Syntax::Keyval,
            options: options.map.clone(),
        }
    }

    /// The options again.
    pub fn to_options(&self) -> Options {
        Options {
            map: self.options.clone(),
            syntax: if self.keyval {
                Syntax::Keyval
            } else {
                Syntax::Json
            },
        }
    }
}

/// A dirty bitmap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedBitmap {
    /// Its node.
    pub node: String,
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Stored in its node's image.
    pub persistent: bool,
    /// Not recording.
    pub disabled: bool,
}

/// What the state file holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The format version.
    pub version: u64,
    /// `--object` / object-add options, by id.
    pub objects: BTreeMap<String, SavedOptions>,
    /// The nodes, children first.
    pub blockdevs: Vec<SavedOptions>,
    /// `--nbd-server` options (nbd-server-start's in that form).
    pub nbd_server: Option<SavedOptions>,
    /// `--export` / block-export-add options, serving the node they serve
    /// now.
    pub exports: Vec<SavedOptions>,
    /// The dirty bitmaps.
    pub bitmaps: Vec<SavedBitmap>,
}

/// Why the state file could not be read or written.
#[derive(Debug)]
pub enum StateFileError {
    /// Reading, writing, syncing or renaming failed.
    Io(PathBuf, io::Error),
    /// The file is not a state file this version reads.
    Invalid(PathBuf, String),
}

impl fmt::Display for StateFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateFileError::Io(path, e) => write!(f, "state file '{}': {e}", path.display()),
            StateFileError::Invalid(path, why) => {
                write!(f, "state file '{}' is invalid: {why}", path.display())
            }
        }
    }
}

impl std::error::Error for StateFileError {}

/// What is recorded from the commands between writes (the nodes, exports
/// and bitmaps are read from the graph and the exports at each write).
#[derive(Default)]
struct Recorded {
    objects: BTreeMap<String, SavedOptions>,
    nbd_server: Option<SavedOptions>,
    /// The daemon is shutting down: the graph is going, nothing is written.
    frozen: bool,
}

/// The state file of a running daemon.
pub struct StateFile {
    path: PathBuf,
    /// Held across each write, so that writes follow the changes in order.
    recorded: Mutex<Recorded>,
}

impl StateFile {
    /// Reads the state file at `path`; `None` if there is none yet.
    pub fn read(path: &Path) -> Result<Option<State>, StateFileError> {
        let invalid = |why: String| StateFileError::Invalid(path.to_path_buf(), why);
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateFileError::Io(path.to_path_buf(), e)),
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        match value.get("version").and_then(Value::as_u64) {
            Some(VERSION) => {}
            Some(v) => {
                return Err(invalid(format!(
                    "version {v} (this blkgraph reads {VERSION})"
                )))
            }
            None => return Err(invalid("no version".into())),
        }
        serde_json::from_value(value)
            .map(Some)
            .map_err(|e| invalid(e.to_string()))
    }

    /// The state file at `path` of a daemon whose objects and NBD server
    /// are these (from the state file it started from, or its command
    /// line).
    pub fn new(
        path: PathBuf,
        objects: BTreeMap<String, SavedOptions>,
        nbd_server: Option<SavedOptions>,
    ) -> Self {
        StateFile {
            path,
            recorded: Mutex::new(Recorded {
                objects,
                nbd_server,
                frozen: false,
            }),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// After QMP command `command` succeeded with `args`: records what it
    /// changed of the objects and the NBD server, and writes the state.
    pub fn committed(
        &self,
        command: &str,
        args: &Map<String, Value>,
        graph: &Graph,
        exports: &Exports,
    ) -> Result<(), StateFileError> {
        let mut r = self.recorded.lock();
        let id = || args.get("id").and_then(Value::as_str).map(str::to_string);
        match command {
            "object-add" => {
                if let Some(id) = id() {
                    let options = SavedOptions {
                        keyval: false,
                        options: args.clone(),
                    };
                    r.objects.insert(id, options);
                }
            }
            "object-del" => {
                if let Some(id) = id() {
                    r.objects.remove(&id);
                }
            }
            "nbd-server-start" => {
                r.nbd_server = Some(SavedOptions {
                    keyval: false,
                    options: flat_address(args),
                })
            }
            "nbd-server-stop" => r.nbd_server = None,
            _ => {}
        }
        self.write_locked(&r, graph, exports)
    }

    /// Writes the state as it is now (after a job ended).
    pub fn write(&self, graph: &Graph, exports: &Exports) -> Result<(), StateFileError> {
        let r = self.recorded.lock();
        self.write_locked(&r, graph, exports)
    }

    /// Writes nothing from now on: the daemon is shutting down, and what
    /// it takes down is not a change to keep.
    pub fn freeze(&self) {
        self.recorded.lock().frozen = true;
    }

    /// Writes the state to a new file beside the old one, made stable,
    /// then renamed over it, and the directory made stable: the file is
    /// always one whole state, the last one or the one before. It is the
    /// owner's only (mode 0600), as the daemon's sockets are: it names
    /// every image and socket.
    fn write_locked(
        &self,
        r: &Recorded,
        graph: &Graph,
        exports: &Exports,
    ) -> Result<(), StateFileError> {
        if r.frozen {
            return Ok(());
        }
        let state = State {
            version: VERSION,
            objects: r.objects.clone(),
            blockdevs: graph.blueprint().iter().map(SavedOptions::of).collect(),
            nbd_server: r.nbd_server.clone(),
            exports: exports.saved().iter().map(SavedOptions::of).collect(),
            bitmaps: bitmaps(graph),
        };
        let io = |e| StateFileError::Io(self.path.clone(), e);
        let mut text = serde_json::to_vec_pretty(&state).map_err(|e| io(e.into()))?;
        text.push(b'\n');
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = self
            .path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)
    }
}

/// Every dirty bitmap of the graph.
fn bitmaps(graph: &Graph) -> Vec<SavedBitmap> {
    graph
        .nodes()
        .iter()
        .flat_map(|n| {
            n.bitmaps().into_iter().map(|b| SavedBitmap {
                node: n.name().to_string(),
                name: b.name().to_string(),
                granularity: b.granularity(),
                persistent: b.persistent(),
                disabled: !b.recording(),
            })
        })
        .collect()
}

/// nbd-server-start's arguments in `--nbd-server`'s form: QAPI's legacy
/// address (`{"type": T, "data": {...}}`) flattened (`{"type": T, ...}`).
fn flat_address(args: &Map<String, Value>) -> Map<String, Value> {
    let mut args = args.clone();
    if let Some(Value::Object(addr)) = args.get_mut("addr") {
        if let Some(Value::Object(data)) = addr.remove("data") {
            addr.extend(data);
        }
    }
    args
}

/// The bitmaps of `state` that their nodes do not have (those stored in a
/// qcow2 image were loaded with it), recreated inconsistent: each is
/// logged and announced with [`BITMAP_LOST_EVENT`] to the first QMP
/// client. Returns them.
pub fn restore_bitmaps(
    path: &Path,
    graph: &Graph,
    bitmaps: &[SavedBitmap],
    events: &Events,
) -> Result<Vec<SavedBitmap>, String> {
    let mut lost = Vec::new();
    for b in bitmaps {
        let loaded = graph
            .find(&b.node)
            .map_err(|e| format!("state file '{}': bitmap '{}': {e}", path.display(), b.name))?
            .bitmap(&b.name)
            .is_some();
        if loaded {
            continue;
        }
        let mut tx = graph.transaction();
        let options = BitmapOptions {
            granularity: Some(b.granularity),
            disabled: b.disabled,
            persistent: b.persistent,
        };
        tx.bitmap_add_lost(&b.node, &b.name, options)
            .and_then(|()| tx.commit())
            .map_err(|e| format!("state file '{}': bitmap '{}': {e}", path.display(), b.name))?;
        log::warn!(
            "dirty bitmap '{}' of node '{}': its bits were lost with the last process; \
             recreated inconsistent (it can only be removed)",
            b.name,
            b.node
        );
        events.emit_or_hold(BITMAP_LOST_EVENT, json!({"node": b.node, "name": b.name}));
        lost.push(b.clone());
    }
    Ok(lost)
}

/// Whether `export` names one of the `lost` bitmaps (an NBD export of a
/// bitmap, which an inconsistent bitmap cannot be).
pub fn exports_lost_bitmap(export: &Map<String, Value>, lost: &[SavedBitmap]) -> bool {
    let Some(Value::Array(names)) = export.get("bitmaps") else {
        return false;
    };
    names.iter().any(|n| {
        lost.iter().any(|b| match n {
            // A name alone: a bitmap of the export's node or its backing
            // chain.
            Value::String(name) => *name == b.name,
            Value::Object(r) => {
                r.get("node").and_then(Value::as_str) == Some(b.node.as_str())
                    && r.get("name").and_then(Value::as_str) == Some(b.name.as_str())
            }
            _ => false,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn records_commands_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(StateFile::read(&path).unwrap(), None);
        let graph = std::sync::Arc::new(Graph::new());
        let exports = Exports::new(graph.clone());
        let file = StateFile::new(path.clone(), BTreeMap::new(), None);
        let tg = json!({"qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 5}});
        file.committed("object-add", &map(tg.clone()), &graph, &exports)
            .unwrap();
        let addr = json!({"addr": {"type": "unix", "data": {"path": "/tmp/n.sock"}}});
        file.committed("nbd-server-start", &map(addr), &graph, &exports)
            .unwrap();
        let state = StateFile::read(&path).unwrap().unwrap();
        assert_eq!(state.objects["tg0"].options, map(tg));
        assert_eq!(
            state.nbd_server.unwrap().options,
            map(json!({"addr": {"type": "unix", "path": "/tmp/n.sock"}}))
        );
        file.committed("nbd-server-stop", &Map::new(), &graph, &exports)
            .unwrap();
        file.committed("object-del", &map(json!({"id": "tg0"})), &graph, &exports)
            .unwrap();
        let state = StateFile::read(&path).unwrap().unwrap();
        assert_eq!(
            state,
            State {
                version: VERSION,
                ..State::default()
            }
        );
        // No temporary file is left beside it, and it is the owner's.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        file.freeze();
        file.committed("object-add", &map(json!({"id": "x"})), &graph, &exports)
            .unwrap();
        assert!(StateFile::read(&path).unwrap().unwrap().objects.is_empty());
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        for text in [
            "{\"version\": 7}",
            "{\"objects\": {}}",
            "{\"version\": 1, \"x\": 1}",
            "{",
        ] {
            fs::write(&path, text).unwrap();
            let e = StateFile::read(&path).unwrap_err();
            assert!(matches!(e, StateFileError::Invalid(..)), "{text}: {e}");
            assert!(e.to_string().contains(&*path.to_string_lossy()), "{e}");
        }
    }

    #[test]
    fn an_export_of_a_lost_bitmap_is_found() {
        let lost = [SavedBitmap {
            node: "disk0".into(),
            name: "b0".into(),
            granularity: 65536,
            persistent: false,
            disabled: false,
        }];
        let export =
            |bitmaps: Value| map(json!({"type": "nbd", "node-name": "disk0", "bitmaps": bitmaps}));
        assert!(exports_lost_bitmap(&export(json!(["b0"])), &lost));
        assert!(exports_lost_bitmap(
            &export(json!([{"node": "disk0", "name": "b0"}])),
            &lost
        ));
        assert!(!exports_lost_bitmap(&export(json!(["b1"])), &lost));
        assert!(!exports_lost_bitmap(
            &export(json!([{"node": "f0", "name": "b0"}])),
            &lost
        ));
    }
}
