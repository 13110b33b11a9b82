"""The handover image: what a kexec reboot carries into the next emulated boot (the KHO memory).

Layout of ``root/.luo-emu/handover.img`` (little endian)::

    header  magic "LUOEMUHO" | u32 format version | u32 generation code | u64 payload length
            | u64 metadata length | sha256(payload) (32 bytes)
    payload file contents, back to back | metadata (JSON, at the end of the payload)

Written to ``handover.img.tmp``, fsync'd, renamed over ``handover.img`` and the directory
fsync'd: a crash leaves either no image or a complete one.  A reader validates everything (size,
magic, version, generation, checksum, JSON shape, every file's byte range) before the caller
creates anything from it; the boot that loads it removes it.

Large memfds are not copied into the payload but *held*, the way KHO hands pages over in place:
a keeper process (``_KEEPER``) inherits their open files at kexec and lives exactly as long as
its image sits at ``handover.img`` (or ``.tmp``); the metadata names the keeper's pid, fd numbers
and each file's inode, and the next boot takes them with ``pidfd_getfd`` and checks the inode.
An image whose keeper is gone (power-off, a killed keeper) is refused like a corrupt one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from luo_agent.errors import HandoverCorrupt

from .protocol import Layout

log = logging.getLogger("luo_emu.handover")

MAGIC: Final = b"LUOEMUHO"
FORMAT_VERSION: Final = 1
HEADER: Final = struct.Struct("<8sIIQQ32s")
GENERATION_CODES: Final = {"rfc-v2": 1, "v3": 3, "session": 5}
_CHUNK: Final = 1 << 20
# The keeper: holds the inherited fds until its image (dev, ino) is at neither path any more
# (loaded and removed, rejected, powered off, replaced by another kexec's image).
_KEEPER: Final = """
import os, sys, time
image = (int(sys.argv[1]), int(sys.argv[2]))
def mine(path):
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == image
while any(mine(path) for path in sys.argv[3:]):
    time.sleep(0.2)
"""


class BlobSink:
    """Collects file contents into the payload while hashing them; returns their byte range.
    ``hold`` takes a file to be held in place instead (an index into the image's held files)."""

    def __init__(self, fd: int, hasher: Any) -> None:
        self._fd = fd
        self._hasher = hasher
        self.length = 0
        self.held: list[int] = []

    def hold(self, fd: int) -> int:
        self.held.append(fd)
        return len(self.held) - 1

    def add(self, chunks: Iterable[bytes]) -> tuple[int, int]:
        start = self.length
        for chunk in chunks:
            self._hasher.update(chunk)
            view = memoryview(chunk)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self.length += len(chunk)
        return start, self.length - start


def write_image(
    layout: Layout, generation: str, build: Callable[[BlobSink], dict[str, Any]]
) -> None:
    """Write the image atomically.  ``build`` adds file contents to the sink and returns the
    metadata (JSON-able) that refers to them."""
    tmp = layout.handover_tmp
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.lseek(fd, HEADER.size, os.SEEK_SET)
        hasher = hashlib.sha256()
        sink = BlobSink(fd, hasher)
        meta_obj = build(sink)
        if sink.held:
            meta_obj["held"] = _spawn_keeper(layout, fd, sink.held)
        meta = json.dumps(meta_obj, separators=(",", ":"), sort_keys=True).encode()
        sink.add([meta])
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            GENERATION_CODES[generation],
            sink.length,
            len(meta),
            hasher.digest(),
        )
        os.pwrite(fd, header, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, layout.handover)
    dir_fd = os.open(layout.emu_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _spawn_keeper(layout: Layout, image_fd: int, fds: list[int]) -> dict[str, Any]:
    """Start the keeper of ``fds`` (same fd numbers in it) for the image being written to
    ``image_fd``; what the next boot needs to find them."""
    st = os.fstat(image_fd)
    argv = [sys.executable, "-I", "-S", "-c", _KEEPER, str(st.st_dev), str(st.st_ino)]
    argv += [os.fspath(layout.handover_tmp), os.fspath(layout.handover)]
    # Never waited for: the keeper outlives this server.
    keeper = subprocess.Popen(
        argv,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    files = []
    for fd in fds:
        held = os.fstat(fd)
        files.append({"fd": fd, "dev": held.st_dev, "ino": held.st_ino})
    return {"pid": keeper.pid, "files": files}


@dataclass(frozen=True, slots=True)
class HeldFile:
    """A file the image's keeper holds: its fd number there and its inode."""

    fd: int
    dev: int
    ino: int


@dataclass(frozen=True, slots=True)
class Image:
    """A validated image.  ``fd`` reads the payload; file byte ranges start at ``blob_base``;
    ``held`` files are fd numbers in process ``keeper``."""

    fd: int
    blob_base: int
    blob_length: int
    meta: dict[str, Any]
    keeper: int = 0
    held: tuple[HeldFile, ...] = ()

    def close(self) -> None:
        os.close(self.fd)


def _corrupt(path: os.PathLike[str] | str, why: str) -> HandoverCorrupt:
    return HandoverCorrupt(f"handover image {os.fspath(path)} rejected: {why}")


def read_image(layout: Layout, generation: str) -> Image | None:
    """The validated image, or None if there is none.  Raises HandoverCorrupt (nothing loaded).

    A leftover temp file (a crash during the write) is never an image: it is removed here.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(layout.handover_tmp)
        log.warning("removed stale %s (crash while writing a handover image)", layout.handover_tmp)
    path = layout.handover
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        image = _validate(fd, path, generation)
    except BaseException:
        os.close(fd)
        raise
    return image


def _validate(fd: int, path: os.PathLike[str], generation: str) -> Image:
    total = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size:
        raise _corrupt(path, f"truncated header ({total} bytes)")
    magic, version, gen_code, payload_len, meta_len, digest = HEADER.unpack(raw)
    if magic != MAGIC:
        raise _corrupt(path, f"bad magic {magic!r}")
    if version != FORMAT_VERSION:
        raise _corrupt(path, f"unsupported format version {version}")
    if gen_code != GENERATION_CODES[generation]:
        raise _corrupt(path, f"generation code {gen_code}, this kernel is {generation}")
    if total != HEADER.size + payload_len:
        raise _corrupt(
            path,
            f"length mismatch: header says {payload_len} payload bytes, "
            f"file has {total - HEADER.size}",
        )
    if meta_len > payload_len:
        raise _corrupt(path, "metadata length exceeds payload")
    hasher = hashlib.sha256()
    offset = HEADER.size
    while offset < total:
        chunk = os.pread(fd, min(_CHUNK, total - offset), offset)
        if not chunk:
            raise _corrupt(path, "short read")
        hasher.update(chunk)
        offset += len(chunk)
    if hasher.digest() != digest:
        raise _corrupt(path, "sha256 mismatch")
    blob_length = payload_len - meta_len
    meta_raw = os.pread(fd, meta_len, HEADER.size + blob_length)
    try:
        meta = json.loads(meta_raw)
    except ValueError as exc:
        raise _corrupt(path, f"metadata is not JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("generation") != generation:
        raise _corrupt(path, "metadata does not describe this generation")
    if not isinstance(meta.get("cmdline"), str) or not isinstance(
        meta.get("liveupdate_count"), int
    ):
        raise _corrupt(path, "metadata lacks cmdline/liveupdate_count")
    keeper, held = _parse_held(path, meta.get("held", {"pid": 0, "files": []}))
    return Image(fd, HEADER.size, blob_length, meta, keeper, held)


def _parse_held(path: os.PathLike[str], raw: object) -> tuple[int, tuple[HeldFile, ...]]:
    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(raw, dict) or not whole(raw.get("pid")):
        raise _corrupt(path, "bad held files")
    files = raw.get("files")
    if not isinstance(files, list):
        raise _corrupt(path, "bad held files")
    held = []
    for item in files:
        if not isinstance(item, dict) or not all(whole(item.get(k)) for k in ("fd", "dev", "ino")):
            raise _corrupt(path, "bad held file")
        held.append(HeldFile(item["fd"], item["dev"], item["ino"]))
    return raw["pid"], tuple(held)


@dataclass(frozen=True, slots=True)
class CarriedFile:
    """One file in the image: token, frozen size, final position, byte range in the blob area
    (or the index of the held file that it is), and the seals recorded at PRESERVE (G6 only;
    0 = none carried)."""

    token: int
    size: int
    pos: int
    offset: int
    seals: int = 0
    held: int | None = None

    def to_json(self) -> dict[str, int]:
        fields = {
            "token": self.token,
            "size": self.size,
            "pos": self.pos,
            "offset": self.offset,
            "seals": self.seals,
        }
        return fields if self.held is None else fields | {"held": self.held}


def parse_files(raw: object, image: Image, where: str) -> list[CarriedFile]:
    """Validate a JSON list of carried files completely; HandoverCorrupt on any defect."""
    if not isinstance(raw, list):
        raise HandoverCorrupt(f"handover image rejected: {where}: files is not a list")
    files: list[CarriedFile] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise HandoverCorrupt(f"handover image rejected: {where}[{index}] is not an object")
        values = [item.get(key) for key in ("token", "size", "pos", "offset")]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise HandoverCorrupt(f"handover image rejected: {where}[{index}]: bad fields")
        token, size, pos, offset = (int(v) for v in values)  # type: ignore[arg-type]
        seals = item.get("seals", 0)
        if not isinstance(seals, int) or isinstance(seals, bool) or not 0 <= seals < 1 << 32:
            raise HandoverCorrupt(f"handover image rejected: {where}[{index}]: bad seals")
        held = item.get("held")
        if held is None:
            in_range = offset + size <= image.blob_length
        else:
            in_range = isinstance(held, int) and 0 <= held < len(image.held)
        if token >= 1 << 64 or not in_range:
            raise HandoverCorrupt(f"handover image rejected: {where}[{index}]: out of range")
        files.append(CarriedFile(token, size, pos, offset, seals, held))
    return files
