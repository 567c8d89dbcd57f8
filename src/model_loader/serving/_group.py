"""ModelGroup: several served references (champion and challenger, or several models)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from model_loader.serving._events import EventListener, ServingStatus
from model_loader.serving._handle import (
    DEFAULT_RELOAD_INTERVAL,
    LoaderFn,
    ServedModel,
    Wait,
    Warmup,
    with_warmup,
)

if TYPE_CHECKING:
    from model_loader.config import LoaderConfig
    from model_loader.loader import ResilientLoader, SourceLike
    from model_loader.metrics import ServingMetrics

__all__ = ["ModelGroup"]


class ModelGroup(Mapping[str, ServedModel]):
    """Named :class:`ServedModel` handles sharing one disk cache and one memory budget.

    A version two references resolve to (``@champion`` and ``/7`` naming the same version)
    is downloaded once and deserialized once; each handle reports its own version.

    Args:
        references: ``name -> sources``: one URI or ``(source, uri)`` pair, or several tried
            in order.
        config: Loader settings shared by every reference (default: from the environment).
            The memory budget is ``config.cache.memory_items``, but at least two objects per
            reference (the served one and the next).
        loader_fn, warm, reload_interval, jitter, retry_interval, metrics, on_event, wait:
            As for :class:`ServedModel`, applied to every reference.

    Example:
        >>> group = ModelGroup({"champion": "models:/fraud@champion",
        ...                     "challenger": "models:/fraud@challenger"}).start()
        >>> model, result = group["challenger"].get()
    """

    def __init__(
        self,
        references: Mapping[str, SourceLike | Sequence[SourceLike]],
        *,
        config: LoaderConfig | None = None,
        loader_fn: LoaderFn | None = None,
        warm: Warmup | None = None,
        reload_interval: float = DEFAULT_RELOAD_INTERVAL,
        jitter: float = 0.1,
        retry_interval: float | None = None,
        metrics: ServingMetrics | None = None,
        on_event: EventListener | None = None,
        wait: Wait | None = None,
    ) -> None:
        from model_loader._cache import MemoryCache
        from model_loader.config import LoaderConfig
        from model_loader.loader import ResilientLoader, default_model_loader

        if not references:
            raise ValueError("ModelGroup needs at least one reference")
        config = config if config is not None else LoaderConfig.from_env()
        self.memory = MemoryCache(max(config.cache.memory_items, 2 * len(references)))
        # One callable for all: the memory cache keys on (version, loader function).
        fn = with_warmup(loader_fn or default_model_loader, warm)
        self._loaders: list[ResilientLoader] = []
        self._handles: dict[str, ServedModel] = {}
        try:
            for name, sources in references.items():
                loader = ResilientLoader(sources, config=config, memory=self.memory)  # one source or several
                self._loaders.append(loader)
                self._handles[name] = ServedModel(
                    name=name,
                    loader=loader,
                    loader_fn=fn,
                    reload_interval=reload_interval,
                    jitter=jitter,
                    retry_interval=retry_interval,
                    metrics=metrics,
                    on_event=on_event,
                    wait=wait,
                )
        except BaseException:
            self.close()
            raise

    def __getitem__(self, name: str) -> ServedModel:
        return self._handles[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)

    @property
    def ready(self) -> bool:
        """True when every reference serves a model."""
        return all(h.ready for h in self._handles.values())

    def statuses(self) -> dict[str, ServingStatus]:
        return {name: h.status() for name, h in self._handles.items()}

    def start(self) -> ModelGroup:
        """Start every handle's watcher (each loads in the background first)."""
        for handle in self._handles.values():
            handle.start()
        return self

    def load(self) -> None:
        """Load every reference now, in this thread, one after the other.

        Raises:
            AllSourcesFailedError: A reference could not be served.
        """
        for handle in self._handles.values():
            handle.load()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every reference serves a model, or ``timeout`` seconds passed."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        for handle in self._handles.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not handle.wait_ready(left):
                return False
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop every watcher, then close the loaders. Idempotent."""
        for handle in self._handles.values():
            handle.stop(timeout)
        for handle in self._handles.values():
            handle.close(timeout)
        for loader in self._loaders:
            loader.close()
        self._loaders.clear()

    def __enter__(self) -> ModelGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
