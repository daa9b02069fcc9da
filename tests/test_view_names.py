"""Names that are not UTF-8, through real views.

Agents may write any bytes as a download's file name. Such a name is
served and listed with its exact bytes; in a placing stage a new download
under it is placed in the new layout like any other (the index keeps names
as bytes), and listing, reading, creating and renaming work as on any
directory. A name that a volume grammar must parse never parses, and stays
where it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compatfs.testing import devicegen

from .mounting import mounted

pytestmark = pytest.mark.root

OBJ = "appImg.obj"
UUID = "0b5d7f0e-4a53-4c3b-9a55-0f0b6b1a9c11"


def b(path: Path) -> bytes:
    return os.fsencode(str(path))


# stage migrate: the migrator meets the name too (its own part of the issue)
@pytest.mark.parametrize("stage,layout", [("observe", "eve"), ("redirect", "eve"),
                                          ("redirect", "design-note")])
def test_names_that_are_not_utf8_are_served_in_place(tmp_path, stage, layout):
    root = tmp_path / "persist"
    root.mkdir()
    devicegen.make_demo(str(root))
    config = tmp_path / "c.yaml"
    config.write_text(f"layout: {layout}\nrequire_encrypted_vault: false\nvault_wait_s: 0\n"
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
        # a placed download (in a placing stage of the design note) renamed to such a name
        good = pending / "good.img"
        good.write_bytes(b"good")
        odd = b(verifier) + b"/\xfa.img"
        os.rename(b(good), odd)
        with open(odd, "rb") as f:
            assert f.read() == b"good"
        assert not good.exists()
        assert sorted(os.listdir(b(verifier))) == [b"\xfa.img", b"\xff\xfe.img"]
        log = m.log_text()
    # the bytes are where the stage (and the layout: eve keeps downloads in
    # progress in the legacy store) puts a new download, under their exact names
    if stage == "observe" or layout == "eve":
        assert sorted(os.listdir(b(pending))) == [b"\xfb-dir", b"\xfe\xfd.img"]
    else:
        placed = root / "vault" / "downloader" / "pending" / UUID
        assert os.listdir(b(placed)) == [b"\xfe\xfd.img"]     # a file is placed
        assert os.listdir(b(pending)) == [b"\xfb-dir"]         # a directory there is not
        with open(b(placed) + b"/\xfe\xfd.img", "rb") as f:
            assert f.read() == b"new bytes"
    assert "Traceback" not in log, log
