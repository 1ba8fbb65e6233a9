//! What several integration tests share: images made by qemu-img.

use std::path::Path;
use std::process::Command;

/// Runs qemu-img with `args`; panics with its output if it fails.
pub fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a qcow2 image at `path` with qemu-img's `-o` `options` and
/// `size` (qemu-img's notation: "4M").
pub fn create_qcow2(path: &Path, options: &str, size: &str) {
    let path = path.to_str().expect("a UTF-8 path");
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", options, path, size]);
}
