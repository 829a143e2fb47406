"""Prometheus metrics of every pool on the host, served by gunicorn workers at ``/metrics``.

The app of ``wsgi_app.py`` plus one route. Run from the repository root::

    pip install "mppool[prometheus]"
    export DATABASE_URL="postgresql://user:password@127.0.0.1:5432/mydb"
    gunicorn -c python:mppool.hooks.gunicorn --preload -w 3 examples.metrics_app:app
    curl localhost:8000/metrics

Every process publishes its pools' figures in mppool's runtime directory;
`mppool.metrics.PoolCollector` reads all of them. So whichever worker answers
the scrape reports the pools of every worker (each with its ``pid`` label),
and of any other process on the host, such as a celery worker. The registry
here holds that collector only: prometheus_client's default registry would
add the answering worker's own process metrics, a different worker at each
scrape.

Label churn: each recycled worker (``max_requests``, a HUP reload) brings a
new ``pid``, so new series. ``PoolCollector(per_process=False)`` sums the
workers' pools by name instead; docs/observability.md has the trade-offs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, make_wsgi_app

from examples.wsgi_app import app as queries
from mppool.metrics import PoolCollector

registry = CollectorRegistry()
registry.register(PoolCollector())
metrics = make_wsgi_app(registry)


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/metrics":
        return metrics(environ, start_response)
    return queries(environ, start_response)
