//! The block-copy engine of copy-before-write (QEMU's block-copy state):
//! which clusters of `file` are still to be copied to `target`, which the
//! snapshot may read, which were copied (and are read from `target`), which
//! are being copied, and the snapshot reads from `file` in progress
//! ("frozen" reads), all under one lock.
//!
//! A cluster is copied at most once; a copy claimed by a request that is
//! dropped goes back to be copied. Writers wait for the copies and frozen
//! reads of their range; snapshot reads never wait. Copies that outlive
//! their guest write are counted so that a drain can wait for them.

use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;

use crate::bitset::{Bitset, OutOfMemory};
use crate::buffer::IoBuffer;
use crate::driver::WriteFlags;
use crate::job::Side;
use crate::node::{Child, Node};

/// Largest single copy, as QEMU's block-copy tasks.
const MAX_COPY: u64 = 1 << 20;

struct State {
    /// Clusters still to copy.
    copy: Bitset,
    /// Clusters the snapshot may read.
    access: Bitset,
    /// Clusters copied to the target.
    done: Bitset,
    /// Clusters being copied.
    copying: Bitset,
    /// Snapshot reads from `file` in progress: (id, start, end).
    frozen: Vec<(u64, u64, u64)>,
    next_frozen: u64,
    /// Why the snapshot became invalid, if it did.
    error: Option<io::Error>,
    waiters: Vec<Waker>,
    clusters_copied: u64,
    /// Copies running on after their guest write moved on.
    detached: usize,
}

impl State {
    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }
}

/// The copy state between a source and a target.
pub(crate) struct BlockCopy {
    pub(super) file: Arc<Child>,
    pub(super) target: Arc<Child>,
    pub(crate) cluster: u64,
    pub(crate) size: u64,
    state: Mutex<State>,
}

/// A failed copy: which side, and why.
#[derive(Debug)]
pub(crate) struct CopyError {
    pub(crate) side: Side,
    pub(crate) error: io::Error,
}

impl From<CopyError> for io::Error {
    fn from(e: CopyError) -> io::Error {
        e.error
    }
}

/// What the state looks like, for queries.
pub(super) struct Progress {
    /// Why the snapshot is invalid, if it is.
    pub(super) error: Option<String>,
    pub(super) clusters_copied: u64,
    pub(super) clusters_to_copy: usize,
    /// Copied bytes the snapshot still reads from the target.
    pub(super) target_bytes: u64,
}

impl BlockCopy {
    /// A state for `size` bytes in clusters of `cluster` bytes, of which
    /// those set in `copy` are to be copied (and readable).
    pub(super) fn new(
        file: Arc<Child>,
        target: Arc<Child>,
        cluster: u64,
        size: u64,
        copy: Bitset,
    ) -> Result<Self, OutOfMemory> {
        let n = copy.len();
        Ok(BlockCopy {
            file,
            target,
            cluster,
            size,
            state: Mutex::new(State {
                access: copy.try_clone()?,
                done: Bitset::try_new(n, false)?,
                copying: Bitset::try_new(n, false)?,
                copy,
                frozen: Vec::new(),
                next_frozen: 0,
                error: None,
                waiters: Vec::new(),
                clusters_copied: 0,
                detached: 0,
            }),
        })
    }

    /// The node copies go to.
    pub(crate) fn target(&self) -> Arc<Node> {
        self.target.node()
    }

    /// How many clusters the state covers.
    pub(crate) fn cluster_count(&self) -> usize {
        self.size.div_ceil(self.cluster) as usize
    }

    /// How many clusters are still to be copied.
    pub(crate) fn to_copy(&self) -> usize {
        self.state.lock().copy.count_ones()
    }

    /// How many clusters were copied, by anyone.
    pub(crate) fn copied(&self) -> u64 {
        self.state.lock().clusters_copied
    }

    /// Whether cluster `c` was copied.
    pub(crate) fn is_copied(&self, c: usize) -> bool {
        self.state.lock().done.get(c)
    }

    /// Clusters that need no copy after all (not allocated in the top
    /// layer, for a backup of the top only).
    pub(crate) fn skip(&self, clusters: Range<usize>) {
        let mut s = self.state.lock();
        for c in clusters {
            s.copy.set(c, false);
        }
    }

    /// The clusters `[offset, offset + len)` touches.
    pub(crate) fn clusters(&self, offset: u64, len: u64) -> Range<usize> {
        let end = (offset + len).min(self.size);
        (offset / self.cluster) as usize..end.div_ceil(self.cluster) as usize
    }

    /// Copies clusters `run` from `file` to `target` in one read and one
    /// write.
    async fn copy_clusters(&self, run: Range<usize>) -> Result<(), CopyError> {
        let start = run.start as u64 * self.cluster;
        let end = (run.end as u64 * self.cluster).min(self.size);
        let len = (end - start) as usize;
        let source = |error| CopyError {
            side: Side::Source,
            error,
        };
        let buf = IoBuffer::aligned(len, 4096).map_err(source)?;
        self.file.node().read(start, &buf).await.map_err(source)?;
        self.target
            .node()
            .write(start, &buf, WriteFlags::default())
            .await
            .map_err(|error| CopyError {
                side: Side::Target,
                error,
            })
    }

    /// Copies every cluster of the range still to copy, in runs of up to
    /// 1 MiB; a cluster being copied by another request is waited for (and
    /// copied again here if that copy failed).
    pub(crate) async fn copy_range(&self, clusters: Range<usize>) -> Result<(), CopyError> {
        let max_run = (MAX_COPY / self.cluster).max(1) as usize;
        let mut c = clusters.start;
        while c < clusters.end {
            let run = {
                let mut s = self.state.lock();
                if s.copying.get(c) {
                    None
                } else if !s.copy.get(c) {
                    c += 1;
                    continue;
                } else {
                    let mut e = c;
                    while e < clusters.end && e - c < max_run && s.copy.get(e) && !s.copying.get(e)
                    {
                        s.copy.set(e, false);
                        s.copying.set(e, true);
                        e += 1;
                    }
                    Some(c..e)
                }
            };
            let Some(run) = run else {
                self.wait_until(|s| !s.copying.get(c)).await;
                continue;
            };
            let mut claim = Claim {
                engine: self,
                run: run.clone(),
                copied: None,
            };
            let result = self.copy_clusters(run.clone()).await;
            claim.copied = Some(result.is_ok());
            drop(claim);
            result?;
            c = run.end;
        }
        Ok(())
    }

    /// Whether the snapshot is invalid.
    pub(super) fn invalid(&self) -> bool {
        self.state.lock().error.is_some()
    }

    /// Makes the snapshot invalid; true if it was valid until now.
    pub(super) fn invalidate(&self, error: &io::Error) -> bool {
        let mut s = self.state.lock();
        if s.error.is_some() {
            return false;
        }
        s.error = Some(io::Error::new(error.kind(), error.to_string()));
        true
    }

    fn wait_until<F: Fn(&State) -> bool>(&self, ready: F) -> WaitUntil<'_, F> {
        WaitUntil {
            engine: self,
            ready,
        }
    }

    /// Waits until no snapshot read from `file` overlaps the range.
    pub(super) async fn wait_frozen(&self, offset: u64, len: u64) {
        let end = offset + len;
        self.wait_until(|s| !s.frozen.iter().any(|&(_, a, b)| a < end && offset < b))
            .await
    }

    /// Waits until no copy runs on its own.
    pub(super) async fn wait_detached(&self) {
        self.wait_until(|s| s.detached == 0).await
    }

    /// The state's figures.
    pub(super) fn progress(&self) -> Progress {
        let s = self.state.lock();
        Progress {
            error: s.error.as_ref().map(|e| e.to_string()),
            clusters_copied: s.clusters_copied,
            clusters_to_copy: s.copy.count_ones(),
            target_bytes: s.done.count_both(&s.access) as u64 * self.cluster,
        }
    }

    /// Checks access and takes the run of `[offset, end)` with one done
    /// state; registers a frozen read when it is read from `file`.
    pub(super) fn begin_snapshot_op(
        &self,
        offset: u64,
        end: u64,
    ) -> io::Result<(u64, bool, Frozen<'_>)> {
        let mut s = self.state.lock();
        let eacces = || io::Error::from_raw_os_error(libc::EACCES);
        if s.error.is_some() {
            return Err(eacces());
        }
        if self
            .clusters(offset, end - offset)
            .any(|c| !s.access.get(c))
        {
            return Err(eacces());
        }
        let first = (offset / self.cluster) as usize;
        let done = s.done.get(first);
        let mut run_end = offset;
        for c in self.clusters(offset, end - offset) {
            if s.done.get(c) != done {
                break;
            }
            run_end = ((c as u64 + 1) * self.cluster).min(end);
        }
        let frozen = if done {
            None
        } else {
            let id = s.next_frozen;
            s.next_frozen += 1;
            s.frozen.push((id, offset, end));
            Some(id)
        };
        let frozen = Frozen {
            engine: self,
            id: frozen,
        };
        Ok((run_end - offset, done, frozen))
    }

    /// Takes clusters out of the snapshot: no longer readable, no longer
    /// copied.
    pub(super) fn drop_from_snapshot(&self, clusters: Range<usize>) {
        let mut s = self.state.lock();
        for c in clusters {
            s.access.set(c, false);
            s.copy.set(c, false);
        }
    }
}

/// A future that completes when `ready` holds for the state.
struct WaitUntil<'a, F: Fn(&State) -> bool> {
    engine: &'a BlockCopy,
    ready: F,
}

impl<F: Fn(&State) -> bool> Future for WaitUntil<'_, F> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.engine.state.lock();
        if (self.ready)(&s) {
            Poll::Ready(())
        } else {
            s.waiters.push(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Clusters claimed for copying: released (back to be copied) if the copy
/// does not finish, e.g. because its future was dropped.
struct Claim<'a> {
    engine: &'a BlockCopy,
    run: Range<usize>,
    copied: Option<bool>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut s = self.engine.state.lock();
        for i in self.run.clone() {
            s.copying.set(i, false);
            if self.copied == Some(true) {
                s.done.set(i, true);
                s.clusters_copied += 1;
            } else {
                s.copy.set(i, true);
            }
        }
        s.wake_all();
    }
}

/// A snapshot read from `file` in progress; it ends when dropped.
pub(super) struct Frozen<'a> {
    engine: &'a BlockCopy,
    id: Option<u64>,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            let mut s = self.engine.state.lock();
            s.frozen.retain(|f| f.0 != id);
            s.wake_all();
        }
    }
}

/// A copy running on its own: counted until it ends.
pub(super) struct Detached(Arc<BlockCopy>);

impl Detached {
    pub(super) fn start(engine: &Arc<BlockCopy>) -> Self {
        engine.state.lock().detached += 1;
        Detached(engine.clone())
    }

    pub(super) fn engine(&self) -> &BlockCopy {
        &self.0
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.detached -= 1;
        s.wake_all();
    }
}
