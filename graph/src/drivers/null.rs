//! The `null-co` driver: a device that stores nothing.

use serde::Deserialize;

use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
use crate::open::{DriverEntry, OpenContext};
use crate::options::Options;

/// The table entry.
pub const ENTRY: DriverEntry = DriverEntry {
    name: "null-co",
    open,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NullOptions {
    #[serde(default = "default_size")]
    size: u64,
    #[serde(default)]
    read_zeroes: bool,
}

fn default_size() -> u64 {
    1 << 30
}

struct Null {
    size: u64,
    read_zeroes: bool,
}

fn open(_ctx: &mut OpenContext<'_, '_>, options: Options) -> Result<Box<dyn BlockDriver>, Error> {
    let opts: NullOptions = options.parse("")?;
    Ok(Box::new(Null {
        size: opts.size,
        read_zeroes: opts.read_zeroes,
    }))
}

fn done<'a, T: Send + 'a>(value: T) -> IoFuture<'a, T> {
    Box::pin(std::future::ready(Ok(value)))
}

impl BlockDriver for Null {
    fn size(&self) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, _offset: u64, buf: &'a IoBuffer) -> IoFuture<'a> {
        if self.read_zeroes {
            buf.fill_zero(0, buf.len());
        }
        done(())
    }

    fn write<'a>(&'a self, _: u64, _: &'a IoBuffer, _: WriteFlags) -> IoFuture<'a> {
        done(())
    }

    fn flush(&self) -> IoFuture<'_> {
        done(())
    }

    fn discard(&self, _: u64, _: u64) -> IoFuture<'_> {
        done(())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> IoFuture<'_> {
        done(())
    }

    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        done(BlockStatus {
            len,
            data: !self.read_zeroes,
            zero: self.read_zeroes,
            depth: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::aio::block_on;
    use crate::{Graph, IoBuffer, Options, WriteFlags, ZeroFlags, MAX_LENGTH};

    /// Sizes up to QEMU's limit are taken, larger ones refused with its
    /// text; requests at and past the end of the largest node fail
    /// without wrapping around.
    #[test]
    fn sizes_up_to_qemus_limit() {
        let graph = Graph::new();
        for size in [MAX_LENGTH + 1, MAX_LENGTH + 512, i64::MAX as u64, u64::MAX] {
            let arg = format!("driver=null-co,node-name=n,size={size}");
            let e = graph
                .add(Options::from_arg(&arg, None).unwrap())
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "Could not refresh total sector count: File too large"
            );
        }
        assert!(graph.nodes().is_empty());
        let arg = format!("driver=null-co,node-name=n,size={MAX_LENGTH},read-zeroes=on");
        let node = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
        assert_eq!(node.size(), MAX_LENGTH);
        let buf = IoBuffer::from_vec(vec![1u8; 4096]);
        block_on(async {
            node.read(MAX_LENGTH - 4096, &buf).await.unwrap();
            for offset in [MAX_LENGTH - 4095, MAX_LENGTH, u64::MAX - 100, u64::MAX] {
                assert!(node.read(offset, &buf).await.is_err());
                let flags = WriteFlags::default();
                assert!(node.write(offset, &buf, flags).await.is_err());
                assert!(node.discard(offset, u64::MAX).await.is_err());
                let zero = ZeroFlags::default();
                assert!(node.write_zeroes(offset, u64::MAX, zero).await.is_err());
                assert!(node.block_status(offset, u64::MAX).await.is_err());
            }
        })
        .unwrap();
    }

    #[test]
    fn reads_zeroes_when_asked() {
        let graph = Graph::new();
        let node = graph
            .add(
                Options::from_arg("driver=null-co,node-name=n,size=1M,read-zeroes=on", None)
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(node.size(), 1 << 20);
        let buf = IoBuffer::from_vec(vec![9u8; 4096]);
        block_on(node.read(0, &buf)).unwrap().unwrap();
        assert!(buf.into_vec().iter().all(|&b| b == 0));
    }
}
