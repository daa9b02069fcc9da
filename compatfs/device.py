"""One way to open a device: its config, layout, resolver, stores, index and view.

The daemon, ``migrate --now``, ``rollback``, the read-only inspection view
(``debug-mount``), ``status`` and ``plan`` all work on the same things of one
root. This module is where they are found and opened, in one order and with
one set of checks, so that what ``status`` reports is what ``mount`` would do:

- :func:`locate`: the config's layout of a root and its resolver, nothing
  opened (``plan``, ``status``);
- :func:`index_of`: its index, proven sound, in any of the modes the callers
  need (made, read-only, or neither);
- :func:`free_views`: whether the views' legacy locations are free to serve
  (a dead daemon's views are replaced or refused);
- :func:`open_device`: the device to serve or migrate: waits for the vault in a
  placing stage, creates what that stage places into, refuses a plain vault
  when the config requires encryption, and makes the index on a first start;
  a failure is a :class:`DeviceError` with one line saying why;
- :func:`inspect_device`: the device as it is, creating and changing nothing
  (opened read-only, observe stage, only the views that exist);
- :meth:`Device.close`: closes what either opened.

It serves nothing and moves nothing: mounting is :mod:`compatfs.daemon`'s, the
migration :mod:`compatfs.migration`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import fscrypt, mounts
from .backing import Backing
from .config import Config
from .enums import PLACING_STAGES, Stage, StoreKey, ViewName
from .index import Index, IndexRefused
from .indexopen import open_index
from .layout import Layout
from .resolver import Resolver
from .view import View

if TYPE_CHECKING:
    from .migration import Migrator

log = logging.getLogger(__name__)


class DeviceError(Exception):
    """The device cannot be opened; the message says why, in one line."""


@dataclass
class DeviceRoot:
    """A root as its config lays it out: what compatfs knows before opening anything."""

    cfg: Config
    layout: Layout
    resolver: Resolver


def locate(cfg: Config, root: str) -> DeviceRoot:
    """*root* as *cfg* lays it out, and its resolver (which reads the checkpoint)."""
    layout = cfg.layout(root)
    return DeviceRoot(cfg, layout, Resolver(layout, cfg.overrides))


def index_of(layout: Layout, *, create: bool, read_only: bool = False,
             root_fd: int | None = None) -> Index | None:
    """The index of the device *layout* lays out, proven sound
    (:func:`compatfs.indexopen.open_index`); None when none was ever made and *create*
    is false. Raises :class:`IndexRefused` or ``OSError``."""
    return open_index(layout.root, layout.rel("state"), create=create, read_only=read_only,
                      root_fd=root_fd)


@dataclass
class Device(DeviceRoot):
    """An opened device: its stores, its index and the view serving *views* in *stage*."""

    stage: Stage
    views: tuple[ViewName, ...]
    backing: Backing
    index: Index
    view: View

    def bases(self) -> dict[str, str]:
        """Each view's legacy directory, by the path of its open fd (the migration's sources)."""
        return {view: f"/proc/self/fd/{self.backing.get(view).fd}" for view in self.views}

    def recover(self, migrator: Migrator) -> None:
        """Finish or undo what a crash left half done, before anything is served or moved."""
        for line in migrator.recover():
            log.info("recovery: %s", line)

    def close(self) -> None:
        self.index.close()
        self.backing.close()


def free_views(layout: Layout, views: tuple[ViewName, ...], *,
               replace_dead: bool) -> frozenset[ViewName]:
    """Check that nothing is mounted on the legacy locations of *views*; the views a
    daemon that died left there, to replace (only with *replace_dead*: else they
    are refused like any other mount)."""
    dead: set[ViewName] = set()
    for view in views:
        target = layout.path(view)
        entry = mounts.mounted_at(target)
        if entry is None:
            continue
        state = mounts.view_state(target) if entry.fstype == mounts.FSTYPE else None
        if replace_dead and state == "dead":
            dead.add(view)     # a dead daemon's: replaced, not uncovered
            continue
        if state == "not answering":
            raise DeviceError(f"{target} is served by a compatfs daemon that is alive but "
                              "does not answer (stopped or blocked); kill it, then mount "
                              "again: its views are replaced without uncovering the "
                              "legacy directories")
        raise DeviceError(f"{target} is already a mount point")
    return frozenset(dead)


def open_device(cfg: Config, root: str, stage: Stage, views: tuple[ViewName, ...], *,
                covered: frozenset[ViewName] = frozenset()) -> Device:
    """The device at *root*, opened to serve or migrate *views* in *stage*.

    In a placing stage the vault is waited for (``vault_wait_s``); one still
    locked then makes the device open in stage observe instead (the returned
    ``stage`` says which). The views in *covered* have a dead daemon's mount on
    their legacy location (:func:`free_views`).
    """
    # The views create files for agents with exactly the mode the agent asked
    # for minus the agent's own umask (applied in Operations); the kernel
    # must not mask it again with ours. So every file and directory compatfs
    # makes for itself passes an explicit mode: the run dir's in
    # rundir.RunDir, the vault's in Backing and the migrator.
    os.umask(0)
    layout = cfg.layout(root)
    if stage in PLACING_STAGES and not _wait_for_vault(layout, cfg.vault_wait_s):
        log.warning("the vault %s was not unlocked within %g s; serving in stage observe "
                    "instead of %s", layout.path("vault"), cfg.vault_wait_s, stage)
        stage = Stage.OBSERVE
    placing = stage in PLACING_STAGES
    require = cfg.require_encrypted_vault
    try:
        backing = Backing.open(layout, views, placing, require, covered=frozenset(covered))
    except OSError as exc:   # from makedirs/open, beneath the root without links
        where = os.path.join(layout.root, os.fsdecode(exc.filename or ""))
        raise DeviceError(f"cannot open {where}: {exc.strerror} (compatfs opens its "
                          "locations without following symbolic links; what is there "
                          "must be a directory, or absent for compatfs to make it)") from None
    except Exception as exc:  # noqa: BLE001 - VaultNotEncrypted: its message says all
        raise DeviceError(str(exc)) from None
    try:
        index = _open_index(layout, backing, placing, require)
    except BaseException:
        backing.close()
        raise
    resolver = Resolver(layout, cfg.overrides)   # the checkpoint as it is once all is open
    for problem in resolver.problems:
        log.warning("%s", problem)
    view = View(layout, backing, index, resolver, stage, views)
    return Device(cfg, layout, resolver, stage, views, backing, index, view)


def inspect_device(cfg: Config, root: str, views: tuple[ViewName, ...]) -> Device:
    """The device at *root* as it is, for looking only: nothing is created, the
    index is opened read-only, the view serves the *views* present, in observe.
    Raises ``OSError`` (``ENOENT`` when no legacy location exists) or
    :class:`IndexRefused`: a refused index is not shown as empty."""
    layout = cfg.layout(root)
    backing = Backing.open(layout, views, create_new=False, require_encrypted=False,
                           read_only=True)
    present = tuple(v for v in views if backing.has(v))
    if not present:
        backing.close()
        raise OSError(errno.ENOENT, f"no legacy location under {layout.root}")
    try:   # proven sound as mount proves it
        index = index_of(layout, create=False, read_only=True,
                         root_fd=backing.get(StoreKey.ROOT).fd)
    except BaseException:
        backing.close()
        raise
    opened = index if index is not None else Index(None)
    resolver = Resolver(layout, cfg.overrides)
    view = View(layout, backing, opened, resolver, Stage.OBSERVE, present)
    return Device(cfg, layout, resolver, Stage.OBSERVE, present, backing, opened, view)


def _wait_for_vault(layout: Layout, seconds: float) -> bool:
    """Wait up to *seconds* for the vault to exist and be unlocked.

    A vault that exists but is not encrypted is not waited for: placing
    data there is refused later (require_encrypted_vault), or allowed.
    """
    deadline = time.monotonic() + seconds
    path = layout.path("vault")
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            unlocked = False
        else:
            try:
                unlocked = fscrypt.key_present(fd) is not False
            except OSError:
                unlocked = True  # no encryption support: nothing to wait for
            finally:
                os.close(fd)
        if unlocked:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def _open_index(layout: Layout, backing: Backing, placing: bool, require: bool) -> Index:
    """The index, proven sound: made on a first start in a placing stage; in
    observe, an empty in-memory one when none was ever made."""
    state = layout.path("state")
    try:
        if placing and require and os.path.isdir(state) \
                and not fscrypt.path_is_encrypted(state):
            raise DeviceError(f"{state} is not encrypted; refusing to keep the index "
                              "there (require_encrypted_vault)")
        index = index_of(layout, create=placing, root_fd=backing.get(StoreKey.ROOT).fd)
    except IndexRefused as exc:
        raise DeviceError(str(exc)) from None
    except OSError as exc:
        raise DeviceError(f"cannot open the index in {state}: {exc.strerror or exc}") from None
    return index if index is not None else Index(None)  # observe, nothing ever placed
