"""Parse model references into :class:`ModelRef`.

Accepted forms::

    models:/name@alias   models:/name/3   models:/name/Production   models:/name/latest
    models:/m-<id>       s3://bucket/prefix/   s3://bucket/key[?versionId=...]
    file:///abs/dir      /abs/dir   ./rel/dir   ~/dir

Any other ``scheme:...`` is handed to the source registered for that scheme.
"""

from __future__ import annotations

import os
import re
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit

from model_loader._types import ModelRef, SelectorKind
from model_loader.errors import InvalidReferenceError, UnknownSchemeError

__all__ = ["ACCEPTED_FORMS", "parse_ref"]

ACCEPTED_FORMS = (
    "models:/<name>@<alias>, models:/<name>/<version>, models:/<name>/<stage>, "
    "models:/<name>/latest, models:/m-<id>, s3://<bucket>/<prefix>/, s3://<bucket>/<key>, "
    "file:///<absolute dir> or a plain directory path"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_STAGES = {"none": "None", "staging": "Staging", "production": "Production", "archived": "Archived"}
_MODEL_NAME = re.compile(r"^[^/@\s][^/@]*$")
_ALIAS = re.compile(r"^[A-Za-z0-9_\-]+$")
_LOGGED_MODEL = re.compile(r"^m-[0-9a-fA-F]+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def parse_ref(uri: str | os.PathLike[str], *, check_scheme: bool = True) -> ModelRef:
    """Parse a model reference.

    Args:
        uri: A URI (``models:/iris@champion``, ``s3://b/p/``, ``file:///d``) or a path.
        check_scheme: Require a registered source for other schemes (off when the caller
            brings its own source instance).

    Returns:
        The parsed reference, with a canonical ``uri``.

    Raises:
        InvalidReferenceError: The reference is malformed; the message says what is accepted.
        UnknownSchemeError: No source is registered for the scheme.

    Example:
        >>> parse_ref("models:/iris@champion").selector
        'champion'
    """
    raw = os.fspath(uri)
    if not isinstance(raw, str):
        raise TypeError(f"a model reference is a str or an os.PathLike[str], not {type(raw).__name__}")
    text = raw.strip()
    if not text:
        raise InvalidReferenceError(f"empty model reference; accepted: {ACCEPTED_FORMS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # surrogate escapes: a path or argument that was not UTF-8
        raise _bad(text, _not_utf8(text, exc.start)) from None
    try:
        return _parse(text, check_scheme)
    except InvalidReferenceError:
        raise
    except ValueError as exc:  # urlsplit, int(), codecs: whatever slipped past the checks (UnicodeError too)
        raise _bad(text, f"it cannot be parsed: {exc}") from exc


def _parse(text: str, check_scheme: bool) -> ModelRef:
    match = _SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter
        return _parse_path(text)
    scheme = match.group(1).lower()
    if scheme == "models":
        return _parse_models(text)
    if scheme == "s3":
        return _parse_s3(text)
    if scheme == "file":
        return _parse_file(text)
    return _parse_plugin(scheme, text, check_scheme)


def _not_utf8(text: str, index: int) -> str:
    char = ord(text[index])
    if 0xDC80 <= char <= 0xDCFF:  # how Python carries an undecodable byte from argv or a path
        return f"byte 0x{char - 0xDC00:02x} at position {index} is not valid UTF-8 (references must be UTF-8 text)"
    return f"lone surrogate U+{char:04X} at position {index} is not valid UTF-8 (references must be UTF-8 text)"


def _split_url(uri: str) -> SplitResult:
    try:
        return urlsplit(uri)
    except ValueError as exc:  # "Invalid IPv6 URL": an unbalanced '[' or ']' in the host
        raise _bad(uri, f"malformed URL ({exc}): '[' and ']' may only enclose an IPv6 host") from exc


def _bad(uri: str, why: str) -> InvalidReferenceError:
    return InvalidReferenceError(f"invalid model reference {uri!r}: {why}; accepted: {ACCEPTED_FORMS}")


def _parse_models(uri: str) -> ModelRef:
    rest = uri[len("models:") :]
    if not rest.startswith("/") or rest.startswith("//"):
        raise _bad(uri, "a registry reference starts with 'models:/' (one slash)")
    body = rest[1:]
    if "?" in body or "#" in body:
        raise _bad(uri, "registry references take no query or fragment")
    if "@" in body:
        name, _, alias = body.partition("@")
        _check_model_name(uri, name)
        if not _ALIAS.match(alias):
            raise _bad(uri, f"alias {alias!r} must be letters, digits, '_' or '-'")
        return ModelRef("models", f"models:/{name}@{alias}", name, alias, "alias")
    if "/" not in body:
        if _LOGGED_MODEL.match(body):
            return ModelRef("models", f"models:/{body}", body, body, "logged_model")
        raise _bad(uri, "name the version, stage, 'latest' or an alias: models:/name/3 or models:/name@alias")
    name, _, selector = body.rpartition("/")
    _check_model_name(uri, name)
    if not selector:
        raise _bad(uri, "the version, stage or 'latest' after the last '/' is empty")
    if selector.isascii() and selector.isdigit():
        if int(selector) < 1:
            raise _bad(uri, "model versions start at 1")
        return ModelRef("models", f"models:/{name}/{int(selector)}", name, str(int(selector)), "version")
    if selector.lower() == "latest":
        return ModelRef("models", f"models:/{name}/latest", name, "latest", "latest")
    stage = _STAGES.get(selector.lower())
    if stage is None:
        raise _bad(
            uri,
            f"{selector!r} is not a version number, 'latest' or a stage ({', '.join(_STAGES.values())})",
        )
    return ModelRef("models", f"models:/{name}/{stage}", name, stage, "stage")


def _check_model_name(uri: str, name: str) -> None:
    if not name or not _MODEL_NAME.match(name):
        raise _bad(uri, f"model name {name!r} is empty or contains '/', '@' or leading space")


def _parse_s3(uri: str) -> ModelRef:
    parts = _split_url(uri)
    bucket = parts.netloc
    if not bucket:
        raise _bad(uri, "no bucket: use s3://<bucket>/<prefix>")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise _bad(uri, f"{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
    if parts.fragment:
        raise _bad(uri, "S3 references take no fragment")
    key = unquote(parts.path.lstrip("/"))
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    version_id = params.pop("versionId", None)
    if version_id is not None and (not version_id or not key or key.endswith("/")):
        raise _bad(uri, "versionId pins a single object: s3://<bucket>/<key>?versionId=<id>")
    extra = tuple(sorted(params.items()))
    path = quote(key, safe="/~!$&()*+,;=:@-._")
    if key.startswith("/"):  # a key that itself starts with '/': not the separator, so it round-trips
        path = "%2F" + path[1:]
    canonical = f"s3://{bucket}/{path}"
    query = [f"versionId={_query_part(version_id)}"] if version_id else []
    query += [f"{_query_part(k)}={_query_part(v)}" for k, v in extra]
    if query:
        canonical += "?" + "&".join(query)
    kind: SelectorKind = "version_id" if version_id else "none"
    return ModelRef("s3", canonical, f"{bucket}/{key}", version_id, kind, extra)


def _query_part(text: str) -> str:
    # Encode what parse_qsl would read differently ('+', '&', '=', '%', spaces); keep the rest.
    return quote(text, safe="/:@!$'()*,;~")


def _parse_file(uri: str) -> ModelRef:
    parts = _split_url(uri)
    if parts.netloc not in ("", "localhost"):
        raise _bad(uri, f"file references are local: host {parts.netloc!r} is not allowed (file:///abs/dir)")
    if parts.query or parts.fragment:
        raise _bad(uri, "file references take no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise _bad(uri, "file references need an absolute path: file:///abs/dir")
    return _parse_path(path)


def _parse_path(text: str) -> ModelRef:
    if "\0" in text:
        raise _bad(text, "a path cannot contain a NUL byte")
    path = os.path.abspath(os.path.expanduser(text))
    return ModelRef("file", "file://" + quote(path), path)


def _parse_plugin(scheme: str, uri: str, check_scheme: bool) -> ModelRef:
    from model_loader.registry import known_schemes  # lazy: entry points are read on demand

    if check_scheme and scheme not in (schemes := known_schemes()):
        raise UnknownSchemeError(
            f"no source for scheme {scheme!r} in {uri!r}; known schemes: {', '.join(sorted(schemes))} "
            "(third-party sources register in the 'model_loader.sources' entry-point group)"
        )
    parts = _split_url(uri)
    location = (parts.netloc + parts.path) if parts.netloc else parts.path
    params = tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return ModelRef(scheme, uri, location, None, "none", params)
