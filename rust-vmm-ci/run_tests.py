#!/usr/bin/env python3
"""Run the checks of test_description.json in order, from the repository root.

Each test is a shell command; it passes if it exits with 0 within its
timeout_in_minutes.  Any other exit code fails it, including pytest's 5 ("no
tests collected").  A test's output is printed as it comes; the end of a
failed test's output is printed again after the summary, so that whoever
reads only the end of the log sees why.  The last line printed is "N
passed, M failed"; the exit code is 1 if any test failed.
"""

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Lines of a failed test's output printed again after the summary.
TAIL_LINES = 60


def load_tests(path: Path = HERE / "test_description.json") -> list[dict]:
    """Return the test descriptions: dicts with test_name, command, timeout_in_minutes."""
    return json.loads(path.read_text())["tests"]


def select(tests: list[dict], only: list[str], skip: list[str]) -> list[dict]:
    """Keep the tests named in only (all if empty), minus those in skip."""
    names = {t["test_name"] for t in tests}
    unknown = sorted(set(only + skip) - names)
    if unknown:
        sys.exit(f"unknown test(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return [t for t in tests if (not only or t["test_name"] in only) and t["test_name"] not in skip]


def copy_output(pipe, tail: collections.deque) -> None:
    """Print the test's output line by line and keep its last lines."""
    out = sys.stdout.buffer
    for line in iter(pipe.readline, b""):
        out.write(line)
        out.flush()
        tail.append(line.decode(errors="replace").rstrip("\n"))


def run_test(test: dict) -> tuple[bool, str, list[str]]:
    """Run one test's command with its timeout; return (passed, detail, last lines)."""
    timeout = test.get("timeout_in_minutes", 15) * 60
    proc = subprocess.Popen(
        ["bash", "-c", test["command"]],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tail = collections.deque(maxlen=TAIL_LINES)
    copier = threading.Thread(target=copy_output, args=(proc.stdout, tail), daemon=True)
    copier.start()
    try:
        rc = proc.wait(timeout)
        detail = f"exit code {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, detail = None, f"timed out after {timeout:.0f}s"
    # A process the test left behind may hold the pipe open: wait a little
    # for the rest of the output, not for it.
    copier.join(10)
    return rc == 0, detail, list(tail)


def main() -> int:
    """Run the selected tests and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this test (repeatable)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="NAME",
        help="do not run this test (repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the tests and exit")
    args = parser.parse_args()

    tests = select(load_tests(), args.only, args.skip)
    if not tests:
        sys.exit("no tests selected")
    if args.list:
        for t in tests:
            print(f"{t['test_name']}: {t['command']}")
        return 0

    results = []
    for test in tests:
        name = test["test_name"]
        print(f"\n=== RUN  {name}: {test['command']}", flush=True)
        start = time.monotonic()
        passed, detail, tail = run_test(test)
        elapsed = time.monotonic() - start
        verdict = "PASS" if passed else "FAIL"
        print(f"=== {verdict} {name} ({elapsed:.1f}s, {detail})", flush=True)
        results.append((name, passed, elapsed, detail, tail))

    for name, passed, _, _, tail in results:
        if not passed:
            print(f"\n=== end of the output of {name}:")
            print("\n".join(tail))
    print("\nSummary:")
    for name, passed, elapsed, detail, _ in results:
        print(f"  {'PASS' if passed else 'FAIL'}  {name:<24} {elapsed:8.1f}s  {detail}")
    failed = sum(1 for r in results if not r[1])
    print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
