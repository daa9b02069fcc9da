"""``--log-format json``: one JSON object per line with the fields of EVE's
agents (logrus), compatfs' own fields, never a broken line; the text format as
it was; the option reaching the daemon started in the background and the boot
script's stdout."""

from __future__ import annotations

import datetime
import inspect
import io
import json
import logging
import os
import random
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from compatfs import logformat
from compatfs.enums import State
from compatfs.rundir import RunDir
from compatfs.testing import devicegen
from compatfs.testing.daemonproc import teardown

from .conftest import REPO, run_cli
from .devices import device_under

EVE_FIELDS = {"time", "level", "msg", "source", "pid", "file", "func"}


@pytest.fixture
def emit() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of compatfs' own writing JSON lines to a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logformat.JSONFormatter())
    logger = logging.getLogger("compatfs.test_logformat")
    logger.addHandler(handler)
    logger.setLevel(1)
    logger.propagate = False
    try:
        yield logger, out
    finally:
        logger.removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    text.encode("ascii")   # whatever the stream's encoding
    return [json.loads(line) for line in text.splitlines()]


def test_a_record_has_the_fields_of_eve_agents(emit):
    logger, out = emit
    logger.info("serving %s", "img")
    line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    [rec] = lines(out)
    assert set(rec) == EVE_FIELDS
    assert rec["msg"] == "serving img" and rec["level"] == "info"
    assert rec["source"] == "compatfs" and rec["pid"] == os.getpid()
    assert rec["file"] == f"tests/test_logformat.py:{line}"
    assert rec["func"] == "tests.test_logformat.test_a_record_has_the_fields_of_eve_agents"
    # keys sorted, no spaces: as Go's encoding/json writes logrus' map
    assert out.getvalue().startswith('{"file":"tests/test_logformat.py:')


def test_a_compatfs_module_is_named_from_the_package():
    assert logformat.caller_file(os.path.join(REPO, "compatfs/migration/scheduler.py")) == \
        ("compatfs/migration/scheduler.py", "compatfs.migration.scheduler")


@pytest.mark.parametrize("levelno,word", [(logging.DEBUG, "debug"), (logging.INFO, "info"),
                                          (logging.WARNING, "warning"), (logging.ERROR, "error"),
                                          (logging.CRITICAL, "fatal"), (5, "trace"),
                                          (logging.WARNING + 5, "warning")])
def test_levels_are_logrus_words(emit, levelno, word):
    logger, out = emit
    logger.log(levelno, "x")
    assert lines(out)[0]["level"] == word


def test_the_time_is_rfc3339_with_a_fraction_and_the_zone(emit):
    logger, out = emit
    before = datetime.datetime.now(datetime.UTC)
    logger.info("now")
    t = str(lines(out)[0]["time"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|[+-]\d\d:\d\d)", t), t
    when = datetime.datetime.fromisoformat(t)
    assert when.tzinfo is not None
    assert abs((when - before).total_seconds()) < 5


@pytest.fixture
def zone(monkeypatch):
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()
    yield set_zone
    monkeypatch.undo()
    time.tzset()


def test_the_time_is_written_as_go_writes_rfc3339nano(zone):
    zone("UTC")
    assert logformat.rfc3339(1700000000.5) == "2023-11-14T22:13:20.5Z"
    assert logformat.rfc3339(1700000000.0) == "2023-11-14T22:13:20Z"
    assert logformat.rfc3339(1700000000.123456) == "2023-11-14T22:13:20.123456Z"
    assert logformat.rfc3339(1700000000.9999999) == "2023-11-14T22:13:21Z"
    zone("Asia/Kolkata")
    assert logformat.rfc3339(1700000000.25) == "2023-11-15T03:43:20.25+05:30"
    zone("America/St_Johns")
    assert logformat.rfc3339(1700000000.0) == "2023-11-14T18:43:20-03:30"


def test_compatfs_fields_come_from_extra_and_only_when_given(emit):
    logger, out = emit
    logger.info("migrated %s", "img/a", extra={"object": "img/a", "state": State.SWITCHED,
                                               "stage": "migrate", "other": "not a field"})
    logger.info("plain")
    first, second = lines(out)
    assert (first["object"], first["state"], first["stage"]) == ("img/a", "switched", "migrate")
    assert set(first) == EVE_FIELDS | {"object", "state", "stage"}
    assert set(second) == EVE_FIELDS


def test_a_traceback_is_a_field_and_the_record_one_line(emit):
    logger, out = emit
    try:
        raise ZeroDivisionError("no")
    except ZeroDivisionError:
        logger.exception("failed\nbadly")
    logger.info("stack", stack_info=True)
    assert out.getvalue().count("\n") == 2
    failed, stack = lines(out)
    assert failed["msg"] == "failed\nbadly" and failed["level"] == "error"
    assert str(failed["exc"]).startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: no" in str(failed["exc"])
    assert "test_a_traceback_is_a_field" in str(stack["stack"])


def test_a_name_that_is_not_utf8_keeps_the_line_valid(emit):
    logger, out = emit
    name = os.fsdecode(b"img/caf\xe9-\xff.qcow2")
    other = "img/\ud800 and \u00e9\u4e2d"   # a lone high surrogate, and real UTF-8
    logger.warning("%s: migration failed", name, extra={"object": name})
    logger.info("%s", other, extra={"object": other})
    first, second = lines(out)
    assert first["msg"] == "img/caf\\xe9-\\xff.qcow2: migration failed"
    assert first["object"] == "img/caf\\xe9-\\xff.qcow2"
    assert second["object"] == "img/\\ud800 and \u00e9\u4e2d"
    # what json.dumps alone would write: a line Go's decoder turns into U+FFFD
    assert "\\udcff" not in out.getvalue()


def test_the_text_format_is_unchanged():
    record = logging.LogRecord("compatfs.daemon", logging.INFO, __file__, 1, "%s: placed at %s",
                               ("img/a", "vault/x"), None)
    record.object = "img/a"
    line = logformat.formatter("text").format(record)
    assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} compatfs\[{os.getpid()}\] "
                        r"INFO compatfs\.daemon: img/a: placed at vault/x", line), line


def test_a_name_cannot_forge_a_text_line_or_drive_a_terminal():
    name = "img/evil\n2026-12-01 00:00:00,000 compatfs[1] INFO compatfs.daemon: forged\x1b[2J\t.raw"
    record = logging.LogRecord("compatfs.daemon", logging.WARNING, __file__, 1, "%s: set aside",
                               (name,), None)
    line = logformat.formatter("text").format(record)
    assert "\n" not in line and "\x1b" not in line and "\t" not in line, line
    assert line.endswith(r"img/evil\n2026-12-01 00:00:00,000 compatfs[1] INFO "
                         r"compatfs.daemon: forged\x1b[2J\t.raw: set aside"), line
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("compatfs.daemon", logging.ERROR, __file__, 1, "fault in %s",
                                   ("img/a\nb",), sys.exc_info())
    text = logformat.formatter("text").format(record)
    first, *rest = text.split("\n")
    assert first.endswith(r"fault in img/a\nb") and rest[0] == "Traceback (most recent call last):"


def test_the_option_wins_over_the_environment_and_text_is_the_default():
    assert logformat.chosen(None, {}) == "text"
    assert logformat.chosen(None, {"COMPATFS_LOG_FORMAT": "json"}) == "json"
    assert logformat.chosen("text", {"COMPATFS_LOG_FORMAT": "json"}) == "text"
    with pytest.raises(ValueError, match="COMPATFS_LOG_FORMAT must be one of text, json"):
        logformat.chosen(None, {"COMPATFS_LOG_FORMAT": "xml"})


def test_a_bad_format_is_a_usage_error_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPATFS_LOG_FORMAT", "xml")
    proc = run_cli("rollback", "--root", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert proc.stderr == ("compatfs: error: $COMPATFS_LOG_FORMAT must be one of text, json, "
                           "not 'xml'\n")
    proc = run_cli("migrate", "--now", "--root", str(tmp_path), "--log-format", "xml")
    assert proc.returncode == 2 and "invalid choice: 'xml'" in proc.stderr


def test_an_error_is_a_json_line_too(tmp_path):
    proc = run_cli("rollback", "--root", str(tmp_path / "none"), "--log-format", "json")
    assert proc.returncode == 2
    [rec] = [json.loads(line) for line in proc.stderr.splitlines()]
    assert rec["level"] == "error" and "not a directory" in str(rec["msg"])
    assert str(rec["file"]).startswith("compatfs/cli/__init__.py:")


# -- the boot script ------------------------------------------------------------------

def test_the_boot_script_passes_the_format_and_puts_a_json_log_on_stdout(tmp_path):
    boot = str(REPO / "mountscripts/compatfs-boot")
    root = tmp_path / "persist"
    root.mkdir()
    fake = tmp_path / "compatfs"
    fake.write_text('#!/bin/sh\necho "{\\"msg\\":\\"$*\\"}" >&2\n')
    fake.chmod(stat.S_IRWXU)
    env = {**os.environ, "COMPATFS": str(fake)}
    env.pop("COMPATFS_LOG_FORMAT", None)
    run = lambda *a, **kw: subprocess.run(  # noqa: E731
        [boot, "--root", str(root), *a], capture_output=True, text=True, timeout=60,
        env={**env, **kw})
    proc = run("--stage", "rollback", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    assert f'{{"msg":"rollback --root {root} --log-format json"}}' in proc.stdout.splitlines()
    # text, as before: compatfs' own stderr, nothing added to the command line
    proc = run("--stage", "rollback")
    assert proc.returncode == 0, proc.stderr
    assert f'{{"msg":"rollback --root {root}"}}' in proc.stderr.splitlines()
    proc = run("--stage", "migrate", "--supervise", "--dry-run", COMPATFS_LOG_FORMAT="json")
    assert "mount --root" in proc.stdout and "--foreground --stage migrate --log-format json" \
        in proc.stdout and "with its log (JSON lines) on stdout" in proc.stdout
    proc = run("--stage", "migrate", "--log-format", "yaml")
    assert proc.returncode == 2 and "--log-format must be text or json" in proc.stderr


# -- a real daemon ----------------------------------------------------------------------

def one_volume_app(rng: random.Random) -> devicegen.AppDef:
    """An app with one raw volume, for a migration that logs one object."""
    return devicegen.AppDef(devicegen.random_uuid(rng), "vm", [
        devicegen.DriveDef(devicegen.random_uuid(rng), devicegen.random_sha(rng), "raw",
                           volume_uuid=devicegen.random_uuid(rng))])


@pytest.mark.root
def test_the_daemon_in_the_background_logs_only_json_lines_with_a_migrated_object(tmp_path):
    """``compatfs mount --log-format json`` passes the format to the daemon it
    starts; stage migrate moves one volume: its line names the object and state."""
    rng = random.Random(13)
    app = one_volume_app(rng)
    config = tmp_path / "c.yaml"
    config.write_text("migration:\n  rescan_s: 1\n  retry_backoff_s: 0\n")
    run_dir = tmp_path / "run"
    with device_under(tmp_path, size_mb=128) as root:
        devicegen.write_device_state(str(root), [app])
        name = app.legacy_name(0)
        (root / "img").mkdir()
        (root / "img" / name).write_bytes(rng.randbytes(1 << 20))
        log = Path(RunDir(str(run_dir), str(root)).log_file)
        try:
            proc = run_cli("mount", "--root", str(root), "--run-dir", str(run_dir), "--stage",
                           "migrate", "--config", str(config), "--log-format", "json")
            assert proc.returncode == 0, proc.stderr
            [mounted] = [json.loads(line) for line in proc.stderr.splitlines()]
            assert str(mounted["msg"]).startswith("mounted ")
            deadline = time.monotonic() + 60
            while f'"object":"img/{name}"' not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            run_cli("umount", "--root", str(root), "--run-dir", str(run_dir))
            teardown(root, run_dir, ("img", "downloads"))
        text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records and all(EVE_FIELDS <= set(r) for r in records), text
    assert all(r["source"] == "compatfs" and isinstance(r["pid"], int) for r in records)
    [moved] = [r for r in records if r.get("object") == f"img/{name}"
               and str(r["msg"]).startswith("migrated ")]
    assert moved["state"] == "switched" and moved["level"] == "info"
    assert str(moved["file"]).startswith("compatfs/migration/scheduler.py:")
    for start in ("serving ", "stage: none -> migrate"):
        assert any(r.get("stage") == "migrate" and str(r["msg"]).startswith(start)
                   for r in records), (start, text)


@pytest.mark.root
def test_migrate_now_writes_only_json_lines_progress_and_summary_included(tmp_path):
    rng = random.Random(14)
    app = one_volume_app(rng)
    with device_under(tmp_path, size_mb=128) as root:
        devicegen.write_device_state(str(root), [app])
        name = f"img/{app.legacy_name(0)}"
        (root / "img").mkdir()
        (root / name).write_bytes(rng.randbytes(1 << 20))
        proc = run_cli("migrate", "--now", "--root", str(root), "--run-dir", str(tmp_path / "r"),
                       "--log-level", "info", "--log-format", "json")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all(EVE_FIELDS <= set(r) for r in records), proc.stderr
    assert any(r.get("object") == name and r.get("state") == "switched" for r in records)
    assert records[-1]["msg"] == "migrated 1 of 1 objects", proc.stderr
    assert str(records[-1]["file"]).startswith("compatfs/cli/migrate.py:")
