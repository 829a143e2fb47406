"""How many connections to a server some processes hold, counted on the client side.

The server's view (``pg_stat_activity``) lags: a backend stays listed for a
moment after its client closed the socket. A host budget's limit is about the
client side, so this counts the TCP sockets the given processes have open to
the server's port, in any state but listening (a connection being opened
counts from its SYN on): the sockets in their descriptor tables
(``/proc/<pid>/fd``) matched with the kernel's table (``/proc/net/tcp``,
``tcp6``). Linux only; a process that exits between the two reads is skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from psycopg.conninfo import conninfo_to_dict

__all__ = ["connections_to", "in_groups", "server_port", "tcp_host"]

_LISTEN = "0A"


def tcp_host(dsn: str) -> bool:
    """True if `dsn` connects over TCP (not a Unix socket, which this cannot count)."""
    host = str(conninfo_to_dict(dsn).get("host") or os.environ.get("PGHOST") or "")
    return bool(host) and not host.startswith("/") and not host.startswith("@")


def in_groups(groups: set[int]) -> set[int]:
    """The live processes whose process group is one of `groups`."""
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) in groups:
            found.add(int(entry))
    return found


def server_port(dsn: str) -> int:
    """The TCP port `dsn` connects to (5432 unless it says otherwise)."""
    port = conninfo_to_dict(dsn).get("port") or os.environ.get("PGPORT") or 5432
    return int(str(port).split(",")[0])


def _socket_inodes(pid: int) -> set[int]:
    found: set[int] = set()
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _tcp_to(port: int) -> set[int]:
    """Inodes of the host's TCP sockets whose remote port is `port`."""
    inodes: set[int] = set()
    want = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    remote, state, inode = fields[2], fields[3], int(fields[9])
                    if remote.rsplit(":", 1)[1] == want and state != _LISTEN and inode:
                        inodes.add(inode)
        except OSError:
            continue
    return inodes


def connections_to(port: int, pids: Iterable[int], besides: Iterable[int] = ()) -> int:
    """Sockets the processes `pids` hold to TCP port `port` now (each counted once),
    leaving out those the processes `besides` hold too (a forking parent's own
    connection, which its children inherit)."""
    mine: set[int] = set()
    for pid in pids:
        mine |= _socket_inodes(pid)
    for pid in besides:
        mine -= _socket_inodes(pid)
    return len(mine & _tcp_to(port))
