"""rename(2) through the views: the one change that can move a name across stores.

A rename in a view may move a placed object to its new name's place, keep
bytes on their side of the vault boundary (an agent never waits for a copy
and never sees ``EXDEV``), replace what the new name held, and must stay all
or nothing as the agent sees it, with a crash in between left to the
recovery. That is the largest single piece of the namespace, so it lives
here; :class:`compatfs.view.View` holds one :class:`Rename` and gives it
itself as the :class:`Namespace` it works on.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Protocol

from .backing import Backing
from .index import Index
from .indexformat import Record
from .placement import Placement, split, undo
from .stores import Store

log = logging.getLogger(__name__)


class Namespace(Protocol):
    """What a rename needs of the views' namespace (:class:`compatfs.view.View`)."""

    backing: Backing
    index: Index

    def locate(self, vpath: str) -> tuple[Store, str, Record | None]: ...
    def lstat(self, vpath: str) -> os.stat_result: ...
    def listdir(self, vdir: str) -> list[str]: ...
    def inside(self, vpath: str) -> Placement | None: ...
    def plain_place(self, vpath: str) -> Placement: ...
    def placement(self, vpath: str, is_dir: bool) -> Placement: ...
    def usable(self, p: Placement) -> bool: ...
    def prepare(self, p: Placement) -> tuple[Store, list[str]]: ...
    def placed(self, rec: Record | None, vpath: str) -> bool: ...
    def forget(self, vpath: str) -> None: ...
    def drop_legacy_shadow(self, vpath: str, directory: bool) -> None: ...
    def tidy_new_dirs(self, store_key: str, rel: str) -> None: ...


class Rename:
    """Renames in the namespace *ns*."""

    __slots__ = ("ns",)

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns

    def __call__(self, old: str, new: str, noreplace: bool = False) -> None:
        """Rename *old* to *new* in the view, replacing *new* like rename(2).

        All or nothing: every check that can refuse comes first; the one
        step that makes the new name visible (an index write, or a rename(2))
        is the commit point; what fails before it is undone."""
        src_store, src_rel, src_rec = self.ns.locate(old)
        st = src_store.lstat(src_rel)
        is_dir = stat.S_ISDIR(st.st_mode)
        try:
            dst_st: os.stat_result | None = self.ns.lstat(new)
        except (FileNotFoundError, NotADirectoryError):
            dst_st = None
        if dst_st is not None:
            if noreplace:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new)
            if (dst_st.st_dev, dst_st.st_ino) == (st.st_dev, st.st_ino):
                return      # the same object (or a hard link to it): rename(2) does nothing
            dst_dir = stat.S_ISDIR(dst_st.st_mode)
            if is_dir and not dst_dir:
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), new)
            if dst_dir and not is_dir:
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), new)
            if dst_dir and self.ns.listdir(new):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), new)
        replaced = self.ns.index.records.get(new) if dst_st is not None else None
        if self.ns.placed(src_rec, old):
            assert src_rec is not None
            self._rename_placed(src_rec, new, is_dir, dst_st is not None, replaced)
            return
        src_in, dst_in = self.ns.inside(old), self.ns.inside(new)
        if src_in is None and dst_in is None:
            self._rename_legacy(old, new, is_dir, src_rec, replaced)
            return
        # within placed directories (container volumes): rename(2) there, or EXDEV
        dst = dst_in or self.ns.plain_place(new)
        src_store.rename(src_rel, self.ns.backing.get(dst.store), dst.rel)

    def _drop_replaced(self, new: str, replaced: Record | None, shadow: bool, is_dir: bool,
                       keep: tuple[str, str]) -> None:
        """After a rename over *new* committed: remove what *new* named before
        (its placed bytes, unless the rename itself replaced them at *keep*,
        and a legacy-store object under it). Clean-up only: it logs."""
        if replaced is not None and (replaced.store, replaced.rel) != keep \
                and self.ns.backing.has(replaced.store):
            store = self.ns.backing.get(replaced.store)
            try:
                (store.rmdir if is_dir else store.unlink)(replaced.rel)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("%s: the object it replaced is left at %s/%s: %s", new,
                            replaced.store, replaced.rel, exc.strerror)
            else:
                self.ns.tidy_new_dirs(replaced.store, replaced.rel)
        if shadow or replaced is not None:
            top, rest = split(new)
            if (top, rest) != keep:
                self.ns.drop_legacy_shadow(new, directory=is_dir)

    def _rename_legacy(self, old: str, new: str, is_dir: bool, src_rec: Record | None,
                       replaced: Record | None) -> None:
        """Bytes in the legacy store stay there; the migrator places them later.

        The rename(2) in the legacy store commits (it replaces a legacy object
        under *new* atomically); then the index follows. Should the index
        refuse (a full disk), the rename is taken back. A crash in between
        leaves *new* with a record and a legacy file: the start-up reconcile
        serves the newer and sets the other aside (nothing is lost)."""
        old_top, old_rest = split(old)
        new_top, new_rest = split(new)
        old_store, new_store = self.ns.backing.get(old_top), self.ns.backing.get(new_top)
        old_store.rename(old_rest, new_store, new_rest)
        below = is_dir and (old in self.ns.index.children or self.ns.index.has_below(old))
        try:
            if replaced is not None:
                self.ns.index.delete(new)
            if below:
                self.ns.index.rename_prefix(old, new)
        except Exception:
            undo(old, new_store.rename, new_rest, old_store, old_rest)
            if replaced is not None and new not in self.ns.index.records:
                undo(new, self.ns.index.put, replaced)
            raise
        if src_rec is not None:      # kept for its state only: it does not follow the name
            self.ns.forget(old)
        self._drop_replaced(new, replaced, False, is_dir, keep=(new_top, new_rest))

    def _rename_placed(self, rec: Record, new: str, is_dir: bool, dst_exists: bool,
                       replaced: Record | None) -> None:
        """A placed object: follow the new name to its place when rename(2) can.

        The index write that names the new place (with the old one in
        prev_store/prev_rel) is the commit point for a crash: recovery
        finishes or rolls back the move. A failure before the bytes moved
        (the directory cannot be made, ENOSPC, EPERM) restores the record as
        it was and removes the directories made for it."""
        shadow = dst_exists and replaced is None
        want = self.ns.placement(new, is_dir)
        if replaced is not None and (want.store, want.rel) == (replaced.store, replaced.rel):
            free = True           # rename(2) replaces the bytes of *new* in place
        else:
            free = self.ns.usable(want)
        cur_store = self.ns.backing.get(rec.store)
        if want.is_legacy or (want.store, want.rel) == (rec.store, rec.rel) or not free:
            # keep the bytes where they are; only the legacy name changes (one
            # transaction, which also replaces the row of *new*)
            self.ns.index.move(rec.view, Record(new, rec.store, rec.rel,
                                             want.kind if not want.is_legacy else rec.kind,
                                             rec.state))
            self._drop_replaced(new, replaced, shadow, is_dir, keep=(rec.store, rec.rel))
            return
        target, made = self.ns.prepare(want)
        try:
            self.ns.index.move(rec.view, Record(new, want.store, want.rel, want.kind, want.state,
                                             rec.store, rec.rel))
        except Exception:
            target.remove_made(made)
            raise
        try:
            cur_store.rename(rec.rel, target, want.rel)
        except Exception as exc:
            target.remove_made(made)
            if not (isinstance(exc, OSError) and exc.errno == errno.EXDEV):
                self._restore(rec, new, replaced)
                raise
            # across the vault boundary: the bytes stay, the migrator moves them
            try:
                self.ns.index.put(Record(new, rec.store, rec.rel, want.kind, rec.state))
            except Exception:
                self._restore(rec, new, replaced)
                raise
            self._drop_replaced(new, replaced, shadow, is_dir, keep=(rec.store, rec.rel))
            return
        try:
            self.ns.index.put(Record(new, want.store, want.rel, want.kind, want.state))
        except Exception as exc:  # noqa: BLE001 - moved; the next start drops prev
            log.warning("%s: moved; its record names the old place as prev until the "
                        "next start: %s", new, exc)
        self._drop_replaced(new, replaced, shadow, is_dir, keep=(want.store, want.rel))
        self.ns.tidy_new_dirs(rec.store, rec.rel)

    def _restore(self, rec: Record, new: str, replaced: Record | None) -> None:
        """Put the records of a rename that failed before its bytes moved back."""
        undo(rec.view, self.ns.index.move, new, rec)
        if replaced is not None:
            undo(new, self.ns.index.put, replaced)
        if self.ns.index.records.get(rec.view) is not rec:
            # the index cannot be written: memory at least says what is true
            # (the disk row names the old place as prev; recovery rolls back)
            self.ns.index._forget(new)
            self.ns.index._remember(rec)
            if replaced is not None:
                self.ns.index._remember(replaced)
