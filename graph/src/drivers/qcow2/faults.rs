//! The metadata layer over a file whose writes fail where a test says,
//! and which logs what reaches it: what an I/O error or a power cut at
//! each step leaves.

use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::layout::{L2Entry, COPIED, OFFSET_MASK};
use super::meta::{read_table, CacheSizes, File, Meta, Policy};
use super::read_image;
use crate::aio::{block_on, IoFuture};
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, WriteFlags, ZeroFlags};
use crate::node::{CommonOptions, Node};
use crate::permission::Permission;
use crate::{Graph, Options};

/// What reached the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Write(u64),
    Flush,
}

/// The image file: writes that touch byte `fail_at` fail with EIO.
struct Faulty {
    file: Arc<Node>,
    fail_at: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Op>>>,
}

impl BlockDriver for Faulty {
    fn size(&self) -> u64 {
        self.file.size()
    }

    fn extends_on_write(&self) -> bool {
        true
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        self.file.read(offset, buf)
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        if (offset..offset + buf.len() as u64).contains(&self.fail_at.load(Ordering::Relaxed)) {
            return Box::pin(std::future::ready(Err(io::Error::from_raw_os_error(
                libc::EIO,
            ))));
        }
        self.log.lock().push(Op::Write(offset));
        self.file.write(offset, buf, flags)
    }

    fn flush(&self) -> IoFuture<'_> {
        self.log.lock().push(Op::Flush);
        self.file.flush()
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        self.file.write_zeroes(offset, len, flags)
    }
}

impl Faulty {
    /// A node named `faulty` over `file`, and what the test controls: the
    /// byte whose writes fail, and the log.
    fn node(file: Arc<Node>) -> (Node, Arc<AtomicU64>, Arc<Mutex<Vec<Op>>>) {
        let fail_at = Arc::new(AtomicU64::new(u64::MAX));
        let log = Arc::new(Mutex::new(Vec::new()));
        let faulty = Faulty {
            file,
            fail_at: fail_at.clone(),
            log: log.clone(),
        };
        let node = Node::new(
            "faulty".into(),
            "faulty",
            Box::new(faulty),
            &CommonOptions::default(),
            Vec::new(),
            false,
            None,
        );
        (node, fail_at, log)
    }
}

/// Runs qemu-img with `args`; it must succeed.
fn qemu_img(args: &[&str]) {
    let status = Command::new("qemu-img")
        .args(args)
        .status()
        .expect("qemu-img runs");
    assert!(status.success(), "qemu-img {args:?}");
}

struct Image {
    _dir: tempfile::TempDir,
    _graph: Graph,
    node: Node,
    fail_at: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Op>>>,
    meta: Meta,
    l1_offset: u64,
    refcount_table_offset: u64,
}

const ALIGN: u64 = 512;

impl Image {
    /// A fresh 4 MiB image made by qemu-img with `options`.
    fn create(options: &str) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let path_arg = path.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, path_arg, "4M"]);
        let graph = Graph::new();
        let file = graph
            .add(Options::from_arg(&file_arg(&path), None).unwrap())
            .unwrap();
        file.set_granted(Permission::ALL);
        let (node, fail_at, log) = Faulty::node(file);
        node.set_granted(Permission::ALL);
        let image = block_on(read_image(&node, ALIGN)).unwrap().unwrap();
        let (l1_offset, refcount_table_offset) = (
            image.header.l1_table_offset,
            image.header.refcount_table_offset,
        );
        let sizes = CacheSizes {
            l2_entries: 4,
            l2_slice_size: 512,
            refcount_entries: 4,
        };
        let size = node.size();
        let meta = Meta::new(
            image.header,
            image.l1,
            image.refcount_table,
            size,
            sizes,
            Policy::default(),
        );
        Image {
            _dir: dir,
            _graph: graph,
            node,
            fail_at,
            log,
            meta,
            l1_offset,
            refcount_table_offset,
        }
    }

    fn file(&self) -> File<'_> {
        File {
            node: &self.node,
            align: ALIGN,
        }
    }

    /// Runs `f` on the metadata and the file.
    fn run<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut Meta, &File<'_>) -> io::Result<T>,
    ) -> io::Result<T> {
        let file = File {
            node: &self.node,
            align: ALIGN,
        };
        block_on(f(&mut self.meta, &file)).unwrap()
    }
}

/// Allocates a host cluster for guest cluster `guest` and maps it there.
async fn map_new_cluster(m: &mut Meta, f: &File<'_>, guest: u64) -> io::Result<()> {
    let data = m.alloc_clusters(f, 1).await?;
    let word = data | COPIED;
    m.set_entry(f, guest, L2Entry { word, bitmap: 0 }).await
}

fn file_arg(path: &Path) -> String {
    format!("driver=file,node-name=f,filename={}", path.display())
}

/// An L1 entry whose write failed stayed in memory: later writes in its
/// range (512 MiB of guest with 64 KiB clusters) went into an L2 table
/// that the image on disk never points to, and were lost at the next
/// open although flushed.
#[test]
fn a_failed_l1_entry_write_is_taken_back() {
    let mut img = Image::create("cluster_size=64k");
    img.fail_at.store(img.l1_offset, Ordering::Relaxed);
    let failed = img.run(async |m, f| map_new_cluster(m, f, 0).await);
    assert!(failed.is_err());
    img.fail_at.store(u64::MAX, Ordering::Relaxed);
    img.run(async |m, f| {
        map_new_cluster(m, f, 1).await?;
        m.flush(f).await
    })
    .unwrap();
    let entries = img.meta.l1.len() as u64;
    let on_disk = block_on(read_table(&img.file(), img.l1_offset, entries))
        .unwrap()
        .unwrap();
    assert_eq!(on_disk, img.meta.l1);
}

/// The same for a refcount table entry: the range of its new block was
/// counted in a block the image never points to, so it read as free once
/// reopened. And the block is flushed before the entry is written.
#[test]
fn a_new_refcount_block_is_stable_before_its_table_entry() {
    // 512-byte clusters, 16-bit refcounts: a block counts 256 clusters.
    let mut img = Image::create("cluster_size=512");
    let entry = img.refcount_table_offset + 8;
    img.fail_at.store(entry, Ordering::Relaxed);
    let failed = img.run(async |m, f| m.set_refcount(f, 300, 1).await);
    assert!(failed.is_err());
    img.fail_at.store(u64::MAX, Ordering::Relaxed);
    img.log.lock().clear();
    img.run(async |m, f| {
        m.set_refcount(f, 301, 1).await?;
        m.flush(f).await
    })
    .unwrap();
    let entries = img.meta.refcount_table.len() as u64;
    let on_disk = block_on(read_table(&img.file(), img.refcount_table_offset, entries))
        .unwrap()
        .unwrap();
    assert_eq!(on_disk, img.meta.refcount_table);
    let block = img.meta.refcount_table[1];
    assert_ne!(block, 0);
    let log = img.log.lock().clone();
    let at = |op: Op| log.iter().position(|o| *o == op).unwrap();
    let (written, pointed) = (
        at(Op::Write(block)),
        at(Op::Write(img.refcount_table_offset)),
    );
    assert!(
        log[written..pointed].contains(&Op::Flush),
        "no flush between the block and its entry: {log:?}"
    );
}

/// A refcount block written by a write-back whose file flush ran without
/// the metadata lock (`flush_image`) counted as stable: the next L2 table
/// was written with no flush before it, while that flush may still have
/// been running, so a power cut could keep the L2 entry and lose the
/// refcount of its cluster (handed out a second time after a reopen).
#[test]
fn an_l2_table_waits_for_a_flush_after_refcounts_written_without_one() {
    let mut img = Image::create("cluster_size=64k");
    // The L2 table exists, and everything is stable.
    img.run(async |m, f| {
        map_new_cluster(m, f, 1).await?;
        m.flush(f).await
    })
    .unwrap();
    img.log.lock().clear();
    img.run(async |m, f| {
        let data = m.alloc_clusters(f, 1).await?;
        // flush_image: the write-back, and a flush still running.
        m.write_back(f).await?;
        m.set_entry(
            f,
            0,
            L2Entry {
                word: data | COPIED,
                bitmap: 0,
            },
        )
        .await?;
        m.write_back(f).await
    })
    .unwrap();
    let block = img.meta.refcount_table[0] & OFFSET_MASK;
    let table = img.meta.l1[0] & OFFSET_MASK;
    let log = img.log.lock().clone();
    let at = |op: Op| log.iter().position(|o| *o == op).unwrap();
    let (counted, pointed) = (at(Op::Write(block)), at(Op::Write(table)));
    assert!(counted < pointed, "{log:?}");
    assert!(
        log[counted..pointed].contains(&Op::Flush),
        "no flush between the refcounts and the L2 table: {log:?}"
    );
}

/// Found by review: a qcow2 node reopened read-write whose bitmaps could
/// not be marked in use in the image (the header or directory write
/// failed) made them writable anyway. They recorded writes while the image
/// said they were not in use: after a crash they look consistent and miss
/// those writes, and the next incremental backup with them. As QEMU's
/// qcow2_reopen_commit_post, they stay read-only and writes to the node
/// fail (EPERM) until another reopen marks them.
#[test]
fn bitmaps_not_marked_in_use_stay_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let path_arg = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", path_arg, "4M"]);
    qemu_img(&["bitmap", "--add", path_arg, "b0"]);
    let graph = Graph::shared();
    let file = graph
        .add(Options::from_arg(&file_arg(&path), None).unwrap())
        .unwrap();
    let (node, fail_at, _log) = Faulty::node(file.clone());
    graph.insert_node(Arc::new(node));
    let qcow2 = |read_only: &str| {
        let arg = format!("driver=qcow2,node-name=q,file=faulty,read-only={read_only}");
        Options::from_arg(&arg, None).unwrap()
    };
    let q = graph.add(qcow2("on")).unwrap();
    let bitmap = q.bitmap("b0").expect("the image's bitmap");
    assert!(bitmap.readonly());
    let write = || {
        let buf = IoBuffer::from_vec(vec![0x5a; 4096]);
        block_on(q.write(0, &buf, WriteFlags::default())).unwrap()
    };
    // The header write that marks the bitmaps fails.
    fail_at.store(0, Ordering::Relaxed);
    graph.reopen(vec![qcow2("off")]).unwrap();
    assert!(!q.read_only());
    assert!(bitmap.readonly(), "a bitmap not marked in use was writable");
    let refused = write().unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EPERM));
    assert_eq!(bitmap.count(), 0);
    // Another reopen read-write marks them.
    fail_at.store(u64::MAX, Ordering::Relaxed);
    graph.reopen(vec![qcow2("off")]).unwrap();
    // The graph gave the file node, which has no parent edge (the faulty
    // driver holds it), no permissions: the qcow2 node grows it.
    file.set_granted(Permission::ALL);
    assert!(!bitmap.readonly());
    write().unwrap();
    assert!(bitmap.count() > 0, "the write was not recorded");
}
