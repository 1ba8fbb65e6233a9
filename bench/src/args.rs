//! Command-line parsing for `blkgraph-bench`.
//!
//! Hand-written (no argument-parsing crate): every option takes one value, given either as
//! `--name VALUE` or `--name=VALUE`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The I/O pattern of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RwMode {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads (each queue has its own cursor).
    Read,
    /// Sequential writes (each queue has its own cursor).
    Write,
    /// Random mix of reads and writes, see [`Args::rwmixread`].
    RandRw,
}

impl RwMode {
    /// Parses the fio-style name (`randread`, `randwrite`, `read`, `write`, `randrw`).
    pub fn parse(s: &str) -> Option<RwMode> {
        Some(match s {
            "randread" => RwMode::RandRead,
            "randwrite" => RwMode::RandWrite,
            "read" => RwMode::Read,
            "write" => RwMode::Write,
            "randrw" => RwMode::RandRw,
            _ => return None,
        })
    }

    /// The fio-style name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            RwMode::RandRead => "randread",
            RwMode::RandWrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::RandRw => "randrw",
        }
    }

    /// Whether offsets are chosen at random (as opposed to sequentially).
    pub fn is_random(self) -> bool {
        matches!(self, RwMode::RandRead | RwMode::RandWrite | RwMode::RandRw)
    }
}

impl fmt::Display for RwMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Parsed options of one benchmark run.
#[derive(Clone, Debug, PartialEq)]
pub struct Args {
    /// Path of the vhost-user-blk UNIX socket.
    pub socket: PathBuf,
    /// I/O pattern.
    pub rw: RwMode,
    /// Block size of every request in bytes (a multiple of 512).
    pub bs: u64,
    /// Requests kept in flight per queue.
    pub iodepth: usize,
    /// Number of virtqueues, each driven by its own thread.
    pub queues: usize,
    /// Measured run time.
    pub runtime: Duration,
    /// Warm-up time before measuring starts (not counted in any result).
    pub ramp: Duration,
    /// Size of the region of the device that is accessed; `None` means the whole device.
    pub size: Option<u64>,
    /// Percentage of reads for [`RwMode::RandRw`].
    pub rwmixread: u32,
    /// Pid of the backend process whose CPU time is reported.
    pub pid: Option<u32>,
    /// Seed of the offset generator.
    pub seed: u64,
    /// virtqueue size negotiated with the backend; `None` uses libblkio's default (256), or the
    /// next power of two of `3 * iodepth` when that does not fit.
    pub queue_size: Option<u32>,
    /// Requests per second over all queues (each queue takes its share); `None` runs as fast as
    /// the backend completes.
    pub rate_iops: Option<u32>,
}

/// Text printed for `--help`.
pub const USAGE: &str = "\
usage: blkgraph-bench --socket PATH [options]

Drives a vhost-user-blk backend through the blkio crate and prints one JSON object.

options:
  --socket PATH       vhost-user-blk UNIX socket (required)
  --rw MODE           randread | randwrite | read | write | randrw   [randread]
  --bs BYTES          request size, multiple of 512; suffixes k, m, g  [4k]
  --iodepth N         requests in flight per queue                     [1]
  --queues N          virtqueues, one thread each                      [1]
  --runtime SECONDS   measured duration (may be fractional)            [10]
  --ramp SECONDS      unmeasured warm-up before the run                [0]
  --size BYTES        accessed region from offset 0; suffixes k, m, g  [device capacity]
  --rwmixread PCT     share of reads for randrw                        [50]
  --pid PID           backend pid: report its CPU time from /proc/PID/stat
  --seed N            seed of the offset generator                     [1]
  --queue-size N      virtqueue size (power of two)      [256, or 3*iodepth rounded up]
  --rate-iops N       fixed load: N requests per second over all queues  [as fast as possible]
  -h, --help          print this text
";

/// Outcome of parsing: either options to run with, or a request for the usage text.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// Run the benchmark with these options.
    Run(Args),
    /// `--help` was given.
    Help,
}

/// Parses a byte count such as `4096`, `4k`, `64K`, `1m`, `2G`, `4KiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1u64 << 20),
        Some('g') => (&body[..body.len() - 1], 1u64 << 30),
        Some('t') => (&body[..body.len() - 1], 1u64 << 40),
        _ => (body, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid size '{s}'"));
    }
    let n: u64 = digits.parse().map_err(|_| format!("invalid size '{s}'"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Parses a duration in seconds, e.g. `10` or `0.5`.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of seconds '{s}'"))?;
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        return Err(format!("invalid number of seconds '{s}'"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_num<T: std::str::FromStr>(name: &str, s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid value '{s}' for --{name}"))
}

/// Parses the arguments that follow the program name.
pub fn parse<I, S>(argv: I) -> Result<Parsed, String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut socket = None;
    let mut args = Args {
        socket: PathBuf::new(),
        rw: RwMode::RandRead,
        bs: 4096,
        iodepth: 1,
        queues: 1,
        runtime: Duration::from_secs(10),
        ramp: Duration::ZERO,
        size: None,
        rwmixread: 50,
        pid: None,
        seed: 1,
        queue_size: None,
        rate_iops: None,
    };

    let argv: Vec<String> = argv.into_iter().map(|s| s.as_ref().to_owned()).collect();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Parsed::Help);
        }
        let Some(opt) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument '{arg}'"));
        };
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("option --{opt} needs a value"))?;
                (opt.to_owned(), v)
            }
        };
        match name.as_str() {
            "socket" => {
                if value.is_empty() {
                    return Err("--socket must not be empty".into());
                }
                socket = Some(PathBuf::from(value));
            }
            "rw" => {
                args.rw = RwMode::parse(&value).ok_or_else(|| {
                    format!(
                    "invalid --rw '{value}' (expected randread, randwrite, read, write or randrw)"
                )
                })?
            }
            "bs" => args.bs = parse_size(&value)?,
            "iodepth" => args.iodepth = parse_num(&name, &value)?,
            "queues" => args.queues = parse_num(&name, &value)?,
            "runtime" => args.runtime = parse_seconds(&value)?,
            "ramp" => args.ramp = parse_seconds(&value)?,
            "size" => args.size = Some(parse_size(&value)?),
            "rwmixread" => args.rwmixread = parse_num(&name, &value)?,
            "pid" => args.pid = Some(parse_num(&name, &value)?),
            "seed" => args.seed = parse_num(&name, &value)?,
            "queue-size" => args.queue_size = Some(parse_num(&name, &value)?),
            "rate-iops" => args.rate_iops = Some(parse_num(&name, &value)?),
            _ => return Err(format!("unknown option --{name}")),
        }
    }

    args.socket = socket.ok_or("--socket is required")?;
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        return Err(format!(
            "--bs {} is not a non-zero multiple of 512",
            args.bs
        ));
    }
    if args.bs > i32::MAX as u64 {
        return Err(format!("--bs {} is too large", args.bs));
    }
    if args.iodepth == 0 || args.iodepth > 32768 {
        return Err(format!(
            "--iodepth {} is out of range 1..=32768",
            args.iodepth
        ));
    }
    if args.queues == 0 || args.queues > 1024 {
        return Err(format!("--queues {} is out of range 1..=1024", args.queues));
    }
    if args.runtime.is_zero() {
        return Err("--runtime must be greater than 0".into());
    }
    if let Some(size) = args.size {
        if size < args.bs {
            return Err(format!("--size {size} is smaller than --bs {}", args.bs));
        }
    }
    if args.rwmixread > 100 {
        return Err(format!("--rwmixread {} is above 100", args.rwmixread));
    }
    if args.rate_iops == Some(0) {
        return Err("--rate-iops must be greater than 0".into());
    }
    if let Some(qs) = args.queue_size {
        if !qs.is_power_of_two() || qs > 32768 {
            return Err(format!("--queue-size {qs} is not a power of two <= 32768"));
        }
    }
    Ok(Parsed::Run(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str]) -> Args {
        match parse(argv).unwrap() {
            Parsed::Run(a) => a,
            Parsed::Help => panic!("unexpected help"),
        }
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        for bad in ["", "k", "4x", "-4k", "4.5k", "1 k", "99999999999999999999g"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn defaults() {
        let a = run(&["--socket", "/tmp/s"]);
        assert_eq!(a.socket, PathBuf::from("/tmp/s"));
        assert_eq!(a.rw, RwMode::RandRead);
        assert_eq!(a.bs, 4096);
        assert_eq!(a.iodepth, 1);
        assert_eq!(a.queues, 1);
        assert_eq!(a.runtime, Duration::from_secs(10));
        assert_eq!(a.ramp, Duration::ZERO);
        assert_eq!(a.size, None);
        assert_eq!(a.pid, None);
        assert_eq!(a.rate_iops, None);
    }

    #[test]
    fn all_options_both_syntaxes() {
        let a = run(&[
            "--socket=/s",
            "--rw",
            "randrw",
            "--bs=64k",
            "--iodepth",
            "32",
            "--queues=2",
            "--runtime",
            "2.5",
            "--ramp=1",
            "--size",
            "1g",
            "--rwmixread=70",
            "--pid",
            "1234",
            "--seed=7",
            "--queue-size",
            "1024",
            "--rate-iops=5000",
        ]);
        assert_eq!(a.rw, RwMode::RandRw);
        assert_eq!(a.bs, 65536);
        assert_eq!(a.iodepth, 32);
        assert_eq!(a.queues, 2);
        assert_eq!(a.runtime, Duration::from_millis(2500));
        assert_eq!(a.ramp, Duration::from_secs(1));
        assert_eq!(a.size, Some(1 << 30));
        assert_eq!(a.rwmixread, 70);
        assert_eq!(a.pid, Some(1234));
        assert_eq!(a.seed, 7);
        assert_eq!(a.queue_size, Some(1024));
        assert_eq!(a.rate_iops, Some(5000));
    }

    #[test]
    fn rw_modes() {
        for m in ["randread", "randwrite", "read", "write", "randrw"] {
            assert_eq!(run(&["--socket", "s", "--rw", m]).rw.name(), m);
        }
        assert!(parse(["--socket", "s", "--rw", "trim"]).is_err());
    }

    #[test]
    fn help() {
        assert_eq!(parse(["--help"]).unwrap(), Parsed::Help);
        assert_eq!(parse(["--socket", "s", "-h"]).unwrap(), Parsed::Help);
    }

    #[test]
    fn rejects_bad_input() {
        let bad: &[&[&str]] = &[
            &[],                                       // no socket
            &["--socket"],                             // missing value
            &["--socket", ""],                         // empty socket
            &["--socket", "s", "--bs", "1000"],        // not a multiple of 512
            &["--socket", "s", "--bs", "0"],           // zero
            &["--socket", "s", "--iodepth", "0"],      // zero depth
            &["--socket", "s", "--iodepth", "x"],      // not a number
            &["--socket", "s", "--queues", "0"],       // zero queues
            &["--socket", "s", "--runtime", "0"],      // zero runtime
            &["--socket", "s", "--runtime", "-1"],     // negative
            &["--socket", "s", "--size", "1k"],        // smaller than bs
            &["--socket", "s", "--rwmixread", "101"],  // above 100
            &["--socket", "s", "--pid", "-3"],         // negative pid
            &["--socket", "s", "--queue-size", "100"], // not a power of two
            &["--socket", "s", "--rate-iops", "0"],    // zero rate
            &["--socket", "s", "--frobnicate", "1"],   // unknown option
            &["--socket", "s", "extra"],               // positional
        ];
        for argv in bad {
            assert!(parse(argv.iter()).is_err(), "{argv:?} accepted");
        }
    }
}
