//! The client side of the NBD protocol (NetworkBlockDevice's
//! `doc/proto.md`): the fixed-newstyle handshake with structured replies,
//! `base:allocation` and `NBD_OPT_GO`, and request encoding. Integers are
//! big-endian on the wire.

use std::io::{self, Read, Write};

pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_REQ_ONE: u16 = 8;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// The largest request the protocol's 32-bit length allows, rounded to a
/// sector, when the server names no maximum: 32 MiB, as QEMU assumes.
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

/// What the handshake learnt about the export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    /// The id of `base:allocation`, if the server has it.
    pub base_allocation: Option<u32>,
    pub min_block: u32,
    pub max_block: u32,
}

/// The transmission flags whose loss a reconnection cannot hide: requests
/// of the node go on relying on them.
const RELIED_ON: u16 = FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;

impl ExportInfo {
    /// Why a reconnection that negotiated `self` cannot carry on the
    /// requests of a node opened with `old`, if it cannot: another size,
    /// reply kind or block status, a read-only export where it was
    /// writable, a command it no longer takes, or block sizes its requests
    /// (aligned to the old minimum, split at the old maximum) would break
    /// (both minimums are powers of two).
    /// The id of `base:allocation` may change: each connection has its own.
    pub fn incompatible_with(&self, old: &ExportInfo) -> Option<String> {
        let lost = old.flags & !self.flags & RELIED_ON;
        let why = if self.size != old.size {
            format!("size {} instead of {}", self.size, old.size)
        } else if self.structured != old.structured
            || self.base_allocation.is_some() != old.base_allocation.is_some()
        {
            "other reply features".to_string()
        } else if self.flags & FLAG_READ_ONLY > old.flags & FLAG_READ_ONLY {
            "read-only".to_string()
        } else if lost != 0 {
            format!("transmission flags {lost:#x} withdrawn")
        } else if self.min_block > old.min_block || self.max_block < old.max_block {
            format!(
                "block sizes {}..{} instead of {}..{}",
                self.min_block, self.max_block, old.min_block, old.max_block
            )
        } else {
            return None;
        };
        Some(why)
    }
}

/// An NBD error number as an errno (QEMU's mapping; unknown ones are
/// EINVAL).
pub fn errno(nbd: u32) -> i32 {
    match nbd {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::ENOTSUP,
        108 => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// An error of the handshake: what the user sees when opening fails.
fn bad(text: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text.into())
}

pub fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn send_option(w: &mut impl Write, option: u32, data: &[u8]) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16 + data.len());
    msg.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)
}

/// One option reply: its type and data (at most 64 KiB are accepted).
fn read_reply(r: &mut impl Read, option: u32) -> io::Result<(u32, Vec<u8>)> {
    if read_u64(r)? != REP_MAGIC {
        return Err(bad("the server sent a bad option reply magic"));
    }
    let opt = read_u32(r)?;
    let kind = read_u32(r)?;
    let len = read_u32(r)?;
    if opt != option {
        return Err(bad(format!(
            "the server replied to option {opt} instead of {option}"
        )));
    }
    if len > 64 << 10 {
        return Err(bad("the server sent an oversized option reply"));
    }
    let mut data = vec![0; len as usize];
    r.read_exact(&mut data)?;
    Ok((kind, data))
}

/// The text of an option error reply.
fn reply_error(kind: u32, data: &[u8], export: &str) -> io::Error {
    let msg = String::from_utf8_lossy(data);
    let what = match kind {
        REP_ERR_UNKNOWN => format!("Requested export '{export}' not available"),
        REP_ERR_TLS_REQD => {
            "The server requires TLS, which blkgraph's NBD client does not support".into()
        }
        REP_ERR_POLICY => format!("The server refused export '{export}' by policy"),
        _ => format!("The server refused the export (error {:#x})", kind),
    };
    if msg.is_empty() {
        bad(what)
    } else {
        bad(format!("{what}: server reported: {msg}"))
    }
}

/// Runs the handshake on a connected stream, for `export`.
pub fn handshake<S: Read + Write>(s: &mut S, export: &str) -> io::Result<ExportInfo> {
    match read_u64(s)? {
        INIT_MAGIC => {}
        _ => return Err(bad("the peer is not an NBD server (bad magic)")),
    }
    match read_u64(s)? {
        OPTS_MAGIC => {}
        OLDSTYLE_MAGIC => return Err(bad("the server speaks the old-style protocol")),
        _ => return Err(bad("the peer is not an NBD server (bad magic)")),
    }
    let flags = read_u16(s)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server does not speak fixed newstyle NBD"));
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let client_flags: u32 = 1 | if no_zeroes { 2 } else { 0 };
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, data) = read_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = match kind {
        REP_ACK => true,
        REP_ERR_UNSUP | REP_ERR_POLICY => false,
        k if k & (1 << 31) != 0 => return Err(reply_error(k, &data, export)),
        _ => return Err(bad("the server sent an unexpected reply")),
    };

    let mut base_allocation = None;
    if structured {
        let ctx = b"base:allocation";
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
        data.extend_from_slice(ctx);
        send_option(s, OPT_SET_META_CONTEXT, &data)?;
        loop {
            let (kind, data) = read_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT if data.len() >= 4 => {
                    if &data[4..] == ctx {
                        base_allocation =
                            Some(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
                    }
                }
                REP_ACK => break,
                k if k & (1 << 31) != 0 => {
                    if k == REP_ERR_UNKNOWN {
                        return Err(reply_error(k, &data, export));
                    }
                    break; // no block status, then
                }
                _ => return Err(bad("the server sent an unexpected reply")),
            }
        }
    }

    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data)?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        structured,
        base_allocation,
        min_block: 1,
        max_block: DEFAULT_MAX_BLOCK,
    };
    let mut have_export = false;
    loop {
        let (kind, data) = read_reply(s, OPT_GO)?;
        match kind {
            REP_INFO if data.len() >= 2 => {
                let item = u16::from_be_bytes([data[0], data[1]]);
                let d = &data[2..];
                match item {
                    INFO_EXPORT if d.len() >= 10 => {
                        info.size = u64::from_be_bytes(d[..8].try_into().unwrap_or_default());
                        info.flags = u16::from_be_bytes([d[8], d[9]]);
                        have_export = true;
                    }
                    INFO_BLOCK_SIZE if d.len() >= 12 => {
                        let get =
                            |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
                        let (min, max) = (get(0), get(8));
                        if !min.is_power_of_two() || min > 64 << 10 || max < min {
                            return Err(bad("the server sent invalid block sizes"));
                        }
                        info.min_block = min;
                        info.max_block = max.min(DEFAULT_MAX_BLOCK).max(min);
                    }
                    _ => {}
                }
            }
            REP_INFO => return Err(bad("the server sent a short info reply")),
            REP_ACK => break,
            k if k & (1 << 31) != 0 => return Err(reply_error(k, &data, export)),
            _ => return Err(bad("the server sent an unexpected reply")),
        }
    }
    if !have_export {
        return Err(bad("the server did not describe the export"));
    }
    if info.size > i64::MAX as u64 {
        return Err(bad("the export is too large"));
    }
    Ok(info)
}

/// A request header.
pub fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExportInfo {
        ExportInfo {
            size: 1 << 30,
            flags: FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES,
            structured: true,
            base_allocation: Some(1),
            min_block: 512,
            max_block: 1 << 20,
        }
    }

    #[test]
    fn a_reconnection_may_change_what_requests_do_not_rely_on() {
        let old = info();
        let new = ExportInfo {
            // Another id for base:allocation, a command more, a smaller
            // minimum and a larger maximum block size.
            base_allocation: Some(7),
            flags: old.flags | FLAG_SEND_TRIM,
            min_block: 1,
            max_block: 32 << 20,
            ..old.clone()
        };
        assert_eq!(new.incompatible_with(&old), None);
        assert_eq!(old.incompatible_with(&old), None);
    }

    #[test]
    fn a_reconnection_may_not_take_away_what_requests_rely_on() {
        let old = info();
        let changed = [
            ExportInfo {
                size: old.size + 512,
                ..old.clone()
            },
            ExportInfo {
                structured: false,
                ..old.clone()
            },
            ExportInfo {
                base_allocation: None,
                ..old.clone()
            },
            ExportInfo {
                flags: old.flags | FLAG_READ_ONLY,
                ..old.clone()
            },
            ExportInfo {
                flags: old.flags & !FLAG_SEND_FUA,
                ..old.clone()
            },
            ExportInfo {
                flags: old.flags & !FLAG_SEND_FLUSH,
                ..old.clone()
            },
            ExportInfo {
                flags: old.flags & !FLAG_SEND_WRITE_ZEROES,
                ..old.clone()
            },
            ExportInfo {
                min_block: 4096,
                ..old.clone()
            },
            ExportInfo {
                max_block: 64 << 10,
                ..old.clone()
            },
        ];
        for new in changed {
            assert!(new.incompatible_with(&old).is_some(), "{new:?}");
        }
    }
}
