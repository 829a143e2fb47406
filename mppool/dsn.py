"""The command line's connection: where its DSN comes from, what a failed connection means.

A password on the command line is visible to every user of the host (``ps``
shows the arguments of every process), so ``mppool doctor`` and ``mppool
demo`` also take the DSN from the environment, in this order:

1. ``--dsn``, warned about when it carries a password;
2. ``MPPOOL_DSN``, the whole DSN, password included, in the environment;
3. nothing: libpq's own environment and files (``PGHOST``, ``PGPORT``,
   ``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``, ``PGSERVICE`` and the service
   file, ``~/.pgpass``) and defaults. (``mppool demo`` starts a throwaway
   server instead.)

A DSN without a password (from ``--dsn`` or ``MPPOOL_DSN``) still gets one
from ``PGPASSWORD``, the pgpass file or a service file: libpq looks there.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import psycopg

from .redact import MASK, password_of

__all__ = [
    "ENV_DSN",
    "LIBPQ_ENV",
    "ConnectionProblem",
    "DsnChoice",
    "argv_password_warning",
    "choose_dsn",
    "classify_error",
    "describe_error",
    "scrub",
]

ENV_DSN = "MPPOOL_DSN"
LIBPQ_ENV = "libpq's environment (PGHOST, PGSERVICE, ...) and defaults"
"""The `DsnChoice.source` when neither ``--dsn`` nor ``MPPOOL_DSN`` gives the DSN."""

_LIBPQ_VARS = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE")


@dataclass(frozen=True)
class DsnChoice:
    """The DSN to connect with, and where it came from (for messages)."""

    dsn: str | None
    """None: nothing given, and the caller said it has a fallback of its own."""
    source: str
    """``"--dsn"``, ``"MPPOOL_DSN"`` or `LIBPQ_ENV`."""


def choose_dsn(
    option: str | None, environ: Mapping[str, str] | None = None, *, libpq_fallback: bool = True
) -> DsnChoice:
    """``--dsn`` if given, else ``MPPOOL_DSN``, else libpq's environment (an empty DSN).

    With ``libpq_fallback=False`` (``mppool demo``, which then starts its own
    server), nothing given means ``DsnChoice(None, ...)``.
    """
    environ = os.environ if environ is None else environ
    if option is not None:
        return DsnChoice(option, "--dsn")
    if environ.get(ENV_DSN):
        return DsnChoice(environ[ENV_DSN], ENV_DSN)
    return DsnChoice("" if libpq_fallback else None, LIBPQ_ENV)


def argv_password_warning(choice: DsnChoice, prog: str) -> str | None:
    """A warning for a password given in ``--dsn`` (it shows in ``ps``), else None."""
    if choice.source != "--dsn" or not choice.dsn or not password_of(choice.dsn):
        return None
    return (
        f"{prog}: warning: the password in --dsn is visible to every user of this host "
        "(ps shows command lines). Leave it out of --dsn and put it in PGPASSWORD, "
        f"~/.pgpass or a service file (PGSERVICE), or pass the whole DSN in {ENV_DSN}."
    )


class ConnectionProblem(Exception):
    """A connection failed: `kind` says how, the message says what (never the password)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        """``"invalid"``, ``"refused"`` or ``"unreachable"``."""


_REFUSED = (
    "authentication failed",  # password, ident, peer, ...
    "no pg_hba.conf entry",
    "no password supplied",  # libpq's own, when the server asks for one
)
_REFUSED_SQLSTATES = ("28P01", "28000", "3D000", "53300", "42501")


def classify_error(exc: BaseException) -> str:
    """How a connection attempt failed: ``"invalid"``, ``"refused"`` or ``"unreachable"``.

    - ``"invalid"``: libpq did not try, because the DSN (or the service file
      it names) does not parse or has a bad value: psycopg raises
      ``ProgrammingError``, or libpq says ``connection is bad:`` before any
      ``connection to server``;
    - ``"refused"``: the server answered and turned the login down (libpq has
      no SQLSTATE for a failed connection: a ``FATAL:`` from the server says it);
    - ``"unreachable"``: anything else (connection refused, timeout, unknown
      host, TLS negotiation).
    """
    text = str(exc)
    if isinstance(exc, psycopg.ProgrammingError):
        return "invalid"
    if text.startswith("connection is bad:") and "connection to server" not in text:
        return "invalid"
    if getattr(exc, "sqlstate", None) in _REFUSED_SQLSTATES:
        return "refused"
    if "FATAL:" in text or any(marker in text for marker in _REFUSED):
        return "refused"
    return "unreachable"


_HEADS = {
    "invalid": "invalid connection settings",
    "refused": "the server refused the login",
    "unreachable": "cannot reach the server",
}


def describe_error(
    exc: BaseException, choice: DsnChoice, environ: Mapping[str, str] | None = None
) -> ConnectionProblem:
    """`exc`, raised by a connection attempt with `choice`, as a `ConnectionProblem`.

    The message says which kind of failure it is and where the DSN came from,
    gives libpq's own words once each (libpq repeats its line when it retries
    without TLS), and never shows the password.
    """
    kind = classify_error(exc)
    lines: list[str] = []
    for line in str(exc).strip().splitlines():
        line = line.strip()
        if line and line not in lines:
            lines.append(line)
    detail = scrub("\n  ".join(lines), choice.dsn or "")
    message = f"{_HEADS[kind]} (DSN from {choice.source}): {detail}"
    environ = os.environ if environ is None else environ
    if choice.source == LIBPQ_ENV and not any(environ.get(v) for v in _LIBPQ_VARS):
        message += (
            f"\n  No server was given: use {ENV_DSN}=DSN, or libpq's PGHOST, PGPORT, "
            "PGUSER, PGDATABASE (the password in PGPASSWORD or ~/.pgpass), or --dsn."
        )
    return ConnectionProblem(kind, message)


def scrub(text: str, dsn: str) -> str:
    """`text` without the password `dsn` carries, even when `dsn` does not parse.

    Masks ``password=...`` and the password of a URI, then the password itself
    wherever it stands alone (quoted, or between separators): inside a word it
    is left, so that a one-letter password does not mask every letter of the
    message (``"notaport"`` stays readable with the password ``p``).
    """
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", rf"\g<1>{MASK}", text)
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", rf"\g<1>{MASK}@", text)
    secret = password_of(dsn)
    if secret:
        text = re.sub(rf"(?<!\w){re.escape(secret)}(?!\w)", MASK, text)
    return text
