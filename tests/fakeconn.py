"""A stand-in for psycopg.Connection in the property-based test: no server, a real socket.

It is not a mock of the database for behaviour tests (those run against the real
server): it lets hypothesis drive thousands of pool operations a second, with
failures on demand. Each connection owns one end of a socketpair, as a psycopg
connection owns its socket: closing it writes libpq's goodbye ('X') there, so the
other end (`FakeConnection.peer`) shows whether a forked child closed a connection
it should only have neutralised (pointed at /dev/null first).
"""

from __future__ import annotations

import os
import socket
import weakref
from typing import Any, ClassVar

import psycopg
from psycopg.pq import TransactionStatus


class FakePGconn:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.transaction_status = TransactionStatus.IDLE
        self.finished = False

    def finish(self) -> None:
        """libpq's PQfinish: the goodbye ('X'), then the socket closed."""
        if self.finished:
            return
        self.finished = True
        try:
            self._sock.send(b"X")  # libpq's Terminate message
        except OSError:
            pass
        self._sock.close()

    @property
    def socket(self) -> int:
        if self._sock.fileno() < 0:
            raise psycopg.OperationalError("the connection is closed")
        return self._sock.fileno()


class FakeConnection:
    """Quacks like the parts of psycopg.Connection a pool uses."""

    fail_connects = False  # connect() raises OperationalError
    made: ClassVar[weakref.WeakSet[FakeConnection]] = weakref.WeakSet()

    def __init__(self, sock: socket.socket, peer: socket.socket) -> None:
        self.peer = peer
        self.pgconn = FakePGconn(sock)
        self.autocommit = False
        self.bad = False  # execute() raises, as on a broken connection
        self._pool: Any = None
        self._pid = os.getpid()

    @property
    def closed(self) -> bool:
        return self.pgconn.finished  # psycopg's: its libpq connection is finished

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> FakeConnection:
        if cls.fail_connects:
            raise psycopg.OperationalError("fake: connection refused")
        sock, peer = socket.socketpair()
        peer.setblocking(False)
        conn = cls(sock, peer)
        cls.made.add(conn)
        return conn

    def execute(self, query: str, params: Any = None) -> None:
        if self.closed or self.bad:
            raise psycopg.OperationalError("fake: the connection is broken")

    def rollback(self) -> None:
        self.pgconn.transaction_status = TransactionStatus.IDLE

    def commit(self) -> None:
        self.pgconn.transaction_status = TransactionStatus.IDLE

    def close(self) -> None:
        if self.closed:
            return
        pool = self._pool
        if pool is not None and getattr(pool, "close_returns", False):
            pool.putconn(self)
            return
        self.pgconn.finish()

    def __del__(self) -> None:
        # psycopg's PGconn finishes the connection when collected, but only in the
        # process that opened it.
        if not self.closed and self._pid == os.getpid():
            self.pgconn.finish()


def goodbyes(peer: socket.socket) -> bytes:
    """What reached the other end of a fake connection's socket so far."""
    try:
        return peer.recv(64)
    except BlockingIOError:
        return b""
    except OSError:
        return b""


class FakeAsyncConnection(FakeConnection):
    """Quacks like the parts of psycopg.AsyncConnection an async pool uses."""

    made: ClassVar[weakref.WeakSet[FakeConnection]] = FakeConnection.made

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> FakeAsyncConnection:  # type: ignore[override]
        conn = FakeConnection.connect.__func__(cls, conninfo, **kwargs)  # type: ignore[attr-defined]
        assert isinstance(conn, FakeAsyncConnection)
        return conn

    async def execute(self, query: str, params: Any = None) -> None:  # type: ignore[override]
        FakeConnection.execute(self, query, params)

    async def rollback(self) -> None:  # type: ignore[override]
        FakeConnection.rollback(self)

    async def commit(self) -> None:  # type: ignore[override]
        FakeConnection.commit(self)

    async def set_autocommit(self, value: bool) -> None:
        self.autocommit = value

    async def close(self) -> None:  # type: ignore[override]
        pool = self._pool
        if not self.closed and pool is not None and getattr(pool, "close_returns", False):
            await pool.putconn(self)
            return
        FakeConnection.close(self)
