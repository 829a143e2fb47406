"""What a request or a task does: one row written in transaction.atomic()."""

from __future__ import annotations

import os
from typing import Any

from django.db import connection, transaction

from djprobe.models import Hit


def record(n: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    """Write a Hit naming this process and its backend; the row as a dict."""
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(
                "SELECT pid, backend_start, pg_sleep(%s) FROM pg_stat_activity"
                " WHERE pid = pg_backend_pid()",
                [sleep],
            )
            backend, start, _ = cur.fetchone()
        hit = Hit.objects.create(n=n, pid=os.getpid(), backend=backend, backend_start=start)
    return {"pid": hit.pid, "backend": [backend, start.isoformat()]}
