"""Django settings of the test project, from the environment (see djprobe/__init__.py)."""

from __future__ import annotations

import os

from psycopg.conninfo import conninfo_to_dict

_server = conninfo_to_dict(os.environ["MPPOOL_TEST_APP_DSN"])
_tag = os.environ.get("MPPOOL_TEST_APP_TAG", "djprobe")


def _name_connections() -> None:
    # libpq reads PGAPPNAME when it connects: each process names its own backends.
    os.environ["PGAPPNAME"] = f"{_tag}:{os.getpid()}"


_name_connections()
os.register_at_fork(after_in_child=_name_connections)

SECRET_KEY = "test-only"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
ROOT_URLCONF = "djprobe.urls"
INSTALLED_APPS = ["djprobe"]
MIDDLEWARE: list[str] = []
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_options: dict[str, object] = {
    "pool": {"min_size": 1, "max_size": int(os.environ.get("MPPOOL_TEST_APP_MAX_SIZE", "2"))},
}
if _server.get("sslmode"):
    _options["sslmode"] = _server["sslmode"]

DATABASES = {
    "default": {
        "ENGINE": os.environ.get("MPPOOL_TEST_APP_ENGINE", "mppool.django"),
        "NAME": os.environ["MPPOOL_TEST_APP_DB"],
        "HOST": _server.get("host", ""),
        "PORT": _server.get("port", ""),
        "USER": _server.get("user", ""),
        "PASSWORD": _server.get("password", ""),
        "OPTIONS": _options,
    }
}
