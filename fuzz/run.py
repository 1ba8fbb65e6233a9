#!/usr/bin/env python3
"""Build blkgraph's fuzz targets and run each with libFuzzer, leaks checked.

Modes:
  short          every target for 15 s (CI)
  long           every target for 10 million executions (docs/robustness.md)
  merge          minimise fuzz/corpus/<target> with what runs found (-merge=1)
  build          only build
  lint           rustfmt and clippy of fuzz/, and clippy of ctl's --cfg fuzzing code
Options: --runs N / --time S override the mode's limit; --target NAME
(repeatable) picks targets; --workers N fuzzes each target in N
independent processes at once that share its corpus directory (--runs is
split among them; each logs to fuzz/target/<target>.<i>.log and has a row
of its own); --no-build reuses the binaries.

The targets are built with cargo-fuzz on the stable toolchain (`-s none`:
coverage instrumentation only, no -Z flag) and with LLVM 19's LeakSanitizer
runtime linked in, so that libFuzzer's -detect_leaks=1 checks every input
for leaks. Each run reads the committed corpus fuzz/corpus/<target> and
writes what it finds to fuzz/target/corpus/<target>; a crash, leak,
timeout or out-of-memory goes to fuzz/artifacts/<target>/. For each
target it prints executions, exec/s, wall time, corpus, coverage (cov/ft),
peak RSS and the result, and exits 1 if any target failed.
"""

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
TARGETS = ["options", "qmp_stream", "qmp_commands", "virtio_blk", "nbd", "nbd_client", "vhost_user"]
TRIPLE = "x86_64-unknown-linux-gnu"
BIN_DIR = FUZZ / "target" / TRIPLE / "release"
# Longest input per target: a QMP message may have 1 KiB in the harness, so
# 2 KiB streams reach several messages and the oversized one.
MAX_LEN = {
    "options": 4096,
    "qmp_stream": 2048,
    "qmp_commands": 4096,
    "virtio_blk": 4096,
    "nbd": 4096,
    # A server's replies carry the data of reads of up to 20 KiB.
    "nbd_client": 32768,
    "vhost_user": 4096,
}
# Seconds per target in short mode (CI).
SHORT_SECONDS = 15
# LLVM 19's, not 16's: 16's looks up the calling thread's context in a
# vector that another thread's start may reallocate meanwhile, and so
# crashed the targets that start threads for every input
# (docs/robustness.md), although 19's, as Debian builds it, costs 27 % more
# CPU (a pattern fill at every malloc).
LSAN_GLOB = "/usr/lib/llvm-19/lib/clang/19*/lib/linux/libclang_rt.lsan-x86_64.a"
# A thread id the kernel hands out again while LSan still holds the context of
# the thread that had it before (see pid_max_note) misleads its leak check.
PID_MAX = 4194304

# libFuzzer flags every run uses.
COMMON_FLAGS = [
    "-detect_leaks=1",  # leak check of every input that allocated more than it freed
    "-timeout=10",  # an input running 10 s is a hang
    "-rss_limit_mb=2048",  # and 2 GiB of resident memory is a crash
    # A single allocation over 8 GiB (LSan's largest) fails as glibc's
    # would; below that, memory that is allocated but never touched (the
    # zeroed bitmaps of huge nodes) is not counted against the input.
    "-malloc_limit_mb=8192",
    "-print_final_stats=1",
    "-reload=0",
]


def lsan_runtime() -> str:
    """The LeakSanitizer runtime archive of libclang-rt-19-dev."""
    found = sorted(glob.glob(LSAN_GLOB))
    if not found:
        sys.exit(
            f"fuzz: no LeakSanitizer runtime at {LSAN_GLOB}: "
            "install libclang-rt-19-dev (.ci/install-deps does)"
        )
    return found[-1]


def rustflags() -> str:
    """Extra RUSTFLAGS for cargo-fuzz: link LSan's runtime, whole.

    --export-dynamic as clang does for sanitizer runtimes (LSan 14 could not
    start without it on glibc 2.36: its dlsym of `cfree` failed, and the
    dlerror text was freed through LSan before LSan was ready).
    """
    lsan = lsan_runtime()
    return " ".join(
        [
            "-Clink-arg=-Wl,--whole-archive",
            f"-Clink-arg={lsan}",
            "-Clink-arg=-Wl,--no-whole-archive",
            "-Clink-arg=-Wl,--export-dynamic",
        ]
    )


def build(targets: list[str]) -> None:
    if shutil.which("cargo-fuzz") is None:
        sys.exit("fuzz: cargo-fuzz is missing: cargo install cargo-fuzz --locked")
    env = dict(os.environ, RUSTFLAGS=rustflags())
    # One build for all targets, or one per target picked.
    for names in [[]] if targets == TARGETS else [[t] for t in targets]:
        cmd = ["cargo", "fuzz", "build", "--sanitizer", "none", *names]
        print(f"fuzz: RUSTFLAGS='{env['RUSTFLAGS']}' {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=FUZZ, env=env, check=True)


def lint() -> None:
    """fuzz/ is outside the main workspace: check its style and lints here."""
    clippy = ["--", "-D", "warnings", "-D", "clippy::undocumented_unsafe_blocks"]
    env = dict(os.environ, RUSTFLAGS="--cfg fuzzing")
    for cmd in [
        ["cargo", "fmt", "--", "--check"],
        ["cargo", "clippy", "--all-targets", *clippy],
        # ctl/src/fuzzing.rs exists only with --cfg fuzzing (its own target
        # directory, so the main one keeps its build).
        [
            "cargo",
            "clippy",
            "--manifest-path=../Cargo.toml",
            "--package=blkgraph-ctl",
            "--target-dir=target/lint",
            *clippy,
        ],
    ]:
        print(f"fuzz: {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, cwd=FUZZ, env=env, check=True)


def pid_max_note() -> str:
    """A warning if the kernel reuses thread ids soon ('' if not).

    LSan's registry finds a stopped thread's stack and TLS by its kernel
    thread id, and keeps the entries of joinable threads that have ended.
    With the default kernel.pid_max (32768), ids come round again after
    32768 threads, a few seconds of a target that starts threads for every
    input: the leak check then scans an ended thread's stack, unmapped by
    then (the tracer dies: "Tracer caught signal 11"), or misses a live
    thread's. 4194304 (systemd's default) makes that 128 times rarer.
    """
    try:
        value = int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return ""
    if value >= PID_MAX:
        return ""
    return (
        f"fuzz: kernel.pid_max is {value}: thread ids come round again soon and"
        f" LSan's leak check can die on them; sysctl -w kernel.pid_max={PID_MAX}"
        " (.ci/install-deps does)"
    )


def fuzz_env() -> dict:
    """The environment of the fuzz binaries.

    An allocation LSan cannot make returns NULL, as glibc's malloc does (the
    fallible allocations of huge nodes' state rely on it), instead of
    ending the process; fuzz/lsan.supp names what LSan must not report.
    """
    env = dict(os.environ)
    options = ["allocator_may_return_null=1", f"suppressions={FUZZ / 'lsan.supp'}"]
    env["LSAN_OPTIONS"] = ":".join(filter(None, [env.get("LSAN_OPTIONS", ""), *options]))
    return env


def parse_output(text: str) -> dict:
    """Figures from libFuzzer's output: the last status line and final stats."""
    figures = {}
    status = [line for line in text.splitlines() if re.match(r"#\d+\s", line)]
    if status:
        last = status[-1]
        for key, pattern in [
            ("cov", r"cov: (\d+)"),
            ("ft", r"ft: (\d+)"),
            ("corp", r"corp: (\d+/\d+\w*)"),
        ]:
            m = re.search(pattern, last)
            if m:
                figures[key] = m.group(1)
    for key in [
        "number_of_executed_units",
        "average_exec_per_sec",
        "new_units_added",
        "slowest_unit_time_sec",
        "peak_rss_mb",
    ]:
        m = re.search(rf"stat::{key}:\s+(\d+)", text)
        if m:
            figures[key] = int(m.group(1))
    return figures


# The death of the leak check's tracer thread, which runs only LSan's scan of
# the stopped threads' stacks and TLS: "Tracer caught signal 11", then
# "LeakSanitizer has encountered a fatal error". LSan keeps the context
# (stack and TLS ranges) of every thread that ended without being detached
# in its registry, and looks the stopped threads up by kernel thread id:
# once the kernel hands an id out again, the lookup can find the old
# thread's context and scan its stack, unmapped by then (see pid_max_note).
# A crash anywhere else in LSan is not one.
LSAN_FAULT = "LSan runtime fault"


def failure(text: str, rc: int) -> str:
    """What went wrong, from libFuzzer's output ('' if nothing)."""
    if re.search(r"Tracer caught signal 11: ", text) and re.search(
        r"LeakSanitizer has encountered a fatal error", text
    ):
        return LSAN_FAULT
    for pattern, what in [
        (r"ERROR: LeakSanitizer: detected memory leaks", "leak"),
        (r"ERROR: libFuzzer: timeout", "timeout"),
        (r"ERROR: libFuzzer: out-of-memory", "out-of-memory"),
        (r"ERROR: libFuzzer: deadly signal", "crash"),
        (r"ERROR: libFuzzer: fuzz target exited", "exit"),
        (r"==\d+==ERROR", "crash"),
    ]:
        if re.search(pattern, text):
            return what
    return f"exit code {rc}" if rc != 0 else ""


def run_target(target: str, runs: int | None, seconds: int | None, workers: int) -> list[dict]:
    """Fuzzes `target` in `workers` processes at once; the figures of each.

    Independent processes rather than libFuzzer's fork mode (-fork=N): with
    `vhost_user` on two cores, two processes ran 2.3 times as many inputs a
    second as -fork=2, whose short-lived children start over (the export,
    their seeds) every few seconds.
    """
    seeds = FUZZ / "corpus" / target
    work = FUZZ / "target" / "corpus" / target
    artifacts = FUZZ / "artifacts" / target
    work.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN_DIR / target),
        *COMMON_FLAGS,
        f"-max_len={MAX_LEN[target]}",
        f"-artifact_prefix={artifacts}/",
    ]
    dictionary = FUZZ / "dict" / f"{target}.dict"
    if dictionary.exists():
        cmd.append(f"-dict={dictionary}")
    if runs is not None:
        cmd.append(f"-runs={-(-runs // workers)}")
    if seconds is not None:
        cmd.append(f"-max_total_time={seconds}")
    cmd += [str(work), str(seeds)]
    print(f"fuzz: {' '.join(cmd)}" + (f" (x{workers})" if workers > 1 else ""), flush=True)
    names = [target] if workers == 1 else [f"{target}.{i}" for i in range(1, workers + 1)]
    start = time.monotonic()
    running = {}
    for name in names:
        log = FUZZ / "target" / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=fuzz_env()
            )
        running[proc.pid] = (name, log)
    results = []
    while running:
        # wait4 gives the peak RSS of the process (and of any it forked).
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        name, log = running.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        text = log.read_text(errors="replace")
        figures = parse_output(text)
        figures.setdefault("peak_rss_mb", usage.ru_maxrss // 1024)
        if "number_of_executed_units" in figures:
            figures.setdefault(
                "average_exec_per_sec", int(figures["number_of_executed_units"] / wall)
            )
        problem = failure(text, rc)
        if problem:
            tail = "\n".join(text.splitlines()[-60:])
            print(f"fuzz: {name} FAILED ({problem}); end of {log}:\n{tail}", flush=True)
        result = {"target": name, "log": log, "wall": wall, "result": problem or "ok"}
        results.append({**result, **figures})
    return sorted(results, key=lambda r: r["target"])


def merge(targets: list[str]) -> None:
    """Minimise each committed corpus with everything found so far."""
    for target in targets:
        seeds = FUZZ / "corpus" / target
        work = FUZZ / "target" / "corpus" / target
        fresh = FUZZ / "target" / "merged" / target
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(parents=True)
        cmd = [
            str(BIN_DIR / target),
            "-merge=1",
            *COMMON_FLAGS,
            f"-max_len={MAX_LEN[target]}",
            str(fresh),
            str(seeds),
        ]
        if work.exists():
            cmd.append(str(work))
        print(f"fuzz: {' '.join(cmd)}", flush=True)
        subprocess.run(
            cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=fuzz_env()
        )
        shutil.rmtree(seeds, ignore_errors=True)
        shutil.copytree(fresh, seeds)
        print(f"fuzz: {target}: {sum(1 for _ in seeds.iterdir())} inputs in {seeds}")


def table(results: list[dict]) -> None:
    cols = [
        ("target", "target", "{}"),
        ("executions", "number_of_executed_units", "{:,}"),
        ("exec/s", "average_exec_per_sec", "{:,}"),
        ("wall s", "wall", "{:.0f}"),
        ("corpus", "corp", "{}"),
        ("cov", "cov", "{}"),
        ("ft", "ft", "{}"),
        ("peak RSS MB", "peak_rss_mb", "{}"),
        ("result", "result", "{}"),
    ]
    rows = [[name for name, _, _ in cols]]
    for r in results:
        rows.append([fmt.format(r[key]) if key in r else "?" for _, key, fmt in cols])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    print()
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["short", "long", "merge", "build", "lint"])
    parser.add_argument("--target", action="append", choices=TARGETS, default=[])
    parser.add_argument("--runs", type=int, help="executions per target")
    parser.add_argument("--time", type=int, help="seconds per target")
    parser.add_argument("--workers", type=int, default=1, help="processes per target")
    parser.add_argument("--no-build", action="store_true", help="use the binaries built before")
    args = parser.parse_args()
    targets = args.target or TARGETS

    if args.mode == "lint":
        lint()
        return 0
    if not args.no_build:
        build(targets)
    if args.mode == "build":
        return 0
    if args.mode == "merge":
        merge(targets)
        return 0
    runs, seconds = {"short": (None, SHORT_SECONDS), "long": (10_000_000, None)}[args.mode]
    if args.runs is not None or args.time is not None:
        runs, seconds = args.runs, args.time
    note = pid_max_note()
    if note:
        print(note, flush=True)
    results = []
    for t in targets:
        result = run_target(t, runs, seconds, args.workers)
        faulted = [r for r in result if r["result"] == LSAN_FAULT]
        if faulted:
            # Not the daemon's fault: run the target once more (the first
            # logs are kept), and fail if anything goes wrong again.
            for r in faulted:
                r["log"].rename(r["log"].with_suffix(".lsan-fault.log"))
            print(f"fuzz: {t}: {LSAN_FAULT}, running it once more", flush=True)
            result = run_target(t, runs, seconds, args.workers)
            for r in result:
                r["result"] += " (rerun)"
        results += result
        if len(result) > 1:
            total = sum(r.get("number_of_executed_units", 0) for r in result)
            print(f"fuzz: {t}: {total:,} executions in {len(result)} processes", flush=True)
    table(results)
    failed = [r["target"] for r in results if r["result"] not in ("ok", "ok (rerun)")]
    if failed:
        print(f"fuzz: FAILED: {', '.join(failed)} (inputs in fuzz/artifacts/)")
        return 1
    print(f"fuzz: {len(targets)} target(s), no crash, no leak, no timeout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
