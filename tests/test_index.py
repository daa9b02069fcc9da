"""The durable index on its own: proven sound before use, names stored losslessly,
and a failed write (a full disk) leaves disk and memory as they were.

The refusals are the class of issue 9 point 5: an index that is empty,
deleted, missing its table, reached through a symbolic link, altered, or
not the one compatfs made for this root is refused with one line saying what
to do, never taken for an empty index.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compatfs.index import DB_NAME, Index, IndexRefused
from compatfs.indexformat import Record
from compatfs.indexopen import MARKER_NAME, open_index

from .conftest import fill, tmpfs

STATE = "vault/compatfs"


def vol(i: int = 0, **kw) -> Record:
    return Record(f"img/{'a' * 64}-{i:08d}.qcow2", "vault_volumes", f"vol-{i}#0.qcow2",
                  "vm-volume", "new", **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "persist"
    r.mkdir()
    return r


def made(root: Path, records: list[Record] = ()) -> Path:
    """A root whose index compatfs made, holding *records*; the state dir."""
    index = open_index(str(root), STATE, create=True)
    for rec in records:
        index.put(rec)
    index.close()
    return root / STATE


def sql(state: Path, *statements: str, params: tuple = ()) -> None:
    """Change the index behind compatfs' back."""
    db = sqlite3.connect(state / DB_NAME)
    try:
        for s in statements:
            db.execute(s, params)
        db.commit()
    finally:
        db.close()


def refused(root: Path, *, create: bool = True) -> str:
    """The refusal of both a mount (create) and status (read-only)."""
    with pytest.raises(IndexRefused) as ro:
        open_index(str(root), STATE, create=False, read_only=True)
    with pytest.raises(IndexRefused) as rw:
        open_index(str(root), STATE, create=create)
    assert str(ro.value) == str(rw.value)
    assert "\n" not in str(rw.value)
    return str(rw.value)


# -- first start, reopen, adoption ---------------------------------------------------------

def test_a_first_start_makes_the_index_and_its_marker_and_reopens_them(root):
    assert open_index(str(root), STATE, create=False, read_only=True) is None
    assert not (root / "vault").exists()          # status creates nothing
    state = made(root, [vol(1)])
    for name in (DB_NAME, MARKER_NAME):
        st_ = os.stat(state / name)
        assert stat.S_IMODE(st_.st_mode) == 0o600 and st_.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert not list(state.glob("*.new*"))
    index = open_index(str(root), STATE, create=True)
    try:
        assert index.records == {vol(1).view: vol(1)}
    finally:
        index.close()
    ro = open_index(str(root), STATE, create=False, read_only=True)
    try:
        assert set(ro.records) == {vol(1).view}
        with pytest.raises(OSError) as err:
            ro.put(vol(2))
        assert err.value.errno == errno.EROFS
    finally:
        ro.close()


def test_no_index_and_no_marker_in_observe_is_no_index_not_a_new_one(root):
    (root / STATE).mkdir(parents=True)
    assert open_index(str(root), STATE, create=False) is None
    assert os.listdir(root / STATE) == []


def test_an_index_of_an_older_compatfs_is_adopted(root):
    state = root / STATE
    state.mkdir(parents=True)
    old = Index(str(state / DB_NAME))          # as compatfs before identities made it
    old.put(vol(1))
    old.close()
    ro = open_index(str(root), STATE, create=False, read_only=True)
    assert set(ro.records) == {vol(1).view}     # status accepts it as it is
    ro.close()
    assert not (state / MARKER_NAME).exists()
    index = open_index(str(root), STATE, create=False)   # even in observe
    index.close()
    assert (state / MARKER_NAME).read_text().split()[1] == _meta(state, "id")
    # from now on, deleting it is noticed
    os.unlink(state / DB_NAME)
    assert "is missing, but index.id says compatfs made one" in refused(root)


def _meta(state: Path, key: str) -> str:
    db = sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True)
    try:
        return db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]
    finally:
        db.close()


def test_a_schema_1_index_is_read_and_upgraded(root):
    state = root / STATE
    state.mkdir(parents=True)
    db = sqlite3.connect(state / DB_NAME)
    db.executescript("""
        CREATE TABLE objects (view TEXT PRIMARY KEY, store TEXT NOT NULL, rel TEXT NOT NULL,
            kind TEXT NOT NULL, state TEXT NOT NULL, prev_store TEXT, prev_rel TEXT,
            updated_ns INTEGER NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');""")
    db.execute("INSERT INTO objects VALUES (?,?,?,?,?,NULL,NULL,0)",
               (vol(1).view, "vault_volumes", "vol-1#0.qcow2", "vm-volume", "new"))
    db.commit()
    db.close()
    ro = open_index(str(root), STATE, create=False, read_only=True)
    assert ro.records == {vol(1).view: vol(1)}
    ro.close()
    index = open_index(str(root), STATE, create=True)
    assert index.meta("schema") == "2" and index.records == {vol(1).view: vol(1)}
    index.put(vol(2, reason="r", attempts=3))
    index.close()


def test_a_lost_marker_is_written_again_from_a_sound_index(root):
    state = made(root, [vol(1)])
    marker = (state / MARKER_NAME).read_text()
    os.unlink(state / MARKER_NAME)
    open_index(str(root), STATE, create=False, read_only=True).close()
    assert not (state / MARKER_NAME).exists()    # status writes nothing
    open_index(str(root), STATE, create=True).close()
    assert (state / MARKER_NAME).read_text() == marker


def test_an_interrupted_first_start_is_started_again(root):
    state = root / STATE
    state.mkdir(parents=True)
    (state / (DB_NAME + ".new")).write_bytes(b"half")
    (state / (MARKER_NAME + ".new")).write_bytes(b"half")
    made(root, [vol(1)])
    assert {DB_NAME, MARKER_NAME} <= set(os.listdir(state)) \
        <= {DB_NAME, MARKER_NAME, DB_NAME + "-wal", DB_NAME + "-shm"}
    ro = open_index(str(root), STATE, create=False, read_only=True)
    assert set(ro.records) == {vol(1).view}
    ro.close()


# -- refusals --------------------------------------------------------------------------------

def test_a_deleted_index_is_refused_not_started_empty(root):
    state = made(root, [vol(1)])
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)
    why = refused(root)
    assert "is missing, but index.id says compatfs made one" in why
    assert "move index.id aside" in why and "restore index.db" in why
    assert not (state / DB_NAME).exists()        # and nothing was made in its place
    # the operator's way out, knowingly: move the marker aside
    os.rename(state / MARKER_NAME, state / "index.id.old")
    index = open_index(str(root), STATE, create=True)
    assert index.records == {}
    index.close()


def test_an_emptied_index_is_refused(root):
    state = made(root, [vol(1)])
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)
    (state / DB_NAME).write_bytes(b"")
    assert "is empty (0 bytes)" in refused(root)
    assert (state / DB_NAME).stat().st_size == 0


def test_an_index_missing_its_table_is_refused(root):
    state = made(root, [vol(1)])
    sql(state, "DROP TABLE objects")
    assert "has no compatfs tables" in refused(root)


def test_an_index_that_is_not_sqlite_is_refused(root):
    state = made(root, [vol(1)])
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)
    (state / DB_NAME).write_bytes(b"not a database at all" * 300)
    assert "move index.db and index.id aside" in refused(root)


def test_a_corrupt_page_fails_the_integrity_check(root):
    state = made(root, [vol(i) for i in range(300)])
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        assert not (state / name).exists()       # checkpointed at close
    data = bytearray((state / DB_NAME).read_bytes())
    page = 4096
    assert len(data) >= 4 * page
    data[2 * page + 8: 2 * page + 200] = b"\xa5" * 192   # a b-tree page's cells
    (state / DB_NAME).write_bytes(bytes(data))
    why = refused(root)
    assert "integrity check" in why or "malformed" in why, why


@pytest.mark.parametrize("change,expected", [
    ("CREATE TRIGGER t AFTER INSERT ON objects BEGIN DELETE FROM objects; END",
     "holds what compatfs never writes (trigger t)"),
    ("CREATE VIEW v AS SELECT * FROM objects", "holds what compatfs never writes (view v)"),
    ("ALTER TABLE objects ADD COLUMN extra TEXT", "does not have the columns of schema 2"),
    ("UPDATE meta SET value='99' WHERE key='schema'", "schema 99 is newer than this compatfs"),
    ("UPDATE meta SET value='two' WHERE key='schema'", "schema 'two' is not one compatfs wrote"),
    ("DELETE FROM meta WHERE key='id'", "has no identity, but index.id says compatfs made one"),
    ("UPDATE meta SET value='00' WHERE key='root'", "was made for another root"),
    ("UPDATE meta SET value='0123456789abcdef0123456789abcdef' WHERE key='id'",
     "is not the index compatfs made here"),
    ("UPDATE meta SET value='x\nfoo' WHERE key='id'", "is not one compatfs wrote"),
])
def test_an_altered_index_is_refused(root, change, expected):
    state = made(root, [vol(1)])
    sql(state, change)
    assert expected in refused(root)


BAD_RECORDS = {
    "unknown store": ("img/x", "nostore", "a", "vm-volume", "new", None, None),
    "absolute rel": ("img/x", "vault_volumes", "/etc/passwd", "vm-volume", "new", None, None),
    "climbing rel": ("img/x", "vault_volumes", "../../etc", "vm-volume", "new", None, None),
    "empty part": ("img/x", "vault_volumes", "a//b", "vm-volume", "new", None, None),
    "unknown view": ("etc/x", "vault_volumes", "a", "vm-volume", "new", None, None),
    "a view itself": ("img", "vault_volumes", "a", "vm-volume", "new", None, None),
    "climbing view": ("img/../x", "vault_volumes", "a", "vm-volume", "new", None, None),
    "unknown kind": ("img/x", "vault_volumes", "a", "rootkit", "new", None, None),
    "unknown state": ("img/x", "vault_volumes", "a", "vm-volume", "pwned", None, None),
    "half a move": ("img/x", "vault_volumes", "a", "vm-volume", "new", "img", None),
    "bad move": ("img/x", "vault_volumes", "a", "vm-volume", "new", "img", "../x"),
    "blob kind": ("img/x", "vault_volumes", "a", b"\xff", "new", None, None),
    "utf-8 blob": (b"img/x", "vault_volumes", "a", "vm-volume", "new", None, None),
}


@pytest.mark.parametrize("row", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_a_crafted_record_refuses_the_index(root, row):
    state = made(root, [vol(1)])
    sql(state, "INSERT INTO objects (view, store, rel, kind, state, prev_store, prev_rel, "
               "updated_ns) VALUES (?,?,?,?,?,?,?,0)", params=row)
    why = refused(root)
    assert "is not one compatfs writes" in why and "the index was altered" in why, why


def test_a_negative_attempt_count_refuses_the_index(root):
    state = made(root, [vol(1)])
    sql(state, "UPDATE objects SET attempts=-1")
    assert "is not a count" in refused(root)


def test_a_symlink_at_the_index_is_not_followed(root, tmp_path):
    outside = tmp_path / "outside.db"
    state = made(root, [vol(1)])
    for name in (DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)
    shutil.move(state / DB_NAME, outside)
    before = outside.read_bytes()
    os.symlink(outside, state / DB_NAME)
    assert "is a symbolic link; refusing to open it" in refused(root)
    assert outside.read_bytes() == before
    assert not Path(str(outside) + "-wal").exists()


@pytest.mark.parametrize("link", ["vault", STATE])
def test_a_symlink_on_the_way_to_the_state_dir_is_not_followed(root, tmp_path, link):
    elsewhere = tmp_path / "elsewhere"
    made(root, [vol(1)])
    shutil.move(root / link, elsewhere)
    os.symlink(elsewhere, root / link)
    before = sorted(p.name for p in elsewhere.rglob("*"))
    why = refused(root)
    assert "a symbolic link is on the way" in why
    assert sorted(p.name for p in elsewhere.rglob("*")) == before


def test_a_fifo_at_the_index_or_marker_does_not_hang(root):
    state = made(root, [vol(1)])
    os.rename(state / MARKER_NAME, state / "kept")
    os.mkfifo(state / MARKER_NAME)
    assert "is not a regular file" in refused(root)
    os.unlink(state / MARKER_NAME)
    os.rename(state / "kept", state / MARKER_NAME)
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        (state / name).unlink(missing_ok=True)
    os.mkfifo(state / DB_NAME)
    assert "is not a regular file" in refused(root)


def test_an_index_with_a_second_hard_link_is_refused(root, tmp_path):
    state = made(root, [vol(1)])
    os.link(state / DB_NAME, tmp_path / "second")
    assert "hard links" in refused(root)


def test_a_state_dir_open_to_others_is_refused(root):
    state = made(root, [vol(1)])
    os.chmod(state, 0o777)
    assert "writable by others" in refused(root)


def test_an_index_owned_by_another_user_is_refused(root):
    state = made(root, [vol(1)])
    os.chown(state / DB_NAME, 65534, 65534)
    assert "belongs to uid 65534" in refused(root)


def test_a_forged_marker_is_refused(root):
    state = made(root, [vol(1)])
    (state / MARKER_NAME).write_text("hello\n")
    assert "is not a marker compatfs wrote" in refused(root)


def test_an_index_copied_from_another_root_is_refused(root, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    made(other, [vol(1)])
    made(root, [vol(2)])
    shutil.rmtree(root / STATE)
    shutil.copytree(other / STATE, root / STATE)
    assert "was made for another root" in refused(root)


# -- names that are not UTF-8 ------------------------------------------------------------------

NAME = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=NAME, b=NAME, d=NAME)
def test_any_bytes_name_round_trips(tmp_path_factory, a, b, d):
    root = tmp_path_factory.mktemp("names")
    na, nb, nd = (os.fsdecode(x) for x in (a, b, d))
    index = open_index(str(root), STATE, create=True)
    try:
        index.put(Record(f"img/{na}", "unresolved", f"img/{na}", "vm-volume", "unresolved",
                         reason=f"why {na}"))
        index.put(Record(f"downloads/appImg.obj/pending/{nd}/{na}", "downloader",
                         f"pending/{nd}/{na}", "pending", "new", "downloader", f"pending/{nd}/x"))
        index.move(f"img/{na}", Record(f"img/{nb}", "unresolved", f"img/{na}", "vm-volume",
                                       "unresolved"))
        index.rename_prefix(f"downloads/appImg.obj/pending/{nd}",
                            f"downloads/appImg.obj/verifier/{nb}")
        expected = dict(index.records)
        assert set(expected) == {f"img/{nb}", f"downloads/appImg.obj/verifier/{nb}/{na}"}
        index.reload()
        assert index.records == expected
    finally:
        index.close()
    again = open_index(str(root), STATE, create=False, read_only=True)
    try:
        assert again.records == expected
        assert again.children == {"img": {nb}, f"downloads/appImg.obj/verifier/{nb}": {na}}
        assert os.fsencode(again.get(f"img/{nb}").rel) == b"img/" + a
    finally:
        again.close()


def test_a_non_utf8_name_is_a_blob_and_a_utf8_one_text(root):
    state = made(root, [Record("img/\udcff.img", "unresolved", "img/\udcff.img", "vm-volume",
                               "unresolved"), vol(1)])
    db = sqlite3.connect(state / DB_NAME)
    try:
        types = dict(db.execute("SELECT typeof(view), typeof(rel) FROM objects").fetchall())
        rows = {r[0] for r in db.execute("SELECT view FROM objects")}
    finally:
        db.close()
    assert types == {"blob": "blob", "text": "text"}
    assert rows == {b"img/\xff.img", vol(1).view}


# -- failed writes -----------------------------------------------------------------------------

class Failing:
    """A connection whose next statement matching *word* fails with an SQLite error."""

    def __init__(self, db: sqlite3.Connection, word: str, exc: sqlite3.Error) -> None:
        self.db, self.word, self.exc = db, word, exc

    def execute(self, statement: str, *args):
        if self.word in statement:
            self.word = "\0never"
            raise self.exc
        return self.db.execute(statement, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


def sqlite_error(code: int, message: str) -> sqlite3.Error:
    exc = sqlite3.OperationalError(message)
    exc.sqlite_errorcode = code
    exc.sqlite_errorname = "TEST"
    return exc


@pytest.mark.parametrize("code,expected", [(13, errno.ENOSPC), (11, errno.EIO), (5, errno.EIO)],
                         ids=["full", "corrupt", "busy"])
def test_a_failed_move_changes_neither_disk_nor_memory(root, code, expected):
    made(root, [vol(1), vol(2)])
    index = open_index(str(root), STATE, create=True)
    try:
        before = {k: dataclasses.replace(r) for k, r in index.records.items()}
        children = {k: set(v) for k, v in index.children.items()}
        real = index.db
        # the DELETE of the old name succeeds, the INSERT of the new one fails
        index.db = Failing(real, "INSERT", sqlite_error(code, "boom"))
        with pytest.raises(OSError) as err:
            index.move(vol(1).view, Record("img/moved", "vault_volumes", "vol-1#0.qcow2",
                                           "vm-volume", "new"))
        assert err.value.errno == expected
        index.db = real
        assert not real.in_transaction
        assert index.records == before and index.children == children
        index.reload()
        assert index.records == before
        index.put(vol(3))                          # and writing goes on
    finally:
        index.close()


def test_a_failed_directory_rename_changes_nothing(root):
    made(root, [Record(f"downloads/appImg.obj/pending/d/f{i}", "downloader", f"pending/d/f{i}",
                       "pending", "new") for i in range(3)])
    index = open_index(str(root), STATE, create=True)
    try:
        before = set(index.records)
        real = index.db
        index.db = Failing(real, "COMMIT", sqlite_error(13, "database or disk is full"))
        with pytest.raises(OSError) as err:
            index.rename_prefix("downloads/appImg.obj/pending/d", "downloads/appImg.obj/verifier/d")
        assert err.value.errno == errno.ENOSPC
        index.db = real
        assert set(index.records) == before
        index.reload()
        assert set(index.records) == before
    finally:
        index.close()


def test_an_io_error_is_eio_and_a_full_disk_behind_it_enospc(small_fs):
    """SQLite reports any failed write (a quota, a full disk) as an I/O error;
    a probe write beside the index tells which it was."""
    root = small_fs / "persist"
    root.mkdir()
    made(root, [vol(1)])
    index = open_index(str(root), STATE, create=True)
    try:
        real = index.db
        index.db = Failing(real, "INSERT", sqlite_error(10 | (3 << 8), "disk I/O error"))
        with pytest.raises(OSError) as err:
            index.put(vol(2))
        assert err.value.errno == errno.EIO
        filler = fill(small_fs)
        index.db = Failing(real, "INSERT", sqlite_error(10 | (3 << 8), "disk I/O error"))
        with pytest.raises(OSError) as err:
            index.put(vol(2))
        assert err.value.errno == errno.ENOSPC
        filler.unlink()
        assert not (root / STATE / (DB_NAME + "-probe")).exists()
        index.db = real
        index.put(vol(2))
        assert set(index.records) == {vol(1).view, vol(2).view}
    finally:
        index.close()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 1 MiB tmpfs: a disk that fills."""
    with tmpfs(tmp_path / "small", "1m") as mnt:
        yield mnt


@pytest.mark.root
def test_a_full_disk_is_enospc_and_leaves_the_index_as_it_was(small_fs):
    root = small_fs / "persist"
    root.mkdir()
    made(root, [vol(1)])
    index = open_index(str(root), STATE, create=True)
    try:
        filler = fill(small_fs)
        failures = 0
        for i in range(2, 200):       # the WAL grows until the disk refuses
            try:
                index.put(vol(i, reason="x" * 2000))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                failures += 1
                break
        assert failures == 1
        kept = dict(index.records)
        with pytest.raises(OSError) as err:
            index.put(vol(999, reason="y" * 3000))
        assert err.value.errno == errno.ENOSPC
        assert index.records == kept
        filler.unlink()
        index.put(vol(999))
        kept[vol(999).view] = vol(999)
        assert index.records == kept
    finally:
        index.close()
    again = open_index(str(root), STATE, create=False, read_only=True)
    try:
        assert again.records == kept
    finally:
        again.close()


OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "delete", "move", "rename"]),
                         st.integers(0, 3), st.integers(0, 3),
                         st.one_of(st.none(), st.sampled_from(["BEGIN", "DELETE", "INSERT",
                                                               "UPDATE", "COMMIT"])),
                         st.sampled_from([13, 10, 11])),
               min_size=1, max_size=25)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
@example(ops=[("put", 0, 0, None, 13), ("move", 0, 1, "INSERT", 13)])
@example(ops=[("put", 0, 0, None, 13), ("put", 3, 0, None, 13), ("rename", 0, 1, "COMMIT", 10)])
@example(ops=[("put", 0, 0, None, 13), ("delete", 0, 0, "COMMIT", 13),
              ("put", 0, 0, "INSERT", 11)])
def test_memory_equals_disk_after_any_sequence_of_failed_and_good_writes(tmp_path_factory, ops):
    """Random changes, each maybe failing at one of its statements: after every
    one, the memory copy is what a fresh reader finds on disk."""
    root = tmp_path_factory.mktemp("seq")
    index = open_index(str(root), STATE, create=True)
    real = index.db
    dirs = [f"downloads/appImg.obj/pending/d{i}" for i in range(3)]

    def rec(i: int) -> Record:
        d = dirs[i % 3]
        return Record(f"{d}/f{i}\udcff", "downloader", f"pending/x/f{i}", "pending", "new")

    try:
        for op, a, b, fail, code in ops:
            old, new = dirs[a % 3], dirs[b % 3] + "r"
            # a directory renamed onto names the index has is refused (ENOTEMPTY)
            clash = op == "rename" and any(
                new + v[len(old):] in index.records for v in index.records
                if v.startswith(old + "/"))
            if fail is not None:
                index.db = Failing(real, fail, sqlite_error(code, "injected"))
            try:
                if op == "put":
                    index.put(rec(a))
                elif op == "delete":
                    index.delete(rec(a).view)
                elif op == "move":
                    index.move(rec(a).view, dataclasses.replace(rec(b), view=rec(b).view + "m"))
                else:
                    index.rename_prefix(old, new)
            except OSError as exc:
                assert fail is not None or clash, exc
                assert exc.errno in ((errno.ENOTEMPTY,) if clash else (errno.ENOSPC, errno.EIO))
            finally:
                index.db = real
            assert not real.in_transaction
            fresh = open_index(str(root), STATE, create=False, read_only=True)
            try:
                assert fresh.records == index.records
                assert fresh.children == index.children
            finally:
                fresh.close()
    finally:
        index.close()


@pytest.mark.root
def test_a_first_start_on_a_full_disk_fails_and_the_next_one_builds(small_fs):
    root = small_fs / "persist"
    (root / STATE).mkdir(parents=True)
    filler = fill(small_fs)
    with pytest.raises(OSError) as err:
        open_index(str(root), STATE, create=True)
    assert err.value.errno == errno.ENOSPC
    assert not (root / STATE / DB_NAME).exists() and not (root / STATE / MARKER_NAME).exists()
    filler.unlink()
    index = open_index(str(root), STATE, create=True)
    try:
        index.put(vol(1))
    finally:
        index.close()
    assert sorted(p.name for p in (root / STATE).iterdir() if ".new" in p.name) == []
