"""compatfs.debugview without a mount: reading the index again."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace

from compatfs.debugview import Inspector
from compatfs.index import IndexRefused


def test_a_debug_mount_whose_index_cannot_be_read_again_warns_once(tmp_path: Path, caplog):
    """The debug mount reads the index again at every lookup and stat once the
    daemon committed to it (nothing is cached there): an index that fails to be
    read warned at each of them, thousands of lines for one ``ls -l``."""
    db = sqlite3.connect(tmp_path / "index.db")
    db.execute("CREATE TABLE t (x)")
    reloads = []

    def reload() -> None:
        reloads.append(1)
        raise IndexRefused("index.db: the record of 'img/x' is not one compatfs writes")

    inspector = SimpleNamespace(index=SimpleNamespace(path=str(tmp_path / "index.db"), db=db,
                                                      reload=reload), _version=None,
                                _failed="")
    try:
        with caplog.at_level(logging.WARNING, logger="compatfs.debugview"):
            for _ in range(5):
                Inspector.fresh(inspector)  # type: ignore[arg-type]
    finally:
        db.close()
    assert len(reloads) == 5          # tried again each time (the daemon may mend it)
    assert caplog.text.count("reading the index again failed") == 1, caplog.text
