"""Where a view path's bytes are, or are to go: :class:`Placement`, and view paths taken apart.

A *view path* is a legacy path relative to the root of the views
(``img/<name>``, ``prepared/<name>/...``); its first component names the view
and the legacy store (:func:`split`). The views' namespace
(:mod:`compatfs.view`), its renames (:mod:`compatfs.viewrename`) and the
migration all speak of placements and view paths, so they are defined here,
below all of them. :func:`undo` is the one way a view change that failed
takes back a step it made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .enums import Kind, State

log = logging.getLogger(__name__)

#: The state of a placement inside a placed directory (a name in a container volume).
INSIDE = "inside"


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an object is, or is to be: a store key and a path relative to it."""

    store: str
    rel: str
    kind: str = Kind.OTHER
    state: str = State.LEGACY   # legacy, new, unresolved; INSIDE: within a placed directory

    @property
    def is_legacy(self) -> bool:
        """No index record: the legacy store, or inside a placed directory."""
        return self.state in (State.LEGACY, INSIDE)


def split(vpath: str) -> tuple[str, str]:
    """``img/a/b`` -> (``img``, ``a/b``)."""
    top, _, rest = vpath.partition("/")
    return top, rest


def join(vdir: str, name: str) -> str:
    return f"{vdir}/{name}" if vdir else name


def undo(vpath: str, step: Callable[..., object], *args: object) -> None:
    """One step of undoing a change that failed: never raises (the failure
    that made the undo necessary is what the agent gets), logs if it fails."""
    try:
        step(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: undoing a failed change: %s failed: %s", vpath,
                    getattr(step, "__name__", step), exc)


