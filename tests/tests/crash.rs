//! Crash consistency of the real daemon, driven by the host-side vhost-user
//! frontend, with the page cache (`cache.direct=off`) on an image file on a
//! disk-backed file system (ext4 here, never tmpfs), for `aio=io_uring` and
//! `aio=threads`:
//!
//! 1. A FLUSH reaches stable storage. Writes without a flush leave their
//!    pages dirty in the page cache (the control: the device does not sync
//!    on its own, so the check below can fail); once a FLUSH completed,
//!    `cachestat(2)` shows no page of the image dirty or under writeback.
//!    With `cache.no-flush=on` on the file node, where FLUSH does nothing,
//!    the pages stay dirty: the negative check that shows the assertion
//!    fails when a FLUSH does not reach the file.
//! 2. kill -9 during writes with flushes. A writer keeps 16 distinct,
//!    verifiable 4 KiB writes in flight and sends a FLUSH after every 8
//!    acknowledged ones; the daemon is killed with SIGKILL at a random
//!    moment, restarted with the same command line on the same image, and
//!    every write acknowledged before the submission of a FLUSH that
//!    completed must read back exactly (unless a later write to the same
//!    block replaced it). As far as virtio goes, writes acknowledged after
//!    that may or may not be there; the test expects them too (see below),
//!    and reports that check apart. Writes in flight at the kill may or may
//!    not be there, or be torn at sector granularity: they are counted and
//!    printed. A zeroed block must make the check fail (its negative check).
//!
//! What kill -9 can and cannot show: a write that reached the kernel is in
//! the page cache, and the kernel writes it back whether or not the process
//! that wrote it is still alive. kill -9 alone therefore cannot lose data
//! that the daemon handed to the kernel, flushed or not. What part 2 checks
//! is that the daemon acknowledges a write only once the kernel has it (no
//! acknowledged write lives only in the daemon's memory or in a queue that
//! dies with it), that writes in flight at the kill corrupt nothing that was
//! acknowledged, and that a restart on the same image serves what was
//! written. The daemon keeps no write cache of its own, so even a write
//! acknowledged but not flushed must survive a kill -9: stronger than the
//! virtio contract, and to be relaxed if the daemon ever caches writes
//! (a FLUSH would then have to empty that cache). That a completed FLUSH
//! also makes the data survive a power failure, which only fdatasync/fsync
//! guarantees, is what part 1 proves.
//!
//! These tests also run against qemu-storage-daemon
//! (`BLKGRAPH_TEST_DAEMON=qsd`). `BLKGRAPH_CRASH_SEED=N` repeats the random
//! kill delays of an earlier run (the seed is printed).

mod frontend;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blkgraph_tests::{
    cachestat, check_pattern, create_pattern_image, create_sparse_image, fill_pattern, is_tmpfs,
    read_file_range, write_file_range, CacheStat, Daemon, DaemonKind, ExportOptions, TempDir,
};
use frontend::blk::*;
use frontend::driver::{Desc, Driver, Queue};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;

/// A daemon serving one image of a temporary directory on a disk-backed
/// file system. Fields drop in order: the daemon stops before the directory
/// goes.
struct Setup {
    daemon: Daemon,
    options: ExportOptions,
    dir: TempDir,
}

impl Setup {
    /// Creates the image with `create` and starts the daemon with the page
    /// cache and `aio`; `file_extra` goes to the file node's options.
    fn start(aio: &str, file_extra: &str, create: impl FnOnce(&Path)) -> Setup {
        let dir = disk_backed_dir();
        let image = dir.path().join("disk.raw");
        create(&image);
        let mut options = ExportOptions::new(&image, &dir.path().join("vhost-user-blk.sock"));
        options.cache_direct = false;
        options.aio = aio.into();
        options.file_extra = file_extra.into();
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

    /// Starts the daemon again with the same command line on the same image.
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

/// A new temporary directory where page-cache state means something:
/// `$TMPDIR` (or /tmp), or the target directory if that is tmpfs (whose pages
/// never become clean, so nothing here could be observed).
fn disk_backed_dir() -> TempDir {
    let tmp = std::env::temp_dir();
    let base = if is_tmpfs(&tmp) {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
    } else {
        tmp
    };
    std::fs::create_dir_all(&base).expect("create the base directory");
    assert!(
        !is_tmpfs(&base),
        "{} is tmpfs: the crash tests need a disk-backed file system (set TMPDIR)",
        base.display()
    );
    TempDir::new_in(&base, "blkgraph-crash").expect("create temp dir")
}

/// The page-cache state of a range of the image, failing the test with a
/// clear message on kernels without cachestat(2) (before 6.5).
fn pages(image: &Path, offset: u64, len: u64) -> CacheStat {
    cachestat(image, offset, len).unwrap_or_else(|e| {
        panic!(
            "cachestat on {}: {e} (the test needs Linux 6.5 or later)",
            image.display()
        )
    })
}

/// Pages of the range that are not known to be on stable storage.
fn unstable(cs: &CacheStat) -> u64 {
    cs.dirty + cs.writeback
}

fn pattern(len: usize, offset: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, offset, seed);
    v
}

// ---------------------------------------------------------------------------------------------
// Part 1: a FLUSH reaches stable storage
// ---------------------------------------------------------------------------------------------

/// The size of the range written without a flush.
const RANGE: u64 = 4 * MIB;
/// Size of the requests that write it.
const CHUNK: usize = 256 * 1024;
/// How many fresh ranges are tried when something else wrote the file back
/// before the test looked (see [`unflushed_range`]).
const ATTEMPTS: u64 = 4;
/// The image of part 1 (allocated, so the writes overwrite blocks on disk).
const FLUSH_IMAGE: u64 = ATTEMPTS * RANGE;

/// Writes pattern `seed` over `[offset, offset+RANGE)` through queue 0,
/// without a flush.
fn write_range(d: &mut Driver, offset: u64, seed: u64) {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    for off in (offset..offset + RANGE).step_by(CHUNK) {
        let out = write(q, &mem, off / 512, &pattern(CHUNK, off, seed));
        assert_eq!(out.status, S_OK, "write at {off}");
    }
}

/// Writes the range of `attempt` without a flush and returns its offset once
/// `cachestat` shows it dirty: every page of it in the cache dirty or under
/// writeback, still so after other requests completed and a pause (the
/// control: the daemon neither writes through nor syncs on its own, so the
/// checks after a FLUSH can fail). Returns `None` if the pages were clean
/// already: the daemon wrote them through, or something outside the test
/// wrote the file back (`sync(1)` from another process, writeback under
/// memory pressure; dirty pages expire only after
/// `vm.dirty_expire_centisecs`, 30 s by default); the caller tries a fresh
/// range, and gives up after `ATTEMPTS`.
fn unflushed_range(s: &Setup, d: &mut Driver, attempt: u64) -> Option<u64> {
    let offset = attempt * RANGE;
    write_range(d, offset, 0x100 + attempt);
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    assert_eq!(read(q, &mem, 0, 4096).status, S_OK);
    let id = BlkRequest::new(q, &mem, T_GET_ID, 0, &[], 20).run(q, &mem);
    assert_eq!(id.status, S_OK);
    thread::sleep(Duration::from_millis(200));
    let cs = pages(s.image(), offset, RANGE);
    if cs.cache > 0 && unstable(&cs) == cs.cache {
        return Some(offset);
    }
    eprintln!(
        "attempt {attempt}: the range written without a flush is not all dirty ({cs:?}): \
         written back already, by the daemon or by something else; trying a fresh range"
    );
    None
}

fn flush(d: &mut Driver) {
    let mem = d.mem.clone();
    let out = simple(&mut d.queues[0], &mem, T_FLUSH, &[]);
    assert_eq!(out.status, S_OK, "FLUSH failed");
}

/// Why a clean page cache after a FLUSH proves that the FLUSH reached
/// fdatasync/fsync on the image: a dirty page becomes clean only by being
/// written back to the disk (even reclaim writes a dirty page back before
/// it drops it), and a page under writeback only when the disk completed
/// that write. The kernel's flusher would write these pages back
/// only after `dirty_expire_centisecs` (30 s) or above the background dirty
/// threshold, and the control (in [`unflushed_range`]) shows they stay
/// dirty without a FLUSH. fdatasync and fsync start writeback of every dirty
/// page of the file and wait until it completed (`file_write_and_wait_range`),
/// so right after a FLUSH that reached one, `dirty + writeback` is 0 for the
/// whole file, with no margin needed and no waiting: nothing else writes the
/// file. A FLUSH that stopped at the page cache (or was completed without
/// reaching the file) leaves the pages dirty, which the `cache.no-flush=on`
/// check below shows.
fn flush_reaches_stable_storage(aio: &str) {
    let s = Setup::start(aio, "", |image| {
        create_pattern_image(image, FLUSH_IMAGE, 7).unwrap()
    });
    let mut d = s.connect();
    let offset = (0..ATTEMPTS)
        .find_map(|a| unflushed_range(&s, &mut d, a))
        .expect(
            "no range written without a flush stayed dirty (the daemon writes through, or \
             something keeps writing the file back): a flush cannot be observed",
        );
    let before = pages(s.image(), offset, RANGE);

    flush(&mut d);
    let after = pages(s.image(), offset, RANGE);
    let file = pages(s.image(), 0, 0);
    assert_eq!(
        (after.dirty, after.writeback, file.dirty, file.writeback),
        (0, 0, 0, 0),
        "{aio}: dirty pages or pages under writeback left once a FLUSH completed: range \
         {after:?}, whole file {file:?}; before the FLUSH {before:?}"
    );
    let on_file = read_file_range(s.image(), offset, RANGE as usize).unwrap();
    check_pattern(&on_file, offset, 0x100 + offset / RANGE).expect("image after FLUSH");
    eprintln!("{aio}: before FLUSH {before:?}, after {after:?}");
}

/// The negative check: with `cache.no-flush=on` on the file node a FLUSH
/// completes without reaching the file, and the pages must stay dirty.
fn no_flush_leaves_dirty_pages(aio: &str) {
    let s = Setup::start(aio, "cache.no-flush=on", |image| {
        create_pattern_image(image, FLUSH_IMAGE, 7).unwrap()
    });
    let mut d = s.connect();
    let mut seen = Vec::new();
    for attempt in 0..ATTEMPTS {
        let Some(offset) = unflushed_range(&s, &mut d, attempt) else {
            continue;
        };
        flush(&mut d);
        let after = pages(s.image(), offset, RANGE);
        if unstable(&after) > 0 {
            eprintln!("{aio}, cache.no-flush=on: after FLUSH {after:?}");
            return;
        }
        // Something else may have written the file back at that moment:
        // try again; a FLUSH that reaches the file cleans every attempt.
        seen.push(after);
    }
    panic!(
        "{aio}: with cache.no-flush=on a FLUSH still left no dirty page ({seen:?}): the flush \
         check cannot tell a FLUSH that reaches the disk from one that does not"
    );
}

#[test]
fn flush_reaches_stable_storage_io_uring() {
    flush_reaches_stable_storage("io_uring");
    no_flush_leaves_dirty_pages("io_uring");
}

#[test]
fn flush_reaches_stable_storage_threads() {
    flush_reaches_stable_storage("threads");
    no_flush_leaves_dirty_pages("threads");
}

// ---------------------------------------------------------------------------------------------
// Part 2: kill -9 during writes with flushes
// ---------------------------------------------------------------------------------------------

/// Size of one write; write `seq` goes to slot `seq % SLOTS`.
const BS: u64 = 4096;
/// The area the writes cycle through (the whole image).
const AREA: u64 = 32 * MIB;
const SLOTS: u64 = AREA / BS;
/// Writes in flight.
const QD: usize = 16;
/// A FLUSH is sent once this many writes were acknowledged since the last one.
const FLUSH_EVERY: usize = 8;
/// While a FLUSH is in flight, at most this many writes are submitted after
/// it. A FLUSH with much to write back can take long enough for the writer
/// to go round the whole area (a guest's file system waits for its barriers
/// too); this keeps the blocks it made durable unwritten for several FLUSHes.
const MAX_AHEAD: u64 = 1024;
/// Kill, restart and verify cycles per test.
const ROUNDS: u64 = 4;
/// The kill comes at a random moment up to this long after the first FLUSH
/// of a round completed.
const MAX_KILL_DELAY: Duration = Duration::from_millis(300);

/// The data of write `seq` of `round`: a pattern no other write uses.
fn write_seed(round: u64, seq: u64) -> u64 {
    (0xc4a5 << 48) | (round << 32) | seq
}

/// What the writer saw.
#[derive(Default)]
struct Journal {
    /// Writes submitted; `seq` ranges over `0..submitted`.
    submitted: u64,
    /// Acknowledged with S_OK, by `seq`.
    acked: Vec<bool>,
    /// Acknowledged before the submission of a FLUSH that completed with
    /// S_OK, by `seq`: these must survive.
    durable: Vec<bool>,
    /// FLUSHes completed.
    flushes: u64,
    /// A FLUSH was in flight when the writer stopped.
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

    /// Lays out a request of `type_` at `sector` (with the data buffer for
    /// a write) and puts it on the ring.
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

/// Writes distinct blocks with `QD` in flight and a FLUSH after every
/// `FLUSH_EVERY` acknowledged writes (at most `MAX_AHEAD` writes past a
/// FLUSH in flight), until `stop` is set (after the daemon
/// was killed; completions seen then were still written by the daemon).
/// `flushes` counts completed FLUSHes for the killer.
fn writer(d: &mut Driver, round: u64, stop: &AtomicBool, flushes: &AtomicU64) -> Journal {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    let bufs: Vec<ReqBuf> = (0..=QD).map(|_| ReqBuf::new(q)).collect();
    let flush_buf = QD;
    let mut free: Vec<usize> = (0..QD).collect();
    let mut pending: HashMap<u16, Op> = HashMap::new();
    // Acknowledged writes that no submitted FLUSH covers yet.
    let mut uncovered: Vec<u64> = Vec::new();
    // Writes submitted since the last FLUSH was.
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
            let offset = seq % SLOTS * BS;
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

/// What the image held after a restart: each slot shows its newest write,
/// classed by what the writer knew of it at the kill.
#[derive(Debug, Default)]
struct Tally {
    /// Newest write durable (acked before a completed FLUSH's submission).
    durable: u64,
    /// Newest write acknowledged, not covered by a completed FLUSH.
    acked: u64,
    /// Newest write in flight at the kill and on the image...
    in_flight_landed: u64,
    /// ... partly there, sector by sector ...
    in_flight_torn: u64,
    /// ... or not there.
    in_flight_absent: u64,
}

/// Checks the image, read through `d`, against the journal of `round`.
///
/// For every slot, the sectors must hold the slot's newest durable write or
/// a write submitted after it: the virtio contract, and the failure this
/// test is about. Beyond the contract, the same must hold for the newest
/// acknowledged write: the daemon keeps no write cache of its own, so a
/// write it acknowledged was in the kernel's page cache, which a kill -9
/// does not lose. Writes in flight at the kill may or may not be there.
fn verify(d: &mut Driver, round: u64, j: &Journal) -> Result<Tally, String> {
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    let mut t = Tally::default();
    let chunk = MIB;
    let mut lost = Vec::new();
    for base in (0..AREA).step_by(chunk as usize) {
        let out = read(q, &mem, base / 512, chunk as u32);
        if out.status != S_OK {
            return Err(format!("read at {base} failed with status {}", out.status));
        }
        for slot in base / BS..(base + chunk) / BS {
            let offset = slot * BS;
            let got = &out.data[(offset - base) as usize..][..BS as usize];
            let seqs: Vec<u64> = (slot..j.submitted).step_by(SLOTS as usize).collect();
            let Some(&newest) = seqs.last() else {
                continue;
            };
            let data: Vec<Vec<u8>> = seqs
                .iter()
                .map(|&s| pattern(BS as usize, offset, write_seed(round, s)))
                .collect();
            // Whether each sector holds write `from` or a later one.
            let holds_from = |from: u64| {
                (0..BS as usize).step_by(512).all(|sec| {
                    seqs.iter()
                        .zip(&data)
                        .any(|(&s, p)| s >= from && p[sec..sec + 512] == got[sec..sec + 512])
                })
            };
            let newest_with = |flags: &[bool]| seqs.iter().rev().find(|&&s| flags[s as usize]);
            for (what, flags) in [
                ("durable write (acked before a completed FLUSH)", &j.durable),
                ("acknowledged write (not flushed)", &j.acked),
            ] {
                let Some(&s) = newest_with(flags) else {
                    continue;
                };
                if !holds_from(s) {
                    let found = if got.iter().all(|&b| b == 0) {
                        "zeroes".to_string()
                    } else if let Some((o, _)) =
                        seqs.iter().zip(&data).find(|(_, p)| p.as_slice() == got)
                    {
                        format!("the older write {o}")
                    } else {
                        "data of no write since".to_string()
                    };
                    lost.push(format!(
                        "slot {slot} (offset {offset}): {what} {s} lost, found {found}"
                    ));
                }
            }
            let newest_data = data.last().expect("newest");
            if j.durable[newest as usize] {
                t.durable += 1;
            } else if j.acked[newest as usize] {
                t.acked += 1;
            } else if newest_data.as_slice() == got {
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
    }
    if lost.is_empty() {
        Ok(t)
    } else {
        let n = lost.len();
        lost.truncate(10);
        Err(format!("{n} slot(s) lost data:\n{}", lost.join("\n")))
    }
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

/// Waits until `flushes` is at least 1 (the round has durable writes);
/// false if the writer ended first or none completed in 20 s.
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

fn kill_9_keeps_flushed_writes(aio: &str) {
    let mut s = Setup::start(aio, "", |image| create_sparse_image(image, AREA).unwrap());
    let mut rng = Rng::from_env();
    for round in 0..ROUNDS {
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

        s.restart();
        let mut d = s.connect();
        let tally = verify(&mut d, round, &journal).unwrap_or_else(|e| {
            panic!("{aio}, round {round} (kill {delay:?} after the first FLUSH): {e}")
        });
        let acked = journal.acked.iter().filter(|&&a| a).count();
        let durable = journal.durable.iter().filter(|&&a| a).count();
        eprintln!(
            "{aio}, round {round}: killed {delay:?} after the first FLUSH{}; {} writes \
             submitted, {acked} acked, {durable} durable (acked before one of {} completed \
             FLUSHes); each slot's newest write: {tally:?}",
            if journal.flush_in_flight {
                " with a FLUSH in flight"
            } else {
                ""
            },
            journal.submitted,
            journal.flushes
        );
        assert!(durable > 0 && tally.durable > 0, "nothing durable to check");
        if round == ROUNDS - 1 {
            verify_sees_lost_writes(&s, &mut d, round, &journal);
        }
    }
}

/// The negative check of [`verify`]: a slot whose newest write is durable,
/// then one whose newest write is only acknowledged, overwritten with zeroes
/// behind the daemon's back (in the page cache it shares), must fail it.
fn verify_sees_lost_writes(s: &Setup, d: &mut Driver, round: u64, j: &Journal) {
    let newest_slot = |durable: bool| {
        (j.submitted.saturating_sub(SLOTS)..j.submitted)
            .rev()
            .find(|&seq| j.acked[seq as usize] && j.durable[seq as usize] == durable)
            .map(|seq| seq % SLOTS)
    };
    for (durable, what) in [(true, "durable write"), (false, "acknowledged write")] {
        let Some(slot) = newest_slot(durable) else {
            eprintln!("no slot whose newest write is a {what} only: not checked");
            continue;
        };
        let offset = slot * BS;
        let saved = read_file_range(s.image(), offset, BS as usize).unwrap();
        write_file_range(s.image(), offset, &[0; BS as usize]).unwrap();
        let e = verify(d, round, j).expect_err("verify missed a zeroed slot");
        assert!(
            e.contains(&format!("slot {slot} ")) && e.contains(what),
            "{what}: {e}"
        );
        write_file_range(s.image(), offset, &saved).unwrap();
        eprintln!("verify saw slot {slot} zeroed: its {what} lost");
    }
    verify(d, round, j).expect("the image restored");
}

#[test]
fn kill_9_keeps_flushed_writes_io_uring() {
    kill_9_keeps_flushed_writes("io_uring");
}

#[test]
fn kill_9_keeps_flushed_writes_threads() {
    kill_9_keeps_flushed_writes("threads");
}
