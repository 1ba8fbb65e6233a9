//! End-to-end tests of the server inside the process: a raw protocol
//! client against exports on real graph nodes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkgraph_graph::{Graph, Options};

use super::export::NbdExport;
use super::proto::{self, Request};
use super::server::{NbdServer, NbdServerOptions};
use super::socket::ListenAddress;
use crate::export::Export;
use blkgraph_graph::DrainParent;

/// A temporary directory for one test.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!(
            "blkgraph-nbd-{tag}-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let p = PathBuf::from(p.to_string_lossy().replace([' ', '{', '}', ':', ','], ""));
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Setup {
    graph: Arc<Graph>,
    server: NbdServer,
    sock: PathBuf,
    _dir: Dir,
}

fn setup(tag: &str, max_connections: u32) -> Setup {
    setup_with(tag, max_connections, 5)
}

fn setup_with(tag: &str, max_connections: u32, handshake_max_seconds: u32) -> Setup {
    let dir = Dir::new(tag);
    let sock = dir.0.join("nbd.sock");
    let image = dir.0.join("img.raw");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(8 << 20).unwrap();
    let graph = Arc::new(Graph::new());
    let add = |s: String| graph.add(Options::from_arg(&s, None).unwrap()).unwrap();
    add(format!(
        "driver=file,node-name=f0,filename={},discard=unmap",
        image.display()
    ));
    add("driver=raw,node-name=disk0,file=f0,discard=unmap".into());
    add("driver=null-co,node-name=n0,size=8M,read-zeroes=on".into());
    add("driver=throttle,node-name=slow,file=n0,limits.iops-total=20".into());
    let server = NbdServer::start(
        &NbdServerOptions {
            addr: ListenAddress::Unix { path: sock.clone() },
            max_connections,
            handshake_max_seconds,
        },
        None,
    )
    .unwrap();
    Setup {
        graph,
        server,
        sock,
        _dir: dir,
    }
}

fn export(s: &Setup, arg: &str) -> Arc<NbdExport> {
    s.server
        .start_export(&s.graph, Options::from_arg(arg, None).unwrap())
        .unwrap()
}

/// A hand-written NBD client: exactly the bytes the tests mean.
struct Client {
    s: UnixStream,
    size: u64,
    flags: u16,
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

/// One structured reply chunk: flags, type, handle, payload.
type Chunk = (u16, u16, u64, Vec<u8>);

impl Client {
    fn greet(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(be64(&g), proto::INIT_MAGIC);
        assert_eq!(be64(&g[8..]), proto::OPTS_MAGIC);
        assert_eq!(be16(&g[16..]), 3);
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }

    fn option(s: &mut UnixStream, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).unwrap();
    }

    /// Reads one option reply: type and data.
    fn option_reply(s: &mut UnixStream, option: u32) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        assert_eq!(be64(&h), proto::REP_MAGIC);
        assert_eq!(be32(&h[8..]), option);
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        s.read_exact(&mut d).unwrap();
        (be32(&h[12..]), d)
    }

    /// Handshake: structured replies and base:allocation if asked, then GO.
    fn connect(path: &Path, name: &str, structured: bool) -> Result<Client, u32> {
        let mut s = Self::greet(path);
        if structured {
            Self::option(&mut s, proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(
                Self::option_reply(&mut s, proto::OPT_STRUCTURED_REPLY).0,
                proto::REP_ACK
            );
            let mut d = Vec::new();
            d.extend_from_slice(&(name.len() as u32).to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            Self::option(&mut s, proto::OPT_SET_META_CONTEXT, &d);
            loop {
                let (t, _) = Self::option_reply(&mut s, proto::OPT_SET_META_CONTEXT);
                if t != proto::REP_META_CONTEXT {
                    break;
                }
            }
        }
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        Self::option(&mut s, proto::OPT_GO, &d);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (t, d) = Self::option_reply(&mut s, proto::OPT_GO);
            match t {
                proto::REP_INFO if be16(&d) == proto::INFO_EXPORT => {
                    size = be64(&d[2..]);
                    flags = be16(&d[10..]);
                }
                proto::REP_INFO => {}
                proto::REP_ACK => return Ok(Client { s, size, flags }),
                err => return Err(err),
            }
        }
    }

    fn send(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        data: &[u8],
    ) {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            length,
        };
        let mut m = r.encode().to_vec();
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: error and handle; `data` bytes follow on success.
    fn simple(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(be32(&h), proto::SIMPLE_REPLY_MAGIC);
        let err = be32(&h[4..]);
        let mut d = vec![0u8; if err == 0 { data } else { 0 }];
        self.s.read_exact(&mut d).unwrap();
        (err, be64(&h[8..]), d)
    }

    fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 4];
        self.s.read_exact(&mut h).unwrap();
        if be32(&h) == proto::SIMPLE_REPLY_MAGIC {
            let mut r = [0u8; 12];
            self.s.read_exact(&mut r).unwrap();
            return (
                proto::REPLY_FLAG_DONE,
                u16::MAX,
                be64(&r[4..]),
                r[..4].to_vec(),
            );
        }
        assert_eq!(be32(&h), proto::STRUCTURED_REPLY_MAGIC);
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r).unwrap();
        let mut d = vec![0u8; be32(&r[12..]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be16(&r), be16(&r[2..]), be64(&r[4..]), d)
    }

    /// Every chunk up to the one marked done.
    fn reply(&mut self) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.chunk();
            let done = c.0 & proto::REPLY_FLAG_DONE != 0;
            v.push(c);
            if done {
                return v;
            }
        }
    }
}

#[test]
fn read_write_and_errors_with_simple_replies() {
    let s = setup("simple", 0);
    export(&s, "id=e0,node-name=disk0,writable=on");
    let mut c = Client::connect(&s.sock, "disk0", false).unwrap();
    assert_eq!(c.size, 8 << 20);
    assert_eq!(c.flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(c.flags & proto::FLAG_SEND_FLUSH, 0);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    c.send(proto::CMD_WRITE, proto::CMD_FLAG_FUA, 1, 4096, 8192, &data);
    assert_eq!(c.simple(0), (0, 1, vec![]));
    c.send(proto::CMD_READ, 0, 2, 4096, 8192, &[]);
    assert_eq!(c.simple(8192), (0, 2, data.clone()));
    // Past the end: EINVAL for reads, ENOSPC for writes; the connection stays.
    c.send(proto::CMD_READ, 0, 3, (8 << 20) - 512, 1024, &[]);
    assert_eq!(c.simple(0).0, proto::EINVAL);
    c.send(proto::CMD_WRITE, 0, 4, 8 << 20, 1, &[7]);
    assert_eq!(c.simple(0).0, proto::ENOSPC);
    // Flags this command does not take.
    c.send(proto::CMD_READ, proto::CMD_FLAG_DF, 5, 0, 512, &[]);
    assert_eq!(c.simple(0).0, proto::EINVAL);
    // Unknown command.
    c.send(99, 0, 6, 0, 0, &[]);
    assert_eq!(c.simple(0).0, proto::EINVAL);
    // A write too large is read off the wire and refused.
    let big = proto::MAX_PAYLOAD + 1;
    c.send(proto::CMD_WRITE, 0, 7, 0, big, &vec![0xee; big as usize]);
    assert_eq!(c.simple(0), (proto::EINVAL, 7, vec![]));
    c.send(proto::CMD_READ, 0, 8, 0, 4096, &[]);
    assert_eq!(c.simple(4096).0, 0);
    // Fast zero fails fast; a plain zero works.
    c.send(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_FAST_ZERO,
        9,
        4096,
        4096,
        &[],
    );
    assert_eq!(c.simple(0).0, proto::ENOTSUP);
    c.send(
        proto::CMD_WRITE_ZEROES,
        proto::CMD_FLAG_NO_HOLE,
        10,
        4096,
        4096,
        &[],
    );
    assert_eq!(c.simple(0).0, 0);
    c.send(proto::CMD_READ, 0, 11, 4096, 8192, &[]);
    let (_, _, d) = c.simple(8192);
    assert!(d[..4096].iter().all(|&b| b == 0));
    assert_eq!(&d[4096..], &data[4096..]);
    c.send(proto::CMD_FLUSH, 0, 12, 0, 0, &[]);
    assert_eq!(c.simple(0).0, 0);
    // Block status was not negotiated.
    c.send(proto::CMD_BLOCK_STATUS, 0, 13, 0, 4096, &[]);
    assert_eq!(c.simple(0).0, proto::EINVAL);
    c.send(proto::CMD_DISC, 0, 14, 0, 0, &[]);
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn structured_reads_holes_and_block_status() {
    let s = setup("structured", 0);
    export(&s, "id=e0,node-name=disk0,writable=on");
    let mut c = Client::connect(&s.sock, "disk0", true).unwrap();
    assert_ne!(c.flags & proto::FLAG_SEND_DF, 0);
    c.send(proto::CMD_WRITE, 0, 1, 65536, 4096, &[0x5a; 4096]);
    assert_eq!(c.chunk().3, vec![0, 0, 0, 0]);
    // 64k hole, 4k data, 60k hole.
    c.send(proto::CMD_READ, 0, 2, 0, 131072, &[]);
    let chunks = c.reply();
    let kinds: Vec<u16> = chunks.iter().map(|c| c.1).collect();
    assert_eq!(
        kinds,
        [
            proto::REPLY_TYPE_OFFSET_HOLE,
            proto::REPLY_TYPE_OFFSET_DATA,
            proto::REPLY_TYPE_OFFSET_HOLE
        ]
    );
    assert_eq!(be64(&chunks[1].3), 65536);
    assert!(chunks[1].3[8..].iter().all(|&b| b == 0x5a));
    assert_eq!(chunks[1].3.len(), 8 + 4096);
    assert_eq!(
        (be64(&chunks[2].3), be32(&chunks[2].3[8..])),
        (69632, 61440)
    );
    // DF: one data chunk.
    c.send(proto::CMD_READ, proto::CMD_FLAG_DF, 3, 0, 131072, &[]);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].3.len(), 8 + 131072);
    // Block status: hole, data, hole; REQ_ONE gives one extent.
    c.send(proto::CMD_BLOCK_STATUS, 0, 4, 0, 131072, &[]);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].1, proto::REPLY_TYPE_BLOCK_STATUS);
    let d = &chunks[0].3;
    assert_eq!(be32(d), 0);
    let ext: Vec<(u32, u32)> = d[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
    assert_eq!(ext, [(65536, 3), (4096, 0), (61440, 3)]);
    c.send(
        proto::CMD_BLOCK_STATUS,
        proto::CMD_FLAG_REQ_ONE,
        5,
        0,
        131072,
        &[],
    );
    let chunks = c.reply();
    assert_eq!(chunks[0].3.len(), 12);
    // Errors come as error chunks with a message.
    c.send(proto::CMD_READ, 0, 6, 0, proto::MAX_PAYLOAD + 1, &[]);
    let chunks = c.reply();
    assert_eq!(chunks[0].1, proto::REPLY_TYPE_ERROR);
    assert_eq!(be32(&chunks[0].3), proto::EINVAL);
    let msg = String::from_utf8_lossy(&chunks[0].3[6..]).to_string();
    assert!(msg.contains("larger than max len"), "{msg}");
}

#[test]
fn read_only_exports_refuse_writes_and_allow_multi_conn() {
    let s = setup("ro", 0);
    export(&s, "id=e0,node-name=disk0,name=ro");
    let mut c = Client::connect(&s.sock, "ro", false).unwrap();
    assert_ne!(c.flags & proto::FLAG_READ_ONLY, 0);
    assert_ne!(c.flags & proto::FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(
        c.flags & (proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES),
        0
    );
    c.send(proto::CMD_WRITE, 0, 1, 0, 512, &[1; 512]);
    assert_eq!(c.simple(0).0, proto::EPERM);
    c.send(proto::CMD_TRIM, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(0).0, proto::EPERM);
    c.send(proto::CMD_WRITE_ZEROES, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(0).0, proto::EPERM);
    c.send(proto::CMD_READ, 0, 4, 0, 512, &[]);
    assert_eq!(c.simple(512), (0, 4, vec![0; 512]));
    assert_eq!(
        Client::connect(&s.sock, "nope", false).err(),
        Some(proto::REP_ERR_UNKNOWN)
    );
}

#[test]
fn draining_waits_for_requests_and_holds_new_ones() {
    let s = setup("quiesce", 0);
    let e = export(&s, "id=e0,node-name=slow");
    let mut c = Client::connect(&s.sock, "slow", false).unwrap();
    // 20 IOPS with a burst of 2: ten reads take 400 ms.
    for h in 0..10 {
        c.send(proto::CMD_READ, 0, h, 0, 512, &[]);
    }
    std::thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    e.gate().drained_begin();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    for _ in 0..10 {
        assert_eq!(c.simple(512).0, 0);
    }
    // Requests sent while drained wait until the drained section ends.
    c.send(proto::CMD_READ, 0, 9, 0, 512, &[]);
    c.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut b = [0u8; 1];
    let err = c.s.read(&mut b).unwrap_err();
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    e.gate().drained_end();
    c.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(c.simple(512).1, 9);
}

#[test]
fn garbage_drops_one_connection_only() {
    let s = setup("garbage", 0);
    export(&s, "id=e0,node-name=disk0,writable=on");
    let mut good = Client::connect(&s.sock, "disk0", true).unwrap();
    let mut bad = Client::connect(&s.sock, "disk0", false).unwrap();
    bad.s.write_all(&[0xff; 100]).unwrap();
    let mut rest = Vec::new();
    bad.s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Garbage during the handshake.
    let mut g = Client::greet(&s.sock);
    g.write_all(&[0x55; 64]).unwrap();
    rest.clear();
    assert!(g.read_to_end(&mut rest).is_ok_and(|n| n == 0) || rest.is_empty());
    // Unknown client flags.
    let mut g = UnixStream::connect(&s.sock).unwrap();
    let mut greeting = [0u8; 18];
    g.read_exact(&mut greeting).unwrap();
    g.write_all(&0x80u32.to_be_bytes()).unwrap();
    rest.clear();
    g.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    good.send(proto::CMD_READ, 0, 1, 0, 65536, &[]);
    assert_eq!(good.reply()[0].1, proto::REPLY_TYPE_OFFSET_HOLE);
}

#[test]
fn options_list_info_and_meta_contexts() {
    let s = setup("options", 0);
    export(&s, "id=e0,node-name=disk0,name=a,description=first");
    export(&s, "id=e1,node-name=n0,name=b");
    let mut g = Client::greet(&s.sock);
    Client::option(&mut g, proto::OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (t, d) = Client::option_reply(&mut g, proto::OPT_LIST);
        if t == proto::REP_ACK {
            break;
        }
        assert_eq!(t, proto::REP_SERVER);
        let n = be32(&d) as usize;
        names.push((
            String::from_utf8_lossy(&d[4..4 + n]).to_string(),
            String::from_utf8_lossy(&d[4 + n..]).to_string(),
        ));
    }
    assert_eq!(
        names,
        [("a".into(), "first".into()), ("b".into(), String::new())]
    );
    // LIST with data is invalid; unknown options are unsupported.
    Client::option(&mut g, proto::OPT_LIST, &[1]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_LIST).0,
        proto::REP_ERR_INVALID
    );
    Client::option(&mut g, 42, &[1, 2, 3]);
    assert_eq!(Client::option_reply(&mut g, 42).0, proto::REP_ERR_UNSUP);
    Client::option(&mut g, proto::OPT_STARTTLS, &[]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_STARTTLS).0,
        proto::REP_ERR_POLICY
    );
    // Meta contexts need structured replies first.
    let mut q = Vec::new();
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(b"a");
    q.extend_from_slice(&0u32.to_be_bytes());
    Client::option(&mut g, proto::OPT_LIST_META_CONTEXT, &q);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ERR_INVALID
    );
    Client::option(&mut g, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_STRUCTURED_REPLY).0,
        proto::REP_ACK
    );
    Client::option(&mut g, proto::OPT_LIST_META_CONTEXT, &q);
    let (t, d) = Client::option_reply(&mut g, proto::OPT_LIST_META_CONTEXT);
    assert_eq!(t, proto::REP_META_CONTEXT);
    assert_eq!(&d[4..], b"base:allocation");
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_LIST_META_CONTEXT).0,
        proto::REP_ACK
    );
    // INFO with the name and block size items.
    let mut d = Vec::new();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(b"a");
    d.extend_from_slice(&2u16.to_be_bytes());
    d.extend_from_slice(&proto::INFO_NAME.to_be_bytes());
    d.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    Client::option(&mut g, proto::OPT_INFO, &d);
    let mut items = Vec::new();
    loop {
        let (t, d) = Client::option_reply(&mut g, proto::OPT_INFO);
        if t == proto::REP_ACK {
            break;
        }
        items.push(be16(&d));
        if be16(&d) == proto::INFO_BLOCK_SIZE {
            assert_eq!(be32(&d[2..]), 1);
            assert_eq!(be32(&d[6..]), 4096);
            assert_eq!(be32(&d[10..]), 32 << 20);
        }
    }
    assert_eq!(
        items,
        [proto::INFO_NAME, proto::INFO_BLOCK_SIZE, proto::INFO_EXPORT]
    );
    // A short INFO is invalid, not a disconnect.
    Client::option(&mut g, proto::OPT_INFO, &[0, 0]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_INFO).0,
        proto::REP_ERR_INVALID
    );
    Client::option(&mut g, proto::OPT_ABORT, &[]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_ABORT).0,
        proto::REP_ACK
    );
}

#[test]
fn deletion_and_connection_limit() {
    let s = setup("delete", 1);
    let e = export(&s, "id=e0,node-name=disk0");
    let mut c = Client::connect(&s.sock, "disk0", false).unwrap();
    // The limit holds the second client in the backlog.
    let mut second = UnixStream::connect(&s.sock).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 8];
    assert!(second.read_exact(&mut b).is_err());
    let err = e.stop(false).unwrap_err().to_string();
    assert!(err.starts_with("export 'e0' still in use"), "{err}");
    e.stop(true).unwrap();
    let mut rest = Vec::new();
    c.s.read_to_end(&mut rest).unwrap();
    // The first client is gone: the second one gets its greeting.
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    second.read_exact(&mut b).unwrap();
    assert_eq!(be64(&b), proto::INIT_MAGIC);
    drop(second);
    s.server.stop();
    assert_eq!(s.server.client_count(), 0);
    assert!(!s.sock.exists());
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_limit() {
    let s = setup_with("timeout", 0, 1);
    export(&s, "id=e0,node-name=disk0");
    let t = Instant::now();
    let mut g = Client::greet(&s.sock);
    // Half an option header, then nothing.
    g.write_all(&proto::OPTS_MAGIC.to_be_bytes()).unwrap();
    let mut rest = Vec::new();
    g.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    // A client in transmission is not subject to the limit.
    let mut c = Client::connect(&s.sock, "disk0", false).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.send(proto::CMD_READ, 0, 1, 0, 512, &[]);
    assert_eq!(c.simple(512).0, 0);
}

#[test]
fn dirty_bitmap_contexts() {
    let s = setup("bitmap", 0);
    let disk = s.graph.find("disk0").unwrap();
    let b = Arc::new(blkgraph_graph::DirtyBitmap::new("b0", 8 << 20, 65536, false).unwrap());
    b.set_range(65536, 1);
    assert!(disk.add_bitmap(b));
    export(&s, "id=e0,node-name=disk0,bitmaps.0=b0");
    let mut g = Client::greet(&s.sock);
    Client::option(&mut g, proto::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(
        Client::option_reply(&mut g, proto::OPT_STRUCTURED_REPLY).0,
        proto::REP_ACK
    );
    let query = |opt: u32, queries: &[&[u8]]| {
        let mut d = Vec::new();
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"disk0");
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        (opt, d)
    };
    let names = |g: &mut UnixStream, (opt, d): (u32, Vec<u8>)| {
        Client::option(g, opt, &d);
        let mut out = Vec::new();
        loop {
            let (t, d) = Client::option_reply(g, opt);
            if t == proto::REP_ACK {
                return out;
            }
            assert_eq!(t, proto::REP_META_CONTEXT);
            out.push((be32(&d), String::from_utf8_lossy(&d[4..]).to_string()));
        }
    };
    let listed = names(&mut g, query(proto::OPT_LIST_META_CONTEXT, &[b"qemu:"]));
    assert_eq!(listed, [(0, "qemu:dirty-bitmap:b0".to_string())]);
    // Wildcards select nothing; unknown namespaces are ignored.
    let set = names(
        &mut g,
        query(proto::OPT_SET_META_CONTEXT, &[b"qemu:", b"x-foo:bar"]),
    );
    assert!(set.is_empty());
    let set = names(
        &mut g,
        query(
            proto::OPT_SET_META_CONTEXT,
            &[b"qemu:dirty-bitmap:b0", b"base:allocation"],
        ),
    );
    let ids: Vec<u32> = set.iter().map(|(id, _)| *id).collect();
    assert_eq!(set.len(), 2);
    let mut d = Vec::new();
    d.extend_from_slice(&5u32.to_be_bytes());
    d.extend_from_slice(b"disk0");
    d.extend_from_slice(&0u16.to_be_bytes());
    Client::option(&mut g, proto::OPT_GO, &d);
    while Client::option_reply(&mut g, proto::OPT_GO).0 != proto::REP_ACK {}
    let mut c = Client {
        s: g,
        size: 8 << 20,
        flags: 0,
    };
    c.send(proto::CMD_BLOCK_STATUS, 0, 1, 0, 262144, &[]);
    let chunks = c.reply();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0].0 & proto::REPLY_FLAG_DONE, 0);
    for (_, kind, handle, d) in &chunks {
        assert_eq!((*kind, *handle), (proto::REPLY_TYPE_BLOCK_STATUS, 1));
        let ext: Vec<(u32, u32)> = d[4..].chunks(8).map(|e| (be32(e), be32(&e[4..]))).collect();
        let name = &set.iter().find(|(id, _)| *id == be32(d)).unwrap().1;
        if name == "base:allocation" {
            assert_eq!(ext, [(262144, 3)]);
        } else {
            assert_eq!(ext, [(65536, 0), (65536, 1), (131072, 0)]);
        }
    }
    assert!(ids.contains(&be32(&chunks[1].3)));
}

#[test]
fn a_connection_is_served_on_the_calling_thread() {
    let s = setup("serve-here", 0);
    export(&s, "id=e0,node-name=disk0");
    let (server_end, mut client_end) = UnixStream::pair().unwrap();
    let client = std::thread::spawn(move || {
        let mut greeting = [0u8; 18];
        client_end.read_exact(&mut greeting).unwrap();
        assert_eq!(be64(&greeting), proto::INIT_MAGIC);
        client_end.write_all(&[0xa5; 100]).unwrap();
        let mut rest = Vec::new();
        let _ = client_end.read_to_end(&mut rest);
    });
    s.server.serve_connection(server_end).unwrap();
    client.join().unwrap();
    assert_eq!(s.server.client_count(), 0);
}

/// Found by the nbd fuzz target: a READ of 0 bytes with simple replies
/// queued a reply whose data part was empty. The writer sent its header,
/// then kept sending that empty part (0 bytes) in a loop: the connection's
/// thread spun at full CPU, answered nothing more and never closed.
#[test]
fn a_read_of_no_bytes_gets_a_simple_reply() {
    let s = setup("read0", 0);
    export(&s, "id=e0,node-name=disk0");
    let mut c = Client::connect(&s.sock, "disk0", false).unwrap();
    c.send(proto::CMD_READ, 0, 1, 4096, 0, &[]);
    assert_eq!(c.simple(0), (0, 1, vec![]));
    c.send(proto::CMD_FLUSH, 0, 2, 0, 0, &[]);
    assert_eq!(c.simple(0), (0, 2, vec![]));
}

/// Found by the qmp_commands fuzz target: an NBD client node connected to
/// an export of the same daemon is flushed through that export when it is
/// deleted. Nodes that left the graph were closed inside the drained
/// section that pauses every export, so the flush never got an answer:
/// blockdev-del never returned, and the graph stayed locked for every
/// later command.
#[test]
fn a_node_closed_through_an_export_of_the_same_graph() {
    let s = setup("close-local", 0);
    export(&s, "id=e0,node-name=disk0,writable=on");
    let nbd = format!(
        "driver=nbd,node-name=nb,server.type=unix,server.path={},export=disk0",
        s.sock.display()
    );
    s.graph.add(Options::from_arg(&nbd, None).unwrap()).unwrap();
    let graph = s.graph.clone();
    let (done, deleted) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(graph.remove("nb")));
    let result = deleted
        .recv_timeout(Duration::from_secs(10))
        .expect("blockdev-del of the NBD client node hung");
    result.unwrap();
    assert!(s.graph.find("nb").is_err());
}

/// Found by the qmp_commands fuzz target, under load: a backup job read
/// from an NBD client node connected to an export of the same graph. A
/// drained transaction (blockdev-del, any graph change) paused the
/// exports before the jobs, then waited for the job to get to its pause
/// point; but the job's next read went to the paused export, so it never
/// did, and the transaction waited for ever with the graph locked.
#[test]
fn a_drain_while_a_job_reads_through_an_export_of_the_same_graph() {
    use blkgraph_graph::job::{BackupOptions, JobOptions, JobStatus, SyncMode};

    let s = setup("drain-job-local", 0);
    let graph = Graph::shared();
    let image = s._dir.0.join("src.raw");
    std::fs::write(&image, vec![0x5a_u8; 32 << 20]).unwrap();
    let add = |arg: String| graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
    add(format!(
        "driver=raw,node-name=src,file.driver=file,file.filename={}",
        image.display()
    ));
    // The export reads 16 MiB/s: the job's 8 reads of 1 MiB in flight
    // take half a second, and it takes 2 s in all.
    add("driver=throttle,node-name=slowsrc,file=src,limits.bps-total=16777216".into());
    add("driver=null-co,node-name=t0,size=32M".into());
    s.server
        .start_export(
            &graph,
            Options::from_arg("id=e0,node-name=slowsrc", None).unwrap(),
        )
        .unwrap();
    add(format!(
        "driver=nbd,node-name=nb,server.type=unix,server.path={},export=slowsrc,read-only=on",
        s.sock.display()
    ));
    let mut tx = graph.drained_transaction();
    let job = tx
        .blockdev_backup(
            &BackupOptions {
                job: JobOptions::new("job0"),
                device: "nb".into(),
                target: "t0".into(),
                sync: SyncMode::Full,
                bitmap: None,
                bitmap_mode: None,
                filter_node_name: None,
            },
            None,
        )
        .unwrap();
    tx.commit().unwrap();
    // Copying: reads go to the export and back.
    let deadline = Instant::now() + Duration::from_secs(10);
    while job.progress().0 == 0 {
        assert!(Instant::now() < deadline, "the backup copied nothing");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(job.status(), JobStatus::Running);
    for _ in 0..3 {
        let g = graph.clone();
        let (done, drained) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(g.drained_transaction());
            let _ = done.send(());
        });
        drained
            .recv_timeout(Duration::from_secs(10))
            .expect("a drained transaction waited for ever for the job");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Over by now, or cancelled.
    let _ = job.cancel(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while graph.job("job0").is_some() {
        assert!(Instant::now() < deadline, "the cancelled job did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
    graph.shut_down();
}
