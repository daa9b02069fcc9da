"""The legacy and new-layout name grammars (compatfs.names).

The grammars of docs/layouts.md ("Name grammars"): legacy names as 5.6.0's
volumemgr builds them (``appRwVolumeName``, docs/eve.md section 9), new names
as new EVE's ``VolumeStatus.PathName()`` does (docs/eve.md section 1):

- VM file:   <sha>-<uuid>#<purge>.<format>, or <sha>-<uuid>.<format> when purge is 0
- container: <sha>-<uuid>#<purge> or <sha>-<uuid>
- new:       <volumeUUID>#<generation>.<format>
- sha is 64 hex digits of any case, uuid a canonical 8-4-4-4-12 UUID of any
  case (EVE's own parser accepts any run of hex digits and dashes; compatfs is
  stricter on purpose, tests/test_eve_tables.py), purge a decimal uint32,
  format the lower-case format name.
"""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from compatfs.names import (
    INT64_MAX,
    NAME_MAX,
    UINT32_MAX,
    LegacyVolumeName,
    NotAVolume,
    ObjType,
    VolumeName,
    check_component,
    parse_container_volume,
    parse_image_id,
    parse_obj_type,
    parse_verified_sha,
    parse_vm_volume,
    parse_volume,
)

SHA_LOWER = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHA_UPPER = SHA_LOWER.upper()
SHA_MIXED = "".join(c.upper() if i % 2 else c for i, c in enumerate(SHA_LOWER))
APP = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
APP_UPPER = APP.upper()
VOL = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"

assert SHA_MIXED not in (SHA_LOWER, SHA_UPPER)


# -- valid names, table-driven --------------------------------------------------

VALID_VM = [
    # (name, sha, app, purge, fmt)
    pytest.param(f"{SHA_LOWER}-{APP}.qcow2", SHA_LOWER, APP, 0, "qcow2", id="no-purge"),
    pytest.param(f"{SHA_LOWER}-{APP}#3.raw", SHA_LOWER, APP, 3, "raw", id="purge"),
    pytest.param(f"{SHA_UPPER}-{APP}.vhdx", SHA_UPPER, APP, 0, "vhdx", id="upper-sha"),
    pytest.param(f"{SHA_MIXED}-{APP}#12.vmdk", SHA_MIXED, APP, 12, "vmdk", id="mixed-sha"),
    pytest.param(f"{SHA_LOWER}-{APP_UPPER}#1.iso", SHA_LOWER, APP_UPPER, 1, "iso", id="upper-uuid"),
    pytest.param(f"{SHA_LOWER}-{APP}#{UINT32_MAX}.qcow", SHA_LOWER, APP, UINT32_MAX, "qcow",
                 id="purge-uint32-max"),
    pytest.param(f"{SHA_LOWER}-{APP}.img2", SHA_LOWER, APP, 0, "img2", id="unknown-format-ok"),
]


@pytest.mark.parametrize("name, sha, app, purge, fmt", VALID_VM)
def test_parse_vm_volume_valid(name: str, sha: str, app: str, purge: int, fmt: str) -> None:
    parsed = parse_vm_volume(name)
    assert parsed == LegacyVolumeName(sha, app, purge, fmt)
    # the case the sha and uuid were written in is kept; the *_lower views fold it
    assert parsed.sha == sha
    assert parsed.app_uuid == app
    assert parsed.sha_lower == SHA_LOWER
    assert parsed.app_lower == APP
    assert parsed.format() == name


VALID_CONTAINER = [
    pytest.param(f"{SHA_LOWER}-{APP}", SHA_LOWER, APP, 0, id="no-purge"),
    pytest.param(f"{SHA_LOWER}-{APP}#7", SHA_LOWER, APP, 7, id="purge"),
    pytest.param(f"{SHA_UPPER}-{APP}#1", SHA_UPPER, APP, 1, id="upper-sha"),
    pytest.param(f"{SHA_MIXED}-{APP_UPPER}", SHA_MIXED, APP_UPPER, 0, id="mixed-sha-upper-uuid"),
]


@pytest.mark.parametrize("name, sha, app, purge", VALID_CONTAINER)
def test_parse_container_volume_valid(name: str, sha: str, app: str, purge: int) -> None:
    parsed = parse_container_volume(name)
    assert parsed == LegacyVolumeName(sha, app, purge, None)
    assert parsed.fmt is None
    assert parsed.format() == name


VALID_NEW = [
    pytest.param(f"{VOL}#0.qcow2", VOL, 0, "qcow2", id="gen0"),
    pytest.param(f"{VOL}#5.raw", VOL, 5, "raw", id="gen5"),
    pytest.param(f"{VOL}#2.container", VOL, 2, "container", id="container"),
    pytest.param(f"{VOL.upper()}#0.vhdx", VOL.upper(), 0, "vhdx", id="upper-uuid"),
    pytest.param(f"{VOL}#{INT64_MAX}.raw", VOL, INT64_MAX, "raw", id="gen-int64-max"),
]


@pytest.mark.parametrize("name, vol, gen, fmt", VALID_NEW)
def test_parse_volume_valid(name: str, vol: str, gen: int, fmt: str) -> None:
    parsed = parse_volume(name)
    assert parsed == VolumeName(vol, gen, fmt)
    assert parsed.format() == name


def test_purge_zero_is_formatted_without_suffix() -> None:
    assert LegacyVolumeName(SHA_LOWER, APP, 0, "raw").format() == f"{SHA_LOWER}-{APP}.raw"
    assert LegacyVolumeName(SHA_LOWER, APP, 4, "raw").format() == f"{SHA_LOWER}-{APP}#4.raw"
    assert LegacyVolumeName(SHA_LOWER, APP, 0, None).format() == f"{SHA_LOWER}-{APP}"
    assert LegacyVolumeName(SHA_LOWER, APP, 4, None).format() == f"{SHA_LOWER}-{APP}#4"
    # the new layout always writes the generation, even 0
    assert VolumeName(VOL, 0, "raw").format() == f"{VOL}#0.raw"


# -- invalid names, table-driven --------------------------------------------------

def _bad(parse, name: str, reason: str, id: str):  # noqa: A002 - pytest's word
    return pytest.param(parse, name, reason, id=id)


INVALID = [
    # VM volume files
    _bad(parse_vm_volume, f"{SHA_LOWER}.raw", "no '-'", "vm-no-dash"),
    _bad(parse_vm_volume, f"{SHA_LOWER[:63]}-{APP}.raw", "64 hex digits", "vm-short-sha"),
    _bad(parse_vm_volume, f"{SHA_LOWER}0-{APP}.raw", "64 hex digits", "vm-long-sha"),
    _bad(parse_vm_volume, f"{'g' + SHA_LOWER[1:]}-{APP}.raw", "64 hex digits", "vm-non-hex-sha"),
    _bad(parse_vm_volume, f"-{APP}.raw", "64 hex digits", "vm-empty-sha"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP[:-1]}.raw", "UUID", "vm-uuid-short"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP[:-1]}x.raw", "UUID", "vm-uuid-non-hex"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP.replace('-', '')}.raw", "UUID", "vm-uuid-no-dashes"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{{{APP}}}.raw", "UUID", "vm-uuid-braces"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#0.raw", "'#0'", "vm-purge-zero"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#01.raw", "canonical decimal",
         "vm-purge-leading-zero"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#.raw", "canonical decimal", "vm-purge-empty"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#+1.raw", "canonical decimal", "vm-purge-plus"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#-1.raw", "canonical decimal", "vm-purge-negative"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}# 1.raw", "canonical decimal", "vm-purge-space"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#\u0661.raw", "canonical decimal",
         "vm-purge-arabic-digit"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#1#2.raw", "canonical decimal", "vm-two-hashes"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#{UINT32_MAX + 1}.raw", "out of range",
         "vm-purge-over-uint32"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.RAW", "lower-case format", "vm-upper-format"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.Qcow2", "lower-case format", "vm-mixed-format"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.{'a' * 17}", "lower-case format",
         "vm-format-too-long"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.", "lower-case format", "vm-empty-format"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.raw\n", "lower-case format", "vm-trailing-newline"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}", "no '.<format>'", "vm-no-format"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}#2", "no '.<format>'", "vm-no-format-purge"),
    _bad(parse_vm_volume, "..", "'.' and '..'", "vm-dotdot"),
    _bad(parse_vm_volume, ".", "'.' and '..'", "vm-dot"),
    _bad(parse_vm_volume, f"x/{SHA_LOWER}-{APP}.raw", "'/'", "vm-slash"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}.raw/", "'/'", "vm-trailing-slash"),
    _bad(parse_vm_volume, f"{SHA_LOWER}-{APP}\0.raw", "NUL", "vm-nul"),
    _bad(parse_vm_volume, "a" * (NAME_MAX + 1), f"longer than {NAME_MAX} bytes", "vm-too-long"),
    _bad(parse_vm_volume, "\u00e9" * 128, f"longer than {NAME_MAX} bytes", "vm-too-long-utf8"),
    _bad(parse_vm_volume, "", "empty", "vm-empty"),
    # container directories
    _bad(parse_container_volume, SHA_LOWER, "no '-'", "ct-no-dash"),
    _bad(parse_container_volume, f"{SHA_LOWER}{APP}", "64 hex digits", "ct-dash-only-in-uuid"),
    _bad(parse_container_volume, f"{SHA_LOWER[:40]}-{APP}", "64 hex digits", "ct-short-sha"),
    _bad(parse_container_volume, f"{SHA_LOWER[:-1]}z-{APP}", "64 hex digits", "ct-non-hex-sha"),
    _bad(parse_container_volume, f"{SHA_LOWER}-{APP}.raw", "UUID", "ct-with-format"),
    _bad(parse_container_volume, f"{SHA_LOWER}-not-a-uuid", "UUID", "ct-bad-uuid"),
    _bad(parse_container_volume, f"{SHA_LOWER}-{APP}#0", "'#0'", "ct-purge-zero"),
    _bad(parse_container_volume, f"{SHA_LOWER}-{APP}#01", "canonical decimal", "ct-leading-zero"),
    _bad(parse_container_volume, f"{SHA_LOWER}-{APP}#{2**32}", "out of range", "ct-purge-over"),
    _bad(parse_container_volume, "..", "'.' and '..'", "ct-dotdot"),
    _bad(parse_container_volume, "a/b", "'/'", "ct-slash"),
    _bad(parse_container_volume, "a\0b", "NUL", "ct-nul"),
    _bad(parse_container_volume, "", "empty", "ct-empty"),
    # new-layout volume names
    _bad(parse_volume, f"{VOL}.raw", "'#<generation>'", "new-no-generation"),
    _bad(parse_volume, f"{VOL}#0", "'.<format>'", "new-no-format"),
    _bad(parse_volume, f"{VOL}#0.RAW", "'.<format>'", "new-upper-format"),
    _bad(parse_volume, f"{VOL[:-1]}g#0.raw", "UUID", "new-bad-uuid"),
    _bad(parse_volume, f"{SHA_LOWER}-{APP}#1.raw", "UUID", "new-legacy-name"),
    _bad(parse_volume, f"{VOL}#01.raw", "canonical decimal", "new-leading-zero"),
    _bad(parse_volume, f"{VOL}#.raw", "canonical decimal", "new-empty-generation"),
    _bad(parse_volume, f"{VOL}#{INT64_MAX + 1}.raw", "out of range", "new-gen-over-int64"),
    _bad(parse_volume, "..", "'.' and '..'", "new-dotdot"),
    _bad(parse_volume, f"{VOL}#0.raw/x", "'/'", "new-slash"),
    _bad(parse_volume, f"{VOL}#0.raw\0", "NUL", "new-nul"),
    _bad(parse_volume, "", "empty", "new-empty"),
]


@pytest.mark.parametrize("parse, name, reason", INVALID)
def test_invalid_names(parse, name: str, reason: str) -> None:
    with pytest.raises(NotAVolume) as info:
        parse(name)
    exc = info.value
    assert isinstance(exc, ValueError)
    assert exc.name == name
    assert reason in exc.reason, exc.reason
    assert reason in str(exc)


# -- hypothesis: round trips ----------------------------------------------------

HEX_ANY = "0123456789abcdefABCDEF"
shas = st.text(HEX_ANY, min_size=64, max_size=64)
uuids = st.tuples(*(st.text(HEX_ANY, min_size=n, max_size=n)
                    for n in (8, 4, 4, 4, 12))).map("-".join)
purges = st.integers(0, UINT32_MAX)
generations = st.integers(0, INT64_MAX)
formats = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=16)

vm_names = st.builds(LegacyVolumeName, shas, uuids, purges, formats)
container_names = st.builds(LegacyVolumeName, shas, uuids, purges, st.none())
new_names = st.builds(VolumeName, uuids, generations, st.one_of(formats, st.just("container")))


@settings(max_examples=200)
@given(vm_names)
def test_vm_volume_round_trip(name: LegacyVolumeName) -> None:
    text = name.format()
    assert parse_vm_volume(text) == name
    assert check_component(text) == text


@settings(max_examples=200)
@given(container_names)
def test_container_volume_round_trip(name: LegacyVolumeName) -> None:
    text = name.format()
    assert parse_container_volume(text) == name
    assert check_component(text) == text


@settings(max_examples=200)
@given(new_names)
def test_new_volume_round_trip(name: VolumeName) -> None:
    text = name.format()
    assert parse_volume(text) == name
    assert check_component(text) == text


# Arbitrary text almost never parses, so the strictness properties also feed
# on valid names with one small edit: that is where a second spelling of the
# same name would hide (a '#0', a leading zero, a trailing newline, ...).
EDIT_CHARS = st.sampled_from(["0", "1", "9", "#", ".", "-", "/", "a", "A", "f", "F", "g", "z",
                             " ", "\n", "\t", "\0", "\u00e9", "\u0661", "\ufeff"])


@st.composite
def edited(draw, base: st.SearchStrategy[str]) -> str:
    text = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, len(text)))
        if kind == "insert":
            text = text[:pos] + draw(EDIT_CHARS) + text[pos:]
        elif kind == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + draw(EDIT_CHARS) + text[pos + 1:]
    return text


def _texts(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(),
        valid,
        edited(valid),
        edited(valid).map(str.upper),
        st.from_regex(r"[0-9a-fA-F]{62,66}-[0-9a-fA-F-]{34,38}(#[0-9]{0,11})?(\.[a-zA-Z0-9]{0,17})?",
                      fullmatch=True),
    )


def _check_strict(parse, text: str) -> None:
    try:
        parsed = parse(text)
    except NotAVolume as exc:
        event("refused")
        assert exc.name == text
        assert exc.reason
        return
    event("accepted")
    # accepted: it is the one canonical spelling of what it parsed to, and safe
    assert parsed.format() == text
    assert check_component(text) == text


@settings(max_examples=200)
@given(_texts(vm_names.map(LegacyVolumeName.format)))
def test_vm_volume_parse_is_strict(text: str) -> None:
    _check_strict(parse_vm_volume, text)


@settings(max_examples=200)
@given(_texts(container_names.map(LegacyVolumeName.format)))
def test_container_volume_parse_is_strict(text: str) -> None:
    _check_strict(parse_container_volume, text)


@settings(max_examples=200)
@given(_texts(new_names.map(VolumeName.format)))
def test_new_volume_parse_is_strict(text: str) -> None:
    _check_strict(parse_volume, text)


def test_edits_that_respell_are_refused() -> None:
    """Spot checks of the strictness property on the spellings most likely to slip."""
    base = f"{SHA_LOWER}-{APP}"
    for text in (f"{base}#0.raw", f"{base}#00.raw", f"{base}#007.raw", f"{base}.raw\n",
                 f" {base}.raw", f"{base}.raw ", f"{base}#0", f"{base}#01"):
        for parse in (parse_vm_volume, parse_container_volume):
            with pytest.raises(NotAVolume):
                parse(text)
    for text in (f"{VOL}#00.raw", f"{VOL}#01.raw", f"{VOL}#0.raw\n", f"{VOL}#\uff11.raw"):
        with pytest.raises(NotAVolume):
            parse_volume(text)


# -- hypothesis: check_component ------------------------------------------------

def _encoded_len(name: str) -> int | None:
    try:
        return len(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return None


def _safe(name: str) -> bool:
    size = _encoded_len(name)
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and size is not None and size <= NAME_MAX)


components = st.one_of(
    st.text(),
    st.text(st.sampled_from(["a", ".", "/", "\0", "\u00e9", "\U0001f600", "\udc80", "\ud800"]),
            max_size=8),
    st.sampled_from(["", ".", "..", "...", "/", "\0", "a/b", "a\0b", "./a", "../a"]),
    st.text(st.characters(codec="utf-8"), min_size=60, max_size=300),
    st.integers(NAME_MAX - 2, NAME_MAX + 2).map(lambda n: "a" * n),
    st.integers(NAME_MAX // 2 - 1, NAME_MAX // 2 + 2).map(lambda n: "\u00e9" * n),
)


@settings(max_examples=200)
@given(components)
def test_check_component_refuses_exactly_the_unsafe(name: str) -> None:
    try:
        result = check_component(name)
    except NotAVolume:
        accepted = False
    else:
        accepted = True
        assert result == name
        # never accepted: a '/', a NUL, '.' or '..', empty, or over NAME_MAX bytes
        assert "/" not in name
        assert "\0" not in name
        assert name not in ("", ".", "..")
        size = _encoded_len(name)
        assert size is not None and size <= NAME_MAX
    assert accepted == _safe(name)


@pytest.mark.parametrize("name, ok", [
    ("a" * NAME_MAX, True),
    ("a" * (NAME_MAX + 1), False),
    ("\u00e9" * 127 + "a", True),       # 255 bytes
    ("\u00e9" * 128, False),            # 256 bytes, 128 characters
    ("\U0001f600" * 63 + "abc", True),  # 255 bytes
    ("\U0001f600" * 64, False),         # 256 bytes
    ("\udcff", True),                   # surrogate escape of byte 0xff: a real file name
    ("\ud800", False),                  # lone surrogate: not encodable
    ("\udc2f", False),                  # not a surrogate escape ('/' is < 0x80)
    ("...", True),
    (".a", True),
])
def test_check_component_boundaries(name: str, ok: bool) -> None:
    if ok:
        assert check_component(name) == name
    else:
        with pytest.raises(NotAVolume):
            check_component(name)


# -- download tree components ---------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("appImg.obj", ObjType.APP_IMG),
    ("baseOs.obj", ObjType.BASE_OS),
    ("cert.obj", ObjType.CERT),
])
def test_parse_obj_type(name: str, expected: ObjType) -> None:
    assert parse_obj_type(name) is expected
    assert expected.value == name


@pytest.mark.parametrize("name", ["", "appimg.obj", "AppImg.obj", "appImg", "appImg.obj/",
                                  "..", "cert.obj ", "baseOS.obj", "obj"])
def test_parse_obj_type_invalid(name: str) -> None:
    with pytest.raises(NotAVolume) as info:
        parse_obj_type(name)
    assert "object type" in info.value.reason


@pytest.mark.parametrize("name", [APP, APP_UPPER, VOL])
def test_parse_image_id(name: str) -> None:
    assert parse_image_id(name) == name


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("..", "'.' and '..'"),
    (f"{APP}/x", "'/'"),
    (f"{APP}\0", "NUL"),
    (APP.replace("-", ""), "UUID"),
    (APP[:-1], "UUID"),
    (f"{APP}x", "UUID"),
    (f"{{{APP}}}", "UUID"),
    (SHA_LOWER, "UUID"),
])
def test_parse_image_id_invalid(name: str, reason: str) -> None:
    with pytest.raises(NotAVolume) as info:
        parse_image_id(name)
    assert reason in info.value.reason


@pytest.mark.parametrize("name", [SHA_LOWER, SHA_UPPER, SHA_MIXED])
def test_parse_verified_sha_returns_lower_case(name: str) -> None:
    assert parse_verified_sha(name) == SHA_LOWER


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("..", "'.' and '..'"),
    (SHA_LOWER[:63], "sha256"),
    (SHA_LOWER + "0", "sha256"),
    ("g" + SHA_LOWER[1:], "sha256"),
    (f"{SHA_LOWER}/", "'/'"),
    (f"{SHA_LOWER}\0", "NUL"),
    (f"{SHA_LOWER}\n", "sha256"),
    (APP, "sha256"),
])
def test_parse_verified_sha_invalid(name: str, reason: str) -> None:
    with pytest.raises(NotAVolume) as info:
        parse_verified_sha(name)
    assert reason in info.value.reason


@settings(max_examples=200)
@given(shas)
def test_parse_verified_sha_property(sha: str) -> None:
    assert parse_verified_sha(sha) == sha.lower()
    assert check_component(sha) == sha
