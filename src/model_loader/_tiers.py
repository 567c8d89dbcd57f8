"""Several cache directories searched in order: e.g. a pod-local cache in front of a shared
volume pre-warmed by a job (often read-only).

A hit is served from the first tier holding the verified entry. A hit in a later tier is
promoted into the first writable tier (hard links where both are on one filesystem, else
a copy) unless promotion is off, so the next start is local. A miss is fetched into the
first writable tier. Read-only tiers are never written.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Literal

from model_loader._cache import CachedEntry, CacheHit, DiskCache
from model_loader._deadline import Deadline
from model_loader._io import cache_errors, copy_file
from model_loader._refs import RefRecord
from model_loader._staging import Staging
from model_loader._types import FileEntry, Manifest, ResolvedModel
from model_loader.errors import CacheError, IntegrityError

__all__ = ["Promote", "TieredCache"]

logger = logging.getLogger("model_loader.cache")

Promote = Literal["link", "copy", "off"]


class TieredCache:
    """Caches tried in order; the first writable one takes new entries and promotions.

    Args:
        tiers: The caches, nearest first.
        promote: ``"link"`` (hard links where possible, else a copy), ``"copy"`` or ``"off"``.
    """

    def __init__(self, tiers: Sequence[DiskCache], *, promote: Promote = "link") -> None:
        if not tiers:
            raise ValueError("a tiered cache needs at least one tier")
        self.tiers = list(tiers)
        self.promote = promote
        self.primary = next((t for t in self.tiers if not t.read_only), None)

    @property
    def read_only(self) -> bool:
        return self.primary is None

    @property
    def state_dir(self) -> os.PathLike[str]:
        return (self.primary or self.tiers[0]).state_dir

    @property
    def max_size(self) -> int | None:
        return self.primary.max_size if self.primary is not None else None

    @property
    def root(self) -> os.PathLike[str]:
        return (self.primary or self.tiers[0]).root

    def fill(
        self,
        resolved: ResolvedModel,
        filler: Callable[[Staging], Manifest],
        *,
        deadline: Deadline,
        source: str,
        progress: Callable[[int], None] | None = None,
    ) -> CacheHit:
        """:meth:`DiskCache.fill` over the tiers: the first hit (promoted), else a fetch
        into the first writable tier."""
        key = resolved.cache_key
        t0 = time.monotonic()
        for tier in self.tiers:
            hit, _ = tier.get(key, expect=resolved, deadline=deadline)
            if hit is None:
                continue
            if tier is self.primary or self.primary is None or self.promote == "off" or self._after(tier):
                return CacheHit(hit, False, time.monotonic() - t0)
            try:
                promoted = self.primary.fill(
                    resolved, functools.partial(self._copy, hit), deadline=deadline, source=hit.source
                )
            except (CacheError, IntegrityError) as exc:
                logger.warning("could not promote %s from %s (%s); serving it from there", key, tier.root, exc)
                return CacheHit(hit, False, time.monotonic() - t0)
            logger.info("promoted cache entry %s from %s to %s", key, tier.root, self.primary.root)
            tier.release_lease(key)  # served from the near tier from now on
            return CacheHit(promoted.entry, False, time.monotonic() - t0)
        if self.primary is None:
            raise CacheError(f"every cache tier is read-only and none holds {resolved.version}")
        return self.primary.fill(resolved, filler, deadline=deadline, source=source, progress=progress)

    def _after(self, tier: DiskCache) -> bool:
        """Whether ``tier`` comes before the primary (a hit nearer than where we write)."""
        return self.primary is not None and self.tiers.index(tier) < self.tiers.index(self.primary)

    def _copy(self, hit: CachedEntry, staging: Staging) -> Manifest:
        link = self.promote == "link"
        out = []
        with cache_errors(f"promoting cache entry {hit.key}"):
            for f in hit.manifest.files:
                src = hit.path / f.path
                dest = staging.files_dir / f.path
                dest.parent.mkdir(parents=True, exist_ok=True)
                if link:
                    try:
                        os.link(src, dest)
                        out.append(f)
                        continue
                    except OSError as exc:
                        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EROFS, errno.EACCES):
                            raise
                        link = False  # another filesystem: copy this one and the rest
                size, sha = copy_file(src, dest)
                if (size, sha) != (f.size, f.sha256):
                    raise IntegrityError(f"cache entry {hit.key}: {f.path} changed while it was promoted")
                out.append(FileEntry(f.path, size, sha, None, f.verified))
        return Manifest.of(out)

    def get(self, key: str, *, deadline: Deadline | None = None) -> tuple[CachedEntry | None, str | None]:
        problems = []
        for tier in self.tiers:
            entry, problem = tier.get(key, deadline=deadline)
            if entry is not None:
                return entry, None
            if problem:
                problems.append(problem)
        return None, "; ".join(problems) or None

    def read_ref(self, identity: str, ref: str) -> RefRecord | None:
        for tier in self.tiers:
            record = tier.read_ref(identity, ref)
            if record is not None:
                return record
        return None

    def record_ref(self, identity: str, ref: str, entry: CachedEntry, source: str) -> None:
        if self.primary is not None:
            self.primary.record_ref(identity, ref, entry, source)

    def release_lease(self, key: str) -> None:
        for tier in self.tiers:
            tier.release_lease(key)

    def retain(self, key: str) -> None:
        for tier in self.tiers:
            tier.retain(key)

    def release(self, key: str) -> None:
        for tier in self.tiers:
            tier.release(key)

    def release_all(self) -> None:
        for tier in self.tiers:
            tier.release_all()

    def prune(self, max_size: int | None = None) -> list[CachedEntry]:
        return self.primary.prune(max_size) if self.primary is not None else []
