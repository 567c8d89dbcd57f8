"""Prometheus metrics for served models (``pip install 'model-loader[metrics]'``).

prometheus-client is imported only when :class:`ServingMetrics` is built. Every series is
labelled with ``reference``, the :class:`~model_loader.serving.ServedModel`'s name:

=============================================  =========  ==========================================
metric                                         type       labels / meaning
=============================================  =========  ==========================================
``model_loader_model_info``                    gauge      reference, version, digest, source; 1 for
                                                          the served version (the old series is
                                                          removed on swap)
``model_loader_ready``                         gauge      1 while a model is served
``model_loader_degraded``                      gauge      1 while the sources cannot be reached
``model_loader_reloads_total``                 counter    result = success | failure: new versions
                                                          swapped in, or that failed to load
``model_loader_load_duration_seconds``         histogram  resolve to warm-up, for each model served
``model_loader_resolve_duration_seconds``      histogram  every check of the reference
``model_loader_fetch_duration_seconds``        histogram  downloads only
``model_loader_verify_duration_seconds``       histogram  disk-cache checks and publishing
``model_loader_deserialize_duration_seconds``  histogram  ``loader_fn`` (and warm-up) runs
``model_loader_fetched_bytes_total``           counter    source: bytes downloaded
``model_loader_cache_hits_total``              counter    cache = memory | disk
``model_loader_cache_misses_total``            counter    loads that downloaded
``model_loader_retries_total``                 counter    source: retried calls
``model_loader_fallbacks_total``               counter    source: loads where it failed and a later
                                                          source or the cache served instead
=============================================  =========  ==========================================
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from model_loader._types import FetchResult
from model_loader.errors import MissingDependencyError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from model_loader.serving import ServingEvent

__all__ = ["LATENCY_BUCKETS", "ServingMetrics"]

# Loads span a memory hit (microseconds) to a multi-GB download (minutes).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class ServingMetrics:
    """Prometheus collectors that :class:`~model_loader.serving.ServedModel` handles update.

    One instance serves any number of handles (each is a ``reference`` label value); build
    it once per registry: registering the same names twice in one registry fails.

    Args:
        registry: Where to register (default: prometheus-client's global ``REGISTRY``).
        buckets: Histogram buckets, in seconds.

    Raises:
        MissingDependencyError: prometheus-client is not installed.

    Example:
        >>> metrics = ServingMetrics()
        >>> served = ServedModel(["models:/fraud@champion"], metrics=metrics).start()
        >>> prometheus_client.generate_latest()  # what /metrics returns
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise MissingDependencyError(
                "metrics need prometheus-client: pip install 'model-loader[metrics]'", extra="metrics"
            ) from exc
        reg = registry if registry is not None else prom.REGISTRY
        ref = ["reference"]
        self.model_info = prom.Gauge(
            "model_loader_model_info",
            "The model version served (value 1; one series per reference)",
            [*ref, "version", "digest", "source"],
            registry=reg,
        )
        self.ready = prom.Gauge("model_loader_ready", "1 while a model is served", ref, registry=reg)
        self.degraded = prom.Gauge(
            "model_loader_degraded", "1 while the sources of the served model cannot be reached", ref, registry=reg
        )
        self.reloads = prom.Counter(
            "model_loader_reloads",
            "New versions swapped in (success) or that failed to load",
            [*ref, "result"],
            registry=reg,
        )

        def histogram(name: str, doc: str) -> prom.Histogram:
            return prom.Histogram(name, doc, ref, registry=reg, buckets=tuple(buckets))

        self.load_seconds = histogram(
            "model_loader_load_duration_seconds", "Seconds from resolve to a warmed model, for each model served"
        )
        self.resolve_seconds = histogram("model_loader_resolve_duration_seconds", "Seconds resolving the reference")
        self.fetch_seconds = histogram("model_loader_fetch_duration_seconds", "Seconds downloading model files")
        self.verify_seconds = histogram(
            "model_loader_verify_duration_seconds", "Seconds verifying cached or fetched files"
        )
        self.deserialize_seconds = histogram(
            "model_loader_deserialize_duration_seconds", "Seconds in the loader function (and warm-up)"
        )
        self.fetched_bytes = prom.Counter(
            "model_loader_fetched_bytes", "Bytes of model files downloaded", [*ref, "source"], registry=reg
        )
        self.cache_hits = prom.Counter(
            "model_loader_cache_hits", "Loads served from the memory or disk cache", [*ref, "cache"], registry=reg
        )
        self.cache_misses = prom.Counter("model_loader_cache_misses", "Loads that downloaded files", ref, registry=reg)
        self.retries = prom.Counter("model_loader_retries", "Retried source calls", [*ref, "source"], registry=reg)
        self.fallbacks = prom.Counter(
            "model_loader_fallbacks",
            "Loads where this source failed and a later source or the cache served",
            [*ref, "source"],
            registry=reg,
        )
        self._lock = threading.Lock()
        self._info: dict[str, tuple[str, str, str, str]] = {}

    def register(self, reference: str) -> None:
        """Create a reference's series at zero, so dashboards see them before any event."""
        self.ready.labels(reference).set(0)
        self.degraded.labels(reference).set(0)
        for result in ("success", "failure"):
            self.reloads.labels(reference, result)

    def observe_load(self, reference: str, result: FetchResult) -> None:
        """Record one load (the watcher's check included) from its :class:`FetchResult`."""
        t = result.timings
        if not result.degraded and not result.offline:
            self.resolve_seconds.labels(reference).observe(t.resolve)
        if not result.from_cache:
            self.cache_misses.labels(reference).inc()
            self.fetch_seconds.labels(reference).observe(t.fetch)
        elif t.fetch == 0 and t.verify == 0 and t.deserialize == 0:
            self.cache_hits.labels(reference, "memory").inc()
        else:
            self.cache_hits.labels(reference, "disk").inc()
        if result.downloaded:
            self.fetched_bytes.labels(reference, result.source).inc(result.downloaded)
        if t.verify:
            self.verify_seconds.labels(reference).observe(t.verify)
        if t.deserialize:
            self.deserialize_seconds.labels(reference).observe(t.deserialize)
        for uri, count in result.retries:
            self.retries.labels(reference, uri).inc(count)
        for uri, _ in result.failures:
            self.fallbacks.labels(reference, uri).inc()

    def observe_event(self, event: ServingEvent, served: FetchResult | None) -> None:
        """Update the state series from a serving event; ``served`` is what serves after it."""
        ref = event.reference
        if event.kind in ("loaded", "swapped") and served is not None:
            labels = (ref, served.version, served.digest, served.source)
            with self._lock:
                old = self._info.get(ref)
                self._info[ref] = labels
                if old is not None and old != labels:
                    self.model_info.remove(*old)
                self.model_info.labels(*labels).set(1)
            self.ready.labels(ref).set(1)
            if event.result is not None:
                self.load_seconds.labels(ref).observe(event.result.timings.total)
            if event.kind == "loaded":
                self.degraded.labels(ref).set(1 if served.degraded else 0)
            else:
                self.reloads.labels(ref, "success").inc()
        elif event.kind == "reload_failed":
            self.reloads.labels(ref, "failure").inc()
        elif event.kind == "degraded":
            self.degraded.labels(ref).set(1)
        elif event.kind == "recovered":
            self.degraded.labels(ref).set(0)
