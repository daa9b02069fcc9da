"""Builds device-like legacy ``/persist`` trees: checkpoints, latch, files.

Used by ``compatfs demo``, the tests and the benchmarks, so all three see
the same kind of device: real protobuf checkpoints (bare or wrapped in an
``AuthContainer``, carrying unknown fields as real ones do), zedmanager's
latch files, sparse volume files, container trees and downloads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import uuid as uuidlib
from dataclasses import dataclass, field

from google.protobuf.message import Message

from ..latch import expected_file_name
from ..names import DownloadArea, ObjType
from ..proto import eve_auth_pb2, eve_config_pb2

_FORMAT_ENUM: dict[str, eve_config_pb2.Format] = {
    "raw": eve_config_pb2.RAW, "qcow": eve_config_pb2.QCOW, "qcow2": eve_config_pb2.QCOW2,
    "vhd": eve_config_pb2.VHD, "vmdk": eve_config_pb2.VMDK, "ova": eve_config_pb2.OVA,
    "vhdx": eve_config_pb2.VHDX, "container": eve_config_pb2.CONTAINER,
    "iso": eve_config_pb2.ISO, "pvc": eve_config_pb2.PVC}


# -- unknown fields ------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def unknown_fields(rng: random.Random, count: int, taken: set[int]) -> bytes:
    """*count* wire-encoded fields with numbers outside *taken*, of every wire type."""
    out = bytearray()
    for _ in range(count):
        free = [n for n in range(1, 60) if n not in taken]
        number = rng.choice(free + [rng.randrange(100, 5000)])
        wire = rng.choice((0, 1, 2, 5))
        out += _varint((number << 3) | wire)
        if wire == 0:
            out += _varint(rng.getrandbits(rng.choice((1, 7, 32, 63))))
        elif wire == 1:
            out += rng.randbytes(8)
        elif wire == 2:
            body = rng.randbytes(rng.randrange(0, 40))
            out += _varint(len(body)) + body
        else:
            out += rng.randbytes(4)
    return bytes(out)


def sprinkle_unknown(msg: Message, rng: random.Random, per_message: int = 3) -> None:
    """Add unknown fields to *msg* and every sub-message in it, as real checkpoints carry."""
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        children = value if fd.is_repeated else [value]
        for child in children:
            sprinkle_unknown(child, rng, per_message)
    taken = {f.number for f in msg.DESCRIPTOR.fields}
    msg.MergeFromString(unknown_fields(rng, per_message, taken))


# -- the config ----------------------------------------------------------------

@dataclass
class DriveDef:
    image_uuid: str
    sha: str                       # the image sha the legacy name uses
    fmt: str = "qcow2"
    volume_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    generation: int = 0
    clear_text: bool = False
    sha_in_image: bool = True      # else the image's sha256 is left empty
    content_tree: bool = False     # give the volume a content tree carrying the sha
    in_latch: bool = False         # record the sha in zedmanager's latch


@dataclass
class AppDef:
    uuid: str
    name: str
    drives: list[DriveDef]
    purge: int = 0

    def legacy_name(self, index: int, *, container: bool = False, purge: int | None = None,
                    sha_upper: bool = False) -> str:
        """The name old EVE gave drive *index* of this app."""
        d = self.drives[index]
        sha = d.sha.upper() if sha_upper else d.sha
        p = (self.purge if index == 0 else 0) if purge is None else purge
        stem = f"{sha}-{self.uuid}" + (f"#{p}" if p else "")
        return stem if container else f"{stem}.{d.fmt}"


def build_config(apps: list[AppDef], *, config_hash: str = "demo") -> eve_config_pb2.ConfigResponse:
    """A ``ConfigResponse`` describing *apps* the way the controller does."""
    resp = eve_config_pb2.ConfigResponse(configHash=config_hash)
    cfg = resp.config
    for app in apps:
        a = cfg.apps.add()
        a.uuidandversion.uuid = app.uuid
        a.uuidandversion.version = "1"
        a.displayname = app.name
        a.purge.counter = app.purge
        for d in app.drives:
            drive = a.drives.add()
            drive.image.uuidandversion.uuid = d.image_uuid
            drive.image.name = f"{app.name}-{d.image_uuid[:8]}"
            drive.image.iformat = _FORMAT_ENUM.get(d.fmt, eve_config_pb2.FmtUnknown)
            if d.sha_in_image:
                drive.image.sha256 = d.sha
            ref = a.volumeRefList.add()
            ref.uuid = d.volume_uuid
            ref.generationCount = d.generation
            vol = cfg.volumes.add()
            vol.uuid = d.volume_uuid
            vol.displayName = f"{app.name}-vol"
            vol.generationCount = d.generation
            vol.clear_text = d.clear_text
            if d.content_tree:
                tree_uuid = str(uuidlib.UUID(int=uuidlib.UUID(d.volume_uuid).int ^ 1))
                vol.origin.type = eve_config_pb2.VCOT_DOWNLOAD
                vol.origin.downloadContentTreeID = tree_uuid
                tree = cfg.contentInfo.add()
                tree.uuid = tree_uuid
                tree.sha256 = d.sha
                tree.iformat = _FORMAT_ENUM.get(d.fmt, eve_config_pb2.FmtUnknown)
                tree.displayName = drive.image.name
                tree.URL = f"https://example.invalid/{d.sha}"
    return resp


def encode_checkpoint(resp: eve_config_pb2.ConfigResponse, *, wrap: bool = False,
                      rng: random.Random | None = None) -> bytes:
    """Serialize *resp*, optionally with unknown fields and in an ``AuthContainer``."""
    if rng is not None:
        resp = type(resp).FromString(resp.SerializeToString())
        sprinkle_unknown(resp, rng)
    data = resp.SerializeToString()
    if not wrap:
        return data
    auth = eve_auth_pb2.AuthContainer()
    auth.protectedPayload.payload = data
    if rng is not None:
        sprinkle_unknown(auth, rng)
    return auth.SerializeToString()


def write_atomic(path: str, data: bytes) -> None:
    """Write *path* the way EVE's agents do: a temporary file renamed into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_latch(directory: str, app_uuid: str, image_uuid: str, sha: str, purge: int) -> str:
    entry = {"AppUUID": app_uuid, "ImageID": image_uuid, "Hash": sha, "PurgeCounter": purge}
    path = os.path.join(directory, expected_file_name(app_uuid, image_uuid, purge))
    write_atomic(path, json.dumps(entry).encode())
    return path


def write_device_state(root: str, apps: list[AppDef], *, wrap: bool = False,
                       rng: random.Random | None = None,
                       checkpoint_name: str = "lastconfig") -> None:
    """Write the checkpoint and the latch entries for *apps* under *root*."""
    data = encode_checkpoint(build_config(apps), wrap=wrap, rng=rng)
    write_atomic(os.path.join(root, "checkpoint", checkpoint_name), data)
    latch_dir = os.path.join(root, "status", "zedmanager", "AppAndImageToHash")
    os.makedirs(latch_dir, exist_ok=True)
    for app in apps:
        for i, d in enumerate(app.drives):
            if d.in_latch:
                write_latch(latch_dir, app.uuid, d.image_uuid, d.sha, app.purge if i == 0 else 0)


# -- files ---------------------------------------------------------------------

def sparse_file(path: str, size: int, data_at: dict[int, bytes] | None = None,
                mtime: float | None = None) -> None:
    """A file of apparent *size* whose only allocated blocks hold *data_at*."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, chunk in (data_at or {}).items():
            f.seek(offset)
            f.write(chunk)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def qcow2_file(path: str, virtual_size: str = "64M") -> None:
    """A real qcow2 image made by qemu-img, or a raw one where qemu-img is missing."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if shutil.which("qemu-img"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, virtual_size], check=True)
    else:
        sparse_file(path, 1 << 20, {0: b"QFI\xfb"})


def container_tree(path: str, rng: random.Random) -> None:
    """A small OCI-style prepared directory with a rootfs, a symlink and a config."""
    os.makedirs(os.path.join(path, "rootfs", "etc"), exist_ok=True)
    os.makedirs(os.path.join(path, "rootfs", "bin"), exist_ok=True)
    with open(os.path.join(path, "rootfs", "etc", "hostname"), "w") as f:
        f.write("demo\n")
    with open(os.path.join(path, "rootfs", "bin", "app"), "wb") as f:
        f.write(rng.randbytes(64 * 1024))
    os.chmod(os.path.join(path, "rootfs", "bin", "app"), 0o755)
    os.symlink("app", os.path.join(path, "rootfs", "bin", "start"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"ociVersion": "1.0.2", "process": {"args": ["/bin/start"]}}, f)


def download_file(root: str, obj_type: ObjType, area: DownloadArea, directory: str,
                  name: str, data: bytes) -> str:
    path = os.path.join(root, "downloads", obj_type.value, area.value, directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def sha_of(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def random_sha(rng: random.Random) -> str:
    return rng.randbytes(32).hex()


def random_uuid(rng: random.Random) -> str:
    return str(uuidlib.UUID(bytes=rng.randbytes(16), version=4))


# -- the demo device -----------------------------------------------------------

def make_demo(root: str, seed: int = 7) -> list[AppDef]:
    """A small legacy device: VM and container volumes, every download area, a
    wrapped checkpoint with unknown fields, the latch, and a few names that
    stay where they are (an unknown app, a stale purge counter, stray files).
    The verified appImg.obj object is the image of the ``fresh`` app's drive;
    the baseOs.obj one is not in the config.
    """
    rng = random.Random(seed)
    def u() -> str:
        return random_uuid(rng)

    web = AppDef(u(), "web", [
        DriveDef(u(), random_sha(rng), "qcow2"),
        DriveDef(u(), random_sha(rng), "raw", clear_text=True),
    ])
    db = AppDef(u(), "db", [DriveDef(u(), random_sha(rng), "raw", sha_in_image=False,
                                     in_latch=True, generation=1)], purge=2)
    pod = AppDef(u(), "pod", [DriveDef(u(), random_sha(rng), "container", sha_in_image=False,
                                       content_tree=True)])
    # an app whose volume volumemgr has yet to create (the demo tour creates it)
    # from a verified image the config names (so EVE 11.8+ can name it too)
    verified = rng.randbytes(200 << 10)
    fresh = AppDef(u(), "fresh", [DriveDef(u(), sha_of(verified), "raw")])
    apps = [web, db, pod, fresh]
    write_device_state(root, apps, wrap=True, rng=rng)

    img = os.path.join(root, "img")
    qcow2_file(os.path.join(img, web.legacy_name(0)))
    sparse_file(os.path.join(img, web.legacy_name(1, sha_upper=True)), 256 << 20,
                {0: rng.randbytes(1 << 20), 128 << 20: rng.randbytes(1 << 20)})
    sparse_file(os.path.join(img, db.legacy_name(0)), 64 << 20, {0: rng.randbytes(512 << 10)})
    sparse_file(os.path.join(img, db.legacy_name(0, purge=1)), 64 << 20,
                {0: rng.randbytes(4096)}, mtime=1_600_000_000)
    sparse_file(os.path.join(img, f"{random_sha(rng)}-{u()}.qcow2"), 16 << 20, {0: b"x" * 4096})
    with open(os.path.join(img, "notes.txt"), "w") as f:
        f.write("left by an operator\n")
    prepared = os.path.join(root, "runx", "pods", "prepared")
    container_tree(os.path.join(prepared, pod.legacy_name(0, container=True)), rng)

    blob = rng.randbytes(300 << 10)
    image_id = u()
    download_file(root, ObjType.APP_IMG, DownloadArea.PENDING, image_id, "ubuntu.img",
                  blob[: 100 << 10])
    download_file(root, ObjType.APP_IMG, DownloadArea.VERIFIER, u(), "alpine.qcow2", blob)
    download_file(root, ObjType.APP_IMG, DownloadArea.VERIFIED, sha_of(verified).upper(),
                  "debian.qcow2", verified)
    base = rng.randbytes(150 << 10)
    download_file(root, ObjType.BASE_OS, DownloadArea.VERIFIED, sha_of(base), "rootfs.img", base)
    cas = os.path.join(root, "containerd", "io.containerd.content.v1.content", "blobs", "sha256")
    os.makedirs(cas, exist_ok=True)
    layer = rng.randbytes(32 << 10)
    with open(os.path.join(cas, sha_of(layer)), "wb") as blob_file:
        blob_file.write(layer)
    for d in ("vault", "clear", "novault"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    return apps
