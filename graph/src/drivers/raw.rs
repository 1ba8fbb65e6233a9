//! The `raw` format driver: a window (`offset`, `size`) onto its `file` child.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Deserialize;

use crate::buffer::IoBuffer;
use crate::driver::{
    BlockDriver, BlockLimits, BlockStatus, ChildRole, IoFuture, WriteFlags, ZeroFlags,
};
use crate::error::Error;
use crate::node::Child;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;
use crate::permission::Permission;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry { name: "raw", open };

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawOptions {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    size: Option<u64>,
}

struct Raw {
    file: Arc<Child>,
    offset: u64,
    size: AtomicU64,
    /// Whether the size was given (`size`): such a window is not resized.
    fixed_size: bool,
}

fn open(
    ctx: &mut OpenContext<'_, '_>,
    mut options: Options,
) -> Result<Box<dyn BlockDriver>, Error> {
    let file = ctx.required_child(&mut options, ChildRole::File)?;
    let opts: RawOptions = options.parse("")?;
    let file_size = file.node().size();
    if opts.offset > file_size {
        return Err(Error::OpenFailed(format!(
            "Offset ({}) cannot be greater than size of the containing file ({file_size})",
            opts.offset
        )));
    }
    let size = opts.size.unwrap_or(file_size - opts.offset);
    if opts
        .offset
        .checked_add(size)
        .is_none_or(|end| end > file_size)
    {
        // (sic: QEMU's text has two spaces before "actual".)
        return Err(Error::OpenFailed(format!(
            "The sum of offset ({}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({file_size})",
            opts.offset
        )));
    }
    Ok(Box::new(Raw {
        file,
        offset: opts.offset,
        size: AtomicU64::new(size),
        fixed_size: opts.size.is_some(),
    }))
}

impl BlockDriver for Raw {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// As QEMU's raw: resizes the file to `offset + size`, unless the
    /// window has a fixed size.
    fn resize(&self, size: u64) -> IoFuture<'_> {
        Box::pin(async move {
            if self.fixed_size {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "Cannot resize fixed-size raw disks",
                ));
            }
            let end = self
                .offset
                .checked_add(size)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            self.file.node().resize(end).await?;
            self.size.store(size, Ordering::Release);
            Ok(())
        })
    }

    fn limits(&self) -> BlockLimits {
        self.file.node().limits()
    }

    /// Like QEMU's raw: reads its child consistently, passes its parents'
    /// needs down, and lets nobody resize the child (that would move the
    /// data area); other writers are fine (e.g. two raw windows on one file).
    fn child_perm(
        &self,
        _role: ChildRole,
        perm: Permission,
        shared: Permission,
    ) -> (Permission, Permission) {
        (
            perm | Permission::CONSISTENT_READ,
            shared & !Permission::RESIZE,
        )
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        let file = self.file.node();
        Box::pin(async move { file.read(self.offset + offset, buf).await })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoBuffer, flags: WriteFlags) -> IoFuture<'a> {
        let file = self.file.node();
        Box::pin(async move { file.write(self.offset + offset, buf, flags).await })
    }

    fn flush(&self) -> IoFuture<'_> {
        let file = self.file.node();
        Box::pin(async move { file.flush().await })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_> {
        let file = self.file.node();
        Box::pin(async move { file.discard(self.offset + offset, len).await })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_> {
        let file = self.file.node();
        Box::pin(async move { file.write_zeroes(self.offset + offset, len, flags).await })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        let file = self.file.node();
        Box::pin(async move { file.block_status(self.offset + offset, len).await })
    }
}

#[cfg(test)]
mod tests {
    use crate::aio::block_on;
    use crate::{Graph, IoBuffer, Options, WriteFlags};

    #[test]
    fn window_onto_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let graph = Graph::new();
        let arg = format!(
            "driver=raw,node-name=r,offset=4096,size=8192,file.driver=file,file.filename={}",
            path.display()
        );
        let node = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
        assert_eq!(node.size(), 8192);
        assert_eq!(graph.nodes().len(), 2, "the inline file node is registered");
        block_on(async {
            let buf = IoBuffer::from_vec(vec![0xabu8; 512]);
            node.write(512, &buf, WriteFlags::default()).await.unwrap();
            assert!(node.write(8192, &buf, WriteFlags::default()).await.is_err());
        })
        .unwrap();
        let img = std::fs::read(&path).unwrap();
        assert!(img[4096 + 512..4096 + 1024].iter().all(|&b| b == 0xab));
        assert_eq!(img[4096 + 511], 0);
    }

    /// Huge offsets and sizes are refused with QEMU's texts; nothing wraps.
    #[test]
    fn huge_windows_are_refused() {
        let graph = Graph::new();
        graph
            .add(Options::from_arg("driver=null-co,node-name=f,size=1M", None).unwrap())
            .unwrap();
        let max = u64::MAX;
        for (arg, text) in [
            (
                format!("offset={max}"),
                format!("Offset ({max}) cannot be greater than size of the containing file (1048576)"),
            ),
            (
                format!("size={max}"),
                format!("The sum of offset (0) and size ({max}) has to be smaller or equal to the  actual size of the containing file (1048576)"),
            ),
            (
                format!("offset=512,size={}", max - 511),
                format!("The sum of offset (512) and size ({}) has to be smaller or equal to the  actual size of the containing file (1048576)", max - 511),
            ),
        ] {
            let arg = format!("driver=raw,node-name=r,file=f,{arg}");
            let e = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap_err();
            assert_eq!(e.to_string(), text);
        }
        let r = graph
            .add(Options::from_arg("driver=raw,node-name=r,file=f,offset=1M", None).unwrap())
            .unwrap();
        assert_eq!(r.size(), 0);
    }

    #[test]
    fn bad_window_fails_and_leaves_no_node() {
        let graph = Graph::new();
        let arg = "driver=raw,node-name=r,offset=1,size=1G,file.driver=null-co,file.size=1M";
        let e = graph
            .add(Options::from_arg(arg, None).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("has to be smaller or equal"), "{e}");
        assert!(graph.nodes().is_empty());
        let e = graph
            .add(Options::from_arg("driver=raw,node-name=r,file=nope", None).unwrap())
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Cannot find device='nope' nor node-name='nope'"
        );
        let e = graph
            .add(
                Options::from_arg(
                    "driver=raw,node-name=r,file.driver=null-co,file.bogus=1",
                    None,
                )
                .unwrap(),
            )
            .unwrap_err();
        assert_eq!(e.to_string(), "Parameter 'file.bogus' is unexpected");
    }
}
