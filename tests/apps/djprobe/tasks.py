from __future__ import annotations

from celery import shared_task

from djprobe.record import record as record_hit


@shared_task(name="djprobe.record")
def record(n: int) -> None:
    record_hit(n)
