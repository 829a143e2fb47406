"""A Prometheus exporter of every mppool pool on the host, as a process of its own.

For servers that do not serve HTTP themselves (celery workers), or to keep
scrapes off the application's workers::

    pip install "mppool[prometheus]"
    python examples/metrics_exporter.py 9187        # then scrape :9187/metrics

It reads what the pools of every process publish in mppool's runtime
directory, so it must run on the same host, as the same user, with the same
``MPPOOL_RUNTIME_DIR`` (if the application sets one). It opens no database
connection. Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import signal
import sys
import threading
from wsgiref.simple_server import make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from mppool.metrics import PoolCollector


def main(port: int) -> None:
    registry = CollectorRegistry()
    registry.register(PoolCollector())
    server = make_server("127.0.0.1", port, make_wsgi_app(registry))

    def stop(*_: object) -> None:
        # Not an exception raised from the handler: wsgiref's request handling
        # swallows any exception, SystemExit included, if the signal lands there.
        # shutdown() waits for serve_forever to end, so it runs in a thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"serving the pools' metrics on http://127.0.0.1:{server.server_port}/metrics")
    sys.stdout.flush()
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9187)
