"""The packed names of an open directory handle (compatfs.listing)."""

from __future__ import annotations

import os

from compatfs.listing import Listing


def test_names_come_back_in_order_as_str_and_as_the_kernel_is_given_them():
    names = ["b", "a", "stray-000001.log", "x" * 255, "ünïcode"]
    listing = Listing(iter(names))
    assert len(listing) == len(names)
    assert listing.names() == names
    assert [listing.raw(i) for i in range(len(names))] == [os.fsencode(n) for n in names]
    assert listing[1] == "a" and listing.raw(0) == b"b"


def test_a_name_that_is_not_utf8_keeps_its_bytes():
    raw = b"caf\xe9-\xff.img"
    listing = Listing([os.fsdecode(raw), "next"])
    assert listing.raw(0) == raw                       # what readdir hands the kernel
    assert listing[0] == os.fsdecode(raw)              # what the view looks it up by
    assert listing.raw(1) == b"next"


def test_an_empty_directory_and_one_name():
    assert len(Listing([])) == 0 and Listing([]).names() == []
    assert Listing(["only"]).names() == ["only"]


def test_names_are_read_one_at_a_time():
    """Built from an iterator: no list of every name is made first."""
    def names():
        for i in range(1000):
            yield f"n{i}"
    listing = Listing(names())
    assert len(listing) == 1000 and listing[999] == "n999" and listing.raw(500) == b"n500"
