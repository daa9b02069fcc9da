"""``compatfs demo``: a guided run on a built-in legacy device.

Builds a device-like ``/persist`` (on a loop-mounted ext4 image with a real
fscrypt vault when run as root, so the vault boundary is the real one), shows
the plan, mounts the legacy views in stage ``redirect``, and then does what
old agents do through legacy names: lists and reads volumes, lets volumemgr
create a new volume, lets the downloader and the verifier take an image
through pending, verifier and verified. After each step it shows where the
bytes really went. Then it unmounts and removes everything it made.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, TextIO

from . import devicefs, devicegen, mounts
from .config import Config
from .plan import make_plan, render_text
from .resolver import Resolver


def can_mount() -> bool:
    """Root, /dev/fuse, fusermount3 and losetup: what the mounted tour needs."""
    return (os.geteuid() == 0 and os.path.exists("/dev/fuse")
            and shutil.which("fusermount3") is not None and shutil.which("losetup") is not None)


@contextlib.contextmanager
def _device(workdir: str) -> Iterator[str]:
    with devicefs.device_root(__import__("pathlib").Path(workdir), size_mb=512) as root:
        yield str(root)


def _run(argv: list[str], out: TextIO) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    out.write(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")


def _show(out: TextIO, title: str) -> None:
    out.write(f"\n== {title}\n")


def _where(root: str, *rels: str) -> str:
    found = []
    for rel in rels:
        for dirpath, _, files in os.walk(os.path.join(root, rel)):
            for f in files:
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return "\n".join(f"   {p}" for p in sorted(found)) or "   (nothing)"


def tour(out: TextIO = sys.stdout) -> int:
    """The mounted tour; returns an exit status."""
    with tempfile.TemporaryDirectory(prefix="compatfs-demo-") as work, _device(work) as root:
        apps = devicegen.make_demo(root)
        web, _db, _pod, fresh = apps
        out.write(f"demo device: ext4 image on a loop device at {root}, "
                  "vault/ encrypted with fscrypt\n")
        _show(out, "compatfs plan (what belongs where; nothing moves)")
        layout = Config().layout(root)
        out.write(render_text(make_plan(layout, Resolver(layout))))

        run_dir = os.path.join(work, "run")
        cli = [sys.executable, "-m", "compatfs"]
        common = ["--root", root, "--run-dir", run_dir]
        _show(out, "compatfs mount --stage redirect")
        _run(cli + ["mount", *common, "--stage", "redirect"], out)
        try:
            for view in ("img", "downloads"):
                entry = mounts.mounted_at(layout.path(view))
                out.write(f"   {view}: {entry.fstype if entry else 'NOT MOUNTED'}\n")

            _show(out, "an old agent lists img/ through the view")
            for name in sorted(os.listdir(layout.path("img"))):
                st = os.stat(os.path.join(layout.path("img"), name))
                out.write(f"   {st.st_size:>12}  {name}\n")

            _show(out, "volumemgr creates a new volume through its legacy name")
            legacy = os.path.join(layout.path("img"), fresh.legacy_name(0))
            with open(legacy, "wb") as f:
                f.truncate(32 << 20)
                f.write(b"fresh volume\n")
            out.write(f"   wrote img/{fresh.legacy_name(0)}\n   its bytes are at:\n"
                      f"{_where(root, layout.rel('vault_volumes'))}\n")

            _show(out, "the downloader, then the verifier, through legacy names")
            blob = os.urandom(256 << 10)
            sha = hashlib.sha256(blob).hexdigest()
            image_id = devicegen.random_uuid(__import__("random").Random(3))
            dl = os.path.join(layout.path("downloads"), "appImg.obj")
            pending = os.path.join(dl, "pending", image_id)
            os.makedirs(pending, exist_ok=True)
            with open(os.path.join(pending, "ubuntu.qcow2"), "wb") as f:
                f.write(blob[:100_000])
            with open(os.path.join(pending, "ubuntu.qcow2"), "ab") as f:  # resumed download
                f.write(blob[100_000:])
            out.write(f"   downloaded pending/{image_id}/ubuntu.qcow2 -> bytes at:\n"
                      f"{_where(root, layout.rel('downloader'))}\n")
            verifier = os.path.join(dl, "verifier", image_id)
            os.makedirs(verifier, exist_ok=True)
            os.rename(os.path.join(pending, "ubuntu.qcow2"), os.path.join(verifier, "ubuntu.qcow2"))
            os.chmod(os.path.join(verifier, "ubuntu.qcow2"), 0o400)
            out.write(f"   renamed into verifier/{image_id}/ -> bytes at:\n"
                      f"{_where(root, layout.rel('verifier'))}\n")
            verified = os.path.join(dl, "verified", sha.upper())
            os.makedirs(verified, exist_ok=True)
            os.rename(os.path.join(verifier, "ubuntu.qcow2"), os.path.join(verified, "ubuntu.qcow2"))
            shutil.rmtree(pending)
            shutil.rmtree(verifier)
            with open(os.path.join(verified, "ubuntu.qcow2"), "rb") as f:
                same = hashlib.sha256(f.read()).hexdigest() == sha
            out.write(f"   renamed into verified/{sha.upper()[:16]}…/ (sha256 "
                      f"{'matches' if same else 'DIFFERS'}) -> bytes at:\n"
                      f"{_where(root, layout.rel('verified'))}\n")

            _show(out, "compatfs status")
            _run(cli + ["status", *common], out)
        finally:
            _show(out, "compatfs umount")
            _run(cli + ["umount", *common], out)
        out.write(f"   img/ is the plain legacy directory again: "
                  f"{mounts.mounted_at(layout.path('img')) is None}\n")
        out.write(f"   {web.legacy_name(0)[:20]}… still there: "
                  f"{os.path.exists(os.path.join(layout.path('img'), web.legacy_name(0)))}\n")
    return 0
