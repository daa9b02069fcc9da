"""Every path of both /persist layouts, in one place.

Nothing else in compatfs spells a path under the root: code asks a
:class:`Layout` for the directory it needs. Each location has a key (the same
key the YAML config uses under ``paths:`` to override it) and a default path
relative to the root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from types import MappingProxyType

from .names import DownloadArea, ObjType
from .rules import DEFAULT_RULES, Rules

DEFAULT_ROOT = "/persist"

#: key -> (default path relative to the root, what lives there)
LOCATIONS: Mapping[str, tuple[str, str]] = MappingProxyType({
    # legacy layout
    "img": ("img", "legacy VM volumes <sha>-<appUUID>[#<purge>].<format>"),
    "prepared": ("runx/pods/prepared", "legacy container volumes <sha>-<appUUID>[#<purge>]"),
    "downloads": ("downloads", "legacy downloads <objType>/{pending,verifier,verified}"),
    "containerd": ("containerd", "legacy content-addressable storage"),
    # new layout
    "vault": ("vault", "the fscrypt-encrypted vault"),
    "vault_volumes": ("vault/volumes", "encrypted volumes <volumeUUID>#<generation>.<format>"),
    "clear_volumes": ("clear/volumes", "clear-text volumes <volumeUUID>#<generation>.<format> "
                      "(layout eve)"),
    "novault_volumes": ("novault/volumes", "clear-text volumes <volumeUUID>#<generation>.<format> "
                        "(layout design-note)"),
    "downloader": ("vault/downloader", "downloads in progress, owned by the downloader"),
    "verifier": ("vault/verifier/verifier", "objects being verified, owned by the verifier"),
    "verified": ("vault/verifier/verified", "verified objects, flat, named by lower-case sha256"),
    "cas": ("vault/containerd", "content-addressable storage (the design note said vault/case)"),
    # device state read by the resolver
    "checkpoint": ("checkpoint/lastconfig", "the checkpointed controller config"),
    "checkpoint_alt": ("checkpoint/config", "the design note's name for the checkpoint, "
                       "tried second (layout design-note only)"),
    "latch": ("status/zedmanager/AppAndImageToHash",
              "zedmanager's (app, image, purge) -> sha latch"),
    # compatfs' own state
    "state": ("vault/compatfs", "compatfs' own durable state, inside the vault; also "
              "staging/ and set-aside/ of the vault's locations"),
    "clear_compatfs": ("clear/compatfs", "staging/ and set-aside/ of clear/volumes, beside it "
                       "(layout eve)"),
    "novault_compatfs": ("novault/compatfs", "staging/ and set-aside/ of novault/volumes, "
                         "beside it (layout design-note)"),
    "unresolved": ("vault/compatfs/unresolved",
                   "objects created through a legacy name before the config maps them"),
})


class LayoutError(ValueError):
    """A path given for a location is not acceptable."""


def check_relative_path(value: str) -> str:
    """Return *value* normalised if it is a safe path relative to the root.

    Raises :class:`LayoutError` for an absolute path, an empty one, or one that
    climbs out of the root with ``..``.
    """
    if not isinstance(value, str) or not value.strip():
        raise LayoutError("must be a non-empty path relative to the root")
    if "\0" in value:
        raise LayoutError("must not contain a NUL byte")
    p = PurePosixPath(value)
    if p.is_absolute():
        raise LayoutError(f"{value!r} must be relative to the root, not absolute")
    if any(part == ".." for part in p.parts):
        raise LayoutError(f"{value!r} must not contain '..'")
    norm = str(p)
    if norm in ("", "."):
        raise LayoutError("must name a directory below the root, not the root itself")
    return norm


@dataclass(frozen=True)
class Layout:
    """Where every location lives under one root.

    ``overrides`` maps location keys to paths relative to ``root``; ``rules``
    are those of the target layout (:mod:`compatfs.rules`), which decide, for
    example, where clear-text volumes go.
    """

    root: str = DEFAULT_ROOT
    overrides: Mapping[str, str] = field(default_factory=dict)
    rules: Rules = DEFAULT_RULES
    #: every location's path relative to the root, overrides applied (set once, below)
    _rel: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.overrides) - set(LOCATIONS)
        if unknown:
            raise LayoutError("unknown location " + ", ".join(sorted(unknown)))
        rel = {key: default for key, (default, _) in LOCATIONS.items()}
        for key, value in self.overrides.items():
            try:
                rel[key] = check_relative_path(value)
            except LayoutError as exc:
                raise LayoutError(f"paths.{key}: {exc}") from None
        object.__setattr__(self, "root", os.path.abspath(self.root))
        object.__setattr__(self, "_rel", MappingProxyType(rel))

    # -- generic ----------------------------------------------------------
    def rel(self, key: str) -> str:
        """The path of location *key*, relative to the root."""
        return self._rel[key]

    def path(self, key: str) -> str:
        """The absolute path of location *key*."""
        return os.path.join(self.root, self.rel(key))

    def relpath(self, absolute: str) -> str:
        """*absolute* expressed relative to the root (for reports)."""
        return os.path.relpath(absolute, self.root)

    # -- legacy layout ----------------------------------------------------
    def download_area(self, obj_type: ObjType, area: DownloadArea) -> str:
        """``downloads/<objType>/<area>``, absolute."""
        return os.path.join(self.path("downloads"), obj_type.value, area.value)

    # -- new layout -------------------------------------------------------
    def volume_location(self, clear_text: bool) -> str:
        """The location key of a volume's directory: the vault's, or the target
        layout's directory for clear-text volumes."""
        return self.rules.clear_volumes if clear_text else "vault_volumes"

    def checkpoint_candidates(self) -> tuple[str, ...]:
        """The checkpoint paths in the order they are tried: ``lastconfig``, and
        the design note's ``checkpoint/config`` only when the rules name it (no
        EVE release writes it)."""
        if self.rules.checkpoint_alt:
            return (self.path("checkpoint"), self.path("checkpoint_alt"))
        return (self.path("checkpoint"),)
