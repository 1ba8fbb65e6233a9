//! The commands of the transmission phase, run as futures on a
//! connection's executor; each produces its complete reply.

use std::sync::Arc;

use blkgraph_graph::{BlockStatus, IoBuffer, Node, WriteFlags, ZeroFlags};

use super::proto::{self, io_error_to_nbd};
use super::reply::Reply;
use super::session::{MetaContext, MetaKind};
use crate::stats::{OpKind, Outcome, Sample};

/// Most extents in one block status chunk.
pub const MAX_EXTENTS: usize = 65536;

/// Reads of at least this many bytes look for holes first and send them
/// as OFFSET_HOLE chunks; smaller ones are sent as data. QEMU looks for
/// holes in every read; for small reads the lookup (two `lseek`s on a
/// file) costs more than the zeroes it saves.
pub const SPARSE_READ_MIN: u32 = 65536;

/// A finished request: its reply and the memory it held.
pub struct Done {
    /// The reply to send.
    pub reply: Reply,
    /// Bytes of buffers the request held (for flow control).
    pub cost: usize,
}

/// A request's result with what it took, for the statistics.
pub struct Timed {
    /// The result.
    pub done: Done,
    /// What the statistics count, if anything.
    pub sample: Option<Sample>,
}

/// Runs `future`, timing it as a request of `kind` at `offset` of `bytes`.
pub async fn timed(
    kind: Option<OpKind>,
    offset: u64,
    bytes: u64,
    future: impl std::future::Future<Output = Done>,
) -> Timed {
    let start = std::time::Instant::now();
    let done = future.await;
    let sample = kind.map(|kind| Sample {
        kind,
        offset,
        bytes,
        ns: start.elapsed().as_nanos() as u64,
        outcome: if done.reply.failed() {
            Outcome::Failed
        } else {
            Outcome::Done
        },
    });
    Timed { done, sample }
}

/// How a read is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// A simple reply (structured replies not negotiated).
    Simple,
    /// One OFFSET_DATA chunk (DF set, or a small read).
    Whole,
    /// OFFSET_DATA and OFFSET_HOLE chunks following the node's block status.
    Sparse,
}

/// Runs of a read: start (relative to the request), length, reads as zero.
type Runs = smallvec::SmallVec<[(usize, usize, bool); 4]>;

async fn runs(node: &Node, offset: u64, len: usize) -> std::io::Result<Runs> {
    let mut runs = Runs::new();
    let mut pos = 0usize;
    while pos < len {
        let st = node
            .block_status(offset + pos as u64, (len - pos) as u64)
            .await?;
        let l = (st.len.min((len - pos) as u64)) as usize;
        if l == 0 {
            return Err(std::io::Error::other(
                "block status reported an empty extent",
            ));
        }
        match runs.last_mut() {
            Some((_, rl, z)) if *z == st.zero => *rl += l,
            _ => runs.push((pos, l, st.zero)),
        }
        pos += l;
    }
    Ok(runs)
}

/// NBD_CMD_READ.
pub async fn read(node: Arc<Node>, handle: u64, offset: u64, len: u32, mode: ReadMode) -> Done {
    let len = len as usize;
    let cost = len;
    let fail = |e: std::io::Error, what: &str| {
        let err = io_error_to_nbd(&e);
        match mode {
            ReadMode::Simple => Reply::simple(handle, err),
            _ => Reply::structured_error(handle, err, &format!("{what}: {e}")),
        }
    };
    if mode == ReadMode::Sparse && len > 0 {
        let runs = match runs(&node, offset, len).await {
            Ok(r) => r,
            Err(e) => {
                return Done {
                    reply: fail(e, "unable to check for holes"),
                    cost,
                }
            }
        };
        // Only the data runs are held, one after the other: the reply to a
        // mostly sparse read holds about what it sends.
        let data_len = runs.iter().filter(|r| !r.2).map(|r| r.1).sum();
        let data = IoBuffer::from_vec(vec![0u8; data_len]);
        let mut at = 0;
        for &(start, l, zero) in &runs {
            if zero {
                continue;
            }
            if let Err(e) = node.read(offset + start as u64, &data.slice(at, l)).await {
                return Done {
                    reply: fail(e, "reading from file failed"),
                    cost,
                };
            }
            at += l;
        }
        let mut reply = Reply::structured(data.into_vec());
        let last = runs.len() - 1;
        let mut at = 0;
        for (i, &(start, l, zero)) in runs.iter().enumerate() {
            let from = offset + start as u64;
            if zero {
                reply.hole_chunk(handle, from, l as u32, i == last);
            } else {
                reply.data_chunk(handle, from, at..at + l, i == last);
                at += l;
            }
        }
        return Done { reply, cost };
    }
    let buf = IoBuffer::from_vec(vec![0u8; len]);
    let result = node.read(offset, &buf).await;
    let data = buf.into_vec();
    let reply = match (result, mode) {
        (Err(e), _) => fail(e, "reading from file failed"),
        (Ok(()), ReadMode::Simple) => Reply::simple_data(handle, data),
        (Ok(()), _) if len == 0 => {
            let mut r = Reply::structured(Vec::new());
            r.none_chunk(handle);
            r
        }
        (Ok(()), _) => {
            let mut r = Reply::structured(data);
            r.data_chunk(handle, offset, 0..len, true);
            r
        }
    };
    Done { reply, cost }
}

fn finish(
    handle: u64,
    structured: bool,
    result: std::io::Result<()>,
    what: &str,
    cost: usize,
) -> Done {
    let reply = match result {
        Ok(()) => Reply::simple(handle, 0),
        Err(e) => Reply::error(
            structured,
            handle,
            io_error_to_nbd(&e),
            &format!("{what}: {e}"),
        ),
    };
    Done { reply, cost }
}

/// NBD_CMD_WRITE.
pub async fn write(
    node: Arc<Node>,
    handle: u64,
    offset: u64,
    data: Vec<u8>,
    fua: bool,
    structured: bool,
) -> Done {
    let cost = data.len();
    let buf = IoBuffer::from_vec(data);
    let result = node.write(offset, &buf, WriteFlags { fua }).await;
    finish(handle, structured, result, "writing to file failed", cost)
}

/// NBD_CMD_FLUSH.
pub async fn flush(node: Arc<Node>, handle: u64, structured: bool) -> Done {
    let result = node.flush().await;
    finish(handle, structured, result, "flush failed", 0)
}

/// NBD_CMD_TRIM; with FUA, the discard is followed by a flush.
pub async fn trim(
    node: Arc<Node>,
    handle: u64,
    offset: u64,
    len: u32,
    fua: bool,
    structured: bool,
) -> Done {
    let mut result = node.discard(offset, u64::from(len)).await;
    if result.is_ok() && fua {
        result = node.flush().await;
    }
    finish(handle, structured, result, "discard failed", 0)
}

/// NBD_CMD_WRITE_ZEROES.
pub async fn write_zeroes(
    node: Arc<Node>,
    handle: u64,
    offset: u64,
    len: u32,
    flags: ZeroFlags,
    structured: bool,
) -> Done {
    let result = node.write_zeroes(offset, u64::from(len), flags).await;
    finish(handle, structured, result, "writing zeroes failed", 0)
}

/// Appends a run to extents, merging it with the last one if the flags
/// match; false if it needed a new extent beyond `max`.
fn push_extent(extents: &mut Vec<(u32, u32)>, len: u32, flags: u32, max: usize) -> bool {
    let full = extents.len() == max;
    match extents.last_mut() {
        Some((l, f)) if *f == flags => {
            *l += len;
            true
        }
        _ if full => false,
        _ => {
            extents.push((len, flags));
            true
        }
    }
}

/// The `base:allocation` flags of a range.
fn allocation_flags(st: &BlockStatus) -> u32 {
    (if st.data { 0 } else { proto::STATE_HOLE }) | if st.zero { proto::STATE_ZERO } else { 0 }
}

/// The `qemu:allocation-depth` value of a range: its depth.
fn depth_flags(st: &BlockStatus) -> u32 {
    st.depth
}

/// Extents of the node's block status, described by `flags_of`.
async fn status_extents(
    node: &Node,
    offset: u64,
    len: u32,
    max: usize,
    flags_of: fn(&BlockStatus) -> u32,
) -> std::io::Result<Vec<(u32, u32)>> {
    let end = offset + u64::from(len);
    let mut pos = offset;
    let mut extents = Vec::new();
    while pos < end {
        let st = node.block_status(pos, end - pos).await?;
        let l = st.len.min(end - pos);
        if l == 0 {
            break;
        }
        if !push_extent(&mut extents, l as u32, flags_of(&st), max) {
            break;
        }
        pos += l;
    }
    if extents.is_empty() {
        return Err(std::io::Error::other(
            "block status reported an empty extent",
        ));
    }
    Ok(extents)
}

fn bitmap_extents(
    source: &dyn super::bitmap::BitmapSource,
    offset: u64,
    len: u32,
    max: usize,
) -> Vec<(u32, u32)> {
    let mut left = u64::from(len);
    let mut extents = Vec::new();
    for (l, dirty) in source.extents(offset, u64::from(len)) {
        let l = l.min(left);
        if l == 0 {
            break;
        }
        let flags = if dirty { proto::STATE_DIRTY } else { 0 };
        if !push_extent(&mut extents, l as u32, flags, max) {
            break;
        }
        left -= l;
    }
    if extents.is_empty() {
        extents.push((len, 0));
    }
    extents
}

/// NBD_CMD_BLOCK_STATUS: one chunk per selected context.
pub async fn block_status(
    node: Arc<Node>,
    handle: u64,
    offset: u64,
    len: u32,
    req_one: bool,
    contexts: Arc<[MetaContext]>,
) -> Done {
    let max = if req_one { 1 } else { MAX_EXTENTS };
    let mut reply = Reply::structured(Vec::new());
    let last = contexts.len() - 1;
    for (i, ctx) in contexts.iter().enumerate() {
        let result = match &ctx.kind {
            MetaKind::Allocation => status_extents(&node, offset, len, max, allocation_flags).await,
            MetaKind::AllocationDepth => status_extents(&node, offset, len, max, depth_flags).await,
            MetaKind::Bitmap(source) => Ok(bitmap_extents(source.as_ref(), offset, len, max)),
        };
        let extents = match result {
            Ok(e) => e,
            Err(e) => {
                let err = io_error_to_nbd(&e);
                let msg = format!("unable to get block status: {e}");
                return Done {
                    reply: Reply::structured_error(handle, err, &msg),
                    cost: 0,
                };
            }
        };
        reply.block_status_chunk(handle, ctx.id, &extents, i == last);
    }
    Done { reply, cost: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::bitmap::TestBitmap;

    #[test]
    fn extents_merge_and_cap() {
        let mut e = Vec::new();
        assert!(push_extent(&mut e, 10, 0, 1));
        assert!(push_extent(&mut e, 5, 0, 1));
        assert!(!push_extent(&mut e, 5, 3, 1));
        assert_eq!(e, vec![(15, 0)]);
        let b = TestBitmap {
            name: "b".into(),
            granularity: 512,
            bits: vec![true, false, false, true],
        };
        assert_eq!(
            bitmap_extents(&b, 0, 2048, MAX_EXTENTS),
            vec![(512, 1), (1024, 0), (512, 1)]
        );
        assert_eq!(bitmap_extents(&b, 256, 512, 1), vec![(256, 1)]);
    }
}
