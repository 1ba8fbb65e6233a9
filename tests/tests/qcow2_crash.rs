//! Crash consistency of qcow2 images: kill -9 at random points under write
//! load, through the daemon's vhost-user-blk export, driven by the
//! host-side frontend (the approach of `crash.rs`, for a format whose
//! metadata the daemon caches and orders itself).
//!
//! A writer keeps 16 distinct, verifiable 4 KiB writes in flight, in an
//! order that puts several writes in flight into the same cluster (so
//! allocating writes into one cluster race each other) and spreads the
//! rest over a fresh region of the image in each round, so every round
//! allocates clusters, L2 tables and refcount blocks while it is killed.
//! A FLUSH follows every 8 acknowledged writes. The daemon is killed with
//! SIGKILL at a random moment after the first FLUSH of the round
//! completed; then
//! - `qemu-img check` must find no corruption (leaked clusters are allowed,
//!   as in QEMU: an allocation whose L2 update never reached the image);
//! - QEMU's reading of the image (`qemu-img convert -O raw`) must hold every
//!   write acknowledged before the submission of a FLUSH that completed
//!   (unless a later write to the same block replaced it), and elsewhere
//!   only data written there, at sector granularity, or what was there
//!   before (zeroes, or the backing file's data): nothing else;
//! - the daemon is restarted on the same image, and its reading through
//!   the vhost-user export must be QEMU's, byte for byte; regions written
//!   in earlier rounds must still read as they did after their round.
//!
//! Unlike a raw image, a write acknowledged but not flushed may be lost:
//! the daemon, like QEMU, keeps L2 and refcount updates in its cache until
//! a FLUSH (or eviction) writes them; such writes are only counted.
//!
//! Images: a fresh qcow2 (64 KiB clusters), one with 512-byte clusters
//! (every round grows the refcount table), and a qcow2 over a backing file
//! full of data (every write copies the rest of its cluster from it).
//! Each runs `ROUNDS` kill and restart cycles; `BLKGRAPH_QCOW2_CRASH_ROUNDS`
//! sets more. The same tests run against qemu-storage-daemon with
//! `BLKGRAPH_TEST_DAEMON=qsd`; `BLKGRAPH_CRASH_SEED=N` repeats the random
//! kill delays of an earlier run (the seed is printed).

mod frontend;
mod tools;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blkgraph_tests::{
    compare_bytes, create_pattern_image, fill_pattern, Daemon, DaemonKind, ExportOptions, TempDir,
};
use frontend::blk::*;
use frontend::driver::{Desc, Driver, Queue};
use tools::{convert_to_raw, qemu_img_check, run, s};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Size of one write.
const BS: u64 = 4096;
/// The region one round writes; round `r` writes `[r * AREA, (r+1) * AREA)`.
const AREA: u64 = 16 * MIB;
const SLOTS: u64 = AREA / BS;
/// Consecutive writes go to the slots of one group (32 KiB, so with
/// 16 in flight two groups, in one or two clusters, are written at once);
/// the groups are spread over the region.
const GROUP: u64 = 8;
const GROUPS: u64 = SLOTS / GROUP;
/// Writes in flight.
const QD: usize = 16;
/// A FLUSH is sent once this many writes were acknowledged since the last one.
const FLUSH_EVERY: usize = 8;
/// While a FLUSH is in flight, at most this many writes are submitted after it.
const MAX_AHEAD: u64 = 1024;
/// Kill, restart and verify cycles per image.
const ROUNDS: u64 = 3;
/// The kill comes at a random moment up to this long after the first FLUSH
/// of a round completed.
const MAX_KILL_DELAY: Duration = Duration::from_millis(300);
/// The pattern of the backing file.
const BASE_SEED: u64 = 0xba5e;

fn rounds() -> u64 {
    std::env::var("BLKGRAPH_QCOW2_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ROUNDS)
}

/// The slot (within the round's region) that write `seq` goes to: a
/// bijection of `0..SLOTS`, repeating after `SLOTS` writes.
fn slot_of(seq: u64) -> u64 {
    let group = (seq / GROUP) % GROUPS;
    let group = (group * 0x9e37_79b1) % GROUPS;
    group * GROUP + (seq % GROUP) * 3 % GROUP
}

/// The data of write `seq` of `round`: a pattern no other write uses.
fn write_seed(round: u64, seq: u64) -> u64 {
    (0x9c02 << 48) | (round << 32) | seq
}

fn pattern(len: usize, offset: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, offset, seed);
    v
}

/// What the image looks like before any round: the fresh image reads
/// zeroes, the other one its backing file's pattern.
#[derive(Clone, Copy, Debug)]
enum Initial {
    Zeroes,
    Base,
}

impl Initial {
    fn data(self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Initial::Zeroes => vec![0; len],
            Initial::Base => pattern(len, offset, BASE_SEED),
        }
    }
}

/// A daemon serving one qcow2 image of a temporary directory. Fields drop
/// in order: the daemon stops before the directory goes.
struct Setup {
    daemon: Daemon,
    options: ExportOptions,
    dir: TempDir,
}

impl Setup {
    fn start(dir: TempDir, image: PathBuf) -> Setup {
        let mut options = ExportOptions::new(&image, &dir.path().join("vhost-user-blk.sock"));
        options.format = "qcow2".into();
        let daemon = Self::spawn(&options, &dir);
        Setup {
            daemon,
            options,
            dir,
        }
    }

    fn spawn(options: &ExportOptions, dir: &TempDir) -> Daemon {
        Daemon::start(
            DaemonKind::from_env(),
            &options.args(),
            dir.path(),
            &options.socket,
        )
        .unwrap_or_else(|e| panic!("starting the daemon failed: {e}"))
    }

    fn restart(&mut self) {
        self.daemon = Self::spawn(&self.options, &self.dir);
    }

    fn image(&self) -> &Path {
        &self.options.image
    }

    fn connect(&self) -> Driver {
        Driver::connect(&self.options.socket, 1, true)
    }
}

/// What the writer saw.
#[derive(Default)]
struct Journal {
    submitted: u64,
    acked: Vec<bool>,
    /// Acknowledged before the submission of a FLUSH that completed.
    durable: Vec<bool>,
    flushes: u64,
    flush_in_flight: bool,
}

enum Op {
    Write { buf: usize, seq: u64 },
    Flush { covers: Vec<u64> },
}

/// Guest memory of one request: header, data, status.
struct ReqBuf {
    hdr: GuestAddress,
    data: GuestAddress,
    status: GuestAddress,
}

impl ReqBuf {
    fn new(q: &mut Queue) -> ReqBuf {
        ReqBuf {
            hdr: q.alloc(16),
            data: q.alloc(BS),
            status: q.alloc(1),
        }
    }

    fn submit(&self, q: &mut Queue, mem: &GuestMemoryMmap, type_: u32, sector: u64) -> u16 {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&type_.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, self.hdr).unwrap();
        mem.write_obj(0xffu8, self.status).unwrap();
        let mut descs = vec![Desc {
            addr: self.hdr,
            len: 16,
            write: false,
        }];
        if type_ == T_OUT {
            descs.push(Desc {
                addr: self.data,
                len: BS as u32,
                write: false,
            });
        }
        descs.push(Desc {
            addr: self.status,
            len: 1,
            write: true,
        });
        q.submit(mem, &descs)
    }
}

/// Writes round `round`'s region as described in the module's comment
/// until `stop` is set.
fn writer(d: &mut Driver, round: u64, stop: &AtomicBool, flushes: &AtomicU64) -> Journal {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    let bufs: Vec<ReqBuf> = (0..=QD).map(|_| ReqBuf::new(q)).collect();
    let flush_buf = QD;
    let mut free: Vec<usize> = (0..QD).collect();
    let mut pending: HashMap<u16, Op> = HashMap::new();
    let mut uncovered: Vec<u64> = Vec::new();
    let mut since_flush = 0u64;
    let mut j = Journal::default();
    let mut data = vec![0u8; BS as usize];
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        for used in q.reap(&mem) {
            let op = pending.remove(&used.head).expect("a request we submitted");
            let buf = match op {
                Op::Write { buf, .. } => buf,
                Op::Flush { .. } => flush_buf,
            };
            let status: u8 = mem.read_obj(bufs[buf].status).unwrap();
            match op {
                Op::Write { buf, seq } => {
                    assert_eq!(status, S_OK, "write {seq} failed");
                    j.acked[seq as usize] = true;
                    uncovered.push(seq);
                    free.push(buf);
                }
                Op::Flush { covers } => {
                    assert_eq!(status, S_OK, "FLUSH failed");
                    for seq in covers {
                        j.durable[seq as usize] = true;
                    }
                    j.flushes += 1;
                    j.flush_in_flight = false;
                    flushes.store(j.flushes, Ordering::SeqCst);
                }
            }
        }
        if stopping {
            return j;
        }
        let mut submitted = false;
        if !j.flush_in_flight && uncovered.len() >= FLUSH_EVERY {
            let head = bufs[flush_buf].submit(q, &mem, T_FLUSH, 0);
            let covers = std::mem::take(&mut uncovered);
            pending.insert(head, Op::Flush { covers });
            j.flush_in_flight = true;
            since_flush = 0;
            submitted = true;
        }
        while !(j.flush_in_flight && since_flush >= MAX_AHEAD) {
            let Some(buf) = free.pop() else {
                break;
            };
            let seq = j.submitted;
            let offset = round * AREA + slot_of(seq) * BS;
            fill_pattern(&mut data, offset, write_seed(round, seq));
            mem.write_slice(&data, bufs[buf].data).unwrap();
            let head = bufs[buf].submit(q, &mem, T_OUT, offset / 512);
            pending.insert(head, Op::Write { buf, seq });
            j.submitted += 1;
            j.acked.push(false);
            j.durable.push(false);
            since_flush += 1;
            submitted = true;
        }
        if submitted {
            q.kick();
        } else {
            q.wait_call(Duration::from_millis(5));
        }
    }
}

/// Each slot's newest write, classed by what the writer knew of it.
#[derive(Debug, Default)]
struct Tally {
    durable: u64,
    acked_landed: u64,
    acked_lost: u64,
    in_flight_landed: u64,
    in_flight_torn: u64,
    in_flight_absent: u64,
}

/// Checks `region`, round `round`'s region as read after the kill, against
/// the journal: every sector of a slot holds the slot's newest durable
/// write or a write submitted after it; a slot without a durable write
/// holds, sector by sector, one of its writes or what was there before.
fn verify(region: &[u8], round: u64, j: &Journal, initial: Initial) -> Result<Tally, String> {
    let mut first_seq = vec![0u64; SLOTS as usize];
    for seq in 0..SLOTS {
        first_seq[slot_of(seq) as usize] = seq;
    }
    let mut t = Tally::default();
    let mut bad = Vec::new();
    for slot in 0..SLOTS {
        let offset = round * AREA + slot * BS;
        let got = &region[(slot * BS) as usize..][..BS as usize];
        let seqs: Vec<u64> = (first_seq[slot as usize]..j.submitted)
            .step_by(SLOTS as usize)
            .collect();
        let before = initial.data(offset, BS as usize);
        let data: Vec<Vec<u8>> = seqs
            .iter()
            .map(|&s| pattern(BS as usize, offset, write_seed(round, s)))
            .collect();
        let durable = seqs.iter().rev().find(|&&s| j.durable[s as usize]);
        // The contents each sector may hold: writes from the newest durable
        // one on, or also the data from before the round if none is durable.
        let allowed: Vec<&[u8]> = seqs
            .iter()
            .zip(&data)
            .filter(|(&s, _)| durable.is_none_or(|&d| s >= d))
            .map(|(_, p)| p.as_slice())
            .chain(durable.is_none().then_some(before.as_slice()))
            .collect();
        let sector_ok = |sec: usize| {
            allowed
                .iter()
                .any(|p| p[sec..sec + 512] == got[sec..sec + 512])
        };
        if let Some(sec) = (0..BS as usize).step_by(512).find(|&s| !sector_ok(s)) {
            let found = if got[sec..sec + 512].iter().all(|&b| b == 0) {
                "zeroes".to_string()
            } else if before[sec..sec + 512] == got[sec..sec + 512] {
                "the data from before the round".to_string()
            } else if let Some(s) = seqs
                .iter()
                .zip(&data)
                .find(|(_, p)| p[sec..sec + 512] == got[sec..sec + 512])
                .map(|(s, _)| s)
            {
                format!("the older write {s}")
            } else {
                "data written by no one".to_string()
            };
            bad.push(format!(
                "slot {slot} (offset {}), sector {}: {} found {found}",
                offset,
                sec / 512,
                match durable {
                    Some(d) => format!("durable write {d} lost,"),
                    None => "no durable write;".to_string(),
                }
            ));
            continue;
        }
        let Some(&newest) = seqs.last() else {
            continue;
        };
        let newest_data = data.last().expect("newest");
        let landed = newest_data.as_slice() == got;
        if j.durable[newest as usize] {
            t.durable += 1;
        } else if j.acked[newest as usize] {
            if landed {
                t.acked_landed += 1;
            } else {
                t.acked_lost += 1;
            }
        } else if landed {
            t.in_flight_landed += 1;
        } else if (0..BS as usize)
            .step_by(512)
            .any(|sec| newest_data[sec..sec + 512] == got[sec..sec + 512])
        {
            t.in_flight_torn += 1;
        } else {
            t.in_flight_absent += 1;
        }
    }
    if bad.is_empty() {
        Ok(t)
    } else {
        let n = bad.len();
        bad.truncate(10);
        Err(format!("{n} slot(s) wrong:\n{}", bad.join("\n")))
    }
}

/// Reads `[offset, offset+len)` through `d`, 1 MiB at a time.
fn read_range(d: &mut Driver, offset: u64, len: u64) -> Vec<u8> {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    let mut out = Vec::with_capacity(len as usize);
    for off in (offset..offset + len).step_by(MIB as usize) {
        let n = MIB.min(offset + len - off) as u32;
        let o = read(q, &mem, off / 512, n);
        assert_eq!(o.status, S_OK, "read at {off}");
        out.extend_from_slice(&o.data);
    }
    out
}

/// xorshift64*, for the kill delays.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("BLKGRAPH_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("kill delays from BLKGRAPH_CRASH_SEED={seed}");
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn wait_first_flush(flushes: &AtomicU64, writer: &thread::ScopedJoinHandle<Journal>) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while flushes.load(Ordering::SeqCst) == 0 {
        if writer.is_finished() || Instant::now() > deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
    true
}

/// Runs the kill rounds on the image `create` makes in a new directory
/// (given the directory, it returns the image of `rounds() * AREA` bytes).
fn kill_9_rounds(what: &str, initial: Initial, create: impl FnOnce(&Path, u64) -> PathBuf) {
    let rounds = rounds();
    let dir = TempDir::new("blkgraph-qcow2-crash").unwrap();
    let image = create(dir.path(), rounds * AREA);
    let mut s = Setup::start(dir, image);
    let mut rng = Rng::from_env();
    // What each finished round's region read after its round.
    let mut settled: Vec<Vec<u8>> = Vec::new();
    let mut leaks = Vec::new();
    for round in 0..rounds {
        let delay = Duration::from_micros(rng.below(MAX_KILL_DELAY.as_micros() as u64 + 1));
        let mut d = s.connect();
        let stop = AtomicBool::new(false);
        let flushes = AtomicU64::new(0);
        let journal = thread::scope(|scope| {
            let w = scope.spawn(|| writer(&mut d, round, &stop, &flushes));
            let flushed = wait_first_flush(&flushes, &w);
            if flushed {
                thread::sleep(delay);
            }
            let status = s.daemon.kill();
            stop.store(true, Ordering::SeqCst);
            let journal = w.join().expect("writer");
            assert!(flushed, "no FLUSH completed in 20 s");
            assert_eq!(
                status.and_then(|st| st.signal()),
                Some(libc::SIGKILL),
                "the daemon did not die of the kill ({status:?}); log:\n{}",
                s.daemon.log_contents()
            );
            journal
        });
        drop(d);
        let ctx = format!("{what}, round {round} (kill {delay:?} after the first FLUSH)");

        let check = qemu_img_check(s.image());
        assert!(
            (check.code == 0 || check.code == 3)
                && check.corruptions == 0
                && check.check_errors == 0,
            "{ctx}: qemu-img check after the kill: {check:?}"
        );
        leaks.push(check.leaks);
        let raw = s.dir.path().join("qemu.raw");
        convert_to_raw("qcow2", s.image(), &raw);
        let by_qemu = std::fs::read(&raw).unwrap();
        let region = &by_qemu[(round * AREA) as usize..][..AREA as usize];
        let tally = verify(region, round, &journal, initial)
            .unwrap_or_else(|e| panic!("{ctx}: QEMU's reading of the image: {e}"));

        s.restart();
        let mut d = s.connect();
        let by_daemon = read_range(&mut d, 0, rounds * AREA);
        compare_bytes(&by_daemon, &by_qemu, 0).unwrap_or_else(|e| {
            panic!("{ctx}: the restarted daemon reads otherwise than QEMU: {e}")
        });
        for (r, data) in settled.iter().enumerate() {
            let now = &by_daemon[r * AREA as usize..][..AREA as usize];
            compare_bytes(now, data, r as u64 * AREA)
                .unwrap_or_else(|e| panic!("{ctx}: the region of round {r} changed: {e}"));
        }
        settled.push(region.to_vec());
        drop(d);

        let acked = journal.acked.iter().filter(|&&a| a).count();
        let durable = journal.durable.iter().filter(|&&a| a).count();
        eprintln!(
            "{ctx}{}: {} writes submitted, {acked} acked, {durable} durable (acked before one \
             of {} completed FLUSHes); {} leaked clusters; each slot's newest write: {tally:?}",
            if journal.flush_in_flight {
                " with a FLUSH in flight"
            } else {
                ""
            },
            journal.submitted,
            journal.flushes,
            check.leaks,
        );
        assert!(durable > 0 && tally.durable > 0, "nothing durable to check");
        if round == rounds - 1 {
            verify_sees_lost_writes(region, round, &journal, initial);
        }
    }
    let status = s.daemon.stop().expect("the daemon ran");
    assert!(status.success(), "{what}: the daemon exited with {status}");
    let check = qemu_img_check(s.image());
    assert!(
        check.code <= 3 && check.corruptions == 0 && check.check_errors == 0,
        "{what}: qemu-img check at the end: {check:?}"
    );
    eprintln!("{what}: leaked clusters after each kill: {leaks:?}");
    check_sees_corruption(s.image(), s.dir.path());
}

/// The negative check of [`verify`]: the region with a slot whose newest
/// write is durable zeroed (or set to the data from before) must fail it.
fn verify_sees_lost_writes(region: &[u8], round: u64, j: &Journal, initial: Initial) {
    let seq = (j.submitted.saturating_sub(SLOTS)..j.submitted)
        .rev()
        .find(|&seq| j.durable[seq as usize])
        .expect("a durable write");
    let slot = slot_of(seq);
    for (what, data) in [
        ("zeroes", vec![0u8; BS as usize]),
        (
            "old data",
            initial.data(round * AREA + slot * BS, BS as usize),
        ),
    ] {
        let mut lost = region.to_vec();
        lost[(slot * BS) as usize..][..BS as usize].copy_from_slice(&data);
        let e = verify(&lost, round, j, initial).expect_err("verify missed a lost durable write");
        assert!(
            e.contains(&format!("slot {slot} ")) && e.contains("durable write"),
            "{what}: {e}"
        );
    }
}

/// The negative check of the `qemu-img check` assertion: a copy of the
/// image cut short (its last clusters gone) must be reported.
fn check_sees_corruption(image: &Path, dir: &Path) {
    let copy = dir.join("cut.qcow2");
    std::fs::copy(image, &copy).unwrap();
    let len = std::fs::metadata(&copy).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
    f.set_len(len / 2).unwrap();
    let check = qemu_img_check(&copy);
    assert!(
        check.code != 0 && check.code != 3 && (check.corruptions > 0 || check.check_errors > 0),
        "a cut image passed qemu-img check: {check:?}"
    );
}

fn create_qcow2(dir: &Path, size: u64, opts: &str) -> PathBuf {
    let image = dir.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            opts,
            s(&image),
            &size.to_string(),
        ],
    );
    image
}

#[test]
fn kill_9_fresh_qcow2() {
    kill_9_rounds("fresh qcow2", Initial::Zeroes, |dir, size| {
        create_qcow2(dir, size, "cluster_size=64k")
    });
}

#[test]
fn kill_9_qcow2_512_byte_clusters() {
    kill_9_rounds(
        "qcow2 with 512-byte clusters",
        Initial::Zeroes,
        |dir, size| create_qcow2(dir, size, "cluster_size=512"),
    );
}

#[test]
fn kill_9_qcow2_with_backing_file() {
    kill_9_rounds("qcow2 over a backing file", Initial::Base, |dir, size| {
        let raw = dir.join("base.raw");
        create_pattern_image(&raw, size, BASE_SEED).unwrap();
        let base = dir.join("base.qcow2");
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
                s(&raw),
                s(&base),
            ],
        );
        std::fs::remove_file(&raw).unwrap();
        let top = dir.join("disk.qcow2");
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
                s(&top),
            ],
        );
        top
    });
}
