"""Every location of both layouts, and the rule that only layout.py spells them.

The paths of docs/layouts.md (relative to /persist): EVE's own, as its code
spells them (docs/eve.md: section 9 for the legacy layout, 1 and 6-8 for the
new one, 5 for the checkpoint), and the design note's where it differs
(``novault/volumes``, ``checkpoint/config``).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

import compatfs
from compatfs.layout import (
    DEFAULT_ROOT,
    LOCATIONS,
    Layout,
    LayoutError,
    check_relative_path,
)
from compatfs.names import DownloadArea, ObjType
from compatfs.rules import rules_for

# The defaults docs/layouts.md fixes. "cas" is checked on its own below: EVE ships
# vault/containerd (docs/eve.md section 8), the design note spelled it vault/case.
BRIEF_DEFAULTS = {
    "img": "img",
    "prepared": "runx/pods/prepared",
    "downloads": "downloads",
    "containerd": "containerd",
    "vault_volumes": "vault/volumes",
    "novault_volumes": "novault/volumes",
    "downloader": "vault/downloader",
    "verifier": "vault/verifier/verifier",
    "verified": "vault/verifier/verified",
    "checkpoint": "checkpoint/lastconfig",
    "checkpoint_alt": "checkpoint/config",
    "latch": "status/zedmanager/AppAndImageToHash",
}


def test_default_root() -> None:
    assert DEFAULT_ROOT == "/persist"
    assert Layout().root == "/persist"
    assert Layout().path("img") == "/persist/img"


@pytest.mark.parametrize("key", sorted(LOCATIONS))
def test_every_location_has_a_safe_default(key: str) -> None:
    default, what = LOCATIONS[key]
    assert isinstance(default, str) and default
    assert what.strip(), f"{key} has no description"
    # a default is itself an acceptable (already normalised) relative path
    assert check_relative_path(default) == default
    assert Layout().rel(key) == default


@pytest.mark.parametrize("key, expected", sorted(BRIEF_DEFAULTS.items()))
def test_defaults_match_the_brief(key: str, expected: str) -> None:
    assert Layout().rel(key) == expected


def test_cas_default_is_in_the_vault() -> None:
    assert Layout().rel("cas") in ("vault/containerd", "vault/case")


@pytest.mark.parametrize("key", ["vault_volumes", "downloader", "verifier", "verified", "cas",
                                 "state"])
def test_sensitive_locations_are_inside_the_vault(key: str) -> None:
    layout = Layout()
    assert layout.rel(key).startswith(layout.rel("vault") + "/")


def test_clear_text_volumes_are_outside_the_vault() -> None:
    layout = Layout()
    vault = layout.rel("vault")
    novault = layout.rel("novault_volumes")
    assert novault != vault and not novault.startswith(vault + "/")


def test_defaults_are_distinct() -> None:
    defaults = [default for default, _ in LOCATIONS.values()]
    assert len(set(defaults)) == len(defaults)


@pytest.mark.parametrize("key", sorted(LOCATIONS))
def test_path_joins_under_root(tmp_path: Path, key: str) -> None:
    root = str(tmp_path)
    layout = Layout(root)
    assert layout.root == root
    assert layout.path(key) == os.path.join(root, LOCATIONS[key][0])
    assert layout.path(key).startswith(root + "/")
    assert layout.relpath(layout.path(key)) == layout.rel(key)


def test_relative_root_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    layout = Layout("persist")
    assert layout.root == os.path.join(str(tmp_path), "persist")
    assert layout.path("vault_volumes") == os.path.join(str(tmp_path), "persist", "vault",
                                                        "volumes")


def test_unknown_key_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        Layout().path("no_such_location")


def test_override_moves_only_its_location(tmp_path: Path) -> None:
    root = str(tmp_path)
    layout = Layout(root, {"cas": "vault/case", "img": "legacy/img"})
    assert layout.rel("cas") == "vault/case"
    assert layout.path("cas") == os.path.join(root, "vault", "case")
    assert layout.path("img") == os.path.join(root, "legacy", "img")
    for key in set(LOCATIONS) - {"cas", "img"}:
        assert layout.rel(key) == LOCATIONS[key][0], key


@pytest.mark.parametrize("value, normalised", [
    ("a/b", "a/b"),
    ("a//b/", "a/b"),
    ("./a/./b", "a/b"),
    ("a b", "a b"),
])
def test_override_is_normalised(value: str, normalised: str) -> None:
    assert Layout("/r", {"vault_volumes": value}).rel("vault_volumes") == normalised
    assert check_relative_path(value) == normalised


@pytest.mark.parametrize("value", [
    "/abs/path",
    "/",
    "..",
    "../outside",
    "a/../../outside",
    "a/..",
    "",
    "   ",
    ".",
    "./",
    "a\0b",
])
@pytest.mark.parametrize("key", ["vault_volumes", "img", "checkpoint"])
def test_bad_override_names_the_key(key: str, value: str) -> None:
    with pytest.raises(LayoutError) as info:
        Layout("/r", {key: value})
    message = str(info.value)
    assert f"paths.{key}" in message
    assert "\n" not in message


@pytest.mark.parametrize("value", [None, 3, ["a"]])
def test_non_string_override_is_refused(value: object) -> None:
    with pytest.raises(LayoutError) as info:
        Layout("/r", {"img": value})  # type: ignore[dict-item]
    assert "paths.img" in str(info.value)


def test_unknown_override_key_names_the_key() -> None:
    with pytest.raises(LayoutError) as info:
        Layout("/r", {"bogus_location": "x"})
    assert "bogus_location" in str(info.value)


def test_layout_error_is_a_value_error() -> None:
    assert issubclass(LayoutError, ValueError)


def test_checkpoint_candidates_order(tmp_path: Path) -> None:
    """checkpoint/config is the design note's name: tried second there, never in eve."""
    root = str(tmp_path)
    assert Layout(root, rules=rules_for("design-note")).checkpoint_candidates() == (
        os.path.join(root, "checkpoint", "lastconfig"),
        os.path.join(root, "checkpoint", "config"),
    )
    for release in ("5.8", "17.3"):
        assert Layout(root, rules=rules_for("eve", release)).checkpoint_candidates() == (
            os.path.join(root, "checkpoint", "lastconfig"),)
    assert Layout(root).checkpoint_candidates() == (os.path.join(root, "checkpoint", "lastconfig"),)


def test_checkpoint_candidates_follow_overrides(tmp_path: Path) -> None:
    root = str(tmp_path)
    layout = Layout(root, {"checkpoint": "cp/first", "checkpoint_alt": "cp/second"},
                    rules_for("design-note"))
    assert layout.checkpoint_candidates() == (
        os.path.join(root, "cp", "first"),
        os.path.join(root, "cp", "second"),
    )


@pytest.mark.parametrize("obj_type", list(ObjType))
@pytest.mark.parametrize("area", list(DownloadArea))
def test_download_area(tmp_path: Path, obj_type: ObjType, area: DownloadArea) -> None:
    root = str(tmp_path)
    assert Layout(root).download_area(obj_type, area) == os.path.join(
        root, "downloads", obj_type.value, area.value)
    moved = Layout(root, {"downloads": "old/dl"})
    assert moved.download_area(obj_type, area) == os.path.join(
        root, "old", "dl", obj_type.value, area.value)


# -- only layout.py spells a location path ---------------------------------------

PACKAGE_DIR = Path(compatfs.__file__).parent
#: layout.py owns the paths; the testing helpers devicegen.py and devicefs.py fabricate
#: devices on purpose (paths relative to the package).
ALLOWED = {"layout.py", "testing/devicegen.py", "testing/devicefs.py"}

_MULTI = sorted({d for d, _ in LOCATIONS.values() if "/" in d})
_TOP = sorted({d.split("/")[0] for d, _ in LOCATIONS.values()})
_PATH_CALL_ROOTS = {"os", "shutil", "pathlib"}
_PATH_CALL_NAMES = {"Path", "PurePath", "PurePosixPath", "open", "join", "joinpath"}


def _bounded(part: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|/)" + re.escape(part) + r"(?:/|$)")


_MULTI_RE = [(d, _bounded(d)) for d in _MULTI]
_TOP_RE = [(d, _bounded(d)) for d in _TOP]


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _call_root(func: ast.expr) -> tuple[str | None, str | None]:
    """(leftmost name, last attribute or name) of a call's function."""
    last = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    while isinstance(func, ast.Attribute):
        func = func.value
    return (func.id if isinstance(func, ast.Name) else None), last


def _is_path_use(parent: ast.AST | None) -> bool:
    if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div):
        return True
    if isinstance(parent, ast.Call):
        root, last = _call_root(parent.func)
        return root in _PATH_CALL_ROOTS or last in _PATH_CALL_NAMES
    return False


def spelled_locations(source: str) -> list[str]:
    """Every place *source* spells a default location path as a path.

    Flags a string literal (docstrings and prose with spaces aside) that
    contains a multi-component default such as ``vault/volumes``, one that
    contains a top-level directory such as ``downloads`` between slashes, and
    a bare top-level directory name used as a path (joined, opened, divided).
    Location *keys* passed to ``layout.path("img")`` are not paths.
    """
    tree = ast.parse(source)
    docs = _docstrings(tree)
    parents = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
            continue
        s = node.value
        if id(node) in docs or any(c.isspace() for c in s):
            continue
        hits = [d for d, rx in _MULTI_RE if rx.search(s)]
        if "/" in s:
            hits += [d for d, rx in _TOP_RE if rx.search(s)]
        elif s in _TOP and _is_path_use(parents.get(id(node))):
            hits.append(s)
        if hits:
            found.append(f"line {node.lineno}: {s!r} spells {', '.join(sorted(set(hits)))}")
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py")
                  if p.relative_to(PACKAGE_DIR).as_posix() not in ALLOWED)


@pytest.mark.parametrize("module", _modules(), ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_only_layout_spells_location_paths(module: Path) -> None:
    found = spelled_locations(module.read_text(encoding="utf-8"))
    assert not found, (f"{module.name} spells location paths; ask Layout instead:\n"
                       + "\n".join(found))


def test_the_package_has_modules_to_check() -> None:
    names = {p.name for p in _modules()}
    assert {"scan.py", "resolver.py", "plan.py", "config.py", "device.py", "mount.py"} <= names
    assert "layout.py" not in names and "devicegen.py" not in names


@pytest.mark.parametrize("source", [
    'P = "vault/volumes"',
    'p = os.path.join(root, "vault", "volumes")',
    'p = os.path.join(root, "downloads", t)',
    'p = os.path.join(root, "runx/pods/prepared")',
    'p = f"{root}/runx/pods/prepared/{name}"',
    'p = f"{root}/downloads"',
    'p = root + "/img/" + name',
    'p = Path(root) / "novault" / "volumes"',
    'p = pathlib.Path(root, "checkpoint")',
    'os.listdir("img")',
    'p = "/persist/status/zedmanager/AppAndImageToHash"',
    'def f():\n    x = 1\n    return open(os.path.join(r, "checkpoint/lastconfig"))',
])
def test_detector_flags_spelled_paths(source: str) -> None:
    assert spelled_locations(source), source


@pytest.mark.parametrize("source", [
    'p = layout.path("img")',
    'p = layout.path("downloads")',
    'p = layout.path("containerd")',
    'KEYS = ("vault_volumes", "novault_volumes", "cas")',
    'd = {"checkpoint": 1, "vault": 2}',
    '"""Docstring naming runx/pods/prepared and vault/volumes."""',
    'def f():\n    """``downloads/``: the legacy tree."""',
    'HELP = "Also mount a view over runx/pods/prepared (container volumes)."',
    'p = os.path.join(layout.download_area(t, a), "verified")',
])
def test_detector_ignores_keys_and_prose(source: str) -> None:
    assert spelled_locations(source) == [], source
