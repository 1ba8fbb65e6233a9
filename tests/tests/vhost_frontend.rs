//! Host-side vhost-user frontend tests: the rust-vmm `Frontend` drives the
//! device's virtqueues by hand over memfd memory, no VM. Every request type,
//! malformed chains, EVENT_IDX on and off, two queues at once, reconnects.

mod frontend;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blkgraph_tests::{check_pattern, check_zeroes, fill_pattern, ImageInit, TestExport};
use frontend::blk::*;
use frontend::driver::{Desc, Driver};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn pattern(len: usize, offset: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, offset, seed);
    v
}

fn export(configure: impl FnOnce(&mut blkgraph_tests::ExportOptions)) -> TestExport {
    TestExport::start(64 * MIB, ImageInit::Sparse, |o| {
        o.discard_unmap = true;
        configure(o)
    })
}

/// A valid read still works: the device kept serving.
fn assert_serving(d: &mut Driver) {
    let mem = &d.mem;
    let out = read(&mut d.queues[0], mem, 0, 4096);
    assert_eq!(out.status, S_OK, "the device stopped serving");
}

fn every_request_type(event_idx: bool) {
    let t = export(|_| {});
    let mut d = Driver::connect(t.socket(), 1, event_idx);
    assert_eq!(d.capacity(), 64 * MIB / 512);
    let mem = &d.mem;
    let q = &mut d.queues[0];

    // Write, then read back, directly and through an indirect table.
    let data = pattern(64 * 1024, MIB, 1);
    let w = write(q, mem, MIB / 512, &data);
    assert_eq!((w.status, w.used_len), (S_OK, 1));
    let r = read(q, mem, MIB / 512, 64 * 1024);
    assert_eq!((r.status, r.used_len), (S_OK, 64 * 1024 + 1));
    check_pattern(&r.data, MIB, 1).unwrap();
    let req = BlkRequest::new(q, mem, T_IN, MIB / 512 + 8, &[], 8192);
    q.submit_indirect(mem, &req.descs);
    q.kick();
    let used = q.wait(mem, 1)[0];
    let out = req.outcome(mem, used);
    assert_eq!(out.status, S_OK);
    check_pattern(&out.data, MIB + 4096, 1).unwrap();

    // Flush and GET_ID (the serial is the export id, NUL-terminated).
    assert_eq!(simple(q, mem, T_FLUSH, &[]).status, S_OK);
    let id = BlkRequest::new(q, mem, T_GET_ID, 0, &[], 20).run(q, mem);
    assert_eq!(id.status, S_OK);
    assert_eq!(&id.data[..5], b"vub0\0");
    assert_eq!(id.used_len, 21);

    // Discard gives the blocks back and the range reads as zeroes.
    let big = pattern(MIB as usize, 8 * MIB, 2);
    assert_eq!(write(q, mem, 8 * MIB / 512, &big).status, S_OK);
    assert_eq!(simple(q, mem, T_FLUSH, &[]).status, S_OK);
    let before = t.image_blocks();
    let seg = segment(8 * MIB / 512, (MIB / 512) as u32, 0);
    assert_eq!(simple(q, mem, T_DISCARD, &seg).status, S_OK);
    let after = t.image_blocks();
    assert!(after + MIB / 512 <= before, "blocks {before} -> {after}");
    check_zeroes(&read(q, mem, 8 * MIB / 512, 65536).data, 8 * MIB).unwrap();

    // Write-zeroes with and without UNMAP.
    let zsector = 4 * MIB / 512;
    assert_eq!(
        write(q, mem, zsector, &pattern(65536, 4 * MIB, 3)).status,
        S_OK
    );
    for (flags, sector) in [(0, zsector), (FLAG_UNMAP, zsector + 64)] {
        let seg = segment(sector, 64, flags);
        assert_eq!(simple(q, mem, T_WRITE_ZEROES, &seg).status, S_OK);
        check_zeroes(&read(q, mem, sector, 32768).data, sector * 512).unwrap();
    }

    // An unknown request type.
    let unknown = BlkRequest::new(q, mem, 99, 0, &[], 0).run(q, mem);
    assert_eq!(unknown.status, S_UNSUPP);

    // Many requests in flight at once, completed in any order.
    let reqs: Vec<_> = (0..64u64)
        .map(|i| {
            let r = BlkRequest::new(q, mem, T_IN, MIB / 512 + (i % 16) * 8, &[], 4096);
            (q.submit(mem, &r.descs), i, r)
        })
        .collect();
    q.kick();
    let used = q.wait(mem, 64);
    for u in used {
        let (_, i, r) = reqs.iter().find(|(h, ..)| *h == u.head).unwrap();
        let out = r.outcome(mem, u);
        assert_eq!(out.status, S_OK);
        check_pattern(&out.data, MIB + (i % 16) * 4096, 1).unwrap();
    }
}

#[test]
fn every_request_type_without_event_idx() {
    every_request_type(false);
}

#[test]
fn every_request_type_with_event_idx() {
    every_request_type(true);
}

#[test]
fn malformed_chains_get_an_error_and_the_device_keeps_serving() {
    let t = export(|_| {});
    let mut d = Driver::connect(t.socket(), 1, true);
    let capacity = d.capacity();
    let mem = d.mem.clone();
    let buf = |q: &mut frontend::driver::Queue, len: u32, write: bool| Desc {
        addr: q.alloc(u64::from(len)),
        len,
        write,
    };
    let status_of = |d: &mut Driver, descs: Vec<Desc>| -> (u32, u8) {
        let q = &mut d.queues[0];
        let last = descs.iter().rev().find(|x| x.write).copied();
        if let Some(l) = last {
            mem.write_obj(0xffu8, GuestAddress(l.addr.0 + u64::from(l.len) - 1))
                .unwrap();
        }
        q.submit(&mem, &descs);
        q.kick();
        let used = q.wait(&mem, 1)[0];
        let status = last
            .map(|l| {
                mem.read_obj(GuestAddress(l.addr.0 + u64::from(l.len) - 1))
                    .unwrap()
            })
            .unwrap_or(0xff);
        (used.len, status)
    };

    // No status descriptor: the last byte of the data takes the status and
    // the data length is no longer a multiple of 512.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_IN, 0);
    let descs = vec![
        Desc {
            addr: hdr,
            len: 16,
            write: false,
        },
        buf(q, 4096, true),
    ];
    assert_eq!(status_of(&mut d, descs), (4096, S_IOERR));
    assert_serving(&mut d);

    // No writable byte at all: nowhere to put a status; the chain is
    // returned with a used length of 0.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_OUT, 0);
    let descs = vec![
        Desc {
            addr: hdr,
            len: 16,
            write: false,
        },
        buf(q, 512, false),
    ];
    assert_eq!(status_of(&mut d, descs).0, 0);
    assert_serving(&mut d);

    // The header in a writable descriptor.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_IN, 0);
    let descs = vec![
        Desc {
            addr: hdr,
            len: 16,
            write: true,
        },
        buf(q, 512, true),
        buf(q, 1, true),
    ];
    assert_eq!(status_of(&mut d, descs).1, S_IOERR);
    assert_serving(&mut d);

    // A read-only status descriptor after writable data.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_IN, 0);
    let descs = vec![
        Desc {
            addr: hdr,
            len: 16,
            write: false,
        },
        buf(q, 512, true),
        buf(q, 1, false),
    ];
    assert_eq!(status_of(&mut d, descs).1, S_IOERR);
    assert_serving(&mut d);

    // Data beyond the capacity, and straddling its end.
    for (sector, len) in [(capacity, 512), (capacity - 1, 1024), (u64::MAX / 256, 512)] {
        let q = &mut d.queues[0];
        assert_eq!(
            read(q, &mem, sector, len).status,
            S_IOERR,
            "sector {sector}"
        );
        assert_eq!(
            write(q, &mem, sector, &vec![1u8; len as usize]).status,
            S_IOERR
        );
    }
    assert_serving(&mut d);

    // Too many segments: more than seg_max (126) data descriptors.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_IN, 0);
    let mut descs = vec![Desc {
        addr: hdr,
        len: 16,
        write: false,
    }];
    descs.extend((0..130).map(|_| buf(q, 512, true)));
    descs.push(buf(q, 1, true));
    assert_eq!(status_of(&mut d, descs).1, S_IOERR);
    assert_serving(&mut d);

    // A zero-length data buffer.
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_IN, 0);
    let descs = vec![
        Desc {
            addr: hdr,
            len: 16,
            write: false,
        },
        Desc {
            addr: q.alloc(16),
            len: 0,
            write: true,
        },
        buf(q, 512, true),
        buf(q, 1, true),
    ];
    assert_eq!(status_of(&mut d, descs).1, S_IOERR);
    assert_serving(&mut d);

    // A data length that is not a multiple of 512.
    let q = &mut d.queues[0];
    assert_eq!(read(q, &mem, 0, 100).status, S_IOERR);
    // Discard/write-zeroes: two segments, unknown flags, UNMAP on discard,
    // too many sectors, out of range.
    let mut two = segment(0, 8, 0);
    two.extend(segment(8, 8, 0));
    let q = &mut d.queues[0];
    assert_eq!(simple(q, &mem, T_DISCARD, &two).status, S_UNSUPP);
    assert_eq!(
        simple(q, &mem, T_WRITE_ZEROES, &segment(0, 8, 2)).status,
        S_UNSUPP
    );
    assert_eq!(
        simple(q, &mem, T_DISCARD, &segment(0, 8, FLAG_UNMAP)).status,
        S_UNSUPP
    );
    assert_eq!(
        simple(q, &mem, T_DISCARD, &segment(0, 32769, 0)).status,
        S_IOERR
    );
    assert_eq!(
        simple(q, &mem, T_WRITE_ZEROES, &segment(capacity, 8, 0)).status,
        S_IOERR
    );
    assert_eq!(
        simple(q, &mem, T_DISCARD, &segment(0, 8, 0)[..8]).status,
        S_IOERR
    );
    assert_serving(&mut d);
}

#[test]
fn read_only_export_refuses_writes() {
    let t = export(|o| o.writable = false);
    let mut d = Driver::connect(t.socket(), 1, true);
    assert!(d.features & (1 << 5) != 0, "RO offered");
    assert!(d.features & (1 << 13) == 0, "no DISCARD when read-only");
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    assert_eq!(write(q, &mem, 0, &[7u8; 512]).status, S_IOERR);
    assert_eq!(
        simple(q, &mem, T_WRITE_ZEROES, &segment(0, 8, 0)).status,
        S_IOERR
    );
    assert_eq!(
        simple(q, &mem, T_DISCARD, &segment(0, 8, 0)).status,
        S_IOERR
    );
    assert_eq!(read(q, &mem, 0, 512).status, S_OK);
}

#[test]
fn offsets_must_align_to_the_logical_block_size() {
    let t = export(|o| o.logical_block_size = 4096);
    let mut d = Driver::connect(t.socket(), 1, false);
    assert_eq!(
        u32::from_le_bytes(d.config[20..24].try_into().unwrap()),
        4096
    );
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    assert_eq!(read(q, &mem, 1, 4096).status, S_IOERR);
    assert_eq!(read(q, &mem, 8, 4096).status, S_OK);
}

#[test]
fn two_queues_at_once() {
    let t = export(|o| o.num_queues = 2);
    let mut d = Driver::connect(t.socket(), 2, true);
    let mem = d.mem.clone();
    std::thread::scope(|s| {
        for (i, q) in d.queues.iter_mut().enumerate() {
            let mem = &mem;
            s.spawn(move || {
                let base = (i as u64 + 1) * 16 * MIB;
                for round in 0..100u64 {
                    let off = base + (round % 32) * 65536;
                    let data = pattern(65536, off, round);
                    assert_eq!(write(q, mem, off / 512, &data).status, S_OK);
                    let r = read(q, mem, off / 512, 65536);
                    assert_eq!(r.status, S_OK);
                    check_pattern(&r.data, off, round).unwrap();
                }
            });
        }
    });
}

#[test]
fn a_new_frontend_follows_a_disconnected_one() {
    let t = export(|_| {});
    for session in 0..6u64 {
        let mut d = Driver::connect(t.socket(), 1, session % 2 == 0);
        let mem = d.mem.clone();
        let q = &mut d.queues[0];
        if session > 0 {
            let r = read(q, &mem, session - 1, 512);
            assert_eq!(r.status, S_OK);
            check_pattern(&r.data, (session - 1) * 512, session - 1).unwrap();
        }
        let data = pattern(512, session * 512, session);
        assert_eq!(write(q, &mem, session, &data).status, S_OK);
        // Leave requests in flight on some disconnects.
        if session % 3 == 2 {
            for i in 0..8 {
                let r = BlkRequest::new(q, &mem, T_IN, i * 8, &[], 4096);
                q.submit(&mem, &r.descs);
            }
            q.kick();
        }
        drop(d);
    }
}

#[test]
fn memory_added_while_the_queue_polls_is_used() {
    // A long poll window: the worker is still polling from the first kick
    // when the frontend adds a region and puts a request from it on the ring.
    let t = export(|o| o.export_extra = "x-poll-us=2000000".into());
    let mut d = Driver::connect(t.socket(), 1, true);
    let mem = d.mem.clone();
    assert_eq!(read(&mut d.queues[0], &mem, 0, 512).status, S_OK);
    let gpa = 1 << 30;
    let extra = d.add_region(gpa, 1 << 20);
    let data = pattern(4096, 0, 9);
    extra.write_slice(&data, GuestAddress(gpa)).unwrap();
    let q = &mut d.queues[0];
    let hdr = header(q, &mem, T_OUT, 0);
    let status = q.alloc(1);
    let descs = [
        Desc {
            addr: hdr,
            len: 16,
            write: false,
        },
        Desc {
            addr: GuestAddress(gpa),
            len: 4096,
            write: false,
        },
        Desc {
            addr: status,
            len: 1,
            write: true,
        },
    ];
    q.submit(&mem, &descs);
    q.kick();
    q.wait(&mem, 1);
    assert_eq!(mem.read_obj::<u8>(status).unwrap(), S_OK);
    let r = read(q, &mem, 0, 4096);
    check_pattern(&r.data, 0, 9).unwrap();
}

/// Runs `request` with strace attached to every thread of process `pid`
/// (`request` returns once the device completed it) and returns the
/// calls it made that write data or make it stable, as strace lines
/// without the thread id. strace stops a thread at each traced call until
/// it has seen it, so every such call made before completion is there.
fn traced_calls(pid: u32, log: &Path, request: impl FnOnce()) -> Vec<String> {
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e"])
        .arg("trace=fdatasync,fsync,fallocate,pwrite64,pwritev,pwritev2")
        .arg("-o")
        .arg(log)
        .arg("-p")
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("run strace (apt-get install strace)");
    let tracer = format!("TracerPid:\t{}", strace.id());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("daemon tasks");
        let all_traced = tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("status"))
                .is_ok_and(|status| status.lines().any(|l| l == tracer))
        });
        if all_traced {
            break;
        }
        assert!(Instant::now() < deadline, "strace did not attach");
        std::thread::sleep(Duration::from_millis(10));
    }
    request();
    // SAFETY: kill(2) on our own child, not reaped yet; SIGTERM makes
    // strace detach and flush its log.
    unsafe { libc::kill(strace.id() as libc::pid_t, libc::SIGTERM) };
    strace.wait().expect("wait for strace");
    std::fs::read_to_string(log)
        .expect("strace log")
        .lines()
        // strace pads the thread id to five columns: "123   call(...)".
        .map(|l| {
            l.split_once(' ')
                .map_or(l, |(_, call)| call.trim_start())
                .to_string()
        })
        .filter(|call| !call.starts_with("<..."))
        .collect()
}

fn syncs(call: &str) -> bool {
    call.starts_with("fdatasync(") || call.starts_with("fsync(") || call.contains("RWF_DSYNC")
}

/// Whether the zeroes written by `calls` are stable: a sync after the last
/// fallocate, or every fallback write is a synchronous one.
fn zeroes_are_stable(calls: &[String]) -> bool {
    let last_fallocate = calls.iter().rposition(|c| c.starts_with("fallocate("));
    let after = &calls[last_fallocate.map_or(0, |i| i + 1)..];
    let writes: Vec<_> = calls.iter().filter(|c| c.starts_with("pwrite")).collect();
    after.iter().any(|c| syncs(c)) || (!writes.is_empty() && writes.iter().all(|c| syncs(c)))
}

fn write_zeroes_traced(t: &TestExport, d: &mut Driver, sector: u64, flags: u32) -> Vec<String> {
    let log = t.dir.path().join(format!("strace-{sector}.log"));
    let mem = d.mem.clone();
    let q = &mut d.queues[0];
    traced_calls(t.daemon.pid(), &log, || {
        let seg = segment(sector, 64, flags);
        assert_eq!(simple(q, &mem, T_WRITE_ZEROES, &seg).status, S_OK);
    })
}

/// Without a write cache (`writethrough=on`, or the guest turned it off)
/// QEMU's block backend makes every write FUA, write-zeroes included:
/// they must be stable when they complete, as plain writes are. With
/// `aio=threads` the system calls show it.
#[test]
fn write_zeroes_are_stable_without_a_write_cache() {
    let t = export(|o| o.aio = "threads".into());
    let mut d = Driver::connect(t.socket(), 1, true);
    let calls = write_zeroes_traced(&t, &mut d, 0, 0);
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("fallocate(") || c.starts_with("pwrite")),
        "no write seen: {calls:#?}"
    );
    assert!(!calls.iter().any(|c| syncs(c)), "writeback: {calls:#?}");

    d.set_wce(false);
    for (sector, flags) in [(64, 0), (128, FLAG_UNMAP)] {
        let calls = write_zeroes_traced(&t, &mut d, sector, flags);
        assert!(
            zeroes_are_stable(&calls),
            "wce=0, flags {flags}: {calls:#?}"
        );
    }
    drop(d);

    let t = export(|o| {
        o.aio = "threads".into();
        o.export_extra = "writethrough=on".into();
    });
    let mut d = Driver::connect(t.socket(), 1, true);
    let calls = write_zeroes_traced(&t, &mut d, 0, 0);
    assert!(zeroes_are_stable(&calls), "writethrough=on: {calls:#?}");
}

/// The daemon's open file descriptors.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn reconnecting_frontends_leak_no_descriptor() {
    let t = export(|o| o.num_queues = 2);
    let session = |n: u64| {
        let mut d = Driver::connect(t.socket(), 2, n.is_multiple_of(2));
        let mem = d.mem.clone();
        assert_eq!(read(&mut d.queues[1], &mem, n, 512).status, S_OK);
    };
    session(0);
    // Let the first session's teardown finish before counting.
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds(t.daemon.pid());
    for n in 1..=100 {
        session(n);
    }
    let mut after = open_fds(t.daemon.pid());
    let deadline = Instant::now() + Duration::from_secs(5);
    while after > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = open_fds(t.daemon.pid());
    }
    assert!(
        after <= before,
        "100 sessions took the daemon from {before} to {after} descriptors"
    );
}

#[test]
fn memory_regions_must_fit_their_file_and_the_slot_count() {
    let t = export(|_| {});
    // A 1 TiB region over a 1 MiB file: a descriptor past the file's end
    // would fault the daemon. Refused (the session ends, as on any failed
    // request), and the daemon goes on.
    let mut d = Driver::connect(t.socket(), 1, false);
    let e = d.try_add_region(1 << 40, 1 << 40, MIB);
    assert!(e.is_err(), "a region larger than its file was accepted");
    drop(d);
    assert_serving(&mut Driver::connect(t.socket(), 1, false));
    // GET_MAX_MEM_SLOTS says 509: the 510th region is refused.
    let mut d = Driver::connect(t.socket(), 1, false);
    let mut added = 1; // the memory table's region
    for i in 0..600u64 {
        if d.try_add_region((1 << 32) + i * 0x10000, 0x10000, 0x10000)
            .is_err()
        {
            break;
        }
        added += 1;
    }
    assert_eq!(added, 509);
    drop(d);
    assert_serving(&mut Driver::connect(t.socket(), 1, true));
}

/// A frontend that negotiated INFLIGHT_SHMFD (with REPLY_ACK), nothing more.
fn inflight_frontend(socket: &Path) -> vhost::vhost_user::Frontend {
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures as P};
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    let mut f = Frontend::connect(socket, 1).expect("connect");
    let offered = f.get_features().unwrap();
    f.set_owner().unwrap();
    let proto = f.get_protocol_features().unwrap();
    assert!(proto.contains(P::INFLIGHT_SHMFD), "{proto:?}");
    f.set_protocol_features(P::INFLIGHT_SHMFD | P::REPLY_ACK)
        .unwrap();
    f.set_features(offered).unwrap();
    f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    f
}

#[test]
fn inflight_regions_from_a_frontend_are_checked() {
    use std::os::unix::io::AsRawFd;
    use vhost::vhost_user::message::VhostUserInflight;
    use vhost::vhost_user::VhostUserFrontend;
    let t = export(|_| {});
    // The device's region: its size follows the layout, and it is sealed
    // so that nobody can shrink it under the other side's mapping.
    let mut f = inflight_frontend(t.socket());
    let (region, file) = f
        .get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 256))
        .expect("get_inflight_fd");
    assert_eq!(region.mmap_size, 16 + 16 * 256 + 48);
    assert_eq!(file.metadata().unwrap().len(), region.mmap_size);
    // SAFETY: fcntl on a descriptor this test owns.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(seals & libc::F_SEAL_SHRINK != 0, "seals {seals:#x}");
    f.set_inflight_fd(&region, file.as_raw_fd())
        .expect("set_inflight_fd");
    drop(f);
    // Bad shapes and bad regions: each refused (the session ends, as on any
    // failed request), and the device goes on.
    let bad_gets = [(0, 256), (2, 256), (1, 0), (1, 2048)];
    for (queues, size) in bad_gets {
        let mut f = inflight_frontend(t.socket());
        let r = f.get_inflight_fd(&VhostUserInflight::new(0, 0, queues, size));
        assert!(r.is_err(), "{queues} queues of {size} accepted");
    }
    // SAFETY: a plain memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nothing else.
    let unsealed = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    unsealed.set_len(1 << 20).unwrap();
    let sealed = {
        let mut f = inflight_frontend(t.socket());
        f.get_inflight_fd(&VhostUserInflight::new(0, 0, 1, 256))
            .unwrap()
            .1
    };
    let bad_sets = [
        (VhostUserInflight::new(1 << 20, 0, 1, 256), &unsealed),
        (VhostUserInflight::new(64, 0, 1, 256), &sealed),
        (
            VhostUserInflight::new(region.mmap_size, 4096, 1, 256),
            &sealed,
        ),
        (VhostUserInflight::new(region.mmap_size, 1, 1, 256), &sealed),
        (VhostUserInflight::new(u64::MAX, 0, 1, 256), &sealed),
        (VhostUserInflight::new(region.mmap_size, 0, 9, 256), &sealed),
    ];
    for (msg, file) in bad_sets {
        let mut f = inflight_frontend(t.socket());
        let r = f.set_inflight_fd(&msg, file.as_raw_fd());
        assert!(r.is_err(), "a bad region was accepted: {}", msg.mmap_size);
    }
    assert_serving(&mut Driver::connect(t.socket(), 1, true));
}
