"""Last-known-good pointers: ``(source identity, reference) -> cache entry``.

One small JSON file per pair under ``<cache>/refs/``, replaced atomically. Whatever is
found there is parsed, never trusted: a file of the wrong shape is ignored with a
WARNING (and replaced by the next successful load), never an exception.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_loader._io import write_atomic

__all__ = ["RefRecord", "RefStore"]

logger = logging.getLogger("model_loader.cache")


@dataclass(frozen=True, slots=True)
class RefRecord:
    """The last version of a reference that was served successfully from a source."""

    identity: str
    ref: str
    key: str
    version: str
    source: str
    updated: float


def _parse(data: Any) -> RefRecord:
    if not isinstance(data, dict):
        raise ValueError(f"a ref record is a JSON object, not {type(data).__name__}")
    fields = {}
    for name in ("identity", "ref", "key", "version", "source"):
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"field {name!r} is missing or not a string")
        fields[name] = value
    if not all(c in "0123456789abcdef" for c in fields["key"]) or len(fields["key"]) != 32:
        raise ValueError("field 'key' is not a cache key")
    updated = data.get("updated")
    if not isinstance(updated, (int, float)) or isinstance(updated, bool):
        raise ValueError("field 'updated' is not a number")
    return RefRecord(updated=float(updated), **fields)


class RefStore:
    """The ``refs/`` directory of a cache."""

    def __init__(self, root: Path, *, writable: bool) -> None:
        self.root = root
        self.writable = writable
        self._memo: dict[str, RefRecord] = {}
        self._read_memo: dict[str, tuple[tuple[int, int], RefRecord | None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def ref_key(identity: str, ref: str) -> str:
        return hashlib.sha256(f"{identity}\0{ref}".encode()).hexdigest()[:32]

    def record(self, identity: str, ref: str, key: str, version: str, source: str) -> None:
        """Point ``(identity, ref)`` at the entry ``key`` (atomic; skipped when unchanged)."""
        rk = self.ref_key(identity, ref)
        with self._lock:
            current = self._memo.get(rk)
        if current is None:
            current = self.read(identity, ref)
        if current is not None and current.key == key and current.source == source:
            return
        if not self.writable:
            return
        rec = RefRecord(identity, ref, key, version, source, time.time())
        data = {"identity": identity, "ref": ref, "key": key, "version": version, "source": source}
        write_atomic(self.root / f"{rk}.json", json.dumps({**data, "updated": rec.updated}).encode())
        with self._lock:
            self._memo[rk] = rec

    def read(self, identity: str, ref: str) -> RefRecord | None:
        """The last-known-good record of ``(identity, ref)``; ``None`` if absent or unreadable."""
        rk = self.ref_key(identity, ref)
        path = self.root / f"{rk}.json"
        try:
            st = os.stat(path)
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        with self._lock:
            memo = self._read_memo.get(rk)
        if memo is not None and memo[0] == stamp:
            return memo[1]  # every load asks: a stat, not a parse
        rec = self._load(path)
        if rec is not None and (rec.identity, rec.ref) != (identity, ref):
            logger.warning("ignoring cache ref %s: it names another reference (%s)", rk, rec.ref)
            rec = None
        with self._lock:
            self._read_memo[rk] = (stamp, rec)
            if rec is not None:
                self._memo[rk] = rec
        return rec

    def _load(self, path: Path) -> RefRecord | None:
        try:
            return _parse(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            logger.warning("ignoring unreadable cache ref %s: %s", path.name, exc)
            return None

    def all(self) -> list[RefRecord]:
        """Every readable ref record."""
        out = []
        try:
            paths = sorted(self.root.glob("*.json"))
        except OSError as exc:
            logger.warning("cannot list cache refs in %s: %s", self.root, exc)
            return []
        for path in paths:
            rec = self._load(path)
            if rec is not None:
                out.append(rec)
        return out
