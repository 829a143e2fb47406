"""Prometheus metrics of every pool on the host, named after OpenTelemetry's conventions.

`PoolCollector` is a prometheus_client collector that reads what every
process publishes (`mppool.publish`, `mppool.hoststats`), so whichever
process is scraped reports the pools of all of them. It needs the
``prometheus`` extra: ``pip install "mppool[prometheus]"``.

::

    from prometheus_client import REGISTRY
    from mppool.metrics import PoolCollector

    REGISTRY.register(PoolCollector())

The metrics are OpenTelemetry's database client connection-pool metrics
(``db.client.connection.*``) in Prometheus form (dots become underscores,
counters end in ``_total``, histograms of seconds in ``_seconds``), with
short labels: ``pool_name``, ``pid`` (unless ``per_process=False``), and
``state`` (``idle`` or ``used``) on the first:

=============================================  ===========================================
``db_client_connection_count``                 connections open, by ``state``
``db_client_connection_max``                   ``max_size`` (absent: no limit)
``db_client_connection_idle_min``              connections kept open even when idle
``db_client_connection_idle_max``              most idle connections kept
``db_client_connection_pending_requests``      clients waiting for a connection
``db_client_connection_timeouts_total``        checkouts that gave up (`PoolTimeout`)
``db_client_connection_wait_time_seconds``     histogram: time to get a connection
``db_client_connection_use_time_seconds``      histogram: time from checkout to return
``db_client_connection_create_time_seconds``   histogram: time to open a connection
=============================================  ===========================================

The buckets are `mppool.histograms`'. docs/observability.md says what each
metric means and how to keep the ``pid`` label from piling up series when
workers are recycled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

try:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'mppool.metrics needs prometheus_client: pip install "mppool[prometheus]"'
    ) from exc

from . import hoststats, runtime

__all__ = ["PoolCollector", "exposition"]

logger = logging.getLogger("mppool")

_HISTOGRAMS = (
    (
        "wait_time",
        "db_client_connection_wait_time_seconds",
        "Time it took to obtain a connection from the pool (0: at once)",
    ),
    (
        "use_time",
        "db_client_connection_use_time_seconds",
        "Time between borrowing a connection and returning it to the pool",
    ),
    (
        "create_time",
        "db_client_connection_create_time_seconds",
        "Time it took to open a new connection",
    ),
)


class _Families:
    """The metric families of one collection, filled pool by pool."""

    def __init__(self, per_process: bool) -> None:
        labels = ["pool_name", "pid"] if per_process else ["pool_name"]
        self.labels = labels
        self.count = GaugeMetricFamily(
            "db_client_connection_count",
            "Connections open (idle or used) in the pool",
            labels=[*labels, "state"],
        )
        self.max = GaugeMetricFamily(
            "db_client_connection_max", "Most connections the pool may open", labels=labels
        )
        self.idle_min = GaugeMetricFamily(
            "db_client_connection_idle_min",
            "Connections the pool keeps open even when idle",
            labels=labels,
        )
        self.idle_max = GaugeMetricFamily(
            "db_client_connection_idle_max", "Most idle connections the pool keeps", labels=labels
        )
        self.pending = GaugeMetricFamily(
            "db_client_connection_pending_requests",
            "Clients waiting for a connection",
            labels=labels,
        )
        self.timeouts = CounterMetricFamily(
            "db_client_connection_timeouts",
            "Checkouts that timed out waiting for a connection",
            labels=labels,
        )
        self.histograms = [
            (key, HistogramMetricFamily(name, doc, labels=labels))
            for key, name, doc in _HISTOGRAMS
        ]

    def all(self) -> list[Metric]:
        fixed = [self.count, self.max, self.idle_min, self.idle_max, self.pending, self.timeouts]
        return [*fixed, *(family for _, family in self.histograms)]


def _number(value: Any) -> float | None:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    )


def _add_gauge(family: Metric, labels: list[str], value: Any) -> None:
    number = _number(value)
    if number is not None:
        family.add_metric(labels, number)  # type: ignore[attr-defined]


def _buckets(hist: Any) -> tuple[list[tuple[str, float]], float] | None:
    """Cumulative Prometheus buckets and the sum, from a published histogram."""
    if not isinstance(hist, dict):
        return None
    bounds, counts = hist.get("le"), hist.get("counts")
    total = _number(hist.get("sum"))
    if not (isinstance(bounds, list) and isinstance(counts, list)) or total is None:
        return None
    if len(counts) != len(bounds) + 1:
        return None
    buckets, running = [], 0.0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        buckets.append((repr(float(bound)), running))  # as prometheus_client writes `le`
    buckets.append(("+Inf", running + counts[-1]))
    return buckets, total


def _merged(pools: Iterable[hoststats.PublishedPool]) -> list[tuple[str, dict[str, Any]]]:
    """Pools of one name summed across processes (``per_process=False``)."""
    merged: dict[str, dict[str, Any]] = {}
    for pool in pools:
        row = pool.row
        into = merged.get(pool.name)
        if into is None:
            merged[pool.name] = {k: _copy(v) for k, v in row.items()}
            continue
        for key, value in row.items():
            into[key] = _add(into.get(key), value)
    return list(merged.items())


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
    return value


def _add(a: Any, b: Any) -> Any:
    if _number(a) is not None and _number(b) is not None:
        return a + b
    if isinstance(a, dict) and isinstance(b, dict) and a.get("le") == b.get("le"):
        counts_a, counts_b = a.get("counts"), b.get("counts")
        if isinstance(counts_a, list) and isinstance(counts_b, list):
            summed = [x + y for x, y in zip(counts_a, counts_b, strict=False)]
            return {"le": a["le"], "counts": summed, "sum": _add(a.get("sum"), b.get("sum"))}
    return None  # not summable (a None max: no limit, which stays no limit)


class PoolCollector(Collector):
    """A prometheus_client collector of every pool published on this host.

    Args:
        directory: the runtime directory to read (default: where the pools
            publish, `mppool.runtime.runtime_dir`).
        per_process: one series per pool and process, with a ``pid`` label
            (the default). False sums the pools of one name across the
            processes and drops the label: no new series when workers are
            recycled, but a worker's counters leave the sums when it exits,
            which Prometheus's ``rate()`` reads as a counter reset.
    """

    def __init__(
        self, directory: str | os.PathLike[str] | None = None, per_process: bool = True
    ) -> None:
        self.directory = directory
        self.per_process = per_process
        self._complained = False

    def describe(self) -> Iterator[Metric]:
        """The metric families, without samples (for registries that ask first)."""
        return iter(_Families(self.per_process).all())

    def collect(self) -> Iterator[Metric]:
        """Read every published pool; never raises (a failure is logged once)."""
        families = _Families(self.per_process)
        try:
            pools = hoststats.read_pools(self.directory)
        except (OSError, runtime.Unsupported) as exc:
            if not self._complained:
                self._complained = True
                logger.warning("mppool.metrics: cannot read the pools' statistics: %s", exc)
            pools = []
        if self.per_process:
            rows = [([pool.name, str(pool.pid)], pool.row) for pool in pools]
        else:
            rows = [([name], row) for name, row in _merged(pools)]
        for labels, row in rows:
            _add_gauge(families.count, [*labels, "idle"], row.get("idle"))
            _add_gauge(families.count, [*labels, "used"], row.get("used"))
            _add_gauge(families.max, labels, row.get("max"))
            _add_gauge(families.idle_min, labels, row.get("idle_min"))
            _add_gauge(families.idle_max, labels, row.get("idle_max"))
            _add_gauge(families.pending, labels, row.get("waiting"))
            _add_gauge(families.timeouts, labels, row.get("timeouts"))
            for key, family in families.histograms:
                found = _buckets(row.get(key))
                if found is not None:
                    family.add_metric(labels, found[0], found[1])
        return iter(families.all())


def exposition(directory: str | os.PathLike[str] | None = None) -> str:
    """The Prometheus text exposition of every published pool (``mppool stats --prometheus``)."""
    registry = CollectorRegistry()
    registry.register(PoolCollector(directory))
    return generate_latest(registry).decode()
