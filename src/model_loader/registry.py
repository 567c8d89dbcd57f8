"""Scheme -> source class registry.

Sources are found through the ``model_loader.sources`` entry-point group
(``scheme = "pkg.module:Class"``); the built-ins are declared there too and also listed
here so a source checkout works uninstalled. Only the requested scheme's module is imported.

The rule for looking a scheme up, cheapest first:

1. a scheme passed to :func:`register_source` (which is how a built-in is replaced:
   ``clobber=True``);
2. a built-in scheme (``file``, ``s3``, ``models``, ``runs``): no entry points are read, which keeps
   ``model-loader fetch`` fast; an entry point naming a built-in scheme is ignored, with a
   WARNING when discovery runs;
3. any other scheme: the entry points are read once (on that first lookup, never at import).

Sources that hold references to other stores (an MLflow version whose artifacts are in
``s3://`` or ``gs://``) build the source for that store with :func:`create_artifact_source`,
so any scheme with a registered source works as an artifact store.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

from model_loader._types import ModelRef
from model_loader.errors import MissingDependencyError, UnknownSchemeError
from model_loader.protocol import ModelSource, SourceSettings

__all__ = ["create_artifact_source", "create_source", "get_source_class", "known_schemes", "register_source"]

ENTRY_POINT_GROUP = "model_loader.sources"

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Entry:
    target: str | type  # "pkg.module:Class" or the class itself
    install_hint: str | None = None


_BUILTINS: dict[str, _Entry] = {
    "file": _Entry("model_loader.sources.local:LocalSource"),
    "s3": _Entry("model_loader.sources.s3:S3Source", "pip install 'model-loader[s3]'"),
    "models": _Entry(
        "model_loader.sources.mlflow:MlflowRegistrySource",
        "pip install 'model-loader[mlflow]' (needed only for non-HTTP tracking URIs)",
    ),
    "runs": _Entry(
        "model_loader.sources.mlflow:MlflowRunsSource",
        "pip install 'model-loader[mlflow]' (needed only for non-HTTP tracking URIs)",
    ),
}

_lock = threading.Lock()
_registry: dict[str, _Entry] = {}
_discovered = False


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    from importlib.metadata import entry_points

    with _lock:
        if _discovered:
            return
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            scheme = ep.name.lower()
            builtin = _BUILTINS.get(scheme)
            if builtin is not None:
                if builtin.target != ep.value:
                    logger.warning(
                        "entry point %s = %s ignored: %r is a built-in scheme; replace it with "
                        "register_source(%r, ..., clobber=True)",
                        ep.name,
                        ep.value,
                        scheme,
                        scheme,
                    )
                continue
            _registry.setdefault(scheme, _Entry(ep.value))
        _discovered = True


def register_source(scheme: str, target: str | type, *, install_hint: str | None = None, clobber: bool = False) -> None:
    """Register a source class for ``scheme``.

    Args:
        scheme: The URI scheme, lower case.
        target: The class, or ``"pkg.module:Class"`` to import on first use.
        install_hint: What to install when the import fails.
        clobber: Replace an existing registration instead of raising ``ValueError``.

    Example:
        >>> register_source("gs", "my_pkg.gcs:GcsSource", install_hint="pip install my-pkg")
    """
    scheme = scheme.lower()
    with _lock:
        if not clobber and (scheme in _registry or scheme in _BUILTINS):
            raise ValueError(f"a source is already registered for {scheme!r}; pass clobber=True to replace it")
        _registry[scheme] = _Entry(target, install_hint)


def known_schemes() -> set[str]:
    """Every scheme with a registered source (built-in, entry point or registered)."""
    _discover()
    return set(_BUILTINS) | set(_registry)


def get_source_class(scheme: str) -> type:
    """The source class for ``scheme``, importing its module now.

    Raises:
        UnknownSchemeError: Nothing is registered for the scheme.
        MissingDependencyError: The module (or an SDK it needs) cannot be imported.
    """
    scheme = scheme.lower()
    entry = _registry.get(scheme) or _BUILTINS.get(scheme)
    if entry is None:
        _discover()
        entry = _registry.get(scheme)
    if entry is None:
        raise UnknownSchemeError(
            f"no source registered for scheme {scheme!r}; known: {', '.join(sorted(known_schemes()))}"
        )
    if isinstance(entry.target, type):
        return entry.target
    module_name, _, attr = entry.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f"; install it with: {entry.install_hint}" if entry.install_hint else ""
        raise MissingDependencyError(
            f"the source for {scheme!r} ({entry.target}) cannot be imported: {exc}{hint}",
            extra=entry.install_hint,
        ) from exc
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise MissingDependencyError(f"entry point for {scheme!r} names {entry.target}, which is not a class")
    return cls


def create_source(ref: ModelRef, settings: SourceSettings | None = None) -> ModelSource:
    """Build the source for ``ref``'s scheme from ``settings``.

    Uses the class's ``from_settings(settings)`` classmethod when it has one.
    """
    cls = get_source_class(ref.scheme)
    settings = settings or SourceSettings()
    factory = getattr(cls, "from_settings", None)
    source = factory(settings) if factory is not None else cls()
    if not isinstance(source, ModelSource):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} does not implement the ModelSource protocol")
    return source


def create_artifact_source(scheme: str, settings: SourceSettings | None = None, **options: Any) -> ModelSource:
    """Build the source registered for ``scheme`` to read another source's artifact location.

    Args:
        scheme: The location's scheme (``"s3"``, ``"gs"``...).
        settings: Transfer settings (timeouts, concurrency, include/exclude).
        options: Extra keyword arguments for the class's constructor, given together with
            the settings' transfer keywords (``SourceSettings.as_kwargs``), e.g. the S3
            endpoint an MLflow server's variables name. Without options the class's
            ``from_settings`` is used, as for :func:`create_source`.

    Raises:
        UnknownSchemeError: Nothing is registered for the scheme.
        MissingDependencyError: Its module (or an SDK it needs) cannot be imported.
    """
    cls = get_source_class(scheme)
    settings = settings or SourceSettings()
    if options:
        source = cls(**settings.as_kwargs(), **options)
    else:
        factory = getattr(cls, "from_settings", None)
        source = factory(settings) if factory is not None else cls()
    if not isinstance(source, ModelSource):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} does not implement the ModelSource protocol")
    return source
