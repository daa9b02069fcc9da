"""The YAML configuration file: its schema, its validation, its defaults.

Every key is declared once in :data:`SCHEMA` (type, default, meaning); the
same table validates files, fills defaults and is rendered in
``docs/configuration.md`` (a test keeps the two in step). A bad file gives one
:class:`ConfigError` naming the file, the line and the key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from .enums import Stage
from .layout import DEFAULT_ROOT, LOCATIONS, Layout, LayoutError, check_relative_path
from .names import CONTAINER_FORMAT, INT64_MAX, KNOWN_FORMATS, is_sha256, is_uuid
from .rules import DEFAULT_RELEASE, LAYOUTS, Rules, UnknownRelease, release_text, rules_for
from .untrusted import UntrustedFileError, read_regular

#: How a copy is checked against its source (``migration.verify``): ``copy``
#: reads every piece back as it is written (YAML ``true``), ``readback`` also
#: re-reads the whole copy from disk at the end, ``off`` (YAML ``false``) neither.
VERIFY_MODES = ("copy", "readback", "off")
#: A configuration file larger than this is refused unread (real ones are a
#: few hundred bytes; a list of overrides for every app of a device is a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024
#: Deepest nesting of mappings and lists accepted; the schema needs three
#: (``overrides`` -> item -> value). Deeper YAML is refused before it is built.
MAX_DEPTH = 32


class ConfigError(Exception):
    """A configuration file or value is not acceptable; ``str()`` is one line."""


@dataclass(frozen=True)
class Override:
    """An operator's mapping of (app, sha) to a volume, winning over the checkpoint."""

    app: str
    sha: str
    volume: str
    generation: int = 0
    clear_text: bool = False
    format: str | None = None   # the legacy name's format; None: the checkpoint's, else any


@dataclass(frozen=True)
class Migration:
    """How the background migration runs (the ``migration:`` mapping)."""

    throttle_mib_per_s: float = 16.0
    concurrency: int = 2
    reserve_percent: float = 5.0
    retries: int = 3
    retry_backoff_s: float = 10.0
    verify: str = "copy"
    rescan_s: float = 30.0


@dataclass(frozen=True)
class Config:
    root: str = DEFAULT_ROOT
    stage: Stage = Stage.OBSERVE
    layout_name: str = "eve"          # the ``layout`` key (``layout()`` builds the Layout)
    eve_release: str = release_text(DEFAULT_RELEASE)
    require_encrypted_vault: bool = True
    paths: dict[str, str] = field(default_factory=dict)
    overrides: tuple[Override, ...] = ()
    mount_prepared: bool = False
    vault_wait_s: float = 30.0
    migration: Migration = field(default_factory=Migration)
    source: str = "<defaults>"

    @property
    def rules(self) -> Rules:
        """The rules of the target layout (checked when the file was parsed)."""
        return rules_for(self.layout_name,
                         self.eve_release if self.layout_name == "eve" else None)

    def layout(self, root: str | None = None) -> Layout:
        """The layout under *root* (default: the configured root)."""
        return Layout(root or self.root, self.paths, self.rules)


# -- schema -------------------------------------------------------------------

class _Bad(Exception):
    """Raised by a checker; carries the text after 'key: '."""


def _str_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in choices:
            raise _Bad(f"must be one of {', '.join(choices)}, not {v!r}")
        return v
    return check


def _stage(v: Any) -> Stage:
    return Stage(_str_choice(tuple(Stage))(v))


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, not {v!r}")
    return v


def _format(v: Any) -> str:
    if not isinstance(v, str) or v not in KNOWN_FORMATS | {CONTAINER_FORMAT}:
        raise _Bad(f"must be one of {', '.join(sorted(KNOWN_FORMATS | {CONTAINER_FORMAT}))}, "
                   f"not {v!r}")
    return v


def _verify(v: Any) -> str:
    if v is True:
        return "copy"
    if v is False:
        return "off"
    if v == "readback":
        return "readback"
    raise _Bad(f"must be true, false or readback, not {v!r}")


def _release(v: Any) -> str:
    if isinstance(v, float):    # YAML reads 9.10 as the number 9.1: ask for a string
        raise _Bad(f"must be a quoted string such as \"{v}\" (9.10 and 9.1 are one number), "
                   f"not the number {v!r}")
    if not isinstance(v, str):
        raise _Bad(f"must be a string <major>.<minor>, not {v!r}")
    try:
        rules_for("eve", v)
    except UnknownRelease as exc:
        raise _Bad(str(exc)) from None
    return v


def _abs_path(v: Any) -> str:
    if not isinstance(v, str) or not v.startswith("/") or "\0" in v:
        raise _Bad(f"must be an absolute path, not {v!r}")
    return os.path.normpath(v)


def _rel_path(v: Any) -> str:
    try:
        return check_relative_path(v)
    except LayoutError as exc:
        raise _Bad(str(exc)) from None


def _uuid(v: Any) -> str:
    if not isinstance(v, str) or not is_uuid(v):
        raise _Bad(f"must be a UUID, not {v!r}")
    return v.lower()


def _sha(v: Any) -> str:
    if not isinstance(v, str) or not is_sha256(v):
        raise _Bad(f"must be a 64-digit sha256, not {v!r}")
    return v.lower()


def _number(low: float, high: float) -> Callable[[Any], float]:
    """A finite number from *low* to *high* (NaN and infinity are refused)."""
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) \
                or (isinstance(v, float) and not math.isfinite(v)) or not low <= v <= high:
            raise _Bad(f"must be a number from {low:g} to {high:g}, not {v!r}")
        return float(v)
    return check


def _whole(low: int, high: int) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise _Bad(f"must be a whole number from {low} to {high}, not {v!r}")
        return v
    return check


def _generation(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= INT64_MAX:
        raise _Bad(f"must be a whole number from 0, not {v!r}")
    return v


@dataclass(frozen=True)
class Key:
    check: Callable[[Any], Any]
    default: Any
    doc: str


TOP: dict[str, Key] = {
    "root": Key(_abs_path, DEFAULT_ROOT, "The /persist directory both layouts live under."),
    "stage": Key(_stage, Stage.OBSERVE,
                 "Rollout stage: off, observe, redirect, migrate or rollback."),
    "layout": Key(_str_choice(LAYOUTS), "eve",
                  "Target layout: eve (what EVE's code reads) or design-note."),
    "eve_release": Key(_release, release_text(DEFAULT_RELEASE),
                       "EVE release the device upgrades to, <major>.<minor> (layout eve)."),
    "require_encrypted_vault": Key(_bool, True,
                                   "Refuse to put vault-bound data in a directory the kernel "
                                   "does not report as fscrypt-encrypted."),
    "vault_wait_s": Key(_number(0, 3600), 30.0,
                        "How long a redirect or migrate daemon waits for the vault to be "
                        "unlocked before serving in observe instead."),
    "mount_prepared": Key(_bool, False,
                          "Also mount a legacy view over runx/pods/prepared (container volumes)."),
    "paths": Key(dict, {}, "Location overrides, each relative to root (see the table below)."),
    "migration": Key(dict, {}, "How the background migration runs (see the table below)."),
    "overrides": Key(list, [], "Operator mappings of (app, sha) to a volume; "
                               "they win over the checkpoint."),
}

OVERRIDE: dict[str, Key] = {
    "app": Key(_uuid, None, "App instance UUID of the legacy name."),
    "sha": Key(_sha, None, "sha256 of the legacy name (any case)."),
    "volume": Key(_uuid, None, "Volume UUID it belongs to."),
    "generation": Key(_generation, 0, "Generation counter of the new name."),
    "clear_text": Key(_bool, False, "Place it in novault (not encrypted)."),
    "format": Key(_format, None, "Format of the volume, as its legacy name's suffix; only a "
                  "name with this suffix is placed (default: the checkpoint's, else any)."),
}

REQUIRED_OVERRIDE_KEYS = ("app", "sha", "volume")

MIGRATION: dict[str, Key] = {
    "throttle_mib_per_s": Key(_number(0, 100_000), 16.0,
                              "Copy rate limit over all copies, MiB/s; 0 means unlimited."),
    "concurrency": Key(_whole(1, 16), 2, "How many objects are copied at once."),
    "reserve_percent": Key(_number(0, 50), 5.0,
                           "Free space a copy must leave on the destination, % of its size."),
    "retries": Key(_whole(1, 100), 3, "Attempts before an object is marked failed."),
    "retry_backoff_s": Key(_number(0, 86400), 10.0,
                           "Wait before the first retry; doubles each time."),
    "verify": Key(_verify, "copy", "Check each copy against its source before switching to it: "
                  "true, false or readback."),
    "rescan_s": Key(_number(1, 86400), 30.0,
                    "How often the legacy locations are scanned for work."),
}


# -- loading ------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false are booleans.

    YAML 1.1 also reads yes/no/on/off as booleans, which would turn
    ``stage: off`` into ``False``; here they stay strings.

    Mappings and lists nest at most :data:`MAX_DEPTH` deep: the composer
    recurses once per level, so deeper input would exhaust Python's stack.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels",
                    # types-PyYAML leaves Parser.peek_event unannotated; it returns an Event
                    self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Loader.yaml_implicit_resolvers.setdefault(_first, []).insert(
        0, ("tag:yaml.org,2002:bool",
            re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")))


def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _mapping(source: str, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(source, node)}: {what}: must be a mapping")
    seen: set[str] = set()
    out: list[tuple[str, yaml.Node, yaml.Node]] = []
    for knode, vnode in node.value:
        if not isinstance(knode, yaml.ScalarNode) or knode.tag != "tag:yaml.org,2002:str":
            raise ConfigError(f"{_where(source, knode)}: {what}: keys must be plain names")
        key = knode.value
        if not key.isprintable():
            raise ConfigError(f"{_where(source, knode)}: {what}: key {key!r} is not printable")
        if key in seen:
            raise ConfigError(f"{_where(source, knode)}: {_join(what, key)}: duplicate key")
        seen.add(key)
        out.append((key, knode, vnode))
    return out


def _join(prefix: str, key: str) -> str:
    return key if prefix == "top level" else f"{prefix}.{key}"


def _value(loader: _Loader, source: str, node: yaml.Node, name: str, key: Key) -> Any:
    if key.check in (dict, list):
        return node  # structured; validated by the caller
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(source, node)}: {name}: must be a single value")
    value = _construct(loader, node, f"{_where(source, node)}: {name}")
    try:
        return key.check(value)
    except _Bad as exc:
        raise ConfigError(f"{_where(source, node)}: {name}: {exc}") from None


def _construct(loader: _Loader, node: yaml.ScalarNode, where: str) -> Any:
    """The value of a scalar, or a :class:`ConfigError` saying *where* it is bad
    (a number of thousands of digits is past what Python converts)."""
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError) as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        if isinstance(exc, ValueError) and "digits" in problem:
            problem = f"a number of {len(node.value)} characters is far out of range"
        raise ConfigError(f"{where}: not a value: {problem}") from None


def parse(text: str, source: str = "<config>") -> Config:
    """Validate YAML *text*; raises :class:`ConfigError` with file and line."""
    loader = None
    try:
        loader = _Loader(text)
        root_node = loader.get_single_node()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{source}:{line}: not valid YAML: special character "
                          f"{exc.character!r} is not allowed") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at_line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}{at_line}: not valid YAML: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if root_node is None or (isinstance(root_node, yaml.ScalarNode)
                             and root_node.tag == "tag:yaml.org,2002:null"):
        return Config(source=source)
    values: dict[str, Any] = {}
    for key, knode, vnode in _mapping(source, root_node, "top level"):
        spec = TOP.get(key)
        if spec is None:
            raise ConfigError(f"{_where(source, knode)}: {key}: unknown key "
                              f"(known: {', '.join(TOP)})")
        values[key] = _value(loader, source, vnode, key, spec)

    paths: dict[str, str] = {}
    if "paths" in values:
        for key, knode, vnode in _mapping(source, values["paths"], "paths"):
            if key not in LOCATIONS:
                raise ConfigError(f"{_where(source, knode)}: paths.{key}: unknown location "
                                  f"(known: {', '.join(LOCATIONS)})")
            paths[key] = _value(loader, source, vnode, f"paths.{key}",
                                Key(_rel_path, None, ""))
    overrides = []
    if "overrides" in values:
        seq = values["overrides"]
        if not isinstance(seq, yaml.SequenceNode):
            raise ConfigError(f"{_where(source, seq)}: overrides: must be a list")
        for i, item in enumerate(seq.value):
            name = f"overrides[{i}]"
            fields = {}
            for key, knode, vnode in _mapping(source, item, name):
                spec = OVERRIDE.get(key)
                if spec is None:
                    raise ConfigError(f"{_where(source, knode)}: {name}.{key}: unknown key "
                                      f"(known: {', '.join(OVERRIDE)})")
                fields[key] = _value(loader, source, vnode, f"{name}.{key}", spec)
            missing = [k for k in REQUIRED_OVERRIDE_KEYS if k not in fields]
            if missing:
                raise ConfigError(f"{_where(source, item)}: {name}: missing "
                                  + ", ".join(missing))
            overrides.append(Override(**fields))
    migration = {}
    if "migration" in values:
        for key, knode, vnode in _mapping(source, values["migration"], "migration"):
            spec = MIGRATION.get(key)
            if spec is None:
                raise ConfigError(f"{_where(source, knode)}: migration.{key}: unknown key "
                                  f"(known: {', '.join(MIGRATION)})")
            migration[key] = _value(loader, source, vnode, f"migration.{key}", spec)
    keys = {k: v for k, v in values.items() if k not in ("paths", "overrides", "migration")}
    if "layout" in keys:
        keys["layout_name"] = keys.pop("layout")
    if "eve_release" in keys and keys.get("layout_name", "eve") != "eve":
        node = next(v for k, _, v in _mapping(source, root_node, "top level") if k == "eve_release")
        raise ConfigError(f"{_where(source, node)}: eve_release: applies to layout eve only")
    return Config(paths=paths, overrides=tuple(overrides), migration=Migration(**migration),
                  source=source, **keys)


def parse_setting(key: Key, text: str, name: str) -> Any:
    """*text* as the value of *key* (``compatfs ctl set``): read as a YAML scalar,
    checked as the same key in a file would be; raises :class:`ConfigError`."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if key.check in (dict, list) or not isinstance(node, yaml.ScalarNode):
            raise ConfigError(f"{name}: must be a single value, not {text!r}")
        value = _construct(loader, node, name)
    except yaml.YAMLError:
        raise ConfigError(f"{name}: not a value: {text[:80]!r}") from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        return key.check(value)
    except _Bad as exc:
        raise ConfigError(f"{name}: {exc}") from None


def load(path: str | None) -> Config:
    """Load the config file at *path*; ``None`` means all defaults.

    The file is the operator's, named on the command line: a symbolic link to
    it is followed (a config kept elsewhere and linked is common), but only a
    regular file of at most :data:`MAX_CONFIG_BYTES` is read, never blocking
    (a FIFO is refused, see :mod:`compatfs.untrusted`).
    """
    if path is None:
        return Config()
    try:
        data = read_regular(path, MAX_CONFIG_BYTES, follow_symlinks=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UntrustedFileError as exc:
        raise ConfigError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    return parse(text, path)
