//! The qcow2 driver against a model: random writes, write-zeroes,
//! discards, flushes and reopens, several at a time on disjoint ranges,
//! applied to a qcow2 image through blkgraph and to a raw file; along the
//! way the image reads back as the model does and `qemu-img check` finds
//! nothing wrong, and at the end `qemu-img compare` finds them identical.
//!
//! `BLKGRAPH_QCOW2_MODEL_OPS` scales the number of operations (the long
//! form runs millions); `BLKGRAPH_QCOW2_MODEL_SEED` repeats a run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blkgraph_graph::aio::{block_on, join_all, IoFuture};
use blkgraph_graph::{Graph, IoBuffer, Node, Options, WriteFlags, ZeroFlags};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    out
}

fn qemu_img_ok(args: &[&str]) -> String {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` finds no corruption (leaks are allowed, as in QEMU,
/// but there should be none after a clean close).
fn check_image(path: &Path, allow_leaks: bool) {
    let out = qemu_img(&["check", "--output=json", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("check output {text:?} {e}: {:?}", out.stderr));
    assert_eq!(report["corruptions"].as_u64().unwrap_or(0), 0, "{report}");
    assert_eq!(report["check-errors"].as_u64().unwrap_or(0), 0, "{report}");
    if !allow_leaks {
        assert_eq!(report["leaks"].as_u64().unwrap_or(0), 0, "{report}");
    }
}

struct Setup {
    /// qemu-img create options.
    create: &'static str,
    size: u64,
    backing: bool,
    /// Alignment of offsets and lengths.
    align: u64,
}

struct Run {
    dir: tempfile::TempDir,
    image: PathBuf,
    model: Vec<u8>,
    /// What the backing file holds (zeroes without one).
    base: Vec<u8>,
    graph: Graph,
    node: Option<Arc<Node>>,
    cluster: u64,
    v3: bool,
    backing: bool,
}

impl Run {
    fn new(setup: &Setup, rng: &mut Rng) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.qcow2");
        let size = setup.size;
        let mut base = vec![0u8; size as usize];
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", setup.create];
        let base_path = dir.path().join("base.raw");
        if setup.backing {
            for (i, chunk) in base.chunks_mut(4096).enumerate() {
                if rng.below(3) > 0 {
                    chunk.fill((i % 251) as u8 + 1);
                }
            }
            std::fs::write(&base_path, &base).unwrap();
            args.extend(["-b", "base.raw", "-F", "raw"]);
        }
        let image_arg = image.to_str().unwrap().to_string();
        let size_arg = size.to_string();
        args.extend([image_arg.as_str(), size_arg.as_str()]);
        qemu_img_ok(&args);
        let info: serde_json::Value =
            serde_json::from_str(&qemu_img_ok(&["info", "--output=json", &image_arg])).unwrap();
        let cluster = info["cluster-size"].as_u64().unwrap();
        let v3 = info["format-specific"]["data"]["compat"] == "1.1";
        let mut run = Run {
            dir,
            image,
            model: base.clone(),
            base,
            graph: Graph::new(),
            node: None,
            cluster,
            v3,
            backing: setup.backing,
        };
        run.open();
        run
    }

    fn open(&mut self) {
        let arg = format!(
            "driver=qcow2,node-name=q,discard=unmap,file.driver=file,file.filename={}",
            self.image.display()
        );
        self.node = Some(
            self.graph
                .add(Options::from_arg(&arg, None).unwrap())
                .unwrap(),
        );
    }

    fn close(&mut self) {
        self.node = None;
        self.graph.remove("q").unwrap();
    }

    fn node(&self) -> Arc<Node> {
        self.node.clone().unwrap()
    }

    /// What a discard of `[offset, offset + len)` leaves in the model:
    /// whole clusters read as zeroes, or from the backing file when v2
    /// cannot say "zeroes"; the rest is unchanged.
    fn discard_model(&mut self, offset: u64, len: u64) {
        let cs = self.cluster;
        let first = offset.div_ceil(cs) * cs;
        let end = (offset + len) / cs * cs;
        let mut at = first;
        while at < end {
            let r = at as usize..(at + cs) as usize;
            if self.backing && !self.v3 {
                self.model[r.clone()].copy_from_slice(&self.base[r]);
            } else {
                self.model[r].fill(0);
            }
            at += cs;
        }
    }

    fn verify_all(&self) {
        let node = self.node();
        let buf = IoBuffer::from_vec(vec![0xeeu8; self.model.len()]);
        block_on(node.read(0, &buf)).unwrap().unwrap();
        let got = buf.into_vec();
        if got != self.model {
            let at = got
                .iter()
                .zip(&self.model)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "image differs from the model at {at}: {:#x} != {:#x}",
                got[at], self.model[at]
            );
        }
    }
}

/// What a read saw: its offset and bytes.
type ReadBack = (u64, Vec<u8>);

enum Op {
    Write(u64, Vec<u8>),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Read(u64, u64),
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write(o, d) => (*o, *o + d.len() as u64),
            Op::Zero(o, l, _) | Op::Discard(o, l) | Op::Read(o, l) => (*o, *o + *l),
        }
    }
}

fn random_op(rng: &mut Rng, setup: &Setup, cluster: u64, serial: u64) -> Op {
    let a = setup.align;
    let max_len = (cluster * 3).max(a * 8).min(setup.size);
    let len = (1 + rng.below(max_len / a)) * a;
    let len = if rng.below(4) == 0 {
        // Whole, aligned clusters now and then.
        cluster.min(setup.size) * (1 + rng.below(3))
    } else {
        len
    }
    .min(setup.size);
    let offset = rng.below((setup.size - len) / a + 1) * a;
    let offset = if rng.below(4) == 0 {
        (offset / cluster * cluster).min(setup.size - len)
    } else {
        offset
    };
    match rng.below(10) {
        0..=4 => {
            let fill = (serial % 255) as u8 + 1;
            let data = (0..len).map(|i| fill ^ (i % 7) as u8).collect();
            Op::Write(offset, data)
        }
        5 | 6 => Op::Zero(offset, len, rng.below(2) == 0),
        7 => Op::Discard(offset, len),
        _ => Op::Read(offset, len),
    }
}

fn run_model(setup: &Setup, ops: u64, seed: u64) {
    eprintln!(
        "qcow2 model: {} backing={} seed={seed}",
        setup.create, setup.backing
    );
    let mut rng = Rng(seed | 1);
    let mut run = Run::new(setup, &mut rng);
    let mut done = 0;
    let mut serial = 0;
    while done < ops {
        // A batch of operations on disjoint ranges, in flight together.
        let mut batch: Vec<Op> = Vec::new();
        for _ in 0..1 + rng.below(8) {
            serial += 1;
            let op = random_op(&mut rng, setup, run.cluster, serial);
            let (s, e) = op.range();
            if batch.iter().all(|b| {
                let (bs, be) = b.range();
                e <= bs || be <= s
            }) {
                batch.push(op);
            }
        }
        done += batch.len() as u64;
        let node = run.node();
        let futures: Vec<IoFuture<'_, Option<ReadBack>>> = batch
            .iter()
            .map(|op| {
                let node = &node;
                Box::pin(async move {
                    match op {
                        Op::Write(o, d) => {
                            let buf = IoBuffer::from_vec(d.clone());
                            node.write(*o, &buf, WriteFlags::default()).await?;
                        }
                        Op::Zero(o, l, unmap) => {
                            let flags = ZeroFlags {
                                may_unmap: *unmap,
                                fua: false,
                            };
                            node.write_zeroes(*o, *l, flags).await?;
                        }
                        Op::Discard(o, l) => node.discard(*o, *l).await?,
                        Op::Read(o, l) => {
                            let buf = IoBuffer::from_vec(vec![0u8; *l as usize]);
                            node.read(*o, &buf).await?;
                            return Ok(Some((*o, buf.into_vec())));
                        }
                    }
                    Ok(None)
                }) as IoFuture<'_, _>
            })
            .collect();
        let results = block_on(join_all(futures)).unwrap().unwrap();
        // Reads saw the model as it was before the batch (their ranges
        // are disjoint from the batch's changes).
        for (o, data) in results.into_iter().flatten() {
            let want = &run.model[o as usize..o as usize + data.len()];
            assert!(data == want, "read at {o} differs from the model");
        }
        for op in &batch {
            match op {
                Op::Write(o, d) => run.model[*o as usize..*o as usize + d.len()].copy_from_slice(d),
                Op::Zero(o, l, _) => run.model[*o as usize..(*o + *l) as usize].fill(0),
                Op::Discard(o, l) => run.discard_model(*o, *l),
                Op::Read(..) => {}
            }
        }
        match rng.below(40) {
            0 => {
                block_on(node.flush()).unwrap().unwrap();
                check_image(&run.image, true);
            }
            1 => {
                drop(node);
                run.close();
                check_image(&run.image, false);
                run.open();
                run.verify_all();
            }
            _ => {}
        }
    }
    run.verify_all();
    run.close();
    check_image(&run.image, false);
    let model_path = run.dir.path().join("model.raw");
    std::fs::write(&model_path, &run.model).unwrap();
    qemu_img_ok(&[
        "compare",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        run.image.to_str().unwrap(),
        model_path.to_str().unwrap(),
    ]);
}

fn ops(default: u64) -> u64 {
    std::env::var("BLKGRAPH_QCOW2_MODEL_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn seed() -> u64 {
    std::env::var("BLKGRAPH_QCOW2_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

#[test]
fn default_clusters() {
    let setup = Setup {
        create: "cluster_size=65536",
        size: 8 << 20,
        backing: false,
        align: 512,
    };
    run_model(&setup, ops(2000), seed());
}

#[test]
fn small_clusters_unaligned_requests() {
    let setup = Setup {
        create: "cluster_size=512",
        size: 1 << 20,
        backing: false,
        align: 1,
    };
    run_model(&setup, ops(2000), seed());
}

#[test]
fn backing_file_v3() {
    let setup = Setup {
        create: "cluster_size=4096",
        size: 2 << 20,
        backing: true,
        align: 512,
    };
    run_model(&setup, ops(2000), seed());
}

#[test]
fn backing_file_compat_0_10() {
    let setup = Setup {
        create: "cluster_size=4096,compat=0.10",
        size: 2 << 20,
        backing: true,
        align: 512,
    };
    run_model(&setup, ops(2000), seed());
}

#[test]
fn extended_l2_with_backing() {
    let setup = Setup {
        create: "cluster_size=65536,extended_l2=on",
        size: 8 << 20,
        backing: true,
        align: 512,
    };
    run_model(&setup, ops(2000), seed());
}

#[test]
fn big_clusters_and_refcount_growth() {
    let setup = Setup {
        create: "cluster_size=2097152,refcount_bits=1",
        size: 64 << 20,
        backing: false,
        align: 4096,
    };
    run_model(&setup, ops(300), seed());
}

#[test]
fn small_refcount_blocks_grow_the_table() {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers
    // 64 clusters and the table one cluster's worth of blocks (4096
    // clusters, 2 MiB), so filling 4 MiB grows the table.
    let setup = Setup {
        create: "cluster_size=512,refcount_bits=64",
        size: 4 << 20,
        backing: false,
        align: 512,
    };
    run_model(&setup, ops(1500), seed());
}

#[test]
fn lazy_refcounts() {
    let setup = Setup {
        create: "cluster_size=4096,lazy_refcounts=on",
        size: 2 << 20,
        backing: true,
        align: 512,
    };
    run_model(&setup, ops(1500), seed());
}
