//! The `file` protocol driver: a host file or block device.
//!
//! I/O goes through the executor's io_uring (`aio=io_uring`, the default;
//! `aio=native` is taken as a synonym) or through a thread pool
//! (`aio=threads`). Guest buffers are passed to the kernel as they are; with
//! `cache.direct=on` a request whose memory, offset or length is not aligned
//! goes through an aligned bounce buffer.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use io_uring::{opcode, types};
use parking_lot::Mutex;
use serde::Deserialize;

use crate::aio::{run_blocking, submit, BlockingOp, Keepalive, UringOp};
use crate::buffer::{AlignedBuffer, IoBuffer};
use crate::driver::{
    BlockDriver, BlockLimits, BlockStatus, IoFuture, Reopen, WriteFlags, ZeroFlags,
};
use crate::error::Error;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry { name: "file", open };

/// Largest chunk of zeroes written when fallocate cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// How I/O is submitted.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Aio {
    /// A thread pool doing preadv/pwritev.
    Threads,
    /// Kernel asynchronous I/O; served by io_uring in blkgraph.
    Native,
    /// io_uring on the executor's ring.
    #[default]
    IoUring,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileOptions {
    filename: String,
    #[serde(default)]
    aio: Aio,
    #[serde(default)]
    locking: Option<String>,
    #[serde(default)]
    aio_max_batch: Option<u64>,
}

/// An open file.
pub struct File {
    filename: String,
    /// Swapped for one opened again by a reopen that changes read-only,
    /// in a drained section: no request holds the old one.
    file: ArcSwap<std::fs::File>,
    /// The size: a regular file grows with writes past its end.
    size: AtomicU64,
    /// A block device, whose size is fixed.
    block_device: bool,
    direct: bool,
    align: u64,
    aio: Aio,
    /// Buffered writes go to the thread pool: the file system cannot do
    /// them without blocking, so io_uring would hand them to its io-wq
    /// workers, which serialise writes to one file.
    pool_writes: AtomicBool,
    /// The file a prepared reopen opened, and its `pool_writes`.
    reopened: Mutex<Option<(Arc<std::fs::File>, bool)>>,
}

fn open(ctx: &mut OpenContext<'_, '_>, options: Options) -> Result<Box<dyn BlockDriver>, Error> {
    let opts: FileOptions = options.parse("")?;
    if let Some(locking) = opts.locking.as_deref() {
        if !matches!(locking, "auto" | "off") {
            return Err(Error::InvalidOptions(format!(
                "Parameter 'locking' does not accept value '{locking}': blkgraph takes no image locks (use auto or off)"
            )));
        }
    }
    let _ = opts.aio_max_batch;
    let read_only = ctx.common.is_read_only();
    let direct = ctx.common.direct();
    let file = open_file(&opts.filename, read_only, direct)?;
    let meta = file.metadata().map_err(|source| Error::Open {
        filename: opts.filename.clone(),
        source,
    })?;
    let block_device = meta.file_type().is_block_device();
    let size = if block_device {
        block_device_size(file.as_raw_fd()).map_err(|source| Error::Open {
            filename: opts.filename.clone(),
            source,
        })?
    } else {
        meta.len()
    };
    let align = if direct {
        probe_alignment(file.as_raw_fd())
    } else {
        1
    };
    let pool_writes = pool_writes(&file, read_only, direct);
    Ok(Box::new(File {
        filename: opts.filename.clone(),
        file: ArcSwap::from_pointee(file),
        size: AtomicU64::new(size),
        block_device,
        direct,
        align,
        aio: opts.aio,
        pool_writes: AtomicBool::new(pool_writes),
        reopened: Mutex::new(None),
    }))
}

/// Opens `filename` for reading, and writing unless `read_only`.
fn open_file(filename: &str, read_only: bool, direct: bool) -> Result<std::fs::File, Error> {
    let mut oo = OpenOptions::new();
    oo.read(true).write(!read_only);
    if direct {
        oo.custom_flags(libc::O_DIRECT);
    }
    oo.open(filename).map_err(|source| Error::Open {
        filename: filename.to_string(),
        source,
    })
}

/// Whether buffered writes to `file` go to the thread pool.
fn pool_writes(file: &std::fs::File, read_only: bool, direct: bool) -> bool {
    !direct && !read_only && !nowait_buffered_writes(file.as_raw_fd())
}

/// Whether the file system takes buffered writes without blocking
/// (RWF_NOWAIT): XFS and btrfs do; ext4 and others answer EOPNOTSUPP.
fn nowait_buffered_writes(fd: RawFd) -> bool {
    const XFS_MAGIC: i64 = 0x5846_5342;
    const BTRFS_MAGIC: i64 = 0x9123_683e;
    // SAFETY: statfs is a plain C struct for which all-zero bytes are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes only into the struct passed.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between architectures
    let kind = st.f_type as i64;
    kind == XFS_MAGIC || kind == BTRFS_MAGIC
}

/// `_IOR(0x12, 114, size_t)`: the size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is valid.
    let ret = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// The smallest alignment an O_DIRECT read accepts: 512 or 4096.
fn probe_alignment(fd: RawFd) -> u64 {
    let Ok(mut buf) = AlignedBuffer::new(4096, 4096) else {
        return 4096;
    };
    // SAFETY: the buffer holds 4096 bytes, more than the 512 read.
    let ret = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), 512, 0) };
    let _ = &mut buf;
    if ret >= 0 {
        512
    } else {
        4096
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl File {
    fn fd(&self) -> RawFd {
        self.file.load().as_raw_fd()
    }

    /// One readv/writev of the whole buffer, on io_uring or the pool;
    /// returns the bytes transferred.
    async fn transfer_once(
        &self,
        offset: u64,
        buf: &IoBuffer,
        write: bool,
        fua: bool,
    ) -> io::Result<usize> {
        let aio = if write && self.pool_writes.load(Ordering::Relaxed) {
            Aio::Threads
        } else {
            self.aio
        };
        match aio {
            Aio::IoUring | Aio::Native => {
                Ok(self.submit_rw(offset, buf, write, fua)?.await? as usize)
            }
            Aio::Threads => Ok(self.spawn_rw(offset, buf, write, fua).await? as usize),
        }
    }

    /// # Safety
    fn submit_rw(
        &self,
        offset: u64,
        buf: &IoBuffer,
        write: bool,
        fua: bool,
    ) -> io::Result<UringOp> {
        let iovecs = buf.segments();
        let fd = types::Fd(self.fd());
        let (ptr, n) = (iovecs.as_ptr(), iovecs.len() as u32);
        let entry = if write {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            opcode::Writev::new(fd, ptr, n)
                .offset(offset)
                .rw_flags(flags)
                .build()
        } else {
            opcode::Readv::new(fd, ptr, n).offset(offset).build()
        };
        // SAFETY: the entry points to the buffer's iovec array and memory,
        // which the clone kept until the completion holds.
        unsafe { submit(entry, Keepalive::Buffer(buf.clone())) }
    }

    fn spawn_rw(&self, offset: u64, buf: &IoBuffer, write: bool, fua: bool) -> BlockingOp {
        let file = self.file.load_full();
        let buf = buf.clone();
        run_blocking(move || {
            let segs = buf.segments();
            let (fd, ptr, cnt) = (file.as_raw_fd(), segs.as_ptr(), segs.len() as i32);
            let off = offset as libc::off_t;
            // SAFETY: the iovecs and their memory belong to `buf`, which
            // this job holds until the call returns.
            let ret = unsafe {
                if write {
                    let flags = if fua { libc::RWF_DSYNC } else { 0 };
                    libc::pwritev2(fd, ptr, cnt, off, flags)
                } else {
                    libc::preadv(fd, ptr, cnt, off)
                }
            };
            if ret < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(ret as u64)
            }
        })
    }

    /// Transfers the whole buffer, resubmitting after short transfers; a
    /// read past the end of the file fills zeroes.
    async fn transfer(
        &self,
        offset: u64,
        buf: &IoBuffer,
        write: bool,
        fua: bool,
    ) -> io::Result<()> {
        let mut done = self.transfer_once(offset, buf, write, fua).await?;
        while done < buf.len() {
            let rest = buf.slice(done, buf.len() - done);
            let n = self
                .transfer_once(offset + done as u64, &rest, write, fua)
                .await?;
            if n == 0 {
                if write {
                    return Err(errno(libc::EIO));
                }
                rest.fill_zero(0, rest.len());
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn needs_bounce(&self, offset: u64, buf: &IoBuffer) -> bool {
        self.direct && (!offset.is_multiple_of(self.align) || !buf.is_aligned(self.align as usize))
    }

    async fn read_bounced(&self, offset: u64, buf: &IoBuffer) -> io::Result<()> {
        let start = offset - offset % self.align;
        let end = (offset + buf.len() as u64).div_ceil(self.align) * self.align;
        let bounce = IoBuffer::aligned((end - start) as usize, self.align as usize)?;
        self.transfer(start, &bounce, false, false).await?;
        buf.copy_from_buffer(0, &bounce, (offset - start) as usize, buf.len());
        Ok(())
    }

    async fn write_bounced(&self, offset: u64, buf: &IoBuffer, fua: bool) -> io::Result<()> {
        if !offset.is_multiple_of(self.align) || !(buf.len() as u64).is_multiple_of(self.align) {
            // A read-modify-write could race with a concurrent write of the
            // same block; the export refuses block sizes below the alignment.
            return Err(errno(libc::EINVAL));
        }
        let bounce = IoBuffer::aligned(buf.len(), self.align as usize)?;
        bounce.copy_from_buffer(0, buf, 0, buf.len());
        self.transfer(offset, &bounce, true, fua).await
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        match self.aio {
            Aio::IoUring | Aio::Native => {
                let entry = opcode::Fallocate::new(types::Fd(self.fd()), len)
                    .offset(offset)
                    .mode(mode)
                    .build();
                // SAFETY: fallocate points to no memory.
                unsafe { submit(entry, Keepalive::Nothing) }?
                    .await
                    .map(|_| ())
            }
            Aio::Threads => {
                let file = self.file.load_full();
                run_blocking(move || {
                    // SAFETY: fallocate on an owned, open descriptor.
                    let ret = unsafe {
                        libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64)
                    };
                    if ret < 0 {
                        Err(io::Error::last_os_error())
                    } else {
                        Ok(0)
                    }
                })
                .await
                .map(|_| ())
            }
        }
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        let chunk = ZERO_CHUNK.min(len) as usize;
        let zeroes = IoBuffer::aligned(chunk, 4096)?;
        let mut done = 0;
        while done < len {
            let n = chunk.min((len - done) as usize);
            self.transfer(offset + done, &zeroes.slice(0, n), true, fua)
                .await?;
            done += n as u64;
        }
        Ok(())
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

impl BlockDriver for File {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn extends_on_write(&self) -> bool {
        !self.block_device
    }

    fn resize(&self, size: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if self.block_device {
                return Err(errno(libc::ENOTSUP));
            }
            let file = self.file.load_full();
            run_blocking(move || file.set_len(size).map(|_| 0)).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn limits(&self) -> BlockLimits {
        BlockLimits {
            request_alignment: self.align,
            ..BlockLimits::default()
        }
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }

    /// Opens the file again (read-write or read-only, as QEMU's
    /// raw_reopen_prepare) when read-only changes; the new descriptor
    /// takes the old one's place at commit.
    fn reopen_prepare(&self, reopen: &Reopen<'_>) -> Result<(), Error> {
        if reopen.read_only == reopen.was_read_only {
            return Ok(());
        }
        let file = open_file(&self.filename, reopen.read_only, self.direct)?;
        let pool = pool_writes(&file, reopen.read_only, self.direct);
        *self.reopened.lock() = Some((Arc::new(file), pool));
        Ok(())
    }

    /// The new descriptor in, the old one closed (no request holds it in
    /// a drained section).
    fn reopen_commit(&self) {
        if let Some((file, pool)) = self.reopened.lock().take() {
            self.pool_writes.store(pool, Ordering::Relaxed);
            self.file.store(file);
        }
    }

    fn reopen_abort(&self) {
        self.reopened.lock().take();
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        Box::pin(async move {
            if self.needs_bounce(offset, buf) {
                self.read_bounced(offset, buf).await
            } else {
                self.transfer(offset, buf, false, false).await
            }
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            if self.needs_bounce(offset, buf) {
                self.write_bounced(offset, buf, flags.fua).await?;
            } else {
                self.transfer(offset, buf, true, flags.fua).await?;
            }
            self.size
                .fetch_max(offset + buf.len() as u64, Ordering::AcqRel);
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move {
            match self.aio {
                Aio::IoUring | Aio::Native => {
                    let entry = opcode::Fsync::new(types::Fd(self.fd()))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build();
                    // SAFETY: fsync points to no memory.
                    unsafe { submit(entry, Keepalive::Nothing) }?
                        .await
                        .map(|_| ())
                }
                Aio::Threads => {
                    let file = self.file.load_full();
                    run_blocking(move || file.sync_data().map(|_| 0))
                        .await
                        .map(|_| ())
                }
            }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        Box::pin(async move {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                // A discard is advisory: nothing to do if the file can't.
                Err(e) if is_unsupported(&e) => Ok(()),
                other => other,
            }
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        Box::pin(async move {
            let mode = if flags.may_unmap {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            };
            match self.fallocate(mode, offset, len).await {
                Err(e) if is_unsupported(&e) || e.raw_os_error() == Some(libc::EINVAL) => {
                    self.write_zero_buffers(offset, len, flags.fua).await
                }
                Err(e) => Err(e),
                Ok(()) if flags.fua => self.flush().await,
                Ok(()) => Ok(()),
            }
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        let fd = self.fd();
        let size = self.size();
        let status = (|| {
            let end = (offset + len).min(size);
            // SAFETY: lseek on an owned, open descriptor.
            let data = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_DATA) };
            if data < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    // No data after offset: a hole up to the end.
                    Some(libc::ENXIO) => Ok(BlockStatus {
                        len: end - offset,
                        data: false,
                        zero: true,
                        depth: 1,
                    }),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(BlockStatus {
                        len: end - offset,
                        data: true,
                        zero: false,
                        depth: 1,
                    }),
                    _ => Err(e),
                };
            }
            let data = data as u64;
            if data > offset {
                return Ok(BlockStatus {
                    len: data.min(end) - offset,
                    data: false,
                    zero: true,
                    depth: 1,
                });
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, offset as i64, libc::SEEK_HOLE) };
            let hole = if hole < 0 {
                end
            } else {
                (hole as u64).min(end)
            };
            Ok(BlockStatus {
                len: hole.max(offset + 1) - offset,
                data: true,
                zero: false,
                depth: 1,
            })
        })();
        Box::pin(std::future::ready(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aio::block_on;
    use crate::{Graph, Options};
    use serde_json::json;

    fn open_file(path: &str, extra: serde_json::Value) -> Arc<crate::Node> {
        let mut opts =
            json!({"driver": "file", "node-name": "f", "filename": path, "discard": "unmap"});
        opts.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let graph = Graph::new();
        graph.add(Options::from_json(opts).unwrap()).unwrap()
    }

    fn roundtrip(extra: serde_json::Value) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let node = open_file(path.to_str().unwrap(), extra);
        assert_eq!(node.size(), 1 << 20);
        block_on(async {
            // Unaligned memory and offsets exercise the bounce path with O_DIRECT.
            let data: Vec<u8> = (0..12289u32).map(|i| (i * 7) as u8).collect();
            let wbuf = IoBuffer::from_vec(data.clone()).slice(1, 12288);
            node.write(4096, &wbuf, WriteFlags::default())
                .await
                .unwrap();
            let rbuf = IoBuffer::from_vec(vec![0u8; 12288]);
            node.read(4096, &rbuf).await.unwrap();
            assert_eq!(rbuf.to_vec(), &data[1..]);
            node.flush().await.unwrap();
            let obuf = IoBuffer::from_vec(vec![0u8; 100]);
            node.read(4096 + 7, &obuf).await.unwrap();
            assert_eq!(obuf.into_vec(), &data[8..108]);
            node.write_zeroes(4096, 4096, ZeroFlags::default())
                .await
                .unwrap();
            node.read(4096, &rbuf).await.unwrap();
            let back = rbuf.to_vec();
            assert!(back[..4096].iter().all(|&b| b == 0));
            assert_eq!(&back[4096..], &data[4097..]);
            // Out of range.
            assert_eq!(
                node.read((1 << 20) - 4096, &rbuf)
                    .await
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EIO)
            );
        })
        .unwrap();
    }

    struct Holder;
    impl crate::DrainParent for Holder {
        fn drained_begin(&self) {}
        fn drained_end(&self) {}
    }

    /// Writes past the end grow the file only while a parent holds the
    /// resize permission; resizing needs it too.
    #[test]
    fn writes_past_the_end_need_the_resize_permission() {
        use crate::Permission;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let graph = Graph::new();
        let arg = format!("driver=file,node-name=f,filename={}", path.display());
        let node = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
        let buf = IoBuffer::from_vec(vec![7u8; 4096]);
        let eio = Some(libc::EIO);
        block_on(async {
            let e = node.write(8192, &buf, WriteFlags::default()).await;
            assert_eq!(e.unwrap_err().raw_os_error(), eio);
            let e = node.resize(1 << 20).await;
            assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::EPERM));
        })
        .unwrap();
        let rw = Permission::CONSISTENT_READ | Permission::WRITE;
        graph
            .attach_export(
                "e",
                "f",
                rw | Permission::RESIZE,
                Permission::ALL,
                Arc::new(Holder),
            )
            .unwrap();
        block_on(async {
            node.write(12288, &buf, WriteFlags::default())
                .await
                .unwrap();
            assert_eq!(node.size(), 16384);
            let back = IoBuffer::from_vec(vec![1u8; 12288]);
            node.read(8192, &back).await.unwrap();
            let back = back.into_vec();
            assert!(back[..4096].iter().all(|&b| b == 0), "the gap reads zeroes");
            assert!(back[4096..8192].iter().all(|&b| b == 7));
            assert!(back[8192..].iter().all(|&b| b == 0), "past the end too");
            node.resize(4096).await.unwrap();
            assert_eq!(node.size(), 4096);
        })
        .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        graph.detach_export("e").unwrap();
        graph
            .attach_export("e", "f", rw, Permission::ALL, Arc::new(Holder))
            .unwrap();
        block_on(async {
            let e = node.write(4096, &buf, WriteFlags::default()).await;
            assert_eq!(
                e.unwrap_err().raw_os_error(),
                eio,
                "the grant went with the edge"
            );
            let e = node.read(4096, &buf).await;
            assert_eq!(e.unwrap_err().raw_os_error(), eio);
        })
        .unwrap();
    }

    #[test]
    fn io_uring_roundtrip() {
        roundtrip(json!({}));
    }

    #[test]
    fn threads_roundtrip() {
        roundtrip(json!({"aio": "threads"}));
    }

    #[test]
    fn direct_roundtrip() {
        roundtrip(json!({"cache": {"direct": true}}));
        roundtrip(json!({"cache": {"direct": true}, "aio": "threads"}));
    }

    #[test]
    fn discard_punches_holes_and_status_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 4 << 20]).unwrap();
        let node = open_file(path.to_str().unwrap(), json!({}));
        let before = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        block_on(async {
            node.discard(1 << 20, 2 << 20).await.unwrap();
            let st = node.block_status(1 << 20, 2 << 20).await.unwrap();
            assert_eq!(
                st,
                BlockStatus {
                    len: 2 << 20,
                    data: false,
                    zero: true,
                    depth: 1,
                }
            );
            let st = node.block_status(0, 4 << 20).await.unwrap();
            assert_eq!(
                st,
                BlockStatus {
                    len: 1 << 20,
                    data: true,
                    zero: false,
                    depth: 1,
                }
            );
        })
        .unwrap();
        let after = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(after < before, "{after} < {before}");
    }

    #[test]
    fn missing_file_and_bad_options() {
        let graph = Graph::new();
        let e = graph
            .add(
                Options::from_arg("driver=file,node-name=a,filename=/nonexistent/x", None).unwrap(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Could not open '/nonexistent/x': No such file or directory (os error 2)"
        );
        let e = graph
            .add(
                Options::from_arg("driver=file,node-name=a,filename=/dev/null,aio=fast", None)
                    .unwrap(),
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Parameter 'aio' does not accept value 'fast'"
        );
        let e = graph
            .add(Options::from_arg("driver=file,node-name=a,filenme=x", None).unwrap())
            .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'filenme' is unexpected");
        assert!(graph.nodes().is_empty());
    }
}
