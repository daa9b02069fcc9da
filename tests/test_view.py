"""The views' namespace without FUSE: :class:`compatfs.view.View` on plain directories.

Where a new object goes in each stage, where a rename takes the bytes, what
recovery does with moves a crash interrupted, and that a symbolic link
planted in a store never leads compatfs outside the root.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

from compatfs.backing import Backing
from compatfs.index import DB_NAME, Index
from compatfs.indexformat import Record
from compatfs.layout import Layout
from compatfs.migration import recover
from compatfs.names import ObjType
from compatfs.placement import Placement
from compatfs.plan import make_plan
from compatfs.resolver import Resolver
from compatfs.rules import DEFAULT_RULES, OCI_LAYER_MEDIA_TYPE, Rules, rules_for
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef
from compatfs.view import View

DESIGN_NOTE = rules_for("design-note")
BOTH = pytest.mark.parametrize("layout_rules", [DEFAULT_RULES, DESIGN_NOTE],
                               ids=["eve", "design-note"])
#: tests of what the design note does with downloads in progress (moved into the vault)
DESIGN_NOTE_ONLY = pytest.mark.parametrize("layout_rules", [DESIGN_NOTE], ids=["design-note"])

VIEWS = ("img", "downloads", "prepared")
OBJ = "appImg.obj"


@dataclass
class Device:
    root: Path
    web: AppDef      # a qcow2 volume and a clear-text raw one
    db: AppDef       # purge counter 2, generation 3
    pod: AppDef      # a container volume
    stray: AppDef    # not in the checkpoint
    image_id: str
    sha: str         # of a verified download, lower case; not in the checkpoint

    def vol(self, app: AppDef, i: int = 0) -> str:
        d = app.drives[i]
        return f"{d.volume_uuid}#{d.generation}.{d.fmt}"


@pytest.fixture
def device(tmp_path, rng) -> Device:
    root = tmp_path / "persist"
    root.mkdir()
    u = lambda: devicegen.random_uuid(rng)  # noqa: E731
    s = lambda: devicegen.random_sha(rng)  # noqa: E731
    web = AppDef(u(), "web", [DriveDef(u(), s(), "qcow2", volume_uuid=u()),
                              DriveDef(u(), s(), "raw", volume_uuid=u(), clear_text=True)])
    db = AppDef(u(), "db", [DriveDef(u(), s(), "qcow2", volume_uuid=u(), generation=3,
                                     sha_in_image=False, in_latch=True)], purge=2)
    pod = AppDef(u(), "pod", [DriveDef(u(), s(), "container", volume_uuid=u(),
                                       sha_in_image=False, content_tree=True)])
    stray = AppDef(u(), "stray", [DriveDef(u(), s(), "qcow2", volume_uuid=u())])
    devicegen.write_device_state(str(root), [web, db, pod], wrap=True, rng=rng)
    return Device(root, web, db, pod, stray, u(), s())


class Views:
    """Builds Views over one root and closes what they opened."""

    def __init__(self, root: Path, rules: Rules = DEFAULT_RULES) -> None:
        self.root = root
        self.layout = Layout(str(root), rules=rules)
        self.opened: list[tuple[Backing, Index]] = []

    def __call__(self, stage: str = "redirect", index_path: str | None = None) -> View:
        backing = Backing.open(self.layout, VIEWS, create_new=True, require_encrypted=False)
        index = Index(index_path)
        self.opened.append((backing, index))
        return View(self.layout, backing, index, Resolver(self.layout), stage, VIEWS)

    def close(self) -> None:
        for backing, index in self.opened:
            backing.close()
            index.close()


@pytest.fixture
def layout_rules() -> Rules:
    """The target layout of the views (eve 17.3 unless a test parametrizes it)."""
    return DEFAULT_RULES


@pytest.fixture
def views(device, layout_rules):
    v = Views(device.root, layout_rules)
    yield v
    v.close()


def write_new(view: View, vpath: str, data: bytes, mode: int = 0o644) -> Placement:
    fd, p = view.create(vpath, os.O_WRONLY, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return p


def read(view: View, vpath: str) -> bytes:
    store, rel, _ = view.locate(vpath)
    fd = store.open(rel, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


def files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir()} \
        if path.exists() else set()


def mkdirs(view: View, vdir: str) -> None:
    top, _, rest = vdir.partition("/")
    view.backing.get(top).makedirs(rest)


# -- placement ------------------------------------------------------------------------

def placement_cases(d: Device, rules: Rules) -> list[tuple[str, bool, Placement]]:
    """(view path, is_dir, where it goes in a placing stage) under *rules*."""
    web0, web1, db0 = d.web.legacy_name(0), d.web.legacy_name(1), d.db.legacy_name(0)
    pod = d.pod.legacy_name(0, container=True)
    iid, sha = d.image_id, d.sha
    legacy = lambda v: Placement(*v.split("/", 1))  # noqa: E731

    def moved(vpath: str, where: Placement) -> Placement:
        """*where* if the rules move downloads in progress, else the legacy store."""
        return where if rules.move_transient else legacy(vpath)

    def verified(vpath: str, obj_type: ObjType, sha_: str, media_type: str | None) -> Placement:
        name = rules.verified_name(sha_, media_type)
        if obj_type not in rules.verified_types or name is None:
            return legacy(vpath)
        return Placement("verified", name, "verified", "new")

    web_sha = d.web.drives[0].sha     # a qcow2 image the checkpoint names: an OCI layer
    cases = [(vpath, where) for vpath, where in (
        (f"downloads/{OBJ}/pending/{iid}/ubuntu.img",
         Placement("downloader", f"pending/{iid}/ubuntu.img", "pending", "new")),
        (f"downloads/{OBJ}/pending/{sha}/claimed.img",
         Placement("downloader", f"pending/{sha}/claimed.img", "pending", "new")),
        (f"downloads/baseOs.obj/verifier/{iid}/rootfs.img",
         Placement("verifier", f"{iid}/rootfs.img", "verifier", "new")))]
    return [
        (f"img/{web0}", False, Placement("vault_volumes", d.vol(d.web, 0), "vm-volume", "new")),
        (f"img/{d.web.legacy_name(0, sha_upper=True)}", False,
         Placement("vault_volumes", d.vol(d.web, 0), "vm-volume", "new")),
        (f"img/{web1}", False, Placement(rules.clear_volumes, d.vol(d.web, 1), "vm-volume", "new")),
        (f"img/{db0}", False, Placement("vault_volumes", d.vol(d.db), "vm-volume", "new")),
        # a name that parses but that the config does not map: parked in the vault
        (f"img/{d.db.legacy_name(0, purge=1)}", False,
         Placement("unresolved", f"img/{d.db.legacy_name(0, purge=1)}", "vm-volume", "unresolved")),
        (f"img/{d.stray.legacy_name(0)}", False,
         Placement("unresolved", f"img/{d.stray.legacy_name(0)}", "vm-volume", "unresolved")),
        (f"prepared/{pod}", True, Placement("vault_volumes", d.vol(d.pod), "oci-volume", "new")),
        *((vpath, False, moved(vpath, where)) for vpath, where in cases),
        (f"downloads/cert.obj/verified/{sha.upper()}/ca.pem", False,
         verified(f"downloads/cert.obj/verified/{sha.upper()}/ca.pem", ObjType.CERT, sha, None)),
        (f"downloads/{OBJ}/verified/{sha}/other.img", False,
         verified(f"downloads/{OBJ}/verified/{sha}/other.img", ObjType.APP_IMG, sha, None)),
        (f"downloads/{OBJ}/verified/{web_sha.upper()}/web.qcow2", False,
         verified(f"downloads/{OBJ}/verified/{web_sha.upper()}/web.qcow2", ObjType.APP_IMG,
                  web_sha, OCI_LAYER_MEDIA_TYPE)),
        # not placed: stays in the legacy store
        (f"img/{web0}", True, legacy(f"img/{web0}")),
        ("img/notes.txt", False, legacy("img/notes.txt")),
        (f"img/{web0}.tmp", False, legacy(f"img/{web0}.tmp")),
        (f"img/{d.web.drives[0].sha}-{d.web.uuid}#0.qcow2", False,
         legacy(f"img/{d.web.drives[0].sha}-{d.web.uuid}#0.qcow2")),
        (f"img/{d.web.drives[0].sha}-{d.web.uuid}.QCOW2", False,
         legacy(f"img/{d.web.drives[0].sha}-{d.web.uuid}.QCOW2")),
        (f"prepared/{pod}", False, legacy(f"prepared/{pod}")),
        (f"prepared/{pod}/rootfs", True, legacy(f"prepared/{pod}/rootfs")),
        (f"downloads/{OBJ}/pending/{iid}", True, legacy(f"downloads/{OBJ}/pending/{iid}")),
        (f"downloads/{OBJ}/pending/{iid}/sub", True, legacy(f"downloads/{OBJ}/pending/{iid}/sub")),
        (f"downloads/{OBJ}/pending/{iid}/sub/f", False,
         legacy(f"downloads/{OBJ}/pending/{iid}/sub/f")),
        (f"downloads/{OBJ}/pending/not-an-id/f", False,
         legacy(f"downloads/{OBJ}/pending/not-an-id/f")),
        (f"downloads/{OBJ}/verified/{sha[:63]}/f", False,
         legacy(f"downloads/{OBJ}/verified/{sha[:63]}/f")),
        (f"downloads/{OBJ}/verified/{iid}/f", False, legacy(f"downloads/{OBJ}/verified/{iid}/f")),
        (f"downloads/other.obj/pending/{iid}/f", False,
         legacy(f"downloads/other.obj/pending/{iid}/f")),
        (f"downloads/{OBJ}/elsewhere/{iid}/f", False, legacy(f"downloads/{OBJ}/elsewhere/{iid}/f")),
    ]


@BOTH
@pytest.mark.parametrize("stage", ["observe", "redirect", "migrate", "rollback"])
def test_placement_per_stage_and_kind(device, views, stage, layout_rules):
    view = views(stage)
    placing = stage in ("redirect", "migrate")
    for vpath, is_dir, where in placement_cases(device, layout_rules):
        expect = where if placing else Placement(*vpath.split("/", 1))
        assert view.placement(vpath, is_dir) == expect, (stage, vpath)


def test_placement_follows_a_new_checkpoint(device, views):
    view = views()
    name = f"img/{device.stray.legacy_name(0)}"
    assert view.placement(name, False).state == "unresolved"
    devicegen.write_device_state(str(device.root), [device.web, device.stray])
    assert view.resolver.refresh()
    assert view.placement(name, False) == Placement("vault_volumes", device.vol(device.stray),
                                                    "vm-volume", "new")
    # the db app left the config: its volume name no longer maps
    assert view.placement(f"img/{device.db.legacy_name(0)}", False).state == "unresolved"


def test_eve_placements_follow_the_release(device, views):
    """What differs between eve releases and the design note, spelled out."""
    view = views()
    web_sha = device.web.drives[0].sha
    vpath = f"downloads/{OBJ}/verified/{web_sha}/web.qcow2"
    media = f"{web_sha}.application%2Fvnd.oci.image.layer.v1.tar+gzip"
    assert view.placement(vpath, False) == Placement("verified", media, "verified", "new")
    assert view.placement(f"img/{device.web.legacy_name(1)}", False).store == "clear_volumes"
    pending = f"downloads/{OBJ}/pending/{device.image_id}/f"
    assert view.placement(pending, False) == Placement("downloads", pending.partition("/")[2])
    old = Views(device.root, rules_for("eve", "11.7"))
    try:
        assert old("redirect").placement(vpath, False) == \
            Placement("verified", web_sha, "verified", "new")
    finally:
        old.close()


@BOTH
def test_create_puts_the_bytes_where_the_placement_says(device, views, layout_rules):
    view = views()
    root = device.root
    seen = set()
    for vpath, is_dir, where in placement_cases(device, layout_rules):
        if is_dir or (where.store, where.rel) in seen:
            continue  # the upper-case sha names the same volume as the lower-case one
        seen.add((where.store, where.rel))
        mkdirs(view, vpath.rpartition("/")[0])  # the agent's mkdir -p
        p = write_new(view, vpath, vpath.encode())
        assert p == where, vpath
        assert (root / view.layout.rel(p.store) / p.rel).read_bytes() == vpath.encode(), vpath
        assert read(view, vpath) == vpath.encode()
        assert os.path.basename(vpath) in view.listdir(vpath.rpartition("/")[0])
        rec = view.index.get(vpath)
        if where.is_legacy:
            assert rec is None, vpath
        else:
            assert (rec.store, rec.rel, rec.kind, rec.state) == (p.store, p.rel, p.kind, p.state)
    # the legacy store holds exactly the names that are not placed
    in_legacy = {f"{top}/{f}" for top, d in (("img", "img"), ("downloads", "downloads"),
                                             ("prepared", "runx/pods/prepared"))
                 for f in files(root / d)}
    assert in_legacy == {v for v, d, w in placement_cases(device, layout_rules)
                         if w.is_legacy and not d}


def test_observe_creates_in_the_legacy_store_only(device, views):
    view = views("observe")
    mkdirs(view, f"downloads/{OBJ}/pending/{device.image_id}")
    write_new(view, f"img/{device.web.legacy_name(0)}", b"vm")
    write_new(view, f"downloads/{OBJ}/pending/{device.image_id}/f", b"dl")
    view.mkdir(f"prepared/{device.pod.legacy_name(0, container=True)}", 0o755)
    assert (device.root / "img" / device.web.legacy_name(0)).read_bytes() == b"vm"
    assert (device.root / "downloads" / OBJ / "pending" / device.image_id
            / "f").read_bytes() == b"dl"
    assert files(device.root / "vault") == set()
    assert view.index.records == {}


@BOTH
def test_taken_new_location_is_never_clobbered(device, views):
    view = views()
    root = device.root
    vol = root / "vault" / "volumes" / device.vol(device.web)
    vol.write_bytes(b"already there")
    name = f"img/{device.web.legacy_name(0)}"
    p = write_new(view, name, b"new volume")
    assert p == Placement("unresolved", name, "vm-volume", "unresolved")
    assert vol.read_bytes() == b"already there"
    assert (root / "vault" / "compatfs" / "unresolved" / name).read_bytes() == b"new volume"
    # a download whose place is taken stays in the legacy store
    (root / "vault" / "verifier" / "verified" / device.sha).write_bytes(b"other")
    mkdirs(view, f"downloads/{OBJ}/verified/{device.sha}")
    p = write_new(view, f"downloads/{OBJ}/verified/{device.sha}/f", b"mine")
    assert p.is_legacy
    assert (root / "vault" / "verifier" / "verified" / device.sha).read_bytes() == b"other"
    assert read(view, f"downloads/{OBJ}/verified/{device.sha}/f") == b"mine"


# -- renames ----------------------------------------------------------------------------

@DESIGN_NOTE_ONLY
def test_rename_of_a_placed_download_follows_to_each_new_place(device, views):
    view = views()
    vault = device.root / "vault"
    iid, sha = device.image_id, device.sha
    dl = f"downloads/{OBJ}"
    mkdirs(view, f"{dl}/pending/{iid}")
    write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    write_new(view, f"{dl}/pending/{iid}/f.progress", b"{}")
    assert (vault / "downloader" / "pending" / iid / "f").read_bytes() == b"blob"

    view.backing.get("downloads").makedirs(f"{OBJ}/verifier/{iid}")
    view.rename(f"{dl}/pending/{iid}/f", f"{dl}/verifier/{iid}/f")
    assert (vault / "verifier" / "verifier" / iid / "f").read_bytes() == b"blob"
    assert not (vault / "downloader" / "pending" / iid / "f").exists()
    assert view.index.get(f"{dl}/pending/{iid}/f") is None
    rec = view.index.get(f"{dl}/verifier/{iid}/f")
    assert (rec.store, rec.rel, rec.kind, rec.prev_store) == ("verifier", f"{iid}/f", "verifier",
                                                              None)
    assert view.listdir(f"{dl}/pending/{iid}") == ["f.progress"]
    assert view.listdir(f"{dl}/verifier/{iid}") == ["f"]

    view.backing.get("downloads").makedirs(f"{OBJ}/verified/{sha.upper()}")
    view.rename(f"{dl}/verifier/{iid}/f", f"{dl}/verified/{sha.upper()}/f")
    assert (vault / "verifier" / "verified" / sha).read_bytes() == b"blob"
    assert not (vault / "verifier" / "verifier" / iid).exists()  # tidied
    rec = view.index.get(f"{dl}/verified/{sha.upper()}/f")
    assert (rec.store, rec.rel, rec.kind) == ("verified", sha, "verified")
    assert read(view, f"{dl}/verified/{sha.upper()}/f") == b"blob"
    assert files(device.root / "downloads") == set()


def test_rename_of_a_placed_volume(device, views):
    view = views()
    root = device.root
    stray = f"img/{device.stray.legacy_name(0)}"
    write_new(view, stray, b"parked")
    assert (root / "vault" / "compatfs" / "unresolved" / stray).exists()
    # renamed to a name the config maps: follows to that volume's place
    web0 = f"img/{device.web.legacy_name(0)}"
    view.rename(stray, web0)
    assert (root / "vault" / "volumes" / device.vol(device.web)).read_bytes() == b"parked"
    assert not (root / "vault" / "compatfs" / "unresolved" / stray).exists()
    rec = view.index.get(web0)
    assert (rec.store, rec.state) == ("vault_volumes", "new")
    # renamed to a name that is not a volume: the bytes stay, the name changes
    view.rename(web0, "img/backup.tmp")
    assert (root / "vault" / "volumes" / device.vol(device.web)).read_bytes() == b"parked"
    assert view.index.get(web0) is None
    assert view.index.get("img/backup.tmp").store == "vault_volumes"
    assert view.listdir("img") == ["backup.tmp"]
    assert not (root / "img" / "backup.tmp").exists()
    assert read(view, "img/backup.tmp") == b"parked"


def test_rename_over_a_placed_volume_replaces_it(device, views):
    view = views()
    root = device.root
    web0 = f"img/{device.web.legacy_name(0)}"
    stray = f"img/{device.stray.legacy_name(0)}"
    write_new(view, web0, b"old")
    write_new(view, stray, b"new")
    view.rename(stray, web0)
    assert read(view, web0) == b"new"
    assert (root / "vault" / "volumes" / device.vol(device.web)).read_bytes() == b"new"
    assert files(root / "vault" / "compatfs" / "unresolved") == set()
    assert set(view.index.records) == {web0}
    assert view.listdir("img") == [device.web.legacy_name(0)]


def test_eve_download_stays_legacy_until_verified_then_is_planned_where_the_release_reads_it(
        device, views):
    """E11, E13: in eve a download in progress is written and renamed in the legacy
    store (a rename there stays there); once in verified/ the plan sends it to
    <sha>.<media type> (its sha is a disk image the checkpoint names), and a new
    verified object of that sha is created there directly."""
    view = views()
    vault, legacy = device.root / "vault", device.root / "downloads" / OBJ
    iid, sha = device.image_id, device.web.drives[0].sha
    dl = f"downloads/{OBJ}"
    mkdirs(view, f"{dl}/pending/{iid}")
    p = write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    assert p.is_legacy and (legacy / "pending" / iid / "f").read_bytes() == b"blob"
    mkdirs(view, f"{dl}/verifier/{iid}")
    view.rename(f"{dl}/pending/{iid}/f", f"{dl}/verifier/{iid}/f")
    assert (legacy / "verifier" / iid / "f").read_bytes() == b"blob"
    mkdirs(view, f"{dl}/verified/{sha.upper()}")
    view.rename(f"{dl}/verifier/{iid}/f", f"{dl}/verified/{sha.upper()}/f")
    assert view.index.records == {} and files(vault) == set()
    assert read(view, f"{dl}/verified/{sha.upper()}/f") == b"blob"
    name = f"{sha}.application%2Fvnd.oci.image.layer.v1.tar+gzip"
    [entry] = [e for e in make_plan(view.layout, view.resolver).entries
               if e.obj.kind == "verified"]
    assert entry.target == str(vault / "verifier" / "verified" / name)
    # the verifier of a device already in redirect writes it there itself
    view.unlink(f"{dl}/verified/{sha.upper()}/f")
    p = write_new(view, f"{dl}/verified/{sha.upper()}/f", b"blob")
    assert (p.store, p.rel) == ("verified", name)
    assert (vault / "verifier" / "verified" / name).read_bytes() == b"blob"


@DESIGN_NOTE_ONLY
def test_rename_of_a_placed_file_over_a_legacy_file_replaces_it(device, views):
    """rename(2) leaves one object under the new name; the replaced legacy
    file must not linger underneath and come back when the name moves on."""
    view = views()
    root = device.root
    sha = device.sha
    dl = f"downloads/{OBJ}"
    # an old verified copy, from before compatfs
    (root / "downloads" / OBJ / "verified" / sha.upper()).mkdir(parents=True)
    (root / "downloads" / OBJ / "verified" / sha.upper() / "f").write_bytes(b"stale copy")
    mkdirs(view, f"{dl}/verifier/{device.image_id}")
    write_new(view, f"{dl}/verifier/{device.image_id}/f", b"fresh")
    view.rename(f"{dl}/verifier/{device.image_id}/f", f"{dl}/verified/{sha.upper()}/f")
    assert read(view, f"{dl}/verified/{sha.upper()}/f") == b"fresh"
    assert not (root / "downloads" / OBJ / "verified" / sha.upper() / "f").exists()
    view.rename(f"{dl}/verified/{sha.upper()}/f", f"{dl}/verified/{sha.upper()}/g")
    assert view.listdir(f"{dl}/verified/{sha.upper()}") == ["g"]
    with pytest.raises(FileNotFoundError):
        view.lstat(f"{dl}/verified/{sha.upper()}/f")


def test_rename_from_the_legacy_store_stays_in_the_legacy_store(device, views):
    view = views()
    root = device.root
    # volumemgr converts to a temporary name, then renames to the volume name
    write_new(view, "img/convert.tmp", b"converted")
    assert (root / "img" / "convert.tmp").exists()
    web0 = f"img/{device.web.legacy_name(0)}"
    view.rename("img/convert.tmp", web0)
    assert (root / web0).read_bytes() == b"converted"
    assert view.index.records == {}
    assert files(root / "vault") == set()
    # a legacy download moved through the areas stays a legacy file
    dl = root / "downloads" / OBJ
    (dl / "pending" / device.image_id).mkdir(parents=True)
    (dl / "pending" / device.image_id / "f").write_bytes(b"old download")
    (dl / "verifier" / device.image_id).mkdir(parents=True)
    view.rename(f"downloads/{OBJ}/pending/{device.image_id}/f",
                f"downloads/{OBJ}/verifier/{device.image_id}/f")
    assert (dl / "verifier" / device.image_id / "f").read_bytes() == b"old download"
    assert view.index.records == {}
    assert files(root / "vault") == set()


@DESIGN_NOTE_ONLY
def test_rename_of_a_legacy_directory_carries_the_records_below_it(device, views):
    view = views()
    dl = f"downloads/{OBJ}"
    iid = device.image_id
    mkdirs(view, f"{dl}/pending/{iid}")
    mkdirs(view, f"{dl}/verifier")
    write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    view.rename(f"{dl}/pending/{iid}", f"{dl}/verifier/{iid}")
    assert view.listdir(f"{dl}/verifier/{iid}") == ["f"]
    assert read(view, f"{dl}/verifier/{iid}/f") == b"blob"
    assert view.index.get(f"{dl}/pending/{iid}/f") is None
    with pytest.raises(OSError) as err:
        view.rmdir(f"{dl}/verifier/{iid}")
    assert err.value.errno == errno.ENOTEMPTY
    view.unlink(f"{dl}/verifier/{iid}/f")
    view.rmdir(f"{dl}/verifier/{iid}")
    assert view.index.records == {}
    assert files(device.root / "vault" / "downloader") == set()


# -- recovery ---------------------------------------------------------------------------

def crash(index_path: str, records: list[Record]) -> None:
    """Leave *records* in the index on disk, as a daemon that died would."""
    index = Index(index_path)
    for r in records:
        index.put(r)
    index.close()


def reopen(views: Views, index_path: str) -> View:
    return views("redirect", index_path)


def on_disk(index_path: str) -> dict[str, Record]:
    index = Index(index_path)
    try:
        return dict(index.records)
    finally:
        index.close()


def test_recover_finishes_a_move_the_crash_interrupted_before_the_rename(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    root = device.root
    iid = device.image_id
    vpath = f"downloads/{OBJ}/verifier/{iid}/f"
    src = root / "vault" / "downloader" / "pending" / iid / "f"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"blob")
    crash(db, [Record(vpath, "verifier", f"{iid}/f", "verifier", "new",
                             "downloader", f"pending/{iid}/f")])
    view = reopen(views, db)
    done = recover(view)
    assert done == [f"{vpath}: finished an interrupted move"]
    assert (root / "vault" / "verifier" / "verifier" / iid / "f").read_bytes() == b"blob"
    assert not src.exists()
    rec = on_disk(db)[vpath]
    assert (rec.store, rec.rel, rec.prev_store, rec.prev_rel) == ("verifier", f"{iid}/f",
                                                                  None, None)
    # the legacy directories the record lists in are made again
    assert (root / "downloads" / OBJ / "verifier" / iid).is_dir()
    assert view.listdir(f"downloads/{OBJ}/verifier/{iid}") == ["f"]
    assert read(view, vpath) == b"blob"
    assert recover(reopen(views, db)) == []  # idempotent


def test_recover_keeps_a_move_the_crash_interrupted_after_the_rename(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    root = device.root
    name = device.web.legacy_name(0)
    dst = root / "vault" / "volumes" / device.vol(device.web)
    dst.parent.mkdir(parents=True)
    dst.write_bytes(b"volume")
    crash(db, [Record(f"img/{name}", "vault_volumes", dst.name, "vm-volume", "new",
                             "unresolved", f"img/{name}")])
    view = reopen(views, db)
    assert recover(view) == []
    rec = on_disk(db)[f"img/{name}"]
    assert (rec.store, rec.rel, rec.state, rec.prev_store) == ("vault_volumes", dst.name,
                                                               "new", None)
    assert dst.read_bytes() == b"volume"
    assert read(view, f"img/{name}") == b"volume"


def test_recover_rolls_back_a_move_that_cannot_be_finished(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    root = device.root
    name = device.web.legacy_name(0)
    parked = root / "vault" / "compatfs" / "unresolved" / "img" / name
    parked.parent.mkdir(parents=True)
    parked.write_bytes(b"parked")
    # the target's directory is a file now: the move cannot be made
    (root / "vault" / "volumes").mkdir(parents=True)
    (root / "vault" / "volumes" / "sub").write_bytes(b"")
    crash(db, [Record(f"img/{name}", "vault_volumes", f"sub/{name}", "vm-volume", "new",
                             "unresolved", f"img/{name}")])
    view = reopen(views, db)
    assert recover(view) == [f"img/{name}: rolled back an interrupted move"]
    rec = on_disk(db)[f"img/{name}"]
    assert (rec.store, rec.rel, rec.prev_store) == ("unresolved", f"img/{name}", None)
    # back in the unresolved area, it is unresolved again: the next config
    # change can still place it
    assert rec.state == "unresolved"
    assert parked.read_bytes() == b"parked"
    assert read(view, f"img/{name}") == b"parked"
    moved = view.replace_unresolved()
    assert [v for v, _ in moved] == [f"img/{name}"]
    assert (root / "vault" / "volumes" / device.vol(device.web)).read_bytes() == b"parked"


def test_recover_drops_records_whose_bytes_are_gone_and_keeps_the_rest(device, views, tmp_path):
    db = str(tmp_path / DB_NAME)
    root = device.root
    iid = device.image_id
    keep = root / "vault" / "verifier" / "verified" / device.sha
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"verified")
    crash(db, [
        # crashed between the intent and the create: no bytes anywhere
        Record(f"img/{device.web.legacy_name(0)}", "vault_volumes", device.vol(device.web),
               "vm-volume", "new"),
        # an interrupted move whose bytes are at neither end
        Record(f"downloads/{OBJ}/verifier/{iid}/f", "verifier", f"{iid}/f", "verifier", "new",
               "downloader", f"pending/{iid}/f"),
        Record(f"downloads/{OBJ}/verified/{device.sha.upper()}/f", "verified", device.sha,
               "verified", "new"),
    ])
    view = reopen(views, db)
    done = recover(view)
    assert sorted(done) == sorted([
        f"img/{device.web.legacy_name(0)}: its bytes are gone; record dropped",
        f"downloads/{OBJ}/verifier/{iid}/f: its bytes are gone; record dropped",
    ])
    assert set(on_disk(db)) == {f"downloads/{OBJ}/verified/{device.sha.upper()}/f"}
    assert view.listdir("img") == []
    assert read(view, f"downloads/{OBJ}/verified/{device.sha.upper()}/f") == b"verified"


@DESIGN_NOTE_ONLY
def test_recover_after_a_real_interrupted_rename(device, views, tmp_path, monkeypatch):
    """The intent is on disk before the rename: kill the rename, recover, and
    the object is at one of its two places, under its new name."""
    db = str(tmp_path / DB_NAME)
    view = views("redirect", db)
    dl = f"downloads/{OBJ}"
    iid = device.image_id
    mkdirs(view, f"{dl}/pending/{iid}")
    mkdirs(view, f"{dl}/verifier/{iid}")
    write_new(view, f"{dl}/pending/{iid}/f", b"blob")
    store = view.backing.get("downloader")

    class Crash(BaseException):
        pass

    def die(*a, **k):
        raise Crash()

    monkeypatch.setattr(type(store), "rename", die)
    with pytest.raises(Crash):
        view.rename(f"{dl}/pending/{iid}/f", f"{dl}/verifier/{iid}/f")
    monkeypatch.undo()
    rec = on_disk(db)[f"{dl}/verifier/{iid}/f"]
    assert (rec.prev_store, rec.prev_rel) == ("downloader", f"pending/{iid}/f")
    fresh = reopen(views, db)
    assert recover(fresh) == [f"{dl}/verifier/{iid}/f: finished an interrupted move"]
    assert read(fresh, f"{dl}/verifier/{iid}/f") == b"blob"
    assert (device.root / "vault" / "verifier" / "verifier" / iid / "f").read_bytes() == b"blob"
    assert set(on_disk(db)) == {f"{dl}/verifier/{iid}/f"}


def test_replace_unresolved_places_parked_volumes(device, views):
    view = views()
    root = device.root
    stray = f"img/{device.stray.legacy_name(0)}"
    write_new(view, stray, b"parked")
    assert view.replace_unresolved() == []
    devicegen.write_device_state(str(root), [device.web, device.stray])
    assert view.resolver.refresh()
    moved = view.replace_unresolved()
    assert moved == [(stray, Placement("vault_volumes", device.vol(device.stray), "vm-volume",
                                       "new"))]
    assert (root / "vault" / "volumes" / device.vol(device.stray)).read_bytes() == b"parked"
    assert files(root / "vault" / "compatfs" / "unresolved") == set()
    assert read(view, stray) == b"parked"
    assert view.replace_unresolved() == []


# -- E5: snapshotid.txt in container volumes the views place --------------------------------

def placed_pod(device: Device) -> Path:
    return device.root / "vault" / "volumes" / device.vol(device.pod)


@BOTH
def test_a_container_volume_made_at_its_final_name_carries_snapshotid(device, views,
                                                                      layout_rules):
    """eve: the mkdir itself writes snapshotid.txt (the legacy base name, no newline,
    0644); the agent sees it, and emptying what it made then rmdir removes the
    volume. design-note: nothing is written."""
    view = views()
    name = device.pod.legacy_name(0, container=True)
    vpath = f"prepared/{name}"
    assert view.mkdir(vpath, 0o755) == Placement("vault_volumes", device.vol(device.pod),
                                                 "oci-volume", "new")
    placed = placed_pod(device)
    if layout_rules.snapshot_id:
        sid = placed / "snapshotid.txt"
        assert sid.read_bytes() == name.encode()
        assert stat.S_IMODE(sid.stat().st_mode) == 0o644 and sid.is_file()
        assert view.listdir(vpath) == ["snapshotid.txt"]
    else:
        assert os.listdir(placed) == [] and view.listdir(vpath) == []
    view.mkdir(f"{vpath}/rootfs", 0o755)
    write_new(view, f"{vpath}/image-config.json", b"{}")
    with pytest.raises(OSError) as info:
        view.rmdir(vpath)
    assert info.value.errno == errno.ENOTEMPTY
    assert (placed / "snapshotid.txt").exists() == layout_rules.snapshot_id
    view.unlink(f"{vpath}/image-config.json")
    view.rmdir(f"{vpath}/rootfs")
    view.rmdir(vpath)
    assert not placed.exists() and view.index.get(vpath) is None
    assert name not in view.listdir("prepared")


def test_rmdir_keeps_a_snapshotid_compatfs_did_not_write(device, views):
    """Only a regular file holding exactly the legacy name is compatfs' own: one the
    agent rewrote is the agent's, and the volume is not empty."""
    view = views()
    vpath = f"prepared/{device.pod.legacy_name(0, container=True)}"
    view.mkdir(vpath, 0o755)
    sid = placed_pod(device) / "snapshotid.txt"
    sid.write_bytes(b"the agent's own")
    with pytest.raises(OSError) as info:
        view.rmdir(vpath)
    assert info.value.errno == errno.ENOTEMPTY
    assert sid.read_bytes() == b"the agent's own" and view.index.get(vpath) is not None


def test_a_container_volume_mkdir_is_undone_when_snapshotid_cannot_be_written(
        device, views, monkeypatch):
    from compatfs import snapshotid

    def full(*_args) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    view = views()
    vpath = f"prepared/{device.pod.legacy_name(0, container=True)}"
    monkeypatch.setattr(snapshotid, "write", full)
    with pytest.raises(OSError) as info:
        view.mkdir(vpath, 0o755)
    assert info.value.errno == errno.ENOSPC
    assert not placed_pod(device).exists() and view.index.get(vpath) is None
    assert view.listdir("prepared") == []
    monkeypatch.undo()
    view.mkdir(vpath, 0o755)       # nothing was left behind to get in the way
    assert (placed_pod(device) / "snapshotid.txt").exists()


def test_rmdir_that_fails_after_dropping_snapshotid_writes_it_back(device, views, monkeypatch):
    from compatfs.stores import Store

    view = views()
    name = device.pod.legacy_name(0, container=True)
    vpath = f"prepared/{name}"
    view.mkdir(vpath, 0o755)
    real, calls = Store.rmdir, []

    def rmdir(store: Store, rel: str) -> None:
        calls.append(rel)
        if len(calls) == 2:            # the retry once snapshotid.txt is gone
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(store, rel)

    monkeypatch.setattr(Store, "rmdir", rmdir)
    with pytest.raises(OSError) as info:
        view.rmdir(vpath)
    monkeypatch.undo()
    assert info.value.errno == errno.EIO and calls == [device.vol(device.pod)] * 2
    assert (placed_pod(device) / "snapshotid.txt").read_bytes() == name.encode()
    assert view.index.get(vpath) is not None


def test_a_parked_container_volume_gets_snapshotid_at_its_final_name(device, views):
    """Made while the config does not map it, a container volume is parked without
    snapshotid.txt; placed when the config maps it, it arrives with it."""
    view = views()
    name = device.pod.legacy_name(0, container=True, purge=1)   # not the config's counter
    vpath = f"prepared/{name}"
    assert view.mkdir(vpath, 0o755).state == "unresolved"
    write_new(view, f"{vpath}/image-config.json", b"{}")
    assert view.listdir(vpath) == ["image-config.json"]
    device.pod.purge = 1
    devicegen.write_device_state(str(device.root), [device.web, device.db, device.pod])
    assert view.resolver.refresh()
    assert view.replace_unresolved() == [
        (vpath, Placement("vault_volumes", device.vol(device.pod), "oci-volume", "new"))]
    placed = placed_pod(device)
    assert (placed / "snapshotid.txt").read_bytes() == name.encode()
    assert (placed / "image-config.json").read_bytes() == b"{}"
    assert sorted(view.listdir(vpath)) == ["image-config.json", "snapshotid.txt"]


# -- symbolic links planted in a store ----------------------------------------------------

@pytest.fixture
def outside(tmp_path) -> Path:
    """A directory outside the root, shaped like a download tree, with known content."""
    out = tmp_path / "outside"
    (out / "pending" / "11111111-2222-3333-4444-555555555555").mkdir(parents=True)
    (out / "pending" / "11111111-2222-3333-4444-555555555555" / "f").write_bytes(b"secret")
    (out / "target.img").write_bytes(b"target")
    os.chmod(out / "target.img", 0o600)
    for p in out.rglob("*"):
        if p.is_file():  # an old atime: a read of the file would move it (relatime)
            os.utime(p, ns=(1_000_000_000, p.stat().st_mtime_ns))
    return out


def snapshot(path: Path) -> dict[str, tuple]:
    """Metadata of everything below *path*, without reading any file: a
    change (ctime) or a read (atime) by anyone shows."""
    out = {}
    for p in [path, *path.rglob("*")]:
        st = p.lstat()
        out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_uid,
                       st.st_atime_ns if stat.S_ISREG(st.st_mode) else None)
    return out


def assert_untouched(path: Path, before: dict[str, tuple]) -> None:
    assert snapshot(path) == before
    assert (path / "pending" / "11111111-2222-3333-4444-555555555555"
            / "f").read_bytes() == b"secret"
    assert (path / "target.img").read_bytes() == b"target"


@BOTH
@pytest.mark.parametrize("stage", ["observe", "redirect"])
def test_a_symlink_planted_as_a_directory_is_never_followed(device, views, outside, stage,
                                                            layout_rules):
    root = device.root
    (root / "downloads").mkdir(exist_ok=True)
    os.symlink(outside, root / "downloads" / OBJ)
    before = snapshot(outside)
    view = views(stage)
    iid = "11111111-2222-3333-4444-555555555555"
    through = f"downloads/{OBJ}/pending/{iid}/f"
    # the link itself is served as a link, not followed
    assert stat.S_ISLNK(view.lstat(f"downloads/{OBJ}").st_mode)
    store, rel, _ = view.locate(through)
    assert store.path == str(root / "downloads")

    def refused(fn, *args):
        with pytest.raises(OSError) as err:
            fn(*args)
        assert err.value.errno == errno.ELOOP, (fn, args, err.value)

    refused(view.lstat, through)
    refused(view.lstat, f"downloads/{OBJ}/pending")
    refused(view.listdir, f"downloads/{OBJ}/pending")
    refused(view.unlink, through)
    refused(view.rename, through, "img/stolen")
    refused(view.link, through, "img/stolen")
    refused(view.mkdir, f"downloads/{OBJ}/pending/new", 0o755)
    refused(view.rmdir, f"downloads/{OBJ}/pending/{iid}")
    refused(store.open, rel, os.O_RDONLY)
    refused(store.truncate, rel, 0)
    refused(store.chmod, rel, 0o777)
    refused(store.utime, rel, 0, 0)
    refused(store.open, f"{OBJ}/pending/{iid}/g", os.O_WRONLY | os.O_CREAT, 0o644)
    if stage == "observe" or not layout_rules.move_transient:
        # the legacy store (eve keeps downloads in progress there): refused at the link
        refused(view.create, f"downloads/{OBJ}/pending/{iid}/g", os.O_WRONLY, 0o644)
    else:
        # placed in the vault: nothing goes through the link
        fd, p = view.create(f"downloads/{OBJ}/pending/{iid}/g", os.O_WRONLY, 0o644)
        os.close(fd)
        assert p.store == "downloader"
    assert_untouched(outside, before)
    assert not (root / "img" / "stolen").exists()


def test_a_symlink_as_the_last_component_is_served_but_never_followed(device, views, outside):
    root = device.root
    view = views("redirect")
    os.symlink(outside / "target.img", root / "img" / device.web.legacy_name(0))
    before = snapshot(outside)
    name = f"img/{device.web.legacy_name(0)}"
    assert stat.S_ISLNK(view.lstat(name).st_mode)
    store, rel, _ = view.locate(name)
    assert store.readlink(rel) == str(outside / "target.img")
    for fn, args in ((store.open, (rel, os.O_RDONLY)),
                     (store.open, (rel, os.O_WRONLY | os.O_TRUNC)),
                     (store.truncate, (rel, 0))):
        with pytest.raises(OSError) as err:
            fn(*args)
        assert err.value.errno == errno.ELOOP
    store.chmod(rel, 0o777)  # a no-op on a link
    store.utime(rel, 1, 1)   # the link's own times
    view.rename(name, "img/moved")
    view.unlink("img/moved")
    assert_untouched(outside, before)


def test_recover_does_not_stop_at_a_planted_symlink(device, views, outside, tmp_path):
    """A record below a directory that became a symlink: recovery goes on
    with the other records and makes nothing through the link."""
    db = str(tmp_path / DB_NAME)
    root = device.root
    iid = device.image_id
    for area, rel in (("downloader", f"pending/{iid}/f"), ("verified", device.sha)):
        p = root / view_rel(area) / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(area.encode())
    crash(db, [
        Record(f"downloads/{OBJ}/pending/{iid}/f", "downloader", f"pending/{iid}/f", "pending",
               "new"),
        Record(f"downloads/baseOs.obj/verified/{device.sha.upper()}/f", "verified", device.sha,
               "verified", "new"),
    ])
    (root / "downloads").mkdir(exist_ok=True)
    os.symlink(outside, root / "downloads" / OBJ)
    before = snapshot(outside)
    view = reopen(views, db)
    done = recover(view)
    assert any("not recovered" in line for line in done), done
    assert_untouched(outside, before)
    # its bytes are still in the vault: the record stays for when the link is gone
    assert f"downloads/{OBJ}/pending/{iid}/f" in on_disk(db)
    assert (root / "downloads" / "baseOs.obj" / "verified" / device.sha.upper()).is_dir()
    assert view.listdir(f"downloads/baseOs.obj/verified/{device.sha.upper()}") == ["f"]


def view_rel(key: str) -> str:
    return Layout("/").rel(key)


@pytest.mark.parametrize("link,rules", [
    ("vault/verifier", DEFAULT_RULES), ("vault/compatfs", DEFAULT_RULES), ("clear", DEFAULT_RULES),
    ("novault", DESIGN_NOTE), ("downloads", DEFAULT_RULES), ("runx/pods", DEFAULT_RULES)])
def test_backing_never_opens_a_location_through_a_symlink(tmp_path, outside, link, rules):
    root = tmp_path / "persist"
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, root / link)
    layout = Layout(str(root), rules=rules)
    before = snapshot(outside)
    with pytest.raises(OSError) as err:
        Backing.open(layout, VIEWS, create_new=True, require_encrypted=False).close()
    assert err.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert snapshot(outside) == before
    os.unlink(root / link)
    Backing.open(layout, VIEWS, create_new=True, require_encrypted=False).close()
    assert (root / "vault" / "verifier" / "verifier").is_dir()
    assert_untouched(outside, before)
