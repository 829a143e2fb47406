"""The Celery app of the test project: ``celery -A djprobe.celery_app worker``.

DJANGO_SETTINGS_MODULE makes celery apply its Django fix-up (django.setup(),
closing connections around tasks); `install(app)` adds mppool's hooks.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djprobe.settings")

from celery import Celery
from helpers_procs import broker_config

from mppool.hooks.celery import install

app = Celery("djprobe")
app.conf.update(
    broker_config(os.environ["MPPOOL_TEST_BROKER"]),
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    include=["djprobe.tasks"],
)
install(app)

if os.environ.get("MPPOOL_TEST_APP_QUERY"):
    import django

    django.setup()
    from djprobe.models import Hit

    Hit.objects.count()
