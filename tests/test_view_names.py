"""Names that are not UTF-8, through real views.

No legacy name format allows one, so such a name is never parsed or placed:
it is served as a plain legacy file where it is, and listing, reading,
creating and renaming it work as on any directory. A placed object renamed
to such a name needs an index record under it; where the index cannot keep
one, the rename is refused with ``EILSEQ`` and changes nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from compatfs import devicegen
from compatfs.index import Index, Record

from .mounting import mounted

pytestmark = pytest.mark.root

OBJ = "appImg.obj"
UUID = "0b5d7f0e-4a53-4c3b-9a55-0f0b6b1a9c11"


def b(path: Path) -> bytes:
    return os.fsencode(str(path))


def index_keeps_any_name() -> bool:
    index = Index(None)
    try:
        index.put(Record(os.fsdecode(b"img/\xff"), "img", "x", "other", "new"))
    except UnicodeEncodeError:
        return False
    finally:
        index.close()
    return True


# stage migrate: the migrator meets the name too (its own part of the issue)
@pytest.mark.parametrize("stage", ["observe", "redirect"])
def test_names_that_are_not_utf8_are_served_in_place(tmp_path, stage):
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    config = tmp_path / "c.yaml"
    config.write_text("require_encrypted_vault: false\nvault_wait_s: 0\n"
                      "migration: {rescan_s: 3600}\n")
    pending = root / "downloads" / OBJ / "pending" / UUID
    verifier = root / "downloads" / OBJ / "verifier" / UUID
    pending.mkdir(parents=True)
    verifier.mkdir(parents=True)
    legacy = b(pending) + b"/\xff\xfe.img"
    with open(legacy, "wb") as f:
        f.write(b"legacy bytes")
    with mounted(root, tmp_path / "run", stage=stage, config=config) as m:
        assert os.listdir(b(pending)) == [b"\xff\xfe.img"]
        with open(legacy, "rb") as f:
            assert f.read() == b"legacy bytes"
        created = b(pending) + b"/\xfe\xfd.img"
        with open(created, "wb") as f:                       # created where it is named
            f.write(b"new bytes")
        with open(created, "rb") as f:
            assert f.read() == b"new bytes"
        os.mkdir(b(pending) + b"/\xfb-dir")
        moved = b(verifier) + b"/\xff\xfe.img"
        os.rename(legacy, moved)
        assert os.listdir(b(verifier)) == [b"\xff\xfe.img"]
        with open(moved, "rb") as f:
            assert f.read() == b"legacy bytes"
        # a placed download (in a placing stage) renamed to such a name
        good = pending / "good.img"
        good.write_bytes(b"good")
        odd = b(verifier) + b"/\xfa.img"
        try:
            os.rename(b(good), odd)
        except OSError as exc:
            assert exc.errno == errno.EILSEQ and not index_keeps_any_name()
            assert good.read_bytes() == b"good" and not os.path.exists(odd)
        else:
            with open(odd, "rb") as f:
                assert f.read() == b"good"
            assert not good.exists()
        log = m.log_text()
    # the bytes of what was never placed are in the legacy store, under their names
    assert sorted(os.listdir(b(root / "downloads" / OBJ / "pending" / UUID))) \
        == sorted([b"\xfe\xfd.img", b"\xfb-dir"] + ([b"good.img"] if not os.path.exists(odd)
                                                     and good.exists() else []))
    assert "Traceback" not in log, log
