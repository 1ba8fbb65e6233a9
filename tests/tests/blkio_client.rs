//! The `blkio` crate (libblkio's Rust core, an independent vhost-user-blk frontend) as a client
//! of a daemon started with blkgraph's qemu-storage-daemon-compatible command line.
//!
//! By default the daemon is blkgraph (`target/<profile>/blkgraph`, or `BLKGRAPH_BIN`);
//! `BLKGRAPH_TEST_DAEMON=qsd` runs the same tests against qemu-storage-daemon.

use blkgraph_tests::{
    cachestat, check_pattern, check_zeroes, compare_bytes, fill_pattern, is_tmpfs, read_file_range,
    ImageInit, TestExport,
};
use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags, State};
use std::mem::MaybeUninit;
use std::time::Duration;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Longest wait for any completion; a hung backend fails the test instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------------------------

/// Creates a virtio-blk-vhost-user instance for `t`'s socket and connects it.
fn connect(t: &TestExport, read_only: bool) -> Blkio {
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("blkio new");
    b.set_str("path", t.socket_str()).expect("set path");
    if read_only {
        b.set_bool("read-only", true).expect("set read-only");
    }
    b.connect()
        .unwrap_or_else(|e| panic!("connect to {}: {e} ({:?})", t.socket_str(), e.errno()));
    assert_eq!(b.state(), State::Connected);
    b
}

/// Starts `b` with `n` queues.
fn start(b: &mut Blkio, n: usize) -> Vec<Blkioq> {
    b.set_i32("num-queues", n as i32).expect("set num-queues");
    let out = b
        .start()
        .unwrap_or_else(|e| panic!("start with {n} queue(s): {e} ({:?})", e.errno()));
    assert_eq!(out.queues.len(), n);
    out.queues
}

/// A memfd-backed buffer region registered with the backend.
#[derive(Clone, Copy)]
struct Mem {
    addr: usize,
    len: usize,
}

impl Mem {
    /// Allocates `len` bytes (rounded up to the region alignment) and maps them into the backend.
    fn map(b: &mut Blkio, len: usize) -> Mem {
        let align = b
            .get_u64("mem-region-alignment")
            .expect("mem-region-alignment") as usize;
        let len = len.div_ceil(align) * align;
        let region: MemoryRegion = b.alloc_mem_region(len).expect("alloc_mem_region");
        b.map_mem_region(&region).expect("map_mem_region");
        Mem {
            addr: region.addr,
            len: region.len,
        }
    }

    fn ptr(&self, off: usize, len: usize) -> *mut u8 {
        assert!(
            off + len <= self.len,
            "buffer {off}+{len} outside region of {}",
            self.len
        );
        (self.addr + off) as *mut u8
    }

    /// The bytes at `off..off+len`. The caller must not have a request in flight on them.
    #[allow(clippy::mut_from_ref)]
    fn slice(&self, off: usize, len: usize) -> &mut [u8] {
        // SAFETY: the region is a live mapping owned by the Blkio instance for the whole test;
        // each test uses disjoint parts for concurrently outstanding requests.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(off, len), len) }
    }
}

/// One request.
#[derive(Clone, Copy, Debug)]
enum Op {
    Read {
        off: u64,
        len: usize,
        buf: usize,
    },
    Write {
        off: u64,
        len: usize,
        buf: usize,
        flags: ReqFlags,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
        flags: ReqFlags,
    },
}

fn submit(q: &mut Blkioq, mem: &Mem, op: Op, user_data: usize) {
    match op {
        Op::Read { off, len, buf } => {
            q.read(off, mem.ptr(buf, len), len, user_data, ReqFlags::empty())
        }
        Op::Write {
            off,
            len,
            buf,
            flags,
        } => q.write(off, mem.ptr(buf, len), len, user_data, flags),
        Op::Flush => q.flush(user_data, ReqFlags::empty()),
        Op::Discard { off, len } => q.discard(off, len, user_data, ReqFlags::empty()),
        Op::WriteZeroes { off, len, flags } => q.write_zeroes(off, len, user_data, flags),
    }
}

/// Waits for at least one completion (at most `max`) and returns `(user_data, ret)` pairs.
fn reap(q: &mut Blkioq, max: usize) -> Vec<(usize, i32)> {
    let mut comps: Vec<MaybeUninit<Completion>> = (0..max).map(|_| MaybeUninit::uninit()).collect();
    loop {
        let mut timeout = IO_TIMEOUT;
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
            Err(e) => panic!(
                "do_io: {e} ({:?}); no completion within {IO_TIMEOUT:?}?",
                e.errno()
            ),
        }
    }
}

/// Runs one request to completion and returns its `ret` (0 or -errno).
fn exec(q: &mut Blkioq, mem: &Mem, op: Op) -> i32 {
    submit(q, mem, op, 0x5151);
    let c = reap(q, 1);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].0, 0x5151, "completion for an unknown request");
    c[0].1
}

/// Runs `op` and panics unless it succeeds.
fn exec_ok(q: &mut Blkioq, mem: &Mem, op: Op) {
    let ret = exec(q, mem, op);
    assert_eq!(ret, 0, "{op:?} failed: {}", errstr(ret));
}

fn errstr(ret: i32) -> String {
    if ret == 0 {
        "success".into()
    } else {
        std::io::Error::from_raw_os_error(-ret).to_string()
    }
}

/// Writes pattern `seed` to `[off, off+len)` through `q`, in requests of at most `mem.len`.
fn write_pattern(q: &mut Blkioq, mem: &Mem, off: u64, len: u64, seed: u64) {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(mem.len as u64) as usize;
        fill_pattern(mem.slice(0, n), off + done, seed);
        exec_ok(
            q,
            mem,
            Op::Write {
                off: off + done,
                len: n,
                buf: 0,
                flags: ReqFlags::empty(),
            },
        );
        done += n as u64;
    }
}

/// Reads `[off, off+len)` through `q` into a Vec.
fn read_range(q: &mut Blkioq, mem: &Mem, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(mem.len as u64) as usize;
        exec_ok(
            q,
            mem,
            Op::Read {
                off: off + done,
                len: n,
                buf: 0,
            },
        );
        out.extend_from_slice(mem.slice(0, n));
        done += n as u64;
    }
    out
}

/// Splits `[off, off+len)` into requests of at most `max` bytes (`max == 0`: unlimited).
fn split(off: u64, len: u64, max: u64) -> Vec<(u64, u64)> {
    let max = if max == 0 { len } else { max / 512 * 512 };
    assert!(max > 0);
    let mut v = Vec::new();
    let mut o = off;
    while o < off + len {
        let n = max.min(off + len - o);
        v.push((o, n));
        o += n;
    }
    v
}

/// xorshift64* for test randomness (seeded, reproducible).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (1) connect for the capacity, disconnect, connect again and do I/O (as fio does)
// ---------------------------------------------------------------------------------------------

#[test]
fn reconnect_after_capacity_probe() {
    let size = 16 * MIB;
    let mut t = TestExport::start(size, ImageInit::Pattern(11), |_| {});

    // fio's libblkio engine connects once only to read the capacity, then destroys the
    // instance. Do that twice in a row.
    for _ in 0..2 {
        let b = connect(&t, false);
        assert_eq!(b.get_u64("capacity").expect("capacity"), size);
        assert!(b.get_i32("max-queues").expect("max-queues") >= 1);
        drop(b);
    }
    t.assert_daemon_alive();

    // The real session: start, read what the image holds, write and read back.
    {
        let mut b = connect(&t, false);
        assert_eq!(b.get_u64("capacity").unwrap(), size);
        let mut qs = start(&mut b, 1);
        let mem = Mem::map(&mut b, 256 * KIB as usize);
        let q = &mut qs[0];

        let data = read_range(q, &mem, 0, 256 * KIB);
        check_pattern(&data, 0, 11).expect("image contents through the second connection");

        write_pattern(q, &mem, MIB + 512, 64 * KIB, 12);
        let data = read_range(q, &mem, MIB + 512, 64 * KIB);
        check_pattern(&data, MIB + 512, 12).expect("read back in the same session");
        // Neighbours untouched.
        let before = read_range(q, &mem, MIB, 512);
        check_pattern(&before, MIB, 11).expect("sector before the write");
        let after = read_range(q, &mem, MIB + 512 + 64 * KIB, 512);
        check_pattern(&after, MIB + 512 + 64 * KIB, 11).expect("sector after the write");
    }
    t.assert_daemon_alive();

    // A third connection after a started session still works and sees the data.
    let mut b = connect(&t, false);
    let mut qs = start(&mut b, 1);
    let mem = Mem::map(&mut b, 64 * KIB as usize);
    let data = read_range(&mut qs[0], &mem, MIB + 512, 64 * KIB);
    check_pattern(&data, MIB + 512, 12).expect("data written by the previous connection");
}

// ---------------------------------------------------------------------------------------------
// (2) random pattern writes and verified reads, QD 32, two queues concurrently
// ---------------------------------------------------------------------------------------------

const VERIFY_DEPTH: usize = 32;
const VERIFY_MAX_LEN: u64 = MIB;

/// Random request length: log-uniform between 512 B and 1 MiB, a multiple of 512.
fn random_len(rng: &mut Rng) -> u64 {
    let e = rng.below(12); // 512 << 0 ..= 512 << 11 (1 MiB)
    let base = 512u64 << e;
    let len = (base + rng.below(base)) / 512 * 512;
    len.min(VERIFY_MAX_LEN)
}

/// Disjoint extents in `[start, start+len)`. With `gaps`, extents are separated by random gaps
/// and never start 4 KiB-aligned; without, they tile the range exactly. Shuffled.
fn extents(rng: &mut Rng, start: u64, len: u64, gaps: bool) -> Vec<(u64, u64)> {
    let end = start + len;
    let mut v = Vec::new();
    let mut off = start;
    loop {
        if gaps {
            off += rng.below(16) * 512;
            if off.is_multiple_of(4096) {
                off += 512 * (1 + rng.below(7));
            }
        }
        if off >= end {
            break;
        }
        let mut n = random_len(rng);
        if off + n > end {
            if gaps {
                break;
            }
            n = end - off;
        }
        v.push((off, n));
        off += n;
    }
    rng.shuffle(&mut v);
    v
}

/// Writes (`seed = Some`) or verifies (`None`) every extent with `VERIFY_DEPTH` requests in
/// flight. `model` holds the expected contents of `[area, area + model.len())`.
fn pipeline(
    q: &mut Blkioq,
    mem: &Mem,
    area: u64,
    model: &mut [u8],
    exts: &[(u64, u64)],
    seed: Option<u64>,
) -> Result<usize, String> {
    let slot_len = VERIFY_MAX_LEN as usize;
    let mut free: Vec<usize> = (0..VERIFY_DEPTH).collect();
    let mut in_flight: Vec<Option<(u64, u64)>> = vec![None; VERIFY_DEPTH];
    let mut next = 0;
    let mut outstanding = 0;
    let mut done = 0;
    while done < exts.len() {
        while next < exts.len() {
            let Some(slot) = free.pop() else { break };
            let (off, len) = exts[next];
            let buf = slot * slot_len;
            match seed {
                Some(s) => {
                    let s = s.wrapping_add(next as u64);
                    let b = mem.slice(buf, len as usize);
                    fill_pattern(b, off, s);
                    let m = (off - area) as usize;
                    model[m..m + len as usize].copy_from_slice(b);
                    submit(
                        q,
                        mem,
                        Op::Write {
                            off,
                            len: len as usize,
                            buf,
                            flags: ReqFlags::empty(),
                        },
                        slot,
                    );
                }
                None => {
                    // Poison the buffer so that a read that transfers nothing cannot pass.
                    mem.slice(buf, len as usize).fill(0xdb);
                    submit(
                        q,
                        mem,
                        Op::Read {
                            off,
                            len: len as usize,
                            buf,
                        },
                        slot,
                    );
                }
            }
            in_flight[slot] = Some((off, len));
            outstanding += 1;
            next += 1;
        }
        assert!(outstanding > 0);
        for (slot, ret) in reap(q, VERIFY_DEPTH) {
            let (off, len) = in_flight[slot]
                .take()
                .ok_or_else(|| format!("completion for idle slot {slot}"))?;
            outstanding -= 1;
            done += 1;
            let what = if seed.is_some() { "write" } else { "read" };
            if ret != 0 {
                return Err(format!(
                    "{what} of {len} bytes at {off} failed: {}",
                    errstr(ret)
                ));
            }
            if seed.is_none() {
                let m = (off - area) as usize;
                compare_bytes(
                    mem.slice(slot * slot_len, len as usize),
                    &model[m..m + len as usize],
                    off,
                )
                .map_err(|e| format!("read of {len} bytes at {off}: {e}"))?;
            }
            free.push(slot);
        }
    }
    Ok(exts.len())
}

/// One thread's share of the verify test on its own queue and its own half of the disk.
fn verify_worker(
    q: &mut Blkioq,
    mem: &Mem,
    area: u64,
    len: u64,
    image_seed: u64,
    seed: u64,
) -> Result<(Vec<u8>, usize), String> {
    let mut rng = Rng::new(seed);
    let mut model = vec![0u8; len as usize];
    fill_pattern(&mut model, area, image_seed);
    let mut requests = 0;
    // Two overlapping rounds of writes with different data, then a full verification,
    // then a third round and another full verification with different extents.
    for round in 0..3u64 {
        let exts = extents(&mut rng, area, len, true);
        requests += pipeline(
            q,
            mem,
            area,
            &mut model,
            &exts,
            Some(seed * 1_000_000 + round * 10_000),
        )?;
        if round >= 1 {
            let exts = extents(&mut rng, area, len, false);
            requests += pipeline(q, mem, area, &mut model, &exts, None)?;
        }
    }
    Ok((model, requests))
}

#[test]
fn random_pattern_write_verify_two_queues() {
    const QUEUES: usize = 2;
    let size = 64 * MIB;
    let image_seed = 21;
    let mut t = TestExport::start(size, ImageInit::Pattern(image_seed), |o| {
        o.num_queues = QUEUES as u32
    });

    let mut b = connect(&t, false);
    assert!(
        b.get_i32("max-queues").unwrap() >= QUEUES as i32,
        "export has num-queues={QUEUES}, device offers {}",
        b.get_i32("max-queues").unwrap()
    );
    let mut qs = start(&mut b, QUEUES);
    let mems: Vec<Mem> = (0..QUEUES)
        .map(|_| Mem::map(&mut b, VERIFY_DEPTH * VERIFY_MAX_LEN as usize))
        .collect();
    let area_len = size / QUEUES as u64;

    let results: Vec<Result<(Vec<u8>, usize), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = qs
            .iter_mut()
            .zip(&mems)
            .enumerate()
            .map(|(i, (q, mem))| {
                s.spawn(move || {
                    verify_worker(
                        q,
                        mem,
                        i as u64 * area_len,
                        area_len,
                        image_seed,
                        100 + i as u64,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    });

    let mut total = 0;
    for (i, r) in results.into_iter().enumerate() {
        let (model, requests) = r.unwrap_or_else(|e| panic!("queue {i}: {e}"));
        total += requests;
        // The image file on the host must hold exactly what the client wrote.
        let area = i as u64 * area_len;
        let host = read_file_range(t.image(), area, area_len as usize).expect("read image");
        compare_bytes(&host, &model, area)
            .unwrap_or_else(|e| panic!("image file, queue {i} area: {e}"));
    }
    assert!(
        total > 1000,
        "only {total} requests: the test lost its teeth"
    );
    t.assert_daemon_alive();
}

// ---------------------------------------------------------------------------------------------
// (3) flush
// ---------------------------------------------------------------------------------------------

#[test]
fn flush_succeeds() {
    let size = 8 * MIB;
    let mut t = TestExport::start(size, ImageInit::Sparse, |o| o.num_queues = 2);
    let mut b = connect(&t, false);
    let mut qs = start(&mut b, 2);
    let mem = Mem::map(&mut b, 16 * 64 * KIB as usize);

    // A flush with nothing outstanding.
    exec_ok(&mut qs[0], &mem, Op::Flush);

    // 16 writes in flight on queue 1, then a flush once they completed.
    let chunk = 64 * KIB as usize;
    for i in 0..16usize {
        let off = (i * chunk) as u64 + 512;
        fill_pattern(mem.slice(i * chunk, chunk), off, 5);
        submit(
            &mut qs[1],
            &mem,
            Op::Write {
                off,
                len: chunk,
                buf: i * chunk,
                flags: ReqFlags::empty(),
            },
            i,
        );
    }
    let mut seen = 0;
    while seen < 16 {
        for (i, ret) in reap(&mut qs[1], 16) {
            assert_eq!(ret, 0, "write {i}: {}", errstr(ret));
            seen += 1;
        }
    }
    // The image is in the page cache (cache.direct=off): the writes left dirty pages, which a
    // flush that reaches the backend (fdatasync) must write back. libblkio completes flushes
    // itself when VIRTIO_BLK_F_FLUSH was not offered, which this check catches.
    let check_clean = !is_tmpfs(t.image());
    let dirty_before = cachestat(t.image(), 0, 0).ok().map(|c| c.dirty);
    exec_ok(&mut qs[1], &mem, Op::Flush);
    exec_ok(&mut qs[0], &mem, Op::Flush);
    if let (true, Ok(cs)) = (check_clean, cachestat(t.image(), 0, 0)) {
        assert_eq!(
            (cs.dirty, cs.writeback),
            (0, 0),
            "image still has dirty pages after a completed flush ({cs:?}; {dirty_before:?} dirty before)"
        );
    }

    // A FUA write: libblkio emulates it with a write followed by a flush.
    fill_pattern(mem.slice(0, 4096), 4 * MIB, 6);
    exec_ok(
        &mut qs[0],
        &mem,
        Op::Write {
            off: 4 * MIB,
            len: 4096,
            buf: 0,
            flags: ReqFlags::FUA,
        },
    );
    if let (true, Ok(cs)) = (check_clean, cachestat(t.image(), 0, 0)) {
        assert_eq!(
            (cs.dirty, cs.writeback),
            (0, 0),
            "dirty pages after a completed FUA write: {cs:?}"
        );
    }

    // The data is in the image file.
    let host = read_file_range(t.image(), 512, 16 * chunk).unwrap();
    check_pattern(&host, 512, 5).expect("image file after flush");
    let host = read_file_range(t.image(), 4 * MIB, 4096).unwrap();
    check_pattern(&host, 4 * MIB, 6).expect("image file after FUA write");
    t.assert_daemon_alive();
}

// ---------------------------------------------------------------------------------------------
// (4) discard deallocates and reads back as zeroes
// ---------------------------------------------------------------------------------------------

#[test]
fn discard_deallocates_and_reads_zeroes() {
    let size = 32 * MIB;
    let mut t = TestExport::start(size, ImageInit::Sparse, |o| o.discard_unmap = true);
    let mut b = connect(&t, false);
    let max_discard = b.get_u64("max-discard-len").unwrap();
    assert!(
        max_discard > 0,
        "device does not offer VIRTIO_BLK_F_DISCARD (max-discard-len 0)"
    );
    let mut qs = start(&mut b, 1);
    let q = &mut qs[0];
    let mem = Mem::map(&mut b, MIB as usize);

    let start_off = 8 * MIB;
    let len = 4 * MIB;
    // Data before, inside and after the range.
    write_pattern(q, &mem, start_off - MIB, len + 2 * MIB, 41);
    exec_ok(q, &mem, Op::Flush);
    let blocks_before = t.image_blocks();
    assert!(
        blocks_before >= (len + 2 * MIB) / 512,
        "image has only {blocks_before} blocks allocated after writing {} bytes",
        len + 2 * MIB
    );

    for (o, n) in split(start_off, len, max_discard) {
        exec_ok(q, &mem, Op::Discard { off: o, len: n });
    }
    exec_ok(q, &mem, Op::Flush);
    let blocks_after = t.image_blocks();
    let freed = blocks_before.saturating_sub(blocks_after);
    assert!(
        freed >= len / 512 * 3 / 4,
        "discard of {len} bytes freed only {freed} blocks of 512 B (st_blocks {blocks_before} -> {blocks_after})"
    );

    let data = read_range(q, &mem, start_off, len);
    check_zeroes(&data, start_off).expect("discarded range");
    let before = read_range(q, &mem, start_off - MIB, MIB);
    check_pattern(&before, start_off - MIB, 41).expect("data before the discarded range");
    let after = read_range(q, &mem, start_off + len, MIB);
    check_pattern(&after, start_off + len, 41).expect("data after the discarded range");
    t.assert_daemon_alive();
}

// ---------------------------------------------------------------------------------------------
// (5) write-zeroes, with and without NO_UNMAP
// ---------------------------------------------------------------------------------------------

#[test]
fn write_zeroes_with_and_without_unmap() {
    let size = 16 * MIB;
    let seed = 51;
    let mut t = TestExport::start(size, ImageInit::Pattern(seed), |o| o.discard_unmap = true);
    let mut b = connect(&t, false);
    let max_wz = b.get_u64("max-write-zeroes-len").unwrap();
    assert!(
        max_wz > 0,
        "device does not offer VIRTIO_BLK_F_WRITE_ZEROES (max-write-zeroes-len 0)"
    );
    let mut qs = start(&mut b, 1);
    let q = &mut qs[0];
    let mem = Mem::map(&mut b, MIB as usize);

    // (start, len, flags): unaligned to 4 KiB, aligned, and with NO_UNMAP.
    let cases = [
        (MIB + 512, 3 * MIB / 2 + 1024, ReqFlags::empty()),
        (4 * MIB + 3584, 2 * MIB + 512, ReqFlags::NO_UNMAP),
        (8 * MIB, 4 * MIB, ReqFlags::empty()),
        (13 * MIB, 2 * MIB, ReqFlags::NO_UNMAP),
    ];
    for &(off, len, flags) in &cases {
        for (o, n) in split(off, len, max_wz) {
            let ret = exec(
                q,
                &mem,
                Op::WriteZeroes {
                    off: o,
                    len: n,
                    flags,
                },
            );
            assert_eq!(
                ret,
                0,
                "write-zeroes {o}+{n} flags {flags:?}: {}",
                errstr(ret)
            );
        }
    }
    for &(off, len, flags) in &cases {
        let data = read_range(q, &mem, off, len);
        check_zeroes(&data, off).unwrap_or_else(|e| panic!("flags {flags:?}: {e}"));
        // 64 KiB either side keep the image's pattern.
        let before = read_range(q, &mem, off - 64 * KIB, 64 * KIB);
        check_pattern(&before, off - 64 * KIB, seed)
            .unwrap_or_else(|e| panic!("before, flags {flags:?}: {e}"));
        let after = read_range(q, &mem, off + len, 64 * KIB);
        check_pattern(&after, off + len, seed)
            .unwrap_or_else(|e| panic!("after, flags {flags:?}: {e}"));
    }
    // The image file agrees.
    for &(off, len, _) in &cases {
        let host = read_file_range(t.image(), off, len as usize).unwrap();
        check_zeroes(&host, off).expect("image file after write-zeroes");
    }
    t.assert_daemon_alive();
}

// ---------------------------------------------------------------------------------------------
// (6) read-only export
// ---------------------------------------------------------------------------------------------

#[test]
fn read_only_export() {
    let size = 8 * MIB;
    let seed = 61;
    let mut t = TestExport::start(size, ImageInit::Pattern(seed), |o| o.writable = false);

    // The device must offer VIRTIO_BLK_F_RO: libblkio then refuses a read-write start.
    {
        let mut b = connect(&t, false);
        b.set_i32("num-queues", 1).unwrap();
        match b.start() {
            Ok(_) => panic!(
                "read-write start succeeded on a writable=off export (RO feature not offered)"
            ),
            Err(e) => assert_eq!(e.errno(), Errno::ROFS, "unexpected start error: {e}"),
        }
    }
    t.assert_daemon_alive();

    let mut b = connect(&t, true);
    let mut qs = start(&mut b, 1);
    let q = &mut qs[0];
    let mem = Mem::map(&mut b, MIB as usize);

    let data = read_range(q, &mem, 0, MIB);
    check_pattern(&data, 0, seed).expect("read from read-only export");

    fill_pattern(mem.slice(0, 4096), 0, seed + 1);
    let ret = exec(
        q,
        &mem,
        Op::Write {
            off: 0,
            len: 4096,
            buf: 0,
            flags: ReqFlags::empty(),
        },
    );
    assert!(ret < 0, "write on a read-only device succeeded");
    let ret = exec(
        q,
        &mem,
        Op::WriteZeroes {
            off: 4096,
            len: 4096,
            flags: ReqFlags::empty(),
        },
    );
    assert!(ret < 0, "write-zeroes on a read-only device succeeded");
    let ret = exec(
        q,
        &mem,
        Op::Discard {
            off: 8192,
            len: 4096,
        },
    );
    assert!(ret < 0, "discard on a read-only device succeeded");

    // Reads keep working and nothing changed, through the device and in the file.
    let data = read_range(q, &mem, 0, 64 * KIB);
    check_pattern(&data, 0, seed).expect("read after refused writes");
    let host = read_file_range(t.image(), 0, 64 * KIB as usize).unwrap();
    check_pattern(&host, 0, seed).expect("image file of a read-only export");
    t.assert_daemon_alive();
}

// ---------------------------------------------------------------------------------------------
// (7) out-of-range requests fail, and the queue keeps working
// ---------------------------------------------------------------------------------------------

#[test]
fn out_of_range_requests_fail_then_io_continues() {
    let size = 4 * MIB;
    let seed = 71;
    let mut t = TestExport::start(size, ImageInit::Pattern(seed), |_| {});
    let mut b = connect(&t, false);
    let cap = b.get_u64("capacity").unwrap();
    assert_eq!(cap, size);
    let mut qs = start(&mut b, 1);
    let q = &mut qs[0];
    let mem = Mem::map(&mut b, 64 * KIB as usize);

    let bad: Vec<(&str, Op)> = vec![
        (
            "read at capacity",
            Op::Read {
                off: cap,
                len: 4096,
                buf: 0,
            },
        ),
        (
            "read straddling the end",
            Op::Read {
                off: cap - 512,
                len: 4096,
                buf: 0,
            },
        ),
        (
            "read far beyond the end",
            Op::Read {
                off: 1 << 40,
                len: 512,
                buf: 0,
            },
        ),
        (
            "write straddling the end",
            Op::Write {
                off: cap - 512,
                len: 4096,
                buf: 0,
                flags: ReqFlags::empty(),
            },
        ),
        (
            "write beyond the end",
            Op::Write {
                off: cap + MIB,
                len: 4096,
                buf: 0,
                flags: ReqFlags::empty(),
            },
        ),
        (
            "write-zeroes beyond the end",
            Op::WriteZeroes {
                off: cap - 4096,
                len: 8192,
                flags: ReqFlags::empty(),
            },
        ),
    ];
    for (i, (what, op)) in bad.into_iter().enumerate() {
        fill_pattern(mem.slice(0, 4096), 0, 1000 + i as u64);
        let ret = exec(q, &mem, op);
        assert!(ret < 0, "{what} ({op:?}) succeeded");
        // The very next request on the same queue succeeds and returns the right data.
        let off = (i as u64 * 64 * KIB) % (cap - 64 * KIB);
        let data = read_range(q, &mem, off, 64 * KIB);
        check_pattern(&data, off, seed).unwrap_or_else(|e| panic!("read after {what}: {e}"));
    }
    // The last sector is still readable and the file was not extended or modified at the end.
    let data = read_range(q, &mem, cap - 4096, 4096);
    check_pattern(&data, cap - 4096, seed).expect("last 4 KiB");
    assert_eq!(t.image_len(), size, "image file size changed");
    let host = read_file_range(t.image(), cap - 4096, 4096).unwrap();
    check_pattern(&host, cap - 4096, seed).expect("end of image file");
    t.assert_daemon_alive();
}
