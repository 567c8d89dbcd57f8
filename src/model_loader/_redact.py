"""Redaction of credentials in what the command-line tools log and print.

Authorization headers, AWS signing material, presigned URL queries, tokens in JSON/XML,
passwords in URLs, and the values of secret-named environment variables become ``***``.
Used by ``model-loader`` and the KServe storage initializer.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

__all__ = ["RedactingFilter", "environment_secrets", "redact"]

# Names whose values are secrets: headers, query parameters, JSON/XML fields, variables.
_SECRET_NAME = r"[\w.-]*?(?:authorization|token|secret|password|passwd|signature|credential|api[-_]?key|cookie)[\w.-]*"
_REDACTED = "***"


@functools.cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], tuple[tuple[re.Pattern[str], str], ...]]:
    """(a query string, a signing parameter in it, (pattern, replacement)...), compiled on first use."""
    name = _SECRET_NAME
    return (
        re.compile(r"\?([^\s#'\"<>]*)"),
        # a query with a signature or token goes whole (presigned URLs)
        re.compile(rf"(?:^|&){name}=|(?:^|&)(?:sig|se|sp|expires)=", re.I),
        (
            # 'Authorization': b'...'  "X-Amz-Security-Token": "..."  (dict reprs, JSON)
            (re.compile(rf"""(['"]{name}['"]\s*:\s*b?)(['"]).*?\2""", re.I), rf"\1\2{_REDACTED}\2"),
            # <SessionToken>...</SessionToken>  (XML answers, e.g. STS)
            (re.compile(rf"<({name})>[^<]*</\1>", re.I), rf"<\1>{_REDACTED}</\1>"),
            # Authorization: Bearer ...   x-amz-security-token:...   "Signature:\n<hex>" (headers, signing logs)
            (re.compile(rf"(\b{name}[ \t]*:[ \t]*(?:\r?\n)?)[^\r\n]+", re.I), rf"\1{_REDACTED}"),
            # X-Amz-Credential=...  token=...  (query strings, forms, signed headers)
            (re.compile(rf"(\b{name}=)[^&\s'\"<>,]*", re.I), rf"\1{_REDACTED}"),
            # Bearer <token>, Basic <user:password in base64>
            (re.compile(r"\b(Bearer|Basic)\s+[\w.~+/=-]+", re.I), rf"\1 {_REDACTED}"),
            # https://user:password@host
            (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+):[^/\s@'\"]+@", re.I), rf"\1:{_REDACTED}@"),
        ),
    )


def environment_secrets() -> tuple[str, ...]:
    """Values of variables whose names say they are secrets (AWS_SESSION_TOKEN, MLFLOW_TRACKING_TOKEN...)."""
    from urllib.parse import quote

    name = re.compile(rf"^{_SECRET_NAME}$", re.I)
    found: set[str] = set()
    for key, value in os.environ.items():
        if len(value) >= 8 and name.match(key) and not key.endswith(("_FILE", "_PATH", "_DIR", "_URI", "_URL")):
            found.update((value, quote(value, safe="")))
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with credentials, signatures, tokens and presigned URL queries replaced by ``***``.

    Args:
        text: A log message, traceback or error line.
        secrets: Literal values to remove as well (e.g. the environment's tokens).
    """
    for secret in secrets:
        text = text.replace(secret, _REDACTED)
    query, signed, rules = _patterns()

    def whole_query(match: re.Match[str]) -> str:
        return f"?{_REDACTED}" if signed.search(match.group(1)) else match.group(0)

    text = query.sub(whole_query, text)
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter:
    """A logging filter (put it on a handler) that redacts every record it passes.

    The message, its arguments, the exception text and the stack are formatted and redacted
    once, so whatever handler formats the record afterwards never sees a secret.
    """

    def __init__(self) -> None:
        self._secrets = environment_secrets()

    def filter(self, record: logging.LogRecord) -> bool:
        import logging

        record.msg = redact(record.getMessage(), self._secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self._secrets)
        return True
