"""Source identities (what cache entries and last-known-good pointers key on), and what a
cache holds for a reference when the identity looked for is not there.

An identity normalises what names the same server in every client: the scheme and host
in lower case, a default port dropped (``:80`` for http, ``:443`` for https), no user
info, query or fragment, no trailing slash. It does not merge names that may mean other
servers: ``localhost`` and ``127.0.0.1`` stay distinct (a name can resolve to another
address, or to IPv6 first), and so does the case of a path.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from model_loader._types import ModelRef

__all__ = ["describe_cached", "normalise_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_LIST_AT_MOST = 8


def normalise_url(url: str) -> str:
    """``url`` as a credential-free identity: ``HTTP://Mlflow.Internal:80/x/`` -> ``http://mlflow.internal/x``.

    Only ``http``/``https`` hosts are case-folded and lose their default port; other URIs
    (``sqlite:///Path``, ``databricks://Profile``) keep their case but lose user info,
    query, fragment and trailing slashes.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme:
        return url.rstrip("/") or url
    scheme = parts.scheme.lower()
    netloc = parts.netloc.rpartition("@")[2]
    if scheme in _DEFAULT_PORTS and parts.hostname:
        host = parts.hostname  # lower case, brackets removed
        shown = f"[{host}]" if ":" in host else host
        try:
            port = parts.port
        except ValueError:  # not a port number: keep it as written, so it stays distinct
            netloc = netloc.lower()
        else:
            netloc = shown if port in (None, _DEFAULT_PORTS[scheme]) else f"{shown}:{port}"
    path = parts.path.rstrip("/")
    has_authority = url[len(parts.scheme) + 1 :].startswith("//")
    return f"{scheme}://{netloc}{path}" if has_authority else f"{scheme}:{path}"


def describe_cached(cache_roots: Path | Iterable[Path], ref: ModelRef, identity: str | None = None) -> str:
    """What the cache holds for ``ref``'s model under any source identity, as one sentence.

    For the message of an offline or last-known-good miss: it names the identity looked
    for and lists the last-known-good pointers recorded for the same model name (an
    MLflow model's name, an S3 prefix, a directory), so a cache filled through another
    spelling of the server (``localhost`` vs ``127.0.0.1``) shows up as such.

    Args:
        cache_roots: The cache root, or each tier's root.
        ref: The reference looked up.
        identity: The source identity looked for.
    """
    from model_loader._refs import RefStore
    from model_loader._uri import parse_ref

    roots = [cache_roots] if isinstance(cache_roots, Path) else list(cache_roots)
    found: list[str] = []
    other_identity = False
    for root in roots:
        for record in RefStore(Path(root) / "refs", writable=False).all():
            try:
                cached = parse_ref(record.ref, check_scheme=False)
            except ValueError:
                continue
            if cached.scheme != ref.scheme or cached.location != ref.location:
                continue
            line = f"{record.ref} from {record.identity} -> version {record.version}"
            if line not in found:
                found.append(line)
            other_identity = other_identity or (identity is not None and record.identity != identity)
    looked = f" (looked for source {identity})" if identity else ""
    what = _what(ref)
    if not found:
        return f"the cache holds nothing for {what}{looked}"
    shown = "; ".join(found[:_LIST_AT_MOST]) + (
        f"; and {len(found) - _LIST_AT_MOST} more" if len(found) > _LIST_AT_MOST else ""
    )
    hint = (
        " (another source identity: the tracking URI or endpoint must be spelled as when the cache was filled, "
        "e.g. localhost and 127.0.0.1 are different servers)"
        if other_identity
        else ""
    )
    return f"the cache holds for {what}{looked}: {shown}{hint}"


def _what(ref: ModelRef) -> str:
    if ref.scheme == "models":
        return f"model {ref.location!r}"
    if ref.scheme == "runs":
        return f"run {ref.location!r}"
    return f"{ref.scheme} location {ref.location!r}"
