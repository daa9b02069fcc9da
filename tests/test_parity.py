"""Parity: every syscall sequence gives the same results and errnos through
the mounted view as on a plain directory of the same filesystem.

One daemon (stage observe, over a plain temporary tree) serves the whole
module. Each test runs a *scenario* -- a function of one directory that
records ``("ok", normalized result)`` or ``("err", errno name)`` per step --
once in ``<root>/img/<test>`` through the view and once in ``plain/<test>``,
and compares the two records exactly. Results never contain paths, inode
numbers, devices or clock-dependent times, only what must agree.

Steps that another user performs run in a child process that drops to
uid/gid 1000 (``os.setuid`` in ``preexec_fn``) so that the kernel's
``default_permissions`` checks are exercised for real.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from compatfs import mounts

from .mounting import mounted

pytestmark = pytest.mark.root

OTHER_UID = 1000
OTHER_GID = 1000
#: A system interpreter the other uid can run (the venv's lives under /root, 0700).
CHILD_PYTHON = "/usr/bin/python3"

Outcome = tuple[str, Any]


# -- the recording helpers ------------------------------------------------------------

def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Outcome:
    """``("ok", result)`` or ``("err", errno name)``: the only two shapes compared."""
    try:
        return ("ok", fn(*args, **kw))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


class Rec:
    """Collects labelled outcomes of the steps of one scenario run."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Outcome]] = []

    def __call__(self, label: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Outcome:
        out = call(fn, *args, **kw)
        self.steps.append((label, out))
        return out

    def note(self, label: str, value: Any) -> None:
        self.steps.append((label, ("ok", value)))


def norm_stat(st: os.stat_result, *, times: bool = False, blocks: bool = True) -> dict:
    out = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
           "size": st.st_size, "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid}
    if blocks:
        out["blocks"] = st.st_blocks
    if times:
        out["atime_ns"] = st.st_atime_ns
        out["mtime_ns"] = st.st_mtime_ns
    return out


def lst(path: Path | str, **kw: Any) -> dict:
    return norm_stat(os.lstat(path), **kw)


def fst(fd: int, **kw: Any) -> dict:
    return norm_stat(os.fstat(fd), **kw)


def read_all(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def closing(fd: int, fn: Callable[[int], Any]) -> Any:
    try:
        return fn(fd)
    finally:
        os.close(fd)


_CHILD = r"""
import errno, json, os, sys
op, args = sys.argv[1], json.loads(sys.argv[2])
def run():
    if op == "open":                       # path, flags, mode -> fstat summary
        fd = os.open(args[0], args[1], args[2])
        try:
            if args[1] & os.O_ACCMODE != os.O_RDONLY:
                os.write(fd, b"from the other user\n")
            st = os.fstat(fd)
            return [st.st_uid, st.st_gid, oct(st.st_mode)]
        finally:
            os.close(fd)
    if op == "mkdir":
        os.mkdir(args[0], args[1])
        st = os.stat(args[0])
        return [st.st_uid, st.st_gid, oct(st.st_mode)]
    if op == "chmod":
        os.chmod(args[0], args[1]); return None
    if op == "chown":
        os.chown(args[0], args[1], args[2]); return None
    if op == "unlink":
        os.unlink(args[0]); return None
    if op == "rename":
        os.rename(args[0], args[1]); return None
    if op == "truncate":
        os.truncate(args[0], args[1]); return None
    if op == "utime_now":
        os.utime(args[0]); return None
    if op == "utime":
        os.utime(args[0], ns=(args[1], args[2])); return None
    if op == "setxattr":
        os.setxattr(args[0], args[1], args[2].encode()); return None
    if op == "listdir":
        return sorted(os.listdir(args[0]))
    raise SystemExit("unknown op " + op)
try:
    out = ["ok", run()]
except OSError as exc:
    out = ["err", errno.errorcode.get(exc.errno, exc.errno)]
print(json.dumps(out))
"""


def as_other(op: str, *args: Any, uid: int = OTHER_UID, gid: int = OTHER_GID) -> Outcome:
    """Run one operation in a child process running as *uid*/*gid*, no extra groups."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    proc = subprocess.run([CHILD_PYTHON, "-I", "-S", "-c", _CHILD, op, json.dumps(args)],
                          preexec_fn=drop, capture_output=True, text=True, cwd="/", timeout=30)
    assert proc.returncode == 0, proc.stderr
    kind, value = json.loads(proc.stdout)
    return (kind, value)


# -- the mount and the paired directories -------------------------------------------------

class Env:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "persist"
        self.view = self.root / "img"
        self.plain = base / "plain"
        self.mount: Any = None


@pytest.fixture(scope="module")
def env():
    # Not under pytest's tmp dir: that is 0700, and the other uid must reach the files.
    base = Path(tempfile.mkdtemp(prefix="compatfs-parity-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        e = Env(base)
        e.root.mkdir()
        e.view.mkdir()
        e.plain.mkdir()
        with mounted(e.root, base / "run") as m:
            e.mount = m
            yield e
            log = m.log_text()
            assert "unexpected error" not in log and "Traceback" not in log, log
        assert mounts.mounted_at(str(e.view)) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pair(env, request):
    """(directory in the view, plain directory), both fresh and 0755, for this test."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    dirs = (env.view / name, env.plain / name)
    for d in dirs:
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
    return dirs


def parity(pair: tuple[Path, Path], scenario: Callable[[Path, Rec], None]) -> list:
    """Run *scenario* in both directories; their records must be identical."""
    records = []
    for d in pair:
        r = Rec()
        scenario(d, r)
        records.append(r.steps)
    view, plain = records
    if view != plain:
        diff = [f"  {lv}: view={ov!r}\n  {' ' * len(lv)}  plain={op!r}"
                for (lv, ov), (_, op) in zip(view, plain, strict=False) if ov != op]
        pytest.fail("view and plain directory disagree:\n" + "\n".join(diff)
                    + (f"\n  (step counts {len(view)} vs {len(plain)})"
                       if len(view) != len(plain) else ""))
    return view


def need_other_user() -> None:
    if not os.path.exists(CHILD_PYTHON):
        pytest.skip(f"{CHILD_PYTHON} is needed to run steps as uid {OTHER_UID}")


# -- opening --------------------------------------------------------------------------------

def test_open_flags_and_errors(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"hello world")
        r("excl on existing", os.open, d / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        r("open missing", os.open, d / "missing", os.O_RDONLY)
        r("open below missing dir", os.open, d / "nodir" / "x", os.O_RDONLY)
        r("open below a file", os.open, d / "f" / "x", os.O_RDONLY)
        r("O_DIRECTORY on a file", os.open, d / "f", os.O_RDONLY | os.O_DIRECTORY)
        r("dir for writing", os.open, d, os.O_WRONLY)
        r("excl new", lambda: closing(os.open(d / "n", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640),
                                      fst))
        r("creat on existing keeps data", lambda: closing(
            os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o600), lambda fd: os.pread(fd, 100, 0)))
        r("O_TRUNC", lambda: closing(os.open(d / "f", os.O_WRONLY | os.O_TRUNC), fst))
        r("size after O_TRUNC", lambda: lst(d / "f"))
        write_file(d / "g", b"some bytes")
        r("O_RDONLY|O_TRUNC truncates on Linux", lambda: closing(
            os.open(d / "g", os.O_RDONLY | os.O_TRUNC),
            lambda fd: (fst(fd)["size"], os.read(fd, 4))))
        r("O_CREAT|O_TRUNC on existing", lambda: closing(
            os.open(d / "g", os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600), fst))
        r("name too long", os.open, d / ("n" * 256), os.O_CREAT | os.O_WRONLY, 0o644)
        r("O_CREAT|O_EXCL on a dangling symlink", lambda: (
            os.symlink("nowhere", d / "dangling"),
            os.open(d / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)))
        r("O_NOFOLLOW on a symlink", os.open, d / "dangling", os.O_RDONLY | os.O_NOFOLLOW)

    parity(pair, scenario)


def test_wrong_access_mode_is_ebadf(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"data")
        fd = os.open(d / "f", os.O_RDONLY)
        r("write on O_RDONLY", os.write, fd, b"x")
        r("pwrite on O_RDONLY", os.pwrite, fd, b"x", 0)
        r("ftruncate on O_RDONLY", os.ftruncate, fd, 0)
        r("read still fine", os.pread, fd, 10, 0)
        os.close(fd)
        fd = os.open(d / "f", os.O_WRONLY)
        r("read on O_WRONLY", os.read, fd, 10)
        r("pread on O_WRONLY", os.pread, fd, 10, 0)
        os.close(fd)
        r("content unchanged", read_all, d / "f")

    parity(pair, scenario)


# -- bytes --------------------------------------------------------------------------------

def test_read_write_at_offsets(pair):
    def scenario(d: Path, r: Rec) -> None:
        fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
        r("write", os.write, fd, b"0123456789")
        r("pos after write", os.lseek, fd, 0, os.SEEK_CUR)
        r("pwrite inside", os.pwrite, fd, b"abc", 3)
        r("pwrite beyond end", os.pwrite, fd, b"END", 4096 * 3 + 1)
        r("pos unchanged by pwrite", os.lseek, fd, 0, os.SEEK_CUR)
        r("pread start", os.pread, fd, 12, 0)
        r("pread across page boundary", os.pread, fd, 8, 4096 - 4)
        r("pread at end", os.pread, fd, 10, 4096 * 3 - 1)
        r("pread past EOF", os.pread, fd, 10, 1 << 20)
        r("seek end", os.lseek, fd, 0, os.SEEK_END)
        r("read at EOF", os.read, fd, 10)
        r("seek data", os.lseek, fd, 5, os.SEEK_SET)
        r("read sequential", os.read, fd, 7)
        r("write sequential", os.write, fd, b"XY")
        big = bytes(range(256)) * 2048  # 512 KiB, more than one FUSE write
        r("big pwrite unaligned", os.pwrite, fd, big, 12345)
        r("big pread", lambda: os.pread(fd, len(big) + 10, 12345) == big)
        r("fstat", fst, fd)
        os.close(fd)
        r("whole file", lambda: read_all(d / "f")[:64])
        r("whole size", lambda: len(read_all(d / "f")))
        r("negative offset", lambda: os.pread(os.open(d / "f", os.O_RDONLY), 1, -1))

    parity(pair, scenario)


def test_o_append_writes(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"start\n")
        a = os.open(d / "f", os.O_WRONLY | os.O_APPEND)
        rw = os.open(d / "f", os.O_RDWR)
        r("append 1", os.write, a, b"one\n")
        r("pos after append", os.lseek, a, 0, os.SEEK_CUR)
        r("other handle overwrites", os.pwrite, rw, b"START", 0)
        r("other handle extends", os.pwrite, rw, b"tail\n", 64)
        r("append lands at the new end", os.write, a, b"two\n")
        r("pwrite on O_APPEND appends (Linux)", os.pwrite, a, b"three\n", 0)
        r("seek then append", lambda: (os.lseek(a, 0, os.SEEK_SET), os.write(a, b"four\n")))
        r("ftruncate shrink", os.ftruncate, rw, 8)
        r("append after shrink", os.write, a, b"five\n")
        os.close(a)
        os.close(rw)
        r("content", read_all, d / "f")
        fd = os.open(d / "f", os.O_RDWR | os.O_APPEND)
        r("O_RDWR|O_APPEND read from start", os.read, fd, 5)
        r("O_RDWR|O_APPEND write", os.write, fd, b"six\n")
        os.close(fd)
        r("final", read_all, d / "f")

    parity(pair, scenario)


def test_ftruncate_grow_and_shrink(pair):
    def scenario(d: Path, r: Rec) -> None:
        fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"x" * 10000)
        r("grow", os.ftruncate, fd, 3 * 4096 * 1024 + 17)
        r("stat grown (blocks stay)", fst, fd)
        r("grown tail is zeros", lambda: os.pread(fd, 20, 9990))
        r("shrink mid page", os.ftruncate, fd, 5000)
        r("stat shrunk", fst, fd)
        r("read past the shrink", os.pread, fd, 10, 5000)
        r("read up to it", lambda: os.pread(fd, 10, 4995))
        r("regrow: old bytes gone", lambda: (os.ftruncate(fd, 10000), os.pread(fd, 10, 5000))[1])
        r("to zero", lambda: (os.ftruncate(fd, 0), fst(fd))[1])
        r("negative", os.ftruncate, fd, -1)
        os.close(fd)
        r("truncate by path", os.truncate, d / "f", 4096)
        r("stat", lst, d / "f")
        r("truncate a directory", os.truncate, d, 0)
        r("truncate missing", os.truncate, d / "missing", 0)

    parity(pair, scenario)


# -- attributes ---------------------------------------------------------------------------

def test_stat_fields(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"a" * 5000, 0o640)
        r("file", lst, d / "f")
        (d / "sub").mkdir(0o751)
        os.chmod(d / "sub", 0o751)
        (d / "sub" / "inner").mkdir()
        r("dir (nlink counts subdirs)", lst, d / "sub")
        r("utime ns", os.utime, d / "f", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
        r("times after utime", lambda: lst(d / "f", times=True))
        r("fstat agrees", lambda: closing(os.open(d / "f", os.O_RDONLY),
                                          lambda fd: fst(fd, times=True)))
        r("pre-epoch utime", os.utime, d / "f", ns=(-1_000_000_001, -5))
        r("pre-epoch times", lambda: lst(d / "f", times=True))
        # a sparse file: 1 MiB of data at 1 GiB, apparent size 2 GiB
        fd = os.open(d / "sparse", os.O_CREAT | os.O_RDWR, 0o600)
        os.ftruncate(fd, 2 << 30)
        os.pwrite(fd, b"\xab" * (1 << 20), 1 << 30)
        os.fsync(fd)
        os.close(fd)
        r("sparse: size and st_blocks exactly", lst, d / "sparse")
        r("sparse hole reads zeros", lambda: closing(os.open(d / "sparse", os.O_RDONLY),
                                                     lambda fd: os.pread(fd, 8, 12345)))
        r("missing", os.lstat, d / "missing")
        r("below a file", os.lstat, d / "f" / "x")
        os.utime(d / "sub", ns=(1, 1))
        write_file(d / "sub" / "new", b"")
        r.note("dir mtime moves on create", os.lstat(d / "sub").st_mtime_ns != 1)
        os.utime(d / "sub", ns=(1, 1))
        os.unlink(d / "sub" / "new")
        r.note("dir mtime moves on unlink", os.lstat(d / "sub").st_mtime_ns != 1)
        os.utime(d / "f", ns=(1, 1))
        write_file(d / "f", b"rewritten")
        r.note("file mtime moves on write", os.lstat(d / "f").st_mtime_ns != 1)

    parity(pair, scenario)


def test_chmod_and_chown(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"data", 0o644)
        for mode in (0o600, 0o000, 0o4755, 0o2755, 0o1777, 0o7777, 0o644):
            r(f"chmod {oct(mode)}", os.chmod, d / "f", mode)
            r(f"mode {oct(mode)}", lst, d / "f")
        r("chown uid", os.chown, d / "f", OTHER_UID, -1)
        r("after chown uid", lst, d / "f")
        r("chown gid", os.chown, d / "f", -1, 4321)
        r("after chown gid", lst, d / "f")
        r("chmod suid, then chown clears it", lambda: (
            os.chmod(d / "f", 0o6755), os.chown(d / "f", 0, 0), lst(d / "f"))[2])
        r("fchmod", lambda: closing(os.open(d / "f", os.O_RDONLY),
                                    lambda fd: (os.fchmod(fd, 0o604), fst(fd))[1]))
        r("fchown", lambda: closing(os.open(d / "f", os.O_RDONLY),
                                    lambda fd: (os.fchown(fd, 7, 8), fst(fd))[1]))
        (d / "dir").mkdir()
        r("chmod dir", lambda: (os.chmod(d / "dir", 0o2750), lst(d / "dir"))[1])
        r("chown dir keeps setgid", lambda: (os.chown(d / "dir", 5, 6), lst(d / "dir"))[1])
        os.symlink("f", d / "link")
        r("lchown symlink", lambda: (os.chown(d / "link", 9, 9, follow_symlinks=False),
                                     lst(d / "link"), lst(d / "f"))[1:])
        r("chmod missing", os.chmod, d / "missing", 0o600)

    parity(pair, scenario)


def test_default_permissions_for_another_uid(pair):
    need_other_user()

    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "root600", b"secret\n", 0o600)
        os.chmod(d / "root600", 0o600)
        r("other uid writes a root 0600 file", as_other, "open", str(d / "root600"), os.O_WRONLY, 0)
        r("other uid reads a root 0600 file", as_other, "open", str(d / "root600"), os.O_RDONLY, 0)
        r("other uid truncates it", as_other, "truncate", str(d / "root600"), 0)
        r("other uid chmods it", as_other, "chmod", str(d / "root600"), 0o666)
        r("other uid chowns it to itself", as_other, "chown", str(d / "root600"), OTHER_UID, -1)
        r("other uid sets times on it", as_other, "utime", str(d / "root600"), 1, 2)
        r("other uid sets times to now on it", as_other, "utime_now", str(d / "root600"))
        r("other uid sets a user xattr on it", as_other, "setxattr", str(d / "root600"),
          "user.x", "1")
        r("other uid unlinks in a root 0755 dir", as_other, "unlink", str(d / "root600"))
        r("other uid creates in a root 0755 dir", as_other, "open", str(d / "new"),
          os.O_CREAT | os.O_WRONLY, 0o644)
        r("root file untouched", lambda: (read_all(d / "root600"), lst(d / "root600")))

        write_file(d / "mine", b"", 0o600)
        os.chmod(d / "mine", 0o600)
        r("chown to the other uid", os.chown, d / "mine", OTHER_UID, OTHER_GID)
        r("other uid writes its 0600 file", as_other, "open", str(d / "mine"), os.O_WRONLY, 0)
        r("other uid chmods its file", as_other, "chmod", str(d / "mine"), 0o640)
        r("other uid chowns its file to root", as_other, "chown", str(d / "mine"), 0, -1)
        r("other uid sets times on its file", as_other, "utime", str(d / "mine"), 1, 2)
        r("its file", lambda: (lst(d / "mine", times=True), read_all(d / "mine")))

        (d / "private").mkdir(0o700)
        os.chmod(d / "private", 0o700)
        write_file(d / "private" / "f", b"", 0o666)
        r("other uid lists a 0700 dir", as_other, "listdir", str(d / "private"))
        r("other uid opens through it", as_other, "open", str(d / "private" / "f"), os.O_RDONLY, 0)

        (d / "shared").mkdir()
        os.chmod(d / "shared", 0o1777)
        write_file(d / "shared" / "rootfile", b"", 0o666)
        os.chmod(d / "shared" / "rootfile", 0o666)
        r("other uid creates in a 1777 dir", as_other, "open", str(d / "shared" / "o"),
          os.O_CREAT | os.O_WRONLY, 0o640)
        r("other uid mkdir in a 1777 dir", as_other, "mkdir", str(d / "shared" / "od"), 0o750)
        r("sticky: other uid unlinks root's file", as_other, "unlink",
          str(d / "shared" / "rootfile"))
        r("sticky: other uid renames root's file", as_other, "rename",
          str(d / "shared" / "rootfile"), str(d / "shared" / "x"))
        r("other uid writes root's 0666 file", as_other, "open", str(d / "shared" / "rootfile"),
          os.O_WRONLY, 0)
        r("other uid touches root's 0666 file (write access suffices)", as_other, "utime_now",
          str(d / "shared" / "rootfile"))
        r("other uid sets explicit times on it (owner only)", as_other, "utime",
          str(d / "shared" / "rootfile"), 1, 2)
        r("other uid truncates root's 0666 file", as_other, "truncate",
          str(d / "shared" / "rootfile"), 3)
        write_file(d / "shared" / "suid", b"", 0o644)
        os.chmod(d / "shared" / "suid", 0o4777)
        r("other uid writes a setuid file", as_other, "open", str(d / "shared" / "suid"),
          os.O_WRONLY, 0)
        r("setuid bit after another uid's write", lambda: lst(d / "shared" / "suid"))
        r("listing", lambda: sorted(os.listdir(d / "shared")))

    parity(pair, scenario)


def test_setgid_directory_group_inheritance_for_another_uid(pair):
    need_other_user()

    def scenario(d: Path, r: Rec) -> None:
        (d / "sg").mkdir()
        os.chown(d / "sg", 0, 5000)
        os.chmod(d / "sg", 0o2777)
        r("file created by another uid", as_other, "open", str(d / "sg" / "f"),
          os.O_CREAT | os.O_WRONLY, 0o644)
        r("dir created by another uid", as_other, "mkdir", str(d / "sg" / "d"), 0o755)

    parity(pair, scenario)


def test_umask_of_the_caller_alone_decides_new_modes(pair):
    def scenario(d: Path, r: Rec) -> None:
        old = os.umask(0)
        try:
            r("create 0666",
              lambda: closing(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666), fst))
            r("mkdir 0777", lambda: (os.mkdir(d / "d", 0o777), lst(d / "d"))[1])
            r("mkfifo 0666", lambda: (os.mkfifo(d / "p", 0o666), lst(d / "p"))[1])
        finally:
            os.umask(old)

    parity(pair, scenario)


def test_umask_022_create_modes(pair):
    def scenario(d: Path, r: Rec) -> None:
        old = os.umask(0o027)
        try:
            r("create 0666",
              lambda: closing(os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o666), fst))
            r("create 0700",
              lambda: closing(os.open(d / "g", os.O_CREAT | os.O_WRONLY, 0o700), fst))
            r("mkdir 0777", lambda: (os.mkdir(d / "d", 0o777), lst(d / "d"))[1])
            r("mkfifo", lambda: (os.mkfifo(d / "p", 0o640), lst(d / "p"))[1])
        finally:
            os.umask(old)

    parity(pair, scenario)


def test_utime(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"x")
        r("set both", os.utime, d / "f", ns=(123_456_789_012_345_678, 987_654_321_987_654_321))
        r("read back", lambda: lst(d / "f", times=True))
        r("seconds API",
          lambda: (os.utime(d / "f", (1000.5, 2000.25)), lst(d / "f", times=True))[1])
        r("futimens", lambda: closing(os.open(d / "f", os.O_WRONLY),
                                      lambda fd: (os.utime(fd, ns=(5, 6)), fst(fd, times=True))[1]))
        before = time.time_ns()
        os.utime(d / "f")
        st = os.lstat(d / "f")
        r.note("now: within the call",
               before - 10_000_000 <= st.st_mtime_ns <= time.time_ns() + 10_000_000)
        r.note("now: atime == mtime", st.st_atime_ns == st.st_mtime_ns)
        (d / "dir").mkdir()
        r("dir", lambda: (os.utime(d / "dir", ns=(7, 8)), lst(d / "dir", times=True))[1])
        os.symlink("f", d / "link")
        os.utime(d / "f", ns=(3, 4))
        r("symlink itself", lambda: (os.utime(d / "link", ns=(9, 10), follow_symlinks=False),
                                     lst(d / "link", times=True)["mtime_ns"],
                                     lst(d / "f", times=True)["mtime_ns"])[1:])
        r("missing", os.utime, d / "missing", ns=(1, 1))

    parity(pair, scenario)


# -- namespace ----------------------------------------------------------------------------

def test_mkdir_rmdir_unlink_errors(pair):
    def scenario(d: Path, r: Rec) -> None:
        r("mkdir", os.mkdir, d / "a", 0o755)
        r("mkdir existing", os.mkdir, d / "a")
        write_file(d / "a" / "f", b"x")
        r("mkdir over a file", os.mkdir, d / "a" / "f")
        r("mkdir below missing", os.mkdir, d / "nope" / "x")
        r("mkdir below a file", os.mkdir, d / "a" / "f" / "x")
        r("rmdir non-empty", os.rmdir, d / "a")
        r("rmdir a file", os.rmdir, d / "a" / "f")
        r("unlink a dir", os.unlink, d / "a")
        r("rmdir missing", os.rmdir, d / "missing")
        r("unlink missing", os.unlink, d / "missing")
        r("rmdir dot", os.rmdir, d / "a" / ".")
        r("unlink file", os.unlink, d / "a" / "f")
        r("rmdir now empty", os.rmdir, d / "a")
        r("gone", os.lstat, d / "a")
        r("mkdir name too long", os.mkdir, d / ("d" * 256))
        r("listing", lambda: sorted(os.listdir(d)))

    parity(pair, scenario)


def test_rename_cases(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "a", b"AAA")
        write_file(d / "b", b"BB")
        fd_b = os.open(d / "b", os.O_RDONLY)
        r("file over existing file", os.rename, d / "a", d / "b")
        r("source gone", os.lstat, d / "a")
        r("target has the source bytes", read_all, d / "b")
        r("replaced file still readable through its fd", lambda: (os.pread(fd_b, 10, 0), fst(fd_b)))
        os.close(fd_b)
        os.makedirs(d / "full" / "x")
        (d / "empty").mkdir()
        (d / "src").mkdir()
        write_file(d / "src" / "inside", b"in")
        r("dir over non-empty dir", os.rename, d / "src", d / "full")
        r("dir over empty dir", os.rename, d / "src", d / "empty")
        r("moved content", read_all, d / "empty" / "inside")
        r("file over dir", os.rename, d / "b", d / "full")
        r("dir over file", os.rename, d / "empty", d / "b")
        r("dir into its own subdir", os.rename, d / "full", d / "full" / "x" / "y")
        r("missing source", os.rename, d / "missing", d / "z")
        r("into a missing dir", os.rename, d / "b", d / "nodir" / "b")
        r("onto itself", os.rename, d / "b", d / "b")
        r("into a subdir", os.rename, d / "b", d / "full" / "x" / "b")
        r("back out", os.rename, d / "full" / "x" / "b", d / "b2")
        os.link(d / "b2", d / "b3")
        r("rename onto a hard link of itself is a no-op", os.rename, d / "b2", d / "b3")
        r("both names stay", lambda: sorted(os.listdir(d)))
        os.symlink("b2", d / "sl")
        r("rename a symlink", lambda: (os.rename(d / "sl", d / "sl2"), os.readlink(d / "sl2"))[1])
        r("listing", lambda: sorted(os.listdir(d)))
        r("subdir listing", lambda: sorted(os.listdir(d / "full" / "x")))

    parity(pair, scenario)


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def renameat2(old: Path, new: Path, flags: int) -> None:
    if not hasattr(_libc, "renameat2"):
        pytest.skip("libc has no renameat2")
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def test_rename_noreplace(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "a", b"A")
        write_file(d / "b", b"B")
        (d / "dir").mkdir()
        r("noreplace over a file", renameat2, d / "a", d / "b", RENAME_NOREPLACE)
        r("noreplace over a dir", renameat2, d / "a", d / "dir", RENAME_NOREPLACE)
        r("both intact", lambda: (read_all(d / "a"), read_all(d / "b")))
        r("noreplace to a free name", renameat2, d / "a", d / "c", RENAME_NOREPLACE)
        r("noreplace a dir to a free name", renameat2, d / "dir", d / "dir2", RENAME_NOREPLACE)
        r("missing source", renameat2, d / "missing", d / "x", RENAME_NOREPLACE)
        r("unknown flag", renameat2, d / "b", d / "y", 0x80)
        r("noreplace|exchange", renameat2, d / "b", d / "c", RENAME_NOREPLACE | RENAME_EXCHANGE)
        r("listing", lambda: sorted(os.listdir(d)))

    parity(pair, scenario)


def test_rename_exchange_is_refused_without_touching_either_file(pair):
    """A known, deliberate deviation (operations.rename answers EINVAL): the
    legacy agents never exchange. What matters is that nothing half-happens."""
    view, _ = pair
    write_file(view / "x", b"X")
    write_file(view / "y", b"YY")
    assert call(renameat2, view / "x", view / "y", RENAME_EXCHANGE) == ("err", "EINVAL")
    assert (read_all(view / "x"), read_all(view / "y")) == (b"X", b"YY")


def test_listdir_sorted(pair):
    names = [f"n{i:04d}" for i in range(400)] + ["ünïcödé", "with space", ".hidden", "-dash",
                                                  "x" * 255, "#1.qcow2"]

    def scenario(d: Path, r: Rec) -> None:
        r("empty", lambda: sorted(os.listdir(d)))
        for n in names:
            write_file(d / n, b"")
        (d / "subdir").mkdir()
        os.symlink("n0000", d / "link")
        r("full (more than one readdir buffer)", lambda: sorted(os.listdir(d)))
        r("scandir types", lambda: sorted((e.name, e.is_dir(follow_symlinks=False),
                                           e.is_symlink()) for e in os.scandir(d))[:5])
        for n in names[::3]:
            os.unlink(d / n)
        r("after removals", lambda: sorted(os.listdir(d)))
        r("listdir a file", os.listdir, d / "n0001")
        r("listdir missing", os.listdir, d / "missing")
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            r("listdir by fd", lambda: len(os.listdir(fd)))
        finally:
            os.close(fd)

    parity(pair, scenario)


def test_symlink_and_readlink(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "target", b"via link")
        r("relative", os.symlink, "target", d / "rel")
        r("dangling", os.symlink, "does/not/exist", d / "dangling")
        r("absolute", os.symlink, "/nonexistent/abs", d / "abs")
        r("long target", os.symlink, "t" * 4000, d / "long")
        r("over existing", os.symlink, "target", d / "rel")
        r("readlink rel", os.readlink, d / "rel")
        r("readlink dangling", os.readlink, d / "dangling")
        r("readlink long", lambda: len(os.readlink(d / "long")))
        r("readlink a file", os.readlink, d / "target")
        r("lstat", lst, d / "rel")
        r("stat follows", lambda: norm_stat(os.stat(d / "rel")))
        r("read through", read_all, d / "rel")
        r("stat dangling", os.stat, d / "dangling")
        r("O_NOFOLLOW", os.open, d / "rel", os.O_RDONLY | os.O_NOFOLLOW)
        r("O_PATH|O_NOFOLLOW", lambda: closing(os.open(d / "rel", os.O_PATH | os.O_NOFOLLOW),
                                               lambda fd: norm_stat(os.fstat(fd))["type"]))
        os.symlink("loop2", d / "loop1")
        os.symlink("loop1", d / "loop2")
        r("loop", os.stat, d / "loop1")
        (d / "sub").mkdir()
        os.symlink("../target", d / "sub" / "up")
        r("dotdot in target", read_all, d / "sub" / "up")
        r("write through link", lambda: (write_file(d / "rel", b"new"), read_all(d / "target"))[1])
        r("unlink link keeps target", lambda: (os.unlink(d / "rel"), read_all(d / "target"))[1])

    parity(pair, scenario)


def test_hard_links(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "a", b"one")
        r("link", os.link, d / "a", d / "b")
        r("nlink both", lambda: (lst(d / "a")["nlink"], lst(d / "b")["nlink"]))
        r("samefile", os.path.samefile, d / "a", d / "b")
        r("write via a, read via b", lambda: (write_file(d / "a", b"two!"), read_all(d / "b"))[1])
        r("append via b, size via a", lambda: (
            closing(os.open(d / "b", os.O_WRONLY | os.O_APPEND), lambda fd: os.write(fd, b"+")),
            lst(d / "a")["size"])[1])
        (d / "dir").mkdir()
        r("link a directory", os.link, d / "dir", d / "dir2")
        r("link missing", os.link, d / "missing", d / "m2")
        r("link into subdir", os.link, d / "a", d / "dir" / "c")
        r("nlink 3", lambda: lst(d / "dir" / "c")["nlink"])
        r("unlink b", os.unlink, d / "b")
        r("nlink 2", lambda: lst(d / "a")["nlink"])
        r("link onto existing", os.link, d / "a", d / "dir" / "c")
        r("listing", lambda: sorted(os.listdir(d)))

    parity(pair, scenario)


def test_hard_link_survives_unlink_of_the_original(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "a", b"payload")
        os.link(d / "a", d / "b")
        os.unlink(d / "a")
        r("stat b", lst, d / "b")
        r("read b", read_all, d / "b")
        r("write b", lambda: write_file(d / "b", b"rewritten"))
        r("rename b", lambda: (os.rename(d / "b", d / "c"), read_all(d / "c"))[1])

    parity(pair, scenario)


def test_hard_link_names_share_one_inode(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "a", b"one")
        os.link(d / "a", d / "b")
        r("excl create on b (forces a fresh lookup)", os.open, d / "b",
          os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        r("samefile", os.path.samefile, d / "a", d / "b")
        r("stat a caches", lst, d / "a")
        r("append via b", lambda: closing(os.open(d / "b", os.O_WRONLY | os.O_APPEND),
                                          lambda fd: os.write(fd, b"+more")))
        r("size via a", lambda: lst(d / "a")["size"])
        r("unlink b", os.unlink, d / "b")
        r("nlink via a", lambda: lst(d / "a")["nlink"])

    parity(pair, scenario)


def test_truncate_of_a_file_another_handle_has_open(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", bytes(range(256)) * 64)  # 16 KiB
        fd = os.open(d / "f", os.O_RDWR)
        r("read before", lambda: os.pread(fd, 8, 8192))
        r("truncate by path to 5000", os.truncate, d / "f", 5000)
        r("fd sees the shrink", fst, fd)
        r("fd reads up to the new end", lambda: os.pread(fd, 16, 4990))
        r("fd reads nothing past it", lambda: os.pread(fd, 16, 8192))
        r("open-truncate by another open", lambda: closing(
            os.open(d / "f", os.O_WRONLY | os.O_TRUNC), lambda _: None))
        r("fd sees zero", fst, fd)
        r("fd writes at its offset", os.pwrite, fd, b"abc", 100)
        r("truncate by path to grow", os.truncate, d / "f", 8192)
        r("fd reads zeros and its bytes", lambda: os.pread(fd, 8, 98))
        r("fd stat", fst, fd)
        os.close(fd)
        r("final", lambda: read_all(d / "f")[96:108])

    parity(pair, scenario)


def test_mknod_fifo(pair):
    def scenario(d: Path, r: Rec) -> None:
        r("mkfifo", os.mkfifo, d / "p", 0o640)
        r("stat", lst, d / "p")
        r("open nonblocking", lambda: closing(os.open(d / "p", os.O_RDONLY | os.O_NONBLOCK),
                                              lambda fd: os.read(fd, 10)))
        r("mkfifo existing", os.mkfifo, d / "p")
        r("unlink", os.unlink, d / "p")

    parity(pair, scenario)


# -- extended attributes --------------------------------------------------------------------

def test_user_xattrs(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"x")
        (d / "dir").mkdir()
        for target in ("f", "dir"):
            p = d / target
            r(f"{target}: empty list", lambda p=p: sorted(os.listxattr(p)))
            r(f"{target}: get missing", os.getxattr, p, "user.missing")
            r(f"{target}: set", os.setxattr, p, "user.a", b"alpha")
            r(f"{target}: set binary", os.setxattr, p, "user.bin", bytes(range(256)))
            r(f"{target}: set empty", os.setxattr, p, "user.empty", b"")
            r(f"{target}: get", os.getxattr, p, "user.a")
            r(f"{target}: get binary", os.getxattr, p, "user.bin")
            r(f"{target}: get empty", os.getxattr, p, "user.empty")
            r(f"{target}: list", lambda p=p: sorted(os.listxattr(p)))
            r(f"{target}: create existing", os.setxattr, p, "user.a", b"x", os.XATTR_CREATE)
            r(f"{target}: replace missing", os.setxattr, p, "user.b", b"x", os.XATTR_REPLACE)
            r(f"{target}: replace", os.setxattr, p, "user.a", b"beta", os.XATTR_REPLACE)
            r(f"{target}: create new", os.setxattr, p, "user.b", b"bee", os.XATTR_CREATE)
            r(f"{target}: get replaced", os.getxattr, p, "user.a")
            r(f"{target}: big value", lambda p=p: (os.setxattr(p, "user.big", b"v" * 3000),
                                                   len(os.getxattr(p, "user.big")))[1])
            r(f"{target}: remove", os.removexattr, p, "user.a")
            r(f"{target}: remove missing", os.removexattr, p, "user.a")
            r(f"{target}: list after", lambda p=p: sorted(os.listxattr(p)))
            r(f"{target}: name too long", os.setxattr, p, "user." + "n" * 300, b"x")
            r(f"{target}: unknown namespace", os.setxattr, p, "bogus.x", b"x")
        r("by fd", lambda: closing(os.open(d / "f", os.O_RDONLY), lambda fd: (
            os.setxattr(fd, "user.fd", b"1"), os.getxattr(fd, "user.fd"),
            sorted(os.listxattr(fd)))))
        r("survive rename",
          lambda: (os.rename(d / "f", d / "g"), os.getxattr(d / "g", "user.fd"))[1])
        r("on a 0000 file (root)", lambda: (os.chmod(d / "g", 0),
                                            os.setxattr(d / "g", "user.z", b"z"),
                                            os.getxattr(d / "g", "user.z"))[2])
        os.symlink("g", d / "link")
        r("follows a symlink", os.getxattr, d / "link", "user.z")
        r("symlink itself: get", os.getxattr, d / "link", "user.z", follow_symlinks=False)
        r("symlink itself: set", os.setxattr, d / "link", "user.z", b"1", follow_symlinks=False)
        r("missing file", os.getxattr, d / "missing", "user.a")

    parity(pair, scenario)


def test_listxattr_of_a_symlink_and_a_fifo(pair):
    def scenario(d: Path, r: Rec) -> None:
        os.symlink("nowhere", d / "link")
        os.mkfifo(d / "fifo")
        r("symlink", os.listxattr, d / "link", follow_symlinks=False)
        r("fifo", os.listxattr, d / "fifo")

    parity(pair, scenario)


# -- durability and file-system facts -----------------------------------------------------------

def test_fsync_and_fdatasync(pair):
    def scenario(d: Path, r: Rec) -> None:
        fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"x" * 100_000)
        r("fsync", os.fsync, fd)
        r("fdatasync", os.fdatasync, fd)
        os.close(fd)
        r("fsync read-only fd", lambda: closing(os.open(d / "f", os.O_RDONLY), os.fsync))
        r("fdatasync read-only fd", lambda: closing(os.open(d / "f", os.O_RDONLY), os.fdatasync))
        r("fsync a directory", lambda: closing(os.open(d, os.O_RDONLY | os.O_DIRECTORY), os.fsync))
        r("fdatasync a directory",
          lambda: closing(os.open(d, os.O_RDONLY | os.O_DIRECTORY), os.fdatasync))
        r("sync_file_range-free content check", lambda: len(read_all(d / "f")))

    parity(pair, scenario)


def test_statvfs_fields(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"x")
        for p in (d, d / "f"):
            vfs = os.statvfs(p)
            r(f"statvfs {p.name}", lambda vfs=vfs: (vfs.f_bsize, vfs.f_frsize, vfs.f_namemax))
        r("fstatvfs", lambda: closing(os.open(d / "f", os.O_RDONLY),
                                      lambda fd: (os.fstatvfs(fd).f_bsize,
                                                  os.fstatvfs(fd).f_namemax)))
        r("statvfs missing", os.statvfs, d / "missing")

    parity(pair, scenario)


def test_statvfs_counts_are_the_backing_filesystems(env):
    view, backing = os.statvfs(env.view), os.statvfs(env.plain)
    assert (view.f_blocks, view.f_files) == (backing.f_blocks, backing.f_files)
    # free counts move with other tests and processes: a loose check
    assert abs(view.f_bfree - backing.f_bfree) < backing.f_blocks // 100


def test_unlinked_open_file_still_reads(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"still here " * 1000)
        fd = os.open(d / "f", os.O_RDWR)
        ro = os.open(d / "f", os.O_RDONLY)
        r("unlink while open", os.unlink, d / "f")
        r("name gone", os.lstat, d / "f")
        r("read", lambda: os.pread(fd, 11, 0))
        r("fstat (nlink 0)", fst, fd)
        r("write more", os.pwrite, fd, b"appended", 11000)
        r("other fd sees it", lambda: os.pread(ro, 8, 11000))
        r("fstat other fd", fst, ro)
        r("fsync", os.fsync, fd)
        r("new file of the same name is new", lambda: (write_file(d / "f", b"new"),
                                                      read_all(d / "f"), os.pread(fd, 5, 0))[1:])
        os.close(ro)
        r("still reads after the other fd closed", lambda: os.pread(fd, 5, 0))
        os.close(fd)
        r("listing", lambda: sorted(os.listdir(d)))
        # renamed while open: the fd follows the file
        write_file(d / "g", b"moving")
        fd = os.open(d / "g", os.O_RDWR)
        os.rename(d / "g", d / "h")
        r("renamed: fstat", fst, fd)
        r("renamed: ftruncate", lambda: (os.ftruncate(fd, 3), read_all(d / "h"))[1])
        os.close(fd)

    parity(pair, scenario)


def test_unlinked_open_file_metadata_changes(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"x" * 100)
        fd = os.open(d / "f", os.O_RDWR)
        os.unlink(d / "f")
        r("ftruncate", lambda: (os.ftruncate(fd, 10), fst(fd)["size"])[1])
        r("fchmod", lambda: (os.fchmod(fd, 0o600), fst(fd)["mode"])[1])
        r("futimens", lambda: (os.utime(fd, ns=(1, 2)), fst(fd, times=True)["mtime_ns"])[1])
        r("reopen via /proc/self/fd", lambda: closing(
            os.open(f"/proc/self/fd/{fd}", os.O_RDONLY), lambda g: os.pread(g, 4, 0)))
        os.close(fd)

    parity(pair, scenario)


# -- what QEMU also relies on: byte-range locks and shared mappings ------------------------------

def _ofd_lock(fd: int, kind: int, start: int, length: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi", kind, os.SEEK_SET, start, length, 0))


def _ofd_probe(fd: int, kind: int, start: int, length: int) -> tuple[int, int, int]:
    raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK,
                      struct.pack("hhqqi", kind, os.SEEK_SET, start, length, 0))
    l_type, _, l_start, l_len, _ = struct.unpack("hhqqi", raw)
    return l_type, l_start, l_len


def test_ofd_locks_and_flock(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "disk", b"\0" * 8192)
        a = os.open(d / "disk", os.O_RDWR)
        b = os.open(d / "disk", os.O_RDWR)
        try:
            r("a: write lock 0..100", _ofd_lock, a, fcntl.F_WRLCK, 0, 100)
            r("b: read lock inside", _ofd_lock, b, fcntl.F_RDLCK, 50, 10)
            r("b: read lock after", _ofd_lock, b, fcntl.F_RDLCK, 100, 10)
            r("b: probe", _ofd_probe, b, fcntl.F_WRLCK, 0, 200)
            r("a: write lock over b's", _ofd_lock, a, fcntl.F_WRLCK, 100, 1)
            r("a: unlock", _ofd_lock, a, fcntl.F_UNLCK, 0, 0)
            r("b: now fine", _ofd_lock, b, fcntl.F_WRLCK, 0, 100)
            r("a: flock ex", fcntl.flock, a, fcntl.LOCK_EX | fcntl.LOCK_NB)
            r("b: flock ex conflicts", fcntl.flock, b, fcntl.LOCK_EX | fcntl.LOCK_NB)
            r("a: flock un", fcntl.flock, a, fcntl.LOCK_UN)
            r("b: flock sh", fcntl.flock, b, fcntl.LOCK_SH | fcntl.LOCK_NB)
        finally:
            os.close(a)
            os.close(b)
        ro = os.open(d / "disk", os.O_RDONLY)
        try:
            r("write lock on a read-only fd", _ofd_lock, ro, fcntl.F_WRLCK, 0, 1)
        finally:
            os.close(ro)

    parity(pair, scenario)


def test_shared_mapping_writes_reach_the_file(pair):
    def scenario(d: Path, r: Rec) -> None:
        write_file(d / "f", b"\0" * 3 * 4096)
        fd = os.open(d / "f", os.O_RDWR)
        try:
            m = mmap.mmap(fd, 3 * 4096)
            m[10:15] = b"HELLO"
            m[4096 * 2 + 7:4096 * 2 + 12] = b"WORLD"
            r("msync", m.flush)
            r("read(2) sees the mapping",
              lambda: (os.pread(fd, 5, 10), os.pread(fd, 5, 4096 * 2 + 7)))
            os.pwrite(fd, b"PWRITE", 100)
            r("the mapping sees pwrite", lambda: m[100:106])
            m.close()
        finally:
            os.close(fd)
        r("after close", lambda: (read_all(d / "f")[10:15], len(read_all(d / "f"))))
        ro = os.open(d / "f", os.O_RDONLY)
        try:
            r("shared writable map of a read-only fd", mmap.mmap, ro, 4096)
            r("private map of a read-only fd", lambda: mmap.mmap(ro, 4096, mmap.MAP_PRIVATE)[10:15])
        finally:
            os.close(ro)

    parity(pair, scenario)
