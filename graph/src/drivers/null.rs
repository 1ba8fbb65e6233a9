//! The `null-co` driver: a device that stores nothing.

use serde::Deserialize;

use super::{DriverEntry, OpenContext};
use crate::buffer::IoBuffer;
use crate::driver::{BlockDriver, BlockStatus, IoFuture, WriteFlags, ZeroFlags};
use crate::error::Error;
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
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::aio::block_on;
    use crate::{Graph, IoBuffer, Options};

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
