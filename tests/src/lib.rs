//! Shared helpers for blkgraph's end-to-end tests.
//!
//! They start a vhost-user-blk daemon with blkgraph's qemu-storage-daemon-compatible command
//! line, wait until it is ready, and kill it when the test ends, together with temporary
//! directories, image files and deterministic data patterns for exact verification.
//!
//! Which daemon runs is chosen by environment variables:
//! - `BLKGRAPH_TEST_DAEMON=qsd` runs qemu-storage-daemon (`QSD_BIN` overrides its path);
//!   anything else, or unset, runs blkgraph.
//! - `BLKGRAPH_BIN` overrides the path of the blkgraph binary; by default it is
//!   `target/<profile>/blkgraph`, found next to the test executable (see [`blkgraph_binary`]).
//! - `BLKGRAPH_TEST_KEEP=1` keeps temporary directories (images, sockets, daemon logs) for
//!   inspection.

#![warn(missing_docs)]

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long [`Daemon::start`] waits for the pidfile and the socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`Daemon`]'s drop waits after SIGTERM before sending SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The vhost-user-blk daemon under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DaemonKind {
    /// blkgraph itself.
    Blkgraph,
    /// qemu-storage-daemon, the reference implementation of the same command line.
    Qsd,
}

impl DaemonKind {
    /// The daemon selected by `BLKGRAPH_TEST_DAEMON` (`qsd` → [`DaemonKind::Qsd`], otherwise
    /// [`DaemonKind::Blkgraph`]).
    pub fn from_env() -> DaemonKind {
        match std::env::var("BLKGRAPH_TEST_DAEMON") {
            Ok(v) if v.eq_ignore_ascii_case("qsd") || v == "qemu-storage-daemon" => DaemonKind::Qsd,
            _ => DaemonKind::Blkgraph,
        }
    }

    /// Path of the binary to run; panics with a hint if blkgraph's binary is missing.
    pub fn binary(self) -> PathBuf {
        match self {
            DaemonKind::Blkgraph => {
                let p = blkgraph_binary();
                assert!(
                    p.is_file(),
                    "blkgraph binary not found at {}: build it first (cargo build for the same \
                     profile), set BLKGRAPH_BIN, or run against qemu-storage-daemon with \
                     BLKGRAPH_TEST_DAEMON=qsd",
                    p.display()
                );
                p
            }
            DaemonKind::Qsd => std::env::var_os("QSD_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("qemu-storage-daemon")),
        }
    }
}

/// The repository root (the parent of the `tests` crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Location of the blkgraph binary: `BLKGRAPH_BIN` if set, else `blkgraph` in the grandparent
/// directory of the running test executable (test binaries live in `target/<profile>/deps/`,
/// the daemon in `target/<profile>/`).
pub fn blkgraph_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BLKGRAPH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("blkgraph"))
        .unwrap_or_else(|| repo_root().join("target/debug/blkgraph"))
}

/// A temporary directory removed (recursively) on drop, unless `BLKGRAPH_TEST_KEEP` is set.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates a fresh directory under `$TMPDIR` (or /tmp) whose name starts with `prefix`.
    pub fn new(prefix: &str) -> io::Result<TempDir> {
        TempDir::new_in(&std::env::temp_dir(), prefix)
    }

    /// Creates a fresh directory under `base` whose name starts with `prefix`.
    pub fn new_in(base: &Path, prefix: &str) -> io::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let name = format!(
                "{prefix}-{}-{}-{nanos:08x}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            let path = base.join(name);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("BLKGRAPH_TEST_KEEP").is_some() {
            eprintln!("keeping {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Byte `offset` of the deterministic test pattern `seed`.
///
/// Every aligned 8-byte word is a hash of its word index and the seed, so any byte can be
/// recomputed from its absolute offset alone, and different seeds give unrelated data.
/// No seed gives long runs of zeroes.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    pattern_word(seed, offset / 8).to_le_bytes()[(offset % 8) as usize]
}

fn pattern_word(seed: u64, word: u64) -> u64 {
    // splitmix64 of (seed, word index)
    let mut z = word
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed.wrapping_mul(0xd1b5_4a32_d192_ed03))
        .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with the pattern `seed` as it appears at absolute device offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64, seed: u64) {
    let mut i = 0usize;
    // Unaligned head, byte by byte.
    while i < buf.len() && !(offset + i as u64).is_multiple_of(8) {
        buf[i] = pattern_byte(seed, offset + i as u64);
        i += 1;
    }
    // Whole words.
    while i + 8 <= buf.len() {
        let w = pattern_word(seed, (offset + i as u64) / 8);
        buf[i..i + 8].copy_from_slice(&w.to_le_bytes());
        i += 8;
    }
    // Tail.
    while i < buf.len() {
        buf[i] = pattern_byte(seed, offset + i as u64);
        i += 1;
    }
}

/// Returns `Err` describing the first differing byte if `actual` differs from `expected`;
/// `base` is the device offset of `actual[0]`, used in the message.
pub fn compare_bytes(actual: &[u8], expected: &[u8], base: u64) -> Result<(), String> {
    assert_eq!(
        actual.len(),
        expected.len(),
        "compare_bytes: lengths differ"
    );
    if actual == expected {
        return Ok(());
    }
    let first = actual
        .iter()
        .zip(expected)
        .position(|(a, e)| a != e)
        .expect("slices differ");
    let wrong = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
    Err(format!(
        "data mismatch at offset {} (+{first} into a {}-byte buffer at {base}): got {:#04x}, \
         expected {:#04x}; {wrong} byte(s) differ",
        base + first as u64,
        actual.len(),
        actual[first],
        expected[first]
    ))
}

/// Checks that `buf` holds pattern `seed` for device offset `offset`.
pub fn check_pattern(buf: &[u8], offset: u64, seed: u64) -> Result<(), String> {
    let mut expected = vec![0u8; buf.len()];
    fill_pattern(&mut expected, offset, seed);
    compare_bytes(buf, &expected, offset)
}

/// Checks that `buf` (read from device offset `offset`) is all zeroes.
pub fn check_zeroes(buf: &[u8], offset: u64) -> Result<(), String> {
    match buf.iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(format!(
            "expected zeroes, found {:#04x} at offset {} ({} non-zero byte(s) in {} bytes at {offset})",
            buf[i],
            offset + i as u64,
            buf.iter().filter(|&&b| b != 0).count(),
            buf.len()
        )),
    }
}

/// Creates a sparse image file of `size` bytes (all zeroes, nothing allocated).
pub fn create_sparse_image(path: &Path, size: u64) -> io::Result<()> {
    let f = File::create(path)?;
    f.set_len(size)
}

/// Creates an image file of `size` bytes filled with pattern `seed` (see [`pattern_byte`])
/// and synced to disk.
pub fn create_pattern_image(path: &Path, size: u64, seed: u64) -> io::Result<()> {
    let mut f = File::create(path)?;
    let chunk = 1 << 20;
    let mut buf = vec![0u8; chunk];
    let mut off = 0u64;
    while off < size {
        let n = chunk.min((size - off) as usize);
        fill_pattern(&mut buf[..n], off, seed);
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_all()
}

/// Reads `len` bytes at `offset` directly from a file on the host (bypassing the daemon).
pub fn read_file_range(path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let f = File::open(path)?;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Writes `data` at `offset` directly into a file on the host.
pub fn write_file_range(path: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(data, offset)
}

/// Page-cache state of a file range, in pages, from Linux `cachestat(2)` (kernel 6.5+).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStat {
    /// Pages in the page cache.
    pub cache: u64,
    /// Dirty pages (written, not yet written back).
    pub dirty: u64,
    /// Pages under writeback.
    pub writeback: u64,
    /// Pages evicted from the cache.
    pub evicted: u64,
    /// Evicted pages that were recently used.
    pub recently_evicted: u64,
}

/// Returns the page-cache state of `[offset, offset+len)` of the file at `path`
/// (`len == 0` means to the end of the file). Fails with `ErrorKind::Unsupported` where
/// `cachestat(2)` does not exist.
pub fn cachestat(path: &Path, offset: u64, len: u64) -> io::Result<CacheStat> {
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    {
        use std::os::fd::AsRawFd;
        const SYS_CACHESTAT: libc::c_long = 451;
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        let f = File::open(path)?;
        let range = Range { off: offset, len };
        let mut cs = CacheStat::default();
        // SAFETY: CacheStat is five u64s, the layout of struct cachestat; the kernel writes
        // only into it and reads only the range.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut cs as *mut CacheStat,
                0u32,
            )
        };
        if r == 0 {
            Ok(cs)
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSYS) {
                Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "cachestat(2) not available",
                ))
            } else {
                Err(e)
            }
        }
    }
    #[cfg(not(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    )))]
    {
        let _ = (path, offset, len);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "cachestat(2) not available",
        ))
    }
}

/// Whether `path` is on tmpfs (whose pages never become clean, so `cachestat` dirtiness
/// says nothing about flushes there).
pub fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is a plain C struct for which all-zero bytes are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes only into the struct we pass; `c` is a valid C string.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
    let is_tmpfs = st.f_type as i64 == libc::TMPFS_MAGIC as i64;
    r == 0 && is_tmpfs
}

/// Options of a vhost-user-blk export started with the QSD-compatible command line
/// (`--blockdev driver=file` + `--blockdev driver=raw` (or another format) +
/// `--export type=vhost-user-blk`, and optionally an NBD server and export of the same node).
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Image file.
    pub image: PathBuf,
    /// The format node's driver: `raw` (the default) or `qcow2`.
    pub format: String,
    /// More `key=value` options appended to the format node's `--blockdev`
    /// (e.g. `cache-size=65536` for qcow2).
    pub format_extra: String,
    /// With a socket path: `--nbd-server` listening there and an NBD export `disk0` of the
    /// same node, writable as the vhost-user export is.
    pub nbd_socket: Option<PathBuf>,
    /// vhost-user UNIX socket path the daemon listens on.
    pub socket: PathBuf,
    /// `writable=on|off` on the export.
    pub writable: bool,
    /// `num-queues=N` on the export.
    pub num_queues: u32,
    /// `cache.direct=on|off` on the file node.
    pub cache_direct: bool,
    /// `aio=` on the file node (`io_uring`, `threads`, `native`).
    pub aio: String,
    /// Adds `discard=unmap` to both block nodes (QEMU's default, `ignore`, drops discards).
    pub discard_unmap: bool,
    /// `logical-block-size=` on the export.
    pub logical_block_size: u32,
    /// More `key=value` options appended to `--export` (e.g. `x-poll-us=0`).
    pub export_extra: String,
    /// More `key=value` options appended to the file node's `--blockdev`
    /// (e.g. `cache.no-flush=on`).
    pub file_extra: String,
}

impl ExportOptions {
    /// Defaults of the test suite: writable, 1 queue, page cache, io_uring, no discard, 512.
    pub fn new(image: &Path, socket: &Path) -> ExportOptions {
        ExportOptions {
            image: image.to_path_buf(),
            format: "raw".into(),
            format_extra: String::new(),
            nbd_socket: None,
            socket: socket.to_path_buf(),
            writable: true,
            num_queues: 1,
            cache_direct: false,
            aio: "io_uring".into(),
            discard_unmap: false,
            logical_block_size: 512,
            export_extra: String::new(),
            file_extra: String::new(),
        }
    }

    /// The `--blockdev ... --export ...` arguments (without `--pidfile`).
    pub fn args(&self) -> Vec<OsString> {
        let onoff = |b: bool| if b { "on" } else { "off" };
        let discard = if self.discard_unmap {
            ",discard=unmap"
        } else {
            ""
        };
        let mut file = OsString::from("driver=file,node-name=f0,filename=");
        file.push(escape_qemu_opt(self.image.as_os_str()));
        file.push(format!(
            ",cache.direct={},aio={}{discard}",
            onoff(self.cache_direct),
            self.aio
        ));
        if !self.file_extra.is_empty() {
            file.push(format!(",{}", self.file_extra));
        }
        let mut format = format!("driver={},node-name=disk0,file=f0{discard}", self.format);
        if !self.format_extra.is_empty() {
            format.push_str(&format!(",{}", self.format_extra));
        }
        let mut export =
            OsString::from("type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path=");
        export.push(escape_qemu_opt(self.socket.as_os_str()));
        export.push(format!(
            ",writable={},num-queues={},logical-block-size={}",
            onoff(self.writable),
            self.num_queues,
            self.logical_block_size
        ));
        if !self.export_extra.is_empty() {
            export.push(format!(",{}", self.export_extra));
        }
        let mut args = vec![
            "--blockdev".into(),
            file,
            "--blockdev".into(),
            format.into(),
            "--export".into(),
            export,
        ];
        if let Some(nbd) = &self.nbd_socket {
            let mut server = OsString::from("addr.type=unix,addr.path=");
            server.push(escape_qemu_opt(nbd.as_os_str()));
            args.extend([
                "--nbd-server".into(),
                server,
                "--export".into(),
                format!(
                    "type=nbd,id=nbd0,node-name=disk0,name=disk0,writable={}",
                    onoff(self.writable)
                )
                .into(),
            ]);
        }
        args
    }

    /// The NBD URI of the export `disk0` (see [`ExportOptions::nbd_socket`]).
    pub fn nbd_uri(&self) -> Option<String> {
        let sock = self.nbd_socket.as_ref()?;
        Some(format!("nbd+unix:///disk0?socket={}", sock.display()))
    }
}

/// Escapes a value for QEMU's key=value option syntax (a comma is written as `,,`).
pub fn escape_qemu_opt(v: &std::ffi::OsStr) -> OsString {
    let s = v.to_string_lossy();
    OsString::from(s.replace(',', ",,"))
}

/// A running daemon, killed (SIGTERM, then SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    kind: DaemonKind,
    pidfile: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `kind` with `args` plus `--pidfile <dir>/daemon.pid`, its stdout and stderr going
    /// to `<dir>/daemon.log`, and waits until the pidfile names the child and `socket` is a
    /// UNIX socket (qemu-storage-daemon writes its pidfile once its exports are set up).
    pub fn start(
        kind: DaemonKind,
        args: &[OsString],
        dir: &Path,
        socket: &Path,
    ) -> Result<Daemon, String> {
        let pidfile = dir.join("daemon.pid");
        let log = dir.join("daemon.log");
        let _ = fs::remove_file(&pidfile);
        let logf = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let logf2 = logf.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        let bin = kind.binary();
        let child = Command::new(&bin)
            .args(args)
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(logf2)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let mut d = Daemon {
            child: Some(child),
            kind,
            pidfile,
            socket: socket.to_path_buf(),
            log,
        };
        d.wait_ready(READY_TIMEOUT)?;
        Ok(d)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let pid = self.pid();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .map_err(|e| format!("wait: {e}"))?
            {
                self.child = None;
                return Err(format!(
                    "{:?} exited before becoming ready ({status}); log:\n{}",
                    self.kind,
                    self.log_contents()
                ));
            }
            let pid_ok = fs::read_to_string(&self.pidfile)
                .map(|s| s.trim() == pid.to_string())
                .unwrap_or(false);
            let sock_ok = fs::metadata(&self.socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false);
            if pid_ok && sock_ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{:?} not ready after {timeout:?} (pidfile ok: {pid_ok}, socket ok: {sock_ok}); log:\n{}",
                    self.kind,
                    self.log_contents()
                ));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Process id of the daemon.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Which daemon this is.
    pub fn kind(&self) -> DaemonKind {
        self.kind
    }

    /// The socket the daemon listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Everything the daemon printed so far (stdout and stderr).
    pub fn log_contents(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<no log: {e}>"))
    }

    /// Returns the exit status if the daemon has exited (without waiting).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends SIGTERM, waits up to [`STOP_TIMEOUT`], then SIGKILL; returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Kills the daemon with SIGKILL, giving it no chance to flush or clean up, and reaps it;
    /// returns its exit status. Its socket file and pidfile stay behind, as after a crash.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        // Child::kill sends SIGKILL.
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a new test image contains.
#[derive(Clone, Copy, Debug)]
pub enum ImageInit {
    /// A sparse file: reads as zeroes, nothing allocated.
    Sparse,
    /// Filled with [`fill_pattern`] of this seed.
    Pattern(u64),
}

/// A temporary directory holding an image, a socket and a daemon exporting the image.
///
/// Fields drop in declaration order: the daemon is stopped before the directory is removed.
#[derive(Debug)]
pub struct TestExport {
    /// The daemon.
    pub daemon: Daemon,
    /// Export options the daemon was started with.
    pub options: ExportOptions,
    /// Image size in bytes.
    pub size: u64,
    /// The directory (image, socket, pidfile, log).
    pub dir: TempDir,
}

impl TestExport {
    /// Creates an image of `size` bytes initialised as `init` in a new temporary directory,
    /// lets `configure` adjust the default [`ExportOptions`], and starts the daemon selected by
    /// [`DaemonKind::from_env`]. Panics with the daemon's log if it fails to start.
    pub fn start(
        size: u64,
        init: ImageInit,
        configure: impl FnOnce(&mut ExportOptions),
    ) -> TestExport {
        let dir = TempDir::new("blkgraph-test").expect("create temp dir");
        let image = dir.path().join("disk.raw");
        let socket = dir.path().join("vhost-user-blk.sock");
        match init {
            ImageInit::Sparse => create_sparse_image(&image, size),
            ImageInit::Pattern(seed) => create_pattern_image(&image, size, seed),
        }
        .expect("create image");
        let mut options = ExportOptions::new(&image, &socket);
        configure(&mut options);
        let kind = DaemonKind::from_env();
        let daemon = Daemon::start(kind, &options.args(), dir.path(), &options.socket)
            .unwrap_or_else(|e| panic!("starting the daemon failed: {e}"));
        TestExport {
            daemon,
            options,
            size,
            dir,
        }
    }

    /// The image file.
    pub fn image(&self) -> &Path {
        &self.options.image
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.options.socket
    }

    /// The socket path as `&str` (libblkio takes a string).
    pub fn socket_str(&self) -> &str {
        self.socket().to_str().expect("UTF-8 temp path")
    }

    /// Allocated 512-byte blocks of the image file (`st_blocks`).
    pub fn image_blocks(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(self.image()).expect("stat image").blocks()
    }

    /// Size of the image file in bytes.
    pub fn image_len(&self) -> u64 {
        fs::metadata(self.image()).expect("stat image").len()
    }

    /// Panics with the daemon's log if the daemon has exited.
    pub fn assert_daemon_alive(&mut self) {
        if let Some(st) = self.daemon.try_exit_status() {
            panic!(
                "daemon exited unexpectedly ({st}); log:\n{}",
                self.daemon.log_contents()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent_and_consistent() {
        let mut a = vec![0u8; 4096 + 13];
        fill_pattern(&mut a, 1000 * 512 + 3, 7);
        for (i, &b) in a.iter().enumerate() {
            assert_eq!(b, pattern_byte(7, 1000 * 512 + 3 + i as u64));
        }
        check_pattern(&a, 1000 * 512 + 3, 7).unwrap();
        assert!(check_pattern(&a, 1000 * 512 + 3, 8).is_err());
        assert!(check_pattern(&a, 1000 * 512 + 11, 7).is_err());
        let mut b = a.clone();
        b[100] ^= 1;
        let e = check_pattern(&b, 1000 * 512 + 3, 7).unwrap_err();
        assert!(
            e.contains(&format!("offset {}", 1000 * 512 + 3 + 100)),
            "{e}"
        );
        assert!(check_zeroes(&[0; 64], 0).is_ok());
        assert!(check_zeroes(&a, 0).is_err());
    }

    #[test]
    fn export_args_match_qsd_syntax() {
        let mut o = ExportOptions::new(Path::new("/t/a,b.raw"), Path::new("/t/s.sock"));
        o.num_queues = 2;
        o.discard_unmap = true;
        let args: Vec<String> = o
            .args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--blockdev",
                "driver=file,node-name=f0,filename=/t/a,,b.raw,cache.direct=off,aio=io_uring,discard=unmap",
                "--blockdev",
                "driver=raw,node-name=disk0,file=f0,discard=unmap",
                "--export",
                "type=vhost-user-blk,id=vub0,node-name=disk0,addr.type=unix,addr.path=/t/s.sock,writable=on,num-queues=2,logical-block-size=512",
            ]
        );
        o.file_extra = "cache.no-flush=on".into();
        let file = o.args()[1].clone().into_string().unwrap();
        assert!(file.ends_with(",discard=unmap,cache.no-flush=on"), "{file}");
        o.format = "qcow2".into();
        o.format_extra = "cache-size=65536".into();
        o.nbd_socket = Some("/t/nbd.sock".into());
        o.writable = false;
        let args: Vec<String> = o
            .args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            args[3],
            "driver=qcow2,node-name=disk0,file=f0,discard=unmap,cache-size=65536"
        );
        assert_eq!(
            args[6..],
            [
                "--nbd-server",
                "addr.type=unix,addr.path=/t/nbd.sock",
                "--export",
                "type=nbd,id=nbd0,node-name=disk0,name=disk0,writable=off",
            ]
        );
        assert_eq!(o.nbd_uri().unwrap(), "nbd+unix:///disk0?socket=/t/nbd.sock");
    }

    #[test]
    fn temp_dirs_are_unique_and_removed() {
        let a = TempDir::new("blkgraph-selftest").unwrap();
        let b = TempDir::new("blkgraph-selftest").unwrap();
        assert_ne!(a.path(), b.path());
        let p = a.path().to_path_buf();
        fs::write(p.join("f"), b"x").unwrap();
        drop(a);
        if std::env::var_os("BLKGRAPH_TEST_KEEP").is_none() {
            assert!(!p.exists());
        }
    }
}
