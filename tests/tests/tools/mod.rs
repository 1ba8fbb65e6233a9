//! QEMU's image tools (qemu-img, qemu-io) and libnbd's clients, run by the
//! qcow2 tests to make images, read them the way QEMU does and judge them.
//!
//! Shared by several test binaries, each of which uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `prog` with `args` and returns its output, whatever its exit code.
pub fn run_output(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e} (is it installed?)"))
}

/// Runs `prog` with `args`; panics with its output unless it exits with 0.
/// Returns its standard output.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = run_output(prog, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A path as `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Runs qemu-io on an image of format `fmt` (`-d unmap`, so that `discard`
/// and `write -z -u` free clusters), one `-c` per command; panics if a
/// command failed.
pub fn qemu_io(fmt: &str, image: &str, cmds: &[String]) {
    let mut args = vec!["-f", fmt, "-d", "unmap"];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(image);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed"),
        "qemu-io {args:?} reported a failure:\n{out}"
    );
}

/// What `qemu-img check` found.
#[derive(Debug)]
pub struct Check {
    /// Its exit code: 0 clean, 2 corruptions, 3 leaks only, 1 the check failed.
    pub code: i32,
    /// Corrupted entries.
    pub corruptions: u64,
    /// Leaked clusters.
    pub leaks: u64,
    /// Errors that stopped the check.
    pub check_errors: u64,
    /// The JSON it printed, and what it said on stderr.
    pub text: String,
}

/// How long [`qemu_img_check`] waits for the image's locks to go.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Runs `qemu-img check --output=json` on a qcow2 image.
///
/// A process killed with SIGKILL (qemu-storage-daemon) holds its image
/// locks until the kernel dropped its last reference to the file, which
/// io_uring requests still in flight at the kill delay: while qemu-img
/// cannot get the locks, it tries again (up to 30 s). Once it got them, no
/// request of the dead process can still change the file.
pub fn qemu_img_check(image: &Path) -> Check {
    let deadline = Instant::now() + LOCK_WAIT;
    let out = loop {
        let out = run_output(
            "qemu-img",
            &["check", "--output=json", "-f", "qcow2", s(image)],
        );
        let locked = String::from_utf8_lossy(&out.stderr).contains("Failed to get");
        if !locked || Instant::now() > deadline {
            break out;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let field = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Check {
        code: out.status.code().unwrap_or(-1),
        corruptions: field("corruptions"),
        leaks: field("leaks"),
        check_errors: field("check-errors"),
        text,
    }
}

/// Panics unless `qemu-img check` finds the image clean: no corruption, no
/// leak.
pub fn assert_check_clean(image: &Path) {
    let c = qemu_img_check(image);
    assert!(
        c.code == 0 && c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0,
        "qemu-img check {}: {c:?}",
        image.display()
    );
}

/// Writes the guest content of `image` (format `fmt`) as read by QEMU to a
/// raw file.
pub fn convert_to_raw(fmt: &str, image: &Path, raw: &Path) {
    run(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", s(image), s(raw)],
    );
}

/// Whether `qemu-img compare` finds `a` (format `fa`) and `b` (format `fb`)
/// identical; `Err` carries its output otherwise.
pub fn qemu_img_compare(fa: &str, a: &str, fb: &str, b: &str) -> Result<(), String> {
    let out = run_output("qemu-img", &["compare", "-f", fa, "-F", fb, a, b]);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img compare {a} {b} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
