"""What a request or a task does: one row written in transaction.atomic()."""

from __future__ import annotations

import os
from typing import Any

from django.db import connection, transaction
from helpers_procs import session_of

from djprobe.models import Hit


def record(n: int = 0, sleep: float = 0.0) -> dict[str, Any]:
    """Write a Hit naming this process and its session; the row as a dict."""
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(%s)", [sleep])
        backend, client = session_of(connection.connection)
        hit = Hit.objects.create(n=n, pid=os.getpid(), backend=backend, client=client)
    return {"pid": hit.pid, "backend": [backend, client]}
