"""End-to-end checks of downloaded S3 objects: ETags and the checksums S3 stores.

What can be checked depends on how the object was uploaded (see docs/s3.md):

- a full-object checksum (``ChecksumType: FULL_OBJECT``, or a single-part object's):
  SHA-256 (free: the manifest's hash), CRC32, SHA-1; CRC32C and CRC64NVME when awscrt is
  installed (botocore's own optional accelerator);
- a composite checksum (``COMPOSITE``, or a value ending ``-N``): the checksum of the
  concatenated per-part checksums, which needs the object's part layout;
- the ETag of a single-part upload: the MD5 of the body (32 hex digits), unless the
  object is encrypted with SSE-KMS or SSE-C;
- the ETag of a multipart upload (``"<hex>-N"``): the MD5 of the concatenated per-part
  MD5s, again given the part layout.

The cheapest check that applies is chosen; one that needs no part layout first. Some
stores (moto) neither type nor suffix a multipart upload's composite checksum: then both
readings are computed and either may match. The part layout comes from ``HEAD
?partNumber=1`` (the first part's size and ``PartsCount``), assuming equal parts but the
last (what every SDK uploads); when a layout-based check fails, the true part sizes are
read (one HEAD per part) and the check is made again from disk before the bytes are
called corrupt.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from model_loader.errors import IntegrityError, InvalidResponseError

__all__ = ["Candidate", "Layout", "Mismatch", "Verifier", "choose", "layout_from_head"]

_MD5_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})"?$')
_MULTIPART_ETAG = re.compile(r'^"?([0-9a-fA-F]{32})-([0-9]{1,5})"?$')
_CHECKSUM = re.compile(r"^([A-Za-z0-9+/=]{4,100})(?:-([0-9]{1,5}))?$")
_MAX_PARTS = 10_000  # S3's limit
_KMS = ("aws:kms", "aws:kms:dsse")


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc:
    """A CRC with the hashlib interface (big-endian digest, as S3 encodes it)."""

    def __init__(self, fn: Callable[[Any, int], int], width: int) -> None:
        self._fn = fn
        self._width = width
        self._value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = self._fn(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self._width, "big")


def _crt(name: str) -> Callable[[Any, int], int] | None:
    try:  # botocore's optional accelerator (botocore[crt])
        checksums = importlib.import_module("awscrt.checksums")
    except ImportError:
        return None
    fn = getattr(checksums, name, None)
    return fn if callable(fn) else None


@dataclass(frozen=True, slots=True)
class _Algorithm:
    name: str  # "CRC32"
    size: int  # digest bytes
    cost: int  # relative cost per byte; SHA-256 is free (computed anyway)
    factory: Callable[[], _Hasher] | None  # None: unavailable here

    @property
    def label(self) -> str:
        return "s3-" + self.name.lower()


def _algorithms() -> tuple[_Algorithm, ...]:
    crc32c, crc64 = _crt("crc32c"), _crt("crc64nvme")
    return (
        _Algorithm("SHA256", 32, 0, hashlib.sha256),
        _Algorithm("CRC32", 4, 1, lambda: _Crc(zlib.crc32, 4)),
        _Algorithm("CRC32C", 4, 1, (lambda: _Crc(crc32c, 4)) if crc32c else None),
        _Algorithm("CRC64NVME", 8, 1, (lambda: _Crc(crc64, 8)) if crc64 else None),
        _Algorithm("SHA1", 20, 2, hashlib.sha1),
    )


@functools.cache
def _known() -> tuple[_Algorithm, ...]:
    return _algorithms()  # the awscrt probe runs once, on first use


@dataclass(frozen=True, slots=True)
class Layout:
    """The sizes of an object's upload parts."""

    sizes: tuple[int, ...]
    confirmed: bool  # every size was read from the store, not inferred from the first part's

    @classmethod
    def uniform(cls, size: int, part: int, count: int) -> Layout:
        return cls((part,) * (count - 1) + (size - part * (count - 1),), False)


def layout_from_head(head: Mapping[str, Any], size: int, count: int) -> Layout | None:
    """The layout implied by ``HEAD ?partNumber=1``, if consistent with ``size`` and ``count`` parts."""
    part, parts = head.get("ContentLength"), head.get("PartsCount")
    if not isinstance(part, int) or not isinstance(parts, int) or isinstance(part, bool) or parts != count:
        return None
    if part <= 0 or not (part * (count - 1) < size <= part * count):
        return None
    return Layout.uniform(size, part, count)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way the bytes could be checked.

    Attributes:
        label: ``FileEntry.verified`` when it matches.
        algorithm: The hash (``"MD5"`` for ETags).
        expected: The digest it must produce.
        parts: Number of parts for a per-part check (composite checksum, multipart ETag);
            0 for a check over the whole body.
    """

    label: str
    algorithm: str
    expected: bytes
    parts: int = 0
    cost: int = 3


@dataclass(frozen=True, slots=True)
class Choice:
    """The check chosen for an object: candidates of which any may match."""

    candidates: tuple[Candidate, ...]

    @property
    def parts(self) -> int:
        """The part count a layout is needed for; 0 when none is."""
        return max((c.parts for c in self.candidates), default=0)


def _b64(value: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != size:
        raise InvalidResponseError(f"{what}: malformed checksum {value!r}", scheme="s3")
    return raw


def choose(headers: Mapping[str, Any], etag: str | None, what: str) -> list[Choice]:
    """The ways ``headers`` (a GET or HEAD response) let the body be checked, best first.

    A choice that needs a part layout comes after every one that does not.

    Raises:
        InvalidResponseError: A checksum header that does not parse.
    """
    kind = headers.get("ChecksumType")
    etag_md5 = _MD5_ETAG.match(etag or "")
    etag_parts = _MULTIPART_ETAG.match(etag or "")
    multipart = etag_parts is not None
    choices: list[tuple[int, Choice]] = []
    for alg in _known():
        value = headers.get("Checksum" + alg.name)
        if not isinstance(value, str) or alg.factory is None:
            continue
        match = _CHECKSUM.match(value)
        if match is None:
            raise InvalidResponseError(f"{what}: malformed {alg.name} checksum {value!r}", scheme="s3")
        digest = _b64(match.group(1), alg.size, what)
        suffix = int(match.group(2)) if match.group(2) else 0
        full = Candidate(alg.label, alg.name, digest, 0, alg.cost)
        if kind == "FULL_OBJECT" or (not multipart and not suffix and kind != "COMPOSITE"):
            choices.append((alg.cost, Choice((full,))))
            continue
        count = suffix or (int(etag_parts.group(2)) if etag_parts else 0)
        if not 0 < count <= _MAX_PARTS:
            continue
        composite = Candidate(alg.label, alg.name, digest, count, alg.cost + 1)
        if kind == "COMPOSITE" or suffix:
            choices.append((10 + alg.cost + 1, Choice((composite,))))
        else:  # untyped and unsuffixed on a multipart upload: either reading (moto)
            choices.append((10 + alg.cost + 1, Choice((full, composite))))
    encrypted = headers.get("ServerSideEncryption") in _KMS or bool(headers.get("SSECustomerAlgorithm"))
    if not encrypted and etag_md5 is not None:
        choices.append(
            (
                3,
                Choice(
                    (Candidate("md5", "MD5", bytes.fromhex(etag_md5.group(1))),),
                ),
            )
        )
    if not encrypted and etag_parts is not None and 0 < int(etag_parts.group(2)) <= _MAX_PARTS:
        md5_parts = Candidate("md5-parts", "MD5", bytes.fromhex(etag_parts.group(1)), int(etag_parts.group(2)))
        choices.append((13, Choice((md5_parts,))))
    return [c for _, c in sorted(choices, key=lambda t: t[0])]


def _factory(name: str) -> Callable[[], _Hasher]:
    if name == "MD5":
        return lambda: hashlib.md5(usedforsecurity=False)
    for alg in _known():
        if alg.name == name and alg.factory is not None:
            return alg.factory
    raise ValueError(name)


class _PerPart:
    """Hash each part on its own, then the concatenation of the parts' digests."""

    def __init__(self, factory: Callable[[], _Hasher], sizes: Sequence[int]) -> None:
        self._factory = factory
        self._sizes = iter(sizes)
        self._left = next(self._sizes, 0)
        self._part = factory()
        self._digests: list[bytes] = []

    def update(self, data: bytes | memoryview, /) -> None:
        view = memoryview(data)
        while view:
            n = min(len(view), self._left)
            if n == 0:  # more bytes than the layout holds: cannot match
                self._left = -1
                return
            self._part.update(view[:n])
            view = view[n:]
            self._left -= n
            if self._left == 0:
                self._digests.append(self._part.digest())
                self._part = self._factory()
                self._left = next(self._sizes, 0)

    def digest(self) -> bytes:
        outer = self._factory()
        outer.update(b"".join(self._digests))
        return outer.digest() if self._left == 0 else b""


def _describe(cand: Candidate) -> str:
    if cand.algorithm == "MD5":
        return "multipart ETag (MD5 of the parts' MD5s)" if cand.parts else "ETag (MD5)"
    what = (
        f"composite {cand.algorithm} checksum (of {cand.parts} parts)" if cand.parts else f"{cand.algorithm} checksum"
    )
    return f"{what} stored by S3"


class Mismatch(IntegrityError):
    """The bytes match none of the candidates; ``relayout`` says a true part layout may change that."""

    def __init__(self, message: str, *, relayout: bool) -> None:
        super().__init__(message)
        self.relayout = relayout


class Verifier:
    """Feeds the bytes of one object, in order, to the chosen check.

    Args:
        choice: What to check (``None``: nothing, the file is ``verified=None``).
        layout: The part layout, for per-part candidates.
    """

    def __init__(self, choice: Choice | None, layout: Layout | None = None) -> None:
        self.choice = choice
        self.layout = layout
        self._hashers: list[tuple[Candidate, _Hasher | None]] = []
        for cand in choice.candidates if choice else ():
            if cand.parts:
                if layout is None or len(layout.sizes) != cand.parts:
                    continue
                self._hashers.append((cand, _PerPart(_factory(cand.algorithm), layout.sizes)))
            elif cand.algorithm == "SHA256":
                self._hashers.append((cand, None))  # the manifest's SHA-256 is it
            else:
                self._hashers.append((cand, _factory(cand.algorithm)()))
        self._active = [h for _, h in self._hashers if h is not None]

    @property
    def checks(self) -> bool:
        return bool(self._hashers)

    def update(self, data: bytes | memoryview) -> None:
        for hasher in self._active:
            hasher.update(data)

    def result(self, sha256: bytes, what: str) -> str | None:
        """The ``verified`` label of the candidate that matched; ``None`` if nothing was checked.

        Raises:
            Mismatch: No candidate matched.
        """
        if not self._hashers:
            return None
        for cand, hasher in self._hashers:
            if (sha256 if hasher is None else hasher.digest()) == cand.expected:
                return cand.label
        labels = " or ".join(sorted({_describe(c) for c, _ in self._hashers}))
        relayout = any(c.parts for c, _ in self._hashers) and not (self.layout and self.layout.confirmed)
        raise Mismatch(f"{what}: the bytes received do not match the object's {labels}", relayout=relayout)

    def again(self, layout: Layout) -> Verifier:
        """A fresh verifier for the same choice with the true ``layout``."""
        return Verifier(self.choice, layout)
