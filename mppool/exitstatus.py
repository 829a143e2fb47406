"""The exit statuses of the ``mppool`` command: one table for every subcommand.

====  ===================================================================
 0    done, nothing wrong: ``demo``'s verdict is CLEAN, ``doctor``'s pools
      fit, ``stats`` printed what it found (also when nothing is published)
 1    it ran and found a problem: ``demo``'s verdict is PROBLEMS FOUND,
      ``doctor``'s pools do not fit (``stats`` never exits 1)
 2    it could not start as asked: a command-line mistake, a missing
      optional dependency (the message gives the ``pip install`` to run), or
      (``stats``) a platform without OFD locks
 3    no connection: the server cannot be reached, refuses the login, or
      the connection string is invalid (the message says which)
 4    the demo's own machinery failed: the throwaway PostgreSQL server,
      gunicorn or celery did not start, answer or finish in time (the
      message shows the end of its log)
130   interrupted by Ctrl-C (SIGINT), after stopping everything it started;
143   by SIGTERM: the process ends by the signal, so the shell shows these
====  ===================================================================

docs/cli.md has the same table.
"""

from __future__ import annotations

__all__ = ["FAILED", "NO_CONNECTION", "OK", "PROBLEM", "USAGE"]

OK = 0
PROBLEM = 1
USAGE = 2
NO_CONNECTION = 3
FAILED = 4
