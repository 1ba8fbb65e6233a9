//! Dirty bitmap commands: their arguments and how each one changes the
//! graph inside a transaction.

use blkgraph_graph::{BitmapOptions, BitmapRef, Transaction};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapName {
    node: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapAdd {
    node: String,
    name: String,
    #[serde(default)]
    granularity: Option<u64>,
    #[serde(default)]
    persistent: Option<bool>,
    #[serde(default)]
    disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum MergeSource {
    Name(String),
    Ref(BitmapName),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BitmapMerge {
    node: String,
    target: String,
    bitmaps: Vec<MergeSource>,
}

/// A dirty bitmap action (command or transaction action).
pub(super) enum BitmapAction {
    Add(BitmapAdd),
    Remove(BitmapName),
    Clear(BitmapName),
    Enable(BitmapName),
    Disable(BitmapName),
    Merge(BitmapMerge),
}

impl BitmapAction {
    /// Applies the action in `tx`.
    pub(super) fn apply(&self, tx: &mut Transaction<'_>) -> Result<(), blkgraph_graph::Error> {
        match self {
            BitmapAction::Add(a) => {
                let options = BitmapOptions {
                    granularity: a.granularity,
                    disabled: a.disabled.unwrap_or(false),
                    persistent: a.persistent.unwrap_or(false),
                };
                tx.bitmap_add(&a.node, &a.name, options)
            }
            BitmapAction::Remove(b) => tx.bitmap_remove(&b.node, &b.name),
            BitmapAction::Clear(b) => tx.bitmap_clear(&b.node, &b.name),
            BitmapAction::Enable(b) => tx.bitmap_set_recording(&b.node, &b.name, true),
            BitmapAction::Disable(b) => tx.bitmap_set_recording(&b.node, &b.name, false),
            BitmapAction::Merge(m) => {
                let sources: Vec<BitmapRef> = m
                    .bitmaps
                    .iter()
                    .map(|s| match s {
                        MergeSource::Name(name) => BitmapRef {
                            node: m.node.clone(),
                            name: name.clone(),
                        },
                        MergeSource::Ref(r) => BitmapRef {
                            node: r.node.clone(),
                            name: r.name.clone(),
                        },
                    })
                    .collect();
                tx.bitmap_merge(&m.node, &m.target, &sources)
            }
        }
    }
}
