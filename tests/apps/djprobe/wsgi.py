"""The WSGI app: ``gunicorn djprobe.wsgi:application``."""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djprobe.settings")

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()

if os.environ.get("MPPOOL_TEST_APP_QUERY"):
    # A health check at start-up: under --preload, in the master.
    from djprobe.models import Hit

    Hit.objects.count()
