"""inuse.holders: who holds something under a directory, read from /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compatfs.inuse import holders


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "containerd"
    (top / "blobs").mkdir(parents=True)
    (top / "blobs" / "layer").write_bytes(b"x" * 8192)
    (tmp_path / "containerd2").mkdir()        # shares the prefix, is not inside
    return top


def start(code: str, cwd: Path) -> subprocess.Popen:
    """A Python child that runs *code*, prints 'ready', then sleeps."""
    proc = subprocess.Popen([sys.executable, "-c", code + "\nprint('ready', flush=True)\n"
                             "import time; time.sleep(60)"], cwd=cwd, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.mark.parametrize("how,code,what", [
    ("cwd", "import os; os.chdir('{top}/blobs')", "cwd"),
    ("fd", "f = open('{top}/blobs/layer', 'rb')", "fd "),
    # Python's mmap keeps a duplicate fd; libc's mmap and a close leave the mapping alone
    ("mapped", "import ctypes, os; libc = ctypes.CDLL(None); "
               "libc.mmap.restype = ctypes.c_void_p; libc.mmap.argtypes = [ctypes.c_void_p, "
               "ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]; "
               "fd = os.open('{top}/blobs/layer', os.O_RDONLY); "
               "assert libc.mmap(None, 8192, 1, 1, fd, 0) not in (None, 2**64 - 1); "
               "os.close(fd)", "mapped"),
])
def test_each_way_of_holding_is_seen(tree: Path, how: str, code: str, what: str) -> None:
    proc = start(code.format(top=tree), tree.parent)
    try:
        found = holders(str(tree))
        assert [h.pid for h in found] == [proc.pid], found
        assert found[0].what.startswith(what)
        assert found[0].command.startswith("python")
        assert str(proc.pid) in str(found[0])
    finally:
        stop(proc)
    assert holders(str(tree)) == []


def test_a_sibling_with_the_same_prefix_and_this_process_do_not_count(tree: Path) -> None:
    proc = start("import os; os.chdir('containerd2')", tree.parent)
    fd = os.open(tree / "blobs" / "layer", os.O_RDONLY)      # held by the caller itself
    try:
        assert holders(str(tree)) == []
        assert [h.pid for h in holders(str(tree), ignore=-1)] == [os.getpid()]
    finally:
        os.close(fd)
        stop(proc)


def test_limit_caps_the_answer(tree: Path) -> None:
    procs = [start(f"import os; os.chdir('{tree}')", tree.parent) for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while len(holders(str(tree))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(holders(str(tree))) == 3
        assert len(holders(str(tree), limit=2)) == 2
    finally:
        for p in procs:
            stop(p)
