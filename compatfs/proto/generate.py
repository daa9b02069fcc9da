"""Regenerate the ``*_pb2.py`` modules from the ``.proto`` files here.

Needs grpcio-tools (a test dependency). Run: ``python -m compatfs.proto.generate``.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("eve_config.proto", "eve_auth.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto here, writing the modules into *out_dir*."""
    from grpc_tools import protoc  # test-only dependency

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
    return [out_dir / p.replace(".proto", "_pb2.py") for p in PROTOS]


_DESCRIPTOR_RE = re.compile(r"AddSerializedFile\((b'.*?')\)", re.S)


def descriptor_of(module_text: str) -> str:
    """The serialized descriptor a generated module embeds: what the check compares.

    The rest of the text (protoc's version banner) changes with grpcio-tools
    releases without changing what the messages are.
    """
    found = _DESCRIPTOR_RE.search(module_text)
    if found is None:
        raise ValueError("no serialized descriptor in generated module")
    return found.group(1)


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for produced in generate(Path(tmp)):
            target = HERE / produced.name
            text = produced.read_text()
            if check:
                if not target.exists() or descriptor_of(target.read_text()) != descriptor_of(text):
                    stale.append(target.name)
            else:
                target.write_text(text)
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
