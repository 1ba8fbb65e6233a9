//! A new, empty qcow2 image (blockdev-create): the options checked as
//! QEMU's qcow2_co_create checks them, and the metadata laid out as
//! qemu-img lays it out: the header, the refcount table, the refcount
//! blocks and an L1 table of zeroes, each cluster counted once.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub use super::header::Compression;
use super::header::{Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_EXTL2};
use super::layout::{put_be64, set_refcount, MAX_L1_ENTRIES};

/// The options of a new qcow2 image (QAPI's BlockdevCreateOptionsQcow2,
/// without the file, encryption and data file).
#[derive(Clone, Debug)]
pub struct Qcow2CreateOptions {
    /// The virtual size in bytes.
    pub size: u64,
    /// 2 (compat 0.10) or 3 (compat 1.1, the default).
    pub version: u32,
    /// Bytes per cluster (64 KiB by default).
    pub cluster_size: u64,
    /// Bits per refcount (16 by default).
    pub refcount_bits: u32,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// The backing file name written in the header.
    pub backing_file: Option<String>,
    /// Its format.
    pub backing_fmt: Option<String>,
}

impl Qcow2CreateOptions {
    /// QEMU's defaults for an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        Qcow2CreateOptions {
            size,
            version: 3,
            cluster_size: 64 << 10,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: Compression::Zlib,
            backing_file: None,
            backing_fmt: None,
        }
    }
}

/// The metadata of a new image: what to write where, and the file's
/// size once written.
pub struct Layout {
    /// (offset, bytes), whole clusters.
    pub writes: Vec<(u64, Vec<u8>)>,
    /// The end of the last cluster.
    pub file_size: u64,
}

/// Checks the options as QEMU does (its texts) and lays out the image.
pub fn layout(o: &Qcow2CreateOptions) -> Result<Layout, String> {
    let cs = o.cluster_size;
    if !o.size.is_multiple_of(512) {
        return Err("Image size must be a multiple of 512 bytes".into());
    }
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err("Cluster size must be a power of two between 512 and 2048k".into());
    }
    if !o.refcount_bits.is_power_of_two() || o.refcount_bits > 64 {
        return Err("Refcount width must be a power of two and may not exceed 64 bits".into());
    }
    if o.version == 2 {
        if o.refcount_bits != 16 {
            return Err("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)".into());
        }
        if o.lazy_refcounts {
            return Err("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if o.extended_l2 {
            return Err("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
        if o.compression != Compression::Zlib {
            return Err("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)".into());
        }
    }
    if o.extended_l2 && cs < 16 << 10 {
        return Err(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .into(),
        );
    }
    if o.backing_fmt.is_some() && o.backing_file.is_none() {
        return Err("Backing format cannot be used without backing file".into());
    }
    let entry_bytes = if o.extended_l2 { 16 } else { 8 };
    let l2_entries = cs / entry_bytes;
    let l1_entries = o.size.div_ceil(cs).div_ceil(l2_entries);
    if l1_entries > MAX_L1_ENTRIES {
        return Err("The image size is too large for the cluster size".into());
    }
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    // Header, refcount table, refcount blocks, L1 table: find the table
    // and block counts that count every cluster, themselves included.
    let per_block = cs * 8 / u64::from(o.refcount_bits);
    let (mut table, mut blocks) = (1u64, 1u64);
    loop {
        let total = 1 + table + blocks + l1_clusters;
        let b = total.div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (t, b) == (table, blocks) {
            break;
        }
        (table, blocks) = (t, b);
    }
    let total = 1 + table + blocks + l1_clusters;
    let mut refcount_table = vec![0u8; (table * cs) as usize];
    let mut refblocks = vec![0u8; (blocks * cs) as usize];
    for b in 0..blocks {
        put_be64(&mut refcount_table, (b * 8) as usize, (1 + table + b) * cs);
    }
    for c in 0..total {
        let block = (c / per_block) as usize;
        let data = &mut refblocks[block * cs as usize..(block + 1) * cs as usize];
        set_refcount(data, o.refcount_bits, c % per_block, 1);
    }
    let mut header = Header::new(o.version, cs.trailing_zeros(), o.size);
    header.l1_size = l1_entries as u32;
    header.l1_table_offset = (1 + table + blocks) * cs;
    header.refcount_table_offset = cs;
    header.refcount_table_clusters = table as u32;
    header.refcount_order = o.refcount_bits.trailing_zeros();
    header.compression = o.compression;
    if o.extended_l2 {
        header.incompatible |= INCOMPAT_EXTL2;
    }
    if o.compression != Compression::Zlib {
        header.incompatible |= INCOMPAT_COMPRESSION;
    }
    if o.lazy_refcounts {
        header.compatible |= COMPAT_LAZY_REFCOUNTS;
    }
    header.backing_file = o.backing_file.clone();
    header.backing_format = o.backing_fmt.clone();
    let mut first = header.to_bytes().map_err(|e| e.to_string())?;
    first.resize(cs as usize, 0);
    let mut writes = vec![
        (0, first),
        (cs, refcount_table),
        ((1 + table) * cs, refblocks),
    ];
    if l1_clusters > 0 {
        writes.push((
            header.l1_table_offset,
            vec![0u8; (l1_clusters * cs) as usize],
        ));
    }
    Ok(Layout {
        writes,
        file_size: total * cs,
    })
}

/// Writes a new image file at `path` (made, or emptied) and makes it
/// stable: for blockdev-snapshot-sync, which makes its overlay itself.
pub fn create_image_file(path: &Path, o: &Qcow2CreateOptions) -> io::Result<()> {
    let image = layout(o).map_err(|text| io::Error::new(io::ErrorKind::InvalidInput, text))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    f.set_len(image.file_size)?;
    for (offset, data) in image.writes {
        f.write_all_at(&data, offset)?;
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_clusters_need_several_refcount_blocks() {
        let mut o = Qcow2CreateOptions::new(64 << 30);
        o.cluster_size = 512;
        let l = layout(&o).unwrap();
        // 64 GiB of 512-byte clusters: 2^27 clusters, 2^21 L1 entries,
        // 32768 L1 clusters, counted by 256-entry refcount blocks.
        let header = Header::parse(&l.writes[0].1).unwrap();
        assert_eq!(header.l1_size, 1 << 21);
        assert_eq!(l.file_size % 512, 0);
        let blocks = l.writes[2].1.len() as u64 / 512;
        assert!(blocks * 256 >= l.file_size / 512);
    }

    #[test]
    fn qemu_texts() {
        let mut o = Qcow2CreateOptions::new(1000);
        assert_eq!(
            layout(&o).err().unwrap(),
            "Image size must be a multiple of 512 bytes"
        );
        o.size = 1 << 20;
        o.version = 2;
        o.lazy_refcounts = true;
        assert!(layout(&o).err().unwrap().starts_with("Lazy refcounts only"));
        o.version = 3;
        o.cluster_size = 3 << 10;
        assert!(layout(&o)
            .err()
            .unwrap()
            .starts_with("Cluster size must be"));
    }
}
