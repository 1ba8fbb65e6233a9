//! The geometry of a qcow2 image and the meaning of its table entries
//! (docs/interop/qcow2.txt, "Cluster mapping", "Extended L2 Entries",
//! "Host cluster management").

use super::header::{Compression, Header};

/// Bits 9-55 of L1, L2 and refcount table entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1/L2 entry bit 63: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (version 3, standard entries): the cluster reads as
/// zeroes.
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u64 = 32;
/// An extended L2 entry's bitmap with every subcluster allocated.
pub const ALL_ALLOCATED: u64 = 0xffff_ffff;
/// An extended L2 entry's bitmap with every subcluster reading as zero.
pub const ALL_ZERO: u64 = 0xffff_ffff << 32;
/// The most entries an L1 table may have (32 MiB of them, QEMU's limit).
pub const MAX_L1_ENTRIES: u64 = 1 << 22;
/// The largest refcount table, in bytes (QEMU's limit): larger ones are
/// refused at open, and the table never grows past it.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Sizes derived from the header.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The cluster size in bytes.
    pub cluster_size: u64,
    /// L2 entries per L2 table.
    pub l2_entries: u64,
    /// Bytes per L2 entry: 8, or 16 with extended entries.
    pub l2_entry_bytes: u64,
    /// Whether L2 entries are extended (subclusters).
    pub extended: bool,
    /// The subcluster size (the cluster size without subclusters).
    pub subcluster_size: u64,
    /// The virtual size in bytes.
    pub size: u64,
    /// Image format version (2 or 3).
    pub version: u32,
    /// The refcount width in bits.
    pub refcount_bits: u32,
    /// Refcounts per refcount block.
    pub refcount_block_entries: u64,
    /// How compressed clusters are compressed.
    pub compression: Compression,
}

impl Geometry {
    /// The geometry of an image with this header.
    pub fn new(h: &Header) -> Geometry {
        let cluster_size = h.cluster_size();
        let extended = h.extended_l2();
        let l2_entry_bytes = if extended { 16 } else { 8 };
        let refcount_bits = 1u32 << h.refcount_order;
        Geometry {
            cluster_bits: h.cluster_bits,
            cluster_size,
            l2_entries: cluster_size / l2_entry_bytes,
            l2_entry_bytes,
            extended,
            subcluster_size: if extended {
                cluster_size / SUBCLUSTERS
            } else {
                cluster_size
            },
            size: h.size,
            version: h.version,
            refcount_bits,
            refcount_block_entries: cluster_size * 8 / u64::from(refcount_bits),
            compression: h.compression,
        }
    }

    /// The guest cluster index of a guest offset.
    pub fn cluster_of(&self, offset: u64) -> u64 {
        offset >> self.cluster_bits
    }

    /// The offset within its cluster.
    pub fn in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size - 1)
    }

    /// The L1 index of a guest cluster.
    pub fn l1_index(&self, cluster: u64) -> u64 {
        cluster / self.l2_entries
    }

    /// The L2 index of a guest cluster.
    pub fn l2_index(&self, cluster: u64) -> u64 {
        cluster % self.l2_entries
    }

    /// L1 entries needed for a virtual size.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.cluster_size).div_ceil(self.l2_entries)
    }

    /// The largest host offset a compressed cluster descriptor can hold,
    /// and how its fields are laid out: (offset bits, sector count mask).
    fn compressed_fields(&self) -> (u32, u64) {
        let x = 62 - (self.cluster_bits - 8);
        (x, (1u64 << (self.cluster_bits - 8)) - 1)
    }

    /// Where a compressed cluster's bytes are: host offset and length.
    pub fn compressed(&self, entry: u64) -> (u64, u64) {
        let (x, mask) = self.compressed_fields();
        let offset = entry & ((1u64 << x) - 1);
        let sectors = ((entry >> x) & mask) + 1;
        let len = sectors * 512 - (offset & 511);
        (offset, len)
    }
}

/// What a (sub)cluster of the guest reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    /// Data at this host offset.
    Data(u64),
    /// Zeroes, masking the backing file.
    Zero,
    /// Nothing here: the backing file, or zeroes without one.
    Unallocated,
    /// A compressed cluster: its compressed bytes' host offset and length.
    Compressed(u64, u64),
}

/// A decoded L2 entry (standard part, and the subcluster bitmap of an
/// extended entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct L2Entry {
    /// The standard 64 bits.
    pub word: u64,
    /// The subcluster bitmap (0 without extended entries).
    pub bitmap: u64,
}

/// Why an entry is unusable.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt(pub String);

impl L2Entry {
    /// The host cluster of a standard entry, if it has one.
    pub fn host(&self) -> Option<u64> {
        if self.word & COMPRESSED != 0 {
            return None;
        }
        let offset = self.word & OFFSET_MASK;
        (offset != 0).then_some(offset)
    }

    /// Whether the entry owns a host cluster that a write can reuse in
    /// place: standard, refcount one.
    pub fn writable_in_place(&self, g: &Geometry) -> bool {
        self.word & COPIED != 0
            && self.word & COMPRESSED == 0
            && self.host().is_some()
            && if g.extended {
                self.bitmap & ALL_ZERO == 0 && self.bitmap & ALL_ALLOCATED == ALL_ALLOCATED
            } else {
                self.word & ZERO == 0
            }
    }

    /// What subcluster `sub` (0 without extended entries) reads from.
    pub fn extent(&self, g: &Geometry, sub: u64) -> Result<Extent, Corrupt> {
        let w = self.word;
        if w & COMPRESSED != 0 {
            if g.extended && self.bitmap != 0 {
                return Err(Corrupt(
                    "compressed cluster with a subcluster bitmap".into(),
                ));
            }
            let (offset, len) = g.compressed(w);
            return Ok(Extent::Compressed(offset, len));
        }
        let host = w & OFFSET_MASK;
        if host & (g.cluster_size - 1) != 0 {
            return Err(Corrupt(format!(
                "L2 entry {w:#x} points to unaligned offset {host:#x}"
            )));
        }
        if g.extended {
            let allocated = self.bitmap & (1 << sub) != 0;
            let zero = self.bitmap & (1 << (sub + 32)) != 0;
            return match (allocated, zero) {
                (true, true) => Err(Corrupt(format!(
                    "subcluster {sub} both allocated and zero ({:#x})",
                    self.bitmap
                ))),
                (true, false) if host == 0 => Err(Corrupt(
                    "allocated subcluster without a host cluster".into(),
                )),
                (true, false) => Ok(Extent::Data(host + sub * g.subcluster_size)),
                (false, true) => Ok(Extent::Zero),
                (false, false) => Ok(Extent::Unallocated),
            };
        }
        if g.version >= 3 && w & ZERO != 0 {
            return Ok(Extent::Zero);
        }
        Ok(if host == 0 {
            Extent::Unallocated
        } else {
            Extent::Data(host)
        })
    }
}

/// Reads a big-endian u64 at byte `at`.
pub fn get_be64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(w)
}

/// Writes a big-endian u64 at byte `at`.
pub fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Reads refcount `i` of a refcount block of `bits`-wide entries.
pub fn get_refcount(block: &[u8], bits: u32, i: u64) -> u64 {
    let i = i as usize;
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits as usize;
            let shift = (i % per_byte) * bits as usize;
            u64::from((block[i / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        8 => u64::from(block[i]),
        16 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        32 => {
            let mut w = [0u8; 4];
            w.copy_from_slice(&block[4 * i..4 * i + 4]);
            u64::from(u32::from_be_bytes(w))
        }
        _ => get_be64(block, 8 * i),
    }
}

/// Writes refcount `i` of a refcount block; `v` fits the width.
pub fn set_refcount(block: &mut [u8], bits: u32, i: u64, v: u64) {
    let i = i as usize;
    match bits {
        1 | 2 | 4 => {
            let per_byte = 8 / bits as usize;
            let shift = (i % per_byte) * bits as usize;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[i / per_byte];
            *b = (*b & !mask) | ((v as u8) << shift);
        }
        8 => block[i] = v as u8,
        16 => block[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
        32 => block[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
        _ => put_be64(block, 8 * i, v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(cluster_bits: u32, extended: bool) -> Geometry {
        let cluster_size = 1u64 << cluster_bits;
        let l2_entry_bytes = if extended { 16 } else { 8 };
        Geometry {
            cluster_bits,
            cluster_size,
            l2_entries: cluster_size / l2_entry_bytes,
            l2_entry_bytes,
            extended,
            subcluster_size: if extended {
                cluster_size / 32
            } else {
                cluster_size
            },
            size: 1 << 30,
            version: 3,
            refcount_bits: 16,
            refcount_block_entries: cluster_size * 8 / 16,
            compression: Compression::Zlib,
        }
    }

    #[test]
    fn standard_extended_and_compressed_entries() {
        let g = geometry(16, false);
        let e = |word| L2Entry { word, bitmap: 0 };
        assert_eq!(e(0).extent(&g, 0), Ok(Extent::Unallocated));
        assert_eq!(e(COPIED | 0x50000).extent(&g, 0), Ok(Extent::Data(0x50000)));
        assert!(e(COPIED | 0x50000).writable_in_place(&g));
        assert!(!e(0x50000).writable_in_place(&g));
        assert_eq!(e(ZERO).extent(&g, 0), Ok(Extent::Zero));
        assert_eq!(e(0x50000 | ZERO).extent(&g, 0), Ok(Extent::Zero));
        assert!(e(0x50200).extent(&g, 0).is_err());
        // Compressed, 64 KiB clusters: 54 offset bits, 8 sector bits.
        let word = COMPRESSED | (2u64 << 54) | 0x7_0100;
        assert_eq!(
            e(word).extent(&g, 0),
            Ok(Extent::Compressed(0x7_0100, 3 * 512 - 256))
        );
        let x = geometry(16, true);
        let ext = L2Entry {
            word: COPIED | 0x40000,
            bitmap: 0b101 | (0b10 << 32),
        };
        assert_eq!(ext.extent(&x, 0), Ok(Extent::Data(0x40000)));
        assert_eq!(ext.extent(&x, 1), Ok(Extent::Zero));
        assert_eq!(ext.extent(&x, 2), Ok(Extent::Data(0x40000 + 2 * 2048)));
        assert_eq!(ext.extent(&x, 3), Ok(Extent::Unallocated));
        assert!(!ext.writable_in_place(&x));
        let full = L2Entry {
            word: COPIED | 0x40000,
            bitmap: ALL_ALLOCATED,
        };
        assert!(full.writable_in_place(&x));
        let both = L2Entry {
            word: COPIED | 0x40000,
            bitmap: 1 | (1 << 32),
        };
        assert!(both.extent(&x, 0).is_err());
    }

    #[test]
    fn refcounts_of_every_width() {
        for bits in [1u32, 2, 4, 8, 16, 32, 64] {
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits as u64;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            for i in 0..entries {
                set_refcount(&mut block, bits, i, (i * 7) & max);
            }
            for i in 0..entries {
                assert_eq!(get_refcount(&block, bits, i), (i * 7) & max, "{bits} bits");
            }
        }
        // 1-bit refcounts: bit 0 is the least significant.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 1, 0, 1);
        set_refcount(&mut b, 1, 3, 1);
        assert_eq!(b[0], 0b1001);
    }
}
