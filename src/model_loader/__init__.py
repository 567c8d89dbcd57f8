"""model_loader: load ML models at start-up from an MLflow registry, S3 or a directory.

Pinned, cached, verified and resilient. ``import model_loader`` is cheap: it imports no
SDK (mlflow, boto3) and defers pydantic, tenacity and the cache until first use.

Example:
    >>> from model_loader import ResilientLoader
    >>> loader = ResilientLoader(["models:/iris@champion", "s3://models/iris/"])
    >>> model = loader.load()
    >>> loader.last_result.source, loader.last_result.version, loader.last_result.degraded
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from model_loader._deadline import Deadline, FetchContext
from model_loader._types import FetchResult, FileEntry, LoadedModel, Manifest, ModelRef, ResolvedModel, Timings
from model_loader._uri import parse_ref
from model_loader.errors import (
    AccessDeniedError,
    AllSourcesFailedError,
    CacheError,
    DeserializationError,
    IntegrityError,
    InvalidReferenceError,
    InvalidResponseError,
    MissingDependencyError,
    ModelLoaderError,
    ModelNotFoundError,
    ModelNotReadyError,
    SourceError,
    SourceTimeoutError,
    SourceUnavailableError,
    StaleResolutionError,
    UnknownSchemeError,
)
from model_loader.protocol import (
    FetchObserver,
    ModelSource,
    SourceCapabilities,
    SourceSettings,
    SupportsVersionHistory,
)

if TYPE_CHECKING:
    from model_loader.config import CacheConfig, LoaderConfig, RetryPolicy
    from model_loader.loader import ResilientLoader
    from model_loader.metrics import ServingMetrics
    from model_loader.registry import register_source
    from model_loader.serving import ModelGroup, ServedModel, ServingEvent, ServingState

__version__ = "0.1.0"

__all__ = [
    "AccessDeniedError",
    "AllSourcesFailedError",
    "CacheConfig",
    "CacheError",
    "Deadline",
    "DeserializationError",
    "FetchContext",
    "FetchObserver",
    "FetchResult",
    "FileEntry",
    "IntegrityError",
    "InvalidReferenceError",
    "InvalidResponseError",
    "LoadedModel",
    "LoaderConfig",
    "Manifest",
    "MissingDependencyError",
    "ModelGroup",
    "ModelLoaderError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelRef",
    "ModelSource",
    "ResilientLoader",
    "ResolvedModel",
    "RetryPolicy",
    "ServedModel",
    "ServingEvent",
    "ServingMetrics",
    "ServingState",
    "SourceCapabilities",
    "SourceError",
    "SourceSettings",
    "SourceTimeoutError",
    "SourceUnavailableError",
    "StaleResolutionError",
    "SupportsVersionHistory",
    "Timings",
    "UnknownSchemeError",
    "__version__",
    "parse_ref",
    "register_source",
]

_LAZY = {
    "CacheConfig": "model_loader.config",
    "LoaderConfig": "model_loader.config",
    "RetryPolicy": "model_loader.config",
    "ResilientLoader": "model_loader.loader",
    "register_source": "model_loader.registry",
    "ServedModel": "model_loader.serving",
    "ModelGroup": "model_loader.serving",
    "ServingEvent": "model_loader.serving",
    "ServingState": "model_loader.serving",
    "ServingMetrics": "model_loader.metrics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model_loader' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
