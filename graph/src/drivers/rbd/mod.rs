//! The `rbd` protocol driver: an image of a Ceph RADOS block device, through
//! librbd's asynchronous API.
//!
//! Reads and writes pass the request's segments to `rbd_aio_readv` and
//! `rbd_aio_writev` as they are: librbd copies from and into them and calls
//! back once it is done with them. The callback runs on a librbd thread; it
//! stores the result where the request's future finds it and wakes that
//! future, which writes the eventfd of the executor that polls it. So a
//! completion costs one uncontended mutex and one eventfd write, and no
//! queue thread ever blocks on the cluster. What librbd holds (a clone of
//! the buffer, the result slot) belongs to the callback, not to the future:
//! a dropped future leaves memory valid until librbd is done with it.
//!
//! Block status comes from `rbd_diff_iterate2` over the object map when the
//! image has the fast-diff feature (as QEMU's driver does), on the blocking
//! thread pool; without it every range reads as data. Resizing runs on the
//! pool too. `rados_connect` gives up after `client_mount_timeout` seconds
//! (10 unless the configuration file says otherwise), so an unreachable
//! cluster fails the open instead of hanging it; I/O to an OSD that is
//! down waits for the cluster to recover, as librbd's I/O always does.

mod ffi;

use std::ffi::{c_int, c_void, CString};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use serde::Deserialize;

use self::ffi::Lib;
use crate::aio::run_blocking;
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry { name: "rbd", open };

/// Seconds `rados_connect` waits for the monitors unless the configuration
/// file sets `client_mount_timeout`.
const CONNECT_TIMEOUT: &std::ffi::CStr = c"10";

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero without deallocating.
const WRITE_ZEROES_THICK: c_int = 1;

/// What a diff callback returns to stop the iteration early.
const DIFF_STOP: c_int = -9000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RbdOptions {
    pool: String,
    #[serde(default)]
    namespace: Option<String>,
    image: String,
    #[serde(default)]
    snapshot: Option<String>,
    #[serde(default)]
    conf: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    key_secret: Option<String>,
}

/// librados' and librbd's handles of one open image; closed in reverse
/// order when dropped.
struct Handles {
    lib: &'static Lib,
    rados: ffi::Rados,
    ioctx: ffi::IoCtx,
    image: ffi::Image,
    /// Set once the handles were closed (by the driver's `close`, or on
    /// drop).
    closed: std::sync::atomic::AtomicBool,
}

// SAFETY: librados and librbd handles may be used from any thread: the
// libraries lock internally, and QEMU calls them from several iothreads.
unsafe impl Send for Handles {}
// SAFETY: see the `Send` implementation above.
unsafe impl Sync for Handles {}

impl Handles {
    /// Closes the image (releasing its exclusive lock and header watch, so
    /// the next client need not wait for them to time out), the io context
    /// and the cluster connection, once. Blocks.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: each handle was created by the matching librados/librbd
        // call and is closed exactly once (the flag); nothing uses it
        // afterwards: `close` runs when the node leaves the graph, after
        // it was drained and flushed, and requests never follow; librbd
        // also waits for its own in-flight I/O in rbd_close.
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.rados.is_null() {
                (self.lib.rados_shutdown)(self.rados);
            }
        }
    }
}

impl Drop for Handles {
    fn drop(&mut self) {
        self.close();
    }
}

/// An open rbd image.
pub struct Rbd {
    handles: Arc<Handles>,
    description: String,
    size: AtomicU64,
    object_size: u64,
    /// The object map can tell allocated ranges from holes.
    fast_diff: bool,
}

fn c_string(key: &str, value: &str) -> Result<CString, Error> {
    CString::new(value)
        .map_err(|_| Error::InvalidOptions(format!("Parameter '{key}' must not contain NUL")))
}

fn os_error(ret: c_int) -> io::Error {
    io::Error::from_raw_os_error(-ret)
}

/// The system's text for a negative errno, as QEMU prints it.
fn strerror(ret: c_int) -> String {
    let text = os_error(ret).to_string();
    match text.rfind(" (os error ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn open(ctx: &mut OpenContext<'_, '_>, options: Options) -> Result<Box<dyn BlockDriver>, Error> {
    let opts: RbdOptions = options.parse("")?;
    if let Some(id) = &opts.key_secret {
        // blkgraph has no secret objects; cephx keys come from a keyring
        // named in the configuration file.
        return Err(Error::OpenFailed(format!("No secret with id '{id}'")));
    }
    let read_only = ctx.common.is_read_only();
    if opts.snapshot.is_some() && !read_only {
        return Err(Error::OpenFailed(
            "rbd snapshots are always read-only".into(),
        ));
    }
    let pool = c_string("pool", &opts.pool)?;
    let image = c_string("image", &opts.image)?;
    let namespace = opts
        .namespace
        .as_deref()
        .map(|n| c_string("namespace", n))
        .transpose()?;
    let snapshot = opts
        .snapshot
        .as_deref()
        .map(|s| c_string("snapshot", s))
        .transpose()?;
    let conf = opts
        .conf
        .as_deref()
        .map(|c| c_string("conf", c))
        .transpose()?;
    let user = opts
        .user
        .as_deref()
        .map(|u| c_string("user", &format!("client.{u}")))
        .transpose()?;
    let lib = ffi::lib().map_err(|e| Error::OpenFailed(format!("rbd: {e}")))?;

    let mut description = format!("rbd:{}/", opts.pool);
    if let Some(ns) = &opts.namespace {
        description.push_str(&format!("{ns}/"));
    }
    description.push_str(&opts.image);
    if let Some(snap) = &opts.snapshot {
        description.push_str(&format!("@{snap}"));
    }

    let mut handles = Handles {
        lib,
        rados: std::ptr::null_mut(),
        ioctx: std::ptr::null_mut(),
        image: std::ptr::null_mut(),
        closed: std::sync::atomic::AtomicBool::new(false),
    };
    let fail = |what: &str, ret: c_int| Error::OpenFailed(format!("{what}: {}", strerror(ret)));
    let cluster_name = c"ceph";
    // SAFETY: the out pointer is valid; the strings are NUL-terminated and
    // outlive the call (librados copies them).
    let ret = unsafe {
        (lib.rados_create2)(
            &mut handles.rados,
            cluster_name.as_ptr(),
            user.as_ref()
                .map_or(c"client.admin".as_ptr(), |u| u.as_ptr()),
            0,
        )
    };
    if ret < 0 {
        return Err(fail("error initializing", ret));
    }
    // SAFETY: a valid cluster handle and NUL-terminated strings.
    unsafe {
        (lib.rados_conf_set)(
            handles.rados,
            c"client_mount_timeout".as_ptr(),
            CONNECT_TIMEOUT.as_ptr(),
        )
    };
    // SAFETY: a valid cluster handle; a NULL path means the default search.
    let ret = unsafe {
        (lib.rados_conf_read_file)(
            handles.rados,
            conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        )
    };
    if ret < 0 && conf.is_some() {
        let path = opts.conf.as_deref().unwrap_or_default();
        return Err(fail(&format!("error reading conf file {path}"), ret));
    }
    // SAFETY: a valid, configured cluster handle; blocks at most
    // client_mount_timeout.
    let ret = unsafe { (lib.rados_connect)(handles.rados) };
    if ret < 0 {
        return Err(fail("error connecting", ret));
    }
    // SAFETY: a connected cluster handle, a NUL-terminated pool name and a
    // valid out pointer.
    let ret = unsafe { (lib.rados_ioctx_create)(handles.rados, pool.as_ptr(), &mut handles.ioctx) };
    if ret < 0 {
        return Err(fail(&format!("error opening pool {}", opts.pool), ret));
    }
    if let Some(ns) = &namespace {
        // SAFETY: a valid io context; librados copies the name.
        unsafe { (lib.rados_ioctx_set_namespace)(handles.ioctx, ns.as_ptr()) };
    }
    let open_fn = if read_only {
        lib.rbd_open_read_only
    } else {
        lib.rbd_open
    };
    // SAFETY: a valid io context, NUL-terminated names (or NULL for no
    // snapshot) and a valid out pointer.
    let ret = unsafe {
        open_fn(
            handles.ioctx,
            image.as_ptr(),
            &mut handles.image,
            snapshot.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
        )
    };
    if ret < 0 {
        return Err(fail(
            &format!("error reading header from {}", opts.image),
            ret,
        ));
    }
    // SAFETY: rbd_image_info_t is plain data for which zero bytes are valid.
    let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
    // SAFETY: an open image and a struct of the size passed.
    let ret = unsafe {
        (lib.rbd_stat)(
            handles.image,
            &mut info,
            std::mem::size_of::<ffi::ImageInfo>(),
        )
    };
    if ret < 0 {
        return Err(fail("error getting image info", ret));
    }
    let fast_diff = fast_diff_usable(&handles);
    Ok(Box::new(Rbd {
        handles: Arc::new(handles),
        description,
        size: AtomicU64::new(info.size),
        object_size: info.obj_size.max(1),
        fast_diff,
    }))
}

/// Where a completion leaves its result for the request's future.
enum Slot {
    Pending(Option<Waker>),
    Done(isize),
}

/// What librbd's callback owns: the result slot, shared with the future,
/// and the buffer librbd reads or writes, kept alive until librbd is done.
struct CallbackData {
    slot: Arc<Mutex<Slot>>,
    _buffer: Option<IoBuffer>,
}

/// Called by librbd, on one of its threads, once per completion.
unsafe extern "C" fn on_complete(c: ffi::Completion, arg: *mut c_void) {
    // SAFETY: `arg` is the box leaked by `Rbd::aio` for this completion,
    // and librbd calls back exactly once.
    let data = unsafe { Box::from_raw(arg.cast::<CallbackData>()) };
    let Ok(lib) = ffi::lib() else {
        return; // unreachable: the completion was made through the library
    };
    // SAFETY: `c` is the completion this callback is for; librbd allows
    // releasing it in its callback, and it is not used afterwards.
    let ret = unsafe {
        let ret = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        ret
    };
    let waker = {
        let mut slot = data.slot.lock();
        match std::mem::replace(&mut *slot, Slot::Done(ret)) {
            Slot::Pending(waker) => waker,
            Slot::Done(_) => None,
        }
    };
    // The buffer clone goes first: librbd no longer touches its memory.
    drop(data);
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The future of one `rbd_aio_*` operation: its return value.
struct AioOp {
    slot: Arc<Mutex<Slot>>,
}

impl Future for AioOp {
    type Output = io::Result<usize>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.lock();
        match &mut *slot {
            Slot::Done(ret) if *ret < 0 => Poll::Ready(Err(os_error(*ret as c_int))),
            Slot::Done(ret) => Poll::Ready(Ok(*ret as usize)),
            Slot::Pending(waker) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Rbd {
    /// Starts one asynchronous operation: `start` gets the image and a
    /// completion and calls an `rbd_aio_*` function with them. `buffer` is
    /// what the operation reads or writes.
    ///
    /// # Safety
    /// `start` must pass the completion to an operation that touches no
    /// memory other than `buffer`'s segments and their iovec array.
    unsafe fn aio(
        &self,
        buffer: Option<&IoBuffer>,
        start: impl FnOnce(&Lib, ffi::Image, ffi::Completion) -> c_int,
    ) -> io::Result<AioOp> {
        let lib = self.handles.lib;
        let slot = Arc::new(Mutex::new(Slot::Pending(None)));
        let data = Box::into_raw(Box::new(CallbackData {
            slot: slot.clone(),
            _buffer: buffer.cloned(),
        }));
        let mut c: ffi::Completion = std::ptr::null_mut();
        // SAFETY: `data` stays valid until the callback takes it back, and
        // `on_complete` has the callback's signature.
        let ret = unsafe { (lib.rbd_aio_create_completion)(data.cast(), on_complete, &mut c) };
        if ret < 0 {
            // SAFETY: no completion exists, so the box is still ours.
            drop(unsafe { Box::from_raw(data) });
            return Err(os_error(ret));
        }
        let ret = start(lib, self.handles.image, c);
        if ret < 0 {
            // librbd refused the operation before starting it: the
            // callback will not run.
            // SAFETY: the completion was not handed over; the box is ours.
            unsafe {
                (lib.rbd_aio_release)(c);
                drop(Box::from_raw(data));
            }
            return Err(os_error(ret));
        }
        Ok(AioOp { slot })
    }

    /// Starts a readv or writev of the whole buffer at `offset`.
    fn start_rw(&self, offset: u64, buf: &IoBuffer, write: bool) -> io::Result<AioOp> {
        let segs = buf.segments();
        let n = c_int::try_from(segs.len()).map_err(|_| os_error(-libc::EINVAL))?;
        let iov = segs.as_ptr();
        // SAFETY: readv writes only into the buffer's segments and writev
        // reads only them, through the buffer's iovec array; the callback
        // holds a clone of the buffer until librbd is done.
        unsafe {
            self.aio(Some(buf), |lib, image, c| {
                if write {
                    (lib.rbd_aio_writev)(image, iov, n, offset, c)
                } else {
                    (lib.rbd_aio_readv)(image, iov, n, offset, c)
                }
            })
        }
    }

    async fn flush_now(&self) -> io::Result<()> {
        // SAFETY: flush touches no request memory.
        let op = unsafe { self.aio(None, |lib, image, c| (lib.rbd_aio_flush)(image, c)) }?;
        op.await.map(|_| ())
    }

    /// `rbd_diff_iterate2` over `[offset, offset + len)`, or all data if
    /// the fast-diff map cannot answer now; blocks.
    fn diff(handles: &Handles, offset: u64, len: u64) -> io::Result<BlockStatus> {
        if !fast_diff_usable(handles) {
            return Ok(BlockStatus {
                len,
                data: true,
                zero: false,
                depth: 1,
            });
        }
        unsafe extern "C" fn cb(off: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int {
            // SAFETY: `arg` is the `DiffWalk` on `diff`'s stack, which
            // outlives the synchronous iteration.
            let walk = unsafe { &mut *arg.cast::<DiffWalk>() };
            walk.extent(off, len as u64, exists != 0)
        }
        let mut walk = DiffWalk::new(offset);
        // SAFETY: an open image; the callback matches `DiffCallback` and
        // `walk` outlives the call, which does not keep the pointer.
        let ret = unsafe {
            (handles.lib.rbd_diff_iterate2)(
                handles.image,
                std::ptr::null(),
                offset,
                len,
                1,
                1,
                cb,
                (&mut walk as *mut DiffWalk).cast(),
            )
        };
        if ret < 0 && ret != DIFF_STOP {
            return Err(os_error(ret));
        }
        Ok(walk.status(offset + len))
    }
}

/// Whether the image's fast-diff object map can answer block status: the
/// feature is on and the map valid. Without it `rbd_diff_iterate2` lists
/// every object from the OSDs. Both may change while the image is open
/// (`rbd feature disable`, a map invalidated after an error), so QEMU
/// asks before each walk, and so does blkgraph. May wait for librbd to
/// refresh the image: not for an executor's thread.
fn fast_diff_usable(handles: &Handles) -> bool {
    let lib = &handles.lib;
    let (mut features, mut flags) = (0u64, 0u64);
    // SAFETY: an open image and valid out pointers.
    let known = unsafe {
        (lib.rbd_get_features)(handles.image, &mut features) == 0
            && (lib.rbd_get_flags)(handles.image, &mut flags) == 0
    };
    known && features & ffi::FEATURE_FAST_DIFF != 0 && flags & ffi::FLAG_FAST_DIFF_INVALID == 0
}

/// What `rbd_diff_iterate2` reported from `offset` on: the data run that
/// starts there, or the hole up to the first data.
struct DiffWalk {
    offset: u64,
    /// The end of the data run that starts at `offset`, once found.
    data_end: Option<u64>,
    /// The start of the first data after a hole at `offset`.
    hole_end: Option<u64>,
    /// The walk asked librbd to stop. librbd may still call with the
    /// extents of requests it had in flight (its fallback without the
    /// fast-diff object map lists several objects at once): they must
    /// change nothing, or a later data start would stretch the hole over
    /// data in between.
    stopped: bool,
}

impl DiffWalk {
    fn new(offset: u64) -> Self {
        DiffWalk {
            offset,
            data_end: None,
            hole_end: None,
            stopped: false,
        }
    }

    /// One extent, in order: what the callback returns to librbd.
    fn extent(&mut self, off: u64, len: u64, exists: bool) -> c_int {
        if self.stopped {
            return DIFF_STOP;
        }
        let end = off.saturating_add(len);
        if !exists || end <= self.offset {
            return 0;
        }
        let start = off.max(self.offset);
        match self.data_end {
            None if start > self.offset => self.hole_end = Some(start),
            None => {
                self.data_end = Some(end);
                return 0;
            }
            Some(data_end) if start > data_end => {}
            Some(data_end) => {
                self.data_end = Some(data_end.max(end));
                return 0;
            }
        }
        self.stopped = true;
        DIFF_STOP
    }

    /// The status of `[offset, end)`.
    fn status(&self, end: u64) -> BlockStatus {
        match (self.data_end, self.hole_end) {
            (Some(data_end), _) => BlockStatus {
                len: data_end.min(end) - self.offset,
                data: true,
                zero: false,
                depth: 1,
            },
            (None, hole_end) => BlockStatus {
                len: hole_end.unwrap_or(end).min(end) - self.offset,
                data: false,
                zero: true,
                depth: 1,
            },
        }
    }
}

impl BlockDriver for Rbd {
    /// The connection was opened for reading or for writing; blkgraph does
    /// not open it again.
    fn reopen_prepare(&self, reopen: &crate::driver::Reopen<'_>) -> Result<(), Error> {
        reopen.same_read_only("rbd")
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn filename(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn limits(&self) -> crate::driver::BlockLimits {
        crate::driver::BlockLimits {
            optimal_alignment: self.object_size,
            discard_alignment: 1,
            remote: true,
            ..Default::default()
        }
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(async move {
            let n = self.start_rw(offset, buf, false)?.await?;
            if n < buf.len() {
                // Past the end of the image (it shrank): zeroes.
                buf.fill_zero(n, buf.len() - n);
            }
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            self.start_rw(offset, buf, true)?.await?;
            if flags.fua {
                // librbd has no FUA: a flush after the write makes it stable.
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(self.flush_now())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            // SAFETY: discard touches no request memory.
            let op = unsafe {
                self.aio(None, |lib, image, c| {
                    (lib.rbd_aio_discard)(image, offset, len, c)
                })
            }?;
            op.await.map(|_| ())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            let len = usize::try_from(len).map_err(|_| os_error(-libc::EINVAL))?;
            let zero_flags = if flags.may_unmap {
                0
            } else {
                WRITE_ZEROES_THICK
            };
            // SAFETY: write-zeroes touches no request memory.
            let op = unsafe {
                self.aio(None, |lib, image, c| {
                    (lib.rbd_aio_write_zeroes)(image, offset, len, c, zero_flags, 0)
                })
            }?;
            op.await?;
            if flags.fua {
                self.flush_now().await?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        Box::pin(async move {
            let len = len.min(self.size().saturating_sub(offset));
            if !self.fast_diff || len == 0 {
                return Ok(BlockStatus {
                    len,
                    data: true,
                    zero: false,
                    depth: 1,
                });
            }
            let handles = self.handles.clone();
            let out = Arc::new(Mutex::new(None));
            let theirs = out.clone();
            run_blocking(move || {
                *theirs.lock() = Some(Self::diff(&handles, offset, len));
                Ok(0)
            })
            .await?;
            let status = out.lock().take();
            status.unwrap_or_else(|| Err(os_error(-libc::EIO)))
        })
    }

    fn close(&self) -> IoFuture<'_> {
        let handles = self.handles.clone();
        Box::pin(async move {
            run_blocking(move || {
                handles.close();
                Ok(0)
            })
            .await
            .map(|_| ())
        })
    }

    fn resize(&self, size: u64) -> IoFuture<'_> {
        Box::pin(async move {
            let handles = self.handles.clone();
            run_blocking(move || {
                // SAFETY: an open image; librbd serialises resizes with I/O.
                let ret = unsafe { (handles.lib.rbd_resize)(handles.image, size) };
                if ret < 0 {
                    Err(os_error(ret))
                } else {
                    Ok(0)
                }
            })
            .await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_data_run_ends_at_the_first_gap() {
        let mut walk = DiffWalk::new(MIB);
        assert_eq!(walk.extent(0, 4 * MIB, true), 0);
        assert_eq!(walk.extent(4 * MIB, 4 * MIB, true), 0);
        assert_eq!(walk.extent(12 * MIB, 4 * MIB, true), DIFF_STOP);
        let st = walk.status(64 * MIB);
        assert_eq!((st.len, st.data, st.zero), (7 * MIB, true, false));
    }

    /// librbd's fallback walk (no usable fast-diff object map) lists
    /// several objects at once and still calls back with the extents of
    /// those in flight after the callback asked it to stop: the hole at
    /// the start then stretched to the last of them, over data.
    #[test]
    fn extents_after_a_stop_change_nothing() {
        let mut walk = DiffWalk::new(0);
        assert_eq!(walk.extent(0, 4 * MIB, false), 0);
        assert_eq!(walk.extent(4 * MIB, 4 * MIB, true), DIFF_STOP);
        assert_eq!(walk.extent(8 * MIB, 4 * MIB, true), DIFF_STOP);
        let st = walk.status(64 * MIB);
        assert_eq!((st.len, st.data, st.zero), (4 * MIB, false, true));

        let mut walk = DiffWalk::new(0);
        assert_eq!(walk.extent(0, 4 * MIB, true), 0);
        assert_eq!(walk.extent(8 * MIB, 4 * MIB, true), DIFF_STOP);
        assert_eq!(walk.extent(12 * MIB, 4 * MIB, true), DIFF_STOP);
        let st = walk.status(64 * MIB);
        assert_eq!((st.len, st.data, st.zero), (4 * MIB, true, false));
    }
}
