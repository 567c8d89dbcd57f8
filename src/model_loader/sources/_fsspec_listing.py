"""Walking an fsspec directory, bounded: depth, entry count, cycles, paths that escape.

The walk lists one directory per call (each capped by the deadline) instead of calling
``fs.find``: an HTTP index page can link in circles, and a listing that never ends must
end here as an ``InvalidResponseError`` rather than fill memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from model_loader._io import is_selected, safe_relpath
from model_loader.errors import IntegrityError, InvalidResponseError
from model_loader.sources._fsspec_backends import parse_entry

__all__ = ["MAX_DEPTH", "MAX_DIRECTORIES", "MAX_FILES", "Listed", "walk"]

MAX_FILES = 100_000
"""Files one model may have; a longer listing is refused (a tree that is not a model)."""
MAX_DIRECTORIES = 10_000
MAX_DEPTH = 64
_NAME_MAX = 255  # bytes in one path component on every common filesystem


@dataclass(frozen=True, slots=True)
class Listed:
    """One file found under the model's root."""

    rel: str  # relative POSIX path in the model directory (validated)
    name: str  # the backend's path or URL
    size: int | None
    entry: dict[str, Any]  # the listing entry (parsed fields validated; the rest read by the dialect)


def walk(
    ls: Callable[[str], object],
    root: str,
    *,
    urls: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    what: str,
) -> tuple[list[Listed], int]:
    """Every selected file under the directory ``root``, and how many files were listed.

    Args:
        ls: Lists one directory (``fs.ls(path, detail=True)``, capped by the deadline).
        root: The directory, as the backend names it.
        urls: Names are URLs (HTTP): links outside the directory, with a query or a
            fragment, or to the directory itself are navigation and skipped; path
            segments are percent-decoded.
        include, exclude: Globs on the relative path.
        what: Named in errors.

    Raises:
        IntegrityError: A name would escape the directory or is malformed (``..``,
            ``.``, ``//``, backslashes), a component is too long, or a path is both a
            file and a directory.
        InvalidResponseError: The listing is malformed, too long, too deep or loops.
    """
    sep = "/"
    base = root if root.endswith(sep) else root + sep
    pending: list[tuple[str, str]] = [(root, "")]
    seen = {root.rstrip(sep)}
    found: dict[str, Listed] = {}
    dirs: set[str] = set()
    listed = 0
    while pending:
        directory, prefix = pending.pop()
        if len(seen) > MAX_DIRECTORIES:
            raise InvalidResponseError(f"{what}: more than {MAX_DIRECTORIES} directories; not a model")
        raw = ls(directory)
        if not isinstance(raw, list):
            raise InvalidResponseError(f"{what}: listing {directory!r} gave a {type(raw).__name__}, not a list")
        here = directory if directory.endswith(sep) else directory + sep
        for item in raw:
            name, kind, size, entry = parse_entry(item, what)
            if kind == "file" and name.endswith(sep) and not size:
                continue  # a "folder" marker object some tools and consoles write
            child = _child(name, here, urls, what)
            if child is None:
                continue
            rel = prefix + child
            if kind == "directory":
                key = name.rstrip(sep)
                if key in seen:
                    if urls:
                        continue  # an index page linking back up or across
                    raise InvalidResponseError(f"{what}: the listing loops at {name!r}")
                _check(rel, base, name)
                if rel.count(sep) + 1 > MAX_DEPTH:
                    raise InvalidResponseError(f"{what}: deeper than {MAX_DEPTH} directories at {rel!r}")
                seen.add(key)
                dirs.add(rel)
                pending.append((name, rel + sep))
                continue
            if kind != "file":
                continue  # links, sockets, "other" entries some backends list
            listed += 1
            if listed > MAX_FILES:
                raise InvalidResponseError(f"{what}: more than {MAX_FILES} files; not a model directory")
            if not is_selected(rel, include, exclude):
                continue
            _check(rel, base, name)
            if rel in found and found[rel].name != name:
                raise IntegrityError(f"{what}: two objects would be written to {rel!r}: {found[rel].name} and {name}")
            found[rel] = Listed(rel, name, size, entry)
    for rel in found:
        if rel in dirs:
            raise IntegrityError(f"{what}: {rel!r} is both a file and a directory")
        parts = rel.split(sep)
        for i in range(1, len(parts)):
            if sep.join(parts[:i]) in found:
                raise IntegrityError(f"{what}: {sep.join(parts[:i])!r} is both a file and a directory")
    return sorted(found.values(), key=lambda f: f.rel), listed


def _child(name: str, here: str, urls: bool, what: str) -> str | None:
    """The name of ``name`` relative to the directory ``here`` (None: skip it)."""
    if not name.startswith(here):
        if urls:
            return None  # a link elsewhere: navigation, not a file of the model
        raise InvalidResponseError(f"{what}: listing {here!r} returned {name!r}, which is not inside it")
    rest = name[len(here) :].rstrip("/")
    if not rest:
        return None  # the directory itself
    if not urls:
        return rest
    if "?" in rest or "#" in rest or rest == ".":
        return None  # the directory itself, sorting links ("?C=N;O=D"), anchors
    parts = []
    for segment in rest.split("/"):
        decoded = unquote(segment)
        if "/" in decoded:
            raise IntegrityError(f"{what}: link {name!r} hides a '/' in one path segment ({segment!r})")
        parts.append(decoded)
    return "/".join(parts)


def _check(rel: str, base: str, name: str) -> None:
    try:
        safe_relpath(rel)
    except IntegrityError as exc:
        raise IntegrityError(
            f"refusing {name!r} under {base!r}: it would be written to {rel!r}, which escapes the model directory "
            "or is malformed ('..', '.', '//', '\\', absolute)"
        ) from exc
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in rel.split("/"))
    if longest > _NAME_MAX:
        raise IntegrityError(f"refusing {name!r}: a path component of {longest} bytes; filesystems allow {_NAME_MAX}")
