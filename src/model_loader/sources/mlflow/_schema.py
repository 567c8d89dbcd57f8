"""The declared shape of every MLflow REST answer the source reads, with bounds.

Foreign data is parsed, never trusted: each answer's raw bytes go through one of these
pydantic models (:func:`parse`), so a registry answering ``200 {}``, a version
``"seven"``, a listing entry without a path or a body that is not JSON at all becomes a
:class:`~model_loader.sources.mlflow._errors.MalformedResponse` (mapped to
``InvalidResponseError``), never a bare ``KeyError``. Unknown fields are ignored (newer
servers add some); strings, lists and numbers are bounded.

Imported on the first answer to parse, not with the source (pydantic is not imported by
``import model_loader``); models are built when first used (``defer_build``).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError

from model_loader.sources.mlflow._errors import MalformedResponse

__all__ = [
    "MAX_LISTING_ENTRIES",
    "DownloadUriAnswer",
    "FileInfo",
    "ListingAnswer",
    "LoggedModelAnswer",
    "LoggedModelsAnswer",
    "ModelVersion",
    "ModelVersionAnswer",
    "ModelVersionsAnswer",
    "PresignedAnswer",
    "RunAnswer",
    "parse",
]

MAX_LISTING_ENTRIES = 100_000
"""Entries in one artifact directory listing."""
_MAX_PAGE = 10_000  # versions in one search page (we ask for 100)
_MAX_HEADERS = 64  # headers a presigned URL asks for
_MAX_NUMBER = 2**53  # versions and sizes: beyond this a JSON number is not exact anyway

S = TypeVar("S", bound="_Schema")


def _whole_number(value: Any) -> Any:
    """An int, or a string of decimal digits (MLflow's JSON writes int64 as strings); no bools or floats."""
    if isinstance(value, bool):
        raise ValueError("a whole number, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and 0 < len(value) <= 16 and value.isascii() and value.isdigit():
        return int(value)
    raise ValueError("a whole number (or a string of digits)")


_Number = Annotated[int, BeforeValidator(_whole_number)]
VersionNumber = Annotated[_Number, Field(ge=1, le=_MAX_NUMBER)]
Size = Annotated[_Number, Field(ge=0, le=_MAX_NUMBER)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=1024)]
Text = Annotated[str, StringConstraints(max_length=4096)]
Uri = Annotated[str, StringConstraints(min_length=1, max_length=16384)]


class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, defer_build=True)


class ModelVersion(_Schema):
    """``ModelVersion`` of the registry API (the fields resolving reads)."""

    name: Name
    version: VersionNumber
    status: Text | None = None
    source: Annotated[str, StringConstraints(max_length=16384)] | None = None
    run_id: Text | None = None
    current_stage: Text | None = None


class ModelVersionAnswer(_Schema):
    """``GET registered-models/alias`` and ``GET model-versions/get``."""

    model_version: ModelVersion


class ModelVersionsAnswer(_Schema):
    """``POST registered-models/get-latest-versions`` and ``GET model-versions/search``."""

    model_versions: list[ModelVersion] = Field(default_factory=list, max_length=_MAX_PAGE)
    next_page_token: Text | None = None


class DownloadUriAnswer(_Schema):
    """``GET model-versions/get-download-uri``."""

    artifact_uri: Uri


class _LoggedModelInfo(_Schema):
    model_id: Name
    artifact_uri: Uri
    name: Text | None = None
    source_run_id: Text | None = None
    status: Text | None = None


class _LoggedModel(_Schema):
    info: _LoggedModelInfo


class LoggedModelAnswer(_Schema):
    """``GET logged-models/<id>`` (MLflow 3)."""

    model: _LoggedModel


class LoggedModelsAnswer(_Schema):
    """``POST logged-models/search`` (MLflow 3)."""

    models: list[_LoggedModel] = Field(default_factory=list, max_length=_MAX_PAGE)
    next_page_token: Text | None = None


class _RunInfo(_Schema):
    artifact_uri: Uri
    experiment_id: Text | None = None


class _Run(_Schema):
    info: _RunInfo


class RunAnswer(_Schema):
    """``GET runs/get``."""

    run: _Run


class FileInfo(_Schema):
    """One entry of an ``mlflow-artifacts`` listing."""

    path: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    is_dir: bool = False
    file_size: Size | None = None


class ListingAnswer(_Schema):
    """``GET mlflow-artifacts/artifacts?path=`` (an empty directory may answer ``{}``)."""

    files: list[FileInfo] = Field(default_factory=list, max_length=MAX_LISTING_ENTRIES)


class PresignedAnswer(_Schema):
    """``GET mlflow-artifacts/presigned/<path>`` (MLflow 3)."""

    url: Uri
    headers: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], Text] = Field(
        default_factory=dict, max_length=_MAX_HEADERS
    )


def parse(schema: type[S], body: bytes, what: str) -> S:
    """``body`` (JSON) as ``schema``.

    Raises:
        MalformedResponse: The body is not JSON, or not of that shape. The message names
            the fields at fault, never their values (a presigned answer holds credentials).
    """
    try:
        return schema.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise MalformedResponse(f"{what}: {describe(exc)}") from None


def describe(exc: ValidationError, limit: int = 3) -> str:
    """What is wrong, by location, without the offending input."""
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for err in problems[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "the answer"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(parts) + more
