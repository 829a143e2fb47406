"""mppool's Django database backend: Django's PostgreSQL backend on mppool's pool.

In ``settings.py``::

    DATABASES = {
        "default": {
            "ENGINE": "mppool.django",  # was "django.db.backends.postgresql"
            "NAME": "app",
            # HOST, PORT, USER, PASSWORD, OPTIONS... as for Django's backend
            "OPTIONS": {"pool": {"min_size": 2, "max_size": 4}},
        }
    }

Everything is Django's PostgreSQL backend (psycopg 3, Django 5.2 and later),
except that ``OPTIONS["pool"]`` is served by a fork-aware `mppool`
``ConnectionPool``, and that a forked child process forgets the connection its
parent's wrapper held instead of using or closing it. See
`mppool.django.base.DatabaseWrapper` and docs/django.md.

Importing this package does not import Django: Django loads the backend from
``mppool.django.base`` itself.
"""

__all__: list[str] = []  # Django imports the backend itself, from mppool.django.base
