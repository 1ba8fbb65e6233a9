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

/// Resident memory of this process in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Found by the options target once the abort above was fixed: over a
/// 1 PiB source copy-before-write's per-cluster sets can be had (2 GiB
/// each, lazily zeroed), but the set of clusters to copy was filled with
/// ones and then cloned, which wrote 4 GiB: one blockdev-add took that
/// much resident memory (more over a larger source, up to what the
/// machine has). An all-true set must cost no more than an all-false one;
/// 256 TiB (1 GiB written before the fix) keeps the test quick.
#[test]
fn cbw_over_a_huge_source_stays_lazy() {
    let input = "driver=copy-before-write,node-name=c,file.driver=null-co,file.size=256T,\
target.driver=null-co,target.size=256T";
    let graph = Graph::new();
    let before = rss();
    let node = graph.add(Options::from_arg(input, None).unwrap());
    let grown = rss().saturating_sub(before);
    assert!(node.is_ok(), "{:?}", node.err());
    assert!(
        grown < 128 << 20,
        "opening used {} MiB of resident memory",
        grown >> 20
    );
}

/// Found while teaching the qmp_commands fuzz target blockdev-create: a
/// qcow2 image whose header names the image itself as its backing file
/// (blockdev-create with `backing-file`), then opened. The driver opens the
/// backing file a header names, which opened the same image again, and so
/// on until the stack overflowed and the process died (SIGSEGV). One
/// blockdev-add of such an image took the daemon down. Opening now stops
/// after MAX_OPEN_DEPTH nested nodes, with an error.
#[test]
fn a_qcow2_image_that_backs_itself() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("self.qcow2");
    let image_arg = image.to_str().unwrap();
    for args in [
        &["create", "-q", "-f", "qcow2", image_arg, "1M"][..],
        &["rebase", "-u", "-b", image_arg, "-F", "qcow2", image_arg][..],
    ] {
        let status = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .expect("qemu-img runs");
        assert!(status.success(), "qemu-img {args:?}");
    }
    let input = format!("driver=qcow2,node-name=q,file.driver=file,file.filename={image_arg}");
    // A stack that holds the allowed nesting in a debug build too; without
    // the limit the recursion overflows it (or runs out of descriptors).
    let opened = std::thread::Builder::new()
        .stack_size(32 << 20)
        .spawn(move || open(input.as_bytes()))
        .unwrap()
        .join()
        .unwrap();
    let error = opened.expect_err("an image that backs itself opened");
    assert!(error.contains("Too many nested images"), "{error}");
}
