"""The migration of a root no daemon serves, for ``migrate --now`` and
``rollback``: the device opened as the daemon opens it (with every view, so
every legacy location is reached), recovered, and its :class:`Migrator`
built without a handle table (no view is served, nothing is open)."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from ..device import Device, DeviceError, free_views, open_device
from ..enums import ALL_VIEWS, Stage

if TYPE_CHECKING:
    from ..migration import Migrator
from .common import CommandError, config_and_root, run_dir


def open_offline(args: argparse.Namespace) -> tuple[Device, Migrator]:
    """The device of the command line's root, opened to migrate, and its migration;
    refused while a daemon serves the root. The caller closes the device."""
    from ..migration import Migrator

    cfg, root = config_and_root(args)
    pid = run_dir(args, root).live_pid()
    if pid is not None:
        raise CommandError(f"a daemon (pid {pid}) serves {os.path.abspath(root)}; "
                           f"'compatfs umount --root {root}' first, or mount it with "
                           "--stage migrate to migrate in the background")
    try:
        free_views(cfg.layout(root), ALL_VIEWS, replace_dead=False)
        device = open_device(cfg, root, Stage.MIGRATE, ALL_VIEWS)
    except DeviceError as exc:
        raise CommandError(str(exc)) from None
    try:
        migrator = Migrator(device.view, cfg.migration, None, device.bases())
        device.recover(migrator)
    except BaseException:
        device.close()
        raise
    return device, migrator
