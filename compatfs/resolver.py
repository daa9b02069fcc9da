"""Resolving legacy names to their place in the new layout.

:class:`VolumeMap` is the pure part: built once from a decoded checkpoint, the
latch and the operator's overrides, it answers "where does this legacy volume
belong?" with a dictionary lookup. :class:`Resolver` owns the device state
behind it (which checkpoint file, which latch) and rebuilds the map when any
of it changes, since the controller keeps sending configs while old agents
run. What depends on the target layout is asked of its
:class:`~compatfs.rules.Rules` (``docs/resolution.md``, ``docs/eve.md``).

Volumes, in both layouts:

1. drive *i* of an app pairs with ``volumeRefList[i]``;
2. the app's purge counter applies to its first drive only;
3. a drive's sha is its image's ``sha256``, else the latch's entry for
   (app, image, purge counter), else the sha of the content tree the
   volume's origin names;
4. a legacy name matches by (app, sha), sha compared case-insensitively, and
   its purge counter must be the one the drive was built with; anything else
   stays where it is, with the reason;
5. its format must be the drive's: a VM volume's suffix is the drive image's
   format (else its content tree's), lower case, as volumemgr named the file;
   a container directory needs a container drive. A config without a format
   confirms no suffix, so several names for one drive never become several
   volumes; a suffix that is not a ``Format`` name is never placed;
6. an operator override for (app, sha) wins over all of the above (its
   ``format``, else the checkpoint's for that drive, else any, is required);
7. the new name is ``<lower volume UUID>#<generation>.<format>`` in
   ``vault/volumes``, or in the layout's clear-text directory for a
   ``clear_text`` volume (``clear/volumes`` in eve, ``novault/volumes`` in
   design-note).

Per layout:

- the generation is ``Volume.generationCount`` in eve (what volumemgr names
  the file by; a ``VolumeRef`` that says otherwise is reported as a problem),
  the reference's in design-note;
- downloads in progress (``pending/``, ``verifier/``) move in design-note; in
  eve they stay in the legacy store, served by the views (no EVE release reads
  them moved);
- verified downloads move for the rules' object types only (not ``cert.obj``
  in eve), named as the target's verifier keeps them: the bare lower-case sha,
  or from EVE 11.8 ``<sha>.<escaped media type>``, which is known only for a
  sha the checkpoint names as a disk image (an OCI layer); otherwise it stays;
- the legacy containerd tree moves only when the target runs it from the CAS
  location;
- ``checkpoint/config`` is read when ``lastconfig`` is absent in design-note
  only (:meth:`Layout.checkpoint_candidates`).

A resolution with no target is either not placed *yet* (a volume the config
does not map: its new objects wait in the unresolved area) or kept in the
legacy store by the rules (``by_rule``: new objects are created there).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from . import checkpoint, latch
from .checkpoint import EMPTY_CONFIG, CheckpointError, DeviceConfig, FileSignature
from .config import Override
from .layout import Layout
from .names import CONTAINER_FORMAT, DownloadArea, LegacyVolumeName, ObjType, is_uuid
from .rules import DEFAULT_RULES, OCI_LAYER_MEDIA_TYPE, Rules, release_text

#: The suffixes EVE gives a volume: the names of the protobuf ``Format`` enum, lower case.
FORMAT_NAMES = frozenset(f for f in checkpoint.FORMAT_SUFFIX.values() if f is not None)


@dataclass(frozen=True)
class VolumeTarget:
    """The volume a legacy name belongs to."""

    volume_uuid: str
    generation: int
    clear_text: bool
    origin: str          # "checkpoint" or "override"

    def file_name(self, fmt: str) -> str:
        return f"{self.volume_uuid}#{self.generation}.{fmt}"


@dataclass(frozen=True)
class Resolution:
    """Where a legacy object belongs (``target``, absolute) or why it stays (``reason``)."""

    target: str | None
    reason: str | None = None
    volume: VolumeTarget | None = None
    location: str | None = None   # the Layout key of the target's directory
    #: no target because the target layout keeps the object in the legacy store
    #: (not because nothing maps it yet): a new one is created there too
    by_rule: bool = False

    @property
    def resolved(self) -> bool:
        return self.target is not None


@dataclass(frozen=True)
class _Binding:
    """One drive of one app, as far as the config tells."""

    index: int
    sha: str | None       # lower case
    purge: int            # the purge counter its legacy name carries
    fmt: str | None       # the format its legacy name carries, None if the config gives none
    target: VolumeTarget | None
    reason: str | None    # why it cannot be placed, when target is None


def _short(sha: str) -> str:
    return sha[:12] + "…" if len(sha) > 12 else sha


def _format_of(name: LegacyVolumeName) -> str:
    """The format a legacy name says its volume has (a directory: a container)."""
    return name.fmt if name.fmt is not None else CONTAINER_FORMAT


def _what(fmt: str) -> str:
    return "a container directory" if fmt == CONTAINER_FORMAT else f"suffix .{fmt}"


def _target_name(rules: Rules) -> str:
    """How a reason names the target: ``EVE 17.3`` or ``the design note's layout``."""
    if rules.release is None:
        return "the design note's layout"
    return f"EVE {release_text(rules.release)}"


def _mismatch(name: LegacyVolumeName, expected: str, where: str) -> str:
    return (f"format {_format_of(name)} does not match the config: {where} is {expected} "
            f"(legacy name: {_what(expected)})")


class VolumeMap:
    """(app UUID, sha) -> volume, built from one state of the device."""

    def __init__(self, config: DeviceConfig, latch_: latch.Latch,
                 overrides: tuple[Override, ...] = (), unusable: str | None = None,
                 rules: Rules = DEFAULT_RULES) -> None:
        self.unusable = unusable
        self.rules = rules
        self.problems: list[str] = []
        #: lower-case sha -> the media type the target names its verified blob by,
        #: or why none can be derived (built once here, looked up per name)
        self.media_types: dict[str, str] = {}
        self.no_media_type: dict[str, str] = {}
        if rules.verified_media_type:
            self._media_types(config)
        self._apps: dict[str, tuple[_Binding, ...]] = {}
        self._overrides = {
            (o.app.lower(), o.sha.lower()): (VolumeTarget(o.volume.lower(), o.generation,
                                                          o.clear_text, "override"), o.format)
            for o in overrides
        }
        for app in config.apps:
            if not is_uuid(app.uuid):
                self.problems.append(f"app {app.uuid!r} ({app.name}) has no valid UUID; ignored")
                continue
            self._apps[app.uuid] = tuple(self._bind(config, latch_, app, i, d)
                                          for i, d in enumerate(app.drives))

    def _media_types(self, config: DeviceConfig) -> None:
        """Which verified shas the target can name: EVE gives the root blob of a
        content tree whose format is known and not a container the OCI layer
        media type; a container image's comes from its registry, and a sha the
        config does not name (or names without a format) has none to derive."""
        formats: dict[str, set[str | None]] = {}
        for tree in config.content_trees.values():
            if tree.sha:
                formats.setdefault(tree.sha.lower(), set()).add(tree.fmt)
        for app in config.apps:
            for drive in app.drives:
                if drive.sha:
                    formats.setdefault(drive.sha.lower(), set()).add(drive.fmt)
        for sha, fmts in formats.items():
            if CONTAINER_FORMAT in fmts:
                self.no_media_type[sha] = ("the checkpoint names it as a container image, "
                                           "whose media type only its registry gives")
            elif None in fmts:
                self.no_media_type[sha] = "the checkpoint gives its image no format"
            else:
                self.media_types[sha] = OCI_LAYER_MEDIA_TYPE

    def media_type(self, sha: str) -> str | None:
        """The media type of verified blob *sha* (lower case), None when unknown."""
        return self.media_types.get(sha)

    def no_media_type_reason(self, sha: str) -> str:
        """Why :meth:`media_type` has none for *sha* (not a hot path)."""
        if self.unusable is not None:
            return self.unusable
        return self.no_media_type.get(
            sha, "the checkpoint names no content tree or drive image of this sha, so its "
                 "media type (part of the name) is unknown")

    def _bind(self, config: DeviceConfig, latch_: latch.Latch, app: checkpoint.AppSpec,
              index: int, drive: checkpoint.DriveSpec) -> _Binding:
        purge = app.purge if index == 0 else 0
        ref = app.volume_refs[index] if index < len(app.volume_refs) else None
        vol = config.volumes.get(ref.uuid) if ref is not None else None
        tree = config.content_trees.get(vol.content_tree) \
            if vol is not None and vol.content_tree else None
        sha = drive.sha or latch_.lookup(app.uuid, drive.image_uuid, purge)
        if not sha and tree is not None:
            sha = tree.sha
        sha = sha.lower() if sha else None
        fmt = drive.fmt or (tree.fmt if tree is not None else None)
        where = f"drive {index} of app {app.uuid}"
        if ref is None:
            return _Binding(index, sha, purge, fmt, None, f"{where} has no volumeRefList entry")
        if not is_uuid(ref.uuid):
            return _Binding(index, sha, purge, fmt, None,
                            f"{where} refers to volume {ref.uuid!r}, not a UUID")
        if vol is None:
            return _Binding(index, sha, purge, fmt, None,
                            f"{where} refers to volume {ref.uuid}, "
                            "which the config does not define")
        generation = vol.generation if self.rules.generation_from_volume else ref.generation
        if self.rules.generation_from_volume and ref.generation != vol.generation:
            self.problems.append(
                f"{where}: volumeRefList says generation {ref.generation} for volume "
                f"{ref.uuid}, the volume itself {vol.generation}; the volume is placed under "
                f"#{vol.generation} (the name volumemgr opens), and the app's reference will "
                f"not meet it until the controller sends matching counters")
        if generation < 0:
            return _Binding(index, sha, purge, fmt, None,
                            f"{where}: negative generation counter {generation}")
        return _Binding(index, sha, purge, fmt,
                        VolumeTarget(ref.uuid, generation, vol.clear_text, "checkpoint"), None)

    def volume_for(self, name: LegacyVolumeName) -> VolumeTarget | str:
        """The volume *name* belongs to, or the reason it has none."""
        app, sha = name.app_lower, name.sha_lower
        override = self._overrides.get((app, sha))
        if override is not None:
            target, fmt = override
            if fmt is None:
                fmt = next((b.fmt for b in self._apps.get(app, ())
                            if b.sha == sha and b.purge == name.purge), None)
            if fmt is not None and _format_of(name) != fmt:
                return _mismatch(name, fmt, f"the override for app {app} sha {_short(sha)}")
            return target
        if self.unusable is not None:
            return self.unusable
        bindings = self._apps.get(app)
        if bindings is None:
            return f"app {app} is not in the checkpointed config"
        same_sha = [b for b in bindings if b.sha == sha]
        if not same_sha:
            known = ", ".join(f"drive {b.index}: {_short(b.sha) if b.sha else 'no sha'}"
                              for b in bindings) or "no drives"
            return f"sha {_short(sha)} matches no drive of app {app} ({known})"
        for b in same_sha:
            if b.purge == name.purge:
                if b.target is None:
                    return str(b.reason)
                where = f"drive {b.index} of app {app}"
                if b.fmt is None:
                    return (f"the config gives no format for {where}: "
                            f"{_what(_format_of(name))} cannot be confirmed")
                if _format_of(name) != b.fmt:
                    return _mismatch(name, b.fmt, where)
                return b.target
        expected = ", ".join(str(b.purge) for b in same_sha)
        return (f"purge counter {name.purge} is stale: drive {same_sha[0].index} of app {app} "
                f"is at purge counter {expected}")


_NO_CHECKPOINT = "no checkpointed config yet (first boot): nothing can be mapped"


def _kept(path: str | None, why: str | None, last: Snapshot) -> str:
    """The problem that says the last good config is still the one in use."""
    assert last.read_at is not None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last.read_at))
    using = (f"using the last good one, {last.checkpoint_path} read at {when} "
             f"(config hash {last.config.config_hash or 'none'})")
    if why is None:   # gone: EVE never deletes it; kept while this process runs
        return (f"checkpoint {path} is gone; {using}, until a new one is written "
                "(a process started now has none)")
    return f"checkpoint {path} unusable ({why}); {using}"


@dataclass(frozen=True)
class _State:
    checkpoint: FileSignature | None
    latch_dir: tuple[int, int] | None


@dataclass(frozen=True)
class Snapshot:
    """One reading of the device state; replaced whole, never changed."""

    state: _State | None
    checkpoint_path: str | None
    config: DeviceConfig
    map: VolumeMap
    problems: tuple[str, ...]
    read_at: float | None = None   # wall time ``config`` was read; None: never read one


class Resolver:
    """Resolves legacy names under one :class:`Layout`, re-reading device state on change.

    ``refresh()`` costs two ``lstat`` calls when nothing changed; call it from a
    background task or before a scan, never per request. In the daemon it runs
    in a worker thread while the event loop resolves names: it builds a new
    :class:`Snapshot` and publishes it with one assignment, so a reader sees
    either the old state or the new one, never a mix.
    """

    def __init__(self, layout: Layout, overrides: tuple[Override, ...] = ()) -> None:
        self.layout = layout
        self.overrides = overrides
        self.snapshot = Snapshot(None, None, EMPTY_CONFIG,
                                 VolumeMap(EMPTY_CONFIG, latch.EMPTY_LATCH, overrides,
                                           _NO_CHECKPOINT, layout.rules), ())
        self._lock = threading.Lock()     # one refresh at a time
        self._forced = False
        self.refresh()

    @property
    def checkpoint_path(self) -> str | None:
        return self.snapshot.checkpoint_path

    @property
    def config(self) -> DeviceConfig:
        return self.snapshot.config

    @property
    def map(self) -> VolumeMap:
        return self.snapshot.map

    @property
    def problems(self) -> tuple[str, ...]:
        return self.snapshot.problems

    # -- device state ----------------------------------------------------
    def _current_state(self) -> _State:
        sig = None
        for path in self.layout.checkpoint_candidates():
            sig = checkpoint.signature(path)
            if sig is not None:
                break
        try:
            st = os.stat(self.layout.path("latch"))
            latch_sig: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            latch_sig = None
        return _State(sig, latch_sig)

    def invalidate(self) -> None:
        """Make the next :meth:`refresh` re-read everything, changed or not."""
        self._forced = True

    def refresh(self) -> bool:
        """Rebuild the map if the checkpoint or the latch changed; True if rebuilt.

        Never blocks on what it reads (:mod:`compatfs.untrusted`) and never
        raises for a bad checkpoint or latch: those are :attr:`problems`. A
        checkpoint being rewritten may take up to
        :data:`compatfs.checkpoint.STABLE_READ_SECONDS` to read.
        """
        with self._lock:
            forced, self._forced = self._forced, False
            state = self._current_state()
            if state == self.snapshot.state and not forced:
                return False
            self.snapshot = self._read(state)
            return True

    def _read(self, state: _State) -> Snapshot:
        """A new snapshot for *state*. Only a checkpoint read whole and settled
        is used (:func:`compatfs.checkpoint.read_stable`). When it cannot be
        used (torn, changing, not parsing, gone) after a good one was read, the
        last good config stays in use, said in :attr:`problems`; the next
        refresh whose signature differs reads it again. Without a good one,
        nothing is mapped."""
        problems: list[str] = []
        unusable = None
        cfg, read_at = EMPTY_CONFIG, None
        sig = state.checkpoint
        path = sig.path if sig else None
        why = None            # why the checkpoint at *path* cannot be used now
        if path is not None:
            try:
                cfg, sig = checkpoint.read_with_signature(path, beneath=self.layout.root)
                read_at = time.time()
            except FileNotFoundError:
                path = None
            except CheckpointError as exc:
                why = str(exc).removeprefix(f"{path}: ")
        last = self.snapshot if self.snapshot.read_at is not None else None
        if read_at is None and last is not None:
            # torn, changing, unparseable or gone: place by the last good config
            cfg, read_at = last.config, last.read_at
            problems.append(_kept(path or last.checkpoint_path, why, last))
            path = last.checkpoint_path
        elif path is None:
            unusable = _NO_CHECKPOINT
        elif why is not None:
            unusable = f"checkpoint unusable: {path}: {why}"
            problems.append(unusable)
        latch_ = latch.load(self.layout.path("latch"), beneath=self.layout.root)
        problems.extend(latch_.problems)
        vmap = VolumeMap(cfg, latch_, self.overrides, unusable, self.layout.rules)
        problems.extend(vmap.problems)
        # the signature of the version decoded (it may be newer than *state*'s)
        return Snapshot(_State(sig, state.latch_dir), path, cfg, vmap, tuple(problems),
                        read_at)

    # -- resolution ------------------------------------------------------
    def _volume(self, name: LegacyVolumeName, fmt: str) -> Resolution:
        found = self.map.volume_for(name)
        if isinstance(found, str):
            return Resolution(None, found)
        if fmt not in FORMAT_NAMES:
            return Resolution(None, f"suffix .{fmt} is not a volume format EVE names a volume "
                                    f"by ({', '.join(sorted(FORMAT_NAMES))})", by_rule=True)
        location = self.layout.volume_location(found.clear_text)
        return Resolution(os.path.join(self.layout.path(location), found.file_name(fmt)),
                          None, found, location)

    def resolve_vm(self, name: LegacyVolumeName) -> Resolution:
        """A parsed ``img/<sha>-<app>[#<purge>].<fmt>``."""
        assert name.fmt is not None
        if name.fmt == CONTAINER_FORMAT:
            return Resolution(None, "a container volume is a directory in the prepared "
                                    "location, never a file named .container")
        return self._volume(name, name.fmt)

    def resolve_container(self, name: LegacyVolumeName) -> Resolution:
        """A parsed ``runx/pods/prepared/<sha>-<app>[#<purge>]``."""
        return self._volume(name, CONTAINER_FORMAT)

    def resolve_download(self, obj_type: ObjType, area: DownloadArea,
                         directory: str, file_name: str) -> Resolution:
        """A file ``downloads/<objType>/<area>/<directory>/<file_name>``.

        *directory* and *file_name* must already be checked components (an
        image ID, or a lower-case sha for the verified area). The object
        type is not part of the new names; the index keeps it.
        """
        rules = self.layout.rules
        if area is DownloadArea.VERIFIED:
            if obj_type not in rules.verified_types:
                kept = ", ".join(sorted(t.value for t in rules.verified_types))
                return Resolution(None, f"a verified {obj_type.value} object stays in the "
                                        f"legacy store: {_target_name(rules)} moves only "
                                        f"{kept} ones", by_rule=True)
            sha = directory.lower()
            name = rules.verified_name(sha, self.map.media_type(sha))
            if name is None:
                return Resolution(None, f"no name {_target_name(rules)} keeps can be derived: "
                                        f"{self.map.no_media_type_reason(sha)}; it stays in "
                                        "the legacy store (a bare-sha name would be deleted "
                                        "at start and downloaded again)", by_rule=True)
            return Resolution(os.path.join(self.layout.path("verified"), name),
                              location="verified")
        if not rules.move_transient:
            return Resolution(None, f"a download in progress stays in the legacy store, served "
                                    f"by the views: no EVE release reads {area.value}/<id>/<file> "
                                    "moved (new releases name their own and clear the rest at "
                                    "start); it is downloaded again after the upgrade",
                              by_rule=True)
        if area is DownloadArea.PENDING:
            base = os.path.join(self.layout.path("downloader"), "pending")
            location = "downloader"
        else:
            base, location = self.layout.path("verifier"), "verifier"
        return Resolution(os.path.join(base, directory, file_name), location=location)

    def resolve_containerd(self) -> Resolution:
        """The legacy ``containerd`` tree moves whole into the CAS location, when
        the target runs its containerd from there."""
        rules = self.layout.rules
        if not rules.move_containerd:
            return Resolution(None, f"{_target_name(rules)} runs its own containerd from this "
                                    "tree (up to EVE 7.10 it is the system containerd's root): "
                                    "it stays where it is", by_rule=True)
        return Resolution(self.layout.path("cas"), location="cas")
