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
  --export OPTIONS       start an export: type=vhost-user-blk,id=ID,node-name=NODE,
                         addr.type=unix,addr.path=PATH (or addr.type=fd,addr.str=N),
                         writable=on|off,writethrough=on|off,num-queues=N,
                         logical-block-size=BYTES
                         or type=nbd,id=ID,node-name=NODE[,name=NAME][,description=TEXT]
                         [,writable=on|off][,bitmaps.0=BITMAP] (needs --nbd-server)
  --nbd-server OPTIONS   start the NBD server: addr.type=unix,addr.path=PATH or
                         addr.type=inet,addr.host=HOST,addr.port=PORT (or
                         addr.type=fd,addr.str=N)[,max-connections=N]
  --pidfile PATH         write the process id there once everything is ready
  --object OPTIONS       add an object: throttle-group,id=ID,limits.iops-total=N,...
  --chardev OPTIONS      socket,id=ID,path=PATH,server=on,wait=off: a socket for --monitor
  --monitor OPTIONS      chardev=ID[,mode=control]: serve QMP on that socket
  --qmp PATH             shorthand: serve QMP on a unix socket at PATH

vhost-user backend program options (docs/interop/vhost-user.rst):
  --socket-path PATH     serve --blk-file on this socket
  --fd N                 serve --blk-file on this inherited listening socket
  --blk-file PATH        the raw image for --socket-path / --fd
  --read-only            export --blk-file read-only
  --print-capabilities   print the backend capabilities as JSON and exit

  -h, --help             print this help and exit
  -V, --version          print the version and exit

Logging: BLKGRAPH_LOG=error|warn|info|debug (default warn).
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
    /// Run the daemon.
    Run(Config),
}

/// The daemon's configuration from the command line.
#[derive(Debug, Default)]
pub struct Config {
    /// `--blockdev` options, in order.
    pub blockdevs: Vec<Options>,
    /// `--export` options, in order.
    pub exports: Vec<Options>,
    /// `--object` options, in order.
    pub objects: Vec<Options>,
    /// `--nbd-server` options (a second one is an error when started).
    pub nbd_servers: Vec<Options>,
    /// QMP control sockets (`--monitor` on a `--chardev`, or `--qmp`).
    pub qmp_sockets: Vec<PathBuf>,
    /// `--pidfile`.
    pub pidfile: Option<PathBuf>,
    /// No arguments at all: the embedded default.
    pub embedded_default: bool,
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
    let mut chardevs: Vec<(String, PathBuf)> = Vec::new();
    let opt = |s: String| Options::from_arg(&s, None).map_err(|e| e.to_string());
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--print-capabilities" => return Ok(Command::PrintCapabilities),
            "--blockdev" => config
                .blockdevs
                .push(opt(value(&name, inline, &mut args)?)?),
            "--export" => config.exports.push(opt(value(&name, inline, &mut args)?)?),
            "--nbd-server" => config
                .nbd_servers
                .push(opt(value(&name, inline, &mut args)?)?),
            "--pidfile" => config.pidfile = Some(value(&name, inline, &mut args)?.into()),
            "--object" => config.objects.push(
                Options::from_arg(&value(&name, inline, &mut args)?, Some("qom-type"))
                    .map_err(|e| e.to_string())?,
            ),
            "--chardev" => chardevs.push(chardev(&value(&name, inline, &mut args)?)?),
            "--monitor" => {
                let id = monitor(&value(&name, inline, &mut args)?)?;
                let path = chardevs
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map(|(_, p)| p.clone())
                    .ok_or_else(|| {
                        format!("chardev '{id}' not found (give --chardev before --monitor)")
                    })?;
                config.qmp_sockets.push(path);
            }
            "--qmp" => config
                .qmp_sockets
                .push(value(&name, inline, &mut args)?.into()),
            "--socket-path" => socket_path = Some(value(&name, inline, &mut args)?),
            "--fd" => fd = Some(value(&name, inline, &mut args)?),
            "--blk-file" => blk_file = Some(value(&name, inline, &mut args)?),
            "--read-only" => read_only = true,
            _ => return Err(format!("unknown option '{arg}' (see --help)")),
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
        config.blockdevs.push(
            Options::from_json(serde_json::json!({
                "driver": "raw", "node-name": "blk-file", "read-only": ro, "discard": "unmap",
                "file": {"driver": "file", "filename": file}
            }))
            .map_err(|e| e.to_string())?,
        );
        config.exports.push(
            Options::from_json(serde_json::json!({
                "type": "vhost-user-blk", "id": "blk-file", "node-name": "blk-file",
                "writable": !ro, "addr": addr
            }))
            .map_err(|e| e.to_string())?,
        );
    }
    Ok(Command::Run(config))
}

/// Parses `--chardev socket,id=ID,path=PATH,server=on,wait=off`; returns
/// the id and the path.
fn chardev(arg: &str) -> Result<(String, PathBuf), String> {
    let mut map =
        blkgraph_graph::options::parse_keyval(arg, Some("backend")).map_err(|e| e.to_string())?;
    let mut take = |k: &str| match map.remove(k) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let backend = take("backend");
    if backend.as_deref() != Some("socket") {
        return Err(format!(
            "--chardev: only 'socket' chardevs are supported, got '{}'",
            backend.unwrap_or_default()
        ));
    }
    let id = take("id").ok_or("--chardev: Parameter 'id' is missing")?;
    let path = take("path")
        .ok_or("--chardev: Parameter 'path' is missing (blkgraph serves unix sockets)")?;
    if !matches!(
        take("server").as_deref(),
        Some("on") | Some("true") | Some("yes")
    ) {
        return Err("--chardev: the monitor socket needs server=on".into());
    }
    if let Some(wait) = take("wait") {
        if !matches!(wait.as_str(), "off" | "false" | "no") {
            return Err("--chardev: wait=on is not supported".into());
        }
    }
    if let Some(k) = map.keys().next() {
        return Err(format!("--chardev: Parameter '{k}' is unexpected"));
    }
    Ok((id, PathBuf::from(path)))
}

/// Parses `--monitor chardev=ID[,mode=control][,pretty=off]`; returns the chardev id.
fn monitor(arg: &str) -> Result<String, String> {
    let mut map =
        blkgraph_graph::options::parse_keyval(arg, Some("chardev")).map_err(|e| e.to_string())?;
    let mut take = |k: &str| match map.remove(k) {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    };
    let id = take("chardev").ok_or("--monitor: Parameter 'chardev' is missing")?;
    if take("mode").is_some_and(|m| m != "control") {
        return Err("--monitor: only mode=control (QMP) is supported".into());
    }
    if take("pretty").is_some_and(|p| !matches!(p.as_str(), "off" | "false" | "no")) {
        return Err("--monitor: pretty=on is not supported".into());
    }
    if let Some(k) = map.keys().next() {
        return Err(format!("--monitor: Parameter '{k}' is unexpected"));
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
            "type=nbd,id=nbd0,node-name=d,name=disk,writable=on",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.nbd_servers.len(), 1);
        assert_eq!(c.exports.len(), 1);
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
        assert!(parse(args(&["--bogus"])).unwrap_err().contains("--bogus"));
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
