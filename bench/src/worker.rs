//! One benchmark thread driving one `Blkioq`.
//!
//! The worker fills its queue with `iodepth` requests, then loops on `do_io` with
//! `min_completions = 1`, resubmitting a new request for every completion until the end of the
//! run, and finally drains what is still in flight. With a rate, a request goes out only when
//! its turn comes (one every `interval`, at most `iodepth` in flight): a steady load that does
//! not speed up when the backend does.

use crate::args::RwMode;
use crate::histogram::Histogram;
use crate::rng::Rng;
use blkio::{Blkioq, Completion, Errno, ReqFlags};
use std::io;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

/// How long `do_io` may wait for a single completion before the run is aborted.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(30);

/// Parameters of one worker.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// I/O pattern.
    pub rw: RwMode,
    /// Request size in bytes.
    pub bs: u64,
    /// Requests kept in flight.
    pub iodepth: usize,
    /// Accessed region `[0, size)`; a multiple of `bs`.
    pub size: u64,
    /// Percentage of reads in `randrw`.
    pub rwmixread: u32,
    /// PRNG seed (already distinct per worker).
    pub seed: u64,
    /// First offset for sequential modes.
    pub seq_start: u64,
    /// Address of this worker's I/O buffer area (`iodepth * bs` bytes inside a mapped
    /// memory region).
    pub buf_addr: usize,
    /// Completions before this instant are not counted (ramp).
    pub measure_start: Instant,
    /// No request is submitted at or after this instant.
    pub end: Instant,
    /// Time between two submissions for a fixed rate; `None` submits as fast as completions
    /// free a slot.
    pub interval: Option<Duration>,
}

/// What one worker measured inside the window `[measure_start, end)`.
#[derive(Debug, Default)]
pub struct WorkerResult {
    /// Submit-to-completion latencies in nanoseconds.
    pub lat_ns: Histogram,
    /// Completed reads.
    pub reads: u64,
    /// Completed writes.
    pub writes: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    submitted: Instant,
    offset: u64,
    is_read: bool,
}

struct Generator {
    rw: RwMode,
    bs: u64,
    blocks: u64,
    rwmixread: u32,
    rng: Rng,
    cursor: u64,
}

impl Generator {
    fn next(&mut self) -> (u64, bool) {
        let offset = if self.rw.is_random() {
            self.rng.below(self.blocks) * self.bs
        } else {
            let o = self.cursor;
            self.cursor += self.bs;
            if self.cursor >= self.blocks * self.bs {
                self.cursor = 0;
            }
            o
        };
        let is_read = match self.rw {
            RwMode::RandRead | RwMode::Read => true,
            RwMode::RandWrite | RwMode::Write => false,
            RwMode::RandRw => self.rng.below(100) < self.rwmixread as u64,
        };
        (offset, is_read)
    }
}

fn submit(q: &mut Blkioq, cfg: &WorkerConfig, slots: &mut [Slot], i: usize, gen: &mut Generator) {
    let (offset, is_read) = gen.next();
    let buf = (cfg.buf_addr + i * cfg.bs as usize) as *mut u8;
    slots[i] = Slot {
        submitted: Instant::now(),
        offset,
        is_read,
    };
    if is_read {
        q.read(offset, buf, cfg.bs as usize, i, ReqFlags::empty());
    } else {
        q.write(offset, buf, cfg.bs as usize, i, ReqFlags::empty());
    }
}

/// Runs the workload on `q` until `cfg.end`, then drains in-flight requests.
///
/// Any failed request aborts the run with an error naming the offset and errno.
pub fn run(mut q: Blkioq, cfg: &WorkerConfig) -> Result<WorkerResult, String> {
    let mut gen = Generator {
        rw: cfg.rw,
        bs: cfg.bs,
        blocks: cfg.size / cfg.bs,
        rwmixread: cfg.rwmixread,
        rng: Rng::new(cfg.seed),
        cursor: cfg.seq_start,
    };
    let mut result = WorkerResult::default();
    let now = Instant::now();
    let mut slots = vec![
        Slot {
            submitted: now,
            offset: 0,
            is_read: true,
        };
        cfg.iodepth
    ];
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..cfg.iodepth).map(|_| MaybeUninit::uninit()).collect();

    let mut free: Vec<usize> = (0..cfg.iodepth).rev().collect();
    let mut in_flight = 0;
    let mut next_due = now;
    loop {
        let now = Instant::now();
        if now < cfg.end {
            while let Some(&i) = free.last() {
                if let Some(interval) = cfg.interval {
                    if now < next_due {
                        break;
                    }
                    // A backend that fell behind gets no burst larger than the queue.
                    let floor = now.checked_sub(interval * cfg.iodepth as u32);
                    next_due = next_due.max(floor.unwrap_or(next_due)) + interval;
                }
                free.pop();
                submit(&mut q, cfg, &mut slots, i, &mut gen);
                in_flight += 1;
            }
        }
        let waiting_for_turn = cfg.interval.is_some() && !free.is_empty() && now < cfg.end;
        if in_flight == 0 {
            if !waiting_for_turn {
                break;
            }
            std::thread::sleep(next_due.min(cfg.end).saturating_duration_since(now));
            continue;
        }
        let mut timeout = if waiting_for_turn {
            next_due.min(cfg.end).saturating_duration_since(now)
        } else {
            COMPLETION_TIMEOUT
        };
        let n = match q.do_io(&mut completions, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if waiting_for_turn && e.errno() == Errno::TIME => 0,
            Err(e) => {
                return Err(format!(
                    "do_io failed: {e} (errno {})",
                    e.errno().raw_os_error()
                ))
            }
        };
        let now = Instant::now();
        let counted = now >= cfg.measure_start && now < cfg.end;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n elements.
            let c = unsafe { c.assume_init_ref() };
            let i = c.user_data;
            let slot = slots[i];
            if c.ret != 0 {
                return Err(format!(
                    "{} of {} bytes at offset {} failed: {}",
                    if slot.is_read { "read" } else { "write" },
                    cfg.bs,
                    slot.offset,
                    io::Error::from_raw_os_error(-c.ret)
                ));
            }
            if counted {
                result
                    .lat_ns
                    .record(now.duration_since(slot.submitted).as_nanos() as u64);
                if slot.is_read {
                    result.reads += 1;
                } else {
                    result.writes += 1;
                }
            }
            in_flight -= 1;
            free.push(i);
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(rw: RwMode, cursor: u64) -> Generator {
        Generator {
            rw,
            bs: 4096,
            blocks: 8,
            rwmixread: 50,
            rng: Rng::new(3),
            cursor,
        }
    }

    #[test]
    fn random_offsets_are_aligned_and_in_range() {
        let mut g = gen(RwMode::RandRead, 0);
        let mut seen = [false; 8];
        for _ in 0..1000 {
            let (o, r) = g.next();
            assert!(r);
            assert_eq!(o % 4096, 0);
            assert!(o < 8 * 4096);
            seen[(o / 4096) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn sequential_wraps() {
        let mut g = gen(RwMode::Write, 6 * 4096);
        let offs: Vec<u64> = (0..4)
            .map(|_| g.next())
            .map(|(o, r)| {
                assert!(!r);
                o / 4096
            })
            .collect();
        assert_eq!(offs, [6, 7, 0, 1]);
    }

    #[test]
    fn randrw_mixes() {
        let mut g = gen(RwMode::RandRw, 0);
        let reads = (0..10_000).filter(|_| g.next().1).count();
        assert!((4_500..5_500).contains(&reads), "{reads}");
    }
}
