"""Resolving legacy names to their place in the new layout.

:class:`VolumeMap` is the pure part: built once from a decoded checkpoint, the
latch and the operator's overrides, it answers "where does this legacy volume
belong?" with a dictionary lookup. :class:`Resolver` owns the device state
behind it (which checkpoint file, which latch) and rebuilds the map when any
of it changes, since the controller keeps sending configs while old agents
run. The rules (``docs/resolution.md``):

1. drive *i* of an app pairs with ``volumeRefList[i]``;
2. the app's purge counter applies to its first drive only;
3. a drive's sha is its image's ``sha256``, else the latch's entry for
   (app, image, purge counter), else the sha of the content tree the
   volume's origin names;
4. ``clear_text`` on the volume means ``novault``;
5. a legacy name matches by (app, sha), sha compared case-insensitively, and
   its purge counter must be the one the drive was built with; anything else
   stays where it is, with the reason;
6. its format must be the drive's: a VM volume's suffix is the drive image's
   format (else its content tree's), lower case, as volumemgr named the file;
   a container directory needs a container drive. A config without a format
   confirms no suffix, so several names for one drive never become several
   volumes;
7. an operator override for (app, sha) wins over all of the above (its
   ``format``, else the checkpoint's for that drive, else any, is required).
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


def _mismatch(name: LegacyVolumeName, expected: str, where: str) -> str:
    return (f"format {_format_of(name)} does not match the config: {where} is {expected} "
            f"(legacy name: {_what(expected)})")


class VolumeMap:
    """(app UUID, sha) -> volume, built from one state of the device."""

    def __init__(self, config: DeviceConfig, latch_: latch.Latch,
                 overrides: tuple[Override, ...] = (), unusable: str | None = None) -> None:
        self.unusable = unusable
        self.problems: list[str] = []
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

    @staticmethod
    def _bind(config: DeviceConfig, latch_: latch.Latch, app: checkpoint.AppSpec,
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
                            f"{where} refers to volume {ref.uuid}, which the config does not define")
        if ref.generation < 0:
            return _Binding(index, sha, purge, fmt, None,
                            f"{where}: negative generation counter {ref.generation}")
        return _Binding(index, sha, purge, fmt,
                        VolumeTarget(ref.uuid, ref.generation, vol.clear_text, "checkpoint"), None)

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


def _kept(path: str | None, why: str | None, last: "Snapshot") -> str:
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
                                           _NO_CHECKPOINT), ())
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
        vmap = VolumeMap(cfg, latch_, self.overrides, unusable)
        problems.extend(vmap.problems)
        # the signature of the version decoded (it may be newer than *state*'s)
        return Snapshot(_State(sig, state.latch_dir), path, cfg, vmap, tuple(problems),
                        read_at)

    # -- resolution ------------------------------------------------------
    def _volume(self, name: LegacyVolumeName, fmt: str) -> Resolution:
        found = self.map.volume_for(name)
        if isinstance(found, str):
            return Resolution(None, found)
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
        del obj_type  # kept by the caller's index, not in the new name
        if area is DownloadArea.VERIFIED:
            return Resolution(os.path.join(self.layout.path("verified"), directory.lower()),
                              location="verified")
        if area is DownloadArea.PENDING:
            base = os.path.join(self.layout.path("downloader"), "pending")
            location = "downloader"
        else:
            base, location = self.layout.path("verifier"), "verifier"
        return Resolution(os.path.join(base, directory, file_name), location=location)

    def resolve_containerd(self) -> Resolution:
        """The legacy ``containerd`` tree moves whole into the CAS location."""
        return Resolution(self.layout.path("cas"), location="cas")
