"""zedmanager's latch (``compatfs.latch``): good entries kept, each bad file one problem."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from compatfs import latch
from compatfs.latch import Latch, expected_file_name
from compatfs.testing import devicegen

RNG = random.Random(2024)
APP = devicegen.random_uuid(RNG)
IMG = devicegen.random_uuid(RNG)
IMG2 = devicegen.random_uuid(RNG)
SHA = devicegen.random_sha(RNG)
SHA2 = devicegen.random_sha(RNG)


def entry(app=APP, image=IMG, sha=SHA, purge=0, **extra) -> dict:
    obj = {"AppUUID": app, "ImageID": image, "Hash": sha, "PurgeCounter": purge}
    obj.update(extra)
    return obj


def put(directory: Path, name: str, content) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    data = content if isinstance(content, bytes) else json.dumps(content).encode()
    path.write_bytes(data)
    return path


def good_name(app=APP, image=IMG, purge=0) -> str:
    return expected_file_name(app, image, purge)


def assert_one_problem_each(result: Latch, paths: list[Path]) -> None:
    assert len(result.problems) == len(paths), result.problems
    for p in paths:
        hits = [msg for msg in result.problems if str(p) in msg]
        assert len(hits) == 1, (p, result.problems)


# -- good files ------------------------------------------------------------------

def test_expected_file_names():
    assert expected_file_name("A", "B", 0) == "A.B.json"
    assert expected_file_name("A", "B", 7) == "A.B.7.json"


def test_good_files_purge_zero_and_nonzero(tmp_path):
    d = tmp_path / "AppAndImageToHash"
    put(d, f"{APP}.{IMG}.json", entry())
    put(d, f"{APP}.{IMG}.3.json", entry(sha=SHA2, purge=3))
    put(d, f"{APP}.{IMG2}.json", entry(image=IMG2, sha=SHA2.upper()))
    result = latch.load(str(d))
    assert result.problems == ()
    assert result.hashes == {
        (APP, IMG, 0): SHA,
        (APP, IMG, 3): SHA2,
        (APP, IMG2, 0): SHA2.upper(),
    }
    assert result.lookup(APP, IMG, 0) == SHA
    assert result.lookup(APP, IMG, 3) == SHA2
    assert result.lookup(APP, IMG, 1) is None   # the purge counter is part of the key
    assert result.lookup(APP, IMG2, 3) is None


def test_devicegen_write_latch_is_read_back(tmp_path):
    d = tmp_path / "latch"
    devicegen.write_latch(str(d), APP, IMG, SHA, 0)
    devicegen.write_latch(str(d), APP, IMG, SHA2, 5)
    result = latch.load(str(d))
    assert result.problems == ()
    assert result.lookup(APP, IMG, 0) == SHA
    assert result.lookup(APP, IMG, 5) == SHA2


def test_upper_case_uuids_are_keyed_lower_case(tmp_path):
    d = tmp_path / "latch"
    put(d, good_name(APP.upper(), IMG.upper(), 2), entry(APP.upper(), IMG.upper(), purge=2))
    result = latch.load(str(d))
    assert result.problems == ()
    assert result.hashes == {(APP, IMG, 2): SHA}
    assert result.lookup(APP.upper(), IMG, 2) == SHA


def test_missing_purge_counter_means_zero(tmp_path):
    d = tmp_path / "latch"
    obj = entry()
    del obj["PurgeCounter"]
    put(d, good_name(), obj)
    result = latch.load(str(d))
    assert result.problems == ()
    assert result.lookup(APP, IMG, 0) == SHA


def test_extra_json_keys_are_ignored(tmp_path):
    d = tmp_path / "latch"
    put(d, good_name(), entry(Extra="x", Other=[1, 2]))
    assert latch.load(str(d)).lookup(APP, IMG, 0) == SHA


def test_other_files_are_not_latch_entries(tmp_path):
    d = tmp_path / "latch"
    put(d, good_name() + ".tmp", b"half written")
    put(d, "README", b"hello")
    (d / "subdir").mkdir()
    result = latch.load(str(d))
    assert result == Latch({}, ())


def test_missing_directory_is_an_empty_latch(tmp_path):
    result = latch.load(str(tmp_path / "no" / "such" / "dir"))
    assert result.hashes == {}
    assert result.problems == ()


def test_directory_that_is_a_file_is_one_problem(tmp_path):
    f = tmp_path / "latch"
    f.write_bytes(b"")
    result = latch.load(str(f))
    assert result.hashes == {}
    assert len(result.problems) == 1
    assert str(f) in result.problems[0]


# -- bad files -------------------------------------------------------------------

BAD_IMG = devicegen.random_uuid(RNG)


def bad_entry(**kw) -> dict:
    """An entry for (APP, BAD_IMG, 0), so that its file name good_name(image=BAD_IMG)
    matches whatever the content gets right: only the broken field is wrong."""
    kw.setdefault("image", BAD_IMG)
    return entry(**kw)


def without(key: str) -> dict:
    obj = bad_entry()
    del obj[key]
    return obj


BAD_CONTENTS = {
    "bad-json": b'{"AppUUID": ',
    "not-utf8": b'{"AppUUID": "\xff\xfe"}',
    "empty": b"",
    "list": [bad_entry()],
    "string": "just a string",
    "null": None,
    "number": 42,
    "no-app": without("AppUUID"),
    "no-image": without("ImageID"),
    "no-hash": without("Hash"),
    "app-not-uuid": bad_entry(app="not-a-uuid"),
    "app-number": bad_entry(app=12),
    "image-not-uuid": bad_entry(image=BAD_IMG + "0"),
    "hash-short": bad_entry(sha=SHA[:63]),
    "hash-not-hex": bad_entry(sha="g" * 64),
    "hash-null": bad_entry(sha=None),
    "purge-negative": bad_entry(purge=-1),
    "purge-too-big": bad_entry(purge=2**32),
    "purge-bool": bad_entry(purge=False),   # False == 0, yet not a number
    "purge-float": bad_entry(purge=0.0),
    "purge-string": bad_entry(purge="0"),
}


def test_bad_entry_base_is_good(tmp_path):
    """The bad cases below differ from an accepted file in one field only."""
    d = tmp_path / "latch"
    put(d, good_name(image=BAD_IMG), bad_entry())
    assert latch.load(str(d)) == Latch({(APP, BAD_IMG, 0): SHA}, ())


@pytest.mark.parametrize("kind", sorted(BAD_CONTENTS))
def test_each_bad_file_is_one_problem_and_good_ones_stay(tmp_path, kind):
    d = tmp_path / "latch"
    put(d, good_name(), entry())
    put(d, good_name(image=IMG2, purge=4), entry(image=IMG2, purge=4, sha=SHA2))
    obj = BAD_CONTENTS[kind]
    # named as the key it pretends to be, so only the content is wrong
    purge = obj.get("PurgeCounter", 0) if isinstance(obj, dict) else 0
    bad = put(d, good_name(image=BAD_IMG, purge=purge if isinstance(purge, int) else 0), obj)
    result = latch.load(str(d))
    assert result.hashes == {(APP, IMG, 0): SHA, (APP, IMG2, 4): SHA2}
    assert_one_problem_each(result, [bad])
    assert result.problems[0].startswith(f"latch {bad}")


def test_name_not_matching_content(tmp_path):
    d = tmp_path / "latch"
    wrong_purge = put(d, good_name(purge=1), entry(purge=2))
    wrong_image = put(d, good_name(image=IMG2), entry())
    zero_suffix = put(d, f"{APP}.{IMG}.0.json", entry())
    good = put(d, good_name(purge=2), entry(purge=2, sha=SHA2))
    result = latch.load(str(d))
    assert result.hashes == {(APP, IMG, 2): SHA2}
    assert_one_problem_each(result, [wrong_purge, wrong_image, zero_suffix])
    assert good.exists()
    msg = next(m for m in result.problems if str(wrong_purge) in m)
    assert good_name(purge=2) in msg   # says whose contents they are


def test_symlink_is_not_followed(tmp_path):
    d = tmp_path / "latch"
    target = put(tmp_path / "elsewhere", good_name(), entry())
    d.mkdir()
    link = d / good_name()
    link.symlink_to(target)
    dangling = d / good_name(image=IMG2)
    dangling.symlink_to(tmp_path / "missing.json")
    result = latch.load(str(d))
    assert result.hashes == {}
    assert_one_problem_each(result, [link, dangling])
    assert all("not a regular file" in m for m in result.problems)


def test_directory_named_like_an_entry(tmp_path):
    d = tmp_path / "latch"
    sub = d / good_name()
    sub.mkdir(parents=True)
    put(d, good_name(image=IMG2), entry(image=IMG2))
    result = latch.load(str(d))
    assert result.hashes == {(APP, IMG2, 0): SHA}
    assert_one_problem_each(result, [sub])


def test_oversize_file(tmp_path):
    d = tmp_path / "latch"
    obj = entry(Padding="x" * (latch.MAX_LATCH_FILE + 10))
    big = put(d, good_name(), obj)
    result = latch.load(str(d))
    assert result.hashes == {}
    assert_one_problem_each(result, [big])
    assert "too large" in result.problems[0]


def test_deeply_nested_json_is_one_problem(tmp_path):
    d = tmp_path / "latch"
    put(d, good_name(image=IMG2), entry(image=IMG2))
    deep = put(d, good_name(), b"[" * 60_000)
    assert len(b"[" * 60_000) <= latch.MAX_LATCH_FILE
    result = latch.load(str(d))
    assert result.hashes == {(APP, IMG2, 0): SHA}
    assert_one_problem_each(result, [deep])


def test_everything_at_once(tmp_path):
    """A directory mixing good and bad files: nothing raises, counts add up."""
    d = tmp_path / "latch"
    rng = random.Random(5)
    good = {}
    for purge in (0, 1, 9, 2**32 - 1):
        image = devicegen.random_uuid(rng)
        sha = devicegen.random_sha(rng)
        put(d, good_name(image=image, purge=purge), entry(image=image, sha=sha, purge=purge))
        good[(APP, image, purge)] = sha
    bad = []
    for _kind, obj in sorted(BAD_CONTENTS.items()):
        bad.append(put(d, good_name(image=devicegen.random_uuid(rng)), obj))
    link = d / good_name(image=devicegen.random_uuid(rng))
    link.symlink_to(next(iter(d.glob("*.json"))))
    bad.append(link)
    result = latch.load(str(d))
    assert result.hashes == good
    assert_one_problem_each(result, bad)
