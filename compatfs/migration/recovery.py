"""The one recovery, run once at start before serving: finish or undo what a crash interrupted.

Every change compatfs makes commits its intent to the index before it moves
bytes, the views' (a placed object renamed: ``prev_store``/``prev_rel``; a
copy set aside: ``target_store``/``target_rel``) and the migration's
(``renaming``, ``copying``, ``copied``, ``switched``, ``rolling-back``). After
a crash the index says what was under way; :func:`recover` looks at what is on
disk and finishes each change or takes it back, in this order:

1. the migration's records (:func:`_recover_move`), then its temporaries that
   no record copies any more;
2. the views' interrupted moves, and records whose bytes are gone
   (:func:`_recover_placed`);
3. a legacy copy found beside a placed one (:func:`_reconcile`): the newer is
   served, the other set aside (recorded first, then moved).

One record that cannot be recovered never stops the others; each change is
reported as one line for the log.
"""

from __future__ import annotations

import logging
import os
import stat

from .. import snapshotid
from ..enums import Kind, State, StoreKey
from ..indexformat import Record
from ..placement import Placement, split
from ..stores import Store, aside_name
from ..view import View
from .faults import Faults
from .progress import Item, why
from .steps import Steps, drop_tmp_dir, signature

log = logging.getLogger(__name__)


def recover(view: View, steps: Steps | None = None) -> list[str]:
    """Finish or undo every change a crash interrupted; returns what was done,
    one line per object. Runs once, before the views serve. *steps* are the
    migrator's (sharing its fault hook); by default, steps of their own."""
    if steps is None:
        steps = Steps(view.backing, view.index, Faults())
    done: list[str] = []
    for rec in list(view.index.records.values()):
        try:
            line = _recover_move(view, steps, rec)
        except Exception as exc:  # noqa: BLE001 - one record never stops the others
            line = f"{rec.view}: not recovered: {why(exc)}"
        if line:
            done.append(line)
    steps.tidy_temporaries()
    for rec in list(view.index.records.values()):
        try:
            _recover_placed(view, rec, done)
        except OSError as exc:  # one bad record never stops the others
            done.append(f"{rec.view}: not recovered: {exc}")
    for rec in list(view.index.records.values()):
        try:
            _reconcile(view, rec, done)
        except OSError as exc:
            done.append(f"{rec.view}: not reconciled: {exc}")
            log.warning("%s: a legacy copy and a placed copy could not be reconciled: %s",
                        rec.view, exc)
    return done


# -- the migration's records ---------------------------------------------------------------

def _recover_move(view: View, steps: Steps, rec: Record) -> str | None:
    backing, index = view.backing, view.index
    if rec.state == State.ROLLING_BACK:
        return _recover_rollback(view, steps, rec)
    if rec.state == State.NEW and rec.target_store and rec.target_rel:
        return steps.finish_set_aside(rec)
    if rec.state not in (State.RENAMING, State.COPYING, State.COPIED, State.SWITCHED):
        return None
    if not (backing.has(rec.store) and rec.target_store
            and backing.has(rec.target_store) and rec.target_rel):
        return None
    here, there = backing.get(rec.store), backing.get(rec.target_store)
    if rec.state == State.RENAMING:
        if there.exists(rec.target_rel) and not here.exists(rec.rel):
            index.put(Record(rec.view, rec.target_store, rec.target_rel, rec.kind, State.NEW))
            return f"{rec.view}: finished an interrupted rename"
        if rec.kind == Kind.OCI_VOLUME:    # what the move wrote into it first
            snapshotid.drop(here, rec.rel, snapshotid.legacy_name(rec.view))
        index.delete(rec.view)
        return f"{rec.view}: an interrupted rename had not happened; stays"
    if rec.state == State.COPYING:
        item = Item(rec.view, rec.kind, rec.kind == Kind.OCI_VOLUME, rec.store, rec.rel,
                    rec.target_store, rec.target_rel, 0, "copy")
        steps.settle(item)
        return f"{rec.view}: dropped an interrupted copy; it will start again"
    if rec.state == State.COPIED:
        try:
            st: os.stat_result | None = here.lstat(rec.rel)
        except FileNotFoundError:
            st = None
        tmp = steps.find_temporary(there, rec.target_rel)
        unchanged = st is not None and (stat.S_ISDIR(st.st_mode) or signature(st) == rec.sig)
        if unchanged and (tmp is not None or there.exists(rec.target_rel)):
            reason = None
            if tmp is not None:
                reason = steps.rename_into_place(there, rec.target_rel, tmp)
            index.put(Record(rec.view, rec.target_store, rec.target_rel, rec.kind,
                             State.SWITCHED, target_store=rec.store, target_rel=rec.rel,
                             sig=rec.sig, reason=reason))
            switched = index.get(rec.view)
            assert switched is not None
            steps.finish_removal(switched)
            return f"{rec.view}: switched to its finished copy"
        # the source changed (or went) after the copy: the copy is stale
        if tmp is not None:
            tmp[0].remove(tmp[1])
        else:
            there.remove(rec.target_rel)
        index.delete(rec.view)
        return f"{rec.view}: its source changed after the copy; the copy was dropped"
    # switched
    steps.finish_removal(rec)
    return f"{rec.view}: removed the legacy original after the switch"


def _recover_rollback(view: View, steps: Steps, rec: Record) -> str | None:
    """A rollback was interrupted and the views are served again: if the new copy
    is still there it is what is served; a half-made legacy temporary goes."""
    backing = view.backing
    if not (backing.has(rec.store) and rec.target_store and rec.target_rel
            and backing.has(rec.target_store)):
        return None
    legacy = backing.get(rec.target_store)
    for store, name in steps.temporaries(legacy, rec.target_rel):
        store.remove(name)
    drop_tmp_dir(legacy)
    if backing.get(rec.store).exists(rec.rel):
        if legacy.exists(rec.target_rel):
            # both exist: the move back happened; finish it as rollback would
            steps.finish_rollback(rec)
            return f"{rec.view}: finished an interrupted rollback"
        view.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, State.NEW))
        return f"{rec.view}: an interrupted rollback was undone; served from {rec.store}"
    view.index.delete(rec.view)
    return f"{rec.view}: an interrupted rollback had finished; served from the legacy store"


# -- the views' records --------------------------------------------------------------------

def _recover_placed(view: View, rec: Record, done: list[str]) -> None:
    """A view's move a crash interrupted (finish it, or roll it back when it cannot
    be finished); a record whose bytes are gone is dropped."""
    backing, index = view.backing, view.index
    if not backing.has(rec.store):
        return  # a location not available now (locked vault): leave it be
    store = backing.get(rec.store)
    if rec.target_store is not None and rec.target_rel is not None \
            and rec.state in (State.LEGACY, State.NEW, State.UNRESOLVED):
        _finish_set_aside(view, rec, done)
        return
    if rec.prev_store is not None and rec.prev_rel is not None:
        if not store.exists(rec.rel) and backing.has(rec.prev_store) \
                and backing.get(rec.prev_store).exists(rec.prev_rel):
            try:
                backing.get(rec.prev_store).rename(rec.prev_rel, view.prepare(
                    Placement(rec.store, rec.rel, rec.kind, rec.state))[0], rec.rel)
                done.append(f"{rec.view}: finished an interrupted move")
            except OSError:
                # back in the unresolved area it is unresolved again, so a
                # later config change can still place it
                state = State.UNRESOLVED if rec.prev_store == StoreKey.UNRESOLVED \
                    else rec.state
                index.put(Record(rec.view, rec.prev_store, rec.prev_rel, rec.kind, state))
                done.append(f"{rec.view}: rolled back an interrupted move")
                return
        index.put(Record(rec.view, rec.store, rec.rel, rec.kind, rec.state))
    if not store.exists(rec.rel):
        index.delete(rec.view)
        done.append(f"{rec.view}: its bytes are gone; record dropped")
        return
    top, rest = split(rec.view)
    parent = rest.rpartition("/")[0]
    if top in view.views and parent:
        backing.get(top).makedirs(parent)


# -- reconcile: a legacy copy beside a placed one ----------------------------------------
# While the views are mounted nobody else can write under a legacy name, so
# a file at the legacy path of a placed name appears only while they are
# not: in particular a boot whose vault stayed locked serves stage observe
# with no index (it lives in the vault), and an agent re-creates its volume
# in the legacy store. Both copies are found once, at start, before
# serving; lookups need no check (and stay one dict lookup).

def _kind_of(mode: int) -> str:
    """What a file type is called in messages."""
    for test, name in ((stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "special file"


def _age(store: Store, rel: str, st: os.stat_result) -> tuple[int, int]:
    """How new an object's data is, for choosing between two copies: the
    newest (mtime_ns, ctime_ns) of the object and, for a directory (a
    container volume), of everything below it. Compared as a pair: mtime
    first, ctime on a tie."""
    newest = (st.st_mtime_ns, st.st_ctime_ns)
    if not stat.S_ISDIR(st.st_mode):
        return newest
    fd = store.open_dir(rel)
    try:
        for _, dirs, files, dfd in os.fwalk(".", dir_fd=fd):
            for name in dirs + files:
                try:
                    s = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                newest = max(newest, (s.st_mtime_ns, s.st_ctime_ns))
    finally:
        os.close(fd)
    return newest


def _reconcile(view: View, rec: Record, done: list[str]) -> None:
    """If *rec*'s name also has a legacy copy, serve the newer and set the
    other aside (record first, then move: :func:`_finish_set_aside`)."""
    backing = view.backing
    top, rest = split(rec.view)
    if rec.state not in (State.NEW, State.UNRESOLVED) or rec.target_store is not None \
            or not view.placed(rec, rec.view) or top not in view.views \
            or not backing.has(rec.store) or not backing.has(top):
        return
    legacy, placed = backing.get(top), backing.get(rec.store)
    try:
        legacy_st = legacy.lstat(rest)      # the common case ends here: ENOENT
    except (FileNotFoundError, NotADirectoryError):
        return
    placed_st = placed.lstat(rec.rel)
    # only a copy of the same kind can win: a regular file for a file, a
    # directory for a tree; a symbolic link, a FIFO or a device planted at
    # the legacy name is set aside like an older copy, never served instead
    same_kind = stat.S_IFMT(legacy_st.st_mode) == stat.S_IFMT(placed_st.st_mode) \
        and (stat.S_ISREG(legacy_st.st_mode) or stat.S_ISDIR(legacy_st.st_mode))
    if same_kind and _age(legacy, rest, legacy_st) > _age(placed, rec.rel, placed_st):
        where = aside_name(rec.rel)
        reason = (f"a newer legacy copy was found (written while this name was served "
                  f"from the legacy store, e.g. a boot with the vault locked); it is "
                  f"served, and the copy in {rec.store} was set aside at "
                  f"{placed.aside_shown(where)}")
        view.index.put(Record(rec.view, top, rest, rec.kind, State.LEGACY, rec.store,
                              rec.rel, target_store=rec.store, target_rel=where,
                              reason=reason))
    else:
        where = aside_name(rest)
        what = "an older legacy copy" if same_kind else \
            f"a {_kind_of(legacy_st.st_mode)} at its legacy path (not a copy of it)"
        reason = (f"{what} was found beside it (written while this name was served "
                  f"from the legacy store, e.g. a boot with the vault locked); it was "
                  f"set aside at {legacy.aside_shown(where)}")
        view.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, rec.state,
                              target_store=top, target_rel=where, reason=reason))
    log.warning("%s: both a legacy copy and a copy in %s exist; %s", rec.view, rec.store,
                reason)
    _finish_set_aside(view, view.index.records[rec.view], done)


def _finish_set_aside(view: View, rec: Record, done: list[str]) -> None:
    """A set-aside is recorded: move the losing copy (idempotent), then
    drop the move from the record and keep its reason.

    The record names the copy served (store, rel) and where the other one
    goes (target_store, target_rel); for a legacy winner the other one's
    place is in prev_store/prev_rel, otherwise it is the legacy path."""
    assert rec.target_store is not None and rec.target_rel is not None
    loser_store: str | None
    loser_rel: str | None
    if rec.state == State.LEGACY:
        loser_store, loser_rel = rec.prev_store, rec.prev_rel
    else:
        loser_store, loser_rel = split(rec.view)
    if loser_store is None or loser_rel is None or not view.backing.has(rec.target_store):
        return
    store = view.backing.get(rec.target_store)
    if store.exists(loser_rel):     # else moved before a crash (or gone): done
        store.move_aside(loser_rel, rec.target_rel)
        done.append(f"{rec.view}: set {rec.target_store}/{loser_rel} aside at "
                    f"{store.aside_shown(rec.target_rel)}")
    view.index.put(Record(rec.view, rec.store, rec.rel, rec.kind, rec.state,
                          reason=rec.reason))
    if rec.state == State.LEGACY:
        view.tidy_new_dirs(rec.target_store, loser_rel)
