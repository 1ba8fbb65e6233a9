//! The optional metrics endpoint (`--metrics unix:PATH` or
//! `--metrics tcp:127.0.0.1:PORT`): the exports' statistics, the same
//! counters query-blockstats gives, in the OpenMetrics text format over
//! HTTP (`GET /metrics`), encoded with the `prometheus-client` crate. Each
//! scrape sums the request sources anew; nothing is counted for it on the
//! request path.

use std::io::{self, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::cli::MetricsAddress;
use crate::exports::Exports;
use crate::stats::{KindStats, OpKind};

/// The longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Collects the exports' statistics on each scrape.
struct ExportCollector {
    exports: Arc<Exports>,
}

impl std::fmt::Debug for ExportCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExportCollector")
    }
}

/// A counter's value from an export's counters of one kind.
type Field = fn(&KindStats) -> f64;

impl Collector for ExportCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let exports = self.exports.stats();
        let ops = [
            (OpKind::Read, "read"),
            (OpKind::Write, "write"),
            (OpKind::Flush, "flush"),
            (OpKind::Unmap, "unmap"),
        ];
        let counters: [(&str, &str, Field); 5] = [
            (
                "blkgraph_export_operations",
                "Requests that succeeded",
                |k| k.operations as f64,
            ),
            (
                "blkgraph_export_bytes",
                "Bytes of the requests that succeeded",
                |k| k.bytes as f64,
            ),
            (
                "blkgraph_export_time_seconds",
                "Time spent in requests that succeeded",
                |k| k.total_time_ns as f64 / 1e9,
            ),
            (
                "blkgraph_export_failed_operations",
                "Requests whose I/O failed",
                |k| k.failed as f64,
            ),
            (
                "blkgraph_export_invalid_operations",
                "Requests refused before any I/O",
                |k| k.invalid as f64,
            ),
        ];
        for (name, help, field) in counters {
            let counter = ConstCounter::new(0f64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for e in &exports {
                for (kind, op) in ops {
                    let labels = [
                        ("export", e.id.as_str()),
                        ("node", &e.node_name),
                        ("op", op),
                    ];
                    ConstCounter::new(field(e.stats.kind(kind)))
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "blkgraph_export_write_highest_offset_bytes",
            "End of the highest write",
            None,
            gauge.metric_type(),
        )?;
        for e in &exports {
            let labels = [("export", e.id.as_str()), ("node", &e.node_name)];
            let offset = i64::try_from(e.stats.wr_highest_offset).unwrap_or(i64::MAX);
            ConstGauge::new(offset).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The metrics text of `exports`.
pub fn render(exports: &Arc<Exports>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ExportCollector {
        exports: exports.clone(),
    }));
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        log::warn!("metrics: cannot encode: {e}");
    }
    text
}

/// Answers one HTTP request.
fn answer(stream: &mut (impl Read + Write), exports: &Arc<Exports>) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || head.len() + n > MAX_REQUEST {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next(), words.next());
    let (status, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => ("200 OK", render(exports)),
        (Some("GET"), _) => ("404 Not Found", "see /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", String::new()),
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Starts the endpoint on its own thread; clients are answered one at a
/// time, each within five seconds (`CLIENT_TIMEOUT`).
pub fn start(address: &MetricsAddress, exports: Arc<Exports>) -> io::Result<()> {
    let serve = move |stream: io::Result<Box<dyn Connection>>| match stream {
        Ok(mut s) => {
            if let Err(e) = s.timeouts().and_then(|()| answer(&mut s, &exports)) {
                log::debug!("metrics: {e}");
            }
        }
        Err(e) => log::warn!("metrics: accept: {e}"),
    };
    let spawn = |f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(f)
            .map(drop)
    };
    match address {
        MetricsAddress::Unix(path) => {
            let listener = blkgraph_ctl::bind_unix_socket(path)?;
            spawn(Box::new(move || {
                for s in listener.incoming() {
                    serve(s.map(|s| Box::new(s) as Box<dyn Connection>));
                }
            }))
        }
        MetricsAddress::Tcp(addr) => {
            let listener = TcpListener::bind(addr)?;
            spawn(Box::new(move || {
                for s in listener.incoming() {
                    serve(s.map(|s| Box::new(s) as Box<dyn Connection>));
                }
            }))
        }
    }
}

/// A client connection, over TCP or a unix socket.
trait Connection: Read + Write {
    /// Bounds how long a client can hold the endpoint.
    fn timeouts(&self) -> io::Result<()>;
}

impl Connection for std::net::TcpStream {
    fn timeouts(&self) -> io::Result<()> {
        self.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        self.set_write_timeout(Some(CLIENT_TIMEOUT))
    }
}

impl Connection for std::os::unix::net::UnixStream {
    fn timeouts(&self) -> io::Result<()> {
        self.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        self.set_write_timeout(Some(CLIENT_TIMEOUT))
    }
}
