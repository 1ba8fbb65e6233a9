//! Reproducers found with the fuzz targets in `fuzz/` (docs/robustness.md),
//! each fed through the entry points its target used: the bytes as a
//! `--blockdev` argument, opened in a graph. A refused input must be an
//! `Err`, never a panic or an abort.

use blkgraph_graph::{Graph, Options};

/// Opens `input` as the `options` target does with a `key=value` input.
fn open(input: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(input).map_err(|e| e.to_string())?;
    let options = Options::from_arg(text, None).map_err(|e| e.to_string())?;
    let graph = Graph::new();
    graph.add(options).map(drop).map_err(|e| e.to_string())
}

/// copy-before-write sized its per-cluster state (five byte vectors, one
/// entry per 64 KiB cluster) by its source when it opened, whatever that
/// size: over a 1 EiB source it asked for 16 TiB and the process aborted
/// ("memory allocation of 17592186044416 bytes failed"). It must open
/// (lazily) or refuse with an error: since 297067a the per-cluster state
/// is allocated fallibly and lazily.
#[test]
fn cbw_over_a_huge_source() {
    let input = b"driver=copy-before-write,node-name=c,file.driver=null-co,file.size=1E,\
target.driver=null-co,target.size=1E";
    if let Err(e) = open(input) {
        assert!(!e.is_empty());
    }
}
