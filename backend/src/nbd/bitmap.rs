//! Dirty bitmaps as NBD exports see them (`qemu:dirty-bitmap:NAME`).
//!
//! The NBD code only reads bitmaps through [`BitmapSource`]; which bitmaps
//! exist is the graph's business, reached through [`find_bitmap`].

use std::fmt;
use std::sync::Arc;

use blkgraph_graph::{ChildRole, DirtyBitmap, Graph, Node};

/// A dirty bitmap an NBD export publishes as `qemu:dirty-bitmap:NAME`.
///
/// Implementations must be cheap to query from many connection threads at
/// once and must not block on I/O: `extents` is called on a connection's
/// request thread.
pub trait BitmapSource: Send + Sync {
    /// The bitmap's name: the context is `qemu:dirty-bitmap:` + this name.
    fn name(&self) -> String;

    /// The dirty state of `[offset, offset + len)`, as consecutive runs
    /// `(length, dirty)` starting exactly at `offset`, each longer than 0.
    /// The runs may stop before `offset + len` (the client asks again for
    /// the rest) or go past it (the surplus is cut off); adjacent runs may
    /// have the same state. `offset + len` never exceeds the export size.
    fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)>;
}

/// One entry of block-export-add's `bitmaps` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BitmapRef {
    /// A bitmap name, looked up on the exported node and the nodes below it.
    Local(String),
    /// A bitmap on a given node (`{"node": N, "name": B}`, QEMU 7.1).
    External {
        /// The node-name of the node holding the bitmap.
        node: String,
        /// The bitmap's name.
        name: String,
    },
}

impl fmt::Display for BitmapRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BitmapRef::Local(name) => f.write_str(name),
            BitmapRef::External { node, name } => write!(f, "{node}/{name}"),
        }
    }
}

/// A dirty bitmap of the graph, as an export reads it.
struct GraphBitmap(Arc<DirtyBitmap>);

impl BitmapSource for GraphBitmap {
    fn name(&self) -> String {
        self.0.name().to_string()
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        self.0.extents(offset, len)
    }
}

/// Resolves a `bitmaps` entry of an NBD export on `node` (the exported
/// node) in `graph`, for an export that is `writable` or not; the error
/// text is the QMP error.
///
/// QEMU's rules: a [`BitmapRef::Local`] name is looked up on `node`, then
/// down its `file`/`backing` children, first match wins, else `Bitmap 'NAME'
/// is not found`; a [`BitmapRef::External`] is looked up on exactly that
/// node. A read-only export refuses a bitmap that still records writes to a
/// writable node (`Enabled bitmap 'NAME' incompatible with readonly
/// export`): what it publishes would change under the client. The export
/// keeps the returned `Arc` until it is deleted.
pub fn find_bitmap(
    graph: &Graph,
    node: &Arc<Node>,
    bitmap: &BitmapRef,
    writable: bool,
) -> Result<Arc<dyn BitmapSource>, String> {
    let (holder, found) = match bitmap {
        BitmapRef::Local(name) => {
            let mut cur = Some(node.clone());
            let mut found = None;
            while let Some(n) = cur {
                if let Some(b) = n.bitmap(name) {
                    found = Some((n, b));
                    break;
                }
                cur = n
                    .children()
                    .iter()
                    .find(|c| matches!(c.role(), ChildRole::File | ChildRole::Backing))
                    .map(|c| c.node());
            }
            found.ok_or_else(|| format!("Bitmap '{name}' is not found"))?
        }
        BitmapRef::External { node, name } => {
            let holder = graph.find(node).map_err(|e| e.to_string())?;
            let b = holder
                .bitmap(name)
                .ok_or_else(|| format!("Dirty bitmap '{name}' not found"))?;
            (holder, b)
        }
    };
    found.usable(false).map_err(|e| e.to_string())?;
    if !writable && !holder.read_only() && found.recording() {
        return Err(format!(
            "Enabled bitmap '{}' incompatible with readonly export",
            found.name()
        ));
    }
    Ok(Arc::new(GraphBitmap(found)))
}

/// A bitmap held in memory, for tests: one bit per `granularity` bytes.
#[cfg(test)]
pub(crate) struct TestBitmap {
    pub(crate) name: String,
    pub(crate) granularity: u64,
    pub(crate) bits: Vec<bool>,
}

#[cfg(test)]
impl BitmapSource for TestBitmap {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn extents(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let bit = (pos / self.granularity) as usize;
            let dirty = self.bits.get(bit).copied().unwrap_or(false);
            let next = ((bit as u64) + 1) * self.granularity;
            let run = next.min(end) - pos;
            match out.last_mut() {
                Some((l, d)) if *d == dirty => *l += run,
                _ => out.push((run, dirty)),
            }
            pos += run;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_follow_qemus_rules() {
        let graph = Graph::new();
        let add = |s: &str| {
            graph
                .add(blkgraph_graph::Options::from_arg(s, None).unwrap())
                .unwrap()
        };
        add("driver=null-co,node-name=n0,size=1M");
        add("driver=raw,node-name=top,file=n0");
        let top = graph.find("top").unwrap();
        let n0 = graph.find("n0").unwrap();
        let local = |n: &str| BitmapRef::Local(n.into());
        let e = find_bitmap(&graph, &top, &local("b0"), true).err().unwrap();
        assert_eq!(e, "Bitmap 'b0' is not found");
        // Found below the exported node, through its file child.
        assert!(n0.add_bitmap(Arc::new(
            DirtyBitmap::new("b0", 1 << 20, 65536, true).unwrap()
        )));
        let b = find_bitmap(&graph, &top, &local("b0"), true).ok().unwrap();
        assert_eq!(b.name(), "b0");
        // A recording bitmap of a writable node is refused for read-only exports.
        let e = find_bitmap(&graph, &top, &local("b0"), false)
            .err()
            .unwrap();
        assert_eq!(e, "Enabled bitmap 'b0' incompatible with readonly export");
        n0.bitmap("b0").unwrap().set_recording(false);
        n0.bitmap("b0").unwrap().set_range(65536, 65536);
        let b = find_bitmap(&graph, &top, &local("b0"), false).ok().unwrap();
        assert_eq!(
            b.extents(0, 196608),
            vec![(65536, false), (65536, true), (65536, false)]
        );
        let ext = |node: &str, name: &str| BitmapRef::External {
            node: node.into(),
            name: name.into(),
        };
        assert_eq!(ext("n0", "b1").to_string(), "n0/b1");
        assert!(find_bitmap(&graph, &top, &ext("n0", "b0"), false).is_ok());
        let e = find_bitmap(&graph, &top, &ext("top", "b0"), false)
            .err()
            .unwrap();
        assert_eq!(e, "Dirty bitmap 'b0' not found");
        assert!(find_bitmap(&graph, &top, &ext("nope", "b0"), false).is_err());
    }

    #[test]
    fn test_bitmap_runs() {
        let b = TestBitmap {
            name: "b".into(),
            granularity: 4,
            bits: vec![true, true, false, true],
        };
        assert_eq!(b.extents(2, 12), vec![(6, true), (4, false), (2, true)]);
    }
}
