//! The NBD server of the real daemon, driven by a hand-written protocol
//! client and the QMP socket: hostile clients do not disturb others, the
//! server and export lifecycle follows QEMU's QMP, and graph changes under
//! a serving NBD export lose no request.
//!
//! These tests also run against qemu-storage-daemon
//! (`BLKGRAPH_TEST_DAEMON=qsd`), except the transaction test, which needs
//! blkgraph's `x-blockdev-replace`.

mod qmp;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use blkgraph_ctl::QmpClient;
use blkgraph_tests::{check_pattern, fill_pattern, Daemon, DaemonKind, TempDir};
use qmp::exec;
use serde_json::{json, Value};

const SIZE: u64 = 16 << 20;
const SEED: u64 = 77;

const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// A stream to an NBD server, over either socket kind.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies.
struct Nbd {
    s: Box<dyn Conn + Send>,
    size: u64,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn unix(path: &Path) -> Box<dyn Conn + Send> {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    Box::new(s)
}

impl Nbd {
    fn connect(s: Box<dyn Conn + Send>, name: &str) -> Result<Nbd, String> {
        Self::negotiate(s, name, false)
    }

    /// Connects with structured replies negotiated.
    fn connect_structured(s: Box<dyn Conn + Send>, name: &str) -> Result<Nbd, String> {
        Self::negotiate(s, name, true)
    }

    fn negotiate(mut s: Box<dyn Conn + Send>, name: &str, structured: bool) -> Result<Nbd, String> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).map_err(|e| format!("greeting: {e}"))?;
        assert_eq!(be64(&g), INIT_MAGIC);
        assert_eq!(be64(&g[8..]), OPTS_MAGIC);
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes()); // fixed newstyle
        if structured {
            m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
            m.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
            m.extend_from_slice(&0u32.to_be_bytes());
            s.write_all(&m)
                .map_err(|e| format!("STRUCTURED_REPLY: {e}"))?;
            m.clear();
            let mut h = [0u8; 20];
            s.read_exact(&mut h)
                .map_err(|e| format!("STRUCTURED_REPLY reply: {e}"))?;
            assert_eq!(be32(&h[12..]), REP_ACK, "structured replies refused");
        }
        m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&m).map_err(|e| format!("GO: {e}"))?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).map_err(|e| format!("GO reply: {e}"))?;
            assert_eq!(be64(&h), REP_MAGIC);
            let mut d = vec![0u8; be32(&h[16..]) as usize];
            s.read_exact(&mut d).unwrap();
            match be32(&h[12..]) {
                3 if d[..2] == [0, 0] => size = Some(be64(&d[2..])),
                3 => {}
                REP_ACK => {
                    return Ok(Nbd {
                        s,
                        size: size.unwrap(),
                    })
                }
                err => {
                    return Err(format!(
                        "GO refused: {err:#x} {}",
                        String::from_utf8_lossy(&d)
                    ))
                }
            }
        }
    }

    fn request(&mut self, command: u16, handle: u64, offset: u64, len: u32, data: &[u8]) {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&command.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply; `data` bytes follow a successful read.
    fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), SIMPLE_MAGIC);
        let err = be32(&h[4..]);
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (err, be64(&h[8..]), d)
    }

    /// Reads the chunks of a structured reply to a read of `len` bytes;
    /// `offset_of` gives the read's offset from its handle. Returns the
    /// handle and the data (holes as zeroes).
    fn structured_read_reply(
        &mut self,
        offset_of: impl Fn(u64) -> u64,
        len: usize,
    ) -> (u64, Vec<u8>) {
        let mut out = vec![0xeeu8; len];
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h), STRUCTURED_MAGIC);
            let offset = offset_of(be64(&h[8..]));
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let kind = u16::from_be_bytes([h[6], h[7]]);
            let mut payload = vec![0u8; be32(&h[16..]) as usize];
            self.s.read_exact(&mut payload).unwrap();
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be64(&payload) - offset) as usize;
                    out[at..at + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = (be64(&payload) - offset) as usize;
                    let n = be32(&payload[8..]) as usize;
                    out[at..at + n].fill(0);
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return (be64(&h[8..]), out);
            }
        }
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, offset, offset, len, &[]);
        let (err, handle, d) = self.reply(len as usize);
        assert_eq!((err, handle), (0, offset), "read at {offset}");
        d
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(CMD_WRITE, offset, offset, data.len() as u32, data);
        let (err, handle, _) = self.reply(0);
        assert_eq!((err, handle), (0, offset), "write at {offset}");
    }

    /// Whether the server closed the connection (EOF within 10 s).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(self.s.read_to_end(&mut rest), Ok(_) | Err(_)) && rest.is_empty()
    }
}

fn wait_event(qmp: &mut QmpClient, name: &str) -> Value {
    qmp.set_timeout(Some(Duration::from_secs(10))).unwrap();
    loop {
        let ev = qmp.next_event().expect("event");
        if ev["event"] == name {
            return ev["data"].clone();
        }
    }
}

struct Setup {
    daemon: Daemon,
    qmp: QmpClient,
    nbd_sock: std::path::PathBuf,
    dir: TempDir,
}

/// A daemon with a pattern image as node `disk0`, the NBD server on a unix
/// socket (from the command line) and the export `disk0` (writable).
fn setup(kind: DaemonKind) -> Setup {
    let dir = TempDir::new("blkgraph-nbd").unwrap();
    let image = dir.path().join("disk.raw");
    blkgraph_tests::create_pattern_image(&image, SIZE, SEED).unwrap();
    let nbd_sock = dir.path().join("nbd.sock");
    let qmp_sock = dir.path().join("qmp.sock");
    let a: Vec<OsString> = [
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", image.display()),
        "--blockdev".into(),
        "driver=raw,node-name=disk0,file=f0".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd_sock.display()),
        "--export".into(),
        "type=nbd,id=nbd0,node-name=disk0,writable=on".into(),
        "--chardev".into(),
        format!(
            "socket,id=m0,path={},server=on,wait=off",
            qmp_sock.display()
        ),
        "--monitor".into(),
        "chardev=m0".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let daemon = Daemon::start(kind, &a, dir.path(), &nbd_sock).unwrap();
    let qmp = QmpClient::connect(&qmp_sock).unwrap();
    Setup {
        daemon,
        qmp,
        nbd_sock,
        dir,
    }
}

#[test]
fn hostile_clients_do_not_disturb_others() {
    let mut s = setup(DaemonKind::from_env());
    let mut good = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
    assert_eq!(good.size, SIZE);
    let check = |good: &mut Nbd, step: &str| {
        let off = 4096 * (step.len() as u64 + 1);
        let d = good.read(off, 8192);
        check_pattern(&d, off, SEED).unwrap_or_else(|e| panic!("after {step}: {e}"));
    };
    check(&mut good, "start");

    // Garbage instead of the client flags and options.
    let mut c = unix(&s.nbd_sock);
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&[0xa5; 4096]).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    check(&mut good, "garbage handshake");

    // An option header announcing 4 GiB of data, then a hang-up.
    let mut c = unix(&s.nbd_sock);
    c.read_exact(&mut g).unwrap();
    let mut m = 1u32.to_be_bytes().to_vec();
    m.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    m.extend_from_slice(&[0; 100]);
    c.write_all(&m).unwrap();
    drop(c);
    check(&mut good, "huge option");

    // Bad request magic in transmission: blkgraph drops that connection
    // at once (QSD first answers it with an error reply).
    let mut bad = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
    bad.s.write_all(&[0xff; 28]).unwrap();
    let closed = bad.closed();
    assert!(closed || s.daemon.kind() == DaemonKind::Qsd);
    check(&mut good, "bad magic");

    // A write whose payload never comes, then a hang-up.
    let mut bad = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
    let mut m = Vec::new();
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&1u64.to_be_bytes());
    m.extend_from_slice(&0u64.to_be_bytes());
    m.extend_from_slice(&(1u32 << 20).to_be_bytes());
    m.extend_from_slice(&[0x11; 1000]);
    bad.s.write_all(&m).unwrap();
    drop(bad);
    check(&mut good, "truncated write");
    // The truncated write did not reach the image.
    check_pattern(&good.read(0, 4096), 0, SEED).unwrap();

    // Oversized and out-of-range requests get errors; the connection lives.
    let mut odd = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
    odd.request(CMD_READ, 1, 0, 64 << 20, &[]);
    assert_ne!(odd.reply(0).0, 0);
    odd.request(CMD_READ, 2, SIZE - 512, 4096, &[]);
    assert_eq!(odd.reply(0).0, 22);
    odd.request(CMD_READ, 3, u64::MAX - 10, 4096, &[]);
    assert_eq!(odd.reply(0).0, 22);
    odd.request(77, 4, 0, 0, &[]);
    assert_eq!(odd.reply(0).0, 22);
    check_pattern(&odd.read(SIZE - 4096, 4096), SIZE - 4096, SEED).unwrap();
    check(&mut good, "odd requests");

    // Many connections that negotiate and vanish.
    for _ in 0..50 {
        let c = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
        drop(c);
    }
    check(&mut good, "connection churn");

    good.request(CMD_FLUSH, 9, 0, 0, &[]);
    assert_eq!(good.reply(0).0, 0);
    good.request(CMD_DISC, 10, 0, 0, &[]);
    assert!(good.closed());
    assert!(s.daemon.try_exit_status().is_none(), "the daemon died");
    let exports = exec(&mut s.qmp, "query-block-exports", json!({})).unwrap();
    assert_eq!(exports[0]["id"], "nbd0");
    assert_eq!(exports[0]["type"], "nbd");
}

/// The resident set size of a process, in MiB.
fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        / 1024
}

#[test]
fn a_client_that_does_not_read_its_replies_holds_bounded_memory() {
    // A sparse image with 4 KiB of data every 32 MiB.
    const IMAGE: u64 = 2 << 30;
    const READ: u32 = 32 << 20;
    let dir = TempDir::new("blkgraph-nbd-mem").unwrap();
    let image = dir.path().join("sparse.raw");
    blkgraph_tests::create_sparse_image(&image, IMAGE).unwrap();
    let mut block = vec![0u8; 4096];
    for off in (0..IMAGE).step_by(READ as usize) {
        fill_pattern(&mut block, off, SEED);
        blkgraph_tests::write_file_range(&image, off, &block).unwrap();
    }
    let nbd_sock = dir.path().join("nbd.sock");
    let a: Vec<OsString> = [
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={}", image.display()),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd_sock.display()),
        "--export".into(),
        "type=nbd,id=nbd0,node-name=f0".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let mut daemon = Daemon::start(DaemonKind::from_env(), &a, dir.path(), &nbd_sock).unwrap();
    let before = rss_mib(daemon.pid());
    let mut c = Nbd::connect_structured(unix(&nbd_sock), "f0").unwrap();
    // Every read of the image, twice, pipelined; no reply is read yet.
    let offsets: Vec<u64> = (0..2)
        .flat_map(|_| (0..IMAGE).step_by(READ as usize))
        .collect();
    for (i, off) in offsets.iter().enumerate() {
        c.request(CMD_READ, i as u64, *off, READ, &[]);
    }
    // Let the server do what it will with them.
    std::thread::sleep(Duration::from_secs(3));
    let peak = rss_mib(daemon.pid());
    assert!(
        peak < before + 320,
        "RSS went from {before} MiB to {peak} MiB with {} unread 32 MiB replies",
        offsets.len()
    );
    // Every reply arrives, complete and right.
    let mut seen = vec![false; offsets.len()];
    for _ in 0..offsets.len() {
        let (handle, data) = c.structured_read_reply(|h| offsets[h as usize], READ as usize);
        let off = offsets[handle as usize];
        check_pattern(&data[..4096], off, SEED).unwrap();
        assert!(data[4096..].iter().all(|&b| b == 0), "read at {off}");
        assert!(!std::mem::replace(&mut seen[handle as usize], true));
    }
    drop(c);
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_mib(daemon.pid());
    assert!(
        after < before + 64,
        "RSS stayed at {after} MiB after the client left (was {before} MiB)"
    );
    assert!(daemon.try_exit_status().is_none(), "the daemon died");
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn server_and_export_lifecycle_over_qmp() {
    let mut s = setup(DaemonKind::from_env());
    let kind = s.daemon.kind();
    let q = &mut s.qmp;
    // The command-line server runs; a second one is refused.
    let port = free_port();
    let inet =
        json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port.to_string()}}});
    let e = exec(q, "nbd-server-start", inet.clone()).unwrap_err();
    assert!(e.contains("already running"), "{e}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    exec(q, "nbd-server-stop", json!({})).unwrap();
    assert_eq!(wait_event(q, "BLOCK_EXPORT_DELETED")["id"], "nbd0");
    assert_eq!(
        exec(q, "query-block-exports", json!({})).unwrap(),
        json!([])
    );
    assert!(!s.nbd_sock.exists() || UnixStream::connect(&s.nbd_sock).is_err());
    let e = exec(q, "nbd-server-stop", json!({})).unwrap_err();
    assert!(e.contains("not running"), "{e}");
    let e = exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "x", "node-name": "disk0"}),
    )
    .unwrap_err();
    assert!(e.contains("NBD server not running"), "{e}");

    // Now on TCP, exactly where told.
    exec(q, "nbd-server-start", inet).unwrap();
    exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "ro", "node-name": "disk0", "name": "snap",
               "description": "read-only view"}),
    )
    .unwrap();
    let e = exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "ro2", "node-name": "disk0", "name": "snap"}),
    )
    .unwrap_err();
    assert!(e.contains("already has export named 'snap'"), "{e}");
    let exports = exec(q, "query-block-exports", json!({})).unwrap();
    assert_eq!(
        exports,
        json!([{"id": "ro", "type": "nbd", "node-name": "disk0", "shutting-down": false}])
    );
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Nbd::connect(Box::new(tcp), "snap").unwrap();
    check_pattern(&c.read(1 << 20, 65536), 1 << 20, SEED).unwrap();
    c.request(CMD_WRITE, 5, 0, 512, &[0; 512]);
    // EPERM as the NBD spec asks; QSD answers EINVAL.
    let err = c.reply(0).0;
    match kind {
        DaemonKind::Blkgraph => assert_eq!(err, 1, "EPERM on a read-only export"),
        DaemonKind::Qsd => assert_eq!(err, 22),
    }

    // Safe deletion is refused while a client is connected; hard drops it.
    let e = exec(q, "block-export-del", json!({"id": "ro"})).unwrap_err();
    assert!(e.contains("export 'ro' still in use"), "{e}");
    check_pattern(&c.read(0, 4096), 0, SEED).unwrap();
    exec(q, "block-export-del", json!({"id": "ro", "mode": "hard"})).unwrap();
    assert_eq!(wait_event(q, "BLOCK_EXPORT_DELETED")["id"], "ro");
    assert!(c.closed());
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(Nbd::connect(Box::new(tcp), "snap").is_err());
    // Safe deletion without clients works at once.
    exec(
        q,
        "block-export-add",
        json!({"type": "nbd", "id": "rw", "node-name": "disk0", "writable": true}),
    )
    .unwrap();
    exec(q, "block-export-del", json!({"id": "rw"})).unwrap();
    assert_eq!(wait_event(q, "BLOCK_EXPORT_DELETED")["id"], "rw");
    exec(q, "nbd-server-stop", json!({})).unwrap();
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn graph_changes_under_a_serving_nbd_export_lose_nothing() {
    if DaemonKind::from_env() != DaemonKind::Blkgraph {
        eprintln!("skipped: needs blkgraph's x-blockdev-replace");
        return;
    }
    let mut s = setup(DaemonKind::Blkgraph);
    let sock = s.nbd_sock.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rounds2 = rounds.clone();
    // A client that keeps writing new data and reading back what it wrote
    // in the round before, both in flight at once, while the export's root
    // is switched back and forth. Replies may come in any order.
    let io = std::thread::spawn(move || {
        let mut c = Nbd::connect(unix(&sock), "disk0").unwrap();
        let region = |round: u64| (round * 65536) % (SIZE - 65536);
        let data = |round: u64| {
            let mut d = vec![0u8; 65536];
            fill_pattern(&mut d, region(round), 1000 + round);
            d
        };
        c.write(region(0), &data(0));
        let mut round = 1u64;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            c.request(CMD_WRITE, 1, region(round), 65536, &data(round));
            c.request(CMD_READ, 2, region(round - 1), 65536, &[]);
            let mut h = [0u8; 16];
            for _ in 0..2 {
                c.s.read_exact(&mut h).unwrap();
                assert_eq!(be32(&h), SIMPLE_MAGIC);
                assert_eq!(be32(&h[4..]), 0);
                if be64(&h[8..]) == 2 {
                    let mut d = vec![0u8; 65536];
                    c.s.read_exact(&mut d).unwrap();
                    assert_eq!(d, data(round - 1), "round {round}");
                }
            }
            round += 1;
            rounds2.store(round, std::sync::atomic::Ordering::Relaxed);
        }
        round
    });
    // Each switch waits until the client has done two more rounds, so
    // requests run before, between and after the switches.
    let progress = |from: u64| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while rounds.load(std::sync::atomic::Ordering::Relaxed) < from + 2 {
            assert!(Instant::now() < deadline, "the client made no progress");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let q = &mut s.qmp;
    let t = Instant::now();
    for i in 0..20 {
        progress(rounds.load(std::sync::atomic::Ordering::Relaxed));
        exec(
            q,
            "transaction",
            json!({"actions": [
                {"type": "blockdev-add", "data": {"driver": "throttle", "node-name": format!("thr{i}"),
                 "limits": {"iops-total": 100000}, "file": "disk0"}},
                {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "nbd0",
                 "new-child": format!("thr{i}")}}]}),
        )
        .unwrap();
        let exports = exec(q, "query-block-exports", json!({})).unwrap();
        assert_eq!(exports[0]["node-name"], format!("thr{i}"));
        progress(rounds.load(std::sync::atomic::Ordering::Relaxed));
        exec(
            q,
            "transaction",
            json!({"actions": [
                {"type": "x-blockdev-replace", "data": {"parent-type": "export", "export-id": "nbd0",
                 "new-child": "disk0"}},
                {"type": "blockdev-del", "data": {"node-name": format!("thr{i}")}}]}),
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let done = io.join().expect("the I/O thread failed");
    assert!(done >= 80, "only {done} rounds in {:?}", t.elapsed());
    let _ = &s.dir;
}

#[test]
fn exports_added_during_drained_transactions_keep_serving() {
    if DaemonKind::from_env() == DaemonKind::Qsd {
        return; // blockdev-del in a transaction is blkgraph's
    }
    let mut s = setup(DaemonKind::Blkgraph);
    let qmp_path = s.dir.path().join("qmp.sock");
    // Another client runs transactions that drain the graph, back to back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drainer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut qmp = QmpClient::connect(&qmp_path).unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                exec(
                    &mut qmp,
                    "transaction",
                    json!({"actions": [
                        {"type": "blockdev-add", "data": {"driver": "null-co", "node-name": "tmp"}},
                        {"type": "blockdev-del", "data": {"node-name": "tmp"}}]}),
                )
                .unwrap();
                n += 1;
            }
            n
        })
    };
    // Meanwhile exports come and go; each one serves.
    for i in 0..1000 {
        let name = format!("e{i}");
        exec(
            &mut s.qmp,
            "block-export-add",
            json!({"type": "nbd", "id": name, "node-name": "disk0", "name": name}),
        )
        .unwrap();
        let mut c = Nbd::connect(unix(&s.nbd_sock), &name).unwrap();
        check_pattern(&c.read(4096 * i, 4096), 4096 * i, SEED).unwrap();
        drop(c);
        exec(
            &mut s.qmp,
            "block-export-del",
            json!({"id": name, "mode": "hard"}),
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(drainer.join().unwrap() > 0);
    let mut c = Nbd::connect(unix(&s.nbd_sock), "disk0").unwrap();
    check_pattern(&c.read(0, 4096), 0, SEED).unwrap();
}
