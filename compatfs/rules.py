"""What the device reads after the upgrade: the rules of each target layout.

compatfs places every object where the agents that run after the upgrade look
for it. Two target layouts can be chosen (``layout:`` in the config):

``eve``
    what lf-edge/eve's own code computes and opens, release by release
    (``eve_release:``, ``<major>.<minor>``); ``docs/eve.md`` gives each rule
    with the EVE source it follows and the releases it holds for.
``design-note``
    the layout of compatfs' design note (``novault/volumes``, downloads in
    progress moved into the vault, ...), kept for deployments that follow it.

One frozen :class:`Rules` record answers every question whose answer depends
on that choice. The resolver, the plan and the migrator ask it; none of them
compares release numbers itself, so a new release with a new rule changes
this module and its table only.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from .names import ObjType

LAYOUTS = ("eve", "design-note")

#: Every EVE release (``<major>.<minor>``, as tagged in lf-edge/eve) whose rules
#: compatfs implements: the releases that read the new layout. 5.7 is left out
#: on purpose: 5.7.0 and 5.7.1 differ (clear-text volumes, the download tree),
#: so ``5.7`` would not say which one a device runs.
_TAGGED = """
5.8 5.9 5.10 5.12 5.14 5.15 5.16 5.17 5.18 5.19 5.20 5.21
6.0 6.1 6.2 6.3 6.4 6.5 6.6 6.7 6.8 6.9 6.10 6.11 6.12 6.13 6.14
7.0 7.1 7.2 7.3 7.4 7.5 7.6 7.7 7.8 7.9 7.10 7.11
8.0 8.1 8.2 8.3 8.4 8.5 8.6 8.7 8.8 8.9 8.10 8.11 8.12
9.0 9.1 9.2 9.3 9.4 9.5 9.6 9.7 9.8 9.9 9.10 9.11 9.12
10.0 10.1 10.2 10.3 10.4 10.5 10.6 10.7 10.8 10.9 10.10 10.11
11.0 11.2 11.3 11.4 11.5 11.6 11.7 11.8 11.9 11.10 11.11
12.0 12.1 12.2 12.3 12.4 12.5 12.6 12.7 12.8
13.0 13.1 13.2 13.3 13.4 13.5 13.6 13.7 13.8
14.0 14.1 14.2 14.3 14.4 14.5
15.0 15.1 15.2 15.3 15.4 15.5 15.6 15.7 15.8 15.9 15.10 15.11
16.0 16.1 16.2 16.3 16.4 16.5 16.6 16.7 16.8 16.9 16.10 16.11 16.12 16.13 16.14
17.0 17.1 17.2 17.3
"""

Release = tuple[int, int]


def _release(text: str) -> Release:
    major, minor = text.split(".")
    return int(major), int(minor)


RELEASES: tuple[Release, ...] = tuple(_release(t) for t in _TAGGED.split())
DEFAULT_RELEASE: Release = RELEASES[-1]

#: The media type new EVE gives the root blob of a content tree that is not a
#: container image (an OCI layer), and so the one a verified disk image is named by.
OCI_LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"

# Releases at which a rule changes (docs/eve.md, "Release milestones").
VERIFIER_REHASH = (7, 9)           # verified files re-hashed at start, mismatches deleted
USER_CONTAINERD = (7, 11)          # containerd/ becomes vault/containerd
MEDIA_TYPE_NAMES = (11, 8)         # verified files named <sha>.<escaped media type>


class UnknownRelease(ValueError):
    """An ``eve_release`` compatfs has no rules for; the message lists the ones it has."""


def release_text(release: Release) -> str:
    return f"{release[0]}.{release[1]}"


def supported_releases() -> str:
    """The supported releases as one short line: ``5.8 ... 17.3`` with every tag between."""
    return (f"{release_text(RELEASES[0])} to {release_text(RELEASES[-1])} "
            f"({', '.join(release_text(r) for r in RELEASES)})")


def parse_release(text: str) -> Release:
    """``"<major>.<minor>"`` as a supported :data:`Release`, else :class:`UnknownRelease`."""
    try:
        release = _release(text)
        if text != release_text(release):       # no "09.1", " 9.1", "+9.1"
            raise ValueError
    except ValueError:
        raise UnknownRelease(f"{text!r} is not <major>.<minor>; supported: "
                             f"{supported_releases()}") from None
    if release not in RELEASES:
        raise UnknownRelease(f"EVE {text} is not a release compatfs has rules for; "
                             f"supported: {supported_releases()}")
    return release


@dataclass(frozen=True)
class Rules:
    """Everything that depends on the target layout, as plain answers."""

    layout: str                    #: "eve" or "design-note"
    release: Release | None        #: the EVE release (layout "eve" only)
    #: Layout key of the directory that holds clear-text (``clear_text``) volumes
    clear_volumes: str
    #: a volume's generation is ``Volume.generationCount`` (eve), not the app's
    #: ``VolumeRef.generationCount`` (design-note)
    generation_from_volume: bool
    #: an existing destination is never replaced, older or newer than the legacy
    #: copy (eve: EVE's converter keeps the file "originally placed in the new
    #: directory"); otherwise the newer of the two wins. Either way the other copy
    #: is set aside, never deleted.
    destination_always_wins: bool
    #: a moved container volume gets ``snapshotid.txt`` naming its containerd snapshot
    snapshot_id: bool
    #: downloads in progress (``pending/``, ``verifier/``) move; when False they stay
    #: in the legacy store, served by the views (no release reads them moved)
    move_transient: bool
    #: object types whose verified downloads move
    verified_types: frozenset[ObjType]
    #: verified files are named ``<sha>.<PathEscape(media type)>`` (EVE 11.8+)
    verified_media_type: bool
    #: the target re-hashes verified files at start and deletes a mismatch (EVE 7.9+)
    verified_rehash: bool
    #: the legacy ``containerd/`` tree moves to the CAS location
    move_containerd: bool
    #: ``checkpoint/config`` (the design note's name) is tried when ``lastconfig`` is absent
    checkpoint_alt: bool

    @property
    def name(self) -> str:
        """``eve 17.3`` or ``design-note``: how plan, status and metrics name it."""
        if self.release is None:
            return self.layout
        return f"{self.layout} {release_text(self.release)}"

    def verified_name(self, sha: str, media_type: str | None) -> str | None:
        """The name the target's verifier keeps for a verified object of sha256 *sha*
        and blob media type *media_type* (None: unknown), or None when no name the
        target keeps can be derived."""
        sha = sha.lower()
        if not self.verified_media_type:
            return sha
        if not media_type:
            return None
        return f"{sha}.{path_escape(media_type)}"


def path_escape(segment: str) -> str:
    """Go's ``url.PathEscape``: every byte but the unreserved ones and ``$&+:=@``
    percent-encoded in upper-case hex (``/``, ``;``, ``,`` and ``?`` are escaped,
    as they would split a path segment), so ``/`` becomes ``%2F`` and ``+`` stays."""
    return quote(segment, safe="$&+:=@")


def rules_for(layout: str = "eve", release: str | Release | None = None) -> Rules:
    """The rules of *layout* (and, for ``eve``, of *release*, default the newest)."""
    if layout == "design-note":
        if release is not None:
            raise UnknownRelease("eve_release applies to layout eve only")
        return Rules(
            layout="design-note", release=None, clear_volumes="novault_volumes",
            generation_from_volume=False, destination_always_wins=False, snapshot_id=False,
            move_transient=True, verified_types=frozenset(ObjType), verified_media_type=False,
            verified_rehash=True, move_containerd=True, checkpoint_alt=True)
    if layout != "eve":
        raise UnknownRelease(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
    if release is None:
        rel = DEFAULT_RELEASE
    elif isinstance(release, str):
        rel = parse_release(release)
    else:
        if release not in RELEASES:
            raise UnknownRelease(f"EVE {release_text(release)} is not a release compatfs has "
                                 f"rules for; supported: {supported_releases()}")
        rel = release
    return Rules(
        layout="eve", release=rel, clear_volumes="clear_volumes",
        generation_from_volume=True, destination_always_wins=True, snapshot_id=True,
        move_transient=False, verified_types=frozenset({ObjType.APP_IMG, ObjType.BASE_OS}),
        verified_media_type=rel >= MEDIA_TYPE_NAMES, verified_rehash=rel >= VERIFIER_REHASH,
        move_containerd=rel >= USER_CONTAINERD, checkpoint_alt=False)


DEFAULT_RULES = rules_for()
