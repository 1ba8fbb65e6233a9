//! blockdev-reopen: new options for existing nodes, all or nothing, as
//! QEMU's bdrv_reopen_multiple. Each entry names a node and gives its
//! options anew: the common options it omits go back to their defaults
//! (but `discard`, which stays, as in QEMU), the driver options it omits
//! stay as they are, and those it gives must be
//! unchanged unless reopen can change them (read-only, auto-read-only,
//! discard, detect-zeroes, cache.no-flush, the `backing` child and the
//! other children by node-name). Inline children (implicit nodes) follow
//! the inheritable options their parent's entry gives explicitly
//! (`read-only`, `discard`, `cache.no-flush`) unless they set them
//! themselves, as in QEMU.
//!
//! Three steps, in a drained transaction: the edges change first (undone
//! if anything fails); every driver prepares its new state (a file opened
//! again, a qcow2 image's bitmaps stored) before any node's options change;
//! then the options change. When the transaction commits, the drivers
//! commit, children before parents (a qcow2 image marks its bitmaps in use
//! through a file opened for writing already); when it is rolled back they
//! abort and the options and edges come back.

use std::sync::Arc;

use serde_json::Value;

use super::{Transaction, Undo};
use crate::driver::{ChildRole, Reopen};
use crate::error::Error;
use crate::node::{CacheOptions, CommonOptions, Node, NodeFlags, COMMON_KEYS};
use crate::open::prefix_key;
use crate::options::Options;

/// QEMU's text for an option reopen cannot change.
fn cannot_change(key: &str) -> Error {
    Error::OpenFailed(format!("Cannot change the option '{key}'"))
}

/// An option value in a form that compares keyval strings (`on`, `1M`
/// kept as given) with typed JSON values.
fn canonical(v: &Value) -> String {
    match v {
        Value::String(s) => match s.as_str() {
            "on" | "yes" | "true" => "true".into(),
            "off" | "no" | "false" => "false".into(),
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// Whether `node` is `target` or has it below.
fn reaches(node: &Arc<Node>, target: &Arc<Node>) -> bool {
    Arc::ptr_eq(node, target) || node.children().iter().any(|c| reaches(&c.node(), target))
}

/// The longest way down from `node` to a node without children: children
/// have less than their parents, so sorting by it puts children first.
fn height(node: &Node) -> usize {
    node.children()
        .iter()
        .map(|c| height(&c.node()) + 1)
        .max()
        .unwrap_or(0)
}

/// The options of a node as reopen sets them.
fn flags_from(common: &CommonOptions, given: Option<Options>) -> NodeFlags {
    NodeFlags {
        read_only: common.is_read_only(),
        discard: common.discard.unwrap_or_default(),
        no_flush: common.cache.and_then(|c| c.no_flush).unwrap_or(false),
        detect_zeroes: common.detect_zeroes.unwrap_or_default(),
        given,
    }
}

impl Transaction<'_> {
    /// blockdev-reopen: every entry (BlockdevOptions naming an existing
    /// node) is applied, or none. Run it in a drained transaction.
    pub fn reopen(&mut self, entries: Vec<Options>) -> Result<(), Error> {
        let mut staged = Vec::new();
        for (i, options) in entries.into_iter().enumerate() {
            // QAPI's errors (a member missing, of the wrong type) name the
            // list element, as QEMU's; a value's are the block layer's.
            self.reopen_entry(options, None, None, &mut staged)
                .map_err(|e| match e {
                    Error::InvalidOptions(text) if !text.contains("does not accept value") => {
                        Error::InvalidOptions(prefix_key(&text, &format!("options[{i}]")))
                    }
                    other => other,
                })?;
        }
        self.apply_reopen(staged)
    }

    /// Makes `node` read-only or writable, with the inline children it
    /// writes through (`file`, `data-file`): what a job does to the nodes
    /// it writes to for its duration (QEMU's bdrv_reopen_set_read_only).
    /// Run it in a drained transaction.
    pub(crate) fn set_read_only(&mut self, node: &Arc<Node>, read_only: bool) -> Result<(), Error> {
        let mut staged = Vec::new();
        let mut common = self.current_common(node);
        common.read_only = Some(read_only);
        let mut given = node.given_options();
        if let Some(g) = given.as_mut() {
            g.map.insert("read-only".into(), Value::Bool(read_only));
        }
        staged.push((node.clone(), flags_from(&common, given)));
        let explicit = CommonOptions {
            read_only: Some(read_only),
            ..CommonOptions::default()
        };
        self.cascade(node, &explicit, &mut staged);
        self.apply_reopen(staged)
    }

    /// A node's common options as they are now.
    fn current_common(&self, node: &Node) -> CommonOptions {
        CommonOptions {
            driver: node.driver_name().to_string(),
            node_name: Some(node.name().to_string()),
            read_only: Some(node.read_only()),
            discard: Some(node.discard_mode()),
            cache: Some(CacheOptions {
                direct: Some(node.direct()),
                no_flush: Some(node.no_flush()),
            }),
            detect_zeroes: Some(node.detect_zeroes()),
            ..CommonOptions::default()
        }
    }

    /// Stages the inline children that `node` writes through with the
    /// inheritable options its reopen gives explicitly (`explicit`), and
    /// theirs.
    fn cascade(&self, node: &Arc<Node>, explicit: &CommonOptions, staged: &mut Vec<Staged>) {
        for edge in node.children().iter() {
            let child = edge.node();
            if child.is_implicit() && edge.role() != ChildRole::Backing {
                self.stage_inherited(&child, explicit, staged);
            }
        }
    }

    /// Stages an inline child named in its parent's reopen without
    /// options of its own: it keeps its options, but for the inheritable
    /// ones the parent's entry gives explicitly (`explicit`) and the child
    /// did not set itself; and its inline children follow.
    fn stage_inherited(
        &self,
        child: &Arc<Node>,
        explicit: &CommonOptions,
        staged: &mut Vec<Staged>,
    ) {
        let given = child.given_options();
        let own = |key: &str| given.as_ref().is_some_and(|g| g.map.contains_key(key));
        let mut common = self.current_common(child);
        if explicit.read_only.is_some() && !own("read-only") {
            common.read_only = explicit.read_only;
        }
        if explicit.discard.is_some() && !own("discard") {
            common.discard = explicit.discard;
        }
        let no_flush = explicit.cache.and_then(|c| c.no_flush);
        if let (Some(no_flush), false, Some(cache)) = (no_flush, own("cache"), &mut common.cache) {
            cache.no_flush = Some(no_flush);
        }
        staged.retain(|(n, _)| !Arc::ptr_eq(n, child));
        staged.push((child.clone(), flags_from(&common, given)));
        self.cascade(child, explicit, staged);
    }

    /// Checks one entry (or an inline child's options, `implicit` being
    /// the child), changes the edges it changes and stages the new
    /// options of its node and of the inline children that follow it.
    fn reopen_entry(
        &mut self,
        mut options: Options,
        parent: Option<&CommonOptions>,
        implicit: Option<Arc<Node>>,
        staged: &mut Vec<Staged>,
    ) -> Result<(), Error> {
        let entry = options.clone();
        let mut common: CommonOptions = options.split_off(COMMON_KEYS).parse("")?;
        let explicit = common.clone();
        let node = match (implicit, &common.node_name) {
            (Some(child), Some(name)) if child.name() != name => {
                return Err(cannot_change("node-name"))
            }
            (Some(child), _) => child,
            (None, None) => return Err(Error::OpenFailed("node-name not specified".into())),
            (None, Some(name)) => self.node(name).map_err(|_| {
                Error::OpenFailed(format!("Failed to find node with node-name='{name}'"))
            })?,
        };
        if let Some(parent) = parent {
            common.inherit(parent);
        }
        // As QEMU: `discard` stays as it is when omitted; the other
        // common options go back to their defaults.
        let keep_discard = common.discard.is_none();
        common.discard = common.discard.or(Some(node.discard_mode()));
        common.check()?;
        if common.driver != node.driver_name() {
            return Err(cannot_change("driver"));
        }
        let old = node.given_options().ok_or_else(|| {
            Error::OpenFailed(format!(
                "Node '{}' was made by a job and cannot be reopened",
                node.name()
            ))
        })?;
        let old_force_share = old.map.get("force-share").map(canonical);
        let new_force_share = entry.map.get("force-share").map(canonical);
        if old_force_share.unwrap_or_else(|| "false".into())
            != new_force_share.unwrap_or_else(|| "false".into())
        {
            return Err(cannot_change("force-share"));
        }
        if common.direct() != node.direct() {
            return Err(cannot_change("cache.direct"));
        }
        let mut inline = Vec::new();
        for edge in node.children().iter() {
            let role = edge.role();
            let value = options.take(role.as_str());
            if role == ChildRole::Backing {
                self.reopen_backing(&node, value, &mut inline)?;
                continue;
            }
            let current = edge.node();
            match value {
                None => {
                    return Err(Error::InvalidOptions(format!(
                        "Parameter '{role}' is missing"
                    )))
                }
                Some(Value::String(name)) if name == current.name() => {
                    if current.is_implicit() {
                        inline.push((current, None));
                    }
                }
                Some(Value::String(name)) => {
                    let new = self.node(&name)?;
                    if reaches(&new, &node) {
                        return Err(Error::OpenFailed(format!(
                            "Making '{name}' a {role} child of '{}' would create a cycle",
                            node.name()
                        )));
                    }
                    let previous = edge.replace(new);
                    self.undo.push(Undo::Edge(edge.clone(), previous.clone()));
                    self.remove_orphans(vec![previous]);
                }
                Some(Value::Object(map)) if current.is_implicit() => {
                    let syntax = options.syntax;
                    inline.push((current, Some(Options { map, syntax })));
                }
                Some(Value::Object(_)) => return Err(cannot_change(role.as_str())),
                Some(_) => {
                    return Err(Error::InvalidOptions(format!(
                        "Invalid parameter type for '{role}', expected: BlockdevRef"
                    )))
                }
            }
        }
        // A backing child the node does not have yet.
        if let Some(value) = options.take(ChildRole::Backing.as_str()) {
            self.reopen_backing(&node, Some(value), &mut inline)?;
        }
        for (key, value) in &options.map {
            let same = old
                .map
                .get(key)
                .is_some_and(|v| canonical(v) == canonical(value));
            if !same {
                return Err(cannot_change(key));
            }
        }
        // The new options: the common ones as given, the driver's as they
        // were, changed by those given; children come from the edges.
        let mut given = old;
        for key in COMMON_KEYS {
            if !(keep_discard && *key == "discard") {
                given.map.remove(*key);
            }
        }
        for (key, value) in entry.map {
            if !node.children().iter().any(|c| c.role().as_str() == key) && key != "backing" {
                given.map.insert(key, value);
            }
        }
        staged.retain(|(n, _)| !Arc::ptr_eq(n, &node));
        staged.push((node.clone(), flags_from(&common, Some(given))));
        for (child, child_options) in inline {
            match child_options {
                Some(o) => self.reopen_entry(o, Some(&explicit), Some(child), staged)?,
                None => self.stage_inherited(&child, &explicit, staged),
            }
        }
        Ok(())
    }

    /// The `backing` option of a reopen: the same node, another one (by
    /// node-name), none (`null`), or the inline child's new options.
    fn reopen_backing(
        &mut self,
        node: &Arc<Node>,
        value: Option<Value>,
        inline: &mut Vec<(Arc<Node>, Option<Options>)>,
    ) -> Result<(), Error> {
        let current = node.backing();
        match value {
            None => {
                let named = node
                    .format_info()
                    .and_then(|f| f.backing_filename)
                    .is_some();
                if current.is_some() || named {
                    return Err(Error::OpenFailed(format!(
                        "backing is missing for '{}'",
                        node.name()
                    )));
                }
            }
            Some(Value::Null) => {
                if current.is_some() {
                    self.set_backing(node, None)?;
                }
            }
            Some(Value::String(name)) => {
                if current.as_ref().is_some_and(|c| c.name() == name) {
                    return Ok(());
                }
                let new = self.node(&name)?;
                if reaches(&new, node) {
                    return Err(Error::OpenFailed(format!(
                        "Making '{name}' a backing child of '{}' would create a cycle",
                        node.name()
                    )));
                }
                self.set_backing(node, Some(new))?;
            }
            Some(Value::Object(map)) => match current {
                Some(child) if child.is_implicit() => {
                    inline.push((
                        child,
                        Some(Options {
                            map,
                            syntax: crate::options::Syntax::Json,
                        }),
                    ));
                }
                _ => return Err(cannot_change("backing")),
            },
            Some(_) => {
                return Err(Error::InvalidOptions(
                    "Invalid parameter type for 'backing', expected: BlockdevRefOrNull".into(),
                ))
            }
        }
        Ok(())
    }

    /// Prepares every staged node's driver, then sets the nodes' options;
    /// the drivers commit when the transaction does.
    fn apply_reopen(&mut self, staged: Vec<Staged>) -> Result<(), Error> {
        for (node, new) in &staged {
            let bitmaps = node.bitmaps();
            node.driver().reopen_prepare(&Reopen {
                node: node.name(),
                was_read_only: node.read_only(),
                read_only: new.read_only,
                discard: new.discard,
                bitmaps: &bitmaps,
            })?;
            self.undo.push(Undo::Reopened(node.clone()));
        }
        for (node, new) in staged {
            if node.read_only() != new.read_only {
                self.made_read_only.retain(|n| !Arc::ptr_eq(n, &node));
                if new.read_only {
                    self.made_read_only.push(node.clone());
                }
            }
            self.undo.push(Undo::Flags(node.clone(), node.flags()));
            node.set_flags(new);
        }
        Ok(())
    }

    /// The drivers of the reopened nodes commit, children first.
    pub(super) fn commit_reopens(&mut self, nodes: Vec<Arc<Node>>) {
        let mut nodes: Vec<(usize, Arc<Node>)> =
            nodes.into_iter().map(|n| (height(&n), n)).collect();
        nodes.sort_by_key(|(h, _)| *h);
        for (_, node) in nodes {
            node.driver().reopen_commit();
        }
    }
}

/// A node and the options a reopen gives it.
type Staged = (Arc<Node>, NodeFlags);

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use serde_json::json;

    use crate::aio::block_on;
    use crate::drivers::qcow2::create::{create_image_file, Qcow2CreateOptions};
    use crate::{DrainParent, Graph, IoBuffer, Options, Permission, WriteFlags};

    struct Export;

    impl DrainParent for Export {
        fn drained_begin(&self) {}
        fn drained_end(&self) {}
    }

    fn json(v: serde_json::Value) -> Options {
        Options::from_json(v).unwrap()
    }

    /// Whether this process holds `path` open for writing (the access
    /// mode of each of its descriptors for the file, from /proc).
    fn open_for_writing(path: &Path) -> Vec<bool> {
        let mut modes = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let Ok(target) = std::fs::read_link(entry.path()) else {
                continue;
            };
            if target != path {
                continue;
            }
            let info = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
            let Ok(info) = std::fs::read_to_string(info) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            modes.push(flags & 3 != 0);
        }
        modes
    }

    fn write(graph: &Graph, node: &str) -> std::io::Result<()> {
        let node = graph.find(node).unwrap();
        let buf = IoBuffer::from_vec(vec![7u8; 4096]);
        block_on(node.write(0, &buf, WriteFlags::default())).unwrap()
    }

    /// Two raw images (`a`: read-only, `b`: writable under an export);
    /// qcow2 overlay `top` over `a` as its backing.
    fn setup(dir: &Path) -> (Graph, PathBuf) {
        let a = dir.join("a.raw");
        std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(dir.join("b.raw"), vec![0u8; 1 << 20]).unwrap();
        create_image_file(&dir.join("top.qcow2"), &Qcow2CreateOptions::new(1 << 20)).unwrap();
        let g = Graph::new();
        for o in [
            json!({"driver": "raw", "node-name": "a", "read-only": true,
                   "file": {"driver": "file", "node-name": "af", "filename": a}}),
            json!({"driver": "raw", "node-name": "b",
                   "file": {"driver": "file", "node-name": "bf",
                            "filename": dir.join("b.raw")}}),
            json!({"driver": "qcow2", "node-name": "top", "backing": "a",
                   "file": {"driver": "file", "node-name": "topf",
                            "filename": dir.join("top.qcow2")}}),
        ] {
            g.add(json(o)).unwrap();
        }
        g.attach_export(
            "e0",
            "b",
            Permission::CONSISTENT_READ | Permission::WRITE,
            Permission::ALL,
            std::sync::Arc::new(Export),
        )
        .unwrap();
        (g, a)
    }

    #[test]
    fn read_only_to_read_write_and_back_reopens_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (g, a) = setup(dir.path());
        assert_eq!(open_for_writing(&a), [false]);
        assert!(write(&g, "a").is_err());
        // Without an explicit read-only: false, the inline file keeps its
        // read-only (as in QEMU).
        let file_read_only = g
            .reopen(vec![json(
                json!({"driver": "raw", "node-name": "a", "file": "af"}),
            )])
            .map(|()| g.find("af").unwrap().read_only());
        assert!(matches!(file_read_only, Ok(true)), "{file_read_only:?}");
        g.reopen(vec![json(
            json!({"driver": "raw", "node-name": "a", "file": "af", "read-only": false}),
        )])
        .unwrap();
        assert!(!g.find("a").unwrap().read_only());
        assert!(
            !g.find("af").unwrap().read_only(),
            "the inline file follows"
        );
        assert_eq!(open_for_writing(&a), [true]);
        write(&g, "a").unwrap();
        let given = g.find("a").unwrap().given_options().unwrap();
        assert_eq!(given.map.get("read-only"), Some(&json!(false)));
        g.reopen(vec![json(
            json!({"driver": "raw", "node-name": "a", "file": "af", "read-only": true}),
        )])
        .unwrap();
        assert_eq!(open_for_writing(&a), [false]);
        assert!(write(&g, "a").is_err());
        assert_eq!(std::fs::read(&a).unwrap()[..4096], [7u8; 4096]);
    }

    #[test]
    fn a_failing_entry_rolls_back_the_whole_list() {
        let dir = tempfile::tempdir().unwrap();
        let (g, a) = setup(dir.path());
        let shape = |g: &Graph| {
            let mut v: Vec<String> = g
                .nodes()
                .iter()
                .map(|n| {
                    let children: Vec<String> = n
                        .children()
                        .iter()
                        .map(|c| c.node().name().to_string())
                        .collect();
                    format!(
                        "{} ro={} {:?} {:?} {}",
                        n.name(),
                        n.read_only(),
                        n.discard_mode(),
                        children,
                        serde_json::Value::Object(n.given_options().unwrap().map)
                    )
                })
                .collect();
            v.sort();
            v
        };
        let before = shape(&g);
        let e = g
            .reopen(vec![
                json(json!({"driver": "raw", "node-name": "a", "file": "af",
                            "discard": "unmap"})),
                json(
                    json!({"driver": "qcow2", "node-name": "top", "file": "topf",
                            "backing": null}),
                ),
                json(json!({"driver": "file", "node-name": "af", "filename": "/elsewhere"})),
            ])
            .unwrap_err();
        assert_eq!(e.to_string(), "Cannot change the option 'filename'");
        assert_eq!(shape(&g), before);
        assert_eq!(open_for_writing(&a), [false]);
        // The same change fails at commit (a parent writes b): nothing
        // changes either, and the file opened again is closed.
        let e = g
            .reopen(vec![
                json(json!({"driver": "raw", "node-name": "a", "file": "af", "read-only": false})),
                json(
                    json!({"driver": "qcow2", "node-name": "top", "file": "topf",
                            "backing": "b"}),
                ),
                json(json!({"driver": "raw", "node-name": "b", "file": "bf",
                            "read-only": true})),
            ])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Read-only block node 'b' cannot support read-write users"
        );
        assert_eq!(shape(&g), before);
        assert_eq!(open_for_writing(&a), [false]);
    }

    #[test]
    fn a_writer_keeps_a_node_writable() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = setup(dir.path());
        let e = g
            .reopen(vec![json(
                json!({"driver": "raw", "node-name": "b", "file": "bf", "read-only": true}),
            )])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Read-only block node 'b' cannot support read-write users"
        );
        assert!(!g.find("b").unwrap().read_only());
        write(&g, "b").unwrap();
    }

    #[test]
    fn the_blueprint_shows_the_new_options() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = setup(dir.path());
        g.reopen(vec![
            json(json!({"driver": "raw", "node-name": "a", "file": "af",
                        "read-only": false, "discard": "unmap"})),
            json(json!({"driver": "qcow2", "node-name": "top", "file": "topf", "backing": "b"})),
        ])
        .unwrap();
        let blueprint: Vec<serde_json::Value> = g
            .blueprint()
            .into_iter()
            .map(|o| serde_json::Value::Object(o.map))
            .collect();
        let entry = |name: &str| {
            blueprint
                .iter()
                .find(|o| o["node-name"] == name)
                .cloned()
                .unwrap()
        };
        let a = entry("a");
        assert_eq!(a["read-only"], json!(false));
        assert_eq!(a["discard"], json!("unmap"));
        assert_eq!(a["file"]["node-name"], json!("af"));
        assert_eq!(entry("top")["backing"], json!("b"));
    }

    #[test]
    fn detect_zeroes_unmap_deallocates_writes_of_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = setup(dir.path());
        let b = g.find("b").unwrap();
        let zeroes = IoBuffer::from_vec(vec![0u8; 1 << 20]);
        let status = || block_on(b.block_status(0, 1 << 20)).unwrap().unwrap();
        block_on(b.write(0, &zeroes, WriteFlags::default()))
            .unwrap()
            .unwrap();
        assert!(status().data, "written as data: detect-zeroes is off");
        let e = g
            .reopen(vec![json(
                json!({"driver": "raw", "node-name": "b", "file": "bf",
                                     "detect-zeroes": "unmap"}),
            )])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
        );
        g.reopen(vec![json(
            json!({"driver": "raw", "node-name": "b", "file": "bf",
                                  "detect-zeroes": "unmap", "discard": "unmap"}),
        )])
        .unwrap();
        block_on(b.write(0, &zeroes, WriteFlags::default()))
            .unwrap()
            .unwrap();
        let st = status();
        assert!(st.zero && !st.data, "{st:?}");
    }

    #[test]
    fn backing_switch_none_and_cycles() {
        let dir = tempfile::tempdir().unwrap();
        let (g, _) = setup(dir.path());
        let top = |b: serde_json::Value| {
            json(json!({"driver": "qcow2", "node-name": "top", "file": "topf", "backing": b}))
        };
        let e = g
            .reopen(vec![json(
                json!({"driver": "qcow2", "node-name": "top", "file": "topf"}),
            )])
            .unwrap_err();
        assert_eq!(e.to_string(), "backing is missing for 'top'");
        g.reopen(vec![top(json!("b"))]).unwrap();
        assert_eq!(g.find("top").unwrap().backing().unwrap().name(), "b");
        g.reopen(vec![top(json!(null))]).unwrap();
        assert!(g.find("top").unwrap().backing().is_none());
        let e = g.reopen(vec![top(json!("top"))]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Making 'top' a backing child of 'top' would create a cycle"
        );
        g.reopen(vec![top(json!("a"))]).unwrap();
        assert_eq!(g.find("top").unwrap().backing().unwrap().name(), "a");
    }
}
