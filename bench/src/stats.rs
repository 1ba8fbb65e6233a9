//! CPU-time sampling and the JSON report.

use crate::histogram::Histogram;
use serde::Serialize;
use std::fs;

/// Parses user + system CPU seconds from the contents of a `/proc/PID/stat` file.
///
/// The second field (the command name) is in parentheses and may contain spaces and
/// parentheses itself, so fields are counted from the last `)`. Children's times are not
/// included.
pub fn parse_proc_stat_cpu(stat: &str, ticks_per_s: f64) -> Result<f64, String> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("malformed stat: no ')'")?;
    // After the command: state(3) ppid(4) ... utime(14) stime(15); rest starts at field 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .ok_or_else(|| format!("malformed stat: no field {n}"))?
            .parse::<u64>()
            .map_err(|_| format!("malformed stat: field {n} is not a number"))
    };
    let ticks = field(14)? + field(15)?;
    Ok(ticks as f64 / ticks_per_s)
}

/// Clock ticks per second used by `/proc/PID/stat`.
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds (user + system, without children) consumed so far by process `pid`.
pub fn process_cpu_s(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_proc_stat_cpu(&text, clock_ticks())
}

/// Context switches (voluntary and involuntary) counted in the contents of
/// a `/proc/PID/task/TID/status` file.
pub fn parse_status_ctxsw(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| {
            l.starts_with("voluntary_ctxt_switches:")
                || l.starts_with("nonvoluntary_ctxt_switches:")
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Context switches of all threads of process `pid` so far (threads that
/// have exited are not counted).
pub fn process_ctxsw(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let tasks = fs::read_dir(&dir).map_err(|e| format!("cannot read {dir}: {e}"))?;
    Ok(tasks
        .filter_map(|t| fs::read_to_string(t.ok()?.path().join("status")).ok())
        .map(|s| parse_status_ctxsw(&s))
        .sum())
}

/// CPU seconds (user + system, all threads) consumed so far by this process.
pub fn self_cpu_s() -> f64 {
    // SAFETY: rusage is a plain C struct for which all-zero bytes are valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Latency summary in microseconds.
#[derive(Debug, Serialize)]
pub struct LatencyUs {
    /// Mean latency.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest latency seen.
    pub max: f64,
}

impl LatencyUs {
    /// Summarises a histogram of nanosecond samples.
    pub fn from_ns_histogram(h: &Histogram) -> Self {
        let us = |ns: u64| round3(ns as f64 / 1000.0);
        LatencyUs {
            mean: round3(h.mean() / 1000.0),
            p50: us(h.percentile(50.0)),
            p90: us(h.percentile(90.0)),
            p99: us(h.percentile(99.0)),
            p99_9: us(h.percentile(99.9)),
            max: us(h.max()),
        }
    }
}

/// The JSON object printed at the end of a run.
#[derive(Debug, Serialize)]
pub struct Report {
    /// I/O pattern name.
    pub rw: &'static str,
    /// Request size in bytes.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Number of queues (threads).
    pub queues: usize,
    /// The fixed load asked for, requests per second; `null` when unlimited.
    pub rate_iops: Option<u32>,
    /// Measured wall-clock seconds.
    pub runtime_s: f64,
    /// Requests completed within the measured window.
    pub ios: u64,
    /// Of which reads.
    pub read_ios: u64,
    /// Of which writes.
    pub write_ios: u64,
    /// `ios / runtime_s`.
    pub iops: f64,
    /// Bytes transferred per second.
    pub bw_bytes_per_s: f64,
    /// Submit-to-completion latency.
    pub lat_us: LatencyUs,
    /// Backend CPU seconds over the window (`null` without `--pid`).
    pub backend_cpu_s: Option<f64>,
    /// Backend CPU microseconds per request (`null` without `--pid`).
    pub backend_cpu_per_io_us: Option<f64>,
    /// The backend's context switches (all its threads, voluntary and
    /// not) per request (`null` without `--pid`): its wake-ups, which cost
    /// CPU on the backend's cores and hold requests up.
    pub backend_ctxsw_per_io: Option<f64>,
    /// This client's CPU seconds over the window (all threads).
    pub client_cpu_s: f64,
    /// Client CPU microseconds per request.
    pub client_cpu_per_io_us: f64,
    /// Device capacity in bytes.
    pub capacity: u64,
    /// Size of the accessed region in bytes.
    pub size: u64,
}

/// Rounds to 3 decimals for readable JSON.
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_both_kinds_of_context_switches() {
        let status = "Name:\tvub-queue0\nState:\tS (sleeping)\n\
                      voluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_status_ctxsw(status), 127);
        assert_eq!(parse_status_ctxsw("Name:\tx\n"), 0);
    }

    #[test]
    fn parses_stat_with_odd_command_name() {
        // Fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime ...
        let stat = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 9 20 0 3 0";
        assert_eq!(parse_proc_stat_cpu(stat, 100.0).unwrap(), 3.0);
        assert!(parse_proc_stat_cpu("garbage", 100.0).is_err());
        assert!(parse_proc_stat_cpu("1 (x) S 1 2", 100.0).is_err());
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        // Burn a little CPU so the value can be non-zero; it must at least parse.
        let t = process_cpu_s(pid).unwrap();
        assert!(t >= 0.0);
        assert!(self_cpu_s() >= 0.0);
        assert!(process_cpu_s(u32::MAX).is_err());
    }
}
