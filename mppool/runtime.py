"""The runtime directory: where the processes of a host meet.

Every process that uses mppool can publish a small *record* of its pools there
(`mppool stats` and the Prometheus collector read them all), and pools that
share a host-wide budget keep its slot file there. One mechanism serves both.

Where it is (`runtime_dir`): ``$MPPOOL_RUNTIME_DIR``, else ``/dev/shm/mppool-<uid>``
(memory, not disk), else ``<tempdir>/mppool-<uid>``; created with mode 0700 when
missing. Processes that must see each other need the same directory: a gunicorn
master running as root with ``--user`` workers, celery with ``--uid``, or
containers sharing a volume set ``MPPOOL_RUNTIME_DIR`` to a directory all of
them can write (group-writable, say); an existing directory's mode is left as
it is.

Liveness is judged by locks the kernel releases when a process dies, never by
pids (they mean nothing across containers' PID namespaces): a record's owner
holds an open-file-description (OFD) lock on its first byte for as long as it
lives. OFD locks belong to the open file, not to the process, and a forked
child inherits them with the descriptor: a child therefore never unlocks an
inherited descriptor (that would release its parent's lock); it closes it,
which leaves the lock with the parent, and makes a record of its own.

Records are written in place through ``mmap`` (no system call per update) under
a sequence number a reader checks before and after reading: a record torn by a
writer killed mid-write, or being written, is skipped, never shown as garbage.
Linux only: elsewhere `runtime_dir` works but `ProcessRecord` and the lock
helpers raise `Unsupported`.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import mmap
import os
import secrets
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessRecord",
    "PublishedRecord",
    "Unsupported",
    "count_locked",
    "lock_held",
    "locked_range",
    "read_records",
    "runtime_dir",
    "set_role",
    "try_lock",
    "unlock",
]

logger = logging.getLogger("mppool")

ENV_DIR = "MPPOOL_RUNTIME_DIR"

try:
    import fcntl

    _F_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)
    _F_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
except ImportError:  # Windows
    _F_OFD_GETLK = _F_OFD_SETLK = None

_FLOCK = "hhqqi"  # struct flock on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid
_F_RDLCK, _F_WRLCK, _F_UNLCK = 0, 1, 2


class Unsupported(OSError):
    """This platform has no OFD locks (mppool's host-wide features need Linux >= 3.15)."""


def supported() -> bool:
    """True where OFD locks exist (Linux)."""
    return _F_OFD_SETLK is not None and sys.platform.startswith("linux")


def _require() -> None:
    if not supported():
        raise Unsupported(
            errno.ENOTSUP,
            "mppool's host-wide features (budgets, published stats) need Linux: "
            "they rely on open-file-description locks, which the kernel releases "
            f"when a process dies; this platform ({sys.platform}) has none",
        )


def runtime_dir(directory: str | os.PathLike[str] | None = None, create: bool = True) -> Path:
    """The runtime directory (see the module docstring), created if `create`.

    Raises ``OSError`` saying what to do if it cannot be created or written.
    """
    if directory is None:
        directory = os.environ.get(ENV_DIR) or None
    if directory is None:
        name = f"mppool-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else None
        path = (base or Path(tempfile.gettempdir())) / name
    else:
        path = Path(directory)
    if create:
        try:
            if not path.is_dir():  # raises if a parent is not ours to enter
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise type(exc)(
                exc.errno,
                f"cannot create mppool's runtime directory {str(path)!r}: {exc.strerror}; "
                f"set {ENV_DIR} to a directory every process of the application can write",
            ) from None
    if create and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES,
            f"mppool's runtime directory {str(path)!r} is not writable by this process "
            f"(uid {os.getuid()}); give it group write permission for every process of "
            f"the application, or set {ENV_DIR} to one that is",
        )
    return path


# -- OFD locks ---------------------------------------------------------------------


def _flock(kind: int, start: int, length: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0)


def try_lock(fd: int, start: int, length: int = 1, exclusive: bool = True) -> bool:
    """Take an OFD lock on bytes [start, start+length) of `fd` without waiting."""
    _require()
    kind = _F_WRLCK if exclusive else _F_RDLCK
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _flock(kind, start, length))  # type: ignore[arg-type]
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def unlock(fd: int, start: int, length: int = 1) -> None:
    """Release an OFD lock taken through `fd` (never on an inherited descriptor)."""
    _require()
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(_F_UNLCK, start, length))  # type: ignore[arg-type]


def lock_held(fd: int, start: int, length: int = 1) -> bool:
    """True if another open file description holds a lock on those bytes."""
    return locked_range(fd, start, length) is not None


def locked_range(fd: int, start: int, length: int = 1) -> tuple[int, int] | None:
    """(start, end) of one lock another open file description holds on those bytes, or None.

    The kernel reports one conflicting lock, not necessarily the first; its
    range may reach beyond the bytes asked about (adjacent locks of one owner
    are merged).
    """
    _require()
    got = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(_F_WRLCK, start, length))  # type: ignore[arg-type]
    kind, _, lock_start, lock_len, _ = struct.unpack(_FLOCK, got)
    if kind == _F_UNLCK:
        return None
    return lock_start, (lock_start + lock_len if lock_len else start + length)


def count_locked(fd: int, start: int, length: int) -> int:
    """How many of bytes [start, start+length) other open file descriptions lock.

    About two ``fcntl`` calls per locked range: the kernel answers one
    conflicting lock at a time, so the range is split around each.
    """
    found = 0
    todo = [(start, start + length)]
    while todo:
        low, high = todo.pop()
        if low >= high:
            continue
        got = locked_range(fd, low, high - low)
        if got is None:
            continue
        lock_low, lock_high = max(low, got[0]), min(high, got[1])
        found += lock_high - lock_low
        todo.append((low, lock_low))
        todo.append((lock_high, high))
    return found


# -- this process's record -------------------------------------------------------

_MAGIC = b"MPPR"
_VERSION = 1
_HEADER = struct.Struct("<4sHHQQ")  # magic, version, pad, sequence number, payload length
_SIZE = 64 * 1024  # a sparse file: untouched pages cost nothing
_MAX_PAYLOAD = _SIZE - _HEADER.size
_LIVE_BYTE = _SIZE  # the byte past the data, locked by the owner while it lives

_role: str | None = None


def set_role(role: str | None) -> None:
    """Say what this process is ("gunicorn worker", "celery child"...): the hooks call it."""
    global _role
    _role = role
    if _records_pid[0] == os.getpid():
        for record in _records.values():
            record.role = role


class ProcessRecord:
    """This process's file in the runtime directory: written in place, read by all.

    One per process and directory, made on first use by `current`. It holds a
    JSON document of sections, one per feature (`publish`); a reader
    (`read_records`) gets them with the writer's pid and role, and the time the
    record was last written.
    """

    def __init__(self, directory: Path) -> None:
        _require()
        self.directory = directory
        token = secrets.token_hex(8)
        self.path = directory / f"proc-{token}.rec"
        self.role: str | None = _role
        self._lock = threading.Lock()
        # Made under another name and renamed once locked: a reader that found
        # it before the lock would take it for a dead process's and remove it.
        making = directory / f".making-{token}"
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _SIZE + 1)
            if not try_lock(fd, _LIVE_BYTE):
                raise OSError(errno.EBUSY, f"{making} is locked by another process")
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            os.rename(making, self.path)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(making)
            raise
        self._fd = fd
        self._seq = 0
        self._sections: dict[str, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def current(directory: Path | None = None, create: bool = True) -> ProcessRecord | None:
        """This process's record in `directory` (the runtime directory if None)."""
        if directory is None:
            directory = runtime_dir(create=create)
        if _records_pid[0] != os.getpid():  # forked without the at-fork hooks (a C fork)
            _forget_records()
        with _records_lock:
            found = _records.get(directory)
            if found is None and create:
                found = _records[directory] = ProcessRecord(directory)
            return found

    def _disown(self) -> None:
        # Close, never unlock: the OFD lock is shared with the parent, whose
        # record it keeps alive. Unmapped, so that no write can reach it.
        with contextlib.suppress(Exception):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def publish(self, section: str, value: Any) -> None:
        """Set one section of this process's record (``"pools"``, ``"budgets"``...)
        to `value` (JSON-serialisable) and write the record.

        Each feature owns a section; the record holds the latest value of each.
        """
        with self._lock:
            if self._pid != os.getpid():
                return  # an inherited record: never written by the child
            self._sections[section] = value
            data = json.dumps(
                {"pid": self._pid, "role": self.role, "updated": time.time(), **self._sections},
                separators=(",", ":"),
            ).encode()
            if len(data) > _MAX_PAYLOAD:
                raise ValueError(f"record of {len(data)} bytes exceeds {_MAX_PAYLOAD}")
            m = self._map
            self._seq += 1  # odd: being written
            m[: _HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, 0, self._seq, len(data))
            m[_HEADER.size : _HEADER.size + len(data)] = data
            self._seq += 1  # even: complete
            m[: _HEADER.size] = _HEADER.pack(_MAGIC, _VERSION, 0, self._seq, len(data))

    def close(self) -> None:
        """Remove the record (at a clean exit)."""
        with self._lock:
            if self._pid != os.getpid():
                return
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self._disown()


_records: dict[Path, ProcessRecord] = {}
_records_pid = [os.getpid()]
_records_lock = threading.Lock()


def _close_records_at_exit() -> None:
    if _records_pid[0] != os.getpid():
        return
    for record in list(_records.values()):
        record.close()


atexit.register(_close_records_at_exit)


def _forget_records() -> None:
    """In a forked child: the parent's records are not ours.

    Run by the at-fork hook, before any other thread exists in the child; the
    pid check in `ProcessRecord.current` calls it for a fork without hooks.
    The dictionary is copied before anything releases the GIL: the publisher
    thread and a budget may look for the record at once (iterating it while
    another thread cleared it raised RuntimeError in a gunicorn worker).
    """
    global _records_lock
    if _records_pid[0] == os.getpid():  # forgotten already (another hook asked first)
        return
    _records_lock = threading.Lock()
    _records_pid[0] = os.getpid()
    inherited = list(_records.values())
    _records.clear()
    for record in inherited:
        record._disown()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_records)


def _forget_role() -> None:
    # A forked child is not what its parent is (a gunicorn worker is no master):
    # its hooks say what it is, if any.
    global _role
    _role = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_role)


@dataclass
class PublishedRecord:
    """A record as a reader sees it."""

    pid: int
    role: str | None
    updated: float
    payload: dict[str, Any]  # section -> value
    path: Path


def read_records(directory: Path | None = None, clean: bool = True) -> list[PublishedRecord]:
    """Every live process's record in the directory.

    A record whose owner is gone (its lock died with it) is skipped, and removed
    if `clean`; one being written or torn is skipped.
    """
    _require()
    if directory is None:
        directory = runtime_dir(create=False)
    records = []
    for path in sorted(_record_paths(directory)):
        record = _read_one(path, clean)
        if record is not None:
            records.append(record)
    if clean:
        _remove_unfinished(directory)
    return records


# A record is made under a temporary name, locked, then renamed (see
# ProcessRecord): one left under that name belongs to a process killed in
# between. Its maker locks it within microseconds of creating it, so an
# unlocked one this old has no maker left.
_UNFINISHED_AGE = 60.0


def _remove_unfinished(directory: Path) -> None:
    try:
        leftovers = list(directory.glob(".making-*"))
    except OSError:
        return
    for path in leftovers:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if time.time() - os.fstat(fd).st_mtime > _UNFINISHED_AGE and not lock_held(
                fd, _LIVE_BYTE
            ):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _record_paths(directory: Path) -> Iterator[Path]:
    try:
        yield from directory.glob("proc-*.rec")
    except OSError:
        return


def _read_one(path: Path, clean: bool) -> PublishedRecord | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if not lock_held(fd, _LIVE_BYTE):
            if clean:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return None
        for _ in range(3):  # a record being written: read again
            head = os.pread(fd, _HEADER.size, 0)
            if len(head) < _HEADER.size:
                return None
            magic, version, _, seq, length = _HEADER.unpack(head)
            if magic != _MAGIC or version != _VERSION or length > _MAX_PAYLOAD:
                return None
            if seq % 2:
                time.sleep(0.001)
                continue
            data = os.pread(fd, length, _HEADER.size)
            if _HEADER.unpack(os.pread(fd, _HEADER.size, 0))[3] != seq:
                continue  # written meanwhile: torn
            try:
                doc = json.loads(data)
            except ValueError:
                return None
            return PublishedRecord(
                pid=int(doc.pop("pid", 0)),
                role=doc.pop("role", None),
                updated=float(doc.pop("updated", 0.0)),
                payload=doc,
                path=path,
            )
        return None
    finally:
        os.close(fd)
