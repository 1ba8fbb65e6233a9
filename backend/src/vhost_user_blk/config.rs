//! The virtio-blk configuration space.

use virtio_bindings::virtio_blk::virtio_blk_config;
use vm_memory::ByteValued;

/// Largest discard in sectors (QEMU's VIRTIO_BLK_MAX_DISCARD_SECTORS).
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Largest write-zeroes in sectors.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// Data segments per request the driver may use.
pub const SEG_MAX: u32 = 128 - 2;
/// Offset of the `wce` byte, the only field a driver may write.
pub const WCE_OFFSET: usize = std::mem::offset_of!(virtio_blk_config, wce);

/// The configuration space as the driver reads it.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct BlkConfig(pub virtio_blk_config);

// SAFETY: virtio_blk_config is a packed C struct of plain integers: any byte
// pattern is a valid value and it has no padding.
unsafe impl ByteValued for BlkConfig {}

impl BlkConfig {
    /// The configuration of a device of `size` bytes, like
    /// qemu-storage-daemon's, but starting in writeback mode (`wce` = 1) so
    /// that drivers send flushes.
    pub fn new(size: u64, block_size: u32, num_queues: u16) -> Self {
        let mut c = virtio_blk_config {
            capacity: (size >> 9).to_le(),
            size_max: 0,
            seg_max: SEG_MAX.to_le(),
            blk_size: block_size.to_le(),
            min_io_size: 1u16.to_le(),
            opt_io_size: 1u32.to_le(),
            wce: 1,
            num_queues: num_queues.to_le(),
            max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
            max_discard_seg: 1u32.to_le(),
            discard_sector_alignment: (block_size >> 9).to_le(),
            max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.to_le(),
            max_write_zeroes_seg: 1u32.to_le(),
            ..Default::default()
        };
        c.write_zeroes_may_unmap = 1;
        BlkConfig(c)
    }

    /// `size` bytes from `offset`, zero-padded past the end.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let bytes = self.as_slice();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize + size as usize).min(bytes.len());
        out[..end - start].copy_from_slice(&bytes[start..end]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_is_exactly_the_size_asked() {
        let c = BlkConfig::new(1 << 30, 512, 2);
        assert_eq!(c.read(0, 8), (2097152u64).to_le_bytes().to_vec());
        assert_eq!(c.read(0, 1000).len(), 1000);
        assert_eq!(c.read(4096, 4), vec![0; 4]);
        assert_eq!(c.read(WCE_OFFSET as u32, 1), vec![1]);
    }
}
