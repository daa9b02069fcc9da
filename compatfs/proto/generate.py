"""Regenerate the ``*_pb2.py`` modules and their ``*_pb2.pyi`` stubs from the ``.proto`` files.

protoc writes the message classes at import time (``_builder`` fills the module's
globals), so a type checker sees none of them in the ``.py``: the ``.pyi`` stubs
protoc writes beside them are what mypy checks ``checkpoint.py`` against.

Needs grpcio-tools (a test dependency). Run: ``python -m compatfs.proto.generate``;
``--check`` writes nothing and reports what is out of date.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = ("eve_config.proto", "eve_auth.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto here, writing the modules and stubs into *out_dir*."""
    from grpc_tools import protoc  # test-only dependency

    args = ["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", *PROTOS]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + ", ".join(PROTOS))
    return [out_dir / p.replace(".proto", suffix) for p in PROTOS for suffix in ("_pb2.py",
                                                                                 "_pb2.pyi")]


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


_DECLARED_RE = re.compile(r"^\s*(?:class (\w+)|(\w+):)", re.M)


def declared_in(stub_text: str) -> list[str]:
    """The classes and fields a generated stub declares, in order: what the check compares.

    How protoc spells their types (``Optional[X]`` or ``X | None``) changes with
    grpcio-tools releases; which names there are changes only with the ``.proto``.
    """
    return [cls or field for cls, field in _DECLARED_RE.findall(stub_text)]


def _same(produced: Path, target: Path) -> bool:
    if not target.exists():
        return False
    compare = descriptor_of if produced.suffix == ".py" else declared_in
    return compare(target.read_text()) == compare(produced.read_text())


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for produced in generate(Path(tmp)):
            target = HERE / produced.name
            if check:
                if not _same(produced, target):
                    stale.append(target.name)
            else:
                target.write_text(produced.read_text())
        if stale:
            print("out of date: " + ", ".join(stale), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
