//! The command line, compatible with qemu-storage-daemon's, plus the
//! vhost-user backend program conventions (`--socket-path`, `--fd`,
//! `--blk-file`, `--read-only`, `--print-capabilities`).

use std::path::PathBuf;

use blkgraph_graph::Options;

/// The usage text.
pub const USAGE: &str = "\
Usage: blkgraph [OPTIONS]

With no options, blkgraph creates ./blkgraph-default.raw (a 1 GiB sparse raw
image) if it is missing, serves it on ./blkgraph-vub.sock and opens a QMP
control socket on ./blkgraph-qmp.sock.

qemu-storage-daemon compatible options:
  --blockdev OPTIONS     add a node: driver=file|raw|null-co,node-name=NAME,...
                         or a JSON object ('{\"driver\": \"file\", ...}')
  --export OPTIONS       start an export: [type=]vhost-user-blk,id=ID,node-name=NODE,
                         addr.type=unix,addr.path=PATH (or addr.type=fd,addr.str=N),
                         writable=on|off,writethrough=on|off,num-queues=N,
                         logical-block-size=BYTES
                         or [type=]nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT]
                         [,writable=on|off][,bitmaps.0=BITMAP] (needs --nbd-server);
                         iothread=ID[,fixed-iothread=on|off] names an iothread object
  --nbd-server OPTIONS   start the NBD server: addr.type=unix,addr.path=PATH or
                         addr.type=inet,addr.host=HOST,addr.port=PORT (or
                         addr.type=fd,addr.str=N)[,max-connections=N]
  --pidfile PATH         write the process id there once everything is ready
  --daemonize            run in the background; the command returns once every
                         socket exists and the pid file is written (exit 0),
                         or with the error on stderr (exit 1)
  --object OPTIONS       add an object: throttle-group,id=ID,limits.iops-total=N,...
                         or iothread,id=ID[,poll-max-ns=NS]; --object help lists
                         the types, --object TYPE,help their properties
  --chardev OPTIONS      socket,id=ID,path=PATH,server=on,wait=off (or fd=N for an
                         inherited listening socket): a socket for --monitor
  --monitor OPTIONS      chardev=ID[,mode=control]: serve QMP on that socket
  --qmp PATH             shorthand: serve QMP on a unix socket at PATH
  --metrics ADDRESS      serve Prometheus/OpenMetrics metrics over HTTP on
                         unix:PATH or tcp:127.0.0.1:PORT (off by default)
  --state-file PATH      keep the objects, nodes, NBD server, exports and dirty
                         bitmaps in PATH, rewritten atomically after every
                         change (QMP commands, jobs that end); if PATH exists
                         at start, build them from it and ignore the command
                         line's --object, --blockdev, --nbd-server and --export
                         (a file that cannot be read is an error)

vhost-user backend program options (docs/interop/vhost-user.rst):
  --socket-path PATH     serve --blk-file on this socket
  --fd N                 serve --blk-file on this inherited listening socket
  --blk-file PATH        the raw image for --socket-path / --fd
  --read-only            export --blk-file read-only
  --print-capabilities   print the backend capabilities as JSON and exit

  -h, --help             print this help and exit
  -V, --version          print the version and exit

Logging: BLKGRAPH_LOG=error|warn|info|debug (default info: every QMP command
that changes state is logged with its client, arguments and result).
systemd: READY=1 and STOPPING=1 go to $NOTIFY_SOCKET when it is set; sockets
passed with $LISTEN_FDS are named by number (fd=3, addr.type=fd,addr.str=3).
";

/// What to do.
#[derive(Debug)]
pub enum Command {
    /// Print the usage.
    Help,
    /// Print the version.
    Version,
    /// Print the vhost-user.json capabilities.
    PrintCapabilities,
    /// `--object help` (`None`) or `--object TYPE,help`.
    ObjectHelp(Option<String>),
    /// Run the daemon.
    Run(Config),
}

/// An option's argument: its options, and the words errors begin with.
#[derive(Debug)]
pub struct Arg {
    /// `--OPTION ARGUMENT`, as given (what QSD prefixes its errors with).
    pub context: String,
    /// The parsed options.
    pub options: Options,
}

/// A QMP control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpSocket {
    /// A unix socket bound at this path.
    Path(PathBuf),
    /// An inherited listening socket, by number (`--chardev socket,fd=N`).
    Fd(String),
}

/// Where the metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsAddress {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP port on a loopback address.
    Tcp(std::net::SocketAddr),
}

/// The daemon's configuration from the command line.
#[derive(Debug, Default)]
pub struct Config {
    /// `--blockdev` options, in order.
    pub blockdevs: Vec<Arg>,
    /// `--export` options, in order.
    pub exports: Vec<Arg>,
    /// `--object` options, in order.
    pub objects: Vec<Arg>,
    /// `--nbd-server` options (a second one is an error when started).
    pub nbd_servers: Vec<Arg>,
    /// QMP control sockets (`--monitor` on a `--chardev`, or `--qmp`).
    pub qmp_sockets: Vec<QmpSocket>,
    /// `--pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// `--metrics`.
    pub metrics: Option<MetricsAddress>,
    /// `--state-file`.
    pub state_file: Option<PathBuf>,
    /// No arguments at all: the embedded default.
    pub embedded_default: bool,
}

impl Arg {
    /// An argument given as JSON (the embedded default, `--blk-file`).
    pub fn json(option: &str, value: serde_json::Value) -> Result<Arg, String> {
        Ok(Arg {
            context: format!("{option} {value}"),
            options: Options::from_json(value).map_err(|e| e.to_string())?,
        })
    }
}

fn value(
    name: &str,
    inline: Option<String>,
    rest: &mut impl Iterator<Item = String>,
) -> Result<String, String> {
    inline
        .or_else(|| rest.next())
        .ok_or_else(|| format!("option '{name}' requires an argument"))
}

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, String> {
    let mut args = args.into_iter().peekable();
    if args.peek().is_none() {
        return Ok(Command::Run(Config {
            embedded_default: true,
            ..Config::default()
        }));
    }
    let mut config = Config::default();
    let (mut socket_path, mut fd, mut blk_file, mut read_only) = (None, None, None, false);
    let mut chardevs: Vec<(String, QmpSocket)> = Vec::new();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        // `--OPTION VALUE: error`, as QSD reports a bad option.
        let mut take = |implied: Option<&str>| -> Result<Arg, String> {
            let v = value(&name, inline.clone(), &mut args)?;
            let context = format!("{name} {v}");
            let options = Options::from_arg(&v, implied).map_err(|e| format!("{context}: {e}"))?;
            Ok(Arg { context, options })
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--print-capabilities" => return Ok(Command::PrintCapabilities),
            "--blockdev" => config.blockdevs.push(take(None)?),
            "--export" => config.exports.push(take(Some("type"))?),
            "--nbd-server" => config.nbd_servers.push(take(None)?),
            "--object" => {
                let v = value(&name, inline, &mut args)?;
                let context = format!("{name} {v}");
                if let Some(help) = object_help(&context) {
                    return Ok(help);
                }
                let options = Options::from_arg(&v, Some("qom-type"))
                    .map_err(|e| format!("{context}: {e}"))?;
                config.objects.push(Arg { context, options });
            }
            "--pidfile" => config.pidfile = Some(value(&name, inline, &mut args)?.into()),
            "--daemonize" => config.daemonize = true,
            "--state-file" => config.state_file = Some(value(&name, inline, &mut args)?.into()),
            "--metrics" => {
                let v = value(&name, inline, &mut args)?;
                config.metrics = Some(metrics_address(&v).map_err(|e| format!("{name} {v}: {e}"))?);
            }
            "--chardev" => {
                let v = value(&name, inline, &mut args)?;
                chardevs.push(chardev(&v).map_err(|e| format!("{name} {v}: {e}"))?);
            }
            "--monitor" => {
                let v = value(&name, inline, &mut args)?;
                let id = monitor(&v).map_err(|e| format!("{name} {v}: {e}"))?;
                let socket = chardevs
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map(|(_, s)| s.clone())
                    .ok_or_else(|| format!("{name} {v}: chardev '{id}' not found"))?;
                config.qmp_sockets.push(socket);
            }
            "--qmp" => config
                .qmp_sockets
                .push(QmpSocket::Path(value(&name, inline, &mut args)?.into())),
            "--socket-path" => socket_path = Some(value(&name, inline, &mut args)?),
            "--fd" => fd = Some(value(&name, inline, &mut args)?),
            "--blk-file" => blk_file = Some(value(&name, inline, &mut args)?),
            "--read-only" => read_only = true,
            _ => return Err(format!("unrecognized option '{arg}'")),
        }
    }
    if socket_path.is_some() || fd.is_some() || blk_file.is_some() {
        let file = blk_file.ok_or("--socket-path and --fd need --blk-file")?;
        let addr = match (socket_path, fd) {
            (Some(p), None) => serde_json::json!({"type": "unix", "path": p}),
            (None, Some(fd)) => serde_json::json!({"type": "fd", "str": fd}),
            _ => return Err("--blk-file needs exactly one of --socket-path and --fd".into()),
        };
        let ro = read_only;
        config.blockdevs.push(Arg::json(
            "--blk-file",
            serde_json::json!({
                "driver": "raw", "node-name": "blk-file", "read-only": ro, "discard": "unmap",
                "file": {"driver": "file", "filename": file}
            }),
        )?);
        config.exports.push(Arg::json(
            "--blk-file",
            serde_json::json!({
                "type": "vhost-user-blk", "id": "blk-file", "node-name": "blk-file",
                "writable": !ro, "addr": addr
            }),
        )?);
    }
    Ok(Command::Run(config))
}

/// `--object help` or `--object TYPE,help` (`context` is `--object ARG`).
fn object_help(context: &str) -> Option<Command> {
    let arg = context.split_once(' ')?.1;
    if arg == "help" {
        return Some(Command::ObjectHelp(None));
    }
    let kind = arg.strip_suffix(",help")?;
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    Some(Command::ObjectHelp(Some(kind.to_string())))
}

/// Parses `--metrics unix:PATH` or `--metrics tcp:HOST:PORT` (a loopback
/// host: the endpoint has no authentication).
fn metrics_address(arg: &str) -> Result<MetricsAddress, String> {
    if let Some(path) = arg.strip_prefix("unix:") {
        return Ok(MetricsAddress::Unix(path.into()));
    }
    if let Some(addr) = arg.strip_prefix("tcp:") {
        let addr: std::net::SocketAddr = addr
            .parse()
            .map_err(|_| format!("'{addr}' is not an address:port"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{} is not a loopback address", addr.ip()));
        }
        return Ok(MetricsAddress::Tcp(addr));
    }
    Err("expected unix:PATH or tcp:127.0.0.1:PORT".into())
}

/// Parses `--chardev socket,id=ID,path=PATH,server=on,wait=off` (or
/// `fd=N` instead of `path`); returns the id and the socket.
fn chardev(arg: &str) -> Result<(String, QmpSocket), String> {
    let mut map =
        blkgraph_graph::options::parse_keyval(arg, Some("backend")).map_err(|e| e.to_string())?;
    let mut take = |k: &str| match map.remove(k) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let backend = take("backend");
    if backend.as_deref() != Some("socket") {
        return Err(format!(
            "only 'socket' chardevs are supported, got '{}'",
            backend.unwrap_or_default()
        ));
    }
    let id = take("id").ok_or("Parameter 'id' is missing")?;
    let socket = match (take("path"), take("fd")) {
        (Some(path), None) => QmpSocket::Path(path.into()),
        (None, Some(fd)) => QmpSocket::Fd(fd),
        _ => return Err("exactly one of 'path' and 'fd' is needed (a unix socket)".into()),
    };
    if !matches!(
        take("server").as_deref(),
        Some("on") | Some("true") | Some("yes")
    ) {
        return Err("the monitor socket needs server=on".into());
    }
    if let Some(wait) = take("wait") {
        if !matches!(wait.as_str(), "off" | "false" | "no") {
            return Err("wait=on is not supported".into());
        }
    }
    if let Some(k) = map.keys().next() {
        return Err(format!("Parameter '{k}' is unexpected"));
    }
    Ok((id, socket))
}

/// Parses `--monitor chardev=ID[,mode=control][,pretty=off]`; returns the chardev id.
fn monitor(arg: &str) -> Result<String, String> {
    let mut map =
        blkgraph_graph::options::parse_keyval(arg, Some("chardev")).map_err(|e| e.to_string())?;
    let mut take = |k: &str| match map.remove(k) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let id = take("chardev").ok_or("Parameter 'chardev' is missing")?;
    if take("mode").is_some_and(|m| m != "control") {
        return Err("only mode=control (QMP) is supported".into());
    }
    if take("pretty").is_some_and(|p| !matches!(p.as_str(), "off" | "false" | "no")) {
        return Err("pretty=on is not supported".into());
    }
    if let Some(k) = map.keys().next() {
        return Err(format!("Parameter '{k}' is unexpected"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn qsd_style() {
        let cmd = parse(args(&[
            "--blockdev",
            "driver=file,node-name=f0,filename=disk.raw",
            "--blockdev={\"driver\":\"raw\",\"node-name\":\"d\",\"file\":\"f0\"}",
            "--export",
            "type=vhost-user-blk,id=vub0,node-name=d,addr.type=unix,addr.path=/tmp/s",
            "--pidfile",
            "/tmp/p",
        ]))
        .unwrap();
        let Command::Run(c) = cmd else { panic!() };
        assert_eq!(c.blockdevs.len(), 2);
        assert_eq!(c.exports.len(), 1);
        assert_eq!(c.pidfile.as_deref(), Some(std::path::Path::new("/tmp/p")));
        assert!(!c.embedded_default);
        let Command::Run(c) = parse(args(&[
            "--nbd-server",
            "addr.type=unix,addr.path=/tmp/nbd.sock",
            "--export",
            "nbd,id=nbd0,node-name=d,name=disk,writable=on",
            "--daemonize",
            "--metrics",
            "tcp:127.0.0.1:9000",
            "--state-file=/var/lib/blkgraph/state.json",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.state_file.as_deref(),
            Some(std::path::Path::new("/var/lib/blkgraph/state.json"))
        );
        assert_eq!(c.nbd_servers.len(), 1);
        assert_eq!(c.exports[0].options.map["type"], "nbd");
        assert!(c.daemonize);
        assert_eq!(
            c.metrics,
            Some(MetricsAddress::Tcp("127.0.0.1:9000".parse().unwrap()))
        );
        assert!(parse(args(&["--metrics", "tcp:0.0.0.0:9000"])).is_err());
        assert!(matches!(
            parse(args(&["--object", "help"])),
            Ok(Command::ObjectHelp(None))
        ));
        assert!(matches!(
            parse(args(&["--object", "iothread,help"])),
            Ok(Command::ObjectHelp(Some(t))) if t == "iothread"
        ));
    }

    #[test]
    fn monitors_and_objects() {
        let Command::Run(c) = parse(args(&[
            "--chardev",
            "socket,id=m0,path=/tmp/q.sock,server=on,wait=off",
            "--monitor",
            "chardev=m0",
            "--qmp",
            "/tmp/q2.sock",
            "--object",
            "throttle-group,id=tg0,limits.iops-total=100",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.qmp_sockets.len(), 2);
        assert_eq!(c.objects.len(), 1);
        assert!(parse(args(&["--monitor", "chardev=nope"]))
            .unwrap_err()
            .contains("not found"));
        let Command::Run(c) = parse(args(&[
            "--chardev",
            "socket,id=m0,fd=3,server=on,wait=off",
            "--monitor",
            "chardev=m0",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.qmp_sockets, vec![QmpSocket::Fd("3".into())]);
        assert!(parse(args(&["--chardev", "stdio,id=m0"])).is_err());
    }

    #[test]
    fn defaults_and_errors() {
        assert!(matches!(
            parse(vec![]),
            Ok(Command::Run(Config {
                embedded_default: true,
                ..
            }))
        ));
        assert!(matches!(parse(args(&["--help"])), Ok(Command::Help)));
        assert_eq!(
            parse(args(&["--bogus"])).unwrap_err(),
            "unrecognized option '--bogus'"
        );
        assert!(parse(args(&["--object", "throttle-group,id=t,foo"]))
            .unwrap_err()
            .starts_with("--object throttle-group,id=t,foo: "));
        assert!(parse(args(&["--blockdev"]))
            .unwrap_err()
            .contains("requires an argument"));
        assert!(parse(args(&["--socket-path", "/s"])).is_err());
        let Command::Run(c) = parse(args(&[
            "--socket-path=/s",
            "--blk-file",
            "x.raw",
            "--read-only",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.exports.len(), 1);
    }
}
