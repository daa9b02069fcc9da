"""What the benchmark scripts share: timestamped progress lines, running a
command, emptying the kernel's caches for a cold run, naming the commit measured."""

from __future__ import annotations

import os
import subprocess
import sys
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run *argv*, output captured; with *check*, a failure raises with its message."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (root only), for a cold run."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def commit() -> str:
    """The commit measured, ``-dirty`` when the working tree differs from it."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = run(["git", "-C", repo, "describe", "--always", "--dirty"], check=False).stdout.strip()
    return out or "?"
