//! Lazy refcounts: an image killed with lazy refcounts is left dirty with
//! refcounts that do not match its tables; opening it for writing repairs
//! them, as QEMU does.

use std::process::Command;

mod common;

use blkgraph_graph::aio::block_on;
use blkgraph_graph::{Graph, IoBuffer, Options, WriteFlags};

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn info(path: &str) -> serde_json::Value {
    let (ok, text) = run("qemu-img", &["info", "--output=json", "-U", path]);
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_dirty_image_is_repaired_when_opened_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("lazy.qcow2");
    let path = image.to_str().unwrap();
    common::create_qcow2(&image, "lazy_refcounts=on", "16M");
    // qemu-io dies by SIGKILL after its writes: nothing flushed the
    // refcounts, and the dirty flag stays.
    let (_, text) = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x33 4M 64k",
            "-c",
            "sigraise 9",
            path,
        ],
    );
    assert!(!text.contains("failed"), "{text}");
    assert_eq!(info(path)["dirty-flag"], true);
    let (clean, report) = run("qemu-img", &["check", path]);
    assert!(!clean, "the killed image has refcount errors: {report}");

    // Read-only, the image opens as it is.
    let graph = Graph::new();
    let ro =
        format!("driver=qcow2,node-name=ro,read-only=on,file.driver=file,file.filename={path}");
    graph.add(Options::from_arg(&ro, None).unwrap()).unwrap();
    graph.remove("ro").unwrap();
    assert_eq!(info(path)["dirty-flag"], true);

    let arg = format!("driver=qcow2,node-name=q,file.driver=file,file.filename={path}");
    let node = graph.add(Options::from_arg(&arg, None).unwrap()).unwrap();
    assert_eq!(info(path)["dirty-flag"], false, "repaired at open");
    block_on(async {
        let buf = IoBuffer::from_vec(vec![0u8; 1 << 20]);
        node.read(0, &buf).await.unwrap();
        assert!(buf.to_vec().iter().all(|&b| b == 0x5a));
        let more = IoBuffer::from_vec(vec![0x77u8; 3 << 20]);
        node.write(8 << 20, &more, WriteFlags::default())
            .await
            .unwrap();
    })
    .unwrap();
    assert_eq!(info(path)["dirty-flag"], true, "dirty while written lazily");
    drop(node);
    graph.remove("q").unwrap();
    assert_eq!(info(path)["dirty-flag"], false, "clean after close");
    let (clean, report) = run("qemu-img", &["check", path]);
    assert!(clean, "{report}");
    for (pattern, offset, len) in [
        ("0x5a", "0", "1M"),
        ("0x33", "4M", "64k"),
        ("0x77", "8M", "3M"),
    ] {
        let cmd = format!("read -P {pattern} {offset} {len}");
        let (ok, text) = run("qemu-io", &["-r", "-c", &cmd, path]);
        assert!(
            ok && !text.contains("Pattern verification failed"),
            "{text}"
        );
    }
}

#[test]
fn lazy_refcounts_need_compat_1_1() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("v2.qcow2");
    let path = image.to_str().unwrap();
    common::create_qcow2(&image, "compat=0.10", "1M");
    let arg =
        format!("driver=qcow2,node-name=q,lazy-refcounts=on,file.driver=file,file.filename={path}");
    let e = Graph::new()
        .add(Options::from_arg(&arg, None).unwrap())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
    );
}

/// A dirty image with an L2 entry that points near the end of the 56-bit
/// offset space: the repair walked every cluster up to it (about 2^40)
/// and would have grown the refcount table to count it. It now counts
/// only the clusters referenced, and the refcount table that would have
/// to grow past QEMU's 8 MiB refuses (EFBIG): the open fails at once
/// with a clear error.
#[test]
fn a_dirty_image_pointing_past_any_refcount_table_fails_to_open() {
    use std::io::{Read, Seek, SeekFrom, Write};

    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("hostile.qcow2");
    let path = image.to_str().unwrap().to_string();
    common::create_qcow2(&image, "cluster_size=64k", "4M");
    let (ok, text) = run("qemu-io", &["-c", "write -P 0x5a 0 64k", &path]);
    assert!(ok, "{text}");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let be64 = |file: &mut std::fs::File, at: u64| {
        let mut b = [0u8; 8];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut b).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(&mut file, 40);
    let l2 = be64(&mut file, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0);
    // Guest cluster 0 at host offset 0x00ff_ffff_ffff_0000 (COPIED), and
    // the image dirty (incompatible feature bit 0, at byte 72).
    file.seek(SeekFrom::Start(l2)).unwrap();
    file.write_all(&(0x80ff_ffff_ffff_0000u64).to_be_bytes())
        .unwrap();
    let incompatible = be64(&mut file, 72);
    file.seek(SeekFrom::Start(72)).unwrap();
    file.write_all(&(incompatible | 1).to_be_bytes()).unwrap();
    drop(file);

    let (done, opened) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let arg = format!("driver=qcow2,node-name=q,file.driver=file,file.filename={path}");
        let e = Graph::new()
            .add(Options::from_arg(&arg, None).unwrap())
            .map(|_| ())
            .unwrap_err();
        done.send(e.to_string()).unwrap();
    });
    let e = opened
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the open ends");
    assert!(e.contains("Could not repair dirty image"), "{e}");
    assert!(e.contains("File too large"), "{e}");
}
