"""Running the compatfs daemon for real in tests: :mod:`compatfs.daemonproc`
under the names the tests use, plus the checks they share."""

from __future__ import annotations

from compatfs.daemonproc import DEADLINE, Child, teardown, view_paths
from compatfs.daemonproc import running as mounted

Mounted = Child

__all__ = ["DEADLINE", "Mounted", "assert_clean_exit", "mounted", "teardown", "view_paths"]


def assert_clean_exit(m: Mounted) -> None:
    """The daemon stopped by itself with status 0 and logged no traceback."""
    assert m.proc.poll() == 0, m.log_text()
    assert "Traceback" not in m.log_text(), m.log_text()
