"""The documentation names every key the code accepts."""

from __future__ import annotations

import re

from compatfs.config import MIGRATION, OVERRIDE, TOP
from compatfs.layout import LOCATIONS

from .conftest import REPO


def test_configuration_doc_lists_every_key_with_its_default():
    doc = (REPO / "docs/configuration.md").read_text()
    for key in TOP:
        assert re.search(rf"^\| `{key}` \|", doc, re.M), key
    for key in (*OVERRIDE, *MIGRATION):
        assert re.search(rf"^\| `{key}` \|", doc, re.M), key
    for key, (default, _) in LOCATIONS.items():
        assert re.search(rf"^\| `{key}` \| `{re.escape(default)}` \|", doc, re.M), key


def test_layout_doc_lists_every_location():
    doc = (REPO / "docs/layouts.md").read_text()
    for key in LOCATIONS:
        assert f"`{key}`" in doc, key


def test_readme_commands_are_what_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci/run").read_text()
    assert "./dev.sh test" in readme and "./dev.sh demo" in readme
    assert "exec ./dev.sh test" in ci


def test_control_doc_lists_every_key_and_command():
    from compatfs.control import COMMANDS, KEYS

    doc = (REPO / "docs/control.md").read_text()
    for key in (*KEYS, *COMMANDS):
        assert re.search(rf"^\| `{re.escape(key)}` \|", doc, re.M), key
