#!/usr/bin/env python3
"""Check the format of every non-merge commit message reachable from HEAD.

A message needs a title of at most 60 characters, a blank second line, a body
and a line starting with "Signed-off-by: ".  Give a git revision range (for
example origin/main..HEAD) to check fewer commits; the default is HEAD, the
whole history, since a fresh clone has no base branch to compare with.
"""

import subprocess
import sys

TITLE_MAX = 60
SIGN_OFF = "Signed-off-by: "


def problems(message: str) -> list[str]:
    """Return what is wrong with one commit message (empty if nothing)."""
    lines = message.rstrip("\n").split("\n")
    found = []
    if len(lines[0]) > TITLE_MAX:
        found.append(f"title longer than {TITLE_MAX} characters ({len(lines[0])})")
    if len(lines) < 3:
        found.append("no body: expected title, blank line, body with a sign-off")
    elif lines[1].strip():
        found.append("second line is not blank")
    if not any(line.startswith(SIGN_OFF) for line in lines[1:]):
        found.append(f"no '{SIGN_OFF}' line")
    return found


def commits(revisions: list[str]) -> list[tuple[str, str]]:
    """Return (hash, message) of the non-merge commits in the revision range."""
    out = subprocess.run(
        ["git", "log", "-z", "--no-merges", "--format=%H%n%B", *revisions],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    entries = (entry.lstrip("\n").partition("\n") for entry in out.split("\0"))
    return [(sha, message) for sha, _, message in entries if sha]


def main() -> int:
    """Check the commits and report each bad one."""
    revisions = sys.argv[1:] or ["HEAD"]
    try:
        checked = commits(revisions)
    except subprocess.CalledProcessError as err:
        print(f"commit-format: git log {' '.join(revisions)} failed: {err.stderr.strip()}")
        return 1
    if not checked:
        print(f"commit-format: no commits in {' '.join(revisions)}")
        return 1
    bad = 0
    for sha, message in checked:
        title = message.partition("\n")[0]
        for problem in problems(message):
            bad += 1
            print(f"{sha[:12]} {title!r}: {problem}")
    print(f"commit-format: {len(checked)} commit(s) checked, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
