//! The handshake: fixed newstyle negotiation, from the greeting to the
//! option that enters transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME).

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::Client;
use super::export::{ExportTable, NbdExport};
use super::proto::{self, put_option_reply};
use super::session::{MetaContext, MetaKind, Session, ALLOCATION_ID, DEPTH_ID, FIRST_BITMAP_ID};
use super::socket::Stream;

/// Largest option payload read; larger ones are skipped with
/// NBD_REP_ERR_TOO_BIG.
const MAX_OPTION_DATA: u32 = 1 << 20;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

struct Negotiation<'a> {
    exports: &'a ExportTable,
    client: &'a Arc<Client>,
    stream: &'a mut Stream,
    deadline: Option<Instant>,
    out: Vec<u8>,
    structured: bool,
    no_zeroes: bool,
    /// Contexts of the last NBD_OPT_SET_META_CONTEXT, with its export name.
    meta: Option<(String, Vec<MetaContext>)>,
}

/// Runs the handshake on a new connection, which must end within
/// `timeout`. `Ok(None)`: the client ended it (NBD_OPT_ABORT, or an
/// unknown export with NBD_OPT_EXPORT_NAME).
pub fn negotiate(
    exports: &ExportTable,
    timeout: Option<Duration>,
    client: &Arc<Client>,
    stream: &mut Stream,
) -> io::Result<Option<Session>> {
    let mut n = Negotiation {
        exports,
        client,
        stream,
        deadline: timeout.map(|t| Instant::now() + t),
        out: Vec::with_capacity(256),
        structured: false,
        no_zeroes: false,
        meta: None,
    };
    n.run()
}

/// Reads a big-endian u32 at `at`, if the slice is long enough.
fn be32(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be16(data: &[u8], at: usize) -> Option<u16> {
    data.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// A safe rendering of a client-supplied name for messages.
fn sane(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(&name[..name.len().min(80)]);
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl Negotiation<'_> {
    fn set_timeout(&mut self) -> io::Result<()> {
        match self.deadline {
            None => self.stream.set_timeouts(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "handshake took too long",
                    ));
                }
                self.stream.set_timeouts(Some(left))
            }
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.set_timeout()?;
        self.stream.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "handshake took too long")
            }
            _ => e,
        })
    }

    /// Reads and drops `len` bytes.
    fn skip(&mut self, mut len: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while len > 0 {
            let n = len.min(buf.len() as u64) as usize;
            self.read_exact(&mut buf[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.set_timeout()?;
        let out = std::mem::take(&mut self.out);
        let r = self.stream.write_all(&out);
        self.out = out;
        self.out.clear();
        r
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        put_option_reply(&mut self.out, option, kind, data);
    }

    /// Sends an error reply with a message and flushes.
    fn error(&mut self, option: u32, kind: u32, msg: &str) -> io::Result<()> {
        log::debug!(
            "NBD client {}: {} refused: {msg}",
            self.client.id,
            proto::option_name(option)
        );
        self.reply(option, kind, proto::clip_message(msg).as_bytes());
        self.flush()
    }

    fn ack(&mut self, option: u32) -> io::Result<()> {
        self.reply(option, proto::REP_ACK, &[]);
        self.flush()
    }

    fn run(&mut self) -> io::Result<Option<Session>> {
        self.out.extend_from_slice(&proto::INIT_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&proto::OPTS_MAGIC.to_be_bytes());
        self.out
            .extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        self.flush()?;
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        let flags = u32::from_be_bytes(b);
        if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(invalid(format!("unknown client flags {flags:#x}")));
        }
        let fixed = flags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
        loop {
            if self.client.stopping() {
                return Ok(None);
            }
            let mut h = [0u8; 16];
            self.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let length = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            if magic != proto::OPTS_MAGIC {
                return Err(invalid(format!("bad option magic {magic:#x}")));
            }
            if !fixed && option != proto::OPT_EXPORT_NAME {
                return Err(invalid(format!(
                    "option {option} from a client without fixed newstyle"
                )));
            }
            if length > MAX_OPTION_DATA {
                if option == proto::OPT_EXPORT_NAME {
                    return Err(invalid("export name too long"));
                }
                self.skip(u64::from(length))?;
                self.error(option, proto::REP_ERR_TOO_BIG, "option data too long")?;
                continue;
            }
            let mut data = vec![0u8; length as usize];
            self.read_exact(&mut data)?;
            let done = match option {
                proto::OPT_EXPORT_NAME => return self.export_name(&data),
                proto::OPT_ABORT => {
                    // The client may close without waiting for the reply.
                    let _ = self.ack(option);
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    self.list(&data)?;
                    None
                }
                proto::OPT_STARTTLS => {
                    self.error(option, proto::REP_ERR_POLICY, "TLS not configured")?;
                    None
                }
                proto::OPT_INFO | proto::OPT_GO => self.info(option, &data)?,
                proto::OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.error(option, proto::REP_ERR_INVALID, "option takes no data")?;
                    } else if self.structured {
                        self.error(
                            option,
                            proto::REP_ERR_INVALID,
                            "structured reply already negotiated",
                        )?;
                    } else {
                        self.structured = true;
                        self.ack(option)?;
                    }
                    None
                }
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    self.meta_context(option, &data)?;
                    None
                }
                _ => {
                    self.error(
                        option,
                        proto::REP_ERR_UNSUP,
                        &format!("unsupported option {option}"),
                    )?;
                    None
                }
            };
            if let Some(session) = done {
                return Ok(Some(session));
            }
        }
    }

    fn lookup(&self, name: &[u8]) -> Option<Arc<NbdExport>> {
        let name = std::str::from_utf8(name).ok()?;
        self.exports.find(name).filter(|e| !e.is_deleted())
    }

    /// The contexts selected for `export`, if the last
    /// NBD_OPT_SET_META_CONTEXT named it.
    fn contexts_for(&mut self, export: &NbdExport) -> Vec<MetaContext> {
        match self.meta.take() {
            Some((name, contexts)) if name == export.name() => contexts,
            _ => Vec::new(),
        }
    }

    fn session(&mut self, export: Arc<NbdExport>) -> Session {
        Session {
            contexts: self.contexts_for(&export),
            structured: self.structured,
            export,
        }
    }

    fn export_name(&mut self, name: &[u8]) -> io::Result<Option<Session>> {
        let Some(export) = self.lookup(name) else {
            log::debug!(
                "NBD client {}: NBD_OPT_EXPORT_NAME for unknown export '{}'",
                self.client.id,
                sane(name)
            );
            return Ok(None);
        };
        if !export.attach(self.client.clone()) {
            return Ok(None);
        }
        self.out.extend_from_slice(&export.size().to_be_bytes());
        self.out
            .extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        if !self.no_zeroes {
            self.out.extend_from_slice(&[0u8; 124]);
        }
        if let Err(e) = self.flush() {
            export.detach(self.client);
            return Err(e);
        }
        Ok(Some(self.session(export)))
    }

    fn list(&mut self, data: &[u8]) -> io::Result<()> {
        let option = proto::OPT_LIST;
        if !data.is_empty() {
            return self.error(option, proto::REP_ERR_INVALID, "option takes no data");
        }
        for e in self.exports.list() {
            let mut d = Vec::new();
            d.extend_from_slice(&(e.name().len() as u32).to_be_bytes());
            d.extend_from_slice(e.name().as_bytes());
            if let Some(desc) = e.description() {
                d.extend_from_slice(desc.as_bytes());
            }
            self.reply(option, proto::REP_SERVER, &d);
        }
        self.ack(option)
    }

    fn info_item(&mut self, option: u32, kind: u16, payload: &[u8]) {
        let mut d = Vec::with_capacity(2 + payload.len());
        d.extend_from_slice(&kind.to_be_bytes());
        d.extend_from_slice(payload);
        self.reply(option, proto::REP_INFO, &d);
    }

    /// NBD_OPT_INFO and NBD_OPT_GO; a session when GO succeeded.
    fn info(&mut self, option: u32, data: &[u8]) -> io::Result<Option<Session>> {
        let bad = |s: &mut Self, msg: &str| s.error(option, proto::REP_ERR_INVALID, msg);
        let Some(namelen) = be32(data, 0).map(|n| n as usize) else {
            bad(self, "option too short")?;
            return Ok(None);
        };
        let Some(count) = namelen.checked_add(4).and_then(|at| be16(data, at)) else {
            bad(self, "name length exceeds the option")?;
            return Ok(None);
        };
        let items_at = 4 + namelen + 2;
        if data.len() != items_at + 2 * usize::from(count) {
            bad(self, "option length does not match its content")?;
            return Ok(None);
        }
        let name = &data[4..4 + namelen];
        if namelen > proto::MAX_STRING {
            bad(self, "export name too long")?;
            return Ok(None);
        }
        let requests: Vec<u16> = (0..usize::from(count))
            .filter_map(|i| be16(data, items_at + 2 * i))
            .collect();
        let Some(export) = self.lookup(name) else {
            let msg = format!("export '{}' not present", sane(name));
            self.error(option, proto::REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        let blocksize = requests.contains(&proto::INFO_BLOCK_SIZE);
        if requests.contains(&proto::INFO_NAME) {
            self.info_item(option, proto::INFO_NAME, export.name().as_bytes());
        }
        if requests.contains(&proto::INFO_DESCRIPTION) {
            if let Some(desc) = export.description() {
                self.info_item(option, proto::INFO_DESCRIPTION, desc.as_bytes());
            }
        }
        // The real minimum only for clients that promise to honour it, 1
        // for the others (requests are served at any alignment anyway).
        let align = export.min_block_size();
        let min = if option == proto::OPT_INFO || blocksize {
            align
        } else {
            1
        };
        let mut sizes = Vec::with_capacity(12);
        sizes.extend_from_slice(&min.to_be_bytes());
        sizes.extend_from_slice(&proto::PREFERRED_BLOCK_SIZE.max(min).to_be_bytes());
        sizes.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
        self.info_item(option, proto::INFO_BLOCK_SIZE, &sizes);
        let mut e = Vec::with_capacity(10);
        e.extend_from_slice(&export.size().to_be_bytes());
        e.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        self.info_item(option, proto::INFO_EXPORT, &e);
        if option == proto::OPT_INFO {
            if !blocksize && align > 1 {
                return self
                    .error(
                        option,
                        proto::REP_ERR_BLOCK_SIZE_REQD,
                        "request NBD_INFO_BLOCK_SIZE to use this export",
                    )
                    .map(|()| None);
            }
            self.ack(option)?;
            return Ok(None);
        }
        if !export.attach(self.client.clone()) {
            let msg = format!("export '{}' not present", sane(name));
            self.out.clear();
            self.error(option, proto::REP_ERR_UNKNOWN, &msg)?;
            return Ok(None);
        }
        if let Err(e) = self.ack(option) {
            export.detach(self.client);
            return Err(e);
        }
        Ok(Some(self.session(export)))
    }

    /// Parses a meta context option: export name and queries.
    fn meta_queries(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
        let namelen = be32(data, 0)? as usize;
        let name = data.get(4..4usize.checked_add(namelen)?)?;
        let mut at = 4 + namelen;
        let count = be32(data, at)?;
        at += 4;
        let mut queries = Vec::new();
        for _ in 0..count {
            let len = be32(data, at)? as usize;
            at += 4;
            queries.push(data.get(at..at.checked_add(len)?)?);
            at += len;
        }
        (at == data.len()).then_some((name, queries))
    }

    /// The contexts of `export` that `query` names; for
    /// NBD_OPT_LIST_META_CONTEXT (`list`), namespace wildcards match too.
    fn matching(export: &NbdExport, query: &[u8], list: bool, out: &mut Vec<u32>) {
        let mut add = |id: u32| {
            if !out.contains(&id) {
                out.push(id);
            }
        };
        let bitmap_ids = (0..export.bitmaps().len() as u32).map(|i| FIRST_BITMAP_ID + i);
        let depth = export.allocation_depth();
        if let Some(leaf) = query.strip_prefix(b"base:") {
            if leaf == b"allocation" || (list && leaf.is_empty()) {
                add(ALLOCATION_ID);
            }
        } else if let Some(leaf) = query.strip_prefix(b"qemu:") {
            if depth && (leaf == b"allocation-depth" || (list && leaf.is_empty())) {
                add(DEPTH_ID);
            }
            if list && (leaf.is_empty() || leaf == b"dirty-bitmap:") {
                bitmap_ids.for_each(add);
            } else if let Some(name) = leaf.strip_prefix(b"dirty-bitmap:") {
                for (i, b) in export.bitmaps().iter().enumerate() {
                    if b.name().as_bytes() == name {
                        add(FIRST_BITMAP_ID + i as u32);
                    }
                }
            }
        }
    }

    fn context_name(export: &NbdExport, id: u32) -> String {
        match id {
            ALLOCATION_ID => "base:allocation".into(),
            DEPTH_ID => "qemu:allocation-depth".into(),
            _ => format!(
                "qemu:dirty-bitmap:{}",
                export.bitmaps()[(id - FIRST_BITMAP_ID) as usize].name()
            ),
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == proto::OPT_SET_META_CONTEXT;
        if set {
            // A failed selection selects nothing.
            self.meta = None;
        }
        if !self.structured {
            let msg = format!(
                "request option '{}' when structured reply is not negotiated",
                proto::option_name(option)
            );
            return self.error(option, proto::REP_ERR_INVALID, &msg);
        }
        let Some((name, queries)) = Self::meta_queries(data) else {
            return self.error(option, proto::REP_ERR_INVALID, "malformed option data");
        };
        let Some(export) = self.lookup(name) else {
            let msg = format!("export '{}' not present", sane(name));
            return self.error(option, proto::REP_ERR_UNKNOWN, &msg);
        };
        let mut ids = Vec::new();
        if queries.is_empty() {
            if !set {
                ids.push(ALLOCATION_ID);
                if export.allocation_depth() {
                    ids.push(DEPTH_ID);
                }
                ids.extend((0..export.bitmaps().len() as u32).map(|i| FIRST_BITMAP_ID + i));
            }
        } else {
            for q in queries.iter().filter(|q| q.len() <= proto::MAX_STRING) {
                Self::matching(&export, q, !set, &mut ids);
            }
        }
        ids.sort_unstable();
        let mut contexts = Vec::new();
        for id in ids {
            let mut d = Vec::new();
            d.extend_from_slice(&(if set { id } else { 0 }).to_be_bytes());
            d.extend_from_slice(Self::context_name(&export, id).as_bytes());
            self.reply(option, proto::REP_META_CONTEXT, &d);
            let kind = match id {
                ALLOCATION_ID => MetaKind::Allocation,
                DEPTH_ID => MetaKind::AllocationDepth,
                _ => MetaKind::Bitmap(export.bitmaps()[(id - FIRST_BITMAP_ID) as usize].clone()),
            };
            contexts.push(MetaContext { id, kind });
        }
        if set {
            self.meta = Some((export.name().to_string(), contexts));
        }
        self.ack(option)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q);
        }
        d
    }

    #[test]
    fn meta_query_parsing() {
        let d = query(b"exp", &[b"base:allocation", b"qemu:"]);
        let (name, qs) = Negotiation::meta_queries(&d).unwrap();
        assert_eq!(name, b"exp");
        assert_eq!(qs, vec![&b"base:allocation"[..], &b"qemu:"[..]]);
        // Truncated, overlong and trailing data are all malformed.
        assert!(Negotiation::meta_queries(&d[..d.len() - 1]).is_none());
        let mut long = d.clone();
        long.push(0);
        assert!(Negotiation::meta_queries(&long).is_none());
        let mut huge = query(b"exp", &[]);
        huge[4 + 3..4 + 3 + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Negotiation::meta_queries(&huge).is_none());
        assert!(Negotiation::meta_queries(&[0xff; 4]).is_none());
    }

    #[test]
    fn sane_names() {
        assert_eq!(sane(b"a\nb"), "a?b");
        assert_eq!(sane(&[b'x'; 200]).len(), 80);
    }
}
