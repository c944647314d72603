"""Evaluated tool prefixes, kept in RAM and on disk.

The system text plus tool list is often 1,000-2,000 tokens; evaluating it is
most of the time to first token. Its llama.cpp sequence state is saved once
per (model file, prefix tokens, context settings) and restored on later calls,
in this process (a small LRU) or in a new one (files under the cache folder).

Disk entries are written to a temporary name and renamed into place, so two
processes writing the same entry both leave a complete file. Each entry
carries its key and a checksum of its payload; anything that does not match
is ignored, deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .leftovers import remove_leftovers, temp_prefix

ENTRY_MAGIC = b"TGEPFX1\n"
DEFAULT_DISK_LIMIT_BYTES = 2 * 1024**3
DEFAULT_RAM_ENTRIES = 4


def model_identity(path: Path) -> str:
    """Identify a model file by size, mtime and the bytes at both ends.

    Cheap (no full hash of a multi-GB file) yet changes when the file is
    replaced or re-converted.
    """
    stat = path.stat()
    digest = hashlib.sha256()
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 16))
        if stat.st_size > 1 << 16:
            fh.seek(max(stat.st_size - (1 << 16), 0))
            digest.update(fh.read(1 << 16))
    return digest.hexdigest()


def prefix_key(model_id: str, tokens: list[int], settings: str) -> str:
    digest = hashlib.sha256()
    digest.update(model_id.encode())
    digest.update(settings.encode())
    digest.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return digest.hexdigest()


@dataclass
class CacheStats:
    ram_hits: int = 0
    disk_hits: int = 0
    misses: int = 0
    rejected: int = 0  # corrupt or foreign disk entries thrown away


class PrefixCache:
    def __init__(self, directory: Path | None, ram_entries: int = DEFAULT_RAM_ENTRIES,
                 disk_limit_bytes: int = DEFAULT_DISK_LIMIT_BYTES):
        self.directory = directory
        self.ram_entries = ram_entries
        self.disk_limit_bytes = disk_limit_bytes
        self._ram: OrderedDict[str, bytes] = OrderedDict()
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.directory is not None or self.ram_entries > 0

    # -- lookup -------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        state = self._ram.get(key)
        if state is not None:
            self._ram.move_to_end(key)
            self.stats.ram_hits += 1
            return state
        state = self._read_disk(key)
        if state is not None:
            self.stats.disk_hits += 1
            self._remember(key, state)
            return state
        self.stats.misses += 1
        return None

    def put(self, key: str, state: bytes) -> None:
        self._remember(key, state)
        self._write_disk(key, state)

    def discard(self, key: str) -> None:
        """Forget an entry that turned out unusable (e.g. llama.cpp refused it)."""
        self._ram.pop(key, None)
        if self.directory is not None:
            self._entry_path(key).unlink(missing_ok=True)
        self.stats.rejected += 1

    def _remember(self, key: str, state: bytes) -> None:
        self._ram[key] = state
        self._ram.move_to_end(key)
        while len(self._ram) > self.ram_entries:
            self._ram.popitem(last=False)

    # -- disk ---------------------------------------------------------------
    def _entry_path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.state"

    def _read_disk(self, key: str) -> bytes | None:
        if self.directory is None:
            return None
        path = self._entry_path(key)
        try:
            with open(path, "rb") as fh:
                blob = fh.read()
        except OSError:
            return None
        state = _decode_entry(blob, key)
        if state is None:
            path.unlink(missing_ok=True)
            self.stats.rejected += 1
            return None
        try:
            os.utime(path)  # recency for eviction
        except OSError:
            pass
        return state

    def _write_disk(self, key: str, state: bytes) -> None:
        if self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=temp_prefix("tmp"), suffix=".state")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(_encode_entry(key, state))
                os.replace(tmp, self._entry_path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self._evict()
        except OSError:
            # A read-only or full cache folder costs speed, never correctness.
            pass

    def _evict(self) -> None:
        entries = []
        for path in self.directory.glob("*.state"):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.disk_limit_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
        # Temporary files left by a killed writer: named after it (leftovers.py), or older names by age.
        remove_leftovers(self.directory)
        cutoff = time.time() - 3600
        for path in self.directory.glob(".tmp-*"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
            except OSError:
                pass


def _encode_entry(key: str, state: bytes) -> bytes:
    header = json.dumps({"key": key, "size": len(state), "sha256": hashlib.sha256(state).hexdigest()}).encode()
    return ENTRY_MAGIC + struct.pack("<I", len(header)) + header + state


def _decode_entry(blob: bytes, key: str) -> bytes | None:
    if not blob.startswith(ENTRY_MAGIC) or len(blob) < len(ENTRY_MAGIC) + 4:
        return None
    (n,) = struct.unpack_from("<I", blob, len(ENTRY_MAGIC))
    start = len(ENTRY_MAGIC) + 4
    try:
        header = json.loads(blob[start:start + n])
    except (ValueError, UnicodeDecodeError):
        return None
    state = blob[start + n:]
    if (not isinstance(header, dict) or header.get("key") != key or header.get("size") != len(state)
            or header.get("sha256") != hashlib.sha256(state).hexdigest()):
        return None
    return state
