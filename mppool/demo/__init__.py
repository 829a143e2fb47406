"""``mppool demo``: gunicorn and celery workers sharing one pool created before the fork.

What runs, and where it lives:

- `webapp`: the WSGI app gunicorn serves with ``--preload``; its pool is
  created (and used) in the master at import, before the workers fork;
- `tasks`: the celery app of a prefork worker, its pool created (and used) in
  the main process at import; `broker` holds its configuration (the
  ``filesystem://`` broker: no broker server needed);
- `load`: the HTTP load generator and its progress bar;
- `processes`: starting, watching and always stopping the servers;
- `runner`: the orchestration, from the throwaway PostgreSQL server to the table;
- `verdict`: the verdict, a pure function over what was observed.

The processes the demo starts learn their settings from the environment
variables below (never from the command line, where the password would show
in ``ps``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mppool import HostBudget

ENV_DSN = "MPPOOL_DEMO_DSN"
"""The DSN the apps connect to (with the demo's application_name)."""
ENV_DIR = "MPPOOL_DEMO_DIR"
"""A directory the apps write reports into (and the celery broker's folders)."""
ENV_POOL = "MPPOOL_DEMO_POOL"
"""Which pool the web app creates: ``mppool`` (the default) or ``psycopg_pool``."""
ENV_TABLE = "MPPOOL_DEMO_TABLE"
"""The table the celery tasks write their rows into."""
ENV_BUDGET = "MPPOOL_DEMO_BUDGET"
"""``mppool demo --budget N``: the apps' pools share a host budget of N connections."""
BUDGET_NAME = "mppool-demo"


def demo_budget() -> HostBudget | None:
    """The `mppool.HostBudget` the apps' pools share, if the demo runs with one."""
    import os

    limit = os.environ.get(ENV_BUDGET)
    if not limit:
        return None
    from mppool import HostBudget

    return HostBudget(BUDGET_NAME, int(limit))
