//! The nbd driver against a server written here that reads no request
//! until the test says: what a request whose future is dropped before it
//! could be sent leaves behind.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use blkgraph_graph::aio::{block_on, IoFuture};
use blkgraph_graph::{Graph, IoBuffer, Options, WriteFlags};
use parking_lot::{Condvar, Mutex};

const SIZE: u64 = 64 << 20;

fn be32(s: &mut UnixStream) -> u32 {
    let mut b = [0; 4];
    s.read_exact(&mut b).unwrap();
    u32::from_be_bytes(b)
}

/// Fixed newstyle without structured replies: every option but NBD_OPT_GO
/// is refused; the export has SIZE bytes and takes flushes.
fn handshake(s: &mut UnixStream) {
    s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes())
        .unwrap();
    s.write_all(&0x4948_4156_454f_5054u64.to_be_bytes())
        .unwrap();
    s.write_all(&3u16.to_be_bytes()).unwrap();
    be32(s);
    loop {
        let mut head = [0; 16];
        s.read_exact(&mut head).unwrap();
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let mut data = vec![0; u32::from_be_bytes(head[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data).unwrap();
        let reply = |s: &mut UnixStream, kind: u32, payload: &[u8]| {
            let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            m.extend_from_slice(&option.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            m.extend_from_slice(payload);
            s.write_all(&m).unwrap();
        };
        if option == 7 {
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend_from_slice(&SIZE.to_be_bytes());
            info.extend_from_slice(&(1u16 | 4).to_be_bytes());
            reply(s, 3, &info);
            reply(s, 1, &[]);
            return;
        }
        reply(s, (1 << 31) + 1, &[]);
    }
}

/// Serves one connection; reads requests only once `reading` is set.
fn serve(listener: UnixListener, reading: Arc<(Mutex<bool>, Condvar)>) {
    let (mut s, _) = listener.accept().unwrap();
    handshake(&mut s);
    {
        let (go, changed) = &*reading;
        let mut go = go.lock();
        changed.wait_while(&mut go, |go| !*go);
    }
    loop {
        let mut req = [0; 28];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let kind = u16::from_be_bytes([req[6], req[7]]);
        let len = u32::from_be_bytes(req[24..28].try_into().unwrap()) as usize;
        match kind {
            1 => s.read_exact(&mut vec![0; len]).unwrap(),
            2 => return,
            _ => {}
        }
        let mut reply = 0x6744_6698u32.to_be_bytes().to_vec();
        reply.extend_from_slice(&0u32.to_be_bytes());
        reply.extend_from_slice(&req[8..16]);
        if kind == 0 {
            reply.resize(reply.len() + len, 0);
        }
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// Polls `fut` once.
async fn poll_once(fut: &mut IoFuture<'_>) {
    std::future::poll_fn(|cx| {
        assert!(fut.as_mut().poll(cx).is_pending());
        Poll::Ready(())
    })
    .await
}

/// A request registered on the connection and then dropped while it
/// waited for another request's send to end stayed in the table of
/// requests in flight: nothing ever answered it, and the node's drain
/// (every graph change, blockdev-del) waited for it for ever.
#[test]
fn a_request_dropped_before_it_was_sent_is_not_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let reading = Arc::new((Mutex::new(false), Condvar::new()));
    let server = {
        let reading = reading.clone();
        std::thread::spawn(move || serve(listener, reading))
    };
    let graph = Graph::new();
    let arg = format!(
        "driver=nbd,node-name=n,server.type=unix,server.path={}",
        path.display()
    );
    let node = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
    let (done, drained) = mpsc::channel();
    let worker = {
        let (node, reading) = (node.clone(), reading.clone());
        std::thread::spawn(move || {
            block_on(async {
                // More than the socket holds: its send waits for the
                // server, holding the connection's send lock.
                let big = IoBuffer::from_vec(vec![1; 16 << 20]);
                let mut write = node.write(0, &big, WriteFlags::default());
                poll_once(&mut write).await;
                let small = IoBuffer::from_vec(vec![0; 4096]);
                let mut read = node.read(0, &small);
                poll_once(&mut read).await;
                drop(read);
                let (go, changed) = &*reading;
                *go.lock() = true;
                changed.notify_all();
                write.await.unwrap();
                node.drain().await.unwrap();
            })
            .unwrap();
            done.send(()).unwrap();
        })
    };
    drained
        .recv_timeout(Duration::from_secs(60))
        .expect("the drain ends");
    worker.join().unwrap();
    drop(node);
    graph.remove("n").unwrap();
    server.join().unwrap();
}
