"""Resolution rules (``compatfs.resolver``), one test per rule.

Each device is built in tmp_path with compatfs.testing.devicegen: a real protobuf
checkpoint and zedmanager's latch files, resolved through a Layout over it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from compatfs.config import Override
from compatfs.layout import Layout
from compatfs.names import DownloadArea, ObjType, parse_container_volume, parse_vm_volume
from compatfs.resolver import Resolution, Resolver
from compatfs.rules import OCI_LAYER_MEDIA_TYPE, rules_for
from compatfs.testing import devicegen
from compatfs.testing.devicegen import AppDef, DriveDef

DESIGN_NOTE = rules_for("design-note")


# -- helpers -------------------------------------------------------------------

class Ids:
    """Deterministic UUIDs and shas."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def uuid(self) -> str:
        return devicegen.random_uuid(self.rng)

    def sha(self) -> str:
        return devicegen.random_sha(self.rng)


@pytest.fixture
def ids() -> Ids:
    return Ids(42)


def resolver_for(root: Path, apps: list[AppDef], overrides=(), rules=None, **kw) -> Resolver:
    """A resolver over *apps*' checkpoint and latch, in layout eve 17.3 unless *rules*."""
    devicegen.write_device_state(str(root), apps, **kw)
    return Resolver(layout_of(root, rules), tuple(overrides))


def layout_of(root: Path, rules=None) -> Layout:
    return Layout(str(root), rules=rules) if rules is not None else Layout(str(root))


def write_config(root: Path, resp, name: str = "lastconfig", wrap: bool = False) -> None:
    devicegen.write_atomic(str(root / "checkpoint" / name),
                           devicegen.encode_checkpoint(resp, wrap=wrap))


def latch_dir(root: Path) -> str:
    return Layout(str(root)).path("latch")


def vm(r: Resolver, name: str) -> Resolution:
    return r.resolve_vm(parse_vm_volume(name))


def vault(root: Path, name: str) -> str:
    return str(root / "vault" / "volumes" / name)


def novault(root: Path, name: str) -> str:
    return str(root / "novault" / "volumes" / name)


def clear(root: Path, name: str) -> str:
    return str(root / "clear" / "volumes" / name)


def assert_unresolved(res: Resolution, *words: str) -> None:
    assert not res.resolved, res
    assert res.target is None and res.volume is None
    assert res.reason
    for w in words:
        assert w in res.reason, (w, res.reason)


# -- rule 1: drive i pairs with volumeRefList[i] --------------------------------

def test_drive_i_pairs_with_volume_ref_i(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=1)
    d1 = DriveDef(ids.uuid(), ids.sha(), "raw", generation=2)
    app = AppDef(ids.uuid(), "two", [d0, d1])
    r = resolver_for(tmp_path, [app])
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{d0.volume_uuid}#1.qcow2")
    assert vm(r, app.legacy_name(1)).target == vault(tmp_path, f"{d1.volume_uuid}#2.raw")

    # swap the references (not the drives): the pairing must follow the index
    resp = devicegen.build_config([app])
    refs = resp.config.apps[0].volumeRefList
    first, second = refs[0].__deepcopy__(), refs[1].__deepcopy__()
    refs[0].CopyFrom(second)
    refs[1].CopyFrom(first)
    write_config(tmp_path, resp)
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{d1.volume_uuid}#2.qcow2")
    assert vm(r, app.legacy_name(1)).target == vault(tmp_path, f"{d0.volume_uuid}#1.raw")


# -- rule 2: the purge counter applies to the first drive only ------------------

def test_purge_counter_applies_to_first_drive_only(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    d1 = DriveDef(ids.uuid(), ids.sha(), "raw")
    app = AppDef(ids.uuid(), "purged", [d0, d1], purge=3)
    r = resolver_for(tmp_path, [app])

    assert "#3" in app.legacy_name(0) and "#" not in app.legacy_name(1)
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{d0.volume_uuid}#0.qcow2")
    assert vm(r, app.legacy_name(1)).target == vault(tmp_path, f"{d1.volume_uuid}#0.raw")
    # drive 1 under the app's purge counter is not what old EVE wrote
    assert_unresolved(vm(r, app.legacy_name(1, purge=3)), "purge counter 3", "stale")
    # drive 0 without its purge counter is the pre-purge copy
    assert_unresolved(vm(r, app.legacy_name(0, purge=0)), "purge counter 0", "stale")


def test_latch_lookup_uses_the_drives_own_purge_counter(tmp_path, ids):
    """Drive 0 is latched under the app's purge counter, drive 1 under 0."""
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2", sha_in_image=False, in_latch=True)
    d1 = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False, in_latch=True)
    app = AppDef(ids.uuid(), "latched", [d0, d1], purge=2)
    r = resolver_for(tmp_path, [app])
    names = sorted(os.listdir(latch_dir(tmp_path)))
    assert f"{app.uuid}.{d0.image_uuid}.2.json" in names
    assert f"{app.uuid}.{d1.image_uuid}.json" in names
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{d0.volume_uuid}#0.qcow2")
    assert vm(r, app.legacy_name(1)).target == vault(tmp_path, f"{d1.volume_uuid}#0.raw")


# -- rule 3: where the sha comes from -------------------------------------------

def test_sha_from_image_wins_over_latch(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "img", [drive])
    other = ids.sha()
    devicegen.write_latch(latch_dir(tmp_path), app.uuid, drive.image_uuid, other, 0)
    r = resolver_for(tmp_path, [app])
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#0.qcow2")
    assert_unresolved(vm(r, f"{other}-{app.uuid}.qcow2"), "matches no drive")


def test_sha_from_latch_when_image_has_none(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False, in_latch=True)
    app = AppDef(ids.uuid(), "latch", [drive], purge=1)
    r = resolver_for(tmp_path, [app])
    res = vm(r, app.legacy_name(0))
    assert res.target == vault(tmp_path, f"{drive.volume_uuid}#0.raw")
    assert r.problems == ()


@pytest.mark.parametrize("wrong", ["purge", "image", "app"])
def test_latch_entry_for_another_key_does_not_apply(tmp_path, ids, wrong):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False)
    app = AppDef(ids.uuid(), "latch", [drive], purge=2)
    key = {"app": app.uuid, "image": drive.image_uuid, "purge": 2}
    key[wrong] = 1 if wrong == "purge" else ids.uuid()
    devicegen.write_latch(latch_dir(tmp_path), key["app"], key["image"], drive.sha, key["purge"])
    r = resolver_for(tmp_path, [app])
    assert_unresolved(vm(r, app.legacy_name(0)), "matches no drive", "no sha")
    # the right key makes the same name resolve
    devicegen.write_latch(latch_dir(tmp_path), app.uuid, drive.image_uuid, drive.sha, 2)
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).resolved


def test_sha_from_content_tree_when_image_and_latch_have_none(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", sha_in_image=False, content_tree=True)
    app = AppDef(ids.uuid(), "tree", [drive])
    r = resolver_for(tmp_path, [app])
    assert r.config.apps[0].drives[0].sha == ""
    vol = r.config.volumes[drive.volume_uuid]
    assert r.config.content_trees[vol.content_tree].sha == drive.sha
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#0.qcow2")


def test_content_tree_is_found_through_download_content_tree_id(tmp_path, ids):
    """The tree named by origin.downloadContentTreeID, not any other tree."""
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", sha_in_image=False, content_tree=True)
    app = AppDef(ids.uuid(), "tree", [drive])
    resp = devicegen.build_config([app])
    decoy = resp.config.contentInfo.add()
    decoy.uuid = ids.uuid()
    decoy.sha256 = ids.sha()
    # point the volume at the decoy instead
    resp.config.volumes[0].origin.downloadContentTreeID = decoy.uuid.upper()
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert_unresolved(vm(r, app.legacy_name(0)), "matches no drive")
    assert vm(r, f"{decoy.sha256}-{app.uuid}.qcow2").target == \
        vault(tmp_path, f"{drive.volume_uuid}#0.qcow2")


def test_latch_wins_over_content_tree(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False, content_tree=True)
    app = AppDef(ids.uuid(), "both", [drive])
    latched = ids.sha()
    devicegen.write_latch(latch_dir(tmp_path), app.uuid, drive.image_uuid, latched, 0)
    r = resolver_for(tmp_path, [app])
    assert vm(r, f"{latched}-{app.uuid}.raw").target == vault(tmp_path,
                                                              f"{drive.volume_uuid}#0.raw")
    assert_unresolved(vm(r, app.legacy_name(0)), "matches no drive")


# -- rule 5: case-insensitive sha -----------------------------------------------

def test_sha_compared_case_insensitively(tmp_path, ids):
    lower = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    upper = DriveDef(ids.uuid(), ids.sha().upper(), "raw")   # the controller sent upper case
    app = AppDef(ids.uuid(), "case", [lower, upper])
    r = resolver_for(tmp_path, [app])
    assert vm(r, app.legacy_name(0, sha_upper=True)).target == \
        vault(tmp_path, f"{lower.volume_uuid}#0.qcow2")
    assert vm(r, f"{upper.sha.lower()}-{app.uuid}.raw").target == \
        vault(tmp_path, f"{upper.volume_uuid}#0.raw")
    mixed = upper.sha[:32].lower() + upper.sha[32:]
    assert vm(r, f"{mixed}-{app.uuid.upper()}.raw").resolved


# -- rule 4 and the new name ------------------------------------------------------

def test_design_note_clear_text_means_novault_and_generation_comes_from_volume_ref(tmp_path, ids):
    secret = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=4)
    clear = DriveDef(ids.uuid(), ids.sha(), "vhdx", clear_text=True, generation=0)
    app = AppDef(ids.uuid(), "vaults", [secret, clear])
    resp = devicegen.build_config([app])
    # the volumes' own counters disagree with the references: the reference wins
    for vol in resp.config.volumes:
        vol.generationCount = 9
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    assert r.problems == ()      # the design note takes the reference's: nothing to report

    res = vm(r, app.legacy_name(0))
    assert res.target == vault(tmp_path, f"{secret.volume_uuid}#4.qcow2")
    assert res.location == "vault_volumes"
    assert res.volume.clear_text is False and res.volume.origin == "checkpoint"
    res = vm(r, app.legacy_name(1))
    assert res.target == novault(tmp_path, f"{clear.volume_uuid}#0.vhdx")
    assert res.location == "novault_volumes"
    assert res.volume.clear_text is True


def test_eve_clear_text_means_clear_volumes_and_generation_comes_from_volume(tmp_path, ids):
    """E1, E2: volumemgr names a volume by Volume.generationCount, in
    clear/volumes when it is clear_text; a VolumeRef that says another
    generation is reported, not followed."""
    secret = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=4)
    plain = DriveDef(ids.uuid(), ids.sha(), "vhdx", clear_text=True, generation=0)
    app = AppDef(ids.uuid(), "vaults", [secret, plain])
    resp = devicegen.build_config([app])
    resp.config.volumes[0].generationCount = 9      # the reference still says 4
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert r.layout.rules.name == "eve 17.3"

    res = vm(r, app.legacy_name(0))
    assert res.target == vault(tmp_path, f"{secret.volume_uuid}#9.qcow2")
    assert res.volume.generation == 9
    res = vm(r, app.legacy_name(1))
    assert res.target == clear(tmp_path, f"{plain.volume_uuid}#0.vhdx")
    assert res.location == "clear_volumes" and res.volume.clear_text is True
    # the mismatch is a problem (plan and status list it), the matching one is not
    [problem] = r.problems
    assert "drive 0 of app" in problem and secret.volume_uuid in problem
    assert "generation 4" in problem and "itself 9" in problem and "#9" in problem
    # the same device in the design note's layout: the reference's, no problem
    dn = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    assert vm(dn, app.legacy_name(0)).target == vault(tmp_path, f"{secret.volume_uuid}#4.qcow2")
    assert dn.problems == ()


def test_eve_volume_uuid_is_lower_case_whatever_the_config_says(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=2)
    app = AppDef(ids.uuid(), "upper", [drive])
    resp = devicegen.build_config([app])
    resp.config.apps[0].volumeRefList[0].uuid = drive.volume_uuid.upper()
    resp.config.volumes[0].uuid = drive.volume_uuid.upper()
    write_config(tmp_path, resp)
    res = vm(Resolver(Layout(str(tmp_path))), app.legacy_name(0))
    assert res.target == vault(tmp_path, f"{drive.volume_uuid.lower()}#2.qcow2")


def test_generation_mismatch_problem_goes_when_the_counters_meet(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", generation=1)
    app = AppDef(ids.uuid(), "gen", [drive])
    resp = devicegen.build_config([app])
    resp.config.apps[0].volumeRefList[0].generationCount = 2
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert len(r.problems) == 1 and "generation 2" in r.problems[0]
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#1.raw")
    write_config(tmp_path, devicegen.build_config([app]))
    assert r.refresh() is True and r.problems == ()


def test_negative_volume_generation_is_unresolved_in_eve(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", generation=3)
    app = AppDef(ids.uuid(), "neg", [drive])
    resp = devicegen.build_config([app])
    resp.config.volumes[0].generationCount = -1
    write_config(tmp_path, resp)
    assert_unresolved(vm(Resolver(Layout(str(tmp_path))), app.legacy_name(0)),
                      "negative generation counter -1")
    # the design note reads the reference's (3)
    dn = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    assert dn.resolve_vm(parse_vm_volume(app.legacy_name(0))).target == \
        vault(tmp_path, f"{drive.volume_uuid}#3.raw")


@pytest.mark.parametrize("rules", [None, DESIGN_NOTE], ids=["eve", "design-note"])
def test_suffix_that_is_not_a_format_name_is_kept_by_rule(tmp_path, ids, rules):
    """E3: EVE names a volume by a Format enum name; an override without a
    format accepts any suffix of the legacy grammar, but only a Format name
    is placed (and a new one is made in the legacy store, not parked)."""
    app, sha, vol = ids.uuid(), ids.sha(), ids.uuid()
    r = Resolver(layout_of(tmp_path, rules), (Override(app, sha, vol, 1),))
    assert vm(r, f"{sha}-{app}.vhdx").resolved
    res = vm(r, f"{sha}-{app}.img")
    assert_unresolved(res, "suffix .img is not a volume format", "qcow2")
    assert res.by_rule is True
    assert vm(r, f"{ids.sha()}-{app}.raw").by_rule is False    # not mapped yet: not by rule


def test_format_of_new_name_is_the_legacy_suffix(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "vmdk")
    app = AppDef(ids.uuid(), "fmt", [drive])
    r = resolver_for(tmp_path, [app])
    assert vm(r, f"{drive.sha}-{app.uuid}.vmdk").target == \
        vault(tmp_path, f"{drive.volume_uuid}#0.vmdk")


# -- rule 6: the format must be the drive's ----------------------------------------

def test_only_the_suffix_of_the_drives_format_is_placed(tmp_path, ids):
    """Four suffixes for one drive: one volume, three names left with the reason."""
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "fmt", [drive])
    r = resolver_for(tmp_path, [app])
    assert vm(r, f"{drive.sha}-{app.uuid}.qcow2").target == \
        vault(tmp_path, f"{drive.volume_uuid}#0.qcow2")
    for other in ("raw", "vhdx", "img", "qcow"):
        assert_unresolved(vm(r, f"{drive.sha}-{app.uuid}.{other}"),
                          f"format {other} does not match", "drive 0 of app", "qcow2")


def test_format_comes_from_the_content_tree_when_the_image_has_none(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False, content_tree=True)
    app = AppDef(ids.uuid(), "tree", [drive])
    resp = devicegen.build_config([app])
    resp.config.apps[0].drives[0].image.iformat = 0   # FmtUnknown
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#0.raw")
    assert_unresolved(vm(r, f"{drive.sha}-{app.uuid}.qcow2"), "is raw")


def test_no_format_in_the_config_places_no_suffix(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw")
    app = AppDef(ids.uuid(), "nofmt", [drive])
    resp = devicegen.build_config([app])
    resp.config.apps[0].drives[0].image.iformat = 0
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert_unresolved(vm(r, app.legacy_name(0)), "gives no format", "drive 0", ".raw")


def test_container_directory_and_container_file_need_a_container_drive(tmp_path, ids):
    disk = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    pod = DriveDef(ids.uuid(), ids.sha(), "container")
    app = AppDef(ids.uuid(), "mixed", [disk, pod])
    r = resolver_for(tmp_path, [app])
    as_dir = r.resolve_container(parse_container_volume(f"{disk.sha}-{app.uuid}"))
    assert_unresolved(as_dir, "format container does not match", "qcow2")
    assert r.resolve_container(parse_container_volume(f"{pod.sha}-{app.uuid}")).resolved
    # a file named .container would collide with the directory's new name
    assert_unresolved(vm(r, f"{pod.sha}-{app.uuid}.container"), "directory")


def test_override_format(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    stranger, sha, vol = ids.uuid(), ids.sha(), ids.uuid()
    r = resolver_for(tmp_path, [app], overrides=[
        Override(app.uuid, drive.sha, vol),                   # format from the checkpoint
        Override(stranger, sha, vol, 1, format="vhdx"),       # format given
    ])
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{vol}#0.qcow2")
    assert_unresolved(vm(r, f"{drive.sha}-{app.uuid}.raw"), "the override", "qcow2")
    assert vm(r, f"{sha}-{stranger}.vhdx").target == vault(tmp_path, f"{vol}#1.vhdx")
    assert_unresolved(vm(r, f"{sha}-{stranger}.raw"), "does not match", "vhdx")


def test_container_name_resolves_to_container_volume(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "container", sha_in_image=False, content_tree=True,
                     generation=2)
    app = AppDef(ids.uuid(), "pod", [drive], purge=1)
    r = resolver_for(tmp_path, [app])
    name = app.legacy_name(0, container=True)
    assert name.endswith("#1") and "." not in name
    res = r.resolve_container(parse_container_volume(name))
    assert res.target == vault(tmp_path, f"{drive.volume_uuid}#2.container")
    assert res.location == "vault_volumes"


# -- what stays where it is --------------------------------------------------------

def test_sha_mismatch_is_unresolved(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app])
    stranger = ids.sha()
    assert_unresolved(vm(r, f"{stranger}-{app.uuid}.qcow2"), stranger[:12], "matches no drive",
                      app.uuid)


def test_unknown_app_is_unresolved(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app])
    stranger = ids.uuid()
    # same sha, other app: the app is part of the key
    assert_unresolved(vm(r, f"{drive.sha}-{stranger}.qcow2"), stranger,
                      "not in the checkpointed config")


def test_stale_purge_counter_is_unresolved(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw")
    app = AppDef(ids.uuid(), "app", [drive], purge=5)
    r = resolver_for(tmp_path, [app])
    assert vm(r, app.legacy_name(0)).resolved
    for old in (0, 4, 6):
        assert_unresolved(vm(r, app.legacy_name(0, purge=old)), f"purge counter {old}",
                          "stale", "5")


def test_drive_without_volume_ref_is_unresolved(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    d1 = DriveDef(ids.uuid(), ids.sha(), "raw")
    app = AppDef(ids.uuid(), "app", [d0, d1])
    resp = devicegen.build_config([app])
    del resp.config.apps[0].volumeRefList[1]
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert vm(r, app.legacy_name(0)).resolved
    assert_unresolved(vm(r, app.legacy_name(1)), "drive 1", "no volumeRefList entry")


def test_volume_ref_to_undefined_volume_is_unresolved(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [d0])
    resp = devicegen.build_config([app])
    del resp.config.volumes[0]
    write_config(tmp_path, resp)
    r = Resolver(Layout(str(tmp_path)))
    assert_unresolved(vm(r, app.legacy_name(0)), d0.volume_uuid, "does not define")


def test_negative_generation_is_unresolved(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=-1)
    app = AppDef(ids.uuid(), "app", [d0])
    r = resolver_for(tmp_path, [app])
    assert_unresolved(vm(r, app.legacy_name(0)), "negative generation")


def test_app_without_valid_uuid_is_a_problem(tmp_path, ids):
    d0 = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    good = AppDef(ids.uuid(), "good", [d0])
    bad = AppDef("not-a-uuid", "bad", [DriveDef(ids.uuid(), ids.sha())])
    r = resolver_for(tmp_path, [bad, good])
    assert vm(r, good.legacy_name(0)).resolved
    assert any("not-a-uuid" in p for p in r.problems)


# -- rule 7: overrides -------------------------------------------------------------

@pytest.mark.parametrize("rules", [None, DESIGN_NOTE], ids=["eve", "design-note"])
def test_override_wins_over_checkpoint(tmp_path, ids, rules):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", generation=1)
    app = AppDef(ids.uuid(), "app", [drive])
    other_vol = ids.uuid()
    ov = Override(app.uuid, drive.sha, other_vol, generation=7, clear_text=True)
    r = resolver_for(tmp_path, [app], overrides=[ov], rules=rules)
    res = vm(r, app.legacy_name(0, sha_upper=True))
    where = novault if rules is DESIGN_NOTE else clear
    assert res.target == where(tmp_path, f"{other_vol}#7.qcow2")
    assert res.volume.origin == "override"
    # without the override the checkpoint's answer comes back
    plain = Resolver(layout_of(tmp_path, rules))
    assert vm(plain, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#1.qcow2")


def test_override_maps_what_the_checkpoint_cannot(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive], purge=4)
    stranger_app, stranger_sha, vol = ids.uuid(), ids.sha(), ids.uuid()
    ov = Override(stranger_app, stranger_sha, vol)
    r = resolver_for(tmp_path, [app], overrides=[ov])
    res = vm(r, f"{stranger_sha}-{stranger_app}.raw")
    assert res.target == vault(tmp_path, f"{vol}#0.raw")
    # an override is keyed by (app, sha): any purge counter of that pair
    assert vm(r, f"{stranger_sha}-{stranger_app}#3.raw").target == vault(tmp_path, f"{vol}#0.raw")


def test_override_applies_without_a_checkpoint(tmp_path, ids):
    app, sha, vol = ids.uuid(), ids.sha(), ids.uuid()
    r = Resolver(Layout(str(tmp_path)), (Override(app, sha, vol, 3),))
    assert vm(r, f"{sha}-{app}.qcow2").target == vault(tmp_path, f"{vol}#3.qcow2")
    assert_unresolved(vm(r, f"{ids.sha()}-{app}.qcow2"), "first boot")


# -- no checkpoint, bad checkpoint --------------------------------------------------

def test_no_checkpoint_is_first_boot_not_an_error(tmp_path, ids):
    r = Resolver(Layout(str(tmp_path)))
    assert r.checkpoint_path is None
    assert r.problems == ()
    res = vm(r, f"{ids.sha()}-{ids.uuid()}.qcow2")
    assert_unresolved(res, "first boot")
    res = r.resolve_container(parse_container_volume(f"{ids.sha()}-{ids.uuid()}#2"))
    assert_unresolved(res, "first boot")


@pytest.mark.parametrize("content", [b"\xff\xfe\xfd not protobuf", b""], ids=["garbage", "empty"])
def test_corrupt_checkpoint_is_unusable_and_reported(tmp_path, ids, content):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    devicegen.write_device_state(str(tmp_path), [app])
    path = tmp_path / "checkpoint" / "lastconfig"
    devicegen.write_atomic(str(path), content)
    r = Resolver(Layout(str(tmp_path)))
    assert_unresolved(vm(r, app.legacy_name(0)), "checkpoint unusable")
    assert len(r.problems) == 1
    assert r.problems[0].startswith("checkpoint unusable")
    assert str(path) in r.problems[0]


@pytest.mark.parametrize("make", ["fifo", "symlink-out"])
def test_checkpoint_that_is_not_a_regular_file_is_a_problem_not_a_hang(tmp_path, ids, make):
    """A FIFO at lastconfig would block open(2) forever; a link out of the root is not
    followed. Either is reported; a later real checkpoint is picked up."""
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    devicegen.write_device_state(str(tmp_path), [app])
    path = tmp_path / "checkpoint" / "lastconfig"
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    os.replace(path, outside / "lastconfig")
    if make == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(outside / "lastconfig")
    r = Resolver(Layout(str(tmp_path)))      # returns: nothing blocks
    assert_unresolved(vm(r, app.legacy_name(0)), "checkpoint unusable", "not a regular file")
    assert len(r.problems) == 1 and str(path) in r.problems[0]
    assert r.refresh() is False              # unchanged: not read again
    os.unlink(path)
    devicegen.write_atomic(str(path), (outside / "lastconfig").read_bytes())
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).resolved and r.problems == ()


def test_linked_checkpoint_and_latch_directories_are_not_followed(tmp_path, ids):
    """A link on the way (checkpoint/ or the latch directory) may lead out of the
    root: nothing is read through it."""
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", sha_in_image=False, in_latch=True)
    app = AppDef(ids.uuid(), "app", [drive])
    root = tmp_path / "persist"
    devicegen.write_device_state(str(root), [app])
    outside = tmp_path / "outside"
    outside.mkdir()
    for rel in ("checkpoint", "status/zedmanager/AppAndImageToHash"):
        os.rename(root / rel, outside / os.path.basename(rel))
        (root / rel).symlink_to(outside / os.path.basename(rel))
    r = Resolver(Layout(str(root)))
    assert_unresolved(vm(r, app.legacy_name(0)), "checkpoint unusable", "symbolic link")
    assert len(r.problems) == 2, r.problems
    assert all("goes through a symbolic link; not followed" in p for p in r.problems)


def test_latch_file_that_is_a_fifo_is_a_problem(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2", sha_in_image=False, in_latch=True)
    other = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False, in_latch=True)
    app = AppDef(ids.uuid(), "app", [drive, other])
    devicegen.write_device_state(str(tmp_path), [app])
    fifo = Path(latch_dir(tmp_path)) / f"{app.uuid}.{drive.image_uuid}.json"
    fifo.unlink()
    os.mkfifo(fifo)
    r = Resolver(Layout(str(tmp_path)))
    assert vm(r, app.legacy_name(1)).resolved
    assert not vm(r, app.legacy_name(0)).resolved
    assert len(r.problems) == 1 and str(fifo) in r.problems[0] and "FIFO" in r.problems[0]


def test_ctl_reload_rereads_an_unchanged_checkpoint(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app])
    before = r.snapshot
    assert r.refresh() is False and r.snapshot is before
    r.invalidate()
    assert r.refresh() is True and r.snapshot is not before
    assert r.snapshot.config == before.config


def test_latch_problems_are_listed(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    devicegen.write_device_state(str(tmp_path), [app])
    bad = Path(latch_dir(tmp_path)) / f"{app.uuid}.{drive.image_uuid}.json"
    bad.write_bytes(b"{not json")
    r = Resolver(Layout(str(tmp_path)))
    assert vm(r, app.legacy_name(0)).resolved
    assert len(r.problems) == 1 and str(bad) in r.problems[0]


# -- which checkpoint file -----------------------------------------------------------

def test_design_note_checkpoint_config_used_when_lastconfig_absent(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app], checkpoint_name="config", rules=DESIGN_NOTE)
    assert not (tmp_path / "checkpoint" / "lastconfig").exists()
    assert r.checkpoint_path == str(tmp_path / "checkpoint" / "config")
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#0.qcow2")


def test_eve_never_reads_checkpoint_config(tmp_path, ids):
    """No EVE release writes checkpoint/config: in layout eve it is not a checkpoint."""
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app], checkpoint_name="config")
    assert r.checkpoint_path is None and r.problems == ()
    assert_unresolved(vm(r, app.legacy_name(0)), "first boot")
    devicegen.write_device_state(str(tmp_path), [app])       # lastconfig appears
    assert r.refresh() is True
    assert r.checkpoint_path == str(tmp_path / "checkpoint" / "lastconfig")
    assert vm(r, app.legacy_name(0)).resolved


def test_design_note_lastconfig_wins_when_both_exist(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    old_vol, new_vol = drive.volume_uuid, ids.uuid()
    devicegen.write_device_state(str(tmp_path), [app], checkpoint_name="config")
    drive.volume_uuid = new_vol
    devicegen.write_device_state(str(tmp_path), [app], checkpoint_name="lastconfig")
    r = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    assert r.checkpoint_path == str(tmp_path / "checkpoint" / "lastconfig")
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{new_vol}#0.qcow2")
    # remove lastconfig: the other file takes over on refresh
    os.unlink(tmp_path / "checkpoint" / "lastconfig")
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{old_vol}#0.qcow2")


def test_wrapped_checkpoint_with_unknown_fields_resolves(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", clear_text=True, generation=3)
    app = AppDef(ids.uuid(), "app", [drive], purge=1)
    r = resolver_for(tmp_path, [app], wrap=True, rng=random.Random(8))
    assert r.config.wrapping == "AuthContainer"
    assert vm(r, app.legacy_name(0)).target == clear(tmp_path, f"{drive.volume_uuid}#3.raw")


# -- refresh ------------------------------------------------------------------------

def test_refresh_false_when_nothing_changed(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app])
    before = r.map
    assert r.refresh() is False
    assert r.refresh() is False
    assert r.map is before
    # reading a file or listing the latch is not a change either
    (tmp_path / "checkpoint" / "lastconfig").read_bytes()
    os.listdir(latch_dir(tmp_path))
    assert r.refresh() is False


def test_refresh_after_checkpoint_replaced(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = resolver_for(tmp_path, [app])
    old_vol = drive.volume_uuid
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{old_vol}#0.qcow2")

    # same size, same shape: only the volume UUID and the generation differ
    drive.volume_uuid = ids.uuid()
    drive.generation = 1
    write_config(tmp_path, devicegen.build_config([app]))
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#1.qcow2")
    assert r.refresh() is False


def test_refresh_from_first_boot_to_a_checkpoint(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "qcow2")
    app = AppDef(ids.uuid(), "app", [drive])
    r = Resolver(Layout(str(tmp_path)))
    assert_unresolved(vm(r, app.legacy_name(0)), "first boot")
    devicegen.write_device_state(str(tmp_path), [app], wrap=True)
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).resolved


def test_refresh_after_latch_file_added(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False)
    app = AppDef(ids.uuid(), "app", [drive], purge=2)
    r = resolver_for(tmp_path, [app])
    assert_unresolved(vm(r, app.legacy_name(0)), "no sha")
    devicegen.write_latch(latch_dir(tmp_path), app.uuid, drive.image_uuid, drive.sha, 2)
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).target == vault(tmp_path, f"{drive.volume_uuid}#0.raw")
    assert r.refresh() is False


def test_refresh_after_latch_directory_appears(tmp_path, ids):
    drive = DriveDef(ids.uuid(), ids.sha(), "raw", sha_in_image=False)
    app = AppDef(ids.uuid(), "app", [drive])
    write_config(tmp_path, devicegen.build_config([app]))
    r = Resolver(Layout(str(tmp_path)))
    assert not os.path.exists(latch_dir(tmp_path))
    assert not vm(r, app.legacy_name(0)).resolved
    devicegen.write_latch(latch_dir(tmp_path), app.uuid, drive.image_uuid, drive.sha, 0)
    assert r.refresh() is True
    assert vm(r, app.legacy_name(0)).resolved


# -- downloads ------------------------------------------------------------------------

def test_design_note_resolve_download_areas(tmp_path, ids):
    r = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    image_id = ids.uuid()
    res = r.resolve_download(ObjType.APP_IMG, DownloadArea.PENDING, image_id, "ubuntu.img")
    assert res.target == str(tmp_path / "vault" / "downloader" / "pending" / image_id
                             / "ubuntu.img")
    assert res.location == "downloader"
    res = r.resolve_download(ObjType.BASE_OS, DownloadArea.VERIFIER, image_id, "rootfs.img")
    assert res.target == str(tmp_path / "vault" / "verifier" / "verifier" / image_id / "rootfs.img")
    assert res.location == "verifier"
    sha = ids.sha().upper()
    res = r.resolve_download(ObjType.CERT, DownloadArea.VERIFIED, sha, "cert.pem")
    assert res.target == str(tmp_path / "vault" / "verifier" / "verified" / sha.lower())
    assert res.location == "verified"
    assert res.resolved


def test_design_note_resolve_download_ignores_object_type(tmp_path, ids):
    """The object type is not part of the new names: both types land in one place."""
    r = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    sha = ids.sha()
    targets = {r.resolve_download(t, DownloadArea.VERIFIED, sha, "f").target for t in ObjType}
    assert targets == {str(tmp_path / "vault" / "verifier" / "verified" / sha)}


def test_design_note_resolve_download_follows_layout_overrides(tmp_path, ids):
    layout = Layout(str(tmp_path), {"verified": "elsewhere/verified", "downloader": "dl"},
                    DESIGN_NOTE)
    r = Resolver(layout)
    sha = ids.sha()
    assert r.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "x").target == \
        str(tmp_path / "elsewhere" / "verified" / sha)
    image_id = ids.uuid()
    assert r.resolve_download(ObjType.APP_IMG, DownloadArea.PENDING, image_id, "x").target == \
        str(tmp_path / "dl" / "pending" / image_id / "x")


# -- downloads in layout eve ------------------------------------------------------------

def eve(release: str):
    return rules_for("eve", release)


@pytest.mark.parametrize("release", ["5.8", "7.4", "17.3"])
@pytest.mark.parametrize("area", [DownloadArea.PENDING, DownloadArea.VERIFIER])
def test_eve_downloads_in_progress_stay_legacy_by_rule(tmp_path, ids, release, area):
    """E13: no EVE release reads pending/<id>/<file> or verifier/<id>/<file> moved."""
    r = Resolver(Layout(str(tmp_path), rules=eve(release)))
    res = r.resolve_download(ObjType.APP_IMG, area, ids.uuid(), "ubuntu.img")
    assert_unresolved(res, "stays in the legacy store", "served by the views",
                      f"no EVE release reads {area.value}/", "downloaded again after the upgrade")
    assert res.by_rule is True and res.location is None


@pytest.mark.parametrize("release", ["5.8", "11.7", "17.3"])
def test_eve_verified_cert_obj_stays_legacy_by_rule(tmp_path, ids, release):
    """E12: EVE's upgrade moves appImg.obj and baseOs.obj verified objects, not cert.obj."""
    r = Resolver(Layout(str(tmp_path), rules=eve(release)))
    res = r.resolve_download(ObjType.CERT, DownloadArea.VERIFIED, ids.sha(), "cert.pem")
    assert_unresolved(res, "verified cert.obj object stays in the legacy store",
                      f"EVE {release} moves only appImg.obj, baseOs.obj")
    assert res.by_rule is True
    # the design note moves every type
    dn = Resolver(Layout(str(tmp_path), rules=DESIGN_NOTE))
    assert dn.resolve_download(ObjType.CERT, DownloadArea.VERIFIED, "a" * 64, "c").resolved


@pytest.mark.parametrize("release", ["5.8", "7.9", "11.7"])
@pytest.mark.parametrize("obj_type", [ObjType.APP_IMG, ObjType.BASE_OS])
def test_eve_before_11_8_names_verified_objects_by_bare_lower_sha(tmp_path, ids, release,
                                                                  obj_type):
    """E10: 5.8 to 11.7 read vault/verifier/verified/<lower sha>, whatever the config."""
    r = Resolver(Layout(str(tmp_path), rules=eve(release)))
    sha = ids.sha().upper()
    res = r.resolve_download(obj_type, DownloadArea.VERIFIED, sha.lower(), "disk.qcow2")
    assert res.target == str(tmp_path / "vault" / "verifier" / "verified" / sha.lower())
    assert res.location == "verified" and res.by_rule is False


def _tree_device(root: Path, ids: Ids, fmt: str, *, in_image: bool, upper: bool = False):
    """A checkpoint naming one image sha, in a content tree (in_image False) or a
    drive image, with format *fmt*; returns the sha (lower case)."""
    drive = DriveDef(ids.uuid(), ids.sha(), fmt, sha_in_image=in_image,
                     content_tree=not in_image)
    app = AppDef(ids.uuid(), "blob", [drive])
    resp = devicegen.build_config([app])
    if upper:
        for tree in resp.config.contentInfo:
            tree.sha256 = tree.sha256.upper()
        for d in resp.config.apps[0].drives:
            d.image.sha256 = d.image.sha256.upper()
    write_config(root, resp)
    return drive.sha.lower()


@pytest.mark.parametrize("release", ["11.8", "17.3"])
@pytest.mark.parametrize("where", ["content-tree", "drive-image", "upper-case"])
def test_eve_11_8_names_verified_disk_images_by_media_type(tmp_path, ids, release, where):
    """E11: from 11.8 a verified file is <sha>.<PathEscape(media type)>; a disk image
    the checkpoint names (content tree or drive image, sha compared in lower case)
    is an OCI layer."""
    sha = _tree_device(tmp_path, ids, "qcow2", in_image=where == "drive-image",
                       upper=where == "upper-case")
    r = Resolver(Layout(str(tmp_path), rules=eve(release)))
    assert r.map.media_types == {sha: OCI_LAYER_MEDIA_TYPE}     # built once per snapshot
    res = r.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "disk.qcow2")
    assert res.target == str(tmp_path / "vault" / "verifier" / "verified" /
                             f"{sha}.application%2Fvnd.oci.image.layer.v1.tar+gzip")
    assert res.location == "verified"


@pytest.mark.parametrize("case", ["not-in-config", "container", "no-format", "first-boot"])
def test_eve_11_8_keeps_verified_objects_whose_name_cannot_be_derived(tmp_path, ids, case):
    """E11: never a bare-sha name the 11.8+ verifier deletes at start: the object
    stays in the legacy store with the reason."""
    if case == "container":
        sha = _tree_device(tmp_path, ids, "container", in_image=False)
        why = "container image"
    elif case == "no-format":
        sha = _tree_device(tmp_path, ids, "unknown", in_image=True)
        why = "gives its image no format"
    elif case == "not-in-config":
        _tree_device(tmp_path, ids, "raw", in_image=True)
        sha = ids.sha()
        why = "names no content tree or drive image"
    else:
        sha = ids.sha()
        why = "first boot"
    r = Resolver(Layout(str(tmp_path), rules=eve("11.8")))
    res = r.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "x")
    assert_unresolved(res, "no name EVE 11.8 keeps can be derived", why, "legacy store")
    assert res.by_rule is True
    # 11.7 reads the bare sha: always derivable
    old = Resolver(Layout(str(tmp_path), rules=eve("11.7")))
    assert old.resolve_download(ObjType.APP_IMG, DownloadArea.VERIFIED, sha, "x").target == \
        str(tmp_path / "vault" / "verifier" / "verified" / sha)


def test_media_types_follow_a_new_checkpoint(tmp_path, ids):
    r = Resolver(Layout(str(tmp_path)))
    sha = ids.sha()
    assert not r.resolve_download(ObjType.BASE_OS, DownloadArea.VERIFIED, sha, "f").resolved
    drive = DriveDef(ids.uuid(), sha, "raw")
    devicegen.write_device_state(str(tmp_path), [AppDef(ids.uuid(), "a", [drive])])
    assert r.refresh() is True
    assert r.resolve_download(ObjType.BASE_OS, DownloadArea.VERIFIED, sha, "f").resolved


# -- containerd ------------------------------------------------------------------------

@pytest.mark.parametrize("release", ["5.8", "7.10"])
def test_eve_before_7_11_keeps_containerd(tmp_path, release):
    """E14: up to 7.10 containerd/ is the system containerd's root: it stays."""
    r = Resolver(Layout(str(tmp_path), rules=eve(release)))
    res = r.resolve_containerd()
    assert_unresolved(res, f"EVE {release} runs its own containerd from this tree",
                      "it stays where it is")
    assert res.by_rule is True


@pytest.mark.parametrize("rules", [eve("7.11"), eve("17.3"), DESIGN_NOTE],
                         ids=["7.11", "17.3", "design-note"])
def test_containerd_moves_to_the_cas_location(tmp_path, rules):
    res = Resolver(Layout(str(tmp_path), rules=rules)).resolve_containerd()
    assert res.target == str(tmp_path / "vault" / "containerd") and res.location == "cas"
