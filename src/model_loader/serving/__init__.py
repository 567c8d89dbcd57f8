"""Serve models while the service runs: a handle per reference that follows the registry.

:class:`ServedModel` loads in the background (or up front), answers :meth:`~ServedModel.get`
from an immutable snapshot without locks or I/O, and swaps in new versions that its watcher
thread has fetched, deserialized and warmed. :class:`ModelGroup` serves several references
(champion and challenger) from one cache. See ``docs/serving.md``.

Example:
    >>> from model_loader.serving import ServedModel
    >>> served = ServedModel(["models:/fraud@champion"], reload_interval=30).start()
    >>> served.wait_ready(60)
    True
    >>> model, result = served.get()
"""

from __future__ import annotations

from model_loader.serving._events import (
    EventKind,
    EventListener,
    ModelNotReadyError,
    ServingEvent,
    ServingState,
    ServingStatus,
)
from model_loader.serving._group import ModelGroup
from model_loader.serving._handle import ServedModel, with_warmup

__all__ = [
    "EventKind",
    "EventListener",
    "ModelGroup",
    "ModelNotReadyError",
    "ServedModel",
    "ServingEvent",
    "ServingState",
    "ServingStatus",
    "with_warmup",
]
