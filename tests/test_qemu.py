"""What the hypervisor and volumemgr do to /persist/img, done for real.

``qemu-img`` creates, checks, resizes and converts volumes under their legacy
names through the view; ``qemu-io`` writes and reads patterns, once through
the page cache and once with ``cache=none`` (``O_DIRECT``). A raw sparse
volume larger than 4 GiB keeps its holes, and an ``O_DIRECT`` handle reads
and writes through page-aligned buffers. After unmounting, the bytes the
legacy store (or, in the redirect stage, the new layout) holds are checked
directly.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from compatfs import mounts
from compatfs.testing import devicegen

from .devices import device_root
from .mounting import mounted

pytestmark = pytest.mark.root

QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None
needs_qemu = pytest.mark.skipif(not QEMU, reason="qemu-img and qemu-io (qemu-utils) are needed")

APP = "11111111-2222-4333-8444-555555555555"
GiB = 1 << 30
MiB = 1 << 20


def vm_name(sha_byte: str, fmt: str, app: str = APP, purge: int = 0) -> str:
    """A legacy VM volume name: ``<sha>-<appUUID>[#<purge>].<format>``."""
    return f"{sha_byte * 32}-{app}" + (f"#{purge}" if purge else "") + f".{fmt}"


def qemu(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}:\n" \
                                 f"{proc.stdout}\n{proc.stderr}"
    # qemu-io reports a failed pattern check on stdout but still exits 0 (7.x)
    assert "Pattern verification failed" not in proc.stdout, proc.stdout
    assert "failed" not in proc.stdout.lower() and "error" not in proc.stderr.lower(), \
        f"{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def qemu_check(path: Path) -> None:
    out = qemu("qemu-img", "check", "-f", "qcow2", path)
    assert "No errors were found on the image." in out, out


def virtual_size(path: Path, fmt: str) -> int:
    return json.loads(qemu("qemu-img", "info", "-f", fmt, "--output=json", path))["virtual-size"]


@pytest.fixture
def legacy(tmp_path):
    root = tmp_path / "persist"
    (root / "img").mkdir(parents=True)
    return root


def _unmounted(root: Path) -> None:
    assert mounts.mounted_at(str(root / "img")) is None
    assert mounts.mounted_at(str(root / "downloads")) is None


@needs_qemu
def test_qcow2_create_write_read_check_resize(legacy, tmp_path):
    img = legacy / "img" / vm_name("ab", "qcow2")
    with mounted(legacy, tmp_path / "run") as m:
        qemu("qemu-img", "create", "-q", "-f", "qcow2", img, "256M")
        assert os.path.exists(img) and virtual_size(img, "qcow2") == 256 * MiB
        qemu("qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 100M 64k",
             img)
        # cache=none: QEMU opens the image with O_DIRECT
        qemu("qemu-io", "-f", "qcow2", "-t", "none", "-c", "write -P 0xef 2M 64k",
             "-c", "write -P 0x12 150M 4k", img)
        qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 100M 64k",
             "-c", "read -P 0xef 2M 64k", "-c", "read -P 0x12 150M 4k", "-c", "read -P 0 50M 64k",
             img)
        qemu("qemu-io", "-f", "qcow2", "--cache=none", "-c", "read -P 0xab 0 1M",
             "-c", "read -P 0xcd 100M 64k", "-c", "read -P 0xef 2M 64k", img)
        qemu_check(img)
        qemu("qemu-img", "resize", "-f", "qcow2", img, "512M")
        assert virtual_size(img, "qcow2") == 512 * MiB
        qemu("qemu-io", "-f", "qcow2", "-t", "none", "-c", "write -P 0x77 400M 64k", img)
        qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0x77 400M 64k", "-c", "read -P 0 300M 64k",
             "-c", "read -P 0xab 0 1M", img)
        qemu_check(img)
        size_in_view = os.stat(img).st_size
        assert "Traceback" not in m.log_text(), m.log_text()
    _unmounted(legacy)
    backing = legacy / "img" / vm_name("ab", "qcow2")   # the legacy store itself now
    assert os.stat(backing).st_size == size_in_view
    qemu_check(backing)
    assert virtual_size(backing, "qcow2") == 512 * MiB
    qemu("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0xab 0 1M", "-c", "read -P 0xcd 100M 64k",
         "-c", "read -P 0xef 2M 64k", "-c", "read -P 0x77 400M 64k", backing)


@needs_qemu
def test_convert_raw_to_qcow2_and_back_through_legacy_names(legacy, tmp_path):
    img = legacy / "img"
    raw = img / vm_name("cd", "raw")
    qcow = img / vm_name("ef", "qcow2", purge=3)
    back = img / vm_name("0a", "raw")
    with mounted(legacy, tmp_path / "run"):
        qemu("qemu-img", "create", "-q", "-f", "raw", raw, "64M")
        qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 32M 64k",
             "-c", f"write -P 0x33 {64 * MiB - 4096} 4k", raw)
        # volumemgr converts a verified image into a volume; O_DIRECT on both sides
        qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-t", "none", "-T", "none",
             raw, qcow)
        assert "Images are identical." in qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                                               raw, qcow)
        qemu_check(qcow)
        qemu("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, back)
        assert "Images are identical." in qemu("qemu-img", "compare", "-f", "raw", "-F", "raw",
                                               raw, back)
        assert os.stat(back).st_size == 64 * MiB
        listed = sorted(os.listdir(img))
        assert listed == sorted(p.name for p in (raw, qcow, back))
        st_view = {p.name: os.stat(p) for p in (raw, qcow, back)}
    _unmounted(legacy)
    for p in (raw, qcow, back):
        st = os.stat(p)
        assert (st.st_size, st.st_mtime_ns) == (st_view[p.name].st_size,
                                                st_view[p.name].st_mtime_ns)
    qemu_check(qcow)
    assert "Images are identical." in qemu("qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                                           raw, qcow)
    # the converted raw copy kept the source's holes
    assert os.stat(back).st_blocks * 512 < 8 * MiB


def test_raw_sparse_volume_over_4gib_keeps_its_holes(legacy, tmp_path):
    name = vm_name("5a", "raw")
    path = legacy / "img" / name
    payload = bytes(range(256)) * (MiB // 256)
    across = b"\x4a" * 8192                          # straddles the 4 GiB boundary
    with mounted(legacy, tmp_path / "run"):
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, 6 * GiB)
            assert os.pwrite(fd, payload, 5 * GiB) == len(payload)
            assert os.pwrite(fd, across, 4 * GiB - 4096) == len(across)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, len(payload), 5 * GiB) == payload
            assert os.pread(fd, len(across) + 2, 4 * GiB - 4097) == b"\0" + across + b"\0"
            assert os.pread(fd, 4096, 4 * GiB + MiB) == bytes(4096)     # a hole above 4 GiB
            assert os.pread(fd, 4096, 5 * GiB - 4096) == bytes(4096)    # just below the data
            assert os.pread(fd, 10, 6 * GiB - 5) == bytes(5)            # up to the end
        finally:
            os.close(fd)
        st = os.stat(path)
        assert st.st_size == 6 * GiB
        assert st.st_blocks * 512 < 8 * MiB
        if QEMU:
            qemu("qemu-io", "-f", "raw", "-t", "none", "-c", f"write -P 0x5b {5 * GiB + MiB} 64k",
                 path)
            qemu("qemu-io", "-f", "raw", "-c", f"read -P 0x5b {5 * GiB + MiB} 64k",
                 "-c", f"read -P 0 {4 * GiB + 4096} 64k",
                 path)
    _unmounted(legacy)
    st = os.stat(path)                                   # the legacy store's file
    assert st.st_size > 4 * GiB
    assert st.st_blocks * 512 < 8 * MiB, f"holes were filled: {st.st_blocks * 512} bytes allocated"
    with open(path, "rb") as f:
        f.seek(5 * GiB)
        assert f.read(len(payload)) == payload
        f.seek(4 * GiB - 4096)
        assert f.read(len(across)) == across


def test_o_direct_reads_and_writes_with_aligned_buffers(legacy, tmp_path):
    path = legacy / "img" / vm_name("d1", "raw")
    data = os.urandom(4 * MiB)
    with mounted(legacy, tmp_path / "run"):
        with open(path, "wb") as f:
            f.write(data)
        buffered = os.open(path, os.O_RDONLY)
        direct = os.open(path, os.O_RDWR | os.O_DIRECT)
        try:
            assert os.pread(buffered, 16, 8192) == data[8192:8208]     # now in the page cache
            buf = mmap.mmap(-1, MiB)                     # anonymous mappings are page aligned
            assert os.preadv(direct, [buf], 3 * 4096) == MiB
            assert buf[:] == data[3 * 4096:3 * 4096 + MiB]
            a, b = mmap.mmap(-1, 64 * 1024), mmap.mmap(-1, 4096)
            assert os.preadv(direct, [a, b], 2 * MiB) == 64 * 1024 + 4096
            assert a[:] + b[:] == data[2 * MiB:2 * MiB + 64 * 1024 + 4096]
            # a short read at the end of the file
            tail = mmap.mmap(-1, 64 * 1024)
            assert os.preadv(direct, [tail], 4 * MiB - 4096) == 4096
            assert tail[:4096] == data[-4096:]
            # an O_DIRECT write is seen by a buffered reader that had the old page cached
            out = mmap.mmap(-1, 2 * 4096)
            out.write(b"\xd1" * 2 * 4096)
            assert os.pwritev(direct, [out], 8192) == 2 * 4096
            assert os.pread(buffered, 2 * 4096, 8192) == b"\xd1" * 2 * 4096
            # and one that grows the file
            assert os.pwritev(direct, [out], 4 * MiB) == 2 * 4096
            assert os.fstat(buffered).st_size == 4 * MiB + 2 * 4096
            os.fsync(direct)
        finally:
            os.close(direct)
            os.close(buffered)
    _unmounted(legacy)
    with open(path, "rb") as f:
        on_disk = f.read()
    expect = bytearray(data) + b"\xd1" * 2 * 4096
    expect[8192:8192 + 2 * 4096] = b"\xd1" * 2 * 4096
    assert on_disk == bytes(expect)


@needs_qemu
def test_redirect_stage_qemu_volumes_land_in_the_new_layout(tmp_path):
    """On a device with a real vault: volumemgr creates a raw clear-text volume and
    converts it to an encrypted qcow2 volume, both under legacy names; the bytes
    go to clear/ and vault/ under volume UUIDs, and stay sound there."""
    app = devicegen.AppDef(APP, "vm", [
        devicegen.DriveDef("aaaaaaaa-2222-4333-8444-555555555555", "ab" * 32, "qcow2"),
        devicegen.DriveDef("bbbbbbbb-2222-4333-8444-555555555555", "cd" * 32, "raw",
                           clear_text=True),
    ])
    work = tmp_path / "dev"
    work.mkdir()
    with device_root(work) as root:
        devicegen.write_device_state(str(root), [app])
        qcow = root / "img" / app.legacy_name(0)
        raw = root / "img" / app.legacy_name(1)
        with mounted(root, tmp_path / "run", stage="redirect") as m:
            qemu("qemu-img", "create", "-q", "-f", "raw", raw, "64M")
            qemu("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 32M 64k",
                 raw)
            qemu("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-t", "none", "-T", "none",
                 raw, qcow)
            qemu_check(qcow)
            qemu("qemu-img", "resize", "-f", "qcow2", qcow, "128M")
            qemu("qemu-io", "-f", "qcow2", "-t", "none", "-c", "write -P 0x33 100M 64k", qcow)
            qemu("qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 32M 64k",
                 "-c", "read -P 0x33 100M 64k", qcow)
            qemu_check(qcow)
            assert sorted(os.listdir(root / "img")) == sorted([qcow.name, raw.name])
            assert "Traceback" not in m.log_text(), m.log_text()
        _unmounted(root)
        assert os.listdir(root / "img") == []            # nothing was left in the legacy store
        placed_qcow = root / "vault" / "volumes" / f"{app.drives[0].volume_uuid}#0.qcow2"
        placed_raw = root / "clear" / "volumes" / f"{app.drives[1].volume_uuid}#0.raw"
        qemu_check(placed_qcow)
        assert virtual_size(placed_qcow, "qcow2") == 128 * MiB
        qemu("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x11 0 1M",
             "-c", "read -P 0x33 100M 64k", placed_qcow)
        assert os.stat(placed_raw).st_size == 64 * MiB
        qemu("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 32M 64k", placed_raw)
