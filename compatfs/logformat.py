"""What a log line looks like: compatfs' own text line, or one JSON object per
line the way EVE's agents write theirs, so EVE's log collector (newlogd) reads
compatfs' lines as it reads an agent's.

EVE's agents log through logrus' JSON formatter (pkg/pillar/agentlog): one
object per line, keys sorted, no spaces, with

- ``time``: RFC 3339 in local time with the zone offset (``Z`` for UTC) and the
  fraction of a second without trailing zeros (Go's ``time.RFC3339Nano``);
- ``level``: ``debug``, ``info``, ``warning``, ``error``, ``fatal`` (Python's
  critical; below debug: ``trace``);
- ``msg``;
- ``file`` (``path:line``) and ``func`` of the call that logged (logrus'
  ``SetReportCaller``);
- ``source``: the agent's name (here ``compatfs``) and ``pid``, an integer.

compatfs adds the fields a record carries through ``extra=`` (:data:`FIELDS`:
the object a message is about, the stage, the object's state) and, for a record
with an exception, its traceback in ``exc`` (and a stack in ``stack``): never a
line break outside a JSON string, so a record is always exactly one line.

Legacy names are bytes; a name that is not UTF-8 reaches a message as a str with
surrogate escapes. Every string is written with such bytes as ``\\xNN`` (the
backslash escaped for JSON), and the whole line is ASCII: valid JSON and valid
UTF-8 whatever the stream's encoding.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import sys
from collections.abc import Mapping

#: The formats ``--log-format`` accepts; the first is the default.
FORMATS = ("text", "json")
#: The environment variable that chooses the format when no option does.
ENV = "COMPATFS_LOG_FORMAT"
#: compatfs' text line.
TEXT = "%(asctime)s compatfs[%(process)d] %(levelname)s %(name)s: %(message)s"
#: compatfs' own fields, taken from a record when a log call passes them in ``extra=``.
FIELDS = ("object", "stage", "state")
#: The ``source`` of every line: the agent's name, as EVE's agents give theirs.
SOURCE = "compatfs"

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def level_word(levelno: int) -> str:
    """logrus' name for the level of a record of *levelno*."""
    if levelno >= logging.CRITICAL:
        return "fatal"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    if levelno >= logging.DEBUG:
        return "debug"
    return "trace"


def rfc3339(created: float) -> str:
    """*created* (seconds since the epoch) as Go's RFC3339Nano writes a local time:
    ``2026-12-01T12:56:31.25+01:00``, ``2026-12-01T11:56:31.123456Z``."""
    micros = round(created * 1_000_000)
    seconds, fraction = divmod(micros, 1_000_000)
    local = datetime.datetime.fromtimestamp(seconds).astimezone()
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if fraction:
        text += f".{fraction:06d}".rstrip("0")
    offset = local.utcoffset() or datetime.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    if minutes == 0:
        return text + "Z"
    sign = "+" if minutes > 0 else "-"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


def clean(text: str) -> str:
    """*text* with the bytes of a non-UTF-8 name (surrogate escapes) as ``\\xNN``
    and any other lone surrogate as ``\\udNNN``: text that encodes as UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


@functools.lru_cache(maxsize=512)
def caller_file(pathname: str) -> tuple[str, str]:
    """The file a record came from, as shown (``compatfs/daemon.py``: relative to
    the directory holding its package, else to the import path that holds it, else
    as it is) and the dotted module it is."""
    path = os.path.abspath(pathname)
    bases = [_PACKAGE_PARENT, *sorted((os.path.abspath(p) for p in sys.path if p),
                                      key=len, reverse=True)]
    for base in bases:
        if path.startswith(base.rstrip("/") + "/"):
            rel = path[len(base.rstrip("/")) + 1:]
            module = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            return rel, module
    return pathname, os.path.basename(pathname).removesuffix(".py")


def _value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return clean(str(value))


class JSONFormatter(logging.Formatter):
    """One JSON object per record, in one line, with the fields of EVE's agents
    (see the module's description)."""

    def format(self, record: logging.LogRecord) -> str:
        rel, module = caller_file(record.pathname)
        fields: dict[str, object] = {
            "time": rfc3339(record.created),
            "level": level_word(record.levelno),
            "msg": clean(record.getMessage()),
            "source": SOURCE,
            "pid": record.process,
            "file": f"{clean(rel)}:{record.lineno}",
            "func": clean(f"{module}.{record.funcName}"),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                fields[name] = _value(value)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exc"] = clean(record.exc_text)
        if record.stack_info:
            fields["stack"] = clean(self.formatStack(record.stack_info))
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


class TextFormatter(logging.Formatter):
    """compatfs' text line (:data:`TEXT`). A message is one line whatever it
    quotes: a control character in it (a legacy name may hold a newline or a
    terminal escape) is written escaped (``\\n``, ``\\x1b``), so no name can
    forge a line of its own or drive a terminal. A traceback follows on lines
    of its own, as logging writes it."""

    def __init__(self) -> None:
        super().__init__(TEXT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        message = record.message
        if not message.isprintable():
            record.message = message.translate(_CONTROLS)
        return super().formatMessage(record)


def formatter(name: str) -> logging.Formatter:
    """The formatter of the log format *name* (one of :data:`FORMATS`)."""
    if name == "json":
        return JSONFormatter()
    if name == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {name!r}")


def chosen(option: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The log format: the option's, else :data:`ENV`'s, else text (wherever the
    output goes: a log file in the run dir or a pipe is read by people and by
    scripts as much as by EVE, which asks for JSON explicitly); ValueError for
    a value that is none of :data:`FORMATS`."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    name = option or env.get(ENV, "").strip().lower() or FORMATS[0]
    if name not in FORMATS:
        source = "--log-format" if option else f"${ENV}"
        raise ValueError(f"{source} must be one of {', '.join(FORMATS)}, not {name!r}")
    return name
