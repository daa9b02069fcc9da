"""compatfs against EVE's own tables, ported as data (docs/eve.md sections 1, 3 and 9).

Every case below was read in lf-edge/eve and is restated here as plain data:
no EVE code is ported, only what its tests and documents say the answer is.

- ``PARSE_TABLE``: the twelve cases of ``TestParseAppRwVolumeName`` (5.6.0
  ``pkg/pillar/cmd/volumemgr/initialvolumestatus_test.go``), run through
  compatfs' own parser and scanner. Where compatfs' stricter grammar
  (docs/layouts.md, "Name grammars") answers differently, the case says so
  and why; ``STRICTER`` adds the shapes EVE's unanchored regexes accept and
  compatfs refuses on purpose.
- ``BUILDER_TABLE``: the names 5.6.0's ``appRwVolumeName`` builds (the rule
  the expected ``FileLocation`` of ``handlework_test.go`` is computed with):
  ``#<purge>`` only when the counter is not 0, the format lower-cased.
- ``test_converter_*``: the cases ``pkg/pillar/docs/upgradeconverter.md``
  (17.1.0+) lists for ``convertPersistVolumes`` and ``renameVerifiedFiles``,
  each built as a legacy device in a plain temporary directory and planned
  under ``layout: eve``; the expected outcome is compatfs' ``eve`` column of
  docs/eve.md section 9.
- ``test_plan_places_every_volume_at_pathname``: random configs; the path new
  EVE's ``VolumeStatus.PathName()`` gives is computed here from EVE's rule,
  independently of compatfs, and ``plan`` must place each legacy volume
  exactly there and nowhere else.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compatfs.checkpoint import FORMAT_SUFFIX
from compatfs.layout import Layout
from compatfs.names import (
    DownloadArea,
    LegacyVolumeName,
    NotAVolume,
    ObjType,
    parse_container_volume,
    parse_vm_volume,
)
from compatfs.plan import make_plan
from compatfs.proto import eve_config_pb2
from compatfs.resolver import Resolver
from compatfs.rules import OCI_LAYER_MEDIA_TYPE, RELEASES, release_text, rules_for
from compatfs.scan import scan_img, scan_prepared
from compatfs.testing import devicegen

from .conftest import run_cli, tree_snapshot

# -- 1. TestParseAppRwVolumeName (5.6.0), all twelve cases ----------------------

#: The two shas and the app UUID EVE's table uses (its "lowercase SHA" cases
#: carry the upper-case sha and the other way round: the names are EVE's).
UPPER_SHA = "EFA50C64CAACF8D43F334A05F8048F39A27FEA26FC1D155F2543D38D13176C17"
LOWER_SHA = "01434c4de5e7646dbaf026fe8c522e637a298daa2af71bd1dade03826d442848"
APP = "dfde839b-61f8-4df9-a840-d49cc0940d5c"


@dataclass(frozen=True)
class ParseCase:
    """One row of EVE's table and compatfs' answer for the same name.

    ``eve`` is what EVE's test expects: (dir, sha, app UUID, purge counter),
    empty strings for "does not parse". ``compatfs`` is what compatfs' parser
    gives for the file name (the last path component): (sha, app UUID,
    purge counter, format) or, when it refuses the name, the reason it gives.
    ``why`` says why the two differ, empty when they agree.
    """

    eve_name: str
    container: bool
    path: str
    eve: tuple[str, str, str, int]
    compatfs: tuple[str, str, int, str | None] | str
    why: str = ""


_NO_DIR = ("compatfs parses directory entries, never paths: the scanner hands it the "
           "name it found in img/ or runx/pods/prepared/, so the name always has a "
           "directory. EVE's regexes need a '/' before the sha, which is why EVE's "
           "table expects no match for a bare name; the name itself is the same as in "
           "'Test uppercase SHA', and compatfs parses it as that case")

PARSE_TABLE = [
    ParseCase("Test lowercase SHA", False,
              f"/persist/img/{UPPER_SHA}-{APP}.qcow2",
              ("/persist/img", UPPER_SHA, APP, 0), (UPPER_SHA, APP, 0, "qcow2")),
    ParseCase("Test lowercase SHA cont", True,
              f"/persist/img/{UPPER_SHA}-{APP}",
              ("/persist/img", UPPER_SHA, APP, 0), (UPPER_SHA, APP, 0, None)),
    ParseCase("Test uppercase SHA", False,
              f"/persist/img/{LOWER_SHA}-{APP}.qcow2",
              ("/persist/img", LOWER_SHA, APP, 0), (LOWER_SHA, APP, 0, "qcow2")),
    ParseCase("Test uppercase SHA cont", True,
              f"/persist/img/{LOWER_SHA}-{APP}",
              ("/persist/img", LOWER_SHA, APP, 0), (LOWER_SHA, APP, 0, None)),
    ParseCase("Test purgeCounter", False,
              f"/persist/img/{LOWER_SHA}-{APP}#3.qcow2",
              ("/persist/img", LOWER_SHA, APP, 3), (LOWER_SHA, APP, 3, "qcow2")),
    ParseCase("Test purgeCounter cont", True,
              f"/persist/img/{LOWER_SHA}-{APP}#3",
              ("/persist/img", LOWER_SHA, APP, 3), (LOWER_SHA, APP, 3, None)),
    ParseCase("Test No Dir", False, f"{LOWER_SHA}-{APP}.qcow2",
              ("", "", "", 0), (LOWER_SHA, APP, 0, "qcow2"), _NO_DIR),
    ParseCase("Test No Dir cont", True, f"{LOWER_SHA}-{APP}",
              ("", "", "", 0), (LOWER_SHA, APP, 0, None), _NO_DIR),
    ParseCase("Test Invalid Hash", False, f"/persist/img/01434c4dK-{APP}.qcow2",
              ("", "", "", 0), "sha is not 64 hex digits"),
    ParseCase("Test Invalid Hash cont", True, f"/persist/img/01434c4dK-{APP}",
              ("", "", "", 0), "sha is not 64 hex digits"),
    ParseCase("Test Invalid UUID", False, f"/persist/img/{LOWER_SHA}.qcow2",
              ("", "", "", 0), "no '-' between sha and app UUID"),
    ParseCase("Test Invalid UUID cont", True, f"/persist/img/{LOWER_SHA}",
              ("", "", "", 0), "no '-' between sha and app UUID"),
]

#: Names EVE's unanchored, loosely-classed regexes accept (their answer read
#: from the two regexes of 5.6.0 ``parseAppRwVolumeName``) and compatfs refuses
#: on purpose: one spelling per name, so nothing that merely resembles a
#: volume (a temporary, a hand-made copy) is ever moved as one.
STRICTER = [
    ParseCase("trailing suffix", False, f"/persist/img/{LOWER_SHA}-{APP}.qcow2.tmp",
              ("/persist/img", LOWER_SHA, APP, 0),
              "app instance UUID is not a canonical UUID",
              "EVE's pattern is not anchored at the end, so a copy's temporary "
              "'<name>.tmp' parses as the volume; compatfs reads the last '.' as the "
              "format and refuses the rest"),
    ParseCase("trailing suffix after purge", False,
              f"/persist/img/{LOWER_SHA}-{APP}#3.qcow2.tmp",
              ("/persist/img", LOWER_SHA, APP, 3),
              "purge counter '3.qcow2' is not a canonical decimal number",
              "as above, with the purge-counter pattern"),
    ParseCase("short sha", False, f"/persist/img/01434c4d-{APP}.qcow2",
              ("/persist/img", "01434c4d", APP, 0), "sha is not 64 hex digits",
              "EVE accepts any run of hex digits; a sha256 is 64"),
    ParseCase("app not a UUID", False, f"/persist/img/{LOWER_SHA}-dfde839b-61f8.qcow2",
              ("/persist/img", LOWER_SHA, "dfde839b-61f8", 0),
              "app instance UUID is not a canonical UUID",
              "EVE accepts any run of hex digits and dashes (its converter then skips "
              "what uuid.FromString rejects); compatfs refuses at once"),
    ParseCase("purge #0", False, f"/persist/img/{LOWER_SHA}-{APP}#0.qcow2",
              ("/persist/img", LOWER_SHA, APP, 0), "purge counter 0 is written without '#0'",
              "appRwVolumeName never writes '#0', so no volume has that name"),
    ParseCase("purge with leading zero", False, f"/persist/img/{LOWER_SHA}-{APP}#03.qcow2",
              ("/persist/img", LOWER_SHA, APP, 3),
              "purge counter '03' is not a canonical decimal number",
              "appRwVolumeName writes '%d', never a leading zero"),
    ParseCase("purge beyond uint32", False, f"/persist/img/{LOWER_SHA}-{APP}#4294967296.qcow2",
              ("/persist/img", LOWER_SHA, APP, 0), "purge counter 4294967296 is out of range",
              "EVE logs the ParseUint error and takes purge counter 0, so the name "
              "would pass for the unpurged volume; compatfs refuses it"),
    ParseCase("upper-case format", False, f"/persist/img/{LOWER_SHA}-{APP}.QCOW2",
              ("/persist/img", LOWER_SHA, APP, 0), "format 'QCOW2' is not a lower-case format name",
              "appRwVolumeName lower-cases the format, so no volume has that name"),
]


def _parse(case: ParseCase) -> LegacyVolumeName:
    name = os.path.basename(case.path)
    return parse_container_volume(name) if case.container else parse_vm_volume(name)


def test_parse_table_has_all_twelve_cases():
    assert len({c.eve_name for c in PARSE_TABLE}) == 12
    assert sum(c.container for c in PARSE_TABLE) == 6


@pytest.mark.parametrize("case", PARSE_TABLE + STRICTER, ids=lambda c: c.eve_name)
def test_parse_table(case: ParseCase):
    eve_parses = case.eve[1] != ""
    if isinstance(case.compatfs, str):
        with pytest.raises(NotAVolume) as exc:
            _parse(case)
        assert exc.value.reason == case.compatfs
        # compatfs refuses only names EVE refuses too, or (STRICTER) on purpose
        assert not eve_parses or case.why
        return
    got = _parse(case)
    sha, app, purge, fmt = case.compatfs
    assert (got.sha, got.app_uuid, got.purge, got.fmt) == (sha, app, purge, fmt)
    assert got.sha == sha  # the controller's case is kept (compare with sha_lower)
    if eve_parses:
        # where both parse they agree on every field EVE's table checks
        assert case.eve == (os.path.dirname(case.path), got.sha, got.app_uuid, got.purge)
        assert not case.why
    else:
        assert case.why   # a difference is always explained


@pytest.mark.parametrize("case", [c for c in PARSE_TABLE if not isinstance(c.compatfs, str)],
                         ids=lambda c: c.eve_name)
def test_parse_table_through_the_scanner(tmp_path, case: ParseCase):
    """The same names found on disk, where compatfs meets them: a VM volume is a
    file in img/, a container volume a directory in runx/pods/prepared/."""
    name = os.path.basename(case.path)
    layout = Layout(str(tmp_path))
    if case.container:
        (tmp_path / "runx/pods/prepared" / name).mkdir(parents=True)
        [obj] = scan_prepared(layout)
        assert obj.kind == "oci-volume"
    else:
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / name).write_bytes(b"v")
        [obj] = scan_img(layout)
        assert obj.kind == "vm-volume"
    assert obj.reason is None and obj.volume == _parse(case)


@pytest.mark.parametrize("case", [c for c in PARSE_TABLE + STRICTER
                                  if isinstance(c.compatfs, str)], ids=lambda c: c.eve_name)
def test_refused_names_stay_where_they_are_with_the_reason(tmp_path, case: ParseCase):
    name = os.path.basename(case.path)
    layout = Layout(str(tmp_path))
    if case.container:
        (tmp_path / "runx/pods/prepared" / name).mkdir(parents=True)
        [obj] = scan_prepared(layout)
    else:
        (tmp_path / "img").mkdir()
        (tmp_path / "img" / name).write_bytes(b"v")
        [obj] = scan_img(layout)
    assert obj.kind == "other" and obj.reason == f"not a volume: {case.compatfs}"


# -- 2. appRwVolumeName (5.6.0) and handlework_test.go --------------------------

#: 5.6.0's ``Format`` enum (``api/proto/config/storage.proto``): number -> name.
FORMAT_ENUM_56 = {0: "FmtUnknown", 1: "RAW", 2: "QCOW", 3: "QCOW2", 4: "VHD", 5: "VMDK",
                  6: "OVA", 7: "VHDX", 8: "CONTAINER"}

#: (sha, app UUID, purge counter, Format number, container) -> the base name
#: ``appRwVolumeName`` builds: ``#<purge>`` only when the counter is not 0,
#: the Format name lower-cased, no format for a container.
BUILDER_TABLE = [
    (LOWER_SHA, APP, 0, 3, False, f"{LOWER_SHA}-{APP}.qcow2"),
    (UPPER_SHA, APP, 0, 3, False, f"{UPPER_SHA}-{APP}.qcow2"),
    (LOWER_SHA, APP, 3, 3, False, f"{LOWER_SHA}-{APP}#3.qcow2"),
    (LOWER_SHA, APP, 1, 1, False, f"{LOWER_SHA}-{APP}#1.raw"),
    (LOWER_SHA, APP, 0, 2, False, f"{LOWER_SHA}-{APP}.qcow"),
    (LOWER_SHA, APP, 0, 4, False, f"{LOWER_SHA}-{APP}.vhd"),
    (LOWER_SHA, APP, 0, 5, False, f"{LOWER_SHA}-{APP}.vmdk"),
    (LOWER_SHA, APP, 0, 6, False, f"{LOWER_SHA}-{APP}.ova"),
    (LOWER_SHA, APP, 4294967295, 7, False, f"{LOWER_SHA}-{APP}#4294967295.vhdx"),
    (LOWER_SHA, APP, 0, 8, True, f"{LOWER_SHA}-{APP}"),
    (UPPER_SHA, APP, 7, 8, True, f"{UPPER_SHA}-{APP}#7"),
]


def test_format_suffixes_are_evs_enum_names_lower_cased():
    for number, name in FORMAT_ENUM_56.items():
        if number == 0:
            # FmtUnknown: compatfs reads "no format" and then places nothing
            # whose suffix the config cannot confirm (docs/resolution.md)
            assert FORMAT_SUFFIX[0] is None
        else:
            assert FORMAT_SUFFIX[number] == name.lower()


@pytest.mark.parametrize("sha,app,purge,fmt,container,expected", BUILDER_TABLE)
def test_builder_table(sha, app, purge, fmt, container, expected):
    suffix = None if container else FORMAT_SUFFIX[fmt]
    name = LegacyVolumeName(sha, app, purge, suffix)
    assert name.format() == expected
    parse = parse_container_volume if container else parse_vm_volume
    assert parse(expected) == name
    # devicegen, which builds every legacy tree the tests use, follows the same rule
    drive = devicegen.DriveDef("00000000-0000-4000-8000-000000000001", sha,
                               "container" if container else suffix)
    app_def = devicegen.AppDef(app, "a", [drive], purge=purge)
    assert app_def.legacy_name(0, container=container) == expected


def test_handlework_somesha_name(tmp_path):
    """``TestHandleWorkCreate``, case "read-write fail": the expected
    ``FileLocation`` is ``appRwVolumeName("somesha", <app>, 0, QCOW2)``, i.e.
    ``/persist/img/somesha-<app>.qcow2`` (the app UUID printed lower case).

    compatfs' formatter builds the same string, but 'somesha' is not a sha256,
    so the name is not a volume to compatfs: it stays in img/ with the reason,
    even when the checkpoint's image carries that very sha. EVE's own parser
    refuses it too ('s' is not a hex digit), so its converter leaves it as well.
    """
    app = "6ba7b810-9dad-41d1-80b4-00c04fd430c8"
    name = "somesha-" + app + ".qcow2"
    assert LegacyVolumeName("somesha", app, 0, FORMAT_SUFFIX[3]).format() == name
    with pytest.raises(NotAVolume) as exc:
        parse_vm_volume(name)
    assert exc.value.reason == "sha is not 64 hex digits"

    drive = devicegen.DriveDef("6ba7b811-9dad-41d1-80b4-00c04fd430c8", "somesha", "qcow2")
    devicegen.write_device_state(str(tmp_path), [devicegen.AppDef(app, "hw", [drive])])
    devicegen.sparse_file(str(tmp_path / "img" / name), 4096, {0: b"hw"})
    [e] = eve_plan(tmp_path).entries
    assert e.obj.kind == "other" and e.target is None
    assert e.reason == "not a volume: sha is not 64 hex digits"


# -- 3. the converter cases of upgradeconverter.md (17.1.0+), layout eve --------

def eve_plan(root: Path, release: str | None = None):
    """The plan under ``layout: eve`` (default: the newest release)."""
    layout = Layout(str(root), rules=rules_for("eve", release))
    return make_plan(layout, Resolver(layout))


def by_legacy(plan) -> dict:
    return {plan.layout.relpath(e.obj.path): e for e in plan.entries}


def _uuid(rng: random.Random) -> str:
    return devicegen.random_uuid(rng)


def _device(root: Path, apps: list[devicegen.AppDef], *,
            ref_generation: dict[str, int] | None = None,
            content_trees: tuple[tuple[str, int], ...] = ()) -> None:
    """Checkpoint and latch for *apps* under *root*; ``ref_generation`` gives an
    app's ``VolumeRef.generationCount`` for a volume where it differs from the
    volume's own, ``content_trees`` adds (sha, Format number) trees no volume uses."""
    devicegen.write_device_state(str(root), apps)
    resp = devicegen.build_config(apps)
    for app in resp.config.apps:
        for ref in app.volumeRefList:
            if ref_generation and ref.uuid in ref_generation:
                ref.generationCount = ref_generation[ref.uuid]
    rng = random.Random(len(apps))
    for sha, fmt in content_trees:
        tree = resp.config.contentInfo.add()
        tree.uuid, tree.sha256, tree.iformat = _uuid(rng), sha, fmt
        tree.displayName = "tree"
    devicegen.write_atomic(str(root / "checkpoint/lastconfig"), resp.SerializeToString())
    for d in ("vault", "clear"):
        (root / d).mkdir(exist_ok=True)


def _app(rng: random.Random, *drives: devicegen.DriveDef, purge: int = 0) -> devicegen.AppDef:
    return devicegen.AppDef(_uuid(rng), "app", list(drives), purge=purge)


def _drive(rng: random.Random, fmt: str = "qcow2", **kw) -> devicegen.DriveDef:
    return devicegen.DriveDef(_uuid(rng), devicegen.random_sha(rng), fmt,
                              volume_uuid=_uuid(rng), **kw)


@pytest.mark.parametrize("clear_text", [False, True], ids=["vault", "clear_text"])
def test_converter_vm_volume_purge_0(tmp_path, clear_text):
    """EVE: ``vault/volumes/<vol>#<VolumeRef gen>.<fmt>``, clear_text ignored.
    compatfs eve: ``<vol>#<Volume gen>``, in ``clear/volumes`` when clear_text."""
    rng = random.Random(1)
    app = _app(rng, _drive(rng, generation=2, clear_text=clear_text))
    _device(tmp_path, [app])
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"vm"})
    [e] = eve_plan(tmp_path).entries
    where = "clear/volumes" if clear_text else "vault/volumes"
    assert e.obj.kind == "vm-volume" and e.reason is None
    assert e.target == str(tmp_path / where / f"{app.drives[0].volume_uuid}#2.qcow2")
    assert e.action in ("copy", "rename")


def test_converter_generation_comes_from_the_volume(tmp_path):
    """EVE's converter takes ``VolumeRef.generationCount`` (here 5); new
    volumemgr opens ``<vol>#<Volume.generationCount>`` (here 2): compatfs
    places the file where volumemgr opens it."""
    rng = random.Random(2)
    app = _app(rng, _drive(rng, generation=2))
    vol = app.drives[0].volume_uuid
    _device(tmp_path, [app], ref_generation={vol: 5})
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"vm"})
    plan = eve_plan(tmp_path)
    [e] = plan.entries
    assert e.target == str(tmp_path / "vault/volumes" / f"{vol}#2.qcow2")
    # and the disagreement is reported, not silently accepted
    assert any(vol in p and "generation 5" in p for p in plan.problems), plan.problems


def test_converter_vm_volume_with_purge_counter(tmp_path):
    """``#<p>`` equal to the app's purge counter: moved (both). A copy with an
    older counter: EVE's converter ignores the counter (it would take whichever
    sorts first); compatfs keeps the stale copy where it is, with the reason."""
    rng = random.Random(3)
    app = _app(rng, _drive(rng, "raw"), purge=3)
    _device(tmp_path, [app])
    current, stale = app.legacy_name(0), app.legacy_name(0, purge=2)
    assert current.endswith("#3.raw")
    for name in (current, stale):
        devicegen.sparse_file(str(tmp_path / "img" / name), 4096, {0: name.encode()})
    entries = by_legacy(eve_plan(tmp_path))
    assert entries[f"img/{current}"].target == str(
        tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.raw")
    assert entries[f"img/{stale}"].target is None
    assert "purge counter 2 is stale" in entries[f"img/{stale}"].reason


def test_converter_oci_directory(tmp_path):
    """``runx/pods/prepared/<sha>-<app>`` -> ``<vol>#<gen>.container/`` (both;
    ``snapshotid.txt`` is written by the move itself, see test_migrate)."""
    rng = random.Random(4)
    app = _app(rng, _drive(rng, "container", generation=1))
    _device(tmp_path, [app])
    devicegen.container_tree(
        str(tmp_path / "runx/pods/prepared" / app.legacy_name(0, container=True)), rng)
    [e] = eve_plan(tmp_path).entries
    assert e.obj.kind == "oci-volume"
    assert e.target == str(tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#1.container")


def test_converter_sha_from_the_latch(tmp_path):
    """``Image.sha256`` empty, the latch has (app, image, purge) -> sha: used (both)."""
    rng = random.Random(5)
    app = _app(rng, _drive(rng, "qcow2", sha_in_image=False, in_latch=True), purge=1)
    _device(tmp_path, [app])
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"l"})
    [e] = eve_plan(tmp_path).entries
    assert e.target == str(tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.qcow2")


def test_converter_sha_only_in_the_content_tree(tmp_path):
    """The sha only in the volume's content tree: EVE's converter never matches
    on it (the file is left behind); compatfs falls back to it and places the file."""
    rng = random.Random(6)
    app = _app(rng, _drive(rng, "vmdk", sha_in_image=False, content_tree=True))
    _device(tmp_path, [app])
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"t"})
    [e] = eve_plan(tmp_path).entries
    assert e.target == str(tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.vmdk")


def test_converter_no_checkpoint_moves_nothing(tmp_path):
    rng = random.Random(7)
    app = _app(rng, _drive(rng), _drive(rng, "container"))
    _device(tmp_path, [app])
    os.unlink(tmp_path / "checkpoint/lastconfig")
    devicegen.sparse_file(str(tmp_path / "img" / app.legacy_name(0)), 4096, {0: b"n"})
    (tmp_path / "runx/pods/prepared" / app.legacy_name(1, container=True)).mkdir(parents=True)
    plan = eve_plan(tmp_path)
    assert plan.checkpoint is None and len(plan.entries) == 2
    for e in plan.entries:
        assert e.target is None and e.action == "keep" and "first boot" in e.reason


@pytest.mark.parametrize("dest_newer", [True, False],
                         ids=["destination-newer", "destination-older"])
def test_converter_existing_destination_always_wins(tmp_path, dest_newer):
    """EVE's converter never replaces an existing destination, newer or older;
    compatfs eve keeps it too, and the plan says the legacy copy is set aside.
    Planning changes neither copy."""
    rng = random.Random(8)
    app = _app(rng, _drive(rng))
    _device(tmp_path, [app])
    legacy = tmp_path / "img" / app.legacy_name(0)
    devicegen.sparse_file(str(legacy), 4096, {0: b"legacy"}, mtime=1_500_000_000)
    dest = tmp_path / "vault/volumes" / f"{app.drives[0].volume_uuid}#0.qcow2"
    devicegen.sparse_file(str(dest), 4096, {0: b"destination"},
                          mtime=1_600_000_000 if dest_newer else 1_400_000_000)
    before = tree_snapshot(tmp_path)
    [e] = eve_plan(tmp_path).entries
    assert e.action not in ("copy", "rename")
    assert "destination exists" in e.reason and "set aside" in e.reason
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("name,reason", [
    ("notes.txt", "not a volume: no '-' between sha and app UUID"),
    (f"{LOWER_SHA}-not-a-uuid.qcow2", "not a volume: app instance UUID is not a canonical UUID"),
])
def test_converter_unparseable_names_stay(tmp_path, name, reason):
    """A name that does not parse, or whose app part is not a UUID: ignored by
    EVE's converter; compatfs leaves it where it is and says why."""
    rng = random.Random(9)
    _device(tmp_path, [_app(rng, _drive(rng))])
    (tmp_path / "img").mkdir(exist_ok=True)
    (tmp_path / "img" / name).write_bytes(b"x")
    [e] = eve_plan(tmp_path).entries
    assert e.obj.kind == "other" and e.target is None and e.reason == reason


def test_converter_app_not_in_the_config_stays(tmp_path):
    rng = random.Random(10)
    _device(tmp_path, [_app(rng, _drive(rng))])
    stray = f"{LOWER_SHA}-{APP}.qcow2"
    devicegen.sparse_file(str(tmp_path / "img" / stray), 4096, {0: b"s"})
    [e] = eve_plan(tmp_path).entries
    assert e.target is None and e.reason == f"app {APP} is not in the checkpointed config"


def _verified(root: Path, obj_type: ObjType, data: bytes, *, upper: bool = True) -> str:
    sha = devicegen.sha_of(data)
    devicegen.download_file(str(root), obj_type, DownloadArea.VERIFIED,
                            sha.upper() if upper else sha, "image.bin", data)
    return sha


def _only(plan, kind: str):
    [e] = [e for e in plan.entries if e.obj.kind == kind]
    return e


# Releases on either side of the verified-name change (docs/eve.md section 6).
BARE_SHA_RELEASES = ["5.8", "7.9", "11.7"]
MEDIA_TYPE_RELEASES = ["11.8", "14.5", "17.3"]


@pytest.mark.parametrize("release", BARE_SHA_RELEASES)
def test_converter_verified_upper_sha_to_bare_lower_sha(tmp_path, release):
    """``verified/<SHA>/<file>`` -> ``vault/verifier/verified/<sha>``, lower
    case, directory flattened: the converter's name, read by 5.8-11.7."""
    sha = _verified(tmp_path, ObjType.APP_IMG, b"disk image")
    e = _only(eve_plan(tmp_path, release), "verified")
    assert e.target == str(tmp_path / "vault/verifier/verified" / sha)


@pytest.mark.parametrize("release", MEDIA_TYPE_RELEASES)
def test_converter_verified_named_with_media_type_for_11_8_on(tmp_path, release):
    """11.8+ deletes a bare-sha verified file at start: compatfs names it
    ``<sha>.<PathEscape(OCI layer media type)>`` when the checkpoint gives the
    sha a format that is not CONTAINER."""
    rng = random.Random(11)
    data = b"qcow2 disk image"
    sha = devicegen.sha_of(data)
    app = _app(rng, devicegen.DriveDef(_uuid(rng), sha, "qcow2", volume_uuid=_uuid(rng)))
    _device(tmp_path, [app])
    _verified(tmp_path, ObjType.APP_IMG, data)
    e = _only(eve_plan(tmp_path, release), "verified")
    escaped = OCI_LAYER_MEDIA_TYPE.replace("/", "%2F")
    assert e.target == str(tmp_path / "vault/verifier/verified" / f"{sha}.{escaped}")
    assert escaped == "application%2Fvnd.oci.image.layer.v1.tar+gzip"


@pytest.mark.parametrize("fmt", [None, 8], ids=["sha-unknown-to-checkpoint", "container-image"])
def test_converter_verified_stays_when_no_name_11_8_keeps_exists(tmp_path, fmt):
    """No media type derivable (a sha the checkpoint does not name, or a
    container image): no name 17.3 keeps, so the object stays, with the reason."""
    data = b"blob"
    sha = devicegen.sha_of(data)
    _device(tmp_path, [], content_trees=() if fmt is None else ((sha, fmt),))
    _verified(tmp_path, ObjType.APP_IMG, data)
    e = _only(eve_plan(tmp_path, "17.3"), "verified")
    assert e.target is None and e.action == "keep" and e.by_rule and e.reason


@pytest.mark.parametrize("release", ["11.7", "17.3"])
def test_converter_verified_app_img_and_base_os_move_cert_stays(tmp_path, release):
    """``renameVerifiedFiles`` moves appImg.obj and baseOs.obj, never cert.obj."""
    app_data, base_data, cert_data = b"app image", b"base os image", b"certificate"
    shas = [devicegen.sha_of(d) for d in (app_data, base_data)]
    _device(tmp_path, [], content_trees=tuple((s, 1) for s in shas))   # RAW: media type derivable
    _verified(tmp_path, ObjType.APP_IMG, app_data)
    _verified(tmp_path, ObjType.BASE_OS, base_data, upper=False)
    _verified(tmp_path, ObjType.CERT, cert_data)
    entries = {e.obj.download[0]: e for e in eve_plan(tmp_path, release).entries}
    suffix = "" if release == "11.7" else ".application%2Fvnd.oci.image.layer.v1.tar+gzip"
    for obj_type, sha in zip((ObjType.APP_IMG, ObjType.BASE_OS), shas, strict=True):
        assert entries[obj_type].target == str(
            tmp_path / "vault/verifier/verified" / f"{sha}{suffix}")
    cert = entries[ObjType.CERT]
    assert cert.target is None and cert.action == "keep" and cert.by_rule and cert.reason


def test_converter_verified_destination_exists(tmp_path):
    """Destination exists: EVE skips; compatfs keeps it and reports the legacy copy."""
    sha = _verified(tmp_path, ObjType.APP_IMG, b"verified twice")
    dest = tmp_path / "vault/verifier/verified" / sha
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"verified twice")
    e = _only(eve_plan(tmp_path, "11.7"), "verified")
    assert e.action not in ("copy", "rename") and "destination exists" in e.reason


@pytest.mark.parametrize("area", [DownloadArea.PENDING, DownloadArea.VERIFIER])
def test_converter_transient_downloads_stay(tmp_path, area):
    """The converter never touches pending/ or verifier/, and no release reads
    them moved: compatfs eve serves them where they are and does not move them."""
    devicegen.download_file(str(tmp_path), ObjType.APP_IMG, area,
                            "6ba7b810-9dad-41d1-80b4-00c04fd430c8", "part.img", b"partial")
    e = _only(eve_plan(tmp_path), area.value)
    assert e.target is None and e.action == "keep" and e.by_rule and e.reason


@pytest.mark.parametrize("release,moves", [("7.10", False), ("7.11", True), ("17.3", True)])
def test_converter_containerd_moves_only_for_7_11_on(tmp_path, release, moves):
    """``moveToUserContainerd`` (7.11+); before 7.11 ``/persist/containerd`` is
    the system containerd's root and stays."""
    blob = tmp_path / "containerd/io.containerd.content.v1.content/blobs/sha256/ab"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"layer")
    [e] = eve_plan(tmp_path, release).entries
    if moves:
        assert e.target == str(tmp_path / "vault/containerd")
    else:
        assert e.target is None and e.action == "keep" and e.by_rule and e.reason


def test_converter_plan_is_a_dry_run_and_idempotent(demo_root):
    """``-n`` changes nothing, a second run finds the same: ``plan`` reads only."""
    root, _ = demo_root
    before = tree_snapshot(root)
    first = run_cli("plan", "--root", str(root), "--json", check=True).stdout
    second = run_cli("plan", "--root", str(root), "--json", check=True).stdout
    assert tree_snapshot(root) == before

    def stable(doc: str) -> dict:
        out = json.loads(doc)
        for d in out["totals"]["destinations"].values():
            del d["free"]    # the machine's other writers change it between runs
        return out

    assert stable(first) == stable(second)


# -- 4. VolumeStatus.PathName() for random configs ------------------------------

#: 5.6.0's Format enum names a legacy device can have (CONTAINER aside).
VM_FORMATS = [(n, name) for n, name in FORMAT_ENUM_56.items() if n not in (0, 8)]
INT64_MAX = 2**63 - 1


def pathname(root: str, volume_uuid: str, volume_generation: int, clear_text: bool,
             format_enum_name: str) -> str:
    """Where new EVE's volumemgr opens a volume, from EVE's rule alone
    (docs/eve.md section 1): ``<dir>/<uuid lower>#<generation %d>.<format lower>``,
    dir ``/persist/clear/volumes`` when ``clear_text`` else
    ``/persist/vault/volumes``, generation ``Volume.generationCount`` plus a
    local counter that is 0 on a device coming from the legacy layout."""
    local_generation_counter = 0
    directory = "clear/volumes" if clear_text else "vault/volumes"
    return (f"{root}/{directory}/{volume_uuid.lower()}"
            f"#{volume_generation + local_generation_counter:d}.{format_enum_name.lower()}")


@st.composite
def devices(draw):
    """A legacy device: apps, their drives and volumes, legacy names as old EVE
    built them, plus names no volume claims."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    generation = st.one_of(st.integers(0, 3), st.integers(0, INT64_MAX))
    apps = []
    for _ in range(draw(st.integers(1, 3))):
        drives = []
        for _ in range(draw(st.integers(1, 3))):
            container = draw(st.booleans())
            number, enum_name = (8, "CONTAINER") if container else draw(st.sampled_from(VM_FORMATS))
            sha_source = draw(st.sampled_from(["image", "latch", "content_tree"]))
            vol_gen = draw(generation)
            drives.append({
                "image": _uuid(rng), "sha": devicegen.random_sha(rng),
                "volume": _uuid(rng), "volume_upper": draw(st.booleans()),
                "format": number, "format_name": enum_name,
                "volume_gen": vol_gen,
                "ref_gen": draw(st.one_of(st.just(vol_gen), generation)),
                "clear_text": draw(st.booleans()), "sha_source": sha_source,
                "sha_upper": draw(st.booleans()),
            })
        apps.append({"uuid": _uuid(rng), "purge": draw(st.integers(0, 4)), "drives": drives,
                     "stale_copy": draw(st.booleans())})
    release = draw(st.sampled_from(RELEASES))
    return apps, release_text(release), draw(st.booleans())


def _write_random_device(root: Path, apps: list[dict], wrap: bool) -> None:
    """The checkpoint (``Volume`` and ``VolumeRef`` generations as drawn) and
    latch of *apps*, written directly so each drive's sha can come from where
    the draw says."""
    resp = eve_config_pb2.ConfigResponse(configHash="random")
    latch_dir = root / "status/zedmanager/AppAndImageToHash"
    latch_dir.mkdir(parents=True)
    for a in apps:
        app = resp.config.apps.add()
        app.uuidandversion.uuid = a["uuid"]
        app.displayname = "app"
        app.purge.counter = a["purge"]
        for i, d in enumerate(a["drives"]):
            drive = app.drives.add()
            drive.image.uuidandversion.uuid = d["image"]
            if d["sha_source"] == "image":
                drive.image.sha256 = d["sha"]
                drive.image.iformat = d["format"]
            vol_uuid = d["volume"].upper() if d["volume_upper"] else d["volume"]
            ref = app.volumeRefList.add()
            ref.uuid, ref.generationCount = vol_uuid, d["ref_gen"]
            vol = resp.config.volumes.add()
            vol.uuid, vol.generationCount, vol.clear_text = (
                vol_uuid, d["volume_gen"], d["clear_text"])
            if d["sha_source"] == "latch":
                drive.image.iformat = d["format"]
                devicegen.write_latch(str(latch_dir), a["uuid"], d["image"], d["sha"],
                                      a["purge"] if i == 0 else 0)
            elif d["sha_source"] == "content_tree":
                tree = resp.config.contentInfo.add()
                tree.uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, d["sha"]))
                tree.sha256, tree.iformat = d["sha"], d["format"]
                vol.origin.type = 2
                vol.origin.downloadContentTreeID = tree.uuid
    data = devicegen.encode_checkpoint(resp, wrap=wrap)
    devicegen.write_atomic(str(root / "checkpoint/lastconfig"), data)


def _legacy_name(app: dict, index: int, purge: int) -> str:
    """appRwVolumeName's rule (section 2), written out for one drive."""
    d = app["drives"][index]
    sha = d["sha"].upper() if d["sha_upper"] else d["sha"]
    stem = f"{sha}-{app['uuid']}" + (f"#{purge}" if purge else "")
    return stem if d["format"] == 8 else f"{stem}.{d['format_name'].lower()}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices())
def test_plan_places_every_volume_at_pathname(device):
    apps, release, wrap = device
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _write_random_device(root, apps, wrap)
        expected: dict[str, str] = {}        # legacy relpath -> PathName
        unclaimed: set[str] = set()
        for a in apps:
            for i, d in enumerate(a["drives"]):
                purge = a["purge"] if i == 0 else 0
                name = _legacy_name(a, i, purge)
                where = "runx/pods/prepared" if d["format"] == 8 else "img"
                expected[f"{where}/{name}"] = pathname(
                    str(root), d["volume"].upper() if d["volume_upper"] else d["volume"],
                    d["volume_gen"], d["clear_text"], d["format_name"])
                if i == 0 and a["stale_copy"]:
                    # the same drive under a purge counter the app has left behind
                    unclaimed.add(f"{where}/{_legacy_name(a, i, purge + 1)}")
        unclaimed.add(f"img/{LOWER_SHA}-{APP}.qcow2")        # an app the config does not know
        for rel in [*expected, *unclaimed]:
            if rel.startswith("img/"):
                devicegen.sparse_file(str(root / rel), 4096, {0: rel.encode()})
            else:
                (root / rel).mkdir(parents=True)

        plan = eve_plan(root, release)
        entries = by_legacy(plan)
        assert set(entries) == set(expected) | unclaimed
        for rel, path in expected.items():
            e = entries[rel]
            assert e.target == path, (rel, e.reason)
            assert e.action in ("copy", "rename")
        for rel in unclaimed:
            assert entries[rel].target is None and entries[rel].reason, rel
        # nothing lands in a name new EVE would not open: every target is one
        # of the PathNames the config's volumes give, each claimed once
        targets = [e.target for e in plan.entries if e.target is not None]
        assert sorted(targets) == sorted(expected.values())
