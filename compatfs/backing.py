"""Which stores a device's layout opens, and the checks made before opening them.

:meth:`Backing.open` opens, before mounting, every location compatfs serves
from: the legacy directories of the views (made when missing: they become
mountpoints; reached through a clone of the root's mount when a dead
daemon's view still covers them), every new-layout location (made only in a
stage that places data there), the root and the CAS parent; it refuses a
vault-bound location the kernel does not encrypt, and points each
new-layout store's staging and set-aside at compatfs' own directory beside
it. Each location is a :class:`compatfs.stores.Store`; the store keys are
:class:`compatfs.enums.StoreKey`.
"""

from __future__ import annotations

import errno
import logging
import os

from .enums import StoreKey, ViewName
from .fscrypt import is_encrypted
from .layout import Layout
from .mounts import clone_without_submounts
from .stores import ASIDE_DIR, STAGING_DIR, Side, Store, StoreMissing

log = logging.getLogger(__name__)

#: The legacy locations a view is mounted over, by view name.
VIEW_STORES: dict[str, StoreKey] = {ViewName.IMG: StoreKey.IMG,
                                    ViewName.DOWNLOADS: StoreKey.DOWNLOADS,
                                    ViewName.PREPARED: StoreKey.PREPARED}

#: Where new-layout data may be placed (of the two clear-text volume locations,
#: only the one the target layout names is made: :func:`new_stores`; the other is
#: opened when it exists, to serve what an earlier run under the other layout placed).
NEW_STORES = (StoreKey.VAULT_VOLUMES, StoreKey.CLEAR_VOLUMES, StoreKey.NOVAULT_VOLUMES,
              StoreKey.DOWNLOADER, StoreKey.VERIFIER, StoreKey.VERIFIED, StoreKey.UNRESOLVED,
              StoreKey.CAS)
#: The clear-text volume locations: EVE's (``clear/volumes``) and the design note's.
CLEAR_STORES = frozenset({StoreKey.CLEAR_VOLUMES, StoreKey.NOVAULT_VOLUMES})

#: New-layout locations that must be encrypted (all but the clear-text volumes).
VAULT_STORES = frozenset(NEW_STORES) - CLEAR_STORES | {StoreKey.CAS_PARENT}


def new_stores(layout: Layout) -> tuple[str, ...]:
    """The new-layout locations *layout*'s target uses: every one but the clear-text
    volume location of the other target layout."""
    return tuple(k for k in NEW_STORES if k not in CLEAR_STORES
                 or k == layout.rules.clear_volumes)


def own_location(key: str) -> str:
    """The layout key of compatfs' own directory for the new-layout store *key*:
    beside it, on its filesystem and under its fscrypt policy, outside every
    directory EVE scans (``state`` for the vault's stores)."""
    return {"clear_volumes": "clear_compatfs", "novault_volumes": "novault_compatfs"}.get(
        key, "state")


def store_path(layout: Layout, key: str) -> str:
    """The directory of the store *key* (a location key, or one of the two above)."""
    if key == StoreKey.ROOT:
        return layout.root
    if key == StoreKey.CAS_PARENT:
        return os.path.dirname(layout.path("cas"))
    return layout.path(key)


class VaultNotEncrypted(Exception):
    """A vault-bound location is not encrypted and the config requires it."""


def _refuse_plain_vault(root: Store, layout: Layout) -> None:
    """Raise :class:`VaultNotEncrypted` if a vault-bound location would be (or
    is) a directory the kernel does not encrypt.

    Checked before anything is made: for each vault-bound location, the
    deepest directory of its path that exists already decides, since a
    directory made below it inherits its policy (or its lack of one). So a
    refused plain vault is left exactly as it was found."""
    cas_parent = os.path.dirname(layout.rel("cas"))
    for key, rel in [(k, layout.rel(k)) for k in VAULT_STORES - {StoreKey.CAS_PARENT}] \
            + [(StoreKey.CAS_PARENT, cas_parent)]:
        parts = rel.split("/") if rel else []
        while True:
            try:
                fd = root.open_dir("/".join(parts))
            except (FileNotFoundError, NotADirectoryError):
                if not parts:
                    raise
                parts.pop()
                continue
            try:
                encrypted = is_encrypted(fd)
            finally:
                os.close(fd)
            break
        if not encrypted:
            path = os.path.join(layout.root, *parts)
            raise VaultNotEncrypted(
                f"{path} is not encrypted (the kernel reports no fscrypt policy); "
                f"refusing to place vault-bound data ({key}) there. Unlock or create the "
                "vault, or set require_encrypted_vault: false")


def _own_sides(root: Store, layout: Layout, stores: dict[str, Store],
               create: bool) -> dict[str, Store]:
    """Open compatfs' own directory of each new-layout store in *stores* (made
    when *create*) and point the store's staging and set-aside there
    (``<own>/staging/<key>``, ``<own>/set-aside/<key>``). A store whose own
    directory is missing (not *create*: nothing is placed) keeps none: a copy
    or a set-aside there fails with ENOENT rather than land in EVE's directory."""
    owns: dict[str, Store] = {}
    for key in [k for k in NEW_STORES if k in stores] \
            + ([StoreKey.CAS_PARENT] if StoreKey.CAS_PARENT in stores else []):
        store = stores[key]
        own_key = own_location(key)
        own = owns.get(own_key)
        if own is None:
            rel = layout.rel(own_key)
            if create:
                root.makedirs(rel, 0o700)
            try:
                own = Store(own_key, layout.path(own_key), root.open_dir(rel))
            except FileNotFoundError:
                own = None
            else:
                owns[own_key] = own
                if own.policy != store.policy \
                        or os.fstat(own.fd).st_dev != os.fstat(store.fd).st_dev:
                    log.warning("%s is not on the filesystem, or not under the fscrypt "
                                "policy, of %s: moves into %s cannot finish with a rename "
                                "and will fail", own.path, store.path, key)
        if own is None:
            base = layout.rel(own_key)
            store.staging = _Missing(root, f"{base}/{STAGING_DIR}/{key}")
            store.aside = _Missing(root, f"{base}/{ASIDE_DIR}/{key}")
            continue
        store.staging = Side(own, f"{STAGING_DIR}/{key}")
        store.aside = Side(own, f"{ASIDE_DIR}/{key}")
    return owns

class _Missing(Side):
    """The staging of a store whose own directory is missing: nothing is made there."""

    def make(self) -> None:
        raise FileNotFoundError(errno.ENOENT, "compatfs' own directory for this location "
                                "is missing (made in stages redirect and migrate)",
                                self.dir)

    def drop_if_empty(self) -> None:
        pass


class Backing:
    """Every store compatfs serves from, opened before mounting."""

    def __init__(self, stores: dict[str, Store], owns: dict[str, Store] | None = None) -> None:
        self.stores = stores
        #: compatfs' own directories the new-layout stores stage in, by layout key
        self.owns = owns or {}

    @classmethod
    def open(cls, layout: Layout, views: tuple[str, ...], create_new: bool,
             require_encrypted: bool, read_only: bool = False,
             covered: frozenset[str] = frozenset()) -> Backing:
        """Open the legacy locations of *views* and every new-layout location.

        Legacy locations are created when missing (they become mountpoints).
        New-layout locations are created only when *create_new* (a stage that
        places data there); otherwise a missing one is simply absent. With
        *require_encrypted*, a vault-bound location the kernel does not report
        as encrypted raises :class:`VaultNotEncrypted` (only when *create_new*:
        in observe nothing is placed there). *read_only* creates nothing at all:
        a missing legacy location is then simply absent too. The views in
        *covered* have a dead daemon's mount on their legacy location: the
        directories under them are opened through one clone of the root's
        mount without submounts (:func:`compatfs.mounts.clone_without_submounts`).
        A rename between them and a new-layout location is then ``EXDEV``
        until the next start, which the views and the migrator answer as they
        answer the vault boundary (the bytes stay; the migrator copies).
        """
        stores: dict[str, Store] = {}
        # Every location is reached from the root like any other path: beneath
        # it and through no symbolic link, so a link planted at, say,
        # vault/verifier cannot send data (or mkdir) outside the root.
        root = Store(StoreKey.ROOT, layout.root,
                     os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        clone: Store | None = None    # the root without submounts, for covered views
        try:
            if create_new and require_encrypted and not read_only:
                _refuse_plain_vault(root, layout)   # before anything is created
            for view in views:
                key = VIEW_STORES[view]
                if read_only:
                    try:
                        stores[view] = Store(key, layout.path(key), root.open_dir(layout.rel(key)))
                    except FileNotFoundError:
                        pass
                    continue
                if view in covered:
                    if clone is None:
                        clone = Store(StoreKey.ROOT, layout.root, clone_without_submounts(root.fd))
                    stores[view] = Store(key, layout.path(key), clone.open_dir(layout.rel(key)))
                    continue
                root.makedirs(layout.rel(key), 0o755)
                stores[view] = Store(key, layout.path(key), root.open_dir(layout.rel(key)))
            cas_parent = os.path.dirname(layout.rel("cas"))
            used = new_stores(layout)
            wanted = [(k, layout.rel(k)) for k in NEW_STORES] + [(StoreKey.CAS_PARENT, cas_parent)]
            for key, rel in wanted:
                path = os.path.join(layout.root, rel)
                if create_new and not read_only and key != "cas" and rel \
                        and (key in used or key == StoreKey.CAS_PARENT):
                    # EVE's volumemgr makes its volume directories 0700
                    private = key in VAULT_STORES or key == "clear_volumes"
                    root.makedirs(rel, 0o700 if private else 0o755)
                try:
                    store = Store(key, path, root.open_dir(rel))
                except FileNotFoundError:
                    continue
                stores[key] = store
                if create_new and require_encrypted and key in VAULT_STORES and not store.encrypted:
                    raise VaultNotEncrypted(
                        f"{path} is not encrypted (the kernel reports no fscrypt policy); "
                        "refusing to place vault-bound data there. Unlock or create the "
                        "vault, or set require_encrypted_vault: false")
            stores[StoreKey.ROOT] = root
            owns = _own_sides(root, layout, stores, create_new and not read_only)
        except BaseException:
            root.close()
            for s in stores.values():
                s.close()
            raise
        finally:
            if clone is not None:
                clone.close()       # the stores opened through it keep it alive
        return cls(stores, owns)

    def get(self, key: str) -> Store:
        store = self.stores.get(key)
        if store is None:
            raise StoreMissing(errno.ENOENT, f"location {key} is not available")
        return store

    def has(self, key: str) -> bool:
        return key in self.stores

    def close(self) -> None:
        for s in list(self.stores.values()) + list(self.owns.values()):
            s.close()
        self.stores.clear()
        self.owns.clear()
