//! Interop in: qcow2 images made by QEMU's own tools read back exactly
//! through the daemon's vhost-user-blk export and its NBD export.
//!
//! Every image is made with `qemu-img convert`/`create` and changed with
//! `qemu-io` (unaligned writes over data and compressed clusters, zero
//! clusters with and without unmap, discards, subcluster writes), in
//! each of the shapes the qcow2 driver must read: cluster sizes 512, 4k,
//! 64k and 2M, compat 0.10 and 1.1, extended L2 entries, lazy refcounts,
//! zlib and zstd compressed clusters, and a backing chain of three with
//! data, zero clusters and discarded clusters at every layer, whose
//! backing file names are relative to the images' directory, and a chain
//! whose backing files (one raw) are shorter than the image.
//!
//! The reference is what QEMU reads: `qemu-img convert -O raw` of the
//! image. The daemon serves the image writable (as a user would) on both
//! exports at once:
//! - vhost-user: the whole disk is read with the host-side frontend in
//!   requests of varied lengths and offsets, eight at a time, and compared
//!   byte for byte;
//! - NBD: `qemu-img compare` of the export (as raw) with the reference,
//!   and `nbdcopy` of the export to a file (it skips what base:allocation
//!   calls zero, so block status is checked too) compared byte for byte.
//!
//! After the daemon stops, `qemu-img check` must find the image clean and
//! `qemu-img compare` must find it unchanged: opening, reading and closing
//! damaged nothing.
//!
//! The same tests run against qemu-storage-daemon with
//! `BLKGRAPH_TEST_DAEMON=qsd`.

mod frontend;
mod tools;

use std::path::{Path, PathBuf};

use blkgraph_tests::{
    compare_bytes, create_sparse_image, fill_pattern, write_file_range, Daemon, DaemonKind,
    ExportOptions, TempDir,
};
use frontend::blk::*;
use frontend::driver::{Driver, Queue};
use tools::{assert_check_clean, convert_to_raw, qemu_img_compare, qemu_io, run, s};
use vm_memory::GuestMemoryMmap;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// An image to read: its top file and QEMU's reading of it.
struct Built {
    image: PathBuf,
    reference: PathBuf,
    size: u64,
}

/// The virtual size for clusters of `cs` bytes: room for the layout of
/// [`data_regions`] and [`changes`].
fn size_for(cs: u64) -> u64 {
    (16 * MIB).max(24 * cs)
}

/// Regions of the source that hold data (pattern `seed`); the rest is a
/// hole. They straddle clusters and start and end inside them.
fn data_regions(cs: u64, size: u64) -> Vec<(u64, u64)> {
    vec![
        (0, 2 * cs + cs / 2 + 512),
        (8 * cs + 1024, 3 * cs),
        (size / 2 - 7 * 512, 5 * cs),
        (size - 3 * cs - 512, 3 * cs + 512),
    ]
}

/// A raw file of `size` bytes with pattern `seed` in `regions`, holes
/// elsewhere.
fn source(path: &Path, size: u64, seed: u64, regions: &[(u64, u64)]) {
    create_sparse_image(path, size).unwrap();
    for &(off, len) in regions {
        let mut buf = vec![0u8; len as usize];
        fill_pattern(&mut buf, off, seed);
        write_file_range(path, off, &buf).unwrap();
    }
}

/// qemu-io changes to an image of clusters of `cs` bytes: partial writes
/// over data and over holes, zero clusters with and without unmap, an
/// unaligned zeroing, a discard over data, and (with subclusters of `sub`
/// bytes) writes and zeroes of single subclusters.
fn changes(cs: u64, size: u64, sub: Option<u64>) -> Vec<String> {
    let mut c = vec![
        format!("write -P 0x5a {} {}", cs + cs / 2, cs),
        format!("write -P 0x6b {} 1024", 12 * cs + 512),
        format!("write -z {} {}", 8 * cs, 2 * cs),
        format!("write -z -u {} {}", size / 2, cs),
        format!("write -z {} {}", 14 * cs + 512, cs),
        format!("discard {} {}", size - 2 * cs, cs),
        format!("write -P 0x7c {} {}", size - 3 * cs - 1024, 2048),
    ];
    if let Some(sub) = sub {
        c.extend([
            format!("write -P 0x7d {} {}", 16 * cs + 3 * sub, 2 * sub),
            format!("write -P 0x7e {} 512", 16 * cs + 9 * sub + 512),
            format!("write -z {} {}", 16 * cs + 10 * sub, sub),
            format!("write -z {} {}", 9 * cs + 5 * sub, 4 * sub),
            format!("write -z -u {} {}", 10 * cs + 30 * sub, 2 * sub),
        ]);
    }
    c
}

/// Makes `disk.qcow2` in `dir` with `qemu-img convert [-c] -o opts` from a
/// pattern source, applies [`changes`], and writes the reference.
fn build(dir: &Path, cs: u64, opts: &str, compress: bool, sub: Option<u64>) -> Built {
    let size = size_for(cs);
    let src = dir.join("src.raw");
    source(&src, size, 0x51, &data_regions(cs, size));
    let image = dir.join("disk.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if compress {
        args.push("-c");
    }
    let o = format!("cluster_size={cs}{opts}");
    args.extend(["-o", &o, s(&src), s(&image)]);
    run("qemu-img", &args);
    qemu_io("qcow2", s(&image), &changes(cs, size, sub));
    finish(dir, image, size)
}

/// Checks the image QEMU made and writes QEMU's reading of it.
fn finish(dir: &Path, image: PathBuf, size: u64) -> Built {
    assert_check_clean(&image);
    let reference = dir.join("reference.raw");
    convert_to_raw("qcow2", &image, &reference);
    Built {
        image,
        reference,
        size,
    }
}

/// base <- mid <- top, clusters of 4k, 64k and 16k, with data written at
/// every layer, zero clusters in mid and top over data below, a discard in
/// top over base data (a zero cluster on v3, so base stays hidden), and
/// ranges no layer holds. The backing file names are relative.
fn build_chain(dir: &Path) -> Built {
    let size = 16 * MIB;
    let src = dir.join("src.raw");
    source(
        &src,
        size,
        0xba5e,
        &[(0, 3 * MIB), (4 * MIB + 4 * KIB, MIB), (12 * MIB, 4 * MIB)],
    );
    let base = dir.join("base.qcow2");
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            s(&src),
            s(&base),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=64k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            s(&mid),
        ],
    );
    qemu_io(
        "qcow2",
        s(&mid),
        &[
            "write -P 0x11 1M 1536k".into(),
            "write -P 0x12 5M 64k".into(),
            "write -P 0x13 8196k 4k".into(),
            "write -z 2560k 128k".into(),
            "write -z -u 13M 64k".into(),
            "discard 14M 128k".into(),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=16k",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(
        "qcow2",
        s(&top),
        &[
            "write -P 0x21 2052k 8k".into(),
            "write -P 0x22 4M 512".into(),
            "write -P 0x23 10M 48k".into(),
            "write -z 1088k 32k".into(),
            "write -z -u 12M 16k".into(),
            "discard 15M 64k".into(),
            "write -P 0x24 16320k 64k".into(),
        ],
    );
    assert_check_clean(&base);
    assert_check_clean(&mid);
    finish(dir, top, size)
}

/// base (4 MiB, raw) <- mid (8 MiB) <- top (16 MiB): what lies past the end
/// of a backing file reads as zeroes, also where a copy-on-write cluster
/// straddles that end.
fn build_short_chain(dir: &Path) -> Built {
    let base = dir.join("base.raw");
    source(&base, 4 * MIB, 0x5407, &[(0, 4 * MIB)]);
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "8M",
        ],
    );
    qemu_io(
        "qcow2",
        s(&mid),
        &[
            "write -P 0x31 4092k 8k".into(),
            "write -P 0x32 6M 64k".into(),
        ],
    );
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            s(&top),
            "16M",
        ],
    );
    qemu_io(
        "qcow2",
        s(&top),
        &[
            "write -P 0x41 1M 4k".into(),
            "write -P 0x42 8188k 8k".into(),
            "write -P 0x43 4100k 4k".into(),
        ],
    );
    assert_check_clean(&mid);
    finish(dir, top, 16 * MIB)
}

/// Reads the whole disk through `d` in requests of varied lengths (1 to
/// 2048 sectors, so they start and end anywhere in a cluster), eight at a
/// time.
fn read_disk(d: &mut Driver, size: u64) -> Vec<u8> {
    let mem: GuestMemoryMmap = d.mem.clone();
    let q: &mut Queue = &mut d.queues[0];
    let mut out = vec![0u8; size as usize];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut pos = 0u64;
    while pos < size {
        let mut batch = Vec::new();
        while batch.len() < 8 && pos < size {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = ((rng % 2048 + 1) * 512).min(size - pos);
            let req = BlkRequest::new(q, &mem, T_IN, pos / 512, &[], len as u32);
            let head = q.submit(&mem, &req.descs);
            batch.push((head, pos, req));
            pos += len;
        }
        q.kick();
        let mut used = Vec::new();
        while used.len() < batch.len() {
            used.extend(q.wait(&mem, 1));
        }
        for u in used {
            let (_, off, req) = batch
                .iter()
                .find(|(h, _, _)| *h == u.head)
                .expect("a request we submitted");
            let o = req.outcome(&mem, u);
            assert_eq!(o.status, S_OK, "read of {} bytes at {off}", o.data.len());
            out[*off as usize..][..o.data.len()].copy_from_slice(&o.data);
        }
    }
    out
}

/// Serves `b.image` with the daemon under test on vhost-user and NBD, and
/// checks every reading against the reference.
fn check_reads(dir: &TempDir, b: &Built) {
    let reference = std::fs::read(&b.reference).unwrap();
    assert_eq!(reference.len() as u64, b.size);
    let mut o = ExportOptions::new(&b.image, &dir.path().join("vhost-user-blk.sock"));
    o.format = "qcow2".into();
    o.nbd_socket = Some(dir.path().join("nbd.sock"));
    let kind = DaemonKind::from_env();
    let mut daemon = Daemon::start(kind, &o.args(), dir.path(), &o.socket)
        .unwrap_or_else(|e| panic!("starting the daemon failed: {e}"));

    let mut d = Driver::connect(&o.socket, 1, true);
    assert_eq!(d.capacity() * 512, b.size, "capacity");
    let got = read_disk(&mut d, b.size);
    drop(d);
    compare_bytes(&got, &reference, 0).unwrap_or_else(|e| {
        panic!(
            "{kind:?}: vhost-user read of {} differs from qemu-img's: {e}",
            b.image.display()
        )
    });

    let uri = o.nbd_uri().expect("NBD export");
    qemu_img_compare("raw", &uri, "raw", s(&b.reference))
        .unwrap_or_else(|e| panic!("{kind:?}: NBD export differs from qemu-img's reading: {e}"));
    let copy = dir.path().join("nbdcopy.raw");
    run("nbdcopy", &[&uri, s(&copy)]);
    let copied = std::fs::read(&copy).unwrap();
    assert_eq!(copied.len() as u64, b.size, "nbdcopy size");
    compare_bytes(&copied, &reference, 0)
        .unwrap_or_else(|e| panic!("{kind:?}: nbdcopy of the NBD export differs: {e}"));

    let status = daemon.stop().expect("the daemon ran");
    assert!(
        status.success(),
        "{kind:?} exited with {status}; log:\n{}",
        daemon.log_contents()
    );
    assert_check_clean(&b.image);
    qemu_img_compare("qcow2", s(&b.image), "raw", s(&b.reference))
        .unwrap_or_else(|e| panic!("the image changed while served: {e}"));
    eprintln!("{kind:?}: {} read back exactly", b.image.display());
}

fn interop(cs: u64, opts: &str, compress: bool, sub: Option<u64>) {
    let dir = TempDir::new("blkgraph-qcow2-in").unwrap();
    let b = build(dir.path(), cs, opts, compress, sub);
    check_reads(&dir, &b);
}

#[test]
fn cluster_512() {
    interop(512, "", false, None);
}

#[test]
fn cluster_4k() {
    interop(4 * KIB, "", false, None);
}

#[test]
fn cluster_64k_compat_0_10() {
    interop(64 * KIB, ",compat=0.10", false, None);
}

#[test]
fn cluster_64k_compat_1_1_refcount_bits_1() {
    interop(64 * KIB, ",compat=1.1,refcount_bits=1", false, None);
}

#[test]
fn cluster_2m() {
    interop(2 * MIB, "", false, None);
}

#[test]
fn extended_l2_64k() {
    interop(64 * KIB, ",extended_l2=on", false, Some(2 * KIB));
}

#[test]
fn extended_l2_2m() {
    interop(2 * MIB, ",extended_l2=on", false, Some(64 * KIB));
}

#[test]
fn lazy_refcounts() {
    interop(64 * KIB, ",lazy_refcounts=on", false, None);
}

#[test]
fn compressed_zlib() {
    interop(64 * KIB, ",compression_type=zlib", true, None);
}

#[test]
fn compressed_zstd() {
    interop(64 * KIB, ",compression_type=zstd", true, None);
}

#[test]
fn compressed_zstd_4k() {
    interop(4 * KIB, ",compression_type=zstd", true, None);
}

#[test]
fn backing_chain_of_three() {
    let dir = TempDir::new("blkgraph-qcow2-in").unwrap();
    let b = build_chain(dir.path());
    check_reads(&dir, &b);
}

#[test]
fn backing_files_shorter_than_the_image() {
    let dir = TempDir::new("blkgraph-qcow2-in").unwrap();
    let b = build_short_chain(dir.path());
    check_reads(&dir, &b);
}
