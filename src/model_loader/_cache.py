"""The disk cache: atomic, verified, self-repairing, LRU-bounded; it owns its transaction.

Layout under the cache root::

    CACHEDIR.TAG
    entries/<key>/manifest.json     written last, inside staging, before the rename
    entries/<key>/files/...         the model files (the path users get)
    entries/<key>/.lease            shared-locked by processes serving the entry
    entries/<key>/.used             its mtime is the LRU clock
    refs/<ref-key>.json             last-known-good: (source identity, reference) -> entry
    state/                          sources' own state, e.g. the local source's hash memo
    .staging/<key>.<id>/            one fetch in progress, resumable (see _staging.py)
    .locks/<key>.lock               per-entry file lock: only saves duplicate downloads
    .quarantine/<key>.<id>/         damaged entries, kept for inspection until pruned

A reader never sees a partial entry: an entry exists only once ``os.replace`` has moved a
complete, fsynced staging directory (manifest included) into ``entries/``.

:meth:`DiskCache.fill` is the whole transaction (lookup, lease, lock, re-check,
quarantine, stage, fill, verify, publish); the loader hands it a callable that fills a
:class:`~model_loader._staging.Staging` and keeps only policy (retries, fallback).
Anything odd found on disk is damage: quarantined and fetched again, never an exception
that escapes untyped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_loader._deadline import Deadline
from model_loader._hosts import Heartbeat, is_alive, user_marker, write_owner
from model_loader._io import cache_errors, check_free_space, fsync_dir, hash_file, safe_relpath, sync_tree, write_atomic
from model_loader._memory import MemoryCache
from model_loader._refs import RefRecord, RefStore
from model_loader._staging import Staging
from model_loader._types import FileEntry, Manifest, ResolvedModel
from model_loader.errors import CacheError, IntegrityError, SourceUnavailableError

__all__ = ["CacheHit", "CachedEntry", "DiskCache", "MemoryCache", "RefRecord"]

logger = logging.getLogger("model_loader.cache")

_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by model_loader.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)
_FORMAT = 1
_TOUCH_EVERY = 60.0  # seconds between LRU clock updates of one entry by one process
_LOCK_POLL = 0.1  # seconds between looks while another process holds an entry's lock
_STALE_STAGING = 24 * 3600.0  # an unlocked staging older than this is abandoned for good


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

    @property
    def verified(self) -> bool:
        """Every file was checked end to end when it was fetched."""
        return self.manifest.verified


@dataclass(frozen=True, slots=True)
class CacheHit:
    """What :meth:`DiskCache.fill` served: the entry, whether it was downloaded now, and
    the seconds spent verifying (the hit check, or the staged check and publish)."""

    entry: CachedEntry
    fetched: bool
    verify_seconds: float


def _parse_manifest(data: Any, key: str, root: Path) -> CachedEntry:
    """A manifest read from disk, checked field by field (``ValueError`` if malformed)."""
    if not isinstance(data, dict):
        raise ValueError("the manifest is not a JSON object")
    if data.get("key", key) != key:
        raise ValueError(f"the manifest belongs to entry {data.get('key')!r}")
    strings = {}
    for name in ("source_id", "version", "ref"):
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"field {name!r} is missing or not a string")
        strings[name] = value
    source = data.get("source", strings["ref"])
    created = data.get("created")
    rows = data.get("files")
    if not isinstance(source, str) or not isinstance(created, (int, float)) or not isinstance(rows, list):
        raise ValueError("fields 'source', 'created' or 'files' are malformed")
    files = []
    for row in rows:
        if not isinstance(row, dict):
            raise ValueError("a file row is not an object")
        path, size, sha, verified = row.get("path"), row.get("size"), row.get("sha256"), row.get("verified")
        if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"file row {row!r:.80} is malformed")
        if not isinstance(sha, str) or (verified is not None and not isinstance(verified, str)):
            raise ValueError(f"file row {path!r} has a malformed hash")
        files.append(FileEntry(safe_relpath(path), size, sha, None, verified))
    manifest = Manifest(tuple(files))
    digest = data.get("digest") or manifest.digest
    if not isinstance(digest, str):
        raise ValueError("field 'digest' is not a string")
    return CachedEntry(
        key=key, root=root, manifest=manifest, created=float(created), digest=digest, source=source, **strings
    )


class DiskCache:
    """An atomic, verified, self-repairing, size-bounded cache of model directories.

    Args:
        root: Cache directory (created if missing).
        max_size: Evict least recently used entries beyond this many bytes.
        verify: ``"fast"`` (sizes and manifest) or ``"full"`` (every hash) on a hit.
        lock_timeout: Seconds to wait for another process fetching the same entry while
            its staging shows no progress; then this process fetches on its own.
        min_free: Bytes that must remain free after a fetch.
        shared: Several hosts use this directory (NFS, EFS, a FUSE mount), where ``flock``
            may not reach from one host to another: processes also record their use of
            entries as files with a heartbeat, so eviction spares entries in use anywhere.

    Staging directories name their owner (host, pid) and carry a heartbeat: a process
    resumes another's staging only once that owner is dead (its process gone, or its host
    silent for ``STALE_AFTER`` seconds), whatever the locks say.

    A cache that cannot be written (a read-only volume pre-warmed by a job) is opened
    read-only: hits are served, nothing is written, a miss is a ``CacheError``.

    Raises:
        CacheError: The directory cannot be created, or is not a usable cache.
    """

    def __init__(
        self,
        root: Path,
        *,
        max_size: int | None = None,
        verify: str = "fast",
        lock_timeout: float = 30.0,
        min_free: int = 0,
        shared: bool = False,
    ) -> None:
        self.root = Path(root)
        self.shared = shared
        self.max_size = max_size
        self.verify_mode = verify
        self.lock_timeout = lock_timeout
        self.min_free = min_free
        self._entries = self.root / "entries"
        self._staging = self.root / ".staging"
        self._locks = self.root / ".locks"
        self._quarantine = self.root / ".quarantine"
        self.state_dir = self.root / "state"  # sources' own small state (SourceSettings.state_dir)
        self.read_only = False
        try:
            for d in (self._entries, self.root / "refs", self._staging, self._locks, self._quarantine):
                d.mkdir(parents=True, exist_ok=True)
            tag = self.root / "CACHEDIR.TAG"
            if not tag.exists():
                write_atomic(tag, _TAG.encode())
        except (OSError, CacheError) as exc:
            if not (self._entries.is_dir() and self._is_unwritable(exc)):
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise CacheError(f"cache directory {self.root} is not usable: {reason}") from exc
            self.read_only = True
        if not self.read_only and not os.access(self._staging, os.W_OK | os.X_OK):
            self.read_only = True
        if self.read_only:
            if not os.access(self._entries, os.R_OK | os.X_OK):
                raise CacheError(f"cache directory {self.root} is neither writable nor readable")
            logger.info("cache %s is read-only: serving hits, storing nothing", self.root)
        self.refs_store = RefStore(self.root / "refs", writable=not self.read_only)
        self._manifests: dict[str, tuple[tuple[int, int], CachedEntry]] = {}
        self._belongs: dict[str, tuple[CachedEntry, ResolvedModel]] = {}  # checked pairs: not again
        self._touched: dict[str, float] = {}
        self._leases: dict[str, int] = {}
        self._retained: dict[str, int] = {}  # keys held by users beyond the loader (serving handles)
        self._mutex = threading.Lock()
        if not self.read_only:
            self._clean_staging(published_only=True)

    @staticmethod
    def _is_unwritable(exc: BaseException) -> bool:
        cause = exc if isinstance(exc, OSError) and not isinstance(exc, CacheError) else exc.__cause__
        return isinstance(cause, OSError) and cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM)

    # -- lookup -------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return self._entries / key

    def lookup(self, key: str, *, expect: ResolvedModel | None = None, verify: str | None = None) -> CachedEntry | None:
        """The verified, leased entry for ``key``; ``None`` when there is none.

        Args:
            expect: The resolution the entry must belong to (same source and version; the
                same files when the resolution lists them).
            verify: ``"fast"`` or ``"full"``; default: the cache's mode.

        Raises:
            IntegrityError: Something is there but damaged (call :meth:`get` to repair).
        """
        root = self._entries / key
        entry = self._read_manifest(root, key)
        if entry is None:
            return None
        if expect is not None:
            checked = self._belongs.get(key)
            if checked is None or checked[0] is not entry or checked[1] is not expect:
                _check_belongs(entry, expect)
                self._belongs[key] = (entry, expect)
        self._verify_entry(entry, verify or self.verify_mode)
        if not self._lease(key, root):
            return None  # being evicted right now: treat as a miss, fetch under the lock
        self._touch(key, root)
        return entry

    def get(
        self,
        key: str,
        *,
        expect: ResolvedModel | None = None,
        verify: str | None = None,
        deadline: Deadline | None = None,
        locked: bool = False,
    ) -> tuple[CachedEntry | None, str | None]:
        """:meth:`lookup` that repairs: ``(entry, None)``, ``(None, None)`` when absent, or
        ``(None, problem)`` after quarantining a damaged entry (re-checked under its lock;
        ``locked``: the caller holds it)."""
        try:
            return self.lookup(key, expect=expect, verify=verify), None
        except IntegrityError as exc:
            problem = str(exc)
        if self.read_only:
            logger.warning("cache entry %s is damaged (%s); the cache is read-only, so it stays", key, problem)
            return None, problem
        if locked:
            self.quarantine(key, problem)
            return None, problem
        with self._lock(key, deadline or Deadline(self.lock_timeout, what="waiting for the entry lock")) as held:
            try:
                return self.lookup(key, expect=expect, verify=verify), None  # repaired meanwhile
            except IntegrityError as exc:
                problem = str(exc)
            if held:
                self.quarantine(key, problem)
        return None, problem

    def _read_manifest(self, root: Path, key: str) -> CachedEntry | None:
        path = root / "manifest.json"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.lexists(root):
                raise IntegrityError(f"cache entry {key} has no manifest") from None
            return None
        except OSError as exc:  # ENOTDIR: a file where the entry's directory belongs
            raise IntegrityError(f"cache entry {key} is unreadable: {exc.strerror or exc}") from exc
        stamp = (st.st_ino, st.st_mtime_ns)
        memo = self._manifests.get(key)
        if memo is not None and memo[0] == stamp:
            return memo[1]
        try:
            entry = _parse_manifest(json.loads(path.read_bytes()), key, root)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, IntegrityError) as exc:
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
            except OSError as exc:
                raise IntegrityError(f"cache entry {entry.key}: {f.path} is unreadable: {exc.strerror}") from exc
            if size != f.size:
                raise IntegrityError(f"cache entry {entry.key}: {f.path} has {size} bytes, expected {f.size}")
            if mode == "full":
                try:
                    actual = hash_file(Path(target))
                except OSError as exc:
                    raise IntegrityError(f"cache entry {entry.key}: {f.path} is unreadable: {exc.strerror}") from exc
                if actual != f.sha256:
                    raise IntegrityError(f"cache entry {entry.key}: {f.path} does not match its SHA-256")
        if mode == "full":
            try:
                on_disk = set(_walk_files(files_dir))
            except OSError as exc:
                raise IntegrityError(f"cache entry {entry.key} cannot be listed: {exc.strerror}") from exc
            extra = on_disk - {f.path for f in entry.manifest.files}
            if extra:
                raise IntegrityError(f"cache entry {entry.key}: unexpected files {sorted(extra)[:3]}")

    def quarantine(self, key: str, reason: str) -> None:
        """Move a damaged entry aside (call with the entry's lock held)."""
        src = self._entries / key
        dest = self._quarantine / f"{key}.{uuid.uuid4().hex[:8]}"
        self.release_lease(key)
        self._manifests.pop(key, None)
        with cache_errors(f"quarantining cache entry {key}"):
            try:
                os.replace(src, dest)
            except FileNotFoundError:
                return
        logger.warning("cache entry %s is damaged (%s); quarantined to %s, fetching again", key, reason, dest)

    # -- leases and LRU clock -----------------------------------------------------------

    def _lease(self, key: str, root: Path) -> bool:
        """Hold a shared lock on the entry while this process may serve it (no eviction);
        on a shared cache also a user marker other hosts see.

        False when an eviction holds it or has just moved it away.
        """
        with self._mutex:
            if key in self._leases:
                return True
            try:
                fd = os.open(root / ".lease", os.O_RDONLY)
            except OSError:
                return True  # an entry without a lease file (read-only copy): nothing to protect
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                same = os.fstat(fd).st_ino == os.stat(root / ".lease").st_ino
            except OSError:
                os.close(fd)
                return False
            if not same:  # evicted between our read and our lock
                os.close(fd)
                return False
            if self.shared and not self.read_only:
                marker = user_marker(root)
                try:
                    marker.parent.mkdir(exist_ok=True)
                    marker.touch()
                    Heartbeat.shared().add(marker)
                except OSError as exc:
                    logger.warning("cannot mark cache entry %s as in use (%s): eviction may not see it", key, exc)
                if not os.path.exists(root / ".lease"):  # evicted while we marked it
                    self._drop_marker(root)
                    os.close(fd)
                    return False
            self._leases[key] = fd
            return True

    def _drop_marker(self, root: Path) -> None:
        marker = user_marker(root)
        Heartbeat.shared().remove(marker)
        with contextlib.suppress(OSError):
            marker.unlink()

    def retain(self, key: str) -> None:
        """Keep ``key``'s lease until a matching :meth:`release`, whatever the loader serves."""
        with self._mutex:
            self._retained[key] = self._retained.get(key, 0) + 1

    def release(self, key: str) -> None:
        """Undo one :meth:`retain`; the lease goes once nothing retains or serves ``key``."""
        with self._mutex:
            left = self._retained.get(key, 0) - 1
            if left > 0:
                self._retained[key] = left
                return
            self._retained.pop(key, None)

    def release_lease(self, key: str) -> None:
        """Stop protecting ``key`` from eviction by other processes (it is no longer served),
        unless a user still retains it."""
        with self._mutex:
            if self._retained.get(key):
                return
            fd = self._leases.pop(key, None)
        if fd is not None:
            os.close(fd)
            if self.shared and not self.read_only:
                self._drop_marker(self._entries / key)

    def release_all(self) -> None:
        """Drop every lease this process holds."""
        with self._mutex:
            self._retained.clear()
        for key in list(self._leases):
            self.release_lease(key)

    def _in_use_elsewhere(self, root: Path) -> bool:
        """A fresh user marker of another process (this host's, running; or another host's)."""
        mine = user_marker(root).name
        try:
            markers = list((root / ".users").iterdir())
        except OSError:
            return False
        return any(m.name != mine and is_alive(m) for m in markers)

    def _touch(self, key: str, root: Path) -> None:
        now = time.monotonic()
        if self.read_only or now - self._touched.get(key, -_TOUCH_EVERY) < _TOUCH_EVERY:
            return
        self._touched[key] = now
        with contextlib.suppress(OSError):  # evicted meanwhile, or a read-only copy: nothing to date
            os.utime(root / ".used")

    # -- the transaction ----------------------------------------------------------------

    def fill(
        self,
        resolved: ResolvedModel,
        filler: Callable[[Staging], Manifest],
        *,
        deadline: Deadline,
        source: str,
        progress: Callable[[int], None] | None = None,
    ) -> CacheHit:
        """The verified entry for ``resolved``: from the cache, else filled by ``filler``.

        ``filler`` gets a :class:`Staging` (resumed from an earlier attempt or process when
        possible) and returns the manifest of what is in it; the loader's retries live in
        it. While another process fetches the same entry this one waits, as long as that
        fetch makes progress and the deadline allows; then it fetches on its own.

        Raises:
            IntegrityError: The filled files differ from the manifest or the resolution.
            CacheError: The disk is full, or the cache is read-only and has no copy.
        """
        key = resolved.cache_key
        t0 = time.monotonic()
        hit, _ = self.get(key, expect=resolved, deadline=deadline)
        if hit is not None:
            return CacheHit(hit, False, time.monotonic() - t0)
        if self.read_only:
            raise CacheError(f"the cache {self.root} is read-only and holds no copy of {resolved.version}")
        with self._lock(key, deadline) as locked:
            hit, _ = self.get(key, expect=resolved, locked=locked, deadline=deadline)
            if hit is not None:
                return CacheHit(hit, False, 0.0)  # another process fetched it while we waited
            staging = self._open_staging(key, adopt=locked, progress=progress)
            heartbeat = Heartbeat.shared()
            heartbeat.add(staging.owner)
            keep = False
            try:
                if resolved.files is not None:
                    needed = sum(f.size for f in resolved.files) - sum(e.size for e in staging.completed.values())
                    with cache_errors(f"checking free space in {self._staging}"):
                        check_free_space(self._staging, max(0, needed), reserve=self.min_free)
                manifest = filler(staging)
                t1 = time.monotonic()
                entry = self._publish(staging, resolved, manifest, source, locked=locked)
                return CacheHit(entry, True, time.monotonic() - t1)
            except SourceUnavailableError:
                keep = bool(staging.completed)  # an outage: the next attempt or process resumes here
                raise
            finally:
                heartbeat.remove(staging.owner)
                if not keep and staging.root.exists():
                    shutil.rmtree(staging.root, ignore_errors=True)

    def _open_staging(self, key: str, *, adopt: bool, progress: Callable[[int], None] | None) -> Staging:
        """A staging directory this process owns: a dead owner's, resumed (with the lock
        held), or a new one. A live owner's staging is never touched."""
        if adopt:
            dead = [s for s in self._staging.glob(f"{key}.*") if s.is_dir() and not is_alive(s / "owner.json")]
            dead.sort(key=_journal_size, reverse=True)
            for extra in dead[1:]:
                shutil.rmtree(extra, ignore_errors=True)
            if dead:
                with cache_errors(f"taking over staging directory {dead[0]}"):
                    owner = write_owner(dead[0])
                staging = Staging(dead[0], progress)
                staging.adopt()
                staging.owner = owner
                return staging
        root = self._staging / f"{key}.{uuid.uuid4().hex}"
        staging = Staging(root, progress)
        with cache_errors(f"creating staging directory {root}"):
            staging.owner = write_owner(root)
        return staging

    @contextlib.contextmanager
    def _lock(self, key: str, deadline: Deadline) -> Iterator[bool]:
        """The entry's inter-process lock, or ``False`` when waiting for it is pointless.

        Waits while the holder's staging shows progress, at most ``lock_timeout`` without
        any and never past ``deadline``; a lock only saves bandwidth.
        """
        from filelock import FileLock, Timeout

        if self.read_only:
            yield False
            return
        lock = FileLock(str(self._locks / f"{key}.lock"))
        last_sign: tuple[int, int] | None = None
        quiet_since = time.monotonic()
        give_up_at = quiet_since + deadline.remaining() / 2  # keep half the time to fetch ourselves
        locked = False
        while True:
            try:
                lock.acquire(timeout=min(_LOCK_POLL, max(0.0, deadline.remaining() - 0.05)), poll_interval=0.02)
                locked = True
                break
            except Timeout:
                pass
            except OSError as exc:
                logger.warning("cannot lock cache entry %s (%s); fetching without the lock", key, exc)
                break
            if (self._entries / key / "manifest.json").exists():
                break  # published meanwhile: the caller's re-check finds it
            sign = self._staging_signature(key)
            now = time.monotonic()
            if sign != last_sign:
                last_sign, quiet_since = sign, now
            if now - quiet_since >= self.lock_timeout or now >= give_up_at:
                logger.warning(
                    "another process holds the lock on cache entry %s and %s; fetching on our own",
                    key,
                    "made no progress for %.0fs" % (now - quiet_since)
                    if now - quiet_since >= self.lock_timeout
                    else "half the deadline has passed",
                )
                break
        try:
            yield locked
        finally:
            if locked:
                lock.release()

    def _staging_signature(self, key: str) -> tuple[int, int]:
        """(bytes, newest mtime) of the key's staging directories: changes while a fetch runs."""
        total, newest = 0, 0
        for stage in self._staging.glob(f"{key}.*"):
            for dirpath, _, names in os.walk(stage):
                for name in names:
                    if name == "owner.json":
                        continue  # a heartbeat is not progress: a hung process still beats
                    with contextlib.suppress(OSError):
                        st = os.stat(os.path.join(dirpath, name))
                        total += st.st_blocks
                        newest = max(newest, st.st_mtime_ns)
        return total, newest

    def _publish(
        self, staging: Staging, resolved: ResolvedModel, manifest: Manifest, source: str, *, locked: bool
    ) -> CachedEntry:
        files_dir = staging.files_dir
        manifest = verify_staged(files_dir, manifest, resolved)
        key = resolved.cache_key
        stage = staging.root
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
            "verified": manifest.verified,
            "files": [
                {"path": f.path, "size": f.size, "sha256": f.sha256, "verified": f.verified} for f in manifest.files
            ],
        }
        target = self._entries / key
        with cache_errors(f"publishing cache entry {key}"):
            for f in manifest.files:  # read-only: a hard link to it (a promoted tier, a KServe dest) cannot alter it
                path = files_dir / f.path
                os.chmod(path, os.stat(path).st_mode & ~0o222)
            sync_tree(files_dir)  # file data and directory entries, before the manifest exists
            for name in ("journal.jsonl", "owner.json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stage / name)
            (stage / ".lease").touch()
            (stage / ".used").touch()
            write_atomic(stage / "manifest.json", json.dumps(record, indent=1).encode())
            fsync_dir(stage)
            try:
                os.replace(stage, target)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                logger.info("cache entry %s was published by another process; keeping it", key)
            fsync_dir(self._entries)
        entry, problem = self.get(key, expect=resolved, locked=locked)
        if entry is None and problem is not None and locked:
            # what stood in the way was damaged and is quarantined now: publish ours
            with cache_errors(f"publishing cache entry {key}"):
                if stage.exists():
                    os.replace(stage, target)
                    fsync_dir(self._entries)
            entry, problem = self.get(key, expect=resolved, locked=True)
        if entry is None:
            raise CacheError(f"cache entry {key} could not be published: {problem or 'it vanished'}")
        return entry

    # -- refs (last-known-good) ---------------------------------------------------------

    def record_ref(self, identity: str, ref: str, entry: CachedEntry, source: str) -> None:
        """Point ``(identity, ref)`` at ``entry`` (atomic; skipped when unchanged or read-only)."""
        self.refs_store.record(identity, ref, entry.key, entry.version, source)

    def read_ref(self, identity: str, ref: str) -> RefRecord | None:
        """The last-known-good record of ``(identity, ref)``, if any."""
        return self.refs_store.read(identity, ref)

    def refs(self) -> list[RefRecord]:
        """Every readable ref record."""
        return self.refs_store.all()

    # -- listing, verification, pruning -------------------------------------------------

    def _entry_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self._entries))
        except OSError as exc:
            raise CacheError(f"cannot list {self._entries}: {exc.strerror}") from exc

    def entries(self) -> list[tuple[CachedEntry, float]]:
        """Every readable published entry with its last-used time (epoch seconds)."""
        out = []
        for name in self._entry_names():
            root = self._entries / name
            try:
                entry = self._read_manifest(root, name)
            except IntegrityError as exc:
                logger.warning("%s", exc)
                continue
            if entry is None:
                continue
            try:
                used = os.stat(root / ".used").st_mtime
            except OSError:
                used = entry.created
            out.append((entry, used))
        return out

    def verify_all(self, mode: str = "full") -> list[tuple[str, str]]:
        """Verify every directory under ``entries/``; quarantine the damaged ones.

        Never stops on one bad entry. Returns ``(name, problem)`` for each.
        """
        problems = []
        for name in self._entry_names():
            root = self._entries / name
            try:
                if len(name) != 32 or not all(c in "0123456789abcdef" for c in name):
                    raise IntegrityError(f"{name!r} is not a cache entry")
                entry = self._read_manifest(root, name)
                if entry is not None:
                    self._verify_entry(entry, mode)
            except IntegrityError as exc:
                problems.append((name, str(exc)))
                if self.read_only:
                    continue
                with self._lock(name, Deadline(self.lock_timeout)) as locked:
                    if locked:
                        self.quarantine(name, str(exc))
        return problems

    def total_size(self) -> int:
        return sum(e.size for e, _ in self.entries())

    def prune(self, max_size: int | None = None) -> list[CachedEntry]:
        """Evict least recently used entries until the cache fits ``max_size``.

        Never evicts an entry that a process holds a lease on (in use), nor the current
        target of a ref. Also removes quarantined entries and abandoned staging.
        """
        limit = self.max_size if max_size is None else max_size
        if self.read_only:
            return []
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
                if self.shared and self._in_use_elsewhere(entry.root):
                    return False  # a process on another host is serving it
                trash = self._quarantine / f".evict-{entry.key}.{uuid.uuid4().hex[:8]}"
                with cache_errors(f"evicting cache entry {entry.key}"):
                    os.replace(entry.root, trash)
                    if self.shared and self._in_use_elsewhere(trash):  # marked while we moved it
                        os.replace(trash, entry.root)
                        return False
            finally:
                os.close(fd)
            shutil.rmtree(trash, ignore_errors=True)
            self._manifests.pop(entry.key, None)
            logger.info("evicted cache entry %s (%s, %d bytes)", entry.key, entry.version, entry.size)
            return True
        finally:
            lock.release()

    def _clean_abandoned(self) -> None:
        """Remove quarantined entries and staging that will not be resumed."""
        for q in self._quarantine.iterdir():
            shutil.rmtree(q, ignore_errors=True)
        self._clean_staging(published_only=False)

    def _clean_staging(self, *, published_only: bool) -> None:
        """Remove staging of entries already published, and (unless ``published_only``)
        staging abandoned for a day; a younger one may still be resumed. Cheap when
        ``.staging`` is empty, as it is between fetches."""
        try:
            stages = os.listdir(self._staging)
        except OSError:
            return
        if not stages:
            return  # the usual case, on every start: nothing to import or look at
        from filelock import FileLock, Timeout

        now = time.time()
        for name in stages:
            stale = self._staging / name
            key = name.split(".", 1)[0]
            if is_alive(stale / "owner.json"):
                continue  # a fetch is running there, maybe on another host
            if not (self._entries / key / "manifest.json").exists():
                try:
                    if published_only or now - stale.stat().st_mtime <= _STALE_STAGING:
                        continue
                except OSError:
                    continue
            lock = FileLock(str(self._locks / f"{key}.lock"), timeout=0)
            try:
                lock.acquire()
            except (Timeout, OSError):
                continue  # a fetch of that entry is running
            try:
                logger.info("removing abandoned staging directory %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            finally:
                lock.release()


def _journal_size(stage: Path) -> int:
    try:
        return (stage / "journal.jsonl").stat().st_size
    except OSError:
        return -1


def _check_belongs(entry: CachedEntry, resolved: ResolvedModel) -> None:
    if (entry.source_id, entry.version) != (resolved.source_id, resolved.version):
        raise IntegrityError(
            f"cache entry {entry.key} holds {entry.source_id} {entry.version}, "
            f"not {resolved.source_id} {resolved.version}"
        )
    if resolved.files is not None:
        want = {(f.path, f.size) for f in resolved.files}
        have = {(f.path, f.size) for f in entry.manifest.files}
        if want != have:
            raise IntegrityError(f"cache entry {entry.key} holds other files than {resolved.version} lists")


def _walk_files(root: Path) -> Iterator[str]:
    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, _, names in os.walk(root, onerror=fail):
        for name in names:
            yield Path(dirpath, name).relative_to(root).as_posix()


def verify_staged(files_dir: Path, manifest: Manifest, resolved: ResolvedModel) -> Manifest:
    """Check a fetch's output against its manifest and against what ``resolve`` promised.

    Returns the manifest with ``verified="sha256"`` on files whose SHA-256 was known
    before the download and matched.

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
            if exp.sha256:
                if exp.sha256 != got.sha256:
                    raise IntegrityError(f"{path}: SHA-256 differs from the resolved one")
                if not got.verified:
                    by_path[path] = FileEntry(got.path, got.size, got.sha256, got.pin, "sha256")
    on_disk = {}
    with cache_errors(f"checking staged files in {files_dir}"):
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
    return Manifest.of(by_path.values())
