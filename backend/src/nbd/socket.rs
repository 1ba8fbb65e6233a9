//! Where the NBD server listens (QAPI's SocketAddress, legacy and flat
//! forms) and the sockets of its connections.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use blkgraph_graph::options::Syntax;
use blkgraph_graph::Options;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::listen_fd::{Family, ListenFd};

/// A listening address.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ListenAddress {
    /// A unix socket path.
    Unix {
        /// The path.
        path: PathBuf,
    },
    /// A TCP address; the server listens exactly there.
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
        /// Accepted for compatibility: names are resolved either way.
        #[serde(default)]
        numeric: Option<bool>,
        /// Whether IPv4 addresses may be used.
        #[serde(default)]
        ipv4: Option<bool>,
        /// Whether IPv6 addresses may be used.
        #[serde(default)]
        ipv6: Option<bool>,
        /// Whether accepted connections use TCP keep-alive.
        #[serde(default, rename = "keep-alive")]
        keep_alive: Option<bool>,
    },
    /// A listening socket passed by descriptor: by the name given with
    /// `getfd` over QMP, by its number on the command line (see
    /// [`crate::listen_fd`]).
    Fd {
        /// The descriptor's name or number.
        str: String,
    },
}

impl ListenAddress {
    /// Parses the flat form (`--nbd-server addr.type=unix,addr.path=P`,
    /// `{"type": "unix", "path": P}`); `prefix` names the key in errors.
    pub fn from_flat(
        map: Map<String, Value>,
        syntax: Syntax,
        prefix: &str,
    ) -> Result<Self, String> {
        Options { map, syntax }
            .parse(prefix)
            .map_err(|e| e.to_string())
    }

    /// Parses QMP's legacy form (`{"type": "unix", "data": {"path": P}}`).
    pub fn from_legacy(value: Value) -> Result<Self, String> {
        let Value::Object(mut map) = value else {
            return Err("Invalid parameter type for 'addr', expected: object".into());
        };
        let kind = match map.remove("type") {
            Some(Value::String(t)) => t,
            Some(_) => {
                return Err("Invalid parameter type for 'addr.type', expected: string".into())
            }
            None => return Err("Parameter 'addr.type' is missing".into()),
        };
        let mut data = match map.remove("data") {
            Some(Value::Object(d)) => d,
            Some(_) => {
                return Err("Invalid parameter type for 'addr.data', expected: object".into())
            }
            None => return Err("Parameter 'addr.data' is missing".into()),
        };
        if let Some(k) = map.keys().next() {
            return Err(format!("Parameter 'addr.{k}' is unexpected"));
        }
        if !matches!(kind.as_str(), "unix" | "inet" | "fd") {
            return Err(format!(
                "Parameter 'addr.type' does not accept value '{kind}'"
            ));
        }
        data.insert("type".into(), Value::String(kind));
        Self::from_flat(data, Syntax::Json, "addr.data")
    }

    /// The unix socket path to remove when the server stops, if any.
    pub fn socket_path(&self) -> Option<&PathBuf> {
        match self {
            ListenAddress::Unix { path } => Some(path),
            _ => None,
        }
    }
}

/// A listening socket.
pub enum Listener {
    /// A unix socket.
    Unix(UnixListener),
    /// A TCP socket.
    Tcp {
        /// The socket.
        listener: TcpListener,
        /// Whether accepted connections use keep-alive.
        keep_alive: bool,
    },
}

impl Listener {
    /// Starts listening at `addr`; an `fd` address takes `fd`, its socket,
    /// already taken and checked by [`crate::listen_fd`].
    pub fn bind(addr: &ListenAddress, fd: Option<ListenFd>) -> Result<Listener, String> {
        match addr {
            ListenAddress::Unix { path } => {
                if path.as_os_str().is_empty() {
                    return Err("Parameter 'path' must not be empty".into());
                }
                // A stale socket from an earlier run is replaced, as QEMU
                // does; a live one or another file is left alone.
                blkgraph_ctl::bind_unix_socket(path)
                    .map(Listener::Unix)
                    .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))
            }
            ListenAddress::Inet {
                host,
                port,
                ipv4,
                ipv6,
                keep_alive,
                ..
            } => {
                let addrs: Vec<SocketAddr> = (host.as_str(), parse_port(port)?)
                    .to_socket_addrs()
                    .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?
                    .filter(|a| match a {
                        SocketAddr::V4(_) => ipv4.unwrap_or(true),
                        SocketAddr::V6(_) => ipv6.unwrap_or(true),
                    })
                    .collect();
                let mut last = format!("no usable address for {host}:{port}");
                for a in addrs {
                    match TcpListener::bind(a) {
                        Ok(listener) => {
                            return Ok(Listener::Tcp {
                                listener,
                                keep_alive: keep_alive.unwrap_or(false),
                            })
                        }
                        Err(e) => last = format!("Failed to bind socket to {a}: {e}"),
                    }
                }
                Err(last)
            }
            ListenAddress::Fd { str } => {
                let fd = fd.ok_or_else(|| {
                    format!("File descriptor '{str}' was not taken for the NBD server")
                })?;
                Ok(match fd.family() {
                    Family::Unix => Listener::Unix(UnixListener::from(OwnedFd::from(fd))),
                    Family::Inet => Listener::Tcp {
                        listener: TcpListener::from(OwnedFd::from(fd)),
                        keep_alive: false,
                    },
                })
            }
        }
    }

    /// Accepts the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp {
                listener,
                keep_alive,
            } => {
                let (s, _) = listener.accept()?;
                s.set_nodelay(true)?;
                if *keep_alive {
                    set_keep_alive(s.as_raw_fd())?;
                }
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// The local TCP address, for an inet listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp { listener, .. } => listener.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp { listener, .. } => listener.as_raw_fd(),
        }
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    match port {
        "nbd" => Ok(10809),
        p => p
            .parse()
            .map_err(|_| format!("Parameter 'port' expects a port number, got '{p}'")),
    }
}

fn set_keep_alive(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a valid int option value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A connection's socket.
pub enum Stream {
    /// Over a unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Sets the timeout of blocking reads and writes (handshake only).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// Switches blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// Shuts both directions down; blocked reads and writes return.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn legacy_and_flat_forms() {
        let a = ListenAddress::from_legacy(json!({"type": "unix", "data": {"path": "/x.sock"}}));
        assert_eq!(
            a,
            Ok(ListenAddress::Unix {
                path: "/x.sock".into()
            })
        );
        let a = ListenAddress::from_legacy(
            json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}),
        )
        .unwrap();
        assert!(matches!(a, ListenAddress::Inet { ref port, .. } if port == "10809"));
        let e = ListenAddress::from_legacy(json!({"type": "vsock", "data": {}})).unwrap_err();
        assert_eq!(e, "Parameter 'addr.type' does not accept value 'vsock'");
        let e =
            ListenAddress::from_legacy(json!({"type": "unix", "data": {"path": "/x", "bogus": 1}}))
                .unwrap_err();
        assert_eq!(e, "Parameter 'addr.data.bogus' is unexpected");
        let e = ListenAddress::from_legacy(json!({"type": "unix", "path": "/x"})).unwrap_err();
        assert_eq!(e, "Parameter 'addr.data' is missing");
        let map = blkgraph_graph::options::parse_keyval("type=unix,path=/y", None).unwrap();
        let a = ListenAddress::from_flat(map, Syntax::Keyval, "addr").unwrap();
        assert_eq!(a.socket_path(), Some(&PathBuf::from("/y")));
    }

    #[test]
    fn inet_listens_where_told() {
        let addr = ListenAddress::Inet {
            host: "127.0.0.1".into(),
            port: "0".into(),
            numeric: None,
            ipv4: None,
            ipv6: None,
            keep_alive: None,
        };
        let l = Listener::bind(&addr, None).unwrap();
        let local = l.local_addr().unwrap();
        assert_eq!(local.ip().to_string(), "127.0.0.1");
        assert_ne!(local.port(), 0);
        assert!(parse_port("x").is_err());
    }
}
