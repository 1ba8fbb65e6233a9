//! `blkgraph-ctl top`: a live view of the exports and nodes, from two
//! `query-blockstats` samples at a time: IOPS, bandwidth and latency
//! (mean, and percentiles from the latency histograms), and the same
//! figures for `graph --stats`.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{json, Map, Value};

/// Histogram boundaries `top` sets on exports that have none, in
/// nanoseconds: 1-2-5 steps from 10 µs to 5 s.
pub const BOUNDARIES_NS: [u64; 18] = [
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
];

/// One entry's counters at one instant.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Operations, bytes, time (ns) per kind: read, write, flush.
    ops: [u64; 3],
    bytes: [u64; 3],
    time_ns: [u64; 3],
    /// Histogram bins per kind (read, write), with their boundaries.
    bins: [Option<(Vec<u64>, Vec<u64>)>; 2],
}

const KINDS: [&str; 3] = ["rd", "wr", "flush"];

impl Counters {
    /// From a BlockStats `stats` member.
    pub fn from_stats(stats: &Value) -> Counters {
        let n = |key: String| stats.get(&key).and_then(Value::as_u64).unwrap_or(0);
        let mut c = Counters::default();
        for (i, k) in KINDS.iter().enumerate() {
            c.ops[i] = n(format!("{k}_operations"));
            c.bytes[i] = n(format!("{k}_bytes"));
            c.time_ns[i] = n(format!("{k}_total_time_ns"));
        }
        for (i, k) in ["rd", "wr"].iter().enumerate() {
            let h = &stats[format!("{k}_latency_histogram")];
            let list = |key| -> Option<Vec<u64>> {
                h.get(key)?.as_array()?.iter().map(Value::as_u64).collect()
            };
            if let (Some(b), Some(bins)) = (list("boundaries"), list("bins")) {
                c.bins[i] = Some((b, bins));
            }
        }
        c
    }
}

/// Rates between two samples `seconds` apart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rates {
    /// Operations per second: read, write, flush.
    pub iops: [f64; 3],
    /// Bytes per second: read, write.
    pub bps: [f64; 2],
    /// Mean latency in ns of the reads and writes between the samples.
    pub mean_ns: Option<f64>,
    /// Read and write latency percentiles (p50, p99) in ns, from the
    /// histograms' bins between the samples.
    pub pct: [Option<(u64, u64)>; 2],
}

/// The latency below which `fraction` of the requests counted in `bins`
/// finished: the upper boundary of the bin that holds that rank (the last
/// boundary for the open last bin).
pub fn percentile(boundaries: &[u64], bins: &[u64], fraction: f64) -> Option<u64> {
    let total: u64 = bins.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * fraction).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in bins.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return boundaries.get(i).or(boundaries.last()).copied();
        }
    }
    boundaries.last().copied()
}

impl Rates {
    /// The rates from `a` to `b`, `seconds` apart.
    pub fn between(a: &Counters, b: &Counters, seconds: f64) -> Rates {
        let d = |x: u64, y: u64| y.saturating_sub(x) as f64;
        let mut r = Rates::default();
        for i in 0..3 {
            r.iops[i] = d(a.ops[i], b.ops[i]) / seconds;
        }
        for i in 0..2 {
            r.bps[i] = d(a.bytes[i], b.bytes[i]) / seconds;
        }
        let ops = d(a.ops[0], b.ops[0]) + d(a.ops[1], b.ops[1]);
        let time = d(a.time_ns[0], b.time_ns[0]) + d(a.time_ns[1], b.time_ns[1]);
        r.mean_ns = (ops > 0.0).then(|| time / ops);
        for i in 0..2 {
            if let (Some((ba, bins_a)), Some((bb, bins_b))) = (&a.bins[i], &b.bins[i]) {
                if ba == bb && bins_a.len() == bins_b.len() {
                    let delta: Vec<u64> = bins_a
                        .iter()
                        .zip(bins_b)
                        .map(|(x, y)| y.saturating_sub(*x))
                        .collect();
                    r.pct[i] = percentile(bb, &delta, 0.5).zip(percentile(bb, &delta, 0.99));
                }
            }
        }
        r
    }

    /// The columns both of top's tables have: reads, writes and flushes
    /// per second, bytes read and written per second, mean latency.
    fn columns(&self) -> String {
        format!(
            "{:>8.0} {:>8.0} {:>8.0} {:>11} {:>11} {:>8}",
            self.iops[0],
            self.iops[1],
            self.iops[2],
            bytes(self.bps[0]),
            bytes(self.bps[1]),
            self.mean_ns.map_or("-".into(), duration)
        )
    }

    /// A short summary for a graph edge.
    pub fn label(&self) -> String {
        format!(
            "{:.0} r/s {:.0} w/s\n{} read {} written /s\nlatency {}",
            self.iops[0],
            self.iops[1],
            bytes(self.bps[0]),
            bytes(self.bps[1]),
            self.mean_ns.map_or("-".into(), duration),
        )
    }
}

/// A sample: counters of the exports (by id, with their node) and of the
/// nodes (by name).
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// Export id -> (node, counters).
    pub exports: BTreeMap<String, (String, Counters)>,
    /// Node name -> counters.
    pub nodes: BTreeMap<String, Counters>,
}

impl Sample {
    /// From query-blockstats without and with `query-nodes`.
    pub fn from_replies(exports: &Value, nodes: &Value) -> Sample {
        let mut s = Sample::default();
        for e in exports.as_array().into_iter().flatten() {
            if let Some(id) = e.get("qdev").and_then(Value::as_str) {
                let node = e["node-name"].as_str().unwrap_or_default().to_string();
                s.exports
                    .insert(id.to_string(), (node, Counters::from_stats(&e["stats"])));
            }
        }
        for n in nodes.as_array().into_iter().flatten() {
            if let Some(name) = n.get("node-name").and_then(Value::as_str) {
                s.nodes
                    .insert(name.to_string(), Counters::from_stats(&n["stats"]));
            }
        }
        s
    }
}

/// The arguments of query-blockstats with `query-nodes`.
pub fn query_nodes() -> Map<String, Value> {
    match json!({"query-nodes": true}) {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `12.3 MiB`-style bytes.
pub fn bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit < units.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", units[unit])
    } else {
        format!("{v:.1} {}", units[unit])
    }
}

/// `1.2ms`-style durations from nanoseconds.
pub fn duration(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0}ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.1}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

fn pct(p: Option<(u64, u64)>) -> (String, String) {
    match p {
        Some((p50, p99)) => (duration(p50 as f64), duration(p99 as f64)),
        None => ("-".into(), "-".into()),
    }
}

/// The screen for two samples `seconds` apart.
pub fn screen(socket: &str, a: &Sample, b: &Sample, seconds: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "blkgraph-ctl top - {socket} - every {seconds:.1}s (Ctrl-C quits)\n"
    );
    let _ = writeln!(
        out,
        "{:<14} {:<12} {:>8} {:>8} {:>8} {:>11} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "EXPORT",
        "NODE",
        "READ/s",
        "WRITE/s",
        "FLUSH/s",
        "READ B/s",
        "WRITE B/s",
        "LAT",
        "R p50",
        "R p99",
        "W p50",
        "W p99"
    );
    for (id, (node, now)) in &b.exports {
        let before = a.exports.get(id).map(|e| e.1.clone()).unwrap_or_default();
        let r = Rates::between(&before, now, seconds);
        let (r50, r99) = pct(r.pct[0]);
        let (w50, w99) = pct(r.pct[1]);
        let _ = writeln!(
            out,
            "{id:<14} {node:<12} {} {r50:>8} {r99:>8} {w50:>8} {w99:>8}",
            r.columns()
        );
    }
    let _ = writeln!(
        out,
        "\n{:<27} {:>8} {:>8} {:>8} {:>11} {:>11} {:>8}",
        "NODE", "READ/s", "WRITE/s", "FLUSH/s", "READ B/s", "WRITE B/s", "LAT"
    );
    for (name, now) in &b.nodes {
        let before = a.nodes.get(name).cloned().unwrap_or_default();
        let r = Rates::between(&before, now, seconds);
        let _ = writeln!(out, "{name:<27} {}", r.columns());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(rd: u64, rd_bytes: u64, rd_ns: u64, bins: &[u64]) -> Value {
        json!({
            "rd_operations": rd, "rd_bytes": rd_bytes, "rd_total_time_ns": rd_ns,
            "rd_latency_histogram": {"boundaries": [1000, 10000], "bins": bins},
        })
    }

    #[test]
    fn rates_and_percentiles_between_samples() {
        let a = Counters::from_stats(&stats(10, 40960, 10_000, &[10, 0, 0]));
        let b = Counters::from_stats(&stats(30, 122880, 70_000, &[10, 19, 1]));
        let r = Rates::between(&a, &b, 2.0);
        assert_eq!(r.iops[0], 10.0);
        assert_eq!(r.bps[0], 40960.0);
        assert_eq!(r.mean_ns, Some(3000.0));
        assert_eq!(r.pct[0], Some((10000, 10000)));
        assert_eq!(r.pct[1], None);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[10, 100], &[1, 2, 1], 0.5), Some(100));
        assert_eq!(percentile(&[10, 100], &[1, 2, 1], 0.25), Some(10));
        assert_eq!(percentile(&[10, 100], &[0, 0, 0], 0.5), None);
    }

    #[test]
    fn the_screen_lists_exports_and_nodes() {
        let e = |n: u64| json!([{"qdev": "vub0", "node-name": "disk0", "stats": stats(n, n * 4096, n * 1000, &[n, 0, 0])}]);
        let nodes =
            |n: u64| json!([{"node-name": "disk0", "stats": stats(n, n * 4096, 0, &[0, 0, 0])}]);
        let a = Sample::from_replies(&e(0), &nodes(0));
        let b = Sample::from_replies(&e(100), &nodes(100));
        let text = screen("q.sock", &a, &b, 1.0);
        assert!(text.contains("vub0"), "{text}");
        assert!(text.contains("400.0 KiB"), "{text}");
        assert!(text.contains("1.0us"), "{text}");
        assert_eq!(bytes(1536.0), "1.5 KiB");
    }
}
