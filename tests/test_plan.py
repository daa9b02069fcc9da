"""``compatfs plan``: every legacy object, where it belongs or why it stays."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from compatfs.config import Override
from compatfs.layout import Layout
from compatfs.names import DownloadArea, ObjType
from compatfs.plan import make_plan, render_text
from compatfs.resolver import Resolver
from compatfs.rules import OCI_LAYER_MEDIA_TYPE, path_escape, rules_for
from compatfs.testing import devicegen

from .conftest import layout_config, run_cli, tree_snapshot

DESIGN_NOTE = rules_for("design-note")


def plan_of(root: Path, overrides=(), rules=None):
    """The plan of *root* in layout eve 17.3 (the default), or under *rules*."""
    layout = Layout(str(root), rules=rules) if rules is not None else Layout(str(root))
    return make_plan(layout, Resolver(layout, tuple(overrides)))


def by_legacy(plan) -> dict:
    return {plan.layout.relpath(e.obj.path): e for e in plan.entries}


@pytest.mark.parametrize("rules", [None, DESIGN_NOTE], ids=["eve", "design-note"])
def test_demo_plan_places_every_kind(demo_root, rules):
    root, (web, db, pod, _) = demo_root
    entries = by_legacy(plan_of(root, rules=rules))
    qcow = entries[f"img/{web.legacy_name(0)}"]
    assert qcow.obj.kind == "vm-volume"
    assert qcow.target == str(root / "vault/volumes" / f"{web.drives[0].volume_uuid}#0.qcow2")
    assert qcow.action == "copy"
    clear = entries[f"img/{web.legacy_name(1, sha_upper=True)}"]
    clear_dir = "novault/volumes" if rules is DESIGN_NOTE else "clear/volumes"
    assert clear.target == str(root / clear_dir / f"{web.drives[1].volume_uuid}#0.raw")
    assert clear.action == "rename"  # same filesystem, no encryption boundary
    latched = entries[f"img/{db.legacy_name(0)}"]
    assert latched.target.endswith(f"{db.drives[0].volume_uuid}#1.raw")
    stale = entries[f"img/{db.legacy_name(0, purge=1)}"]
    assert stale.target is None and "stale" in stale.reason
    container = entries[f"runx/pods/prepared/{pod.legacy_name(0, container=True)}"]
    assert container.obj.kind == "oci-volume"
    assert container.target.endswith(f"{pod.drives[0].volume_uuid}#0.container")
    assert entries["img/notes.txt"].obj.kind == "other"
    assert "not a volume" in entries["img/notes.txt"].reason
    assert entries["containerd"].target == str(root / "vault/containerd")
    kinds = {e.obj.kind for e in entries.values()}
    assert kinds == {"vm-volume", "oci-volume", "pending", "verifier", "verified", "other"}


def test_design_note_downloads_map_into_the_agents_directories(demo_root):
    root, _ = demo_root
    for rel, e in by_legacy(plan_of(root, rules=DESIGN_NOTE)).items():
        if e.obj.kind == "verified":
            sha_dir = rel.split("/")[3]
            assert e.target == str(root / "vault/verifier/verified" / sha_dir.lower())
        elif e.obj.kind == "pending":
            assert e.target == str(root / "vault/downloader/pending" / "/".join(rel.split("/")[3:]))
        elif e.obj.kind == "verifier":
            assert e.target == str(root / "vault/verifier/verifier" / "/".join(rel.split("/")[3:]))


def test_eve_downloads_placed_as_the_release_reads_them(demo_root):
    """E10-E13 on the demo device: downloads in progress stay (by rule); the
    verified appImg.obj object is the fresh app's image (a raw disk image the
    checkpoint names), the baseOs.obj one is in no config."""
    root, (*_, fresh) = demo_root
    sha = fresh.drives[0].sha
    by_release = {}
    for release in ("11.7", "17.3"):
        by_release[release] = by_legacy(plan_of(root, rules=rules_for("eve", release)))
    for release, entries in by_release.items():
        kinds = {}
        for _rel, e in entries.items():
            kinds.setdefault(e.obj.kind, []).append(e)
            if e.obj.kind in ("pending", "verifier"):
                assert e.target is None and e.by_rule and e.action == "keep"
                assert "no EVE release reads" in e.reason
        assert len(kinds["pending"]) == 1 and len(kinds["verifier"]) == 1
        app_img = entries[f"downloads/appImg.obj/verified/{sha.upper()}/debian.qcow2"]
        base = next(e for r, e in entries.items() if r.startswith("downloads/baseOs.obj/verified/"))
        verified = root / "vault/verifier/verified"
        if release == "11.7":
            assert app_img.target == str(verified / sha)
            assert base.target == str(verified / base.obj.path.split("/")[-2].lower())
        else:
            assert app_img.target == str(verified / f"{sha}.{path_escape(OCI_LAYER_MEDIA_TYPE)}")
            assert base.target is None and base.by_rule
            assert "no name EVE 17.3 keeps can be derived" in base.reason


def test_bytes_are_allocated_not_apparent(demo_root):
    root, (web, *_) = demo_root
    e = by_legacy(plan_of(root))[f"img/{web.legacy_name(1, sha_upper=True)}"]
    assert os.stat(e.obj.path).st_size == 256 << 20
    assert 2 << 20 <= e.obj.bytes < 3 << 20


def test_plan_json_document_and_nothing_changes_on_disk(demo_root):
    root, _ = demo_root
    before = tree_snapshot(root)
    proc = run_cli("plan", "--root", str(root), "--json", check=True)
    assert tree_snapshot(root) == before
    doc = json.loads(proc.stdout)
    assert set(doc) >= {"objects", "totals"}
    assert doc["layout"] == "eve 17.3"
    for obj in doc["objects"]:
        assert set(obj) >= {"kind", "legacy", "target", "reason", "bytes"}
        assert obj["kind"] in {"vm-volume", "oci-volume", "pending", "verifier", "verified",
                               "other"}
        assert obj["target"] is not None or obj["reason"]  # placed, or why not
        assert not obj["legacy"].startswith("/")
        assert obj["target"] is None or not obj["target"].startswith("/")
    totals = doc["totals"]
    assert totals["objects"] == len(doc["objects"])
    assert totals["to_move"] == sum(o["target"] is not None for o in doc["objects"])
    vault = totals["destinations"]["vault_volumes"]
    assert vault["path"] == "vault/volumes" and vault["fits"] is True and vault["free"] > 0
    assert totals["destinations"]["clear_volumes"]["copy_bytes"] == 0
    assert "novault_volumes" not in totals["destinations"]


def test_plan_text_has_destination_totals(demo_root):
    root, _ = demo_root
    proc = run_cli("plan", "--root", str(root), check=True)
    assert "vault/volumes" in proc.stdout and "fits" in proc.stdout
    assert "stays: purge counter 1 is stale" in proc.stdout
    assert proc.stderr == ""


def test_same_target_twice_newest_wins(tmp_path):
    rng = __import__("random").Random(5)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "a",
                           [devicegen.DriveDef(devicegen.random_uuid(rng),
                                               devicegen.random_sha(rng))])
    devicegen.write_device_state(str(tmp_path), [app])
    lower = tmp_path / "img" / app.legacy_name(0)
    upper = tmp_path / "img" / app.legacy_name(0, sha_upper=True)
    devicegen.sparse_file(str(lower), 4096, {0: b"old"}, mtime=1_000_000)
    devicegen.sparse_file(str(upper), 4096, {0: b"new"}, mtime=2_000_000)
    entries = by_legacy(plan_of(tmp_path))
    assert entries[f"img/{upper.name}"].target is not None
    assert entries[f"img/{lower.name}"].target is None
    assert "is newer" in entries[f"img/{lower.name}"].reason


@pytest.mark.parametrize("layout", ["eve", "design-note"])
@pytest.mark.parametrize("dest_newer", [True, False])
def test_existing_destination_rule(tmp_path, dest_newer, layout):
    """eve: the destination always wins, the legacy copy is set aside; design-note:
    the newer wins (an older destination is set aside before the legacy copy is
    placed). The action says it, not only the reason."""
    rng = __import__("random").Random(6)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "a",
                           [devicegen.DriveDef(devicegen.random_uuid(rng),
                                               devicegen.random_sha(rng))])
    devicegen.write_device_state(str(tmp_path), [app])
    legacy = tmp_path / "img" / app.legacy_name(0)
    devicegen.sparse_file(str(legacy), 4096, {0: b"legacy"}, mtime=1_500_000)
    dest = tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.qcow2"
    dest_mtime = 2_000_000 if dest_newer else 1_000_000
    devicegen.sparse_file(str(dest), 4096, {0: b"dest"}, mtime=dest_mtime)
    lay = Layout(str(tmp_path), rules=rules_for(layout))
    plan = make_plan(lay, Resolver(lay, ()))
    e = by_legacy(plan)[f"img/{legacy.name}"]
    if layout == "eve" or dest_newer:
        assert e.action == "set-aside", e
        assert "set aside" in e.reason and ("newer" if dest_newer else "older") in e.reason
        assert plan.totals()["to_move"] == 0
    else:
        assert e.action == "copy" and "older" in e.reason and "set aside" in e.reason
    assert dest.read_bytes()[:4] == b"dest" and os.stat(dest).st_mtime_ns == dest_mtime * 10**9


def test_corrupt_checkpoint_leaves_volumes_unresolved(demo_root):
    root, _ = demo_root
    (root / "checkpoint/lastconfig").write_bytes(b"\xff\x00garbage" * 7)
    proc = run_cli("plan", "--root", str(root), "--json", check=True)
    doc = json.loads(proc.stdout)
    vols = [o for o in doc["objects"] if o["kind"] in ("vm-volume", "oci-volume")]
    assert vols and all(o["target"] is None for o in vols)
    assert all("checkpoint unusable" in o["reason"] for o in vols)
    assert any("checkpoint unusable" in p for p in doc["problems"])
    # EVE 17.3 names a verified object by a media type only the checkpoint gives
    verified = [o for o in doc["objects"] if o["kind"] == "verified"]
    assert verified and all(o["target"] is None and "checkpoint unusable" in o["reason"]
                            and o["by_rule"] for o in verified)
    text = run_cli("plan", "--root", str(root))
    assert text.returncode == 0 and "compatfs: warning: checkpoint unusable" in text.stderr
    assert "Traceback" not in text.stderr


def test_first_boot_without_checkpoint_is_not_an_error(demo_root):
    root, _ = demo_root
    os.unlink(root / "checkpoint/lastconfig")
    proc = run_cli("plan", "--root", str(root), "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["checkpoint"] is None and doc["problems"] == []
    vm = [o for o in doc["objects"] if o["kind"] == "vm-volume"]
    assert all("first boot" in o["reason"] for o in vm)


def test_bad_latch_file_is_reported_not_fatal(demo_root):
    root, (_, db, *_) = demo_root
    latch = root / "status/zedmanager/AppAndImageToHash"
    for f in latch.iterdir():
        f.write_text("{not json")
    doc = json.loads(run_cli("plan", "--root", str(root), "--json", check=True).stdout)
    e = next(o for o in doc["objects"] if o["legacy"] == f"img/{db.legacy_name(0)}")
    assert e["target"] is None and "matches no drive" in e["reason"]
    assert any("bad JSON" in p for p in doc["problems"])


def test_crafted_and_stray_names_stay(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    sha, app = "a" * 64, "12345678-1234-1234-1234-123456789abc"
    crafted = [f"{sha}-{app}#0.raw", f"{sha}-{app}#01.raw", f"{sha}-{app}.RAW",
               f"{sha[:-1]}-{app}.raw", f"{sha}-{app}#99999999999.raw", f"{sha}-..raw",
               f"{sha}-{app}"]
    for name in crafted:
        (img / name).write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.write_bytes(b"secret" * (1 << 18))
    (img / f"{'b' * 64}-{app}.raw").symlink_to(outside)
    (img / "subdir").mkdir()
    entries = by_legacy(plan_of(tmp_path))
    assert len(entries) == len(crafted) + 2
    for rel, e in entries.items():
        assert e.obj.kind == "other" and e.target is None and e.reason, rel
    link = entries[f"img/{'b' * 64}-{app}.raw"]
    assert "symbolic link" in link.reason and link.obj.bytes < 1 << 20  # the link, not its target


def test_verified_dir_with_two_files_places_one(tmp_path):
    data = b"verified object"
    sha = devicegen.sha_of(data)
    devicegen.download_file(str(tmp_path), ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "a.img",
                            data)
    devicegen.download_file(str(tmp_path), ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "b.img",
                            data)
    entries = plan_of(tmp_path, rules=rules_for("eve", "11.7")).entries
    assert [e.target is not None for e in entries] == [True, False]
    assert "more than one file" in entries[1].reason


def test_two_object_types_same_sha_claim_one_target(tmp_path):
    data = b"same bytes"
    sha = devicegen.sha_of(data)
    devicegen.download_file(str(tmp_path), ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "a", data)
    devicegen.download_file(str(tmp_path), ObjType.BASE_OS, DownloadArea.VERIFIED, sha, "b", data)
    entries = plan_of(tmp_path, rules=rules_for("eve", "11.7")).entries
    assert sum(e.target is not None for e in entries) == 1


def test_override_places_an_unknown_app(tmp_path):
    sha = "c" * 64
    app, vol = "12345678-1234-1234-1234-123456789abc", "87654321-4321-4321-4321-cba987654321"
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / f"{sha}-{app}.vhdx").write_bytes(b"x")
    assert plan_of(tmp_path).entries[0].target is None
    e = plan_of(tmp_path, [Override(app, sha, vol, 3, True)]).entries[0]
    assert e.target == str(tmp_path / "clear/volumes" / f"{vol}#3.vhdx")
    e = plan_of(tmp_path, [Override(app, sha, vol, 3, True)], DESIGN_NOTE).entries[0]
    assert e.target == str(tmp_path / "novault/volumes" / f"{vol}#3.vhdx")


@pytest.fixture
def small_vault(tmp_path):
    """tmp_path/persist with a 1 MiB tmpfs mounted at vault/ (needs root)."""
    root = tmp_path / "persist"
    (root / "vault").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root / "vault")],
                   check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root / "vault")], check=False)


@pytest.mark.root
def test_destination_too_small_does_not_fit(small_vault):
    root = small_vault
    rng = __import__("random").Random(8)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "big",
                           [devicegen.DriveDef(devicegen.random_uuid(rng),
                                               devicegen.random_sha(rng), "raw")])
    devicegen.write_device_state(str(root), [app])
    devicegen.sparse_file(str(root / "img" / app.legacy_name(0)), 8 << 20, {0: b"z" * (4 << 20)})
    plan = plan_of(root)
    dest = plan.destinations["vault_volumes"]
    assert dest.copy_bytes >= 4 << 20 and dest.free <= 1 << 20
    assert dest.fits is False
    assert plan.destinations["clear_volumes"].fits is True
    assert "NO" in render_text(plan)


def test_missing_root_is_a_clear_error(tmp_path):
    proc = run_cli("plan", "--root", str(tmp_path / "nope"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("compatfs: error:") and "not a directory" in proc.stderr


def test_demo_command_runs(tmp_path):
    proc = run_cli("demo", "--dir", str(tmp_path / "d"), "--json", check=True)
    doc = json.loads(proc.stdout)
    # eve 17.3: four volumes, the verified appImg.obj image and containerd/; the
    # downloads in progress and the verified baseOs.obj object stay by rule
    assert doc["layout"] == "eve 17.3"
    assert doc["totals"]["to_move"] == 6
    assert (tmp_path / "d" / "checkpoint/lastconfig").exists()
    again = run_cli("demo", "--dir", str(tmp_path / "d"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_demo_shows_both_layouts(tmp_path):
    """The demo's plan (eve 17.3), then what the design note's layout does differently."""
    proc = run_cli("demo", "--plan-only", check=True)
    head, _, compared = proc.stdout.partition("the same device under layout design-note "
                                              "(only what differs from eve 17.3):")
    assert "target layout eve 17.3" in head.splitlines()[0]
    assert compared, proc.stdout
    blocks = [ln for ln in compared.splitlines() if ln.startswith("   ") and ln[3] != " "]
    assert "-> clear/volumes/" in compared and "-> novault/volumes/" in compared
    assert "eve 17.3:    stays: a download in progress stays in the legacy store" in compared
    assert "design-note: -> vault/downloader/pending/" in compared
    assert ".application%2Fvnd.oci.image.layer.v1.tar+gzip" in compared
    assert "img/notes.txt" not in compared and len(blocks) == 5     # what differs only
    older = run_cli("demo", "--plan-only", "--config",
                    str(layout_config(tmp_path, "eve", "7.10")), check=True).stdout
    assert "only what differs from eve 7.10" in older
    assert "eve 7.10:    stays: EVE 7.10 runs its own containerd" in older


def test_four_suffixes_for_one_drive_place_only_the_configured_format(tmp_path):
    rng = __import__("random").Random(9)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "fmt",
                           [devicegen.DriveDef(devicegen.random_uuid(rng),
                                               devicegen.random_sha(rng), "qcow2")])
    devicegen.write_device_state(str(tmp_path), [app])
    stem = app.legacy_name(0)[:-len(".qcow2")]
    for suffix in ("qcow2", "raw", "vhdx", "img"):
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / f"{stem}.{suffix}").write_bytes(suffix.encode())
    plan = plan_of(tmp_path)
    entries = by_legacy(plan)
    placed = [rel for rel, e in entries.items() if e.target is not None]
    assert placed == [f"img/{stem}.qcow2"]
    for suffix in ("raw", "vhdx", "img"):
        e = entries[f"img/{stem}.{suffix}"]
        assert e.action == "keep" and "qcow2" in e.reason
        assert f"stays: format {suffix} does not match" in render_text(plan)


@pytest.mark.parametrize("command", ["plan", "status"])
def test_fifo_checkpoint_is_a_problem_reported_promptly(demo_root, command):
    """A FIFO at checkpoint/lastconfig used to block open(2) for reading forever."""
    import sys

    root, (web, *_rest) = demo_root
    lastconfig = root / "checkpoint" / "lastconfig"
    lastconfig.unlink()
    os.mkfifo(lastconfig)
    env = {k: v for k, v in os.environ.items() if k != "COMPATFS_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "compatfs", command, "--root", str(root)],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (f"problem: checkpoint unusable: {lastconfig}: is a FIFO, not a regular file"
            in proc.stdout)
    assert "checkpoint unusable" in proc.stdout.split(web.legacy_name(0))[1].splitlines()[1]


def test_names_with_control_characters_cannot_drive_the_terminal_or_forge_lines(demo_root):
    root, _ = demo_root
    (root / "img" / "e\x1b[31mred\nforged line").write_bytes(b"x")
    for command in ("plan", "status"):
        proc = run_cli(command, "--root", str(root))
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout
        [line] = [ln for ln in proc.stdout.splitlines() if "31mred" in ln]
        assert "e\\x1b[31mred\\x0aforged line" in line
        assert not any(ln.startswith("forged line") for ln in proc.stdout.splitlines())


@pytest.mark.parametrize("layout,release,name", [("eve", None, "eve 17.3"),
                                                 ("eve", "7.10", "eve 7.10"),
                                                 ("design-note", None, "design-note")])
def test_plan_names_the_target_layout(demo_root, tmp_path, layout, release, name):
    root, _ = demo_root
    cfg = str(layout_config(tmp_path, layout, release))
    text = run_cli("plan", "--root", str(root), "--config", cfg, check=True).stdout
    assert text.splitlines()[0] == f"compatfs plan for {root}, target layout {name}"
    doc = json.loads(run_cli("plan", "--root", str(root), "--config", cfg, "--json",
                             check=True).stdout)
    assert doc["layout"] == name
    containerd = next(o for o in doc["objects"] if o["legacy"] == "containerd")
    if release == "7.10":      # E14: that release's system containerd root stays
        assert containerd["target"] is None and containerd["by_rule"]
        assert "EVE 7.10 runs its own containerd" in containerd["reason"]
    else:
        assert containerd["target"] == "vault/containerd"


def test_plan_lists_a_generation_mismatch_as_a_problem(tmp_path):
    rng = __import__("random").Random(11)
    app = devicegen.AppDef(devicegen.random_uuid(rng), "gen",
                           [devicegen.DriveDef(devicegen.random_uuid(rng),
                                               devicegen.random_sha(rng), "raw", generation=3)])
    resp = devicegen.build_config([app])
    resp.config.apps[0].volumeRefList[0].generationCount = 2
    devicegen.write_atomic(str(tmp_path / "checkpoint/lastconfig"),
                           devicegen.encode_checkpoint(resp))
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"v"})
    proc = run_cli("plan", "--root", str(tmp_path), check=True)
    assert "problem: drive 0 of app" in proc.stdout and "generation 2" in proc.stdout
    assert f"{app.drives[0].volume_uuid}#3.raw" in proc.stdout


def test_destinations_are_those_of_the_target_layout(tmp_path) -> None:
    """eve moves no download in progress, so its plan lists no location for them."""
    from compatfs.layout import Layout
    from compatfs.plan import destinations
    from compatfs.rules import rules_for

    eve = destinations(Layout(str(tmp_path), rules=rules_for("eve")))
    note = destinations(Layout(str(tmp_path), rules=rules_for("design-note")))
    assert eve == ("vault_volumes", "clear_volumes", "verified", "cas")
    assert note == ("vault_volumes", "novault_volumes", "downloader", "verifier", "verified",
                    "cas")
