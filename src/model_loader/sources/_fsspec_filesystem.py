"""Building fsspec filesystems for the source: class lookup, the loader's timeouts as
storage options, a credential-free identity, closing sessions, and the one backend call
fsspec has no API for (a Hugging Face revision's commit)."""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from model_loader._deadline import Deadline
from model_loader.errors import InvalidReferenceError, InvalidResponseError, MissingDependencyError
from model_loader.sources._fsspec_errors import map_errors, redact

__all__ = [
    "close_filesystem",
    "filesystem_class",
    "hf_commit",
    "identity",
    "missing_dependency",
    "protocols_of",
    "storage_defaults",
]

logger = logging.getLogger("model_loader.sources.fsspec")

_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub"}
_PACKAGES.update({"sftp": "paramiko", "http": "aiohttp", "https": "aiohttp"})


def storage_defaults(
    family: str, protocols: tuple[str, ...], options: Mapping[str, Any], connect_timeout: float, read_timeout: float
) -> dict[str, Any]:
    """``options`` plus: our own instance (fsspec caches them), no listing cache (a
    resolve must see the store as it is now), and the loader's timeouts where the
    backend takes them. What the caller set wins."""
    out = {"skip_instance_cache": True, "use_listings_cache": False, **options}
    if family == "http":
        import aiohttp

        client = dict(out.get("client_kwargs") or {})
        timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        client.setdefault("timeout", timeout)
        out["client_kwargs"] = client
    elif family == "gcs":
        out.setdefault("requests_timeout", read_timeout)
    elif family == "azure":
        out.setdefault("connection_timeout", max(1, round(connect_timeout)))
        out.setdefault("read_timeout", max(1, round(read_timeout)))
    elif "sftp" in protocols:
        out.setdefault("timeout", connect_timeout)
    return out


def hf_commit(fs: Any, url: str, scheme: str, ref: str, deadline: Deadline, read_timeout: float) -> tuple[str, str]:
    """Hugging Face: ``url`` with its revision (branch, tag) replaced by the commit it
    points at, and that commit."""
    # huggingface_hub is there: fsspec imported it to build the filesystem
    hub: Any = importlib.import_module("huggingface_hub")
    hf_paths: Any = importlib.import_module("huggingface_hub.hf_file_system")
    what = f"resolving the revision of {redact(url)}"
    with map_errors(what, scheme, ref, deadline):
        path = fs.resolve_path(url)
        api = hub.HfApi(endpoint=getattr(fs, "endpoint", None), token=getattr(fs, "token", None))
        info = api.repo_info(
            path.repo_id,
            revision=path.revision,
            repo_type=path.repo_type,
            timeout=deadline.timeout(read_timeout, what=what),
        )
    commit = getattr(info, "sha", None)
    if not isinstance(commit, str) or len(commit) != 40 or not all(c in "0123456789abcdef" for c in commit):
        raise InvalidResponseError(f"{what}: no commit sha in the answer", scheme=scheme, ref=ref)
    pinned = hf_paths.HfFileSystemResolvedRepositoryPath(path.repo_type, path.repo_id, commit, path.path_in_repo)
    tail = "/" if url.endswith("/") else ""
    return f"hf://{pinned.unresolve()}{tail}", commit


def protocols_of(fs_class: Any) -> tuple[str, ...]:
    raw = getattr(fs_class, "protocol", ())
    protocols = (raw,) if isinstance(raw, str) else tuple(raw)
    return tuple(p.lower() for p in protocols if isinstance(p, str)) or ("fsspec",)


def filesystem_class(protocol: str) -> Any:
    try:
        import fsspec  # type: ignore[import-untyped]

        return fsspec.get_filesystem_class(protocol)
    except ImportError as exc:
        raise missing_dependency(protocol, exc) from exc
    except ValueError as exc:
        raise InvalidReferenceError(f"fsspec knows no protocol {protocol!r}: {exc}") from exc


def missing_dependency(protocol: str, exc: ImportError) -> MissingDependencyError:
    package = _PACKAGES.get(protocol)
    hint = f"pip install 'model-loader[fsspec]' {package}" if package else "pip install 'model-loader[fsspec]'"
    return MissingDependencyError(
        f"the {protocol}:// source cannot be built: {exc}; install it with: {hint}", extra="fsspec"
    )


def identity(protocol: str, family: str, options: Mapping[str, Any]) -> str:
    """``fsspec+<protocol>[+<endpoint or account>]``: no credentials, no network."""
    where: object = None
    if family == "gcs":
        where = options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
    elif family == "azure":
        where = options.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        text = options.get("connection_string")
        if not where and isinstance(text, str):
            fields = dict(p.partition("=")[::2] for p in text.split(";") if "=" in p)
            where = fields.get("AccountName") or fields.get("BlobEndpoint")
    elif family == "hf":
        where = options.get("endpoint") or os.environ.get("HF_ENDPOINT")
    else:
        client = options.get("client_kwargs")
        where = options.get("endpoint_url") or (client.get("endpoint_url") if isinstance(client, Mapping) else None)
    if not isinstance(where, str) or not where:
        return f"fsspec+{protocol}"
    parts = urlsplit(where if "://" in where else f"//{where}")
    host = (parts.hostname or "").lower()
    netloc = host + (f":{parts.port}" if parts.port else "")
    scheme = f"{parts.scheme}://" if parts.scheme else ""
    return f"fsspec+{protocol}+{scheme}{netloc}{parts.path.rstrip('/')}"


def close_filesystem(fs: Any) -> None:
    """Close an aiohttp session the filesystem opened (HTTP, gcsfs); others hold none."""
    session = getattr(fs, "_session", None)  # no public close in fsspec; the session is the resource
    closer = getattr(fs, "close_session", None)
    if session is None or closer is None:
        return
    try:
        closer(getattr(fs, "loop", None), session)
    except Exception as exc:  # closing is best effort: the process may be shutting down
        logger.debug("closing %s's session failed: %s", type(fs).__name__, redact(str(exc)))
