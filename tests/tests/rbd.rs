//! The rbd driver against a real one-node Ceph cluster (started by
//! tests/ceph/cluster.py): a vhost-user-blk export of an rbd image, with the
//! `blkio` crate as a verifying client, and resizing through the graph API.
//!
//! The export test runs against qemu-storage-daemon's rbd driver with
//! `BLKGRAPH_TEST_DAEMON=qsd`. Without Ceph the tests print why and pass,
//! unless `BLKGRAPH_REQUIRE_CEPH=1` or `CI=true`, where they fail.

use std::collections::HashSet;
use std::ffi::OsString;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blkgraph_tests::{compare_bytes, repo_root, Daemon, DaemonKind, TempDir};
use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};

const MIB: u64 = 1 << 20;
/// Each in-flight request owns one cell of this size: no two overlap.
const CELL: u64 = 128 << 10;
const DEPTH: usize = 16;

/// A running cluster, stopped and removed on drop.
struct Cluster {
    dir: PathBuf,
    conf: String,
    _tmp: TempDir,
}

fn script() -> PathBuf {
    repo_root().join("tests/ceph/cluster.py")
}

fn ceph_required() -> bool {
    std::env::var("BLKGRAPH_REQUIRE_CEPH").as_deref() == Ok("1")
        || std::env::var("CI").as_deref() == Ok("true")
}

impl Cluster {
    /// Starts a cluster, or returns None (after saying why) where Ceph is
    /// missing and not required.
    fn start() -> Option<Cluster> {
        let tmp = TempDir::new("ceph").expect("temp dir");
        let dir = tmp.path().join("c");
        let out = Command::new("python3")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run cluster.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = match serde_json::from_str(stdout.trim()) {
            Ok(v) => v,
            Err(_) => panic!(
                "cluster.py start failed: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        if let Some(missing) = v.get("missing") {
            let text = format!("Ceph is not installed ({missing})");
            assert!(
                !ceph_required(),
                "{text}, and BLKGRAPH_REQUIRE_CEPH=1 or CI=true"
            );
            eprintln!("SKIPPED: {text}: apt-get install ceph-mon ceph-osd ceph-common");
            return None;
        }
        assert!(out.status.success(), "cluster.py start: {stdout}");
        Some(Cluster {
            dir,
            conf: v["conf"].as_str().expect("conf").to_string(),
            _tmp: tmp,
        })
    }

    fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn create(&self, image: &str, size: u64) {
        self.rbd(&[
            "create",
            "--size",
            &format!("{size}B"),
            &format!("rbd/{image}"),
        ]);
    }

    /// The image's bytes, through `rbd export`.
    fn export(&self, image: &str, to: &Path) -> Vec<u8> {
        self.rbd(&[
            "export",
            "--no-progress",
            &format!("rbd/{image}"),
            to.to_str().expect("utf-8 path"),
        ]);
        std::fs::read(to).expect("read export")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("python3")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn reap(q: &mut Blkioq) -> Vec<(usize, i32)> {
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
    loop {
        let mut timeout = Duration::from_secs(60);
        match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => {
                return comps[..n]
                    .iter()
                    // SAFETY: do_io initialised the first n entries.
                    .map(|c| unsafe { c.assume_init_ref() })
                    .map(|c| (c.user_data, c.ret))
                    .collect();
            }
            Err(e) if e.errno() == Errno::INTR => continue,
            Err(e) => panic!("do_io: {e}; no completion within 60 s?"),
        }
    }
}

/// Random writes and verified reads with `DEPTH` requests in flight over
/// `[area, area + len)` of a zeroed disk; returns the model of the area
/// and the number of requests.
fn verify_queue(
    q: &mut Blkioq,
    mem: (usize, usize),
    area: u64,
    len: u64,
    seed: u64,
) -> (Vec<u8>, usize) {
    let (base, mem_len) = mem;
    assert!(mem_len >= DEPTH * CELL as usize);
    let buf = |slot: usize| (base + slot * CELL as usize) as *mut u8;
    let slice = |slot: usize, n: usize| {
        // SAFETY: the region is mapped for the whole test; a slot's bytes
        // are touched only while no request of that slot is in flight.
        unsafe { std::slice::from_raw_parts_mut(buf(slot), n) }
    };
    let mut model = vec![0u8; len as usize];
    let mut rng = Rng(seed | 1);
    let cells = len / CELL;
    let mut busy = HashSet::new();
    // slot -> (is_write, offset in area, length, cell)
    let mut inflight: Vec<Option<(bool, u64, usize, u64)>> = vec![None; DEPTH];
    let mut requests = 0;
    let total = 1200;
    while requests < total || inflight.iter().any(Option::is_some) {
        for (slot, entry) in inflight.iter_mut().enumerate() {
            if requests >= total || entry.is_some() {
                continue;
            }
            let cell = rng.below(cells);
            if !busy.insert(cell) {
                continue;
            }
            let n = (1 + rng.below(CELL / 512)) as usize * 512;
            let at = cell * CELL + rng.below((CELL - n as u64) / 512 + 1) * 512;
            let write = rng.below(3) != 0;
            if write {
                let data = slice(slot, n);
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (rng.next() >> (i % 8)) as u8;
                }
                q.write(area + at, buf(slot), n, slot, ReqFlags::empty());
            } else {
                q.read(area + at, buf(slot), n, slot, ReqFlags::empty());
            }
            *entry = Some((write, at, n, cell));
            requests += 1;
        }
        for (slot, ret) in reap(q) {
            let (write, at, n, cell) = inflight[slot].take().expect("unknown completion");
            assert_eq!(ret, 0, "request at {} failed: {ret}", area + at);
            busy.remove(&cell);
            let range = at as usize..at as usize + n;
            if write {
                model[range].copy_from_slice(slice(slot, n));
            } else if let Err(e) = compare_bytes(slice(slot, n), &model[range], area + at) {
                panic!("read back: {e}");
            }
        }
    }
    (model, requests)
}

fn one(q: &mut Blkioq) {
    let c = reap(q);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].1, 0, "request failed: {}", c[0].1);
}

#[test]
fn vhost_user_export_on_rbd_with_a_verifying_client() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    let kind = DaemonKind::from_env();
    let size = 32 * MIB;
    cluster.create("vu", size);
    let dir = TempDir::new("rbd-vu").expect("temp dir");
    let socket = dir.path().join("vu.sock");
    let args: Vec<OsString> = vec![
        "--blockdev".into(),
        format!("driver=rbd,node-name=r0,pool=rbd,image=vu,conf={},discard=unmap", cluster.conf)
            .into(),
        "--blockdev".into(),
        "driver=raw,node-name=disk0,file=r0,discard=unmap".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        )
        .into(),
    ];
    let mut daemon = Daemon::start(kind, &args, dir.path(), &socket).expect("start daemon");

    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", socket.to_str().expect("utf-8"))
        .expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 2).expect("num-queues");
    let mut queues = b.start().expect("start").queues;
    let align = b.get_u64("mem-region-alignment").expect("alignment") as usize;
    let want = (DEPTH * CELL as usize).div_ceil(align) * align;
    let regions: Vec<(usize, usize)> = (0..2)
        .map(|_| {
            let r = b.alloc_mem_region(want).expect("alloc");
            b.map_mem_region(&r).expect("map");
            (r.addr, r.len)
        })
        .collect();
    let half = size / 2;
    let results: Vec<(Vec<u8>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&regions)
            .enumerate()
            .map(|(i, (q, &mem))| {
                s.spawn(move || verify_queue(q, mem, i as u64 * half, half, 7 + i as u64))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("queue thread"))
            .collect()
    });
    let mut model: Vec<u8> = results
        .iter()
        .flat_map(|(m, _)| m.iter().copied())
        .collect();
    assert!(results.iter().map(|(_, n)| n).sum::<usize>() >= 2400);

    // Write-zeroes, discard (of whole 4 MiB objects, which then read as
    // zeroes) and flush, on queue 0.
    let q = &mut queues[0];
    q.write_zeroes(MIB, 256 << 10, 1, ReqFlags::empty());
    one(q);
    model[MIB as usize..(MIB + (256 << 10)) as usize].fill(0);
    q.discard(8 * MIB, 4 * MIB, 2, ReqFlags::empty());
    one(q);
    model[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    q.flush(3, ReqFlags::empty());
    one(q);
    let (addr, _) = regions[0];
    for (off, len) in [(MIB, 256u64 << 10), (8 * MIB, CELL), (11 * MIB, CELL)] {
        q.read(off, addr as *mut u8, len as usize, 4, ReqFlags::empty());
        one(q);
        // SAFETY: the region is mapped and no request is in flight on it.
        let got = unsafe { std::slice::from_raw_parts(addr as *const u8, len as usize) };
        compare_bytes(got, &model[off as usize..(off + len) as usize], off)
            .unwrap_or_else(|e| panic!("after zeroing: {e}"));
    }
    drop(queues);
    drop(b);
    assert!(daemon.try_exit_status().is_none(), "the daemon exited");
    daemon.stop();

    // The cluster holds what the client wrote.
    let image = cluster.export("vu", &dir.path().join("vu.raw"));
    compare_bytes(&image, &model, 0).unwrap_or_else(|e| panic!("rbd export: {e}"));
}

struct Holder;

impl blkgraph_graph::DrainParent for Holder {
    fn drained_begin(&self) {}
    fn drained_end(&self) {}
}

#[test]
fn resize_grows_the_rbd_image() {
    use blkgraph_graph::{aio::block_on, Graph, Options, Permission};
    let Some(cluster) = Cluster::start() else {
        return;
    };
    cluster.create("grow", 8 * MIB);
    let graph = Graph::new();
    let json = serde_json::json!({
        "driver": "rbd", "node-name": "r", "pool": "rbd", "image": "grow", "conf": cluster.conf,
    });
    let node = graph
        .add(Options::from_json(json).expect("options"))
        .expect("open");
    assert_eq!(node.size(), 8 * MIB);
    let perm = Permission::CONSISTENT_READ | Permission::WRITE | Permission::RESIZE;
    graph
        .attach_export("e", "r", perm, Permission::ALL, Arc::new(Holder))
        .expect("attach");
    block_on(node.resize(24 * MIB))
        .expect("executor")
        .expect("resize");
    assert_eq!(node.size(), 24 * MIB);
    let info: serde_json::Value =
        serde_json::from_slice(&cluster.rbd(&["info", "--format", "json", "rbd/grow"]))
            .expect("json");
    assert_eq!(info["size"], 24 * MIB);
    graph.detach_export("e").expect("detach");
}
