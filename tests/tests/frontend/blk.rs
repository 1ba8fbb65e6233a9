//! virtio-blk requests on top of the test driver.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::driver::{Desc, Queue, Used};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
pub const FLAG_UNMAP: u32 = 1;

/// A request laid out in guest memory: header, data, status.
pub struct BlkRequest {
    /// The chain.
    pub descs: Vec<Desc>,
    /// Where the device-writable data starts, and its length.
    pub in_data: (GuestAddress, u32),
    /// The status byte.
    pub status: GuestAddress,
}

/// What the device made of a request.
#[derive(Debug)]
pub struct Outcome {
    /// The status byte.
    pub status: u8,
    /// The used length.
    pub used_len: u32,
    /// The device-writable data.
    pub data: Vec<u8>,
}

impl BlkRequest {
    /// A well-formed request: header, `out` data (read-only), `in_len`
    /// writable data bytes, status.
    pub fn new(
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        type_: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Self {
        let hdr = header(q, mem, type_, sector);
        let mut descs = vec![Desc {
            addr: hdr,
            len: 16,
            write: false,
        }];
        if !out.is_empty() {
            let a = q.alloc(out.len() as u64);
            mem.write_slice(out, a).unwrap();
            descs.push(Desc {
                addr: a,
                len: out.len() as u32,
                write: false,
            });
        }
        let in_addr = q.alloc(u64::from(in_len));
        if in_len > 0 {
            mem.write_slice(&vec![0xeeu8; in_len as usize], in_addr)
                .unwrap();
            descs.push(Desc {
                addr: in_addr,
                len: in_len,
                write: true,
            });
        }
        let status = q.alloc(1);
        mem.write_obj(0xffu8, status).unwrap();
        descs.push(Desc {
            addr: status,
            len: 1,
            write: true,
        });
        BlkRequest {
            descs,
            in_data: (in_addr, in_len),
            status,
        }
    }

    /// Reads the outcome after the device used the chain.
    pub fn outcome(&self, mem: &GuestMemoryMmap, used: Used) -> Outcome {
        let mut data = vec![0u8; self.in_data.1 as usize];
        mem.read_slice(&mut data, self.in_data.0).unwrap();
        Outcome {
            status: mem.read_obj(self.status).unwrap(),
            used_len: used.len,
            data,
        }
    }

    /// Submits, kicks, waits, and returns the outcome.
    pub fn run(self, q: &mut Queue, mem: &GuestMemoryMmap) -> Outcome {
        q.submit(mem, &self.descs);
        q.kick();
        let used = q.wait(mem, 1)[0];
        self.outcome(mem, used)
    }
}

/// Writes a 16-byte request header; returns its address.
pub fn header(q: &mut Queue, mem: &GuestMemoryMmap, type_: u32, sector: u64) -> GuestAddress {
    let hdr = q.alloc(16);
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&type_.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, hdr).unwrap();
    hdr
}

/// A discard/write-zeroes segment.
pub fn segment(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&num_sectors.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

/// Reads `len` bytes at `sector`.
pub fn read(q: &mut Queue, mem: &GuestMemoryMmap, sector: u64, len: u32) -> Outcome {
    BlkRequest::new(q, mem, T_IN, sector, &[], len).run(q, mem)
}

/// Writes `data` at `sector`.
pub fn write(q: &mut Queue, mem: &GuestMemoryMmap, sector: u64, data: &[u8]) -> Outcome {
    BlkRequest::new(q, mem, T_OUT, sector, data, 0).run(q, mem)
}

/// A simple request with only a status: flush, or discard/write-zeroes with
/// one segment.
pub fn simple(q: &mut Queue, mem: &GuestMemoryMmap, type_: u32, out: &[u8]) -> Outcome {
    BlkRequest::new(q, mem, type_, 0, out, 0).run(q, mem)
}
