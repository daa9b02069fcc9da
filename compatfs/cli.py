"""The ``compatfs`` command line: one function per subcommand.

Every error a user can cause ends in one line on stderr and an exit code:
2 for a bad command line or configuration, 1 for anything else that stopped
the command. No traceback reaches the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Callable, Sequence, TypeVar

from . import __version__, mounts
from .config import Config, ConfigError, load
from .layout import LayoutError
from .rundir import RunDirError
from .plan import make_plan, render_text
from .resolver import Resolver

T = TypeVar("T")

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CommandError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def _config_and_root(args: argparse.Namespace) -> tuple[Config, str]:
    cfg = load(args.config)
    root = args.root or cfg.root
    if not os.path.isdir(root):
        raise CommandError(f"root {root}: not a directory", EXIT_USAGE)
    return cfg, root


def cmd_plan(args: argparse.Namespace) -> int:
    cfg, root = _config_and_root(args)
    return _print_plan(cfg, root, args.json)


def _print_plan(cfg: Config, root: str, as_json: bool) -> int:
    layout = cfg.layout(root)
    plan = make_plan(layout, Resolver(layout, cfg.overrides))
    if as_json:
        json.dump(plan.as_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(plan))
        for p in plan.problems:
            print(f"compatfs: warning: {p}", file=sys.stderr)
    return 0


def _run_dir(args: argparse.Namespace, root: str):
    from .rundir import DEFAULT_RUN_DIR, RunDir

    return RunDir(args.run_dir or os.environ.get("COMPATFS_RUN_DIR") or DEFAULT_RUN_DIR, root)


def _setup_logging(level: str) -> None:
    """Log to stderr: a daemon started in the background has its stderr on the log
    its parent opened in the run dir (:meth:`RunDir.open_log`), a supervised one
    on the supervisor's output; no path is ever opened for logging."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s compatfs[%(process)d] %(levelname)s "
                                           "%(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import Daemon, DaemonError, cleanup_stale

    cfg, root = _config_and_root(args)
    stage = args.stage or cfg.stage
    run = _run_dir(args, root)
    pid = run.live_pid()
    if pid is not None:
        raise CommandError(f"{os.path.abspath(root)} is already mounted by compatfs "
                           f"(daemon pid {pid}); 'compatfs umount --root {root}' first")
    for line in cleanup_stale(cfg, root, run, views=False):
        print(f"compatfs: {line} (left by a daemon that died)", file=sys.stderr)
    if not args.foreground:
        return _spawn_daemon(args, root, run)

    _setup_logging(args.log_level)
    ready_fd = args.ready_fd

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
            except OSError:
                pass

    daemon = Daemon(cfg, root, stage, run, attr_timeout=args.attr_timeout)
    try:
        daemon.prepare()
    except (DaemonError, RunDirError) as exc:
        report(f"error: {exc}")
        raise CommandError(str(exc), EXIT_USAGE if isinstance(exc, RunDirError)
                           else EXIT_FAILURE) from None

    def ready() -> None:
        report("ready")
        _sd_notify(b"READY=1")
        if ready_fd is None:
            print(f"compatfs: serving {', '.join(daemon.views)} at {daemon.layout.root} "
                  f"(stage {stage})", file=sys.stderr)

    import trio

    try:
        trio.run(daemon.serve, ready)
    except Exception as exc:
        report(f"error: {exc}")
        raise
    return 0


def _sd_notify(message: bytes) -> None:
    """Tell systemd (Type=notify) how the daemon is doing, when it runs under it."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        pass


def cmd_reload(args: argparse.Namespace) -> int:
    """Apply a changed config: a new stage remounts (or rolls back, or stops)."""
    cfg, root = _config_and_root(args)
    run = _run_dir(args, root)
    info = run.info() if run.live_pid() is not None else None
    running = info["stage"] if info else "off"
    wanted = cfg.stage
    if info is not None and running == wanted:
        return cmd_ctl(argparse.Namespace(**{**vars(args), "action": "reload", "args": []}))
    print(f"compatfs: stage: {running} -> {wanted}", file=sys.stderr)
    if info is not None:
        cmd_umount(args)
    if wanted == "off":
        return 0
    if wanted == "rollback":
        return cmd_rollback(argparse.Namespace(**{**vars(args), "log_level": "warning"}))
    return cmd_mount(argparse.Namespace(**{**vars(args), "stage": None, "foreground": False,
                                           "log_level": "info", "attr_timeout": 10.0,
                                           "ready_fd": None}))


def _spawn_daemon(args: argparse.Namespace, root: str, run) -> int:
    """Start the daemon in the background and wait until its views answer."""
    run.make()
    argv = [sys.executable, "-m", "compatfs", "mount", "--foreground", "--root", root,
            "--log-level", args.log_level, "--attr-timeout", str(args.attr_timeout),
            "--run-dir", os.path.dirname(run.dir)]
    if args.config:
        argv += ["--config", args.config]
    if args.stage:
        argv += ["--stage", args.stage]
    pid = _spawn(argv, run, run.LOG, args.timeout)
    print(f"compatfs: mounted {root} (daemon pid {pid}, log {run.log_file})", file=sys.stderr)
    return 0


def _spawn(argv: list[str], run, log_name: str, timeout: float) -> int:
    """Run *argv* (a --foreground command) detached, logging to *log_name* in the
    run dir, and wait for it to report ready on the fd passed with --ready-fd;
    its pid."""
    import select
    import subprocess
    import time

    log_file = os.path.join(run.dir, log_name)
    log = run.open_log(log_name)
    r, w = os.pipe()
    argv = [*argv, "--ready-fd", str(w)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                pass_fds=(w,), start_new_session=True)
    finally:
        os.close(log)
    os.close(w)
    deadline = time.monotonic() + timeout
    line = b""
    with os.fdopen(r, "rb") as pipe:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([pipe], [], [], 0.2)
            if ready:
                line = pipe.readline().strip()
                break
            if proc.poll() is not None:
                break
    if line == b"ready":
        return proc.pid
    if line.startswith(b"error: "):
        proc.wait(timeout=10)
        raise CommandError(line[7:].decode(errors="replace"))
    if proc.poll() is None:
        proc.terminate()
        raise CommandError(f"the daemon did not report ready within {timeout:.0f} s; "
                           f"see {log_file}")
    raise CommandError(f"the daemon exited with status {proc.returncode}; see {log_file}")


def cmd_debug_mount(args: argparse.Namespace) -> int:
    from .debugview import Inspector
    from .mounts import fuse_unmount, mounted_at

    if args.unmount:
        if mounted_at(args.mountpoint) is None:
            raise CommandError(f"{args.mountpoint} is not mounted")
        fuse_unmount(args.mountpoint)
        return 0
    cfg, root = _config_and_root(args)
    if not os.path.isdir(args.mountpoint):
        raise CommandError(f"{args.mountpoint}: not a directory", EXIT_USAGE)
    if mounted_at(args.mountpoint) is not None:
        raise CommandError(f"{args.mountpoint} is already a mount point")
    if not args.foreground:
        run = _run_dir(args, root)
        run.make()
        argv = [sys.executable, "-m", "compatfs", "debug-mount", "--foreground", "--root", root,
                args.mountpoint]
        if args.config:
            argv += ["--config", args.config]
        pid = _spawn(argv, run, run.DEBUG_LOG, args.timeout)
        print(f"compatfs: read-only view of {root} at {args.mountpoint} (pid {pid}); "
              f"'compatfs debug-mount --unmount {args.mountpoint}' ends it", file=sys.stderr)
        return 0
    _setup_logging("info")
    import trio

    from .index import IndexRefused

    try:
        inspector = Inspector(cfg, root, args.mountpoint)
    except IndexRefused as exc:
        raise CommandError(f"index refused: {exc}") from None

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")

    trio.run(inspector.serve, ready)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    import signal
    import time

    from .daemon import cleanup_stale

    cfg, root = _config_and_root(args)
    run = _run_dir(args, root)
    pid = run.live_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and run.live_pid() == pid and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}") and run.live_pid() == pid:
            raise CommandError(f"daemon pid {pid} did not stop within {args.timeout:.0f} s")
    done = cleanup_stale(cfg, root, run)
    for line in done:
        print(f"compatfs: {line} (left by a daemon that died)", file=sys.stderr)
    if pid is None and not done:
        print(f"compatfs: {os.path.abspath(root)} was not mounted", file=sys.stderr)
    return 0


def _ask_daemon(layout, key: str) -> str | None:
    """A key of the running daemon's control interface, or None when none answers."""
    from .control import CONTROL_NAME, PREFIX

    path = os.path.join(layout.path("img"), CONTROL_NAME)
    try:
        return mounts.within(mounts.ANSWER_SECONDS, lambda: os.getxattr(path, PREFIX + key)).decode()
    except (OSError, TimeoutError):
        return None


def cmd_status(args: argparse.Namespace) -> int:
    """The report, always; its exit status says whether something needs the
    operator (compatfs/status.py: dead views 3, a refused index 4)."""
    from .status import as_json, collect, exit_status, render_text, view_states

    cfg, root = _config_and_root(args)
    layout = cfg.layout(root)
    views = view_states(layout, ("img", "downloads", "prepared") if cfg.mount_prepared
                        else ("img", "downloads"))
    serving = "serving" in views.values()
    stage = _ask_daemon(layout, "stage") if serving else None
    migration = _ask_daemon(layout, "migration") if stage == "migrate" else None
    # the legacy directories are read from under views that cannot answer
    dead = [v for v, state in views.items() if state in ("dead", "not answering")]
    plan, objects, index = collect(layout, Resolver(layout, cfg.overrides), True, dead)
    if stage is not None:   # the daemon's own (its checkpoint in use may be the last good one)
        said = _ask_daemon(layout, "problems")
        plan.problems += [f"daemon: {p}" for p in (json.loads(said) if said else [])
                          if p not in plan.problems]
    doc = as_json(stage or cfg.stage, stage is not None, plan, objects,
                  json.loads(migration) if migration else None, index, views)
    if args.json:
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_text(doc))
    code = exit_status(doc)
    if index.problem:
        print(f"compatfs: error: index refused: {index.problem}", file=sys.stderr)
    gone = [v for v, state in views.items() if state == "dead"]
    stuck = [v for v, state in views.items() if state == "not answering"]
    if gone:
        print(f"compatfs: warning: views dead: {', '.join(gone)}; 'compatfs mount' replaces "
              "them", file=sys.stderr)
    if stuck:
        print(f"compatfs: warning: views not answering: {', '.join(stuck)}; their daemon is "
              "alive but stuck (stopped or blocked): see its log, then kill it and "
              "'compatfs mount' replaces them", file=sys.stderr)
    return code


def _offline(args: argparse.Namespace, stage: str):
    """The engine of a device whose views are not mounted (migrate --now, rollback)."""
    from .daemon import Daemon, DaemonError

    cfg, root = _config_and_root(args)
    run = _run_dir(args, root)
    pid = run.live_pid()
    if pid is not None:
        raise CommandError(f"a daemon (pid {pid}) serves {os.path.abspath(root)}; "
                           f"'compatfs umount --root {root}' first, or mount it with "
                           "--stage migrate to migrate in the background")
    daemon = Daemon(cfg, root, stage, run, views=("img", "downloads", "prepared"), offline=True)
    try:
        daemon.prepare()
    except DaemonError as exc:
        raise CommandError(str(exc)) from None
    return daemon


def _progress_line(p, width: int = 30) -> str:
    from .plan import human

    frac = p.bytes_done / p.bytes_total if p.bytes_total else (
        p.objects_done / p.objects_total if p.objects_total else 1.0)
    bar = "#" * int(frac * width)
    eta = p.eta()
    left = f"{eta:.0f} s left" if eta is not None and p.bytes_done < p.bytes_total else ""
    return (f"[{bar:<{width}}] {p.objects_done}/{p.objects_total} objects, "
            f"{human(p.bytes_done)}/{human(p.bytes_total)}, {human(int(p.rate()))}/s {left}")


def cmd_migrate(args: argparse.Namespace) -> int:
    import time

    import trio

    if not args.now:
        raise CommandError("'compatfs migrate' needs --now (in the background, the daemon "
                           "migrates in stage migrate)", EXIT_USAGE)
    _setup_logging(args.log_level)
    daemon = _offline(args, "migrate")
    migrator = daemon.migrator
    tty = sys.stderr.isatty()

    async def report(done: trio.Event) -> None:
        last = 0.0
        while not done.is_set():
            with trio.move_on_after(0.5 if tty else 5.0):
                await done.wait()
            line = _progress_line(migrator.progress)
            if tty:
                print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
            elif time.monotonic() - last >= 5.0 or done.is_set():
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
        states = {r.view: r.state for r in daemon.index.records.values()}
        failed = migrator.failures()
        daemon.close()
    p = migrator.progress
    print(f"compatfs: migrated {p.objects_done - p.failed - len(p.waiting)} of "
          f"{p.objects_total} objects", file=sys.stderr)
    for vpath, why in p.waiting.items():
        print(f"compatfs: waiting: {vpath}: {why}", file=sys.stderr)
    for vpath, why in sorted(failed.items()):
        state = "quarantined" if states.get(vpath) == "quarantined" else "failed"
        print(f"compatfs: {state}: {vpath}: {why}", file=sys.stderr)
    if pass_error:
        exc = pass_error[0]
        why = f"{exc.strerror or exc}" if isinstance(exc, OSError) else \
            f"{type(exc).__name__}: {exc}"
        print(f"compatfs: the migration pass stopped: {why}", file=sys.stderr)
    return 1 if failed or p.waiting or pass_error else 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import trio

    from .migration import Rollback

    _setup_logging(args.log_level)
    daemon = _offline(args, "migrate")
    try:
        moved, problems = trio.run(Rollback(daemon.migrator).run)
    finally:
        daemon.close()
    print(f"compatfs: moved {moved} objects back to their legacy names", file=sys.stderr)
    for p in problems:
        print(f"compatfs: not rolled back: {p}", file=sys.stderr)
    return 1 if problems else 0


def cmd_ctl(args: argparse.Namespace) -> int:
    import errno

    from .control import CMD_PREFIX, COMMANDS, CONTROL_NAME, PREFIX

    cfg, root = _config_and_root(args)
    path = os.path.join(cfg.layout(root).path("img"), CONTROL_NAME)
    action = args.action

    def answer(call: Callable[[], T]) -> T:
        """The daemon's answer, waited for at most --timeout: a daemon that is
        alive but stuck would otherwise keep the kernel (and us) waiting."""
        try:
            return mounts.within(args.timeout, call)
        except TimeoutError:
            raise CommandError(f"ctl {action}: the daemon did not answer within "
                               f"{args.timeout:g} s (alive but stuck: see its log; kill it, "
                               "and 'compatfs mount' replaces its views)") from None

    try:
        if action == "keys":
            for name in answer(lambda: os.listxattr(path)):
                print(name[len(PREFIX):])
        elif action == "get":
            key = args.args[0]
            print(answer(lambda: os.getxattr(path, PREFIX + key)).decode())
        elif action == "set":
            if len(args.args) != 2:
                raise CommandError("ctl set KEY VALUE", EXIT_USAGE)
            key, value = args.args
            answer(lambda: os.setxattr(path, PREFIX + key, value.encode()))
        elif action in COMMANDS:
            text = " ".join(args.args)
            answer(lambda: os.setxattr(path, CMD_PREFIX + action, text.encode()))
        else:
            raise CommandError(f"unknown ctl action {action!r}", EXIT_USAGE)
    except IndexError:
        raise CommandError(f"ctl {action} needs an argument", EXIT_USAGE) from None
    except OSError as exc:
        why = {errno.ENODATA: "unknown key or command", errno.EROFS: "read-only",
               errno.EINVAL: "bad value", errno.ENOENT: "not mounted (no control file)",
               errno.ENOTCONN: "the daemon is gone (its mounts are dead)",
               errno.EACCES: "permission denied (the control file is root's)"}.get(
                   exc.errno or 0, exc.strerror or str(exc))
        raise CommandError(f"ctl {action}: {why}") from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import can_mount, tour
    from .testing.devicegen import make_demo

    cfg = load(args.config)
    if not args.dir and not args.plan_only and not args.json:
        if can_mount():
            return tour()
        print("compatfs: not root or no /dev/fuse: showing the plan only "
              "(run as root to see the mounted views)", file=sys.stderr)
    if args.dir:
        if os.path.exists(args.dir) and os.listdir(args.dir):
            raise CommandError(f"{args.dir}: exists and is not empty", EXIT_USAGE)
        os.makedirs(args.dir, exist_ok=True)
        make_demo(args.dir)
        print(f"demo device built in {args.dir}", file=sys.stderr)
        return _demo_plans(cfg, args.dir, args.json)
    with tempfile.TemporaryDirectory(prefix="compatfs-demo-") as tmp:
        make_demo(tmp)
        print(f"demo device built in {tmp} (removed afterwards; --dir keeps one)",
              file=sys.stderr)
        return _demo_plans(cfg, tmp, args.json)


def _demo_plans(cfg: Config, root: str, as_json: bool) -> int:
    """The demo's plan; as text, followed by what the design note's layout does
    differently from eve (of the configured release)."""
    from .demo import layouts_compared
    from .rules import release_text

    status = _print_plan(cfg, root, as_json)
    if not as_json:
        release = release_text(cfg.rules.release) if cfg.rules.release else None
        sys.stdout.write("\n" + layouts_compared(root, release))
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compatfs",
        description="Keep EVE-OS legacy /persist names working while the bytes move "
                    "into the new vault layout.")
    parser.add_argument("--version", action="version", version=f"compatfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--config", metavar="FILE", help="YAML configuration (docs/configuration.md)")
        return p

    p = add("plan", cmd_plan,
            "Report every legacy object under the root: where it belongs, or why it stays. "
            "Changes nothing.")
    p.add_argument("--root", metavar="DIR", help="the /persist directory (default: from the config)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    def add_mount_common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", metavar="DIR", help="the /persist directory (default: from the config)")
        p.add_argument("--run-dir", metavar="DIR",
                       help="where daemons keep pid, log and private mountpoint "
                            "(default $COMPATFS_RUN_DIR or /run/compatfs)")
        p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                       help="how long to wait for the daemon (default 30)")

    p = add("mount", cmd_mount, "Mount the legacy views over DIR/img and DIR/downloads.")
    add_mount_common(p)
    p.add_argument("--stage", choices=("off", "observe", "redirect", "migrate"),
                   help="rollout stage (default: from the config)")
    p.add_argument("--foreground", action="store_true", help="serve in this process, log to stderr")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--attr-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the kernel may cache names and attributes (default 10)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = add("umount", cmd_umount, "Unmount the views of DIR and stop its daemon.")
    add_mount_common(p)

    p = add("status", cmd_status,
            "Every legacy object: where its bytes are now and its state.")
    add_mount_common(p)
    p.add_argument("--json", action="store_true", help="one JSON document instead of a table")

    p = add("migrate", cmd_migrate,
            "Move every legacy object into the new layout now, in the foreground.")
    add_mount_common(p)
    p.add_argument("--now", action="store_true", help="run to completion in this process")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    p = add("rollback", cmd_rollback,
            "Move everything back into the legacy layout, so an older EVE can boot.")
    add_mount_common(p)
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

    p = add("reload", cmd_reload,
            "Apply the config again: a changed stage remounts, rolls back or stops; "
            "otherwise the daemon re-reads the checkpoint.")
    add_mount_common(p)

    p = add("debug-mount", cmd_debug_mount,
            "Mount a read-only inspection view of DIR at MOUNTPOINT (beside the live views).")
    add_mount_common(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--foreground", action="store_true", help="serve in this process")
    p.add_argument("--unmount", action="store_true", help="unmount MOUNTPOINT instead")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    p = add("ctl", cmd_ctl, "Read settings and status of a running daemon, or send it a "
                            "command (see docs/control.md).")
    add_mount_common(p)
    p.add_argument("action", help="keys, get KEY, set KEY VALUE, pause, resume, reload, "
                                  "migrate-now NAME")
    p.add_argument("args", nargs="*")

    p = add("demo", cmd_demo, "Build a demo legacy device and show its plan.")
    p.add_argument("--dir", metavar="DIR",
                   help="build a plain tree here, keep it, and show its plan (must be empty)")
    p.add_argument("--plan-only", action="store_true", help="show the plan, mount nothing")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # legacy names are bytes: reports print each as it is on disk, whatever the
    # locale's encoding (messages and logs on stderr keep Python's backslash
    # escapes, so a log line is always valid text)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, LayoutError, RunDirError) as exc:
        print(f"compatfs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"compatfs: error: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"compatfs: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("compatfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into a line
        if os.environ.get("COMPATFS_DEBUG"):
            raise
        print(f"compatfs: internal error: {type(exc).__name__}: {exc} "
              "(set COMPATFS_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
