"""``mppool doctor`` behind PgBouncer: do the processes fit PgBouncer, and PgBouncer the server?

With PgBouncer between the application and PostgreSQL, the processes'
connections are PgBouncer's clients, and PgBouncer opens the server
connections. Two rules then replace the direct one (docs/pgbouncer.md)::

    processes x max_size  <=  max_client_conn - other clients connected now
    what PgBouncer may open  <=  the server's slots for ordinary roles

where what PgBouncer may open is, summed over its pools (one per database and
user), ``pool_size + reserve_pool`` (capped by the database's
``max_db_connections``). In session mode each client holds a server
connection for as long as it is connected, so the direct rule applies too.

The admin console's DSN comes from the environment, ``MPPOOL_PGBOUNCER_ADMIN_DSN``
(a user in PgBouncer's ``admin_users`` or ``stats_users``, database
``pgbouncer``): never from the command line, where a password would be seen
by every user of the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TextIO

import psycopg

from .redact import password_of, redact, safe_conninfo

__all__ = ["ENV", "BouncerLimits", "bouncer_report", "read_limits", "report"]

ENV = "MPPOOL_PGBOUNCER_ADMIN_DSN"
"""The environment variable holding the admin console's DSN."""


@dataclass(frozen=True)
class BouncerLimits:
    """What PgBouncer allows and what it holds now, as `read_limits` finds it."""

    version: str
    pool_mode: str
    max_client_conn: int
    clients: int
    """Client connections now, the check's own not counted."""
    server_max: int
    """Server connections PgBouncer may open: pool_size + reserve_pool per pool."""
    pools: dict[str, int] = field(default_factory=dict)
    """That maximum by database, for the report."""

    @property
    def client_room(self) -> int:
        """Client connections PgBouncer accepts besides those connected now."""
        return max(0, self.max_client_conn - self.clients)


def _show(conn: psycopg.Connection[Any], what: str) -> list[dict[str, Any]]:
    cur = conn.execute(f"SHOW {what}")
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def read_limits(conn: psycopg.Connection[Any]) -> BouncerLimits:
    """PgBouncer's limits and use, through a connection to its admin console."""
    config = {row["key"]: row["value"] for row in _show(conn, "CONFIG")}
    version = str(_show(conn, "VERSION")[0]["version"])
    lists = {row["list"]: int(row["items"]) for row in _show(conn, "LISTS")}
    databases = {row["name"]: row for row in _show(conn, "DATABASES")}
    users: dict[str, int] = {}
    for pool in _show(conn, "POOLS"):
        users[pool["database"]] = users.get(pool["database"], 0) + 1
    default_size = int(config.get("default_pool_size", 20))
    reserve = int(config.get("reserve_pool_size", 0))
    pools: dict[str, int] = {}
    for name, db in databases.items():
        if name == "pgbouncer":  # the admin console: no server behind it
            continue
        size = default_size if db.get("pool_size") is None else int(db["pool_size"])
        per_pool = size + int(db.get("reserve_pool") or reserve)
        most = per_pool * max(1, users.get(name, 0))
        cap = int(db.get("max_connections") or 0)
        pools[name] = min(most, cap) if cap > 0 else most
    return BouncerLimits(
        version=version,
        pool_mode=str(config.get("pool_mode", "session")),
        max_client_conn=int(config["max_client_conn"]),
        clients=max(0, lists.get("used_clients", 0) - 1),
        server_max=sum(pools.values()),
        pools=pools,
    )


def bouncer_report(limits: BouncerLimits, needed: int, server_usable: int) -> tuple[bool, str]:
    """Whether `needed` client connections fit PgBouncer and PgBouncer the server; the text."""
    b = limits
    lines = [
        f"Through {b.version} ({b.pool_mode} mode), the processes' connections are "
        "PgBouncer's clients:",
        f"  max_client_conn {b.max_client_conn}, {b.clients} connected now: room for "
        f"{b.client_room}.",
    ]
    clients_fit = needed <= b.client_room
    if clients_fit:
        lines.append(f"OK: {needed} client connections fit ({b.client_room - needed} to spare).")
    else:
        lines.append(
            f"DOES NOT FIT: {needed} client connections, but PgBouncer takes {b.client_room} "
            f"more: raise max_client_conn to at least {b.clients + needed}, or lower "
            "processes x max_size."
        )
    pools = ", ".join(f"{name} {n}" for name, n in sorted(b.pools.items())) or "none yet"
    lines.append(
        f"  PgBouncer may open {b.server_max} server connections (pool_size + reserve_pool "
        f"per pool: {pools}); the server allows ordinary roles {server_usable}."
    )
    server_fits = b.server_max <= server_usable
    if server_fits:
        lines.append("OK: PgBouncer's pools fit the server.")
    else:
        lines.append(
            f"DOES NOT FIT: PgBouncer's pools can take {b.server_max} server connections: "
            "lower default_pool_size (or the databases' pool_size), set max_db_connections, "
            "or raise the server's max_connections."
        )
    if not b.pools:
        lines.append(
            "  (No database pool exists yet: PgBouncer creates them as clients connect, "
            "default_pool_size each. Run this again once the application has connected.)"
        )
    if b.pool_mode == "session":
        lines.append(
            "  In session mode each client holds a server connection while connected: the "
            "direct check above applies too."
        )
    return clients_fit and server_fits, "\n".join(lines)


def report(
    admin_dsn: str,
    needed: int,
    server_usable: int,
    direct_fits: bool,
    *,
    timeout: float = 10.0,
    out: TextIO,
    err: TextIO,
) -> bool | None:
    """Print the PgBouncer part of ``mppool doctor``; whether it all fits, None if the admin
    console could not be read.

    In transaction and statement modes the verdict is PgBouncer's alone (the
    direct check above counted connections that go to PgBouncer, not to the
    server); in session mode, `direct_fits` counts too.
    """
    try:
        with psycopg.connect(
            admin_dsn,
            autocommit=True,
            connect_timeout=max(1, round(timeout)),
            cursor_factory=psycopg.ClientCursor,  # the console speaks the simple protocol only
        ) as conn:
            limits = read_limits(conn)
    except (psycopg.Error, KeyError, ValueError, IndexError) as exc:
        detail = redact(str(exc).strip(), password_of(admin_dsn))
        print(
            f"mppool doctor: cannot read PgBouncer's admin console ({ENV}="
            f"{safe_conninfo(admin_dsn)}): {detail}",
            file=err,
        )
        return None
    fits, text = bouncer_report(limits, needed, server_usable)
    print(text, file=out)
    if limits.pool_mode == "session":
        fits = fits and direct_fits
    return fits
