//! `blkgraph-bench`: a vhost-user-blk benchmark client built on the `blkio` crate
//! (libblkio's Rust core), usable against any vhost-user-blk backend (blkgraph,
//! qemu-storage-daemon, ...). See `--help` and docs/benchmarks.md.

mod args;
mod histogram;
mod rng;
mod stats;
mod worker;

use args::{Args, Parsed};
use blkio::{Blkio, Blkioq, MemoryRegion};
use histogram::Histogram;
use rng::Rng;
use stats::{round3, LatencyUs, Report};
use std::os::unix::fs::FileTypeExt;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};
use worker::{WorkerConfig, WorkerResult};

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| {
        let msg = e.to_string();
        if msg.contains("os error") {
            format!("{what}: {msg}")
        } else {
            format!("{what}: {msg} (errno {})", e.errno().raw_os_error())
        }
    }
}

/// A connected and started device, with one mapped buffer region per queue.
struct Device {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    regions: Vec<MemoryRegion>,
    capacity: u64,
}

fn open_device(args: &Args) -> Result<Device, String> {
    let path = &args.socket;
    let meta = std::fs::metadata(path).map_err(|e| format!("socket {}: {e}", path.display()))?;
    if !meta.file_type().is_socket() {
        return Err(format!("{} is not a UNIX socket", path.display()));
    }
    let path_str = path
        .to_str()
        .ok_or_else(|| format!("socket path {} is not UTF-8", path.display()))?;

    let mut blkio = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("blkio_new"))?;
    blkio
        .set_str("path", path_str)
        .map_err(blkio_err("set path"))?;
    // Read-only modes also work on read-only exports (start() refuses an RO device otherwise).
    let reads_only = matches!(args.rw, args::RwMode::RandRead | args::RwMode::Read);
    if reads_only {
        blkio
            .set_bool("read-only", true)
            .map_err(blkio_err("set read-only"))?;
    }
    blkio
        .connect()
        .map_err(blkio_err(&format!("connect to {}", path.display())))?;

    let capacity = blkio
        .get_u64("capacity")
        .map_err(blkio_err("get capacity"))?;
    let max_queues = blkio
        .get_i32("max-queues")
        .map_err(blkio_err("get max-queues"))?;
    let align = blkio
        .get_i32("request-alignment")
        .map_err(blkio_err("get request-alignment"))?;
    if args.queues as i64 > max_queues as i64 {
        return Err(format!(
            "--queues {} exceeds the device's {max_queues} queue(s)",
            args.queues
        ));
    }
    if align > 0 && !args.bs.is_multiple_of(align as u64) {
        return Err(format!(
            "--bs {} is not a multiple of the device's request alignment {align}",
            args.bs
        ));
    }
    // num-queues and queue-size can only be set between connect and start.
    blkio
        .set_i32("num-queues", args.queues as i32)
        .map_err(blkio_err("set num-queues"))?;
    // virtio-driver uses no indirect descriptors: a read or write takes 3 descriptors, so the
    // default 256-entry ring holds only 85 requests. Grow the ring for deeper queues.
    let queue_size = args.queue_size.or_else(|| {
        let need = (args.iodepth as u32).saturating_mul(3);
        (need > 256).then(|| need.next_power_of_two().min(32768))
    });
    if let Some(qs) = queue_size {
        if (qs as usize) < args.iodepth * 3 {
            eprintln!(
                "blkgraph-bench: warning: --queue-size {qs} holds only {} requests of --iodepth {}",
                qs / 3,
                args.iodepth
            );
        }
        blkio
            .set_i32("queue-size", qs as i32)
            .map_err(blkio_err("set queue-size"))?;
    }
    let outcome = blkio.start().map_err(blkio_err("start"))?;

    // Buffers must live in memfd regions registered with the backend after start().
    let mem_align = blkio
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("get mem-region-alignment"))?
        .max(1);
    let want = (args.iodepth as u64)
        .checked_mul(args.bs)
        .ok_or("--iodepth * --bs overflows")?;
    let len = want.div_ceil(mem_align) * mem_align;
    let mut regions = Vec::new();
    let mut rng = Rng::new(args.seed ^ 0x5eed);
    for _ in 0..args.queues {
        let region = blkio
            .alloc_mem_region(len as usize)
            .map_err(blkio_err("alloc_mem_region"))?;
        blkio
            .map_mem_region(&region)
            .map_err(blkio_err("map_mem_region"))?;
        // SAFETY: the region is a fresh private mapping of `len` bytes that nothing else uses.
        let buf = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
        // Random data so that backends cannot take shortcuts on zero blocks.
        rng.fill(buf);
        regions.push(region);
    }
    Ok(Device {
        blkio,
        queues: outcome.queues,
        regions,
        capacity,
    })
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

fn run(args: &Args) -> Result<Report, String> {
    let dev = open_device(args)?;
    let size_limit = args.size.unwrap_or(dev.capacity);
    if size_limit > dev.capacity {
        return Err(format!(
            "--size {size_limit} exceeds the device capacity {}",
            dev.capacity
        ));
    }
    let size = size_limit / args.bs * args.bs;
    if size == 0 {
        return Err(format!(
            "device capacity {} is smaller than --bs {}",
            dev.capacity, args.bs
        ));
    }
    if let Some(pid) = args.pid {
        stats::process_cpu_s(pid)?;
    }

    let start = Instant::now();
    let measure_start = start + args.ramp;
    let end = measure_start + args.runtime;
    let blocks = size / args.bs;
    let nq = args.queues as u64;

    let Device {
        blkio,
        queues,
        regions,
        capacity,
    } = dev;

    let (results, backend_cpu, backend_ctxsw, client_cpu, elapsed) = thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(&regions)
            .enumerate()
            .map(|(i, (q, region))| {
                let cfg = WorkerConfig {
                    rw: args.rw,
                    bs: args.bs,
                    iodepth: args.iodepth,
                    size,
                    rwmixread: args.rwmixread,
                    seed: args.seed.wrapping_add(i as u64),
                    seq_start: blocks * i as u64 / nq * args.bs,
                    buf_addr: region.addr,
                    measure_start,
                    end,
                    interval: args.rate_iops.map(|rate| Duration::from_secs(nq) / rate),
                };
                thread::Builder::new()
                    .name(format!("bench-q{i}"))
                    .spawn_scoped(s, move || worker::run(q, &cfg))
                    .expect("spawn worker thread")
            })
            .collect();

        sleep_until(measure_start);
        let t0 = Instant::now();
        let b0 = args.pid.map(stats::process_cpu_s);
        let s0 = args.pid.map(stats::process_ctxsw);
        let c0 = stats::self_cpu_s();
        sleep_until(end);
        let b1 = args.pid.map(stats::process_cpu_s);
        let s1 = args.pid.map(stats::process_ctxsw);
        let c1 = stats::self_cpu_s();
        let elapsed = t0.elapsed();

        let results: Vec<Result<WorkerResult, String>> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("worker thread panicked".into()))
            })
            .collect();
        let backend = match (b0, b1) {
            (Some(Ok(a)), Some(Ok(b))) => Ok(Some(b - a)),
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(format!("backend CPU time: {e}")),
            _ => Ok(None),
        };
        let switches = match (s0, s1) {
            (Some(Ok(a)), Some(Ok(b))) => Some(b.saturating_sub(a)),
            _ => None,
        };
        (results, backend, switches, c1 - c0, elapsed)
    });
    drop(blkio);

    let mut lat = Histogram::new();
    let (mut reads, mut writes) = (0, 0);
    for r in results {
        let r = r?;
        lat.merge(&r.lat_ns);
        reads += r.reads;
        writes += r.writes;
    }
    let backend_cpu = backend_cpu?;
    let ios = reads + writes;
    debug_assert_eq!(lat.count(), ios);
    let runtime_s = elapsed.max(Duration::from_nanos(1)).as_secs_f64();
    let per_io_us = |cpu_s: f64| {
        if ios == 0 {
            0.0
        } else {
            round3(cpu_s * 1e6 / ios as f64)
        }
    };
    Ok(Report {
        rw: args.rw.name(),
        bs: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        rate_iops: args.rate_iops,
        runtime_s: round3(runtime_s),
        ios,
        read_ios: reads,
        write_ios: writes,
        iops: round3(ios as f64 / runtime_s),
        bw_bytes_per_s: (ios as f64 * args.bs as f64 / runtime_s).round(),
        lat_us: LatencyUs::from_ns_histogram(&lat),
        backend_cpu_s: backend_cpu.map(round3),
        backend_cpu_per_io_us: backend_cpu.map(per_io_us),
        backend_ctxsw_per_io: backend_ctxsw.map(|n| {
            if ios == 0 {
                0.0
            } else {
                round3(n as f64 / ios as f64)
            }
        }),
        client_cpu_s: round3(client_cpu),
        client_cpu_per_io_us: per_io_us(client_cpu),
        capacity,
        size,
    })
}

fn main() -> ExitCode {
    let parsed = match args::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("blkgraph-bench: {e}\n(try --help)");
            return ExitCode::from(1);
        }
    };
    let args = match parsed {
        Parsed::Help => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Parsed::Run(a) => a,
    };
    match run(&args) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).expect("serialise report")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blkgraph-bench: {e}");
            ExitCode::from(1)
        }
    }
}
