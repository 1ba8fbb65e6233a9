//! The `virtio_blk` harness: bytes as a guest's virtqueue, its descriptor
//! table and the memory the descriptors point to, parsed and run by the
//! vhost-user-blk device's request code.
//!
//! Guest memory has two 64 KiB regions with a hole between them
//! ([`REGIONS`]): the split queue's descriptor table at [`DESC_TABLE`],
//! its available ring at [`AVAIL_RING`] and its used ring at
//! [`USED_RING`], data from [`DATA`] on. The input is:
//!
//! | bytes | what |
//! | --- | --- |
//! | 0 | bits 0-2: queue size `1 << n` (at most 128); 3: read-only; 4: writethrough; 5-6: block size 512 << (2 * n); 7: EVENT_IDX |
//! | 1 | capacity, as an index in [`CAPACITIES`] |
//! | 2 | how many chains the guest makes available |
//! | 3.. | the available ring's entries (2 bytes each, little-endian) |
//! | then | the descriptor table, 16 bytes per descriptor (`addr`, `len`, `flags`, `next`, little-endian) |
//! | rest | guest memory from [`DATA`] on, across the hole into the second region |
//!
//! Memory the input does not fill holds [`FILL`]. Each chain the queue
//! hands out (`virtio_queue`'s own chain walking: `next`, indirect tables,
//! loops, addresses outside memory) goes through `Request::parse` as the
//! device's worker calls it, in the same order (each chain parsed and, if
//! it is already done, completed; then the others run), and the others
//! through `Request::execute` on a `null-co` node with `read-zeroes=on` of
//! the chosen capacity, one after the other on one reactor. What must
//! hold: no panic; each completion names its chain's head and a used
//! length no larger than the chain's writable bytes; a chain with a used
//! length has a valid status (OK, IOERR or UNSUPP) in its last writable
//! byte; and the device writes guest memory only inside the writable
//! descriptors of the chains it was given.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use blkgraph_backend::vhost_user_blk::{Completion, DeviceLimits, GuestMemory, Request};
use blkgraph_graph::aio::block_on;
use blkgraph_graph::{Graph, Node, Options, MAX_LENGTH};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// The guest memory regions: (start, size).
pub const REGIONS: [(u64, usize); 2] = [(0, 0x10000), (0x20000, 0x10000)];
/// The split queue's descriptor table.
pub const DESC_TABLE: u64 = 0;
/// The available ring.
pub const AVAIL_RING: u64 = 0x1000;
/// The used ring.
pub const USED_RING: u64 = 0x2000;
/// Where the rest of the input goes.
pub const DATA: u64 = 0x3000;
/// What memory the input does not fill holds: not zero, so that reads
/// (which write zeroes) show where they wrote.
pub const FILL: u8 = 0xa5;
/// The device capacities to choose from, in bytes.
pub const CAPACITIES: [u64; 6] = [0, 4096, 1 << 20, 1 << 30, (1 << 40) + 512, MAX_LENGTH];
/// The serial number GET_ID answers.
pub const SERIAL: &[u8] = b"blkgraph-fuzz-serial";

/// One `null-co` node per capacity, made once.
fn node(capacity: usize) -> Arc<Node> {
    static NODES: OnceLock<(Graph, Vec<Arc<Node>>)> = OnceLock::new();
    NODES
        .get_or_init(|| {
            let graph = Graph::new();
            let nodes = CAPACITIES
                .iter()
                .enumerate()
                .map(|(i, size)| {
                    let arg = format!("driver=null-co,node-name=n{i},size={size},read-zeroes=on");
                    graph
                        .add(Options::from_arg(&arg, None).expect("node options"))
                        .expect("null-co node")
                })
                .collect();
            (graph, nodes)
        })
        .1[capacity]
        .clone()
}

/// Reads a little-endian u16 at `at`, or 0 past the end.
fn le16(data: &[u8], at: usize) -> u16 {
    let lo = data.get(at).copied().unwrap_or(0);
    let hi = data.get(at + 1).copied().unwrap_or(0);
    u16::from_le_bytes([lo, hi])
}

/// The guest address ranges of the writable descriptors of a chain.
type Writable = Vec<Range<u64>>;

/// The harness.
pub fn run(data: &[u8]) {
    let Some(&config) = data.first() else {
        return;
    };
    let size = 1u16 << (config & 7).min(7);
    let block_size = 512u64 << (2 * ((config >> 5) & 3));
    let capacity = usize::from(data.get(1).copied().unwrap_or(0)) % CAPACITIES.len();
    let limits = DeviceLimits {
        capacity: CAPACITIES[capacity] / block_size * block_size,
        block_size,
        read_only: config & 8 != 0,
        writethrough: config & 16 != 0,
    };
    let available = u16::from(data.get(2).copied().unwrap_or(0));

    let ranges: Vec<_> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), len))
        .collect();
    let memory = Arc::new(GuestMemory::from_ranges(&ranges).expect("guest memory"));
    for &(start, len) in &REGIONS {
        memory
            .write_slice(&vec![FILL; len], GuestAddress(start))
            .expect("fill");
    }
    // The available ring: flags 0, idx, then the entries.
    let mut at = 3;
    let mut avail = vec![0u8; 4];
    avail[2..4].copy_from_slice(&available.to_le_bytes());
    for _ in 0..size {
        avail.extend_from_slice(&le16(data, at).to_le_bytes());
        at += 2;
    }
    memory
        .write_slice(&avail, GuestAddress(AVAIL_RING))
        .expect("avail ring");
    memory
        .write_slice(&[0; 4], GuestAddress(USED_RING))
        .expect("used ring");
    // The descriptor table, then the data.
    let table_len = 16 * usize::from(size);
    let table = data.get(at..).unwrap_or_default();
    let table = &table[..table.len().min(table_len)];
    memory
        .write_slice(table, GuestAddress(DESC_TABLE))
        .expect("descriptor table");
    at += table.len();
    let mut rest = data.get(at..).unwrap_or_default();
    let first_len = (REGIONS[0].1 as u64 - DATA) as usize;
    let (first, second) = rest.split_at(rest.len().min(first_len));
    memory.write_slice(first, GuestAddress(DATA)).expect("data");
    rest = &second[..second.len().min(REGIONS[1].1)];
    memory
        .write_slice(rest, GuestAddress(REGIONS[1].0))
        .expect("data");

    let mut queue = Queue::new(128).expect("queue");
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(config & 128 != 0);
    queue.set_ready(true);
    assert!(
        queue.is_valid(memory.as_ref()),
        "the harness's queue is invalid"
    );

    let before = snapshot(&memory);
    let mut writable: Vec<Writable> = Vec::new();
    let mut chains = 0;
    let mut started = Vec::new();
    // As the queue worker does: every available chain is popped and
    // parsed, and those already done are completed at once; the others run
    // after (here one after the other, on one reactor).
    while let Some(chain) = queue.pop_descriptor_chain(memory.clone()) {
        chains += 1;
        assert!(
            chains <= usize::from(size),
            "more chains than the queue holds"
        );
        // virtio-queue hands out a head past the table as an empty chain.
        let head = chain.head_index();
        // The same walk as the device's, for what it may write.
        let ranges: Writable = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| d.addr().0..d.addr().0.saturating_add(u64::from(d.len())))
            .collect();
        writable.push(ranges.clone());
        let request = Request::parse(chain, &memory, &limits, SERIAL);
        let check = Check { head, size, ranges };
        if request.is_done() {
            check.completion(&memory, request.complete(VIRTIO_BLK_S_OK as u8, 0));
        } else {
            started.push((request, check));
        }
    }
    if !started.is_empty() {
        let root = node(capacity);
        block_on(async {
            for (request, check) in started {
                check.completion(&memory, request.execute(root.clone(), 0).await);
            }
        })
        .expect("block_on");
    }
    let after = snapshot(&memory);
    for (i, (&(start, _), (old, new))) in REGIONS.iter().zip(before.iter().zip(&after)).enumerate()
    {
        for (chunk, (a, b)) in old.chunks(64).zip(new.chunks(64)).enumerate() {
            if a == b {
                continue;
            }
            for (offset, (x, y)) in a.iter().zip(b).enumerate() {
                let addr = start + (64 * chunk + offset) as u64;
                if x != y && !writable.iter().flatten().any(|r| r.contains(&addr)) {
                    panic!("region {i}: byte {addr:#x} changed outside every writable descriptor");
                }
            }
        }
    }
}

/// What one chain's completion must be.
struct Check {
    head: u16,
    size: u16,
    ranges: Writable,
}

impl Check {
    fn completion(&self, memory: &GuestMemory, completion: Completion) {
        let head = self.head;
        let writable_len: u64 = self.ranges.iter().map(|r| r.end - r.start).sum();
        assert_eq!(completion.head, head, "completion of another chain");
        if head >= self.size {
            assert_eq!(
                completion.len, 0,
                "a used length for head {head} of {}",
                self.size
            );
        }
        assert!(
            u64::from(completion.len) <= writable_len,
            "used length {} over {writable_len} writable bytes",
            completion.len
        );
        if completion.len > 0 {
            let last = self
                .ranges
                .iter()
                .rfind(|r| !r.is_empty())
                .expect("a used length without writable bytes");
            let mut status = [0u8];
            memory
                .read_slice(&mut status, GuestAddress(last.end - 1))
                .expect("the status byte is in memory");
            assert!(
                [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP]
                    .contains(&u32::from(status[0])),
                "status {} for chain {head}",
                status[0]
            );
        }
    }
}

/// A copy of every region.
fn snapshot(memory: &GuestMemory) -> Vec<Vec<u8>> {
    REGIONS
        .iter()
        .map(|&(start, len)| {
            let mut bytes = vec![0; len];
            memory
                .read_slice(&mut bytes, GuestAddress(start))
                .expect("snapshot");
            bytes
        })
        .collect()
}
