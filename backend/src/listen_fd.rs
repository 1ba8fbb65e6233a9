//! Listening sockets handed over by file descriptor (`addr.type=fd`), for
//! vhost-user-blk exports and the NBD server.
//!
//! As in QEMU, `addr.str` is a name over QMP: the name a client gave the
//! descriptor it sent with `getfd` on the same connection (numbers are never
//! names there, so a client cannot reach the daemon's own descriptors). On
//! the command line it is the number of an inherited descriptor (socket
//! activation, `--fd N`), parsed strictly and claimed once. Either way the
//! descriptor must be a listening stream socket (for vhost-user, a unix
//! one), checked before anything adopts it, and is made blocking, as the
//! accept threads expect.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use blkgraph_ctl::{NamedFds, QmpError};
use serde_json::{Map, Value};

use crate::nbd::ListenAddress;

/// What a listening socket is for, which decides the families it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Use {
    /// A vhost-user-blk export or a QMP monitor: a unix socket.
    Unix,
    /// The NBD server: a unix, IPv4 or IPv6 socket.
    Nbd,
}

/// The address family of a checked listening socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `AF_UNIX`.
    Unix,
    /// `AF_INET` or `AF_INET6`.
    Inet,
}

/// A listening stream socket taken over by descriptor, checked.
#[derive(Debug)]
pub struct ListenFd {
    fd: OwnedFd,
    family: Family,
}

impl ListenFd {
    /// The socket's address family.
    pub fn family(&self) -> Family {
        self.family
    }
}

impl From<ListenFd> for OwnedFd {
    fn from(listen: ListenFd) -> OwnedFd {
        listen.fd
    }
}

/// Why a descriptor cannot be used; `str` is the `addr.str` it was given as.
#[derive(Debug)]
pub enum Error {
    /// Over QMP: no descriptor has this name on the connection.
    NotNamed(QmpError),
    /// On the command line: not a descriptor number.
    InvalidNumber(String),
    /// On the command line: the number was already given for another socket.
    AlreadyClaimed(String),
    /// On the command line: no descriptor has this number.
    NotOpen(String),
    /// Not a socket.
    NotSocket(String),
    /// A socket, but not a stream socket.
    NotStream(String),
    /// A socket that does not listen (unbound, bound only, or connected).
    NotListening(String),
    /// A vhost-user-blk export needs a unix socket.
    NotUnix(String),
    /// A socket family no server here can use.
    UnsupportedFamily {
        /// The descriptor.
        str: String,
        /// Its `SO_DOMAIN`.
        family: i32,
    },
    /// A system call on the descriptor failed.
    Io {
        /// The descriptor.
        str: String,
        /// What was done.
        what: &'static str,
        /// The failure.
        err: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotNamed(e) => f.write_str(&e.desc),
            Error::InvalidNumber(s) => write!(f, "Invalid file descriptor number '{s}'"),
            Error::AlreadyClaimed(s) => write!(f, "File descriptor '{s}' is already in use"),
            Error::NotOpen(s) => write!(f, "File descriptor '{s}' is not open"),
            Error::NotSocket(s) => write!(f, "File descriptor '{s}' is not a socket"),
            Error::NotStream(s) => write!(f, "File descriptor '{s}' is not a stream socket"),
            Error::NotListening(s) => {
                write!(f, "File descriptor '{s}' is not a listening socket")
            }
            Error::NotUnix(s) => write!(f, "File descriptor '{s}' is not a unix socket"),
            Error::UnsupportedFamily { str, family } => write!(
                f,
                "File descriptor '{str}' is a socket of unsupported family {family}"
            ),
            Error::Io { str, what, err } => {
                write!(f, "File descriptor '{str}': cannot {what}: {err}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// The inherited descriptors the command line names by number.
///
/// Each number may be claimed once, so no two servers own one descriptor.
#[derive(Debug)]
pub struct Inherited {
    claimed: BTreeSet<RawFd>,
}

impl Inherited {
    /// Claims of command-line descriptor numbers.
    ///
    /// # Safety
    ///
    /// Only one `Inherited` may exist, and it must be created, and every
    /// number claimed, before the process opens descriptors of its own or
    /// closes inherited ones: an open descriptor with a number given on the
    /// command line is then one the process inherited, and nothing else in
    /// it uses that descriptor.
    pub unsafe fn new() -> Self {
        Inherited {
            claimed: BTreeSet::new(),
        }
    }

    /// Takes the inherited descriptor `str` (a number) and checks it.
    fn claim(&mut self, str: &str, usage: Use) -> Result<ListenFd, Error> {
        let fd = parse_number(str).ok_or_else(|| Error::InvalidNumber(str.into()))?;
        if self.claimed.contains(&fd) {
            return Err(Error::AlreadyClaimed(str.into()));
        }
        // SAFETY: F_GETFD only looks the number up in the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(Error::NotOpen(str.into()));
        }
        self.claimed.insert(fd);
        // SAFETY: `fd` is open, and by the contract of `Inherited::new` it
        // was inherited and nothing else in the process uses it; it was
        // never claimed before, so this is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        check(fd, str, usage)
    }
}

/// Where `addr.str` is looked up.
pub enum Source<'a> {
    /// Over QMP: a name given with `getfd` on the client's connection.
    Qmp(&'a mut NamedFds),
    /// On the command line: an inherited descriptor's number.
    CommandLine(&'a mut Inherited),
}

impl Source<'_> {
    /// Takes the descriptor `str` names and checks it for `usage`.
    fn take(self, str: &str, usage: Use) -> Result<ListenFd, Error> {
        match self {
            Source::Qmp(fds) => check(fds.take(str).map_err(Error::NotNamed)?, str, usage),
            Source::CommandLine(inherited) => inherited.claim(str, usage),
        }
    }
}

/// The listening socket of `--export` or block-export-add options whose
/// `addr` is `{"type": "fd", "str": STR}`, taken from `source` and checked;
/// `None` for other options (whose errors are the export's to report).
pub fn for_export(
    options: &Map<String, Value>,
    source: Source<'_>,
) -> Result<Option<ListenFd>, Error> {
    if options.get("type").and_then(Value::as_str) != Some("vhost-user-blk") {
        return Ok(None);
    }
    let Some(addr) = options.get("addr").and_then(Value::as_object) else {
        return Ok(None);
    };
    if addr.get("type").and_then(Value::as_str) != Some("fd") {
        return Ok(None);
    }
    match addr.get("str").and_then(Value::as_str) {
        Some(str) => source.take(str, Use::Unix).map(Some),
        None => Ok(None),
    }
}

/// The listening unix socket of a QMP monitor (`--chardev socket,fd=N`).
pub fn for_monitor(str: &str, source: Source<'_>) -> Result<ListenFd, Error> {
    source.take(str, Use::Unix)
}

/// systemd socket activation: when `LISTEN_PID` is this process, the
/// `LISTEN_FDS` descriptors from 3 on are its to claim by number (as
/// `fd=3`, `addr.str=4`, ...); the variables are removed so that nothing
/// the daemon starts takes them for its own. Returns how many there are.
pub fn socket_activation() -> usize {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if !ours {
        return 0;
    }
    log::info!("socket activation: descriptors 3 to {}", 2 + count);
    count
}

/// The listening socket of an NBD server address of type `fd`, taken from
/// `source` and checked; `None` for other addresses.
pub fn for_nbd_server(addr: &ListenAddress, source: Source<'_>) -> Result<Option<ListenFd>, Error> {
    match addr {
        ListenAddress::Fd { str } => source.take(str, Use::Nbd).map(Some),
        _ => Ok(None),
    }
}

/// A descriptor number as QEMU's `qemu_parse_fd` takes it: decimal digits
/// only (no sign, no spaces), within `int`.
fn parse_number(str: &str) -> Option<RawFd> {
    if str.is_empty() || !str.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    str.parse().ok()
}

/// An `int` socket option of `fd`.
fn socket_option(fd: BorrowedFd<'_>, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, an int
    // that lives across the call; `fd` is open while borrowed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Clears `O_NONBLOCK` (which a descriptor keeps when it is passed), so
/// that `accept` blocks.
fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL only read and set the status flags of an
    // open descriptor.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || flags & libc::O_NONBLOCK == 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that `fd` is a listening stream socket of a family `usage`
/// allows, and makes it blocking. On failure `fd` is closed, as QEMU does.
fn check(fd: OwnedFd, str: &str, usage: Use) -> Result<ListenFd, Error> {
    let io = |what| {
        move |err| Error::Io {
            str: str.into(),
            what,
            err,
        }
    };
    let domain = match socket_option(fd.as_fd(), libc::SO_DOMAIN) {
        Ok(domain) => domain,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return Err(Error::NotSocket(str.into()))
        }
        Err(e) => return Err(io("query the socket")(e)),
    };
    if socket_option(fd.as_fd(), libc::SO_TYPE).map_err(io("query the socket type"))?
        != libc::SOCK_STREAM
    {
        return Err(Error::NotStream(str.into()));
    }
    if socket_option(fd.as_fd(), libc::SO_ACCEPTCONN).map_err(io("query the socket state"))? == 0 {
        return Err(Error::NotListening(str.into()));
    }
    let family = match domain {
        libc::AF_UNIX => Family::Unix,
        libc::AF_INET | libc::AF_INET6 => Family::Inet,
        family => {
            return Err(Error::UnsupportedFamily {
                str: str.into(),
                family,
            })
        }
    };
    if usage == Use::Unix && family != Family::Unix {
        return Err(Error::NotUnix(str.into()));
    }
    set_blocking(fd.as_fd()).map_err(io("make it blocking"))?;
    Ok(ListenFd { fd, family })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::TcpListener;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::io::IntoRawFd;
    use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A listening unix socket with an abstract address (no file).
    fn listener() -> (UnixListener, SocketAddr) {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "blkgraph-listen-fd-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name).unwrap();
        (UnixListener::bind_addr(&addr).unwrap(), addr)
    }

    fn named(fd: impl Into<OwnedFd>) -> NamedFds {
        let mut fds = NamedFds::new();
        fds.insert("l", fd.into()).unwrap();
        fds
    }

    fn qmp(fd: impl Into<OwnedFd>, usage: Use) -> Result<ListenFd, String> {
        Source::Qmp(&mut named(fd))
            .take("l", usage)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn numbers_are_strict() {
        assert_eq!(parse_number("0"), Some(0));
        assert_eq!(parse_number("007"), Some(7));
        assert_eq!(parse_number("2147483647"), Some(i32::MAX));
        for bad in ["", "-1", "+3", " 3", "3 ", "3x", "0x3", "2147483648", "fd"] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn listening_sockets_pass_and_become_blocking() {
        let (l, addr) = listener();
        l.set_nonblocking(true).unwrap();
        let fd = qmp(l, Use::Unix).unwrap();
        assert_eq!(fd.family(), Family::Unix);
        let l = UnixListener::from(OwnedFd::from(fd));
        // SAFETY: F_GETFL only reads the status flags.
        let flags = unsafe { libc::fcntl(l.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        let _client = UnixStream::connect_addr(&addr).unwrap();
        l.accept().unwrap();

        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp2 = tcp.try_clone().unwrap();
        assert_eq!(qmp(tcp, Use::Nbd).unwrap().family(), Family::Inet);
        assert_eq!(
            qmp(tcp2, Use::Unix).unwrap_err(),
            "File descriptor 'l' is not a unix socket"
        );
    }

    #[test]
    fn other_descriptors_are_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(
            qmp(file, Use::Nbd).unwrap_err(),
            "File descriptor 'l' is not a socket"
        );
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(
            qmp(a, Use::Unix).unwrap_err(),
            "File descriptor 'l' is not a listening socket"
        );
        // SAFETY: socket() creates a new descriptor, owned right away.
        let unbound =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)) };
        assert_eq!(
            qmp(unbound, Use::Unix).unwrap_err(),
            "File descriptor 'l' is not a listening socket"
        );
        // SAFETY: as above.
        let dgram =
            unsafe { OwnedFd::from_raw_fd(libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0)) };
        assert_eq!(
            qmp(dgram, Use::Nbd).unwrap_err(),
            "File descriptor 'l' is not a stream socket"
        );
    }

    #[test]
    fn qmp_takes_names_only() {
        let (l, _) = listener();
        let raw = l.as_raw_fd().to_string();
        let mut fds = named(l);
        for str in [raw.as_str(), "-1", "3", "nope"] {
            let e = Source::Qmp(&mut fds).take(str, Use::Unix).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("File descriptor named '{str}' has not been found")
            );
        }
        Source::Qmp(&mut fds).take("l", Use::Unix).unwrap();
    }

    #[test]
    fn command_line_numbers_are_claimed_once() {
        // SAFETY: the test claims only descriptors it gave up (into_raw_fd)
        // and numbers that cannot be open.
        let mut inherited = unsafe { Inherited::new() };
        let (l, _) = listener();
        let n = l.into_raw_fd().to_string();
        let claim = |inherited: &mut Inherited, s: &str| {
            inherited.claim(s, Use::Unix).map_err(|e| e.to_string())
        };
        claim(&mut inherited, &n).unwrap();
        assert_eq!(
            claim(&mut inherited, &n).unwrap_err(),
            format!("File descriptor '{n}' is already in use")
        );
        assert_eq!(
            claim(&mut inherited, "-1").unwrap_err(),
            "Invalid file descriptor number '-1'"
        );
        assert_eq!(
            claim(&mut inherited, "x").unwrap_err(),
            "Invalid file descriptor number 'x'"
        );
        assert_eq!(
            claim(&mut inherited, "2147483647").unwrap_err(),
            "File descriptor '2147483647' is not open"
        );
    }

    #[test]
    fn which_options_name_a_descriptor() {
        let opts = |v: Value| v.as_object().cloned().unwrap();
        let mut none = NamedFds::new();
        for v in [
            json!({"type": "vhost-user-blk", "addr": {"type": "unix", "path": "/x"}}),
            json!({"type": "nbd", "id": "e"}),
            json!({"type": "vhost-user-blk", "addr": {"type": "fd", "str": 3}}),
            json!({"type": "vhost-user-blk", "addr": "fd"}),
            json!({"addr": {"type": "fd", "str": "l"}}),
        ] {
            assert!(for_export(&opts(v), Source::Qmp(&mut none))
                .unwrap()
                .is_none());
        }
        let (l, _) = listener();
        let mut fds = named(l);
        let v = json!({"type": "vhost-user-blk", "addr": {"type": "fd", "str": "l"}});
        assert!(for_export(&opts(v.clone()), Source::Qmp(&mut fds))
            .unwrap()
            .is_some());
        assert_eq!(
            for_export(&opts(v), Source::Qmp(&mut fds))
                .unwrap_err()
                .to_string(),
            "File descriptor named 'l' has not been found"
        );
        let unix = ListenAddress::Unix { path: "/x".into() };
        assert!(for_nbd_server(&unix, Source::Qmp(&mut fds))
            .unwrap()
            .is_none());
    }
}
