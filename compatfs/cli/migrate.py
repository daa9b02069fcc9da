"""``compatfs migrate --now``: move every legacy object into the new layout in
this process, with a progress line, while no daemon serves the root."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING

from ..enums import State
from ..plan import human
from .common import (
    EXIT_USAGE,
    LOG_LEVELS,
    AddCommand,
    CommandError,
    add_log_format,
    add_mount_common,
    log_format,
    say,
    setup_logging,
)
from .offline import open_offline

if TYPE_CHECKING:
    from ..migration import Progress


def register(add: AddCommand) -> None:
    p = add("migrate", cmd_migrate,
            "Move every legacy object into the new layout now, in the foreground.")
    add_mount_common(p)
    p.add_argument("--now", action="store_true", help="run to completion in this process")
    p.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    add_log_format(p)


def progress_line(p: Progress, width: int = 30) -> str:
    """The migration's progress as one line: a bar, objects, bytes, rate, time left."""
    frac = p.bytes_done / p.bytes_total if p.bytes_total else (
        p.objects_done / p.objects_total if p.objects_total else 1.0)
    bar = "#" * int(frac * width)
    eta = p.eta()
    left = f"{eta:.0f} s left" if eta is not None and p.bytes_done < p.bytes_total else ""
    return (f"[{bar:<{width}}] {p.objects_done}/{p.objects_total} objects, "
            f"{human(p.bytes_done)}/{human(p.bytes_total)}, {human(int(p.rate()))}/s {left}")


def cmd_migrate(args: argparse.Namespace) -> int:
    import trio

    if not args.now:
        raise CommandError("'compatfs migrate' needs --now (in the background, the daemon "
                           "migrates in stage migrate)", EXIT_USAGE)
    fmt = log_format(args)
    setup_logging(args.log_level, fmt)
    device, migrator = open_offline(args)
    tty = sys.stderr.isatty() and fmt == "text"   # JSON: a line every 5 s, no bar

    async def report(done: trio.Event) -> None:
        last = 0.0
        while not done.is_set():
            with trio.move_on_after(0.5 if tty else 5.0):
                await done.wait()
            line = progress_line(migrator.progress)
            if tty:
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            elif time.monotonic() - last >= 5.0 or done.is_set():
                if fmt == "json":
                    say(line)
                else:
                    print(line, file=sys.stderr, flush=True)
                last = time.monotonic()

    pass_error: list[BaseException] = []

    async def main() -> None:
        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report, done)
            try:
                await migrator.run_once()
            except Exception as exc:  # noqa: BLE001 - said in one line below
                pass_error.append(exc)
            finally:
                done.set()

    try:
        trio.run(main)
    finally:
        if tty:
            print(file=sys.stderr)
        states = {r.view: r.state for r in device.index.records.values()}
        failed = migrator.failures()
        device.close()
    p = migrator.progress
    say(f"migrated {p.objects_done - p.failed - len(p.waiting)} of {p.objects_total} objects")
    for vpath, why in p.waiting.items():
        say(f"waiting: {vpath}: {why}")
    for vpath, why in sorted(failed.items()):
        state = State.QUARANTINED if states.get(vpath) == State.QUARANTINED else State.FAILED
        say(f"{state}: {vpath}: {why}", logging.WARNING)
    if pass_error:
        exc = pass_error[0]
        why = f"{exc.strerror or exc}" if isinstance(exc, OSError) else \
            f"{type(exc).__name__}: {exc}"
        say(f"the migration pass stopped: {why}", logging.ERROR)
    return 1 if failed or p.waiting or pass_error else 0
