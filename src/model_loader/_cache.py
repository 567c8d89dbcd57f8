"""The disk cache (atomic, verified, LRU-bounded) and the in-memory cache of loaded objects.

Layout under the cache root::

    CACHEDIR.TAG
    entries/<key>/manifest.json     written last, inside staging, before the rename
    entries/<key>/files/...         the model files (the path users get)
    entries/<key>/.lease            shared-locked by processes serving the entry
    entries/<key>/.used             its mtime is the LRU clock
    refs/<ref-key>.json             last-known-good: (source identity, reference) -> entry
    state/                          sources' own state, e.g. the local source's hash memo
    .staging/<key>.<uuid>/          one fetch in progress (same filesystem as entries/)
    .locks/<key>.lock               per-entry file lock: only saves duplicate downloads
    .quarantine/<key>.<uuid>/       corrupt entries, kept for inspection until pruned

A reader never sees a partial entry: an entry exists only once ``os.replace`` has moved a
complete, fsynced staging directory (manifest included) into ``entries/``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from model_loader._io import check_free_space, fsync_dir, hash_file, safe_relpath, sync_tree
from model_loader._types import FileEntry, Manifest, ResolvedModel
from model_loader.errors import CacheError, IntegrityError

__all__ = ["CachedEntry", "DiskCache", "MemoryCache", "RefRecord"]

logger = logging.getLogger(__name__)

_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by model_loader.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
_FORMAT = 1
_TOUCH_EVERY = 60.0  # seconds between LRU clock updates of one entry by one process

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """A published, verified cache entry."""

    key: str
    root: Path
    manifest: Manifest
    source_id: str
    version: str
    ref: str
    source: str
    created: float
    digest: str

    @property
    def path(self) -> Path:
        """The directory holding the model files."""
        return self.root / "files"

    @property
    def size(self) -> int:
        return self.manifest.total_size


@dataclass(frozen=True, slots=True)
class RefRecord:
    """The last version of a reference that was served successfully from a source."""

    identity: str
    ref: str
    key: str
    version: str
    source: str
    updated: float


class DiskCache:
    """An atomic, verified, size-bounded cache of model directories.

    Args:
        root: Cache directory (created if missing; must be writable).
        max_size: Evict least recently used entries beyond this many bytes.
        verify: ``"fast"`` (sizes and manifest) or ``"full"`` (every hash) on a hit.
        lock_timeout: Seconds to wait for another process fetching the same entry.
        min_free: Bytes that must remain free after a fetch.

    Raises:
        CacheError: The directory cannot be created or written.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_size: int | None = None,
        verify: str = "fast",
        lock_timeout: float = 600.0,
        min_free: int = 0,
    ) -> None:
        self.root = Path(root)
        self.max_size = max_size
        self.verify_mode = verify
        self.lock_timeout = lock_timeout
        self.min_free = min_free
        self._entries = self.root / "entries"
        self._refs = self.root / "refs"
        self._staging = self.root / ".staging"
        self._locks = self.root / ".locks"
        self._quarantine = self.root / ".quarantine"
        self.state_dir = self.root / "state"  # sources' own small state (SourceSettings.state_dir)
        try:
            for d in (self._entries, self._refs, self._staging, self._locks, self._quarantine):
                d.mkdir(parents=True, exist_ok=True)
            tag = self.root / "CACHEDIR.TAG"
            if not tag.exists():
                self._write_atomic(tag, _TAG.encode())
        except OSError as exc:
            raise CacheError(f"cache directory {self.root} is not usable: {exc.strerror or exc}") from exc
        if not os.access(self._staging, os.W_OK | os.X_OK):
            raise CacheError(f"cache directory {self.root} is not writable")
        self._manifests: dict[str, tuple[tuple[int, int], CachedEntry]] = {}
        self._touched: dict[str, float] = {}
        self._ref_memo: dict[str, RefRecord] = {}
        self._leases: dict[str, int] = {}
        self._mutex = threading.Lock()

    # -- lookup -------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return self._entries / key

    def lookup(self, key: str, *, verify: str | None = None) -> CachedEntry | None:
        """A verified entry for ``key``, or ``None`` when absent.

        Raises:
            IntegrityError: The entry exists but fails verification (call :meth:`quarantine`).
        """
        root = self._entries / key
        entry = self._read_manifest(root, key)
        if entry is None:
            return None
        self._verify_entry(entry, verify or self.verify_mode)
        self._lease(key, root)
        self._touch(key, root)
        return entry

    def _read_manifest(self, root: Path, key: str) -> CachedEntry | None:
        path = root / "manifest.json"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        memo = self._manifests.get(key)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        try:
            data = json.loads(path.read_bytes())
            files = tuple(FileEntry(f["path"], int(f["size"]), f["sha256"]) for f in data["files"])
            entry = CachedEntry(
                key=key,
                root=root,
                manifest=Manifest(files),
                source_id=data["source_id"],
                version=data["version"],
                ref=data["ref"],
                source=data.get("source", data["ref"]),
                created=float(data["created"]),
                digest=data.get("digest") or Manifest(files).digest,
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"cache entry {key} has an unreadable manifest: {exc}") from exc
        self._manifests[key] = (stamp, entry)
        return entry

    def _verify_entry(self, entry: CachedEntry, mode: str) -> None:
        files_dir = entry.path
        base = str(files_dir) + os.sep
        for f in entry.manifest.files:
            target = base + f.path  # strings, not pathlib: this runs on every warm start
            try:
                size = os.stat(target).st_size
            except FileNotFoundError:
                raise IntegrityError(f"cache entry {entry.key}: {f.path} is missing") from None
            if size != f.size:
                raise IntegrityError(f"cache entry {entry.key}: {f.path} has {size} bytes, expected {f.size}")
            if mode == "full" and f.sha256 and hash_file(Path(target)) != f.sha256:
                raise IntegrityError(f"cache entry {entry.key}: {f.path} does not match its SHA-256")
        if mode == "full":
            on_disk = set(_walk_files(files_dir))
            extra = on_disk - {f.path for f in entry.manifest.files}
            if extra:
                raise IntegrityError(f"cache entry {entry.key}: unexpected files {sorted(extra)[:3]}")

    def quarantine(self, key: str, reason: str) -> None:
        """Move a corrupt entry aside (call with the entry's lock held)."""
        src = self._entries / key
        dest = self._quarantine / f"{key}.{uuid.uuid4().hex[:8]}"
        self.release_lease(key)
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            return
        self._manifests.pop(key, None)
        logger.warning("cache entry %s is corrupt (%s); quarantined to %s, fetching again", key, reason, dest)

    # -- leases and LRU clock -----------------------------------------------------------

    def _lease(self, key: str, root: Path) -> None:
        """Hold a shared lock on the entry while this process may serve it (no eviction)."""
        with self._mutex:
            if key in self._leases:
                return
            try:
                fd = os.open(root / ".lease", os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # being evicted right now; the caller's verify already passed
                return
            self._leases[key] = fd

    def release_lease(self, key: str) -> None:
        """Stop protecting ``key`` from eviction by other processes (it is no longer served)."""
        with self._mutex:
            fd = self._leases.pop(key, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        """Drop every lease this process holds."""
        for key in list(self._leases):
            self.release_lease(key)

    def _touch(self, key: str, root: Path) -> None:
        now = time.monotonic()
        if now - self._touched.get(key, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        self._touched[key] = now
        with contextlib.suppress(FileNotFoundError):  # evicted meanwhile: nothing to date
            os.utime(root / ".used")

    # -- fetching into the cache --------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """The per-entry inter-process lock (saves duplicate downloads only).

        Raises:
            CacheError: Another process held it longer than ``lock_timeout``.
        """
        from filelock import FileLock, Timeout

        lock = FileLock(str(self._locks / f"{key}.lock"), timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout as exc:
            raise CacheError(f"timed out after {self.lock_timeout}s waiting for the lock on cache entry {key}") from exc
        try:
            yield
        finally:
            lock.release()

    def clean_stale_staging(self, key: str) -> None:
        """Remove staging left by a killed fetch of ``key`` (call with its lock held)."""
        for stale in self._staging.glob(f"{key}.*"):
            logger.info("removing stale staging directory %s", stale)
            shutil.rmtree(stale, ignore_errors=True)

    @contextlib.contextmanager
    def staging(self, key: str, expected_size: int | None = None) -> Iterator[Path]:
        """A fresh staging directory for ``key``; removed unless published.

        Yields the directory; the model's files go in ``<staging>/files``.
        """
        if expected_size is not None:
            check_free_space(self._staging, expected_size, reserve=self.min_free)
        stage = self._staging / f"{key}.{uuid.uuid4().hex}"
        (stage / "files").mkdir(parents=True)
        try:
            yield stage
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def publish(self, stage: Path, resolved: ResolvedModel, manifest: Manifest, source: str) -> CachedEntry:
        """Check ``stage`` against ``manifest``, write the manifest last, rename into place.

        Raises:
            IntegrityError: The staged files differ from the manifest.
            CacheError: The disk is full.
        """
        files_dir = stage / "files"
        verify_staged(files_dir, manifest, resolved)
        key = resolved.cache_key
        record = {
            "format": _FORMAT,
            "key": key,
            "source_id": resolved.source_id,
            "version": resolved.version,
            "ref": resolved.ref.uri,
            "source": source,
            "digest": manifest.digest,
            "created": time.time(),
            "metadata": dict(resolved.metadata),
            "total_size": manifest.total_size,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files],
        }
        try:
            sync_tree(files_dir)  # file data and directory entries, before the manifest exists
            (stage / ".lease").touch()
            (stage / ".used").touch()
            self._write_atomic(stage / "manifest.json", json.dumps(record, indent=1).encode())
            fsync_dir(stage)
            target = self._entries / key
            try:
                os.replace(stage, target)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                logger.info("cache entry %s was published by another process; keeping it", key)
            fsync_dir(self._entries)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"no space left publishing cache entry {key}") from exc
            raise
        entry = self._read_manifest(target, key)
        if entry is None:  # pragma: no cover - removed between rename and read
            raise CacheError(f"cache entry {key} vanished right after publishing")
        self._lease(key, target)
        return entry

    # -- refs (last-known-good) ---------------------------------------------------------

    @staticmethod
    def _ref_key(identity: str, ref: str) -> str:
        return hashlib.sha256(f"{identity}\0{ref}".encode()).hexdigest()[:32]

    def record_ref(self, identity: str, ref: str, entry: CachedEntry, source: str) -> None:
        """Point ``(identity, ref)`` at ``entry`` (atomic; skipped when unchanged)."""
        rk = self._ref_key(identity, ref)
        current = self._ref_memo.get(rk) or self.read_ref(identity, ref)
        if current is not None and current.key == entry.key and current.source == source:
            return
        rec = RefRecord(identity, ref, entry.key, entry.version, source, time.time())
        data = {
            "identity": identity,
            "ref": ref,
            "key": entry.key,
            "version": entry.version,
            "source": source,
            "updated": rec.updated,
        }
        self._write_atomic(self._refs / f"{rk}.json", json.dumps(data).encode())
        self._ref_memo[rk] = rec

    def read_ref(self, identity: str, ref: str) -> RefRecord | None:
        """The last-known-good record of ``(identity, ref)``, if any."""
        rk = self._ref_key(identity, ref)
        try:
            data = json.loads((self._refs / f"{rk}.json").read_bytes())
            rec = _ref_record(data)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable cache ref %s: %s", rk, exc)
            return None
        self._ref_memo[rk] = rec
        return rec

    def refs(self) -> list[RefRecord]:
        """Every ref record."""
        out = []
        for path in sorted(self._refs.glob("*.json")):
            try:
                out.append(_ref_record(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("ignoring unreadable cache ref %s: %s", path.name, exc)
        return out

    # -- listing, verification, pruning -------------------------------------------------

    def entries(self) -> list[tuple[CachedEntry, float]]:
        """Every published entry with its last-used time (epoch seconds)."""
        out = []
        for root in sorted(self._entries.iterdir()):
            try:
                entry = self._read_manifest(root, root.name)
            except IntegrityError as exc:
                logger.warning("%s", exc)
                continue
            if entry is None:
                continue
            try:
                used = os.stat(root / ".used").st_mtime
            except FileNotFoundError:
                used = entry.created
            out.append((entry, used))
        return out

    def verify_all(self, mode: str = "full") -> list[tuple[str, str]]:
        """Verify every entry; quarantine the corrupt ones. Returns ``(key, problem)`` pairs."""
        problems = []
        for root in sorted(self._entries.iterdir()):
            key = root.name
            with self.lock(key):
                try:
                    entry = self._read_manifest(root, key)
                    if entry is not None:
                        self._verify_entry(entry, mode)
                except IntegrityError as exc:
                    problems.append((key, str(exc)))
                    self.quarantine(key, str(exc))
        return problems

    def total_size(self) -> int:
        return sum(e.size for e, _ in self.entries())

    def prune(self, max_size: int | None = None) -> list[CachedEntry]:
        """Evict least recently used entries until the cache fits ``max_size``.

        Never evicts an entry that a process holds a lease on (in use), nor the current
        target of a ref. Also removes quarantined entries and abandoned staging.
        """
        limit = self.max_size if max_size is None else max_size
        self._clean_abandoned()
        if limit is None:
            return []
        listed = self.entries()
        total = sum(e.size for e, _ in listed)
        protected = {r.key for r in self.refs()}
        evicted: list[CachedEntry] = []
        for entry, _used in sorted(listed, key=lambda pair: pair[1]):
            if total <= limit:
                break
            if entry.key in protected or entry.key in self._leases:
                continue
            if self._evict(entry):
                evicted.append(entry)
                total -= entry.size
        if total > limit:
            logger.warning("cache is %d bytes, over its %d limit: the rest is in use or pinned by refs", total, limit)
        return evicted

    def _evict(self, entry: CachedEntry) -> bool:
        from filelock import FileLock, Timeout

        lock = FileLock(str(self._locks / f"{entry.key}.lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return False
        try:
            try:
                fd = os.open(entry.root / ".lease", os.O_RDONLY)
            except FileNotFoundError:
                return False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # a process is serving it
                trash = self._quarantine / f".evict-{entry.key}.{uuid.uuid4().hex[:8]}"
                os.replace(entry.root, trash)
            finally:
                os.close(fd)
            shutil.rmtree(trash, ignore_errors=True)
            self._manifests.pop(entry.key, None)
            logger.info("evicted cache entry %s (%s, %d bytes)", entry.key, entry.version, entry.size)
            return True
        finally:
            lock.release()

    def _clean_abandoned(self) -> None:
        for q in self._quarantine.iterdir():
            shutil.rmtree(q, ignore_errors=True)
        for stale in self._staging.iterdir():
            key = stale.name.split(".", 1)[0]
            from filelock import FileLock, Timeout

            lock = FileLock(str(self._locks / f"{key}.lock"), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                continue  # a fetch of that entry is running
            try:
                shutil.rmtree(stale, ignore_errors=True)
            finally:
                lock.release()

    # -- helpers ------------------------------------------------------------------------

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"no space left writing {path}") from exc
            raise


def _ref_record(d: dict[str, Any]) -> RefRecord:
    return RefRecord(d["identity"], d["ref"], d["key"], d["version"], d["source"], float(d["updated"]))


def _walk_files(root: Path) -> Iterator[str]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            yield Path(dirpath, name).relative_to(root).as_posix()


def verify_staged(files_dir: Path, manifest: Manifest, resolved: ResolvedModel) -> None:
    """Check a fetch's output against its manifest and against what ``resolve`` promised.

    Raises:
        IntegrityError: Any path, size or hash differs, or a file is missing or extra.
    """
    by_path = {}
    for f in manifest.files:
        safe_relpath(f.path)
        if not f.sha256:
            raise IntegrityError(f"the source returned no SHA-256 for {f.path}")
        by_path[f.path] = f
    if resolved.files is not None:
        expected = {f.path: f for f in resolved.files}
        if expected.keys() != by_path.keys():
            missing = sorted(expected.keys() - by_path.keys())[:3]
            extra = sorted(by_path.keys() - expected.keys())[:3]
            raise IntegrityError(f"fetched files differ from the resolved listing: missing {missing}, extra {extra}")
        for path, exp in expected.items():
            got = by_path[path]
            if exp.size != got.size:
                raise IntegrityError(f"{path}: fetched {got.size} bytes, resolved {exp.size}")
            if exp.sha256 and exp.sha256 != got.sha256:
                raise IntegrityError(f"{path}: SHA-256 differs from the resolved one")
    on_disk = {}
    for dirpath, _, names in os.walk(files_dir):
        for name in names:
            full = Path(dirpath, name)
            if full.is_symlink() or not full.is_file():
                raise IntegrityError(f"{full.relative_to(files_dir)} is not a regular file")
            on_disk[full.relative_to(files_dir).as_posix()] = full.stat().st_size
    if on_disk.keys() != by_path.keys():
        raise IntegrityError(f"staged files differ from the manifest: {sorted(on_disk.keys() ^ by_path.keys())[:3]}")
    for path, size in on_disk.items():
        if by_path[path].size != size:
            raise IntegrityError(f"{path}: {size} bytes on disk, the manifest says {by_path[path].size}")


class MemoryCache:
    """A bounded, thread-safe LRU of loaded objects with single-flight loading per key."""

    def __init__(self, maxsize: int) -> None:
        from cachetools import LRUCache

        self._maxsize = maxsize
        self._data: LRUCache[Hashable, Any] | None = LRUCache(maxsize) if maxsize > 0 else None
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable) -> Any | None:
        if self._data is None:
            return None
        with self._lock:
            return self._data.get(key)

    def get_or_load(self, key: Hashable, factory: Callable[[], T]) -> T:
        """The cached value for ``key``, or ``factory()`` run once however many threads ask."""
        if self._data is not None:
            with self._lock:
                if key in self._data:
                    return self._data[key]  # type: ignore[no-any-return]
                flight = self._inflight.setdefault(key, threading.Lock())
        else:
            with self._lock:
                flight = self._inflight.setdefault(key, threading.Lock())
        with flight:
            try:
                if self._data is not None:
                    with self._lock:
                        if key in self._data:
                            return self._data[key]  # type: ignore[no-any-return]
                value = factory()
                if self._data is not None:
                    with self._lock:
                        self._data[key] = value
                return value
            finally:
                with self._lock:
                    self._inflight.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            if self._data is not None:
                self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return 0 if self._data is None else len(self._data)
