//! What several integration tests share: images made by qemu-img.

use std::path::Path;
use std::process::Command;

/// Makes a qcow2 image at `path` with qemu-img's `-o` `options` and
/// `size` (qemu-img's notation: "4M").
pub fn create_qcow2(path: &Path, options: &str, size: &str) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", options])
        .arg(path)
        .arg(size)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img create {options} {size}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
