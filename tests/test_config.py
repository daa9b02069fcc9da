"""The YAML configuration: schema, validation, defaults, and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from compatfs import config
from compatfs.config import Config, ConfigError, Override, load, parse
from compatfs.enums import Stage
from compatfs.layout import DEFAULT_ROOT, LOCATIONS

SRC = "/etc/compatfs/device.yaml"

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
APP = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
VOL = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
APP2 = "16fd2706-8baf-433b-82eb-8c7fada847da"
VOL2 = "a8098c1a-f86e-11da-bd1a-00112444be1e"

FULL = f"""\
# a complete configuration
root: /data/persist/
stage: migrate
require_encrypted_vault: false
mount_prepared: true
paths:
  cas: vault/case
  checkpoint: checkpoint//config/
overrides:
  - app: {APP.upper()}
    sha: {SHA.upper()}
    volume: {VOL.upper()}
    generation: 3
    clear_text: true
  - app: {APP2}
    sha: "{SHA}"
    volume: {VOL2}
"""


def test_parse_full_file() -> None:
    cfg = parse(FULL, SRC)
    assert cfg == Config(
        root="/data/persist",
        stage="migrate",
        require_encrypted_vault=False,
        mount_prepared=True,
        paths={"cas": "vault/case", "checkpoint": "checkpoint/config"},
        overrides=(
            Override(app=APP, sha=SHA, volume=VOL, generation=3, clear_text=True),
            Override(app=APP2, sha=SHA, volume=VOL2, generation=0, clear_text=False),
        ),
        source=SRC,
    )


def test_full_file_layout() -> None:
    cfg = parse(FULL, SRC)
    layout = cfg.layout()
    assert layout.root == "/data/persist"
    assert layout.path("cas") == "/data/persist/vault/case"
    assert layout.path("img") == "/data/persist/img"
    assert cfg.layout("/elsewhere").path("cas") == "/elsewhere/vault/case"


@pytest.mark.parametrize("text", ["", "\n", "# nothing configured\n", "   \n# c\n"])
def test_empty_file_gives_defaults(text: str) -> None:
    cfg = parse(text, SRC)
    assert cfg == Config(source=SRC)
    assert cfg.root == DEFAULT_ROOT
    assert cfg.stage == "observe"
    assert cfg.require_encrypted_vault is True
    assert cfg.mount_prepared is False
    assert cfg.paths == {}
    assert cfg.overrides == ()


@pytest.mark.parametrize("text", ["---\n", "---\n# root: /persist\n"])
def test_empty_document_gives_defaults(text: str) -> None:
    assert parse(text, SRC) == Config(source=SRC)


def test_defaults_come_from_the_schema() -> None:
    cfg = Config()
    for key, spec in config.TOP.items():
        value = getattr(cfg, "layout_name" if key == "layout" else key)
        if key == "overrides":
            assert value == tuple(spec.default)
        elif key == "migration":
            for mkey, mspec in config.MIGRATION.items():
                assert getattr(value, mkey) == mspec.default, mkey
        else:
            assert value == spec.default, key


@pytest.mark.parametrize("stage", [s for s in Stage if s != Stage.OFF])
def test_every_stage_is_accepted(stage: str) -> None:
    assert parse(f"stage: {stage}\n", SRC).stage == stage


@pytest.mark.parametrize("text,mode", [("true", "copy"), ("false", "off"),
                                       ("readback", "readback")])
def test_verify_modes(text: str, mode: str) -> None:
    assert parse(f"migration:\n  verify: {text}\n", SRC).migration.verify == mode


def test_quoted_stage_off_is_accepted() -> None:
    assert parse('stage: "off"\n', SRC).stage == "off"


def test_plain_stage_off_is_accepted() -> None:
    assert parse("stage: off\n", SRC).stage == "off"


@pytest.mark.parametrize("key", sorted(LOCATIONS))
def test_every_location_can_be_overridden(key: str) -> None:
    cfg = parse(f"paths:\n  {key}: moved/{key}\n", SRC)
    assert cfg.paths == {key: f"moved/{key}"}
    assert cfg.layout("/r").path(key) == f"/r/moved/{key}"


def test_generation_bounds() -> None:
    top = 2**63 - 1
    text = f"overrides:\n  - {{app: {APP}, sha: {SHA}, volume: {VOL}, generation: {top}}}\n"
    assert parse(text, SRC).overrides[0].generation == top


# -- errors -----------------------------------------------------------------------

def _ov(**fields: object) -> str:
    """One override item, two-space indented, app/sha/volume first."""
    base: dict[str, object] = {"app": APP, "sha": SHA, "volume": VOL}
    base.update(fields)
    lines = []
    for i, (k, v) in enumerate((k, v) for k, v in base.items() if v is not None):
        lines.append(("  - " if i == 0 else "    ") + f"{k}: {v}")
    return "overrides:\n" + "\n".join(lines) + "\n"


# (yaml text, 1-based line, dotted key the message must name)
ERRORS = [
    # unknown keys
    pytest.param("stage: observe\nbogus: 1\n", 2, "bogus", id="unknown-top-key"),
    pytest.param("paths:\n  img: a\n  bogus: b\n", 3, "paths.bogus", id="unknown-paths-key"),
    pytest.param(_ov(color="red"), 5, "overrides[0].color", id="unknown-override-key"),
    # wrong types, one or more per top-level key
    pytest.param("root: persist\n", 1, "root", id="root-relative"),
    pytest.param("root: 5\n", 1, "root", id="root-int"),
    pytest.param("root: [/persist]\n", 1, "root", id="root-list"),
    pytest.param("root: {a: 1}\n", 1, "root", id="root-mapping"),
    pytest.param("root:\n", 1, "root", id="root-null"),
    pytest.param("stage: 3\n", 1, "stage", id="stage-int"),
    pytest.param("stage: [observe]\n", 1, "stage", id="stage-list"),
    pytest.param("stage: true\n", 1, "stage", id="stage-bool"),
    pytest.param("require_encrypted_vault: maybe\n", 1, "require_encrypted_vault", id="rev-str"),
    pytest.param("require_encrypted_vault: 1\n", 1, "require_encrypted_vault", id="rev-int"),
    pytest.param("require_encrypted_vault: [true]\n", 1, "require_encrypted_vault", id="rev-list"),
    pytest.param("mount_prepared: 0\n", 1, "mount_prepared", id="mp-int"),
    pytest.param("mount_prepared: 'true'\n", 1, "mount_prepared", id="mp-quoted"),
    pytest.param("paths: vault\n", 1, "paths", id="paths-str"),
    pytest.param("migration: fast\n", 1, "migration", id="migration-str"),
    pytest.param("vault_wait_s: soon\n", 1, "vault_wait_s", id="vault_wait_s-str"),
    pytest.param("vault_wait_s: -1\n", 1, "vault_wait_s", id="vault_wait_s-negative"),
    pytest.param("migration:\n  concurrency: 0\n", 2, "migration.concurrency",
                 id="migration-range"),
    pytest.param("migration:\n  verify: 'yes'\n", 2, "migration.verify", id="migration-bool"),
    pytest.param("migration:\n  throttle_mib_per_s: -1\n", 2, "migration.throttle_mib_per_s",
                 id="migration-negative"),
    pytest.param("migration:\n  speed: 1\n", 2, "migration.speed", id="migration-unknown"),
    pytest.param("paths:\n  - img\n", 2, "paths", id="paths-list"),
    pytest.param("paths:\n  img: [a]\n", 2, "paths.img", id="paths-value-list"),
    pytest.param("paths:\n  img: 2024\n", 2, "paths.img", id="paths-value-int"),
    pytest.param("overrides: {app: x}\n", 1, "overrides", id="overrides-mapping"),
    pytest.param("overrides: none\n", 1, "overrides", id="overrides-str"),
    pytest.param("overrides:\n", 1, "overrides", id="overrides-null"),
    # bad stage
    pytest.param("# c\nstage: fast\n", 2, "stage", id="bad-stage"),
    pytest.param("stage: Observe\n", 1, "stage", id="stage-wrong-case"),
    # bad paths
    pytest.param("paths:\n  vault_volumes: /abs/volumes\n", 2, "paths.vault_volumes",
                 id="path-absolute"),
    pytest.param("paths:\n  img: ../img\n", 2, "paths.img", id="path-dotdot"),
    pytest.param("paths:\n  img: a/../../img\n", 2, "paths.img", id="path-dotdot-inner"),
    pytest.param("paths:\n  img: ''\n", 2, "paths.img", id="path-empty"),
    pytest.param("paths:\n  img: .\n", 2, "paths.img", id="path-dot"),
    # duplicates
    pytest.param("stage: observe\nroot: /p\nstage: migrate\n", 3, "stage", id="dup-top"),
    pytest.param("paths:\n  img: a\n  img: b\n", 3, "paths.img", id="dup-paths"),
    pytest.param(f"overrides:\n  - app: {APP}\n    app: {APP}\n", 3, "overrides[0].app",
                 id="dup-override"),
    # overrides items
    pytest.param("overrides:\n  - 5\n", 2, "overrides[0]", id="override-item-scalar"),
    pytest.param("overrides:\n  - [a]\n", 2, "overrides[0]", id="override-item-list"),
    pytest.param(_ov(app=None), 2, "overrides[0]", id="override-missing-app"),
    pytest.param(_ov(sha=None), 2, "overrides[0]", id="override-missing-sha"),
    pytest.param(_ov(volume=None), 2, "overrides[0]", id="override-missing-volume"),
    pytest.param(_ov() + f"  - app: {APP2}\n    sha: {SHA}\n", 5, "overrides[1]",
                 id="second-missing"),
    pytest.param(_ov(app="not-a-uuid"), 2, "overrides[0].app", id="override-bad-app"),
    pytest.param(_ov(app=APP.replace("-", "")), 2, "overrides[0].app", id="override-app-no-dashes"),
    pytest.param(_ov(volume=VOL[:-1]), 4, "overrides[0].volume", id="override-bad-volume"),
    pytest.param(_ov(sha=SHA[:-1]), 3, "overrides[0].sha", id="override-short-sha"),
    pytest.param(_ov(sha="g" + SHA[1:]), 3, "overrides[0].sha", id="override-non-hex-sha"),
    pytest.param(_ov(generation=-1), 5, "overrides[0].generation", id="override-negative-gen"),
    pytest.param(_ov(generation=2**63), 5, "overrides[0].generation", id="override-huge-gen"),
    pytest.param(_ov(generation="true"), 5, "overrides[0].generation", id="override-bool-gen"),
    pytest.param(_ov(generation=1.5), 5, "overrides[0].generation", id="override-float-gen"),
    pytest.param(_ov(clear_text="yes please"), 5, "overrides[0].clear_text",
                 id="override-bad-clear"),
    pytest.param(_ov(format="img"), 5, "overrides[0].format", id="override-unknown-format"),
    pytest.param(_ov(format="QCOW2"), 5, "overrides[0].format", id="override-upper-format"),
    pytest.param(_ov(format=3), 5, "overrides[0].format", id="override-int-format"),
    pytest.param("layout: eve-os\n", 1, "layout", id="layout-unknown"),
    pytest.param("layout: [eve]\n", 1, "layout", id="layout-list"),
    pytest.param("eve_release: 9.1\n", 1, "eve_release", id="eve_release-number"),
    pytest.param("eve_release: \"5.7\"\n", 1, "eve_release", id="eve_release-ambiguous-5.7"),
    pytest.param("eve_release: \"5.6\"\n", 1, "eve_release", id="eve_release-legacy"),
    pytest.param("eve_release: \"99.0\"\n", 1, "eve_release", id="eve_release-future"),
    pytest.param("eve_release: \"09.1\"\n", 1, "eve_release", id="eve_release-leading-zero"),
    pytest.param("eve_release: \"9\"\n", 1, "eve_release", id="eve_release-no-minor"),
    pytest.param("layout: design-note\neve_release: \"9.1\"\n", 2, "eve_release",
                 id="eve_release-with-design-note"),
    # structure
    pytest.param("- stage: observe\n- root: /p\n", 1, "top level", id="top-level-list"),
    pytest.param("just a string\n", 1, "top level", id="top-level-scalar"),
    pytest.param("1: x\n", 1, "top level", id="top-level-int-key"),
]


@pytest.mark.parametrize("text, line, key", ERRORS)
def test_error_names_file_line_and_key(text: str, line: int, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, SRC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}:{line}: {key}: "), message


def test_every_top_level_key_has_a_wrong_type_case() -> None:
    covered = {p.id.split("-")[0] for p in ERRORS}
    aliases = {"rev": "require_encrypted_vault", "mp": "mount_prepared"}
    covered = {aliases.get(c, c) for c in covered}
    assert set(config.TOP) <= covered


@pytest.mark.parametrize("text, line", [
    pytest.param("stage: [observe\n", 2, id="unclosed-flow"),
    pytest.param("root: /p\nstage: observe\n  bad: indent\n", 3, id="bad-indent"),
    pytest.param("stage: observe\n\tx: 1\n", 2, id="tab"),
    pytest.param("root: '/p\n", 2, id="unclosed-quote"),
    pytest.param("a: 1\n---\nb: 2\n", 2, id="two-documents"),
    pytest.param("root: *nowhere\n", 1, id="unknown-alias"),
])
def test_invalid_yaml_names_file_and_line(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, SRC)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{SRC}:{line}: "), message
    assert "YAML" in message


@pytest.mark.parametrize("char", ["\0", "\x01", "\x7f"])
def test_control_character_is_a_config_error(char: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"stage: observe\nroot: /p{char}\n", SRC)
    assert str(info.value).startswith(f"{SRC}:2: ")


def test_error_with_newline_in_key_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse('"bad\\nkey": 1\n', SRC)
    assert "\n" not in str(info.value)


def test_error_is_not_chained_to_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        parse("stage: [observe\n", SRC)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_default_source_name() -> None:
    with pytest.raises(ConfigError) as info:
        parse("bogus: 1\n")
    assert str(info.value).startswith("<config>:1: bogus: ")


# -- load -------------------------------------------------------------------------

def test_load_none_is_defaults() -> None:
    assert load(None) == Config()


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "compatfs.yaml"
    path.write_text(FULL, encoding="utf-8")
    cfg = load(str(path))
    assert cfg.source == str(path)
    assert cfg.stage == "migrate"
    assert cfg.overrides[0].volume == VOL


def test_load_reports_the_file_name(tmp_path: Path) -> None:
    path = tmp_path / "compatfs.yaml"
    path.write_text("stage: observe\nstage: migrate\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}:2: stage: ")


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("data", [b"stage: \xff\n", b"\xfe\xff\x00s",
                                  "stage: observé\n".encode("latin-1")])
def test_load_non_utf8(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "UTF-8" in message
    assert "\n" not in message


# -- through the command line -------------------------------------------------------

def _compatfs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "COMPATFS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "compatfs", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("text, line", [
    pytest.param("stage: observe\nbogus: 1\n", 2, id="unknown-key"),
    pytest.param("stage: observe\nstage: fast\n", 2, id="bad-stage"),
    pytest.param("paths:\n  img: /abs\n", 2, id="absolute-path"),
    pytest.param("stage: [observe\n", 2, id="invalid-yaml"),
    pytest.param("- a\n", 1, id="top-level-list"),
])
def test_cli_bad_config(tmp_path: Path, text: str, line: int) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text, encoding="utf-8")
    proc = _compatfs("plan", "--root", str(root), "--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("compatfs: error:")
    assert f"{bad}:{line}:" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize("kind", ["missing", "non-utf8"])
def test_cli_unreadable_config(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    bad = tmp_path / "bad.yaml"
    if kind == "non-utf8":
        bad.write_bytes(b"stage: \xff\n")
    proc = _compatfs("plan", "--root", str(root), "--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("compatfs: error:")
    assert str(bad) in lines[0]


def test_cli_config_with_control_character(tmp_path: Path) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: observe\nroot: /p\0\n", encoding="utf-8")
    proc = _compatfs("plan", "--root", str(root), "--config", str(bad), cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("compatfs: error:")
    assert f"{bad}:2:" in lines[0]


# -- numbers are finite and in range; size and nesting are bounded ----------------

#: Every number the schema accepts, with its stated range (docs/configuration.md).
RANGES = {
    ("", "vault_wait_s"): (0, 3600),
    ("migration", "throttle_mib_per_s"): (0, 100_000),
    ("migration", "concurrency"): (1, 16),
    ("migration", "reserve_percent"): (0, 50),
    ("migration", "retries"): (1, 100),
    ("migration", "retry_backoff_s"): (0, 86400),
    ("migration", "rescan_s"): (1, 86400),
}


def _setting_text(section: str, key: str, value: object) -> tuple[str, int, str]:
    if section:
        return f"{section}:\n  {key}: {value}\n", 2, f"{section}.{key}"
    return f"{key}: {value}\n", 1, key


def test_every_number_key_has_a_range() -> None:
    numeric = {("", k) for k, spec in config.TOP.items()
               if spec.check.__qualname__.startswith("_number")}
    numeric |= {("migration", k) for k, spec in config.MIGRATION.items()
                if spec.check.__qualname__.startswith(("_number", "_whole"))}
    assert numeric == set(RANGES)


@pytest.mark.parametrize("section, key", sorted(RANGES))
@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "+.inf", "1.0e+400",
                                   "99999999999999999999999999", "-1", "low-1", "high+1"])
def test_numbers_must_be_finite_and_in_range(section: str, key: str, value: str) -> None:
    low, high = RANGES[(section, key)]
    value = {"low-1": low - 1, "high+1": high + 1}.get(value, value)
    text, line, name = _setting_text(section, key, value)
    with pytest.raises(ConfigError) as info:
        parse(text, SRC)
    message = str(info.value)
    assert message.startswith(f"{SRC}:{line}: {name}: must be a "), message
    assert f"from {low} to {high}" in message   # the range is stated


@pytest.mark.parametrize("section, key", sorted(RANGES))
def test_the_default_and_the_bounds_are_accepted(section: str, key: str) -> None:
    low, high = RANGES[(section, key)]
    spec = (config.MIGRATION if section else config.TOP)[key]
    for value in (spec.default, low, high):
        cfg = parse(_setting_text(section, key, value)[0], SRC)
        assert getattr(cfg.migration if section else cfg, key) == value


def test_yaml_nested_deeper_than_the_bound_is_one_line(tmp_path: Path) -> None:
    for text in ("a: " + "[" * 5000 + "]" * 5000 + "\n",
                 "".join("  " * i + f"k{i}:\n" for i in range(5000)) + "  " * 5000 + "v\n",
                 "overrides:\n  - " + "[" * (config.MAX_DEPTH) + "]" * config.MAX_DEPTH + "\n"):
        with pytest.raises(ConfigError) as info:
            parse(text, SRC)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(f"{SRC}:") and f"nested deeper than {config.MAX_DEPTH}" in message
    # the schema's own depth is far below the bound
    assert parse(FULL, SRC).overrides


def test_oversize_config_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * config.MAX_CONFIG_BYTES + "\nstage: observe\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value).startswith(f"{path}: too large: ")


@pytest.mark.parametrize("make", ["fifo", "socket", "chardev"])
def test_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, make: str) -> None:
    import socket

    path = tmp_path / "c.yaml"
    if make == "fifo":
        os.mkfifo(path)
    elif make == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    else:
        path = Path("/dev/null")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "not a regular file" in str(info.value) and str(path) in str(info.value)


def test_config_through_a_symbolic_link_is_read(tmp_path: Path) -> None:
    real = tmp_path / "real.yaml"
    real.write_text("stage: redirect\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load(str(link)).stage == "redirect"


def test_cli_fifo_config_is_a_one_line_error_not_a_hang(tmp_path: Path) -> None:
    root = tmp_path / "persist"
    root.mkdir()
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    for command in ("plan", "status"):
        proc = _compatfs(command, "--root", str(root), "--config", str(fifo), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()
        assert lines == [f"compatfs: error: {fifo}: is a FIFO, not a regular file"], proc.stderr


@pytest.mark.parametrize("text, expected", [("12.5", 12.5), ("0", 0.0), ("100000", 100000.0)])
def test_parse_setting_accepts_what_the_file_accepts(text: str, expected: float) -> None:
    key = config.MIGRATION["throttle_mib_per_s"]
    assert config.parse_setting(key, text, "throttle_mib_per_s") == expected


@pytest.mark.parametrize("text", ["nan", ".nan", "inf", ".inf", "-1", "1e400", "100001", "",
                                  "[1]", "{a: 1}", "fast", "1\n---\n2", "\0", "1" * 5000,
                                  "-" + "9" * 60000])
def test_parse_setting_refuses_what_the_file_refuses(text: str) -> None:
    key = config.MIGRATION["throttle_mib_per_s"]
    with pytest.raises(ConfigError) as info:
        config.parse_setting(key, text, "throttle_mib_per_s")
    assert str(info.value).startswith("throttle_mib_per_s: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["vault_wait_s", "migration:\n  retries"])
def test_a_number_of_thousands_of_digits_is_one_line(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(f"{key}: {'7' * 5000}\n", SRC)
    assert "far out of range" in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize("fmt", ["qcow2", "raw", "vhdx", "container"])
def test_override_format(fmt: str) -> None:
    assert parse(_ov(format=fmt), SRC).overrides[0].format == fmt
    assert parse(_ov(), SRC).overrides[0].format is None
