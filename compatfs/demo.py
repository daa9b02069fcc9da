"""``compatfs demo``: a guided run on a built-in legacy device.

Builds a device-like ``/persist`` (on a loop-mounted ext4 image with a real
fscrypt vault when run as root, so the vault boundary is the real one), shows
the plan in the default layout (``eve``, the newest release) and what the
design note's layout would do differently, mounts the legacy views in stage
``redirect``, and then does what
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
from collections.abc import Iterator
from typing import TextIO

from . import mounts
from .config import Config
from .enums import Stage, views_for
from .layout import Layout
from .names import DownloadArea, ObjType, shown
from .plan import make_plan, render_text
from .resolver import Resolution, Resolver
from .rules import rules_for
from .testing import devicefs, devicegen


def can_mount() -> bool:
    """Root, /dev/fuse, fusermount3 and losetup: what the mounted tour needs."""
    return (os.geteuid() == 0 and os.path.exists("/dev/fuse")
            and shutil.which("fusermount3") is not None and shutil.which("losetup") is not None)


@contextlib.contextmanager
def _device(workdir: str) -> Iterator[str]:
    with devicefs.device_root(__import__("pathlib").Path(workdir), size_mb=512) as root:
        yield str(root)


def _run(argv: list[str], out: TextIO) -> None:
    proc = subprocess.run(argv, check=False, capture_output=True, text=True)
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


def _outcome(layout: Layout, target: str | None, reason: str | None) -> str:
    if target is not None:
        return f"-> {shown(layout.relpath(target))}"
    # the reason's first clause: what happens, not the whole argument
    return f"stays: {shown((reason or '').partition(': ')[0])}"


def layouts_compared(root: str, release: str | None = None) -> str:
    """What the same device's plan does differently under layout ``eve`` (of
    *release*, default the newest) and under ``design-note``: one block per
    object whose place differs."""
    rules = (rules_for("eve", release), rules_for("design-note"))
    plans = []
    for r in rules:
        layout = Layout(root, rules=r)
        plans.append((layout, {e.obj.path: e for e in make_plan(layout, Resolver(layout)).entries}))
    width = max(len(r.name) for r in rules) + 1
    lines = [(f"the same device under layout {rules[1].name} (only what differs from "
              f"{rules[0].name}):")]
    (eve_layout, eve), (dn_layout, dn) = plans
    for path, e in eve.items():
        d = dn.get(path)
        if d is None or (e.target, e.reason) == (d.target, d.reason):
            continue
        lines.append(f"   {e.obj.kind:<10} {shown(eve_layout.relpath(path))}")
        for layout, entry, r in ((eve_layout, e, rules[0]), (dn_layout, d, rules[1])):
            outcome = _outcome(layout, entry.target, entry.reason)
            lines.append(f"      {r.name + ':':<{width}} {outcome}")
    if len(lines) == 1:
        lines.append("   (nothing)")
    return "\n".join(lines) + "\n"


def _landed(root: str, layout: Layout, res: Resolution, rel: str) -> str:
    """Where a download the tour just wrote is now: the new-layout files under
    *rel*, or the rule that keeps it in the legacy store."""
    if res.target is None:
        return f"   (the legacy store; {shown(res.reason or '')})"
    return _where(root, rel)


def tour(out: TextIO = sys.stdout) -> int:
    """The mounted tour; returns an exit status."""
    with tempfile.TemporaryDirectory(prefix="compatfs-demo-") as work, _device(work) as root:
        apps = devicegen.make_demo(root)
        web, _db, _pod, fresh = apps
        out.write(f"demo device: ext4 image on a loop device at {root}, "
                  "vault/ encrypted with fscrypt\n")
        layout = Config().layout(root)
        _show(out, f"compatfs plan, layout {layout.rules.name} (what belongs where; "
                   "nothing moves)")
        resolver = Resolver(layout)
        out.write(render_text(make_plan(layout, resolver)))
        _show(out, "layout: design-note instead")
        out.write(layouts_compared(root))

        run_dir = os.path.join(work, "run")
        cli = [sys.executable, "-m", "compatfs"]
        common = ["--root", root, "--run-dir", run_dir]
        _show(out, "compatfs mount --stage redirect")
        _run(cli + ["mount", *common, "--stage", Stage.REDIRECT], out)
        try:
            for view in views_for(mount_prepared=False):
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
            res = resolver.resolve_download(ObjType.APP_IMG, DownloadArea.PENDING, image_id,
                                            "ubuntu.qcow2")
            out.write(f"   downloaded pending/{image_id}/ubuntu.qcow2 -> bytes at:\n"
                      f"{_landed(root, layout, res, layout.rel('downloader'))}\n")
            verifier = os.path.join(dl, "verifier", image_id)
            os.makedirs(verifier, exist_ok=True)
            os.rename(os.path.join(pending, "ubuntu.qcow2"), os.path.join(verifier, "ubuntu.qcow2"))
            os.chmod(os.path.join(verifier, "ubuntu.qcow2"), 0o400)
            res = resolver.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIER, image_id,
                                            "ubuntu.qcow2")
            out.write(f"   renamed into verifier/{image_id}/ -> bytes at:\n"
                      f"{_landed(root, layout, res, layout.rel('verifier'))}\n")
            verified = os.path.join(dl, "verified", sha.upper())
            os.makedirs(verified, exist_ok=True)
            os.rename(os.path.join(verifier, "ubuntu.qcow2"),
                      os.path.join(verified, "ubuntu.qcow2"))
            shutil.rmtree(pending)
            shutil.rmtree(verifier)
            with open(os.path.join(verified, "ubuntu.qcow2"), "rb") as f:
                same = hashlib.sha256(f.read()).hexdigest() == sha
            res = resolver.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIED, sha,
                                            "ubuntu.qcow2")
            out.write(f"   renamed into verified/{sha.upper()[:16]}…/ (sha256 "
                      f"{'matches' if same else 'DIFFERS'}) -> bytes at:\n"
                      f"{_landed(root, layout, res, layout.rel('verified'))}\n")

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
