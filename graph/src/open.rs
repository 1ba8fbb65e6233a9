//! Opening nodes: a driver's table entry, the staged opening of a node and
//! its inline children (registered only if the whole open succeeds), and
//! what a driver's `open` gets. QEMU's limits on node-names and sizes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::bitmap::DirtyBitmap;
use crate::driver::{BlockDriver, ChildRole};
use crate::error::Error;
use crate::node::{Child, CommonOptions, Node, COMMON_KEYS, MAX_LENGTH};
use crate::options::Options;
use crate::permission::Parent;
use crate::throttle_group::ThrottleGroup;

/// A driver's open function: builds an instance from the driver's own
/// options (the common ones are in the context).
pub type OpenFn = fn(&mut OpenContext<'_, '_>, Options) -> Result<Box<dyn BlockDriver>, Error>;

/// An entry of the driver table.
pub struct DriverEntry {
    /// The name used in `driver=`.
    pub name: &'static str,
    /// Opens an instance.
    pub open: OpenFn,
}

/// Nodes opened by one graph operation, registered only if it succeeds.
pub(crate) struct Staging<'g> {
    /// The driver table.
    pub(crate) drivers: &'static [DriverEntry],
    pub(crate) existing: &'g BTreeMap<String, Arc<Node>>,
    pub(crate) events: Option<crate::EventSink>,
    pub(crate) groups: &'g BTreeMap<String, Arc<ThrottleGroup>>,
    pub(crate) created: Vec<Arc<Node>>,
    pub(crate) counter: &'g mut u64,
    /// Whether the options come from a blueprint, where a node the graph
    /// named (`#blockNNN`) keeps its name.
    pub(crate) restoring: bool,
    /// How many opens are in progress, each inside the one before (a
    /// node's children are opened while the node is).
    pub(crate) depth: usize,
}

/// The most nodes one open may nest (a backing chain from image headers,
/// inline children): each level takes about 8 KiB of the stack of the
/// thread that runs the command. A qcow2 image whose header names itself
/// as its backing file would nest for ever.
pub const MAX_OPEN_DEPTH: usize = 128;

impl Staging<'_> {
    fn lookup(&self, name: &str) -> Option<Arc<Node>> {
        self.existing
            .get(name)
            .cloned()
            .or_else(|| self.created.iter().find(|n| n.name() == name).cloned())
    }

    /// Opens a node from its options; inline children are opened too.
    pub(crate) fn open(
        &mut self,
        options: Options,
        parent: Option<&CommonOptions>,
    ) -> Result<Arc<Node>, Error> {
        if self.depth >= MAX_OPEN_DEPTH {
            return Err(Error::OpenFailed(format!(
                "Too many nested images: more than {MAX_OPEN_DEPTH} levels of children \
                 (does a backing file chain loop?)"
            )));
        }
        self.depth += 1;
        let result = self.open_nested(options, parent);
        self.depth -= 1;
        result
    }

    fn open_nested(
        &mut self,
        mut options: Options,
        parent: Option<&CommonOptions>,
    ) -> Result<Arc<Node>, Error> {
        let mut given = options.clone();
        let mut common: CommonOptions = options.split_off(COMMON_KEYS).parse("")?;
        if let Some(parent) = parent {
            common.inherit(parent);
        }
        common.check()?;
        let restored_implicit = match &common.node_name {
            Some(name) if self.restoring => implicit_name_number(name),
            _ => None,
        };
        let name = match &common.node_name {
            Some(name) => {
                let taken = self.lookup(name).is_some();
                match restored_implicit {
                    None => check_node_name(name, taken)?,
                    Some(_) if taken => return Err(Error::DuplicateNodeName(name.clone())),
                    Some(number) => *self.counter = (*self.counter).max(number),
                }
                name.clone()
            }
            None if parent.is_some() => {
                *self.counter += 1;
                format!("#block{:03}", *self.counter)
            }
            None => {
                return Err(Error::InvalidOptions(
                    "Parameter 'node-name' is missing".into(),
                ))
            }
        };
        let entry = self
            .drivers
            .iter()
            .find(|d| d.name == common.driver)
            .ok_or_else(|| Error::UnknownDriver(common.driver.clone()))?;
        let mut ctx = OpenContext {
            staging: self,
            name: name.clone(),
            common,
            children: Vec::new(),
            bitmaps: Vec::new(),
        };
        let driver = (entry.open)(&mut ctx, options)?;
        if driver.size() > MAX_LENGTH {
            return Err(Error::TooLarge);
        }
        let OpenContext {
            common,
            children,
            bitmaps,
            ..
        } = ctx;
        for child in &children {
            given.map.remove(child.role().as_str());
        }
        let node = Arc::new(Node::new(
            name,
            entry.name,
            driver,
            &common,
            children,
            parent.is_some() || restored_implicit.is_some(),
            Some(given),
        ));
        for bitmap in bitmaps {
            node.add_bitmap(bitmap);
        }
        self.created.push(node.clone());
        Ok(node)
    }
}

/// What a driver's `open` gets: the common options and a way to open or
/// reference its children.
pub struct OpenContext<'s, 'g> {
    staging: &'s mut Staging<'g>,
    name: String,
    /// The node's common options.
    pub common: CommonOptions,
    children: Vec<Arc<Child>>,
    bitmaps: Vec<Arc<DirtyBitmap>>,
}

impl OpenContext<'_, '_> {
    /// Opens the child given under `role` in `options`: a node-name
    /// reference or inline options. `Ok(None)` if absent.
    pub fn child(
        &mut self,
        options: &mut Options,
        role: ChildRole,
    ) -> Result<Option<Arc<Child>>, Error> {
        let key = role.as_str();
        let node = match options.take(key) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(name)) => self
                .staging
                .lookup(&name)
                .ok_or(Error::ReferenceNotFound(name))?,
            Some(Value::Object(map)) => {
                let child_opts = Options {
                    map,
                    syntax: options.syntax,
                };
                let parent = self.common.clone();
                self.staging
                    .open(child_opts, Some(&parent))
                    .map_err(|e| match e {
                        Error::InvalidOptions(text) => {
                            Error::InvalidOptions(prefix_key(&text, key))
                        }
                        other => other,
                    })?
            }
            Some(_) => {
                return Err(Error::InvalidOptions(format!(
                    "Invalid parameter type for '{key}', expected: BlockdevRef"
                )))
            }
        };
        let child = Child::new(Parent::Node(self.name.clone()), role, node);
        self.children.push(child.clone());
        Ok(Some(child))
    }

    /// Gives the node a dirty bitmap its driver loaded from the image.
    pub fn add_bitmap(&mut self, bitmap: DirtyBitmap) {
        self.bitmaps.push(Arc::new(bitmap));
    }

    /// The node-name of the node being opened.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// A node of the graph being built, by name.
    pub fn node(&self, name: &str) -> Result<Arc<Node>, Error> {
        self.staging
            .lookup(name)
            .ok_or_else(|| Error::NodeNotFound(name.to_string()))
    }

    /// Where driver events (e.g. a snapshot that broke) go.
    pub fn events(&self) -> Option<crate::EventSink> {
        self.staging.events.clone()
    }

    /// The throttle group object `id`.
    pub fn throttle_group(&self, id: &str) -> Result<Arc<ThrottleGroup>, Error> {
        self.staging
            .groups
            .get(id)
            .cloned()
            .ok_or_else(|| Error::OpenFailed(format!("No throttle group '{id}'")))
    }

    /// Like [`OpenContext::child`], but the child must be given.
    pub fn required_child(
        &mut self,
        options: &mut Options,
        role: ChildRole,
    ) -> Result<Arc<Child>, Error> {
        self.child(options, role)?
            .ok_or_else(|| Error::InvalidOptions(format!("Parameter '{role}' is missing")))
    }
}

/// Prefixes the key named in a QMP error text with `role.`.
pub(crate) fn prefix_key(text: &str, role: &str) -> String {
    match text.split_once('\'') {
        Some((head, rest)) => format!("{head}'{role}.{rest}"),
        None => text.to_string(),
    }
}

/// QEMU's rule for ids: a letter, then letters, digits, `-`, `.` and `_`.
/// A node-name must also be at most [`MAX_NODE_NAME_LEN`] bytes long.
pub fn valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// Checks the name of a new node as QEMU does, in QEMU's order: its
/// characters ([`valid_node_name`]), whether it is `taken`, its length.
pub(crate) fn check_node_name(name: &str, taken: bool) -> Result<(), Error> {
    if !valid_node_name(name) {
        return Err(Error::InvalidNodeName(name.to_string()));
    }
    if taken {
        return Err(Error::DuplicateNodeName(name.to_string()));
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return Err(Error::NodeNameTooLong);
    }
    Ok(())
}

/// The number of a name the graph gave a node (`#blockNNN`).
fn implicit_name_number(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("#block")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The longest node-name, in bytes: QEMU keeps node-names in 32 bytes
/// with the terminating NUL.
pub const MAX_NODE_NAME_LEN: usize = 31;

#[cfg(test)]
mod tests {
    use crate::{Graph, Options, MAX_NODE_NAME_LEN};

    /// QEMU's node-name rules and texts: well-formed first, then unique,
    /// then at most 31 bytes.
    #[test]
    fn node_names_are_checked_as_qemu_does() {
        let graph = Graph::new();
        let add = |name: &str| {
            let arg = format!("driver=null-co,node-name={name}");
            graph.add(Options::from_arg(&arg, None).unwrap())
        };
        let longest = "a".repeat(MAX_NODE_NAME_LEN);
        add(&longest).unwrap();
        let e = add(&longest).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Duplicate nodes with node-name='{longest}'")
        );
        for long in ["b".repeat(32), "c".repeat(200)] {
            assert_eq!(add(&long).unwrap_err().to_string(), "Node name too long");
        }
        let bad = format!("1{}", "d".repeat(40));
        let e = add(&bad).unwrap_err();
        assert_eq!(e.to_string(), format!("Invalid node-name: '{bad}'"));
        assert_eq!(graph.nodes().len(), 1);
    }
}
