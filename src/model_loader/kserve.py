"""The KServe storage-initializer contract: ``<src_uri> <dest_path>`` pairs in, model files out.

KServe injects an init container named ``storage-initializer`` whose arguments are pairs,
``src_uri_0 dest_path_0 [src_uri_1 dest_path_1 ...]`` (``storageUri`` gives one pair with
``/mnt/models``, ``storageUris`` one pair per entry), and starts the model server once it has
exited 0. For each pair, in order, this entry point:

1. fetches ``src_uri`` through :class:`~model_loader.ResilientLoader`: the disk cache
   (``MODEL_LOADER_CACHE_DIR``), retries, the last-known-good copy when the store is down,
   verification, and every other ``MODEL_LOADER_*`` setting;
2. materialises the cached files in ``dest_path``: hard links when the cache is on the same
   filesystem (they share the cache's bytes: read-only by convention), else copies checked
   against the cache's SHA-256s. Files are staged in ``dest_path/.model-loader-staging-*``,
   moved into place, and the marker ``dest_path/.model-loader`` is written last: a
   destination is complete only when its marker says so (KServe's mount point is the
   destination itself, so nothing can be renamed onto it);
3. prints one JSON line: source, dest, version, digest, verified, degraded, method...

A destination may be missing or empty, or hold what this initializer wrote there before: the
same digest is left as it is, another is replaced, an interrupted run is cleaned up. Anything
else in it is refused. No file is ever written outside its destination: paths are checked
when sources list them and again here.

Exit codes: 0 every pair materialised (degraded ones say so, also on stderr); 1 a model could
not be fetched or verified; 2 bad arguments, URI or configuration; 3 the cache is unusable;
4 a destination cannot be used. A failure prints one line on stderr (``--debug``: the
traceback too); ``-v`` logs retries and fallbacks.

Usage::

    python -m model_loader.kserve [-v | --debug] SRC_URI DEST_PATH [SRC_URI DEST_PATH ...]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader import __version__
from model_loader._io import copy_file, fsync_dir, hash_file, safe_relpath, sync_tree
from model_loader._uri import parse_ref
from model_loader.errors import (
    AllSourcesFailedError,
    CacheError,
    IntegrityError,
    InvalidReferenceError,
    ModelLoaderError,
)

if TYPE_CHECKING:
    from model_loader._types import FetchResult, Manifest, ModelRef
    from model_loader.config import LoaderConfig
    from model_loader.loader import ResilientLoader

__all__ = ["MARKER", "DestinationError", "Materialized", "main", "materialize"]

logger = logging.getLogger(__name__)

PROG = "model-loader-storage-initializer"
MARKER = ".model-loader"  # no extension: servers that pick files by suffix (.json, .pkl, .bst) skip it
_STAGING = ".model-loader-staging-"  # staging directories and marker temp files: removed on the next run
_RESERVED = ".model-loader"  # models may not use top-level names starting with this
_FORMAT = 1
_IGNORED = frozenset({"lost+found"})  # the root of a fresh ext4 volume
# What KServe's URIs mean here (a directory, as KServe's s3:// and file:// do). Other registered
# sources (https://, gs://...) differ from KServe's meaning of the same URI, so they are refused.
_SCHEMES = frozenset({"models", "s3", "file"})
SUPPORTED = (
    "models:/<name>@<alias> (or /<version>, /latest), s3://<bucket>/<prefix>/, s3://<bucket>/<key>, "
    "file:///<dir> and local paths"
)
USAGE = f"""usage: {PROG} [-v | --debug] SRC_URI DEST_PATH [SRC_URI DEST_PATH ...]

KServe storage initializer: fetch each SRC_URI through model_loader (cache, retries,
last-known-good, verification) and place its files in DEST_PATH. Sources: {SUPPORTED}.
Configuration: MODEL_LOADER_* variables (MODEL_LOADER_CACHE_DIR: the cache), MLflow's and
AWS's standard variables. Output: one JSON line per pair.

exit codes: 0 done (degraded pairs say so); 1 a model could not be fetched or verified;
2 bad arguments, URI or configuration; 3 cache unusable; 4 a destination cannot be used
"""


class DestinationError(ModelLoaderError, OSError):
    """A destination cannot be used: it holds files this initializer did not write, is not a
    directory, or cannot be written (exit code 4)."""


class _UsageError(Exception):
    """Arguments that cannot be run as given (exit code 2)."""


class _DamagedCache(IntegrityError):
    """A cached file does not match the cache's manifest: the entry is checked in full
    (quarantined) and fetched again, once."""


@dataclass(frozen=True, slots=True)
class Materialized:
    """What :func:`materialize` did.

    Attributes:
        dest: The destination directory.
        method: ``"hardlink"``, ``"copy"``, ``"copy+hardlink"`` or ``"unchanged"`` (the
            destination already held this digest).
        files: Number of files.
        size: Bytes of the files.
    """

    dest: Path
    method: str
    files: int
    size: int


@dataclass(frozen=True, slots=True)
class _Pair:
    src: str
    ref: ModelRef
    dest: Path


# -- the entry point -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the initializer on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Example:
        >>> main(["models:/fraud@champion", "/mnt/models"])  # prints one JSON line
        0
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = False
    pair: _Pair | None = None
    try:
        options, pairs = _parse_arguments(arguments)
        debug = "debug" in options
        if "help" in options:
            print(USAGE, end="")
            return 0
        if "version" in options:
            print(f"{PROG} {__version__}")
            return 0
        _setup_logging(verbose="verbose" in options, debug=debug)
        from model_loader.config import LoaderConfig

        config = LoaderConfig.from_env()
        for pair in _checked_pairs(pairs, config):
            out = _run(pair, config)
            print(json.dumps(out, sort_keys=True), flush=True)
            if out["degraded"]:
                print(
                    f"{PROG}: warning: degraded: served last-known-good {pair.src} version {out['version']} "
                    f"into {pair.dest}",
                    file=sys.stderr,
                    flush=True,
                )
        return 0
    except Exception as exc:  # one line on stderr; the traceback too with --debug
        return _report(exc, pair, debug=debug)


def _parse_arguments(arguments: list[str]) -> tuple[set[str], list[tuple[str, str]]]:
    """Options first (KServe appends the pairs to the container's command), then the pairs."""
    flags = {"-h": "help", "--help": "help", "--version": "version", "-v": "verbose", "--verbose": "verbose"}
    options: set[str] = set()
    i = 0
    while i < len(arguments) and arguments[i].startswith("-"):
        arg = arguments[i]
        i += 1
        if arg == "--":
            break
        if arg == "--debug":
            options.add("debug")
        elif arg in flags:
            options.add(flags[arg])
        else:
            raise _UsageError(f"unknown option {arg!r} (options: -v, --debug, --help, --version)")
    rest = arguments[i:]
    if options & {"help", "version"}:
        return options, []
    if not rest or len(rest) % 2:
        raise _UsageError(
            f"expected SRC_URI DEST_PATH pairs, got {len(rest)} argument(s): "
            f"{PROG} SRC_URI_0 DEST_PATH_0 [SRC_URI_1 DEST_PATH_1 ...]"
        )
    return options, list(zip(rest[::2], rest[1::2], strict=True))


def _checked_pairs(pairs: list[tuple[str, str]], config: LoaderConfig) -> list[_Pair]:
    """Every pair parsed and checked before anything is fetched: bad input costs no download."""
    checked: list[_Pair] = []
    for src, dest in pairs:
        ref = parse_ref(src, check_scheme=False)
        if ref.scheme not in _SCHEMES:
            raise InvalidReferenceError(
                f"unsupported storage URI {src!r}: this initializer fetches {SUPPORTED}; "
                "route other URIs to another ClusterStorageContainer"
            )
        if not dest.strip():
            raise _UsageError(f"the destination of {src!r} is empty")
        path = Path(os.path.abspath(dest))
        if path == Path(path.anchor):
            raise _UsageError(f"the destination of {src!r} cannot be the filesystem root")
        checked.append(_Pair(src, ref, path))
    caches = [Path(os.path.abspath(d)) for d in (config.cache.dir, *config.cache.tiers)]
    for i, pair in enumerate(checked):
        for other in checked[i + 1 :]:
            if _overlap(pair.dest, other.dest):
                raise _UsageError(f"destinations {pair.dest} and {other.dest} overlap: each needs its own directory")
        for cache in caches:
            if _overlap(pair.dest, cache):
                raise _UsageError(
                    f"the cache directory {cache} and the destination {pair.dest} overlap: "
                    "keep MODEL_LOADER_CACHE_DIR (and MODEL_LOADER_CACHE_TIERS) outside every destination"
                )
        if pair.ref.scheme == "file" and _overlap(pair.dest, Path(pair.ref.location)):
            raise _UsageError(f"the source directory {pair.ref.location} and the destination {pair.dest} overlap")
    return checked


def _overlap(a: Path, b: Path) -> bool:
    """One path is the other or contains it (symlinks resolved)."""
    ra, rb = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    return ra == rb or ra in rb.parents or rb in ra.parents


def _run(pair: _Pair, config: LoaderConfig) -> dict[str, Any]:
    try:
        return _run_once(pair, config)
    except _DamagedCache as exc:  # damage heals: a full check quarantines the entry, then it is fetched again
        logger.warning("%s: %s; checking the cache entry in full and fetching again", pair.src, exc)
        full = config.model_copy(update={"cache": config.cache.model_copy(update={"verify": "full"})})
        return _run_once(pair, full)


def _run_once(pair: _Pair, config: LoaderConfig) -> dict[str, Any]:
    from model_loader.loader import ResilientLoader

    with ResilientLoader([pair.ref], config=config) as loader:  # leases the entry until materialised
        result = loader.fetch()
        record = {
            "source": result.source,
            "version": result.version,
            "digest": result.digest,
            "verified": result.verified,
            "degraded": result.degraded,
        }
        files_dir, manifest = _cached(loader, result)
        done = materialize(files_dir, manifest, pair.dest, record=record, verify=config.cache.verify)
    return {
        **record,
        "dest": str(done.dest),
        "method": done.method,
        "files": done.files,
        "size": done.size,
        "from_cache": result.from_cache,
        "offline": result.offline,
        "downloaded": result.downloaded,
        "failures": [{"source": s, "error": _redact(e)} for s, e in result.failures],
    }


def _cached(loader: ResilientLoader, result: FetchResult) -> tuple[Path, Manifest]:
    """The files and verified manifest of the cache entry ``result`` served.

    ``FetchResult`` names the files' directory (``<cache>/entries/<key>/files``) but not the
    manifest, which lists exactly the files to place with their sizes and hashes.
    """
    entry, problem = loader.cache.get(result.path.parent.name)
    if entry is None:
        raise IntegrityError(f"the cache entry of {result.source} version {result.version} is gone: {problem}")
    return entry.path, entry.manifest


# -- materialising one destination ---------------------------------------------------------------


def materialize(
    files_dir: Path, manifest: Manifest, dest: Path, *, record: dict[str, Any], verify: str = "fast"
) -> Materialized:
    """Place the files of ``manifest``, read from ``files_dir``, in ``dest``; the marker last.

    Args:
        files_dir: The cache entry's files.
        manifest: Its verified manifest: the files to place, with sizes and hashes.
        dest: The destination directory (created if missing).
        record: What the marker records besides the files (source, version, digest...).
        verify: ``"full"`` also hashes a destination found complete before keeping it.

    Raises:
        IntegrityError: A path would leave ``dest`` or uses a reserved name, or a cached file is
            not a regular file of its listed size and hash; nothing is left in ``dest``.
        DestinationError: ``dest`` holds files this initializer did not write, or cannot be written.
    """
    for f in manifest.files:
        _check_path(f.path)
    tops = sorted({f.path.split("/", 1)[0] for f in manifest.files})
    with _destination_errors(dest):
        dest.mkdir(parents=True, exist_ok=True)
        complete, digest, owned, leftovers = _inspect(dest)
        same = complete and digest == record["digest"] and owned == set(tops) and not leftovers
        if same and _intact(dest, manifest, verify):
            return Materialized(dest, "unchanged", len(manifest.files), manifest.total_size)
        # From here on every name in dest is the marker, a staging name, or listed in the marker.
        _write_marker(dest, {"complete": False, "entries": sorted(owned | set(tops))})
        for name in sorted(leftovers | owned):
            _remove(dest / name)
        staging = dest / f"{_STAGING}{uuid.uuid4().hex[:16]}"
        try:
            staging.mkdir()
            methods = _fill(files_dir, manifest, staging, dest)
            sync_tree(staging)
            for name in tops:
                os.rename(staging / name, dest / name)
            staging.rmdir()
            fsync_dir(dest)
            files = [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in manifest.files]
            _write_marker(dest, {**record, "complete": True, "entries": tops, "files": files})
        except BaseException:
            for name in [staging.name, *tops, MARKER]:  # dest as it was found, minus what was ours
                with suppress(OSError):
                    _remove(dest / name)
            raise
    return Materialized(dest, "+".join(sorted(methods)), len(manifest.files), manifest.total_size)


def _check_path(path: str) -> None:
    """Defence in depth: sources refuse unsafe paths already; a path is checked once more here."""
    safe_relpath(path)
    if path.split("/", 1)[0].startswith(_RESERVED):
        raise IntegrityError(f"the model has a file {path!r}: names starting with {_RESERVED!r} are reserved")


@contextmanager
def _destination_errors(dest: Path) -> Iterator[None]:
    try:
        yield
    except (DestinationError, IntegrityError):
        raise
    except CacheError as exc:  # a full disk while copying
        raise DestinationError(f"cannot write {dest}: {exc}") from exc
    except OSError as exc:
        raise DestinationError(f"cannot write {dest}: {exc.strerror or exc}") from exc


def _inspect(dest: Path) -> tuple[bool, str | None, set[str], set[str]]:
    """``(complete, digest, owned names, leftover names)`` of what a previous run left in ``dest``.

    Raises:
        DestinationError: ``dest`` holds something this initializer did not write.
    """
    names = set(os.listdir(dest))
    complete, digest, owned = False, None, set[str]()
    if MARKER in names:
        complete, digest, owned = _read_marker(dest / MARKER)
    leftovers = {n for n in names if n.startswith(_STAGING)}
    foreign = sorted(
        n
        for n in names - owned - leftovers - {MARKER}
        if not (n in _IGNORED and os.path.isdir(dest / n) and not os.path.islink(dest / n))
    )
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise DestinationError(
            f"{dest} holds files this initializer did not write ({shown}); refusing to mix them with the model: "
            "empty it or choose another path"
        )
    return complete, digest, owned, leftovers


def _read_marker(path: Path) -> tuple[bool, str | None, set[str]]:
    """The marker parsed, never trusted: it names what may be deleted, so names are checked."""
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("complete"), bool):
            raise ValueError("unknown format")
        entries, digest = data.get("entries"), data.get("digest")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError("'entries' is not a list of names")
        for name in entries:
            if "/" in name or name.startswith(_RESERVED):
                raise ValueError(f"entry {name!r} is not a name in the destination")
            safe_relpath(name)
        if digest is not None and not isinstance(digest, str):
            raise ValueError("'digest' is not a string")
    except (OSError, ValueError, IntegrityError) as exc:
        raise DestinationError(
            f"{path} cannot be read ({exc}): remove it and the files it describes, or choose another path"
        ) from exc
    return data["complete"], digest, set(entries)


def _intact(dest: Path, manifest: Manifest, verify: str) -> bool:
    """Every file present as a regular file of its size (and hash, with ``verify="full"``)."""
    for f in manifest.files:
        target = dest / f.path
        try:
            st = os.lstat(target)
            if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
                return False
            if verify == "full" and f.sha256 is not None and hash_file(target) != f.sha256:
                return False
        except OSError:
            return False
    return True


def _fill(files_dir: Path, manifest: Manifest, staging: Path, dest: Path) -> set[str]:
    """Hard-link each file into ``staging``; copy (and check) once linking is not possible."""
    base = os.path.realpath(staging)
    methods: set[str] = set()
    link = True
    left = manifest.total_size
    for f in manifest.files:
        src = files_dir / f.path
        try:
            st = os.lstat(src)
        except OSError as exc:
            raise _DamagedCache(f"cached file {f.path} is unreadable: {exc.strerror or exc}") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != f.size:
            raise _DamagedCache(f"cached file {f.path} is not a regular file of {f.size} bytes")
        target = staging / f.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.commonpath([base, os.path.realpath(target.parent)]) != base:
            raise IntegrityError(f"{f.path!r} would be written outside {dest}")
        if link:
            try:
                os.link(src, target)
                methods.add("hardlink")
                left -= f.size
                continue
            except OSError:  # another filesystem (EXDEV), protected links, a link count limit...
                link = False
                free = shutil.disk_usage(staging).free
                if free < left:
                    raise DestinationError(f"not enough free space in {dest}: need {left} bytes, {free} free") from None
        size, sha256 = copy_file(src, target)
        if size != f.size or (f.sha256 is not None and sha256 != f.sha256):
            raise _DamagedCache(f"the copy of {f.path} does not match the cache's manifest")
        os.chmod(target, stat.S_IMODE(st.st_mode))
        methods.add("copy")
    return methods


def _write_marker(dest: Path, data: dict[str, Any]) -> None:
    tmp = dest / f"{_STAGING}{uuid.uuid4().hex[:16]}.marker"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": _FORMAT, **data}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest / MARKER)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(dest)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# -- logging and reporting -----------------------------------------------------------------------


def _setup_logging(*, verbose: bool, debug: bool) -> None:
    """Nothing but the outcome by default; model_loader's logs (redacted) with -v or --debug."""
    root = logging.getLogger()
    if not (verbose or debug):
        root.addHandler(logging.NullHandler())  # else Python prints WARNING records itself
        return
    from model_loader._redact import RedactingFilter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("model_loader").setLevel(logging.DEBUG if debug else logging.INFO)


def _redact(text: str) -> str:
    from model_loader._redact import environment_secrets as _environment_secrets
    from model_loader._redact import redact

    return redact(text, _environment_secrets())


def _report(exc: BaseException, pair: _Pair | None, *, debug: bool) -> int:
    code, line = _outcome(exc)
    if pair is not None:
        line = f"{pair.src} -> {pair.dest}: {line}"
    if debug:
        import traceback

        sys.stderr.write(_redact("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))
    print(_redact(f"{PROG}: {line}"), file=sys.stderr, flush=True)
    return code


def _outcome(exc: BaseException) -> tuple[int, str]:
    """The exit code and one line for an error."""
    pydantic_core = sys.modules.get("pydantic_core")
    if pydantic_core is not None and isinstance(exc, pydantic_core.ValidationError):
        from model_loader.config import validation_message

        return 2, f"invalid configuration: {validation_message(exc)}"
    if isinstance(exc, _UsageError | InvalidReferenceError):
        return 2, _first_line(exc)
    if isinstance(exc, AllSourcesFailedError):
        detail = "; ".join(f"{uri}: {type(err).__name__}: {_first_line(err)}" for uri, err in exc.failures)
        return 1, _first_line(exc) + (f": {detail}" if detail else "")
    if isinstance(exc, DestinationError):
        return 4, f"destination unusable: {_first_line(exc)}"
    if isinstance(exc, CacheError):
        return 3, f"cache error: {_first_line(exc)}"
    if isinstance(exc, ModelLoaderError):
        return 1, f"{type(exc).__name__}: {_first_line(exc)}"
    return 1, f"unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
