//! Regression tests of the qcow2 driver for bugs found by the end-to-end
//! interop tests (tests/python/test_qcow2.py), each with its minimal
//! reproduction on images made by qemu-img.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

mod common;

use common::qemu_img;

use blkgraph_graph::aio::block_on;
use blkgraph_graph::{Graph, IoBuffer, Node, Options, WriteFlags, ZeroFlags};

const MIB: u64 = 1 << 20;

fn open(graph: &Graph, name: &str, image: &Path) -> Arc<Node> {
    let arg = format!(
        "driver=qcow2,node-name={name},file.driver=file,file.filename={}",
        image.display()
    );
    graph.add(Options::from_arg(&arg, None).unwrap()).unwrap()
}

fn read(node: &Node, offset: u64, len: u64) -> Vec<u8> {
    let buf = IoBuffer::from_vec(vec![0xeeu8; len as usize]);
    block_on(node.read(offset, &buf)).unwrap().unwrap();
    buf.into_vec()
}

/// An allocating write or write-zeroes over more than 1024 clusters was
/// sent to the file as one vectored write of more than UIO_MAXIOV
/// segments (one or more per cluster) and failed with EINVAL: e.g. a 5 MiB
/// write into a fresh image with 4 KiB clusters, or zeroing 5 MiB of a
/// compat 0.10 image (which has no zero clusters, so zeroes are written).
#[test]
fn allocating_writes_over_more_than_1024_clusters() {
    // (image options, a length of more than 1024 clusters)
    for (opts, len) in [
        ("cluster_size=4k", 5 * MIB),
        ("cluster_size=512,compat=0.10", MIB + 4096),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.qcow2");
        let size = 4 * len;
        common::create_qcow2(&image, opts, &size.to_string());
        let graph = Graph::new();
        let node = open(&graph, "q", &image);
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
        let buf = IoBuffer::from_vec(data.clone());
        // Unaligned: the first and last clusters are copied on write too.
        let at = len / 2 + 512;
        block_on(node.write(at, &buf, WriteFlags::default()))
            .unwrap()
            .unwrap_or_else(|e| panic!("{opts}: write of {len} bytes: {e}"));
        assert!(read(&node, at, len) == data, "{opts}: data");
        // Over data, and over nothing.
        for zero_at in [len, 5 * len / 2] {
            block_on(node.write_zeroes(zero_at, len, ZeroFlags::default()))
                .unwrap()
                .unwrap_or_else(|e| panic!("{opts}: zeroing {len} bytes at {zero_at}: {e}"));
        }
        let mut want = vec![0u8; size as usize];
        want[at as usize..][..len as usize].copy_from_slice(&data);
        want[len as usize..2 * len as usize].fill(0);
        assert!(
            read(&node, 0, size) == want,
            "{opts}: the image after zeroing"
        );
        drop(node);
        graph.remove("q").unwrap();
    }
}

/// Past the end of a backing file shorter than the image, a range no layer
/// allocated reads as zeroes, which QEMU counts as allocated in the layer
/// whose backing file is short (`qemu:allocation-depth` reports that
/// layer's depth, not 0).
#[test]
fn allocation_depth_past_a_short_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&base), "4M"]);
    let backing = |b: &str, img: &Path, size: &str| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            b,
            "-F",
            "qcow2",
            &p(img),
            size,
        ])
    };
    backing("base.qcow2", &mid, "8M");
    backing("mid.qcow2", &top, "16M");
    let graph = Graph::new();
    let node = open(&graph, "top", &top);
    // (offset, depth): inside base, past base inside mid, past mid.
    for (offset, depth) in [(0, 0), (5 * MIB, 3), (9 * MIB, 2)] {
        let st = block_on(node.block_status(offset, MIB)).unwrap().unwrap();
        assert_eq!(
            (st.depth, st.data, st.zero),
            (depth, false, true),
            "at {offset}: {st:?}"
        );
    }
}

/// The host cluster with `guest`'s data, from `qemu-img map`.
fn host_offset(image: &Path, guest: u64) -> u64 {
    let out = Command::new("qemu-img")
        .args([
            "map",
            "--output=json",
            "-f",
            "qcow2",
            image.to_str().unwrap(),
        ])
        .output()
        .expect("qemu-img runs");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let extent = map
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            let start = e["start"].as_u64().unwrap();
            (start..start + e["length"].as_u64().unwrap()).contains(&guest)
        })
        .unwrap();
    extent["offset"].as_u64().unwrap() + guest - extent["start"].as_u64().unwrap()
}

/// An image whose file ends before a cluster it uses (the data cluster's
/// growth of the file lost in a crash, a truncated copy) had the cluster
/// handed out again: the allocator took every cluster from the file's end
/// on for free without reading its refcount, so the next allocating write
/// shared it with the data it belongs to.
#[test]
fn clusters_past_the_end_of_the_file_are_not_allocated_again() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.qcow2");
    let path = image.to_str().unwrap();
    common::create_qcow2(&image, "cluster_size=64k", "4M");
    let cluster = 64 << 10;
    let written = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x41 0 64k", path])
        .status()
        .expect("qemu-io runs");
    assert!(written.success());
    let data = host_offset(&image, 0);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    assert_eq!(
        file.metadata().unwrap().len(),
        data + cluster,
        "the data is last"
    );
    file.set_len(data).unwrap();

    let graph = Graph::new();
    let node = open(&graph, "q", &image);
    let b = IoBuffer::from_vec(vec![0x42; cluster as usize]);
    block_on(node.write(cluster, &b, WriteFlags::default()))
        .unwrap()
        .unwrap();
    block_on(node.flush()).unwrap().unwrap();
    // Guest cluster 0 lost its data with the file's end (zeroes), but
    // not to guest cluster 1.
    let first = read(&node, 0, cluster);
    assert!(
        first.iter().all(|&b| b == 0),
        "cluster 0 reads {:#x}",
        first[0]
    );
    let second = read(&node, cluster, cluster);
    assert!(
        second.iter().all(|&b| b == 0x42),
        "cluster 1 reads {:#x}",
        second[0]
    );
    drop(node);
    graph.remove("q").unwrap();
    assert_ne!(host_offset(&image, cluster), data);
    qemu_img(&["check", "-q", path]);
}
