"""Running the compatfs daemon for real in tests: :mod:`compatfs.testing.daemonproc`
under the names the tests use, plus the checks they share."""

from __future__ import annotations

import threading
from collections.abc import Callable

from compatfs.testing.daemonproc import DEADLINE, Child, teardown, view_paths
from compatfs.testing.daemonproc import running as mounted

Mounted = Child

__all__ = ["DEADLINE", "Mounted", "answers_within", "assert_clean_exit", "mounted", "teardown",
           "view_paths"]


def assert_clean_exit(m: Mounted) -> None:
    """The daemon stopped by itself with status 0 and logged no traceback."""
    assert m.proc.poll() == 0, m.log_text()
    assert "Traceback" not in m.log_text(), m.log_text()


def answers_within(seconds: float, fn: Callable[[], object]) -> object:
    """*fn()* (something done through the views) in a thread; fails the test if it
    does not return within *seconds*: a wedged view never answers (the tear-down
    then kills the daemon, which frees the thread with ENOTCONN)."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            out.append((False, exc))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"no answer within {seconds:g} s: the views are wedged"
    ok, value = out[0]
    if not ok:
        raise value
    return value
