//! The qcow2 header and its extensions (docs/interop/qcow2.txt, "Header"):
//! parsed from the first cluster, checked as QEMU checks it, and written
//! back with what blkgraph does not interpret kept as it was.

use std::fmt;

/// The magic bytes, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature: refcounts may be inconsistent (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: the image may be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: a compression type other than zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature: lazy refcounts may be used.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// The incompatible features blkgraph knows.
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension: the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: the bitmaps extension.
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: the feature name table.
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: full disk encryption header.
const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate.
    Zlib,
    /// Zstandard frames.
    Zstd,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory in the image file.
    pub directory_offset: u64,
}

/// An image header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// The virtual size in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// The backing file's format, if the extension is there.
    pub backing_format: Option<String>,
    /// The bitmaps extension, if there.
    pub bitmaps: Option<BitmapsExtension>,
    /// Extensions kept as they are (the feature name table, unknown ones).
    other_extensions: Vec<(u32, Vec<u8>)>,
    /// Header fields past those blkgraph knows, kept as they are.
    unknown_fields: Vec<u8>,
}

/// Why a header was refused, in QEMU's words where it has them.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a qcow2 image.
    NotQcow2,
    /// Malformed or refused; the text says why.
    Invalid(String),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::NotQcow2 => f.write_str("Image is not in qcow2 format"),
            HeaderError::Invalid(t) => f.write_str(t),
        }
    }
}

fn invalid(text: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(text.into())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// Length of a version 2 header, and of the fields blkgraph knows in
/// version 3 (with the compression type and its padding).
const V2_LENGTH: usize = 72;
const V3_MIN_LENGTH: usize = 104;
const V3_KNOWN_LENGTH: usize = 112;

impl Header {
    /// The header of a new image: no tables yet, no features, zlib
    /// compression, 16-bit refcounts.
    pub fn new(version: u32, cluster_bits: u32, size: u64) -> Header {
        Header {
            version,
            backing_file: None,
            cluster_bits,
            size,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            backing_format: None,
            bitmaps: None,
            other_extensions: Vec::new(),
            unknown_fields: Vec::new(),
        }
    }

    /// Parses the header in `cluster`, the image's first cluster (or more
    /// of the file, if the image is smaller).
    pub fn parse(cluster: &[u8]) -> Result<Header, HeaderError> {
        if cluster.len() < V2_LENGTH || be32(cluster, 0) != MAGIC {
            return Err(HeaderError::NotQcow2);
        }
        let version = be32(cluster, 4);
        if version != 2 && version != 3 {
            return Err(invalid(format!("Unsupported qcow2 version {version}")));
        }
        let cluster_bits = be32(cluster, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1usize << cluster_bits;
        let mut h = Header {
            version,
            backing_file: None,
            cluster_bits,
            size: be64(cluster, 24),
            l1_size: be32(cluster, 36),
            l1_table_offset: be64(cluster, 40),
            refcount_table_offset: be64(cluster, 48),
            refcount_table_clusters: be32(cluster, 56),
            nb_snapshots: be32(cluster, 60),
            snapshots_offset: be64(cluster, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            compression: Compression::Zlib,
            backing_format: None,
            bitmaps: None,
            other_extensions: Vec::new(),
            unknown_fields: Vec::new(),
        };
        let crypt_method = be32(cluster, 32);
        let mut header_length = V2_LENGTH;
        if version == 3 {
            if cluster.len() < V3_MIN_LENGTH {
                return Err(invalid("qcow2 header too short"));
            }
            h.incompatible = be64(cluster, 72);
            h.compatible = be64(cluster, 80);
            h.autoclear = be64(cluster, 88);
            h.refcount_order = be32(cluster, 96);
            header_length = be32(cluster, 100) as usize;
            if header_length < V3_MIN_LENGTH {
                return Err(invalid("qcow2 header too short"));
            }
            if header_length > cluster_size || header_length > cluster.len() {
                return Err(invalid("qcow2 header exceeds cluster size"));
            }
            if !header_length.is_multiple_of(8) {
                return Err(invalid("qcow2 header length is not a multiple of 8"));
            }
            if header_length > V3_MIN_LENGTH {
                let kind = cluster[104];
                h.compression = match kind {
                    0 => Compression::Zlib,
                    1 => Compression::Zstd,
                    other => {
                        return Err(invalid(format!("Unknown compression type value {other}")))
                    }
                };
            }
            if header_length > V3_KNOWN_LENGTH {
                h.unknown_fields = cluster[V3_KNOWN_LENGTH..header_length].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        let compression_bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
        if compression_bit != (h.compression != Compression::Zlib) {
            return Err(invalid(if compression_bit {
                "Compression type incompatible feature bit must not be set for zlib"
            } else {
                "Compression type incompatible feature bit must be set for zstd"
            }));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(invalid(
                "The cluster size must be at least 16 KiB for extended L2 entries",
            ));
        }
        h.parse_extensions(cluster, header_length)?;
        let backing_offset = be64(cluster, 8) as usize;
        if backing_offset != 0 {
            let len = be32(cluster, 16) as usize;
            if len > 1023 {
                return Err(invalid("Backing file name too long"));
            }
            let name = backing_offset
                .checked_add(len)
                .filter(|&end| end <= cluster_size && end <= cluster.len())
                .map(|end| &cluster[backing_offset..end])
                .ok_or_else(|| invalid("Invalid backing file offset"))?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(invalid(format!(
                "Unsupported qcow2 feature(s): {}",
                h.feature_names(unknown)
            )));
        }
        if crypt_method != 0 {
            return Err(invalid(
                "Encrypted qcow2 images are not supported by blkgraph",
            ));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(invalid(
                "qcow2 images with an external data file are not supported by blkgraph",
            ));
        }
        Ok(h)
    }

    fn parse_extensions(&mut self, cluster: &[u8], start: usize) -> Result<(), HeaderError> {
        let mut at = start;
        loop {
            if at + 8 > cluster.len() {
                return Err(invalid("Invalid header extension"));
            }
            let kind = be32(cluster, at);
            let len = be32(cluster, at + 4) as usize;
            at += 8;
            if kind == 0 {
                return Ok(());
            }
            let data = at
                .checked_add(len)
                .filter(|&end| end <= cluster.len())
                .map(|end| &cluster[at..end])
                .ok_or_else(|| invalid("Invalid header extension length"))?;
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > 15 {
                        return Err(invalid("Backing format name too long"));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(invalid("Invalid bitmaps extension"));
                    }
                    self.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_CRYPTO => {
                    return Err(invalid(
                        "Encrypted qcow2 images are not supported by blkgraph",
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(invalid(
                        "qcow2 images with an external data file are not supported by blkgraph",
                    ))
                }
                _ => self.other_extensions.push((kind, data.to_vec())),
            }
            at += len.div_ceil(8) * 8;
        }
    }

    /// QEMU's description of unknown incompatible `bits`: the names the
    /// feature name table has for them, then the rest as a hex mask.
    fn feature_names(&self, bits: u64) -> String {
        let table = self
            .other_extensions
            .iter()
            .find(|(k, _)| *k == EXT_FEATURE_TABLE)
            .map(|(_, d)| d.as_slice())
            .unwrap_or(&[]);
        let mut names = Vec::new();
        let mut rest = bits;
        for entry in table.chunks_exact(48) {
            let bit = u64::from(entry[1]);
            if entry[0] == 0 && bit < 64 && rest & (1 << bit) != 0 {
                let raw = &entry[2..48];
                let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
                names.push(String::from_utf8_lossy(&raw[..end]).into_owned());
                rest &= !(1 << bit);
            }
        }
        if rest != 0 {
            names.push(format!("Unknown incompatible feature: {rest:x}"));
        }
        names.join(", ")
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (with subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// The header as it is written back: one cluster at most (header,
    /// extensions, end marker, backing file name).
    pub fn to_bytes(&self) -> Result<Vec<u8>, HeaderError> {
        let cluster = self.cluster_size() as usize;
        let mut b = Vec::with_capacity(cluster);
        let put32 = |b: &mut Vec<u8>, v: u32| b.extend_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut Vec<u8>, v: u64| b.extend_from_slice(&v.to_be_bytes());
        put32(&mut b, MAGIC);
        put32(&mut b, self.version);
        put64(&mut b, 0); // backing file offset, filled in below
        put32(&mut b, 0); // backing file name length
        put32(&mut b, self.cluster_bits);
        put64(&mut b, self.size);
        put32(&mut b, 0); // crypt method
        put32(&mut b, self.l1_size);
        put64(&mut b, self.l1_table_offset);
        put64(&mut b, self.refcount_table_offset);
        put32(&mut b, self.refcount_table_clusters);
        put32(&mut b, self.nb_snapshots);
        put64(&mut b, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, self.incompatible);
            put64(&mut b, self.compatible);
            put64(&mut b, self.autoclear);
            put32(&mut b, self.refcount_order);
            let length = V3_KNOWN_LENGTH + self.unknown_fields.len();
            put32(&mut b, length as u32);
            b.push(match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            });
            b.resize(V3_KNOWN_LENGTH, 0);
            b.extend_from_slice(&self.unknown_fields);
        }
        let extension = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            put32(b, kind);
            put32(b, data.len() as u32);
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(fmt) = &self.backing_format {
            extension(&mut b, EXT_BACKING_FORMAT, fmt.as_bytes());
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = Vec::with_capacity(24);
            put32(&mut d, bm.nb_bitmaps);
            put32(&mut d, 0);
            put64(&mut d, bm.directory_size);
            put64(&mut d, bm.directory_offset);
            extension(&mut b, EXT_BITMAPS, &d);
        }
        for (kind, data) in &self.other_extensions {
            extension(&mut b, *kind, data);
        }
        extension(&mut b, 0, &[]);
        if let Some(name) = &self.backing_file {
            let offset = b.len();
            b.extend_from_slice(name.as_bytes());
            b[8..16].copy_from_slice(&(offset as u64).to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        if b.len() > cluster {
            return Err(invalid("The qcow2 header does not fit in one cluster"));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first bytes of `qemu-img create -f qcow2 -o compat=1.1
    /// -b base.raw -F raw img.qcow2 1G` (64 KiB clusters), up to the end
    /// of the backing file name.
    fn sample() -> Vec<u8> {
        let mut b = vec![0u8; 65536];
        let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut b, 0, &MAGIC.to_be_bytes());
        put(&mut b, 4, &3u32.to_be_bytes());
        put(&mut b, 20, &16u32.to_be_bytes());
        put(&mut b, 24, &(1u64 << 30).to_be_bytes());
        put(&mut b, 36, &2u32.to_be_bytes());
        put(&mut b, 40, &0x30000u64.to_be_bytes());
        put(&mut b, 48, &0x10000u64.to_be_bytes());
        put(&mut b, 56, &1u32.to_be_bytes());
        put(&mut b, 96, &4u32.to_be_bytes());
        put(&mut b, 100, &112u32.to_be_bytes());
        // Backing format "raw", a feature table entry, the end.
        put(&mut b, 112, &EXT_BACKING_FORMAT.to_be_bytes());
        put(&mut b, 116, &3u32.to_be_bytes());
        put(&mut b, 120, b"raw");
        put(&mut b, 128, &EXT_FEATURE_TABLE.to_be_bytes());
        put(&mut b, 132, &48u32.to_be_bytes());
        b[136] = 0;
        b[137] = 0;
        put(&mut b, 138, b"dirty bit");
        // end marker at 184..192, backing name after it
        put(&mut b, 192, b"base.raw");
        put(&mut b, 8, &192u64.to_be_bytes());
        put(&mut b, 16, &8u32.to_be_bytes());
        b
    }

    #[test]
    fn parses_and_writes_back_the_same_header() {
        let h = Header::parse(&sample()).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert_eq!(h.refcount_order, 4);
        let bytes = h.to_bytes().unwrap();
        assert_eq!(&bytes[..], &sample()[..bytes.len()]);
        assert_eq!(Header::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn refuses_what_it_cannot_handle_with_a_clear_error() {
        let with = |at: usize, v: &[u8]| {
            let mut b = sample();
            b[at..at + v.len()].copy_from_slice(v);
            Header::parse(&b).unwrap_err().to_string()
        };
        assert_eq!(with(0, b"QFI\0"), "Image is not in qcow2 format");
        assert_eq!(with(4, &4u32.to_be_bytes()), "Unsupported qcow2 version 4");
        assert_eq!(
            with(20, &22u32.to_be_bytes()),
            "Unsupported cluster size: 2^22"
        );
        assert_eq!(
            with(32, &2u32.to_be_bytes()),
            "Encrypted qcow2 images are not supported by blkgraph"
        );
        assert_eq!(
            with(72, &INCOMPAT_DATA_FILE.to_be_bytes()),
            "qcow2 images with an external data file are not supported by blkgraph"
        );
        assert_eq!(
            with(72, &(1u64 << 20 | 1).to_be_bytes()),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 100000"
        );
        let mut b = sample();
        b[137] = 20; // the table's entry now names bit 20
        b[72..80].copy_from_slice(&(1u64 << 20 | 1 << 21).to_be_bytes());
        assert_eq!(
            Header::parse(&b).unwrap_err().to_string(),
            "Unsupported qcow2 feature(s): dirty bit, Unknown incompatible feature: 200000"
        );
        assert_eq!(
            with(96, &7u32.to_be_bytes()),
            "Reference count entry width too large; may not exceed 64 bits"
        );
        assert_eq!(with(100, &100u32.to_be_bytes()), "qcow2 header too short");
        assert_eq!(
            with(16, &2000u32.to_be_bytes()),
            "Backing file name too long"
        );
    }
}
