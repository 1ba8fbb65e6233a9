//! Persistent dirty bitmaps in the image (docs/interop/qcow2.txt, "Bitmaps
//! extension"), as QEMU keeps them:
//!
//! - at open, every bitmap of the directory becomes a bitmap of the node;
//!   one marked in use (its image was not closed cleanly) is inconsistent.
//!   A writer marks the others in use, in place, with the autoclear bit
//!   off meanwhile, so that a crash leaves them inconsistent, never wrong;
//! - at close, the node's persistent bitmaps are written to new clusters, a
//!   new directory points to them, the header switches to it, and only
//!   then are the old directory, tables and data freed;
//! - removing a persistent bitmap rewrites the directory at once.
//!
//! A bitmap's table has one entry per cluster of serialized bits: the
//! cluster's offset, or 0 for all zeroes (or all ones with bit 0 set).

use std::fmt;
use std::io;
use std::sync::Arc;

use super::header::{BitmapsExtension, AUTOCLEAR_BITMAPS};
use super::layout::{get_be64, put_be64};
use super::meta::{File, Meta, StoredBitmap};
use crate::bitmap::DirtyBitmap;

const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;
const RESERVED_FLAGS: u32 = !(FLAG_IN_USE | FLAG_AUTO);
/// Bitmap table entries: reserved bits, offset, the all-ones flag.
const TABLE_RESERVED: u64 = 0xff00_0000_0000_01fe;
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const TABLE_ALL_ONES: u64 = 1;
/// QEMU's limits.
const MAX_TABLE_SIZE: u64 = 0x800_0000;
const MAX_PHYS_SIZE: u64 = 0x2000_0000;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
const MAX_NAME_SIZE: usize = 1023;
const MAX_BITMAPS: usize = 65535;
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// The fixed part of a directory entry.
const ENTRY_HEADER: usize = 24;
/// The only bitmap type: dirty tracking.
const TYPE_DIRTY_TRACKING: u8 = 1;

/// A bitmap directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    table_offset: u64,
    table_size: u32,
    flags: u32,
    granularity_bits: u32,
    name: String,
}

/// Why a bitmap directory is unusable, in QEMU's words.
#[derive(Debug, PartialEq, Eq)]
pub enum DirectoryError {
    /// Entries overrun the directory, or it has bytes after the last one.
    Broken,
    /// More entries than the header extension says.
    TooMany,
    /// Fewer entries than the header extension says.
    TooFew,
    /// An entry has extra data.
    ExtraData,
    /// An entry breaks the format's constraints.
    Constraints(String),
    /// The directory is larger than QEMU allows.
    TooBig,
}

impl fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirectoryError::Broken => f.write_str("Broken bitmap directory"),
            DirectoryError::TooMany => {
                f.write_str("More bitmaps found than specified in header extension")
            }
            DirectoryError::TooFew => {
                f.write_str("Less bitmaps found than specified in header extension")
            }
            DirectoryError::ExtraData => f.write_str("Bitmap extra data is not supported"),
            DirectoryError::Constraints(name) => {
                write!(f, "Bitmap '{name}' doesn't satisfy the constraints")
            }
            DirectoryError::TooBig => f.write_str("Requested bitmap directory size is too big"),
        }
    }
}

fn entry_size(name_len: usize) -> usize {
    (ENTRY_HEADER + name_len).next_multiple_of(8)
}

/// Clusters of serialized bits a bitmap of `granularity` needs over
/// `size` bytes.
fn table_size(size: u64, granularity: u64, cluster_size: u64) -> u64 {
    size.div_ceil(granularity)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// Whether an entry keeps QEMU's constraints for an image of `size` bytes.
fn valid(e: &Entry, size: u64, cluster_size: u64) -> bool {
    let phys = u64::from(e.table_size) * cluster_size;
    let fits = e.flags & FLAG_IN_USE != 0
        || (phys * 8)
            .checked_shl(e.granularity_bits)
            .is_none_or(|covered| covered >= size);
    e.table_size != 0
        && e.table_offset != 0
        && e.table_offset.is_multiple_of(cluster_size)
        && u64::from(e.table_size) <= MAX_TABLE_SIZE
        && (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&e.granularity_bits)
        && e.flags & RESERVED_FLAGS == 0
        && e.name.len() <= MAX_NAME_SIZE
        && phys <= MAX_PHYS_SIZE
        && fits
}

/// Parses a directory of `nb` entries for an image of `size` bytes.
fn parse_directory(
    bytes: &[u8],
    nb: u32,
    size: u64,
    cluster_size: u64,
) -> Result<Vec<Entry>, DirectoryError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes
            .get(at..at + ENTRY_HEADER)
            .ok_or(DirectoryError::Broken)?;
        if out.len() as u32 >= nb {
            return Err(DirectoryError::TooMany);
        }
        let be32 = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let name_len = usize::from(u16::from_be_bytes([head[18], head[19]]));
        let extra = be32(20) as usize;
        let len = entry_size(name_len + extra);
        let name = bytes
            .get(at..at + len)
            .map(|e| &e[ENTRY_HEADER + extra..ENTRY_HEADER + extra + name_len])
            .ok_or(DirectoryError::Broken)?;
        if extra != 0 {
            return Err(DirectoryError::ExtraData);
        }
        let e = Entry {
            table_offset: get_be64(head, 0),
            table_size: be32(8),
            flags: be32(12),
            granularity_bits: u32::from(head[17]),
            name: String::from_utf8_lossy(name).into_owned(),
        };
        if head[16] != TYPE_DIRTY_TRACKING || !valid(&e, size, cluster_size) {
            return Err(DirectoryError::Constraints(e.name));
        }
        out.push(e);
        at += len;
    }
    if out.len() as u32 != nb {
        return Err(DirectoryError::TooFew);
    }
    Ok(out)
}

fn directory_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.resize(start + entry_size(e.name.len()), 0);
        put_be64(&mut b, start, e.table_offset);
        b[start + 8..start + 12].copy_from_slice(&e.table_size.to_be_bytes());
        b[start + 12..start + 16].copy_from_slice(&e.flags.to_be_bytes());
        b[start + 16] = TYPE_DIRTY_TRACKING;
        b[start + 17] = e.granularity_bits as u8;
        b[start + 18..start + 20].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        b[start + ENTRY_HEADER..start + ENTRY_HEADER + e.name.len()]
            .copy_from_slice(e.name.as_bytes());
    }
    b
}

fn invalid(e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Whether a new bitmap could be stored in an image of `version` and
/// `size` bytes; QEMU's texts.
pub fn can_store(
    version: u32,
    size: u64,
    cluster_size: u64,
    name: &str,
    granularity: u64,
) -> Result<(), String> {
    if version < 3 {
        return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
    }
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = size.div_ceil(granularity).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * cluster_size {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

impl Meta {
    fn publish_bitmaps(&self, entries: &[Entry]) {
        *self.published_bitmaps.lock() = entries
            .iter()
            .map(|e| StoredBitmap {
                name: e.name.clone(),
                granularity: 1 << e.granularity_bits,
                in_use: e.flags & FLAG_IN_USE != 0,
                auto: e.flags & FLAG_AUTO != 0,
            })
            .collect();
    }

    /// The bitmap directory, if the image has a consistent one.
    async fn directory(&self, f: &File<'_>) -> io::Result<Option<(BitmapsExtension, Vec<Entry>)>> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(None);
        };
        if self.header.autoclear & AUTOCLEAR_BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(None);
        }
        if ext.directory_size > MAX_DIRECTORY_SIZE {
            return Err(invalid(DirectoryError::TooBig));
        }
        let bytes = f
            .read(ext.directory_offset, ext.directory_size as usize)
            .await?;
        let entries = parse_directory(&bytes, ext.nb_bitmaps, self.g.size, self.g.cluster_size)
            .map_err(invalid)?;
        Ok(Some((ext, entries)))
    }

    /// A bitmap's table.
    async fn bitmap_table(&self, f: &File<'_>, e: &Entry) -> io::Result<Vec<u64>> {
        let bytes = f.read(e.table_offset, e.table_size as usize * 8).await?;
        let cs = self.g.cluster_size;
        (0..e.table_size as usize)
            .map(|i| {
                let t = get_be64(&bytes, i * 8);
                let offset = t & TABLE_OFFSET;
                let bad = t & TABLE_RESERVED != 0
                    || (offset != 0 && (t & TABLE_ALL_ONES != 0 || !offset.is_multiple_of(cs)));
                if bad {
                    Err(invalid(format!(
                        "Could not read bitmap_table table from image for bitmap '{}'",
                        e.name
                    )))
                } else {
                    Ok(t)
                }
            })
            .collect()
    }

    /// Loads the image's bitmaps; a writer marks them in use. Returns them
    /// with the host ranges they occupy (for a refcount repair).
    pub async fn load_bitmaps(
        &mut self,
        f: &File<'_>,
        writable: bool,
    ) -> io::Result<(Vec<DirtyBitmap>, Vec<(u64, u64)>)> {
        let cs = self.g.cluster_size;
        if writable
            && self.header.bitmaps.is_some()
            && self.header.autoclear & AUTOCLEAR_BITMAPS == 0
        {
            // Written by a program that does not know bitmaps: they are
            // stale, and go (their clusters leak, as in QEMU).
            let mut header = self.header.clone();
            header.bitmaps = None;
            self.write_header(f, header).await?;
            f.flush().await?;
        }
        let Some((ext, mut entries)) = self.directory(f).await? else {
            return Ok((Vec::new(), Vec::new()));
        };
        let mut used = vec![(ext.directory_offset, ext.directory_size)];
        let mut bitmaps = Vec::new();
        let mut mark = false;
        for e in &mut entries {
            let granularity = 1u64 << e.granularity_bits;
            let auto = e.flags & FLAG_AUTO != 0;
            let in_use = e.flags & FLAG_IN_USE != 0;
            let bitmap = DirtyBitmap::new(&e.name, self.g.size, granularity, auto && !in_use)
                .map_err(|err| invalid(format!("Could not load bitmap '{}': {err}", e.name)))?;
            bitmap.set_persistent(true);
            used.push((e.table_offset, u64::from(e.table_size) * 8));
            // The table of a bitmap in use may be anything: QEMU does not
            // read it; its clusters still count when it is valid.
            let table = match self.bitmap_table(f, e).await {
                Ok(table) => table,
                Err(_) if in_use => Vec::new(),
                Err(err) => return Err(err),
            };
            used.extend(
                table
                    .iter()
                    .map(|t| t & TABLE_OFFSET)
                    .filter(|o| *o != 0)
                    .map(|o| (o, cs)),
            );
            if in_use {
                bitmap.mark_inconsistent();
            } else {
                let expected = table_size(self.g.size, granularity, cs);
                if expected != u64::from(e.table_size) {
                    return Err(invalid(format!(
                        "Could not read bitmap '{}' from image",
                        e.name
                    )));
                }
                for (i, t) in table.iter().enumerate() {
                    let first_bit = i as u64 * cs * 8;
                    let offset = t & TABLE_OFFSET;
                    if offset != 0 {
                        let data = f.read(offset, cs as usize).await?;
                        bitmap.deserialize(first_bit, &data);
                    } else if t & TABLE_ALL_ONES != 0 {
                        bitmap.set_bits(first_bit, cs * 8);
                    }
                }
                // A reader leaves the image as it is (and queries show it
                // so): only a writer marks its bitmaps in use.
                if writable {
                    e.flags |= FLAG_IN_USE;
                    mark = true;
                }
            }
            if !writable {
                bitmap.set_readonly(true);
            }
            bitmaps.push(bitmap);
        }
        if writable && mark {
            self.mark_in_use(f, ext, &entries).await?;
        }
        self.publish_bitmaps(&entries);
        Ok((bitmaps, used))
    }

    /// Marks every bitmap of the image in use, as the image becomes
    /// writable again (QEMU's qcow2_reopen_bitmaps_rw); a bitmap in use
    /// already stays as it is.
    pub async fn mark_bitmaps_in_use(&mut self, f: &File<'_>) -> io::Result<()> {
        let Some((ext, mut entries)) = self.directory(f).await? else {
            return Ok(());
        };
        if entries.iter().all(|e| e.flags & FLAG_IN_USE != 0) {
            return Ok(());
        }
        for e in &mut entries {
            e.flags |= FLAG_IN_USE;
        }
        self.mark_in_use(f, ext, &entries).await?;
        self.publish_bitmaps(&entries);
        Ok(())
    }

    /// Rewrites the directory in place with the in-use flags set; the
    /// autoclear bit is off meanwhile, so a crash in between leaves the
    /// bitmaps invalid rather than wrong.
    async fn mark_in_use(
        &mut self,
        f: &File<'_>,
        ext: BitmapsExtension,
        entries: &[Entry],
    ) -> io::Result<()> {
        let mut header = self.header.clone();
        header.autoclear &= !AUTOCLEAR_BITMAPS;
        self.write_header(f, header.clone()).await?;
        f.flush().await?;
        f.write(ext.directory_offset, directory_bytes(entries))
            .await?;
        f.flush().await?;
        header.autoclear |= AUTOCLEAR_BITMAPS;
        self.write_header(f, header).await?;
        f.flush().await
    }

    /// Stores the persistent ones of `bitmaps`: new data, tables and
    /// directory, then the header, then the old ones are freed. An
    /// inconsistent bitmap keeps its old entry.
    pub async fn store_bitmaps(
        &mut self,
        f: &File<'_>,
        bitmaps: &[Arc<DirtyBitmap>],
    ) -> io::Result<()> {
        let old = self.directory(f).await?;
        let old_entries = old.as_ref().map(|(_, e)| e.as_slice()).unwrap_or(&[]);
        let mut entries = Vec::new();
        for b in bitmaps.iter().filter(|b| b.persistent()) {
            let previous = old_entries.iter().find(|e| e.name == b.name());
            if b.inconsistent() || b.readonly() {
                entries.extend(previous.cloned());
                continue;
            }
            let (table_offset, table_size) = self.write_bitmap(f, b).await?;
            entries.push(Entry {
                table_offset,
                table_size,
                flags: if b.recording() { FLAG_AUTO } else { 0 },
                granularity_bits: b.granularity().trailing_zeros(),
                name: b.name().to_string(),
            });
        }
        if entries.len() > MAX_BITMAPS {
            return Err(invalid("Too many persistent bitmaps"));
        }
        self.switch_directory(f, old, &entries).await
    }

    /// Removes bitmap `name` from the directory and frees its clusters.
    pub async fn remove_bitmap(&mut self, f: &File<'_>, name: &str) -> io::Result<()> {
        let old = self.directory(f).await?;
        let Some((_, old_entries)) = &old else {
            return Ok(());
        };
        if !old_entries.iter().any(|e| e.name == name) {
            return Ok(());
        }
        let entries: Vec<Entry> = old_entries
            .iter()
            .filter(|e| e.name != name)
            .cloned()
            .collect();
        self.switch_directory(f, old, &entries).await
    }

    /// Writes a bitmap's data and table to new clusters; returns the
    /// table's offset and size. All-zero clusters of bits are not written.
    async fn write_bitmap(&mut self, f: &File<'_>, b: &DirtyBitmap) -> io::Result<(u64, u32)> {
        let cs = self.g.cluster_size;
        let n = table_size(self.g.size, b.granularity(), cs);
        if n > MAX_TABLE_SIZE || n * cs > MAX_PHYS_SIZE {
            return Err(invalid(format!("Bitmap '{}' is too big", b.name())));
        }
        let mut table = vec![0u8; (n * 8).next_multiple_of(cs) as usize];
        for i in 0..n {
            let first_bit = i * cs * 8;
            if !b.any_bit(first_bit, cs * 8) {
                continue;
            }
            let mut data = vec![0u8; cs as usize];
            b.serialize(first_bit, &mut data);
            let at = self.alloc_clusters(f, 1).await?;
            f.write(at, data).await?;
            put_be64(&mut table, i as usize * 8, at);
        }
        let clusters = table.len() as u64 / cs;
        let at = self.alloc_clusters(f, clusters).await?;
        f.write(at, table).await?;
        Ok((at, n as u32))
    }

    /// Points the header at a new directory of `entries` (none: no
    /// extension), once everything it references is stable; then frees
    /// the old directory and the tables and data of the old entries that
    /// are not kept.
    async fn switch_directory(
        &mut self,
        f: &File<'_>,
        old: Option<(BitmapsExtension, Vec<Entry>)>,
        entries: &[Entry],
    ) -> io::Result<()> {
        let cs = self.g.cluster_size;
        let mut header = self.header.clone();
        if entries.is_empty() {
            header.bitmaps = None;
            header.autoclear &= !AUTOCLEAR_BITMAPS;
        } else {
            let bytes = directory_bytes(entries);
            let size = bytes.len() as u64;
            if size > MAX_DIRECTORY_SIZE {
                return Err(invalid("Bitmap directory is too large"));
            }
            let mut padded = bytes;
            padded.resize(size.next_multiple_of(cs) as usize, 0);
            let at = self.alloc_clusters(f, size.div_ceil(cs)).await?;
            f.write(at, padded).await?;
            header.bitmaps = Some(BitmapsExtension {
                nb_bitmaps: entries.len() as u32,
                directory_size: size,
                directory_offset: at,
            });
            header.autoclear |= AUTOCLEAR_BITMAPS;
        }
        // The new directory, tables, data and their refcounts first.
        self.flush(f).await?;
        self.write_header(f, header).await?;
        f.flush().await?;
        self.publish_bitmaps(entries);
        if let Some((ext, old_entries)) = old {
            self.free_later(ext.directory_offset, ext.directory_size);
            for e in old_entries.iter().filter(|e| !entries.contains(e)) {
                for t in self.bitmap_table(f, e).await? {
                    let offset = t & TABLE_OFFSET;
                    if offset != 0 {
                        self.free_later(offset, cs);
                    }
                }
                self.free_later(e.table_offset, u64::from(e.table_size) * 8);
            }
        }
        self.flush(f).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_round_trip_and_checks() {
        let cs = 65536;
        let size = 1 << 30;
        let entries = vec![
            Entry {
                table_offset: 3 * cs,
                table_size: 1,
                flags: FLAG_AUTO,
                granularity_bits: 16,
                name: "b0".into(),
            },
            Entry {
                table_offset: 5 * cs,
                table_size: 1,
                flags: FLAG_IN_USE,
                granularity_bits: 9,
                name: "a-longer-name".into(),
            },
        ];
        let bytes = directory_bytes(&entries);
        assert_eq!(bytes.len(), 32 + 40);
        assert_eq!(parse_directory(&bytes, 2, size, cs).unwrap(), entries);
        assert_eq!(
            parse_directory(&bytes, 1, size, cs),
            Err(DirectoryError::TooMany)
        );
        assert_eq!(
            parse_directory(&bytes, 3, size, cs),
            Err(DirectoryError::TooFew)
        );
        assert_eq!(
            parse_directory(&bytes[..40], 2, size, cs),
            Err(DirectoryError::Broken)
        );
        // 512-byte granules over 1 GiB need 2^21 bits: 4 clusters.
        let mut small = entries[1].clone();
        small.flags = 0;
        let bytes = directory_bytes(&[small]);
        assert_eq!(
            parse_directory(&bytes, 1, size, cs),
            Err(DirectoryError::Constraints("a-longer-name".into()))
        );
        assert_eq!(table_size(size, 512, cs), 4);
    }

    #[test]
    fn storable_bitmaps_follow_qemu() {
        assert_eq!(
            can_store(2, 1 << 20, 65536, "b", 65536).unwrap_err(),
            "Cannot store dirty bitmaps in qcow2 v2 files"
        );
        assert_eq!(
            can_store(3, 1 << 20, 65536, "b", 256).unwrap_err(),
            "Granularity is under minimum (512 bytes)"
        );
        assert_eq!(
            can_store(3, 1 << 20, 65536, &"x".repeat(1024), 65536).unwrap_err(),
            "Name length exceeds maximum (1023 characters)"
        );
        assert!(can_store(3, 1 << 62, 65536, "b", 512).is_err());
        can_store(3, 1 << 20, 65536, "b", 65536).unwrap();
    }
}
