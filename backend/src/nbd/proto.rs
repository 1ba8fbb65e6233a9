//! Wire format of the NBD protocol (NetworkBlockDevice's `doc/proto.md`):
//! magic numbers, option, reply, command and flag values, and the
//! encoders of the messages the server sends.
//!
//! Every integer is big-endian on the wire.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const INIT_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, also the start of every option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Start of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Start of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Start of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Start of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_FUA is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: NBD_CMD_TRIM is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: NBD_CMD_WRITE_ZEROES is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: NBD_CMD_FLAG_DF is supported on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: several connections see one consistent cache.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: NBD_CMD_CACHE is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: NBD_CMD_FLAG_FAST_ZERO is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (no error possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of NBD_OPT_INFO/GO.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option error: malformed or out of sequence.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option error: the client must request block size constraints.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
/// Option error: the request is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information item: canonical name.
pub const INFO_NAME: u16 = 1;
/// Information item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (a payload follows the header).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch hint.
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: a read must come in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: block status with one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload (a final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// NBD error: operation not permitted.
pub const EPERM: u32 = 1;
/// NBD error: I/O error.
pub const EIO: u32 = 5;
/// NBD error: out of memory.
pub const ENOMEM: u32 = 12;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space left.
pub const ENOSPC: u32 = 28;
/// NBD error: value too large.
pub const EOVERFLOW: u32 = 75;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// NBD error: the server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Largest string (name, description, query) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest read or write payload served, as QEMU's server (32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred block size advertised in NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Size of a request header.
pub const REQUEST_SIZE: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_SIZE: usize = 16;
/// Size of a structured reply chunk header.
pub const CHUNK_HEADER_SIZE: usize = 20;

/// Maps a host errno to the NBD error a client sees, as QEMU's server
/// does: anything without an NBD code of its own becomes EINVAL.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        0 => 0,
        libc::EPERM | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// The NBD error for an I/O error from the graph; an error that carries no
/// errno is an I/O error.
pub fn io_error_to_nbd(e: &std::io::Error) -> u32 {
    e.raw_os_error().map_or(EIO, errno_to_nbd)
}

/// Name of an option, for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

/// A request header, as the client sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub command: u16,
    /// The client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

/// Why a request header is unusable: the stream cannot be trusted any more.
#[derive(Debug, PartialEq, Eq)]
pub struct BadMagic(pub u32);

impl Request {
    /// Parses a 28-byte request header.
    pub fn parse(b: &[u8; REQUEST_SIZE]) -> Result<Request, BadMagic> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != REQUEST_MAGIC {
            return Err(BadMagic(magic));
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(a)
        };
        Ok(Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            handle: u64_at(8),
            offset: u64_at(16),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        })
    }

    /// Encodes the header (for tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Appends a structured reply chunk header for a payload of `length` bytes.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, length: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends a complete option reply.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Truncates a message to the protocol's string limit, on a character
/// boundary.
pub fn clip_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING {
        return msg;
    }
    let mut end = MAX_STRING;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b), Ok(r));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(Request::parse(&bad), Err(BadMagic(0x0060_9513)));
    }

    #[test]
    fn errno_mapping_follows_qemu() {
        assert_eq!(errno_to_nbd(libc::EPERM), EPERM);
        assert_eq!(errno_to_nbd(libc::EROFS), EPERM);
        assert_eq!(errno_to_nbd(libc::EIO), EIO);
        assert_eq!(errno_to_nbd(libc::ENOMEM), ENOMEM);
        for e in [libc::EDQUOT, libc::EFBIG, libc::ENOSPC] {
            assert_eq!(errno_to_nbd(e), ENOSPC);
        }
        assert_eq!(errno_to_nbd(libc::EOVERFLOW), EOVERFLOW);
        assert_eq!(errno_to_nbd(libc::ENOTSUP), ENOTSUP);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), ENOTSUP);
        assert_eq!(errno_to_nbd(libc::ESHUTDOWN), ESHUTDOWN);
        assert_eq!(errno_to_nbd(libc::EACCES), EINVAL);
        assert_eq!(errno_to_nbd(libc::ETIMEDOUT), EINVAL);
        assert_eq!(errno_to_nbd(libc::EINVAL), EINVAL);
        assert_eq!(io_error_to_nbd(&std::io::Error::other("x")), EIO);
    }

    #[test]
    fn encoders() {
        let mut v = Vec::new();
        put_simple_reply(&mut v, EPERM, 7);
        assert_eq!(v.len(), SIMPLE_REPLY_SIZE);
        assert_eq!(&v[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        v.clear();
        put_chunk_header(&mut v, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, 0);
        assert_eq!(v.len(), CHUNK_HEADER_SIZE);
        v.clear();
        put_option_reply(&mut v, OPT_GO, REP_ACK, &[]);
        assert_eq!(v.len(), 20);
        assert_eq!(&v[0..8], &REP_MAGIC.to_be_bytes());
        let long = "é".repeat(3000);
        let clipped = clip_message(&long);
        assert!(clipped.len() <= MAX_STRING && clipped.len() >= MAX_STRING - 1);
    }
}
