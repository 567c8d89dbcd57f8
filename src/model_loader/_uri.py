"""Parse model references into :class:`ModelRef`.

Accepted forms::

    models:/name@alias   models:/name/3   models:/name/Production   models:/name/latest
    models:/m-<id>       models:/name/3/sub/path   models:/name@alias/sub/path
    runs:/<run_id>/<path>
    s3://bucket/prefix/  s3://bucket/key[?versionId=...]
    file:///abs/dir      /abs/dir   ./rel/dir   ~/dir

``models:/`` and ``runs:/`` references are read the way MLflow's own client reads them
(``ModelsArtifactRepository.split_models_uri``, then ``_parse_model_uri``;
``RunsArtifactRepository.parse_runs_uri``): trailing slashes are dropped, an empty
authority (``models:///iris/3``) is the same as none, a first segment holding ``@`` is
``name@alias`` split on the last ``@`` and anything after it is a sub-path, otherwise
``name/selector`` and then the sub-path. ``?``, ``#`` and ``%`` are plain characters of
names, aliases and paths (MLflow allows them in model names). Where MLflow reads a form
differently, docs/mlflow.md's parity table says how and why.

``s3://`` keys are literal, as in the AWS CLI and s3fs: ``s3://b/a%20b`` is the key
``a%20b``, ``s3://b//k`` the key ``/k``, ``#`` is part of the key. A ``?`` starts the query
only when a parameter follows it (``?name=``: ``versionId``, ``include`` and ``exclude``
are known, the S3 source refuses any other name); any other ``?`` is part of the key.

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
    "models:/<name>/latest, models:/m-<id> (each optionally followed by /<path inside the model>), "
    "runs:/<run_id>/<path>, s3://<bucket>/<prefix>/, s3://<bucket>/<key>, "
    "file:///<absolute dir> or a plain directory path"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_STAGES = {"none": "None", "staging": "Staging", "production": "Production", "archived": "Archived"}
# MLflow's own rules (mlflow/utils/validation.py): aliases are \w and '-' (Unicode letters
# included), at most 255 characters; run ids start with a letter or digit.
_ALIAS = re.compile(r"^[\w\-]+$")
_ALIAS_MAX = 255
_RUN_ID = re.compile(r"^[a-zA-Z0-9][\w\-]{0,255}$")
_LOGGED_MODEL = re.compile(r"^m-[0-9a-fA-F]+$")
_MAX_VERSION = 2**53  # beyond this a version is not exact in MLflow's JSON either
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_S3_QUERY = re.compile(r"\?(?=[A-Za-z][A-Za-z0-9_.\-]*=)")  # '?name=' starts the query; other '?' are key


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
    if scheme == "runs":
        return _parse_runs(text)
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


# -- MLflow: models:/ and runs:/ -----------------------------------------------------------


def _mlflow_path(uri: str, scheme: str) -> str:
    """What follows ``<scheme>:/`` (an empty authority dropped, trailing slashes dropped).

    Raises:
        InvalidReferenceError: Another shape: no slash, a host, a Databricks profile, a
            control character.
    """
    control = _CONTROL.search(uri)
    if control is not None:
        raise _bad(
            uri,
            f"control character U+{ord(control.group()):04X} at position {control.start()} "
            "(MLflow would silently delete a tab or newline and read another name)",
        )
    rest = uri[len(scheme) + 1 :]
    if rest.startswith("//"):
        netloc, _, path = rest[2:].partition("/")
        if netloc:
            host = netloc.rpartition("@")[2].lower()
            if host == "databricks":
                raise _bad(
                    uri,
                    f"'{scheme}://{netloc}/...' names a Databricks profile in the reference, which this loader does "
                    f"not read: set MLFLOW_REGISTRY_URI (or MLFLOW_TRACKING_URI) to databricks://<profile> and write "
                    f"{scheme}:/{path}",
                )
            raise _bad(
                uri,
                f"'{scheme}://{netloc}/...' reads {netloc!r} as a host: a reference starts with '{scheme}:/' "
                f"(one slash), e.g. {scheme}:/{netloc}/{path}".rstrip("/"),
            )
        rest = "/" + path  # models:///iris/3 is models:/iris/3, as urlparse reads it
    if not rest.startswith("/"):
        raise _bad(uri, f"a reference starts with '{scheme}:/' (one slash)")
    return rest[1:].rstrip("/")


def _parse_models(uri: str) -> ModelRef:
    body = _mlflow_path(uri, "models")
    if not body:
        raise _bad(uri, "it names no model: models:/<name>/<version> or models:/<name>@<alias>")
    first, _, after = body.partition("/")
    if "@" in first:  # MLflow: a first segment with '@' is name@alias; what follows is a sub-path
        name, _, alias = first.rpartition("@")
        _check_model_name(uri, name)
        _check_alias(uri, alias)
        sub = _sub_path(uri, after)
        return ModelRef("models", _models_uri(f"{name}@{alias}", sub), name, alias, "alias", _path_param(sub))
    if not after:
        if _LOGGED_MODEL.match(first):
            return ModelRef("models", f"models:/{first}", first, first, "logged_model")
        if first.isspace():
            raise _bad(uri, "the model name is blank")
        raise _bad(
            uri,
            f"name the version, stage, 'latest' or an alias of {first!r}: models:/{first}/3 or "
            f"models:/{first}@<alias> (a logged model is models:/m-<hex id>)",
        )
    selector, _, rest = after.partition("/")
    name = first
    _check_model_name(uri, name)
    if not selector.strip():
        raise _bad(uri, f"the version, stage or 'latest' after {name!r}/ is empty")
    sub = _sub_path(uri, rest)
    kind: SelectorKind
    if selector.isascii() and selector.isdigit():
        number = int(selector)
        if number < 1:
            raise _bad(uri, "model versions start at 1")
        if number > _MAX_VERSION:
            raise _bad(uri, f"version {selector} is out of range (at most 2**53)")
        selector, kind = str(number), "version"
    elif selector.lower() == "latest":
        selector, kind = "latest", "latest"
    elif (stage := _STAGES.get(selector.lower())) is not None:
        selector, kind = stage, "stage"
    else:
        why = f"{selector!r} is not a version number, 'latest' or a stage ({', '.join(_STAGES.values())})"
        if selector.isdigit():
            why += "; versions are ASCII digits 0-9"
        if "?" in selector or "#" in selector:
            why += "; '?' and '#' are read as part of the reference (registry references take no query)"
        if _LOGGED_MODEL.match(name):
            why += f" (files inside a logged model cannot be named in the reference, as in MLflow: load models:/{name})"
        raise _bad(uri, why)
    return ModelRef("models", _models_uri(f"{name}/{selector}", sub), name, selector, kind, _path_param(sub))


def _models_uri(root: str, sub: str) -> str:
    return f"models:/{root}/{sub}" if sub else f"models:/{root}"


def _path_param(sub: str) -> tuple[tuple[str, str], ...]:
    return (("path", sub),) if sub else ()


def _check_model_name(uri: str, name: str) -> None:
    if not name.strip():
        raise _bad(uri, f"model name {name!r} is empty or blank")
    if name in (".", ".."):
        raise _bad(uri, f"model name {name!r} is not a name")


def _check_alias(uri: str, alias: str) -> None:
    if not alias:
        raise _bad(uri, "the alias after '@' is empty")
    if not _ALIAS.match(alias):
        hint = " ('?' and '#' are read as part of the alias: registry references take no query)" if "?" in alias else ""
        raise _bad(uri, f"alias {alias!r} must be letters, digits, '_' or '-' (MLflow's rule){hint}")
    if len(alias) > _ALIAS_MAX:
        raise _bad(uri, f"an alias has at most {_ALIAS_MAX} characters, not {len(alias)}")


def _sub_path(uri: str, sub: str) -> str:
    """A path inside the model: non-empty segments, no ``.`` or ``..``."""
    if not sub:
        return ""
    for segment in sub.split("/"):
        if segment in ("", ".", ".."):
            shown = "an empty segment ('//')" if not segment else f"a {segment!r} segment"
            raise _bad(uri, f"the path inside the model {sub!r} has {shown}")
    return sub


def _parse_runs(uri: str) -> ModelRef:
    body = _mlflow_path(uri, "runs")
    run_id, _, path = body.partition("/")
    if not run_id:
        raise _bad(uri, "no run id: runs:/<run_id>/<path inside the run's artifacts>")
    if not _RUN_ID.match(run_id):
        raise _bad(uri, f"run id {run_id!r} must start with a letter or digit and hold only letters, digits, '_', '-'")
    path = _sub_path(uri, path)
    canonical = f"runs:/{run_id}/{path}" if path else f"runs:/{run_id}"
    return ModelRef("runs", canonical, run_id, None, "none", _path_param(path))


# -- S3 --------------------------------------------------------------------------------------


def _parse_s3(uri: str) -> ModelRef:
    rest = uri[len("s3:") :]
    if not rest.startswith("//"):
        raise _bad(uri, "no bucket: use s3://<bucket>/<prefix>")
    after = rest[2:]
    found = _S3_QUERY.search(after)
    location, query = (after[: found.start()], after[found.end() :]) if found else (after, "")
    bucket, _, key = location.partition("/")
    if not bucket:
        raise _bad(uri, "no bucket: use s3://<bucket>/<prefix>")
    if not _BUCKET.match(bucket) or ".." in bucket:
        malformed = "malformed URL: " if "[" in bucket or "]" in bucket else ""
        raise _bad(uri, f"{malformed}{bucket!r} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')")
    params = dict(parse_qsl(query, keep_blank_values=True))
    version_id = params.pop("versionId", None)
    if version_id is not None and (not version_id or not key or key.endswith("/")):
        raise _bad(uri, "versionId pins a single object: s3://<bucket>/<key>?versionId=<id>")
    extra = tuple(sorted(params.items()))
    canonical = f"s3://{bucket}/{key}"
    parts = [f"versionId={_query_part(version_id)}"] if version_id else []
    parts += [f"{_query_part(k)}={_query_part(v)}" for k, v in extra]
    if parts:
        canonical += "?" + "&".join(parts)
    kind: SelectorKind = "version_id" if version_id else "none"
    return ModelRef("s3", canonical, f"{bucket}/{key}", version_id, kind, extra)


def _query_part(text: str) -> str:
    # Encode what parse_qsl would read differently ('+', '&', '=', '%', spaces, '#'); keep the rest.
    return quote(text, safe="/:@!$'()*,;~")


# -- local and plug-in -----------------------------------------------------------------------


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
