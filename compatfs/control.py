"""The control interface: settings, status and commands of a running daemon.

Each view holds a hidden file, ``.compatfs`` (not listed, but found by name),
whose extended attributes are the interface, as mergerfs does with its
``.mergerfs`` file:

- ``getxattr user.compatfs.<key>`` reads a status value or a setting;
- ``setxattr user.compatfs.<key> <value>`` changes a setting;
- ``setxattr user.compatfs.cmd.<command> <argument>`` runs a command.

An unknown key answers ``ENOATTR``, a read-only one ``EROFS``, a bad value
``EINVAL``. Reading the file itself gives the whole status as JSON. Every key
is declared once in :data:`KEYS` and :data:`COMMANDS`; ``compatfs ctl`` and
``docs/control.md`` use the same names.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3

from . import config
from .daemonstate import Commands, DaemonState

CONTROL_NAME = ".compatfs"
PREFIX = "user.compatfs."
CMD_PREFIX = PREFIX + "cmd."
LOG_LEVELS = ("debug", "info", "warning", "error")


class ControlError(Exception):
    """A control request is refused; ``errno`` says how."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Key:
    doc: str
    get: Callable[[Control], Any]
    set: Callable[[Control, str], None] | None = None


def _setting(table: dict[str, config.Key], name: str, value: str) -> Any:
    """*value* checked as the configuration file's key *name* is (one registry of ranges)."""
    try:
        return config.parse_setting(table[name], value, name)
    except config.ConfigError as exc:
        raise ControlError(errno.EINVAL, str(exc)) from None


def _set_throttle(c: Control, value: str) -> None:
    c.commands.set_throttle(_setting(config.MIGRATION, "throttle_mib_per_s", value))


def _set_log_level(c: Control, value: str) -> None:
    if value not in LOG_LEVELS:
        raise ControlError(errno.EINVAL, f"one of {', '.join(LOG_LEVELS)}")
    logging.getLogger().setLevel(value.upper())


KEYS: dict[str, Key] = {
    "version": Key("compatfs version", lambda c: __import__("compatfs").__version__),
    "pid": Key("daemon pid", lambda c: os.getpid()),
    "root": Key("the /persist directory served", lambda c: c.state().root),
    "stage": Key("rollout stage", lambda c: c.state().stage),
    "paused": Key("whether migration is paused", lambda c: c.state().paused),
    "records": Key("index records by state", lambda c: dict(c.state().records)),
    "migration": Key("migration progress", lambda c: dict(c.state().migration)),
    "faults": Key("unexpected errors answered with EIO", lambda c: c.state().faults),
    "problems": Key("problems with the checkpoint or latch", lambda c: list(c.state().problems)),
    "throttle_mib_per_s": Key("migration copy rate limit, MiB/s (0: unlimited)",
                              lambda c: c.state().throttle_mib_per_s, _set_throttle),
    "log_level": Key("daemon log level",
                     lambda c: logging.getLevelName(logging.getLogger().level).lower(),
                     _set_log_level),
}


def _pause(c: Control, arg: str) -> None:
    c.commands.pause()


def _resume(c: Control, arg: str) -> None:
    c.commands.resume()


def _migrate_now(c: Control, arg: str) -> None:
    name = arg.strip().strip("/")
    if not name or ".." in name.split("/"):
        raise ControlError(errno.EINVAL, "give a legacy name, e.g. img/<sha>-<uuid>.qcow2")
    c.commands.migrate_now(name)


def _reload(c: Control, arg: str) -> None:
    # read in the daemon's config watcher, off the event loop, within its poll period
    c.commands.reload()


COMMANDS: dict[str, tuple[str, Callable[[Control, str], None]]] = {
    "pause": ("stop starting new copies (running ones stop at their next step)", _pause),
    "resume": ("start copying again", _resume),
    "migrate-now": ("move the named legacy object to the front of the queue and start "
                    "now (a failed or quarantined one is tried again at once)", _migrate_now),
    "reload": ("re-read the checkpoint and latch, and look for work", _reload),
}


class Control:
    """The control interface of one daemon: what it reads is a snapshot taken by
    *state* at each request; what it changes goes through *commands*."""

    def __init__(self, state: Callable[[], DaemonState], commands: Commands) -> None:
        self.state: Callable[[], DaemonState] = state
        self.commands = commands

    def names(self) -> list[bytes]:
        return [(PREFIX + k).encode() for k in KEYS] + [(CMD_PREFIX + k).encode() for k in COMMANDS]

    def get(self, name: str) -> bytes:
        if name.startswith(CMD_PREFIX):
            raise ControlError(pyfuse3.ENOATTR, "commands are set, not read")
        key = KEYS.get(name[len(PREFIX):]) if name.startswith(PREFIX) else None
        if key is None:
            raise ControlError(pyfuse3.ENOATTR, f"unknown key {name}")
        value = key.get(self)
        return (value if isinstance(value, str) else json.dumps(value)).encode()

    def set(self, name: str, value: bytes) -> None:
        try:
            text = value.decode()
        except UnicodeDecodeError:
            raise ControlError(errno.EINVAL, "values are UTF-8 text") from None
        if name.startswith(CMD_PREFIX):
            command = COMMANDS.get(name[len(CMD_PREFIX):])
            if command is None:
                raise ControlError(pyfuse3.ENOATTR, f"unknown command {name}")
            command[1](self, text)
            logging.getLogger(__name__).info("control: %s %s", name[len(CMD_PREFIX):], text)
            return
        key = KEYS.get(name[len(PREFIX):]) if name.startswith(PREFIX) else None
        if key is None:
            raise ControlError(pyfuse3.ENOATTR, f"unknown key {name}")
        if key.set is None:
            raise ControlError(errno.EROFS, f"{name} is read-only")
        key.set(self, text)

    def document(self) -> bytes:
        """The whole status, for a read of the control file."""
        snapshot = self.state()
        taken = Control(lambda: snapshot, self.commands)   # one snapshot for every key
        return (json.dumps({k: key.get(taken) for k, key in KEYS.items()}, indent=1)
                + "\n").encode()
