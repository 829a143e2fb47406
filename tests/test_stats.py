"""Published statistics and `mppool stats`, with real processes and the real server."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from forkutil import finish_child, in_child, start_child
from helpers_observe import assert_busy_row, named, stats_cmd
from helpers_procs import default_interrupts
from polling import wait_until

from mppool import (
    ConnectionPool,
    PoolTimeout,
    ThreadedConnectionPool,
    hoststats,
    ondemand,
    runtime,
)
from mppool import publish as publish_mod

pytestmark = pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")


class Holder:
    """A forked process with a pool named `name` holding one connection lent, one idle,
    until killed or told to go."""

    def __init__(self, dsn: str, name: str = "orders") -> None:
        self.ready_r, ready_w = os.pipe()
        go_r, self.go_w = os.pipe()

        def child() -> None:
            pool = ConnectionPool(dsn, min_size=2, name=name, open=True)
            pool.wait(timeout=20)
            conn = pool.getconn()
            os.write(ready_w, b"x")
            os.read(go_r, 1)
            pool.putconn(conn)
            pool.close()

        self.pid, self.fd = start_child(child)
        os.close(ready_w)
        os.close(go_r)

    def wait_ready(self) -> None:
        ready = select.select([self.ready_r], [], [], 30)[0]
        assert ready and os.read(self.ready_r, 1) == b"x", f"child {self.pid} failed"

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.pid = 0

    def close(self) -> None:
        if self.pid:
            os.write(self.go_w, b"x")
            os.waitpid(self.pid, 0)
        for fd in (self.fd, self.ready_r, self.go_w):
            os.close(fd)


@pytest.fixture
def holders(dsn: str) -> Iterator[Callable[[int], list[Holder]]]:
    made: list[Holder] = []

    def make(n: int) -> list[Holder]:
        for _ in range(n):
            made.append(Holder(dsn))
        for holder in made:
            holder.wait_ready()
        return made

    yield make
    for holder in made:
        holder.close()


def test_three_processes_listed_then_a_killed_one_gone(
    rt: Path, holders: Callable[[int], list[Holder]]
) -> None:
    procs = holders(3)
    pids = {h.pid for h in procs}

    def listed() -> dict[int, dict[str, Any]]:
        found = {p.pid: hoststats.as_json(p) for p in named(rt, "orders") if p.pid in pids}
        ok = len(found) == 3 and all(r["used"] == 1 and r["idle"] >= 1 for r in found.values())
        return found if ok else {}

    wait_until(listed, timeout=1.0, what="3 processes with 1 used and 1 idle, within a second")
    out = json.loads(stats_cmd("--json").stdout)
    rows = [r for r in out["pools"] if r["pid"] in pids and r["name"] == "orders"]
    assert len(rows) == 3
    for row in rows:
        assert tuple(row) == hoststats.JSON_KEYS
        assert (row["min"], row["max"], row["size"], row["used"], row["waiting"]) == (
            2,
            2,
            2,
            1,
            0,
        )
        assert row["requests"] >= 1 and row["timeouts"] == 0 and row["errors"] == 0
        assert row["budget"] is None and row["role"] is None
        assert abs(row["updated"] - time.time()) < 60

    victim = procs[0]
    gone = victim.pid
    victim.kill()
    wait_until(
        lambda: gone not in {p.pid for p in hoststats.read_pools(rt)},
        timeout=2.0,
        what="the killed process gone from the list within 2 s",
    )
    listed_now = {r["pid"] for r in json.loads(stats_cmd("--json").stdout)["pools"]}
    assert gone not in listed_now and pids - {gone} <= listed_now
    assert len(list(rt.glob("proc-*.rec"))) == len(runtime.read_records(rt))  # cleaned up


def test_table_and_host_totals(rt: Path, holders: Callable[[int], list[Holder]]) -> None:
    holders(2)
    wait_until(lambda: len([p for p in named(rt, "orders") if p.row["used"] == 1]) == 2)
    out = stats_cmd().stdout
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["PID", "ROLE", "POOL"]
    assert sum(" orders " in line for line in lines) == 2
    assert "connection(s)" in lines[-1] and "2 used" in lines[-1]


def test_budgets_carried_in_json_and_table(rt: Path, dsn: str) -> None:
    """Pools under a host budget show it (name, limit, slots used host-wide), and the
    table says which pids hold its slots, as their records tell."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def child() -> None:
        from mppool import HostBudget

        pool = ConnectionPool(
            dsn, min_size=2, name="budgeted", open=True, budget=HostBudget("shared", 5)
        )
        pool.wait(timeout=20)
        conn = pool.getconn()
        os.write(ready_w, b"x")
        os.read(go_r, 1)
        pool.putconn(conn)
        pool.close()

    kids = [start_child(child) for _ in range(2)]
    try:
        for _ in kids:
            assert select.select([ready_r], [], [], 30)[0], "a child did not start"
            os.read(ready_r, 1)
        pids = {pid for pid, _ in kids}

        seen: list[Any] = []

        def listed() -> list[hoststats.PublishedPool]:
            seen[:] = [(p.pid, p.row.get("used"), p.budget) for p in hoststats.read_pools(rt)]
            # By name: a child also rebuilds the open pools it inherited from pytest.
            found = [p for p in named(rt, "budgeted") if p.pid in pids]
            ok = len(found) == 2 and all(p.budget and p.budget["used"] == 4 for p in found)
            return found if ok else []

        wait_until(listed, 20, what=lambda: f"both pools with 4 slots used; seen {seen}")
        rows = json.loads(stats_cmd("--json").stdout)["pools"]
        rows = [r for r in rows if r["pid"] in pids and r["name"] == "budgeted"]
        assert len(rows) == 2
        assert all(r["budget"] == {"name": "shared", "limit": 5, "used": 4} for r in rows)
        text = stats_cmd().stdout
        assert "shared 4/5" in text
        (line,) = [x for x in text.splitlines() if x.startswith("budget 'shared'")]
        assert "limit 5, 4 used" in line
        for pid in pids:
            assert f"pid {pid}: 2" in line
    finally:
        os.write(go_w, b"x" * len(kids))
        for pid, fd in kids:
            finish_child(pid, fd)
        for f in (ready_r, ready_w, go_r, go_w):
            os.close(f)


def test_nothing_published_says_so_and_exits_0(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    done = stats_cmd("--dir", str(empty))
    assert "no pool publishes statistics" in done.stdout and "does not exist" in done.stdout
    done = stats_cmd("--json", "--dir", str(empty))
    assert json.loads(done.stdout) == {"pools": []}
    assert "no pool publishes statistics" in done.stderr


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--watch", "0"], "above 0"),
        (["--watch", "soon"], "not a number"),
        (["--json", "--prometheus"], "not allowed with"),
    ],
)
def test_command_line_mistakes_exit_2(args: list[str], match: str) -> None:
    done = stats_cmd(*args, check=False)
    assert done.returncode == 2 and match in done.stderr


def test_watch_repeats_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mppool",
            "stats",
            "--json",
            "--watch",
            "0.1",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=default_interrupts,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):
            assert json.loads(proc.stdout.readline()) == {"pools": []}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == -signal.SIGINT  # a shell shows 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torn_and_foreign_records_are_skipped(rt: Path, dsn: str) -> None:
    """A record being written (or torn by a writer killed mid-write), garbage, and
    rows of an unknown shape are skipped, never shown as garbage."""

    def writer(kind: str) -> Callable[[], None]:
        def child() -> None:
            record = runtime.ProcessRecord.current(rt)
            assert record is not None
            if kind == "torn":
                record.publish("pools", [{"name": "torn", "size": 1}])
                head = runtime._HEADER
                magic, version, pad, seq, length = head.unpack(record._map[: head.size])
                record._map[: head.size] = head.pack(magic, version, pad, seq + 1, length)
                record._map[head.size : head.size + 8] = b"\xff" * 8
            else:
                record.publish("pools", [42, {"no": "name"}, {"name": "odd", "size": "x"}])
            os.write(w, b"x")
            time.sleep(60)  # until killed

        return child

    rt.mkdir()
    r, w = os.pipe()
    kids = [start_child(writer("torn")), start_child(writer("odd"))]
    try:
        for _ in kids:
            assert select.select([r], [], [], 30)[0], "a writer did not start"
            assert os.read(r, 1) == b"x"
        out = json.loads(stats_cmd("--json").stdout)["pools"]
        assert [row["name"] for row in out] == ["odd"]
        assert "odd" in stats_cmd().stdout  # the table copes with odd values
        stats_cmd("--prometheus")
    finally:
        for pid, fd in kids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
        os.close(r)
        os.close(w)


def test_a_write_landing_during_a_read_is_read_again_not_mixed(
    rt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's data read is split around a whole write: without the sequence
    check after it, the reader would return half of each (valid JSON, wrong)."""
    rt.mkdir()
    monkeypatch.setattr(runtime.time, "time", lambda: 1_700_000_000.25)  # same-length writes
    record = runtime.ProcessRecord.current(rt)
    assert record is not None
    record.publish("pools", [{"name": "mixed", "same": [1_000_001] * 500}])
    real_pread = os.pread
    writes = [1_000_002]

    def pread(fd: int, n: int, offset: int) -> bytes:
        if offset == 0 or not writes:  # a header, or the write is done
            return real_pread(fd, n, offset)
        half = real_pread(fd, n // 2, offset)
        record.publish("pools", [{"name": "mixed", "same": [writes.pop()] * 500}])
        return half + real_pread(fd, n - n // 2, offset + n // 2)

    monkeypatch.setattr(runtime.os, "pread", pread)
    (read,) = runtime.read_records(rt)
    assert not writes  # the write did land in the middle of a read
    assert read.payload["pools"][0]["same"] == [1_000_002] * 500


def test_reads_racing_a_writer_get_whole_records_and_a_killed_writer_goes(rt: Path) -> None:
    """A writer rewrites its record as fast as it can; every record a reader gets is
    one whole write (each write is one number repeated, so a mix of two shows), and
    the writer killed in the middle of its stream of writes is gone at the next read."""
    rt.mkdir()
    ready_r, ready_w = os.pipe()

    def child() -> None:
        record = runtime.ProcessRecord.current(rt)
        assert record is not None
        time.time = lambda: 1_700_000_000.25  # same-length writes: a mix would parse
        os.write(ready_w, b"x")
        n = 1_000_000  # 7 digits throughout: every write has the same length
        while True:  # until killed
            n += 1
            record.publish("pools", [{"name": "racing", "same": [n] * 2000}])

    pid, fd = start_child(child)
    try:
        assert select.select([ready_r], [], [], 30)[0], "the writer did not start"
        whole, values = 0, set()
        for _ in range(1000):
            for record in runtime.read_records(rt, clean=False):
                (row,) = record.payload["pools"]
                assert len(set(row["same"])) == 1, "a torn record was returned"
                values.add(row["same"][0])
                whole += 1
        assert whole >= 100 and len(values) >= 10, (whole, len(values))  # it raced
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for f in (fd, ready_r, ready_w):
            os.close(f)
    assert runtime.read_records(rt) == []
    assert list(rt.glob("proc-*.rec")) == []  # the reader removed it


def test_a_parked_pool_publishes_its_next_checkout(rt: Path, dsn: str) -> None:
    """Once nothing changes, the publisher ends and parks the pool: the next checkout
    (on the fast path otherwise) takes the slow path once and is published."""

    def child() -> tuple[int, int]:
        pool = ConnectionPool(dsn, min_size=2, name="parked", open=True)
        pool.wait(timeout=20)
        job = publish_mod._publisher.thread
        wait_until(lambda: not job.running and pool._parked, what="publisher ended, pool parked")
        conn = pool.getconn()
        row = wait_until(lambda: [p.row for p in named(rt, "parked") if p.row["used"] == 1])[0]
        assert not pool._parked and pool._fast
        pool.putconn(conn)
        wait_until(lambda: [p for p in named(rt, "parked") if p.row["used"] == 0])
        pool.close()
        return row["used"], row["idle"]

    assert in_child(child) == (1, 1)


def test_psycopg2_pool_parked_checkout_is_published(rt: Path, dsn: str) -> None:
    def child() -> int:
        pool = ThreadedConnectionPool(1, 2, dsn)
        job = publish_mod._publisher.thread
        wait_until(lambda: not job.running and pool._parked, what="publisher ended, pool parked")
        conn = pool.getconn()  # the fast path, hooked while parked
        wait_until(lambda: [p for p in named(rt, pool.name) if p.row["used"] == 1])
        assert not pool._parked and not pool._key_hooks
        pool.putconn(conn)
        pool.closeall()
        return 1

    assert in_child(child) == 1


def test_waits_timeouts_and_errors_are_counted(rt: Path, dsn: str) -> None:
    def child() -> dict[str, Any]:
        pool = ConnectionPool(dsn, min_size=1, name="busy", open=True)
        pool.wait(timeout=20)
        held = pool.getconn()
        released = threading.Timer(0.3, pool.putconn, (held,))
        released.start()
        with pool.connection(timeout=10):  # waits ~0.3 s for the held one
            pass
        held = pool.getconn()
        with pytest.raises(PoolTimeout):
            pool.getconn(timeout=0.05)
        pool.putconn(held)
        pool.pop_stats()  # psycopg_pool's counters: the published ones go on
        row = wait_until(lambda: [p.row for p in named(rt, "busy") if p.row["timeouts"] == 1])[0]
        pool.close()
        return row

    row = in_child(child)
    assert_busy_row(row)


def test_a_child_publishes_its_own_and_leaves_the_parents(rt: Path, dsn: str) -> None:
    pool = ConnectionPool(dsn, min_size=1, name="family", open=True)
    try:
        pool.wait(timeout=20)
        with pool.connection():
            pass
        mine = wait_until(lambda: [p for p in named(rt, "family") if p.pid == os.getpid()])[0]

        def child() -> list[tuple[int, int]]:
            held = pool.getconn()  # the inherited pool, rebuilt: a connection of its own
            rows = wait_until(lambda: len(named(rt, "family")) == 2 and named(rt, "family"))
            pool.putconn(held)
            return sorted((p.pid, p.row["used"]) for p in rows)

        seen = in_child(child)
        assert (os.getpid(), mine.row["used"]) in seen and len(seen) == 2
        assert [p.pid for p in named(rt, "family")] == [os.getpid()]  # the child's is gone
    finally:
        pool.close()


def test_mppool_stats_0_publishes_nothing_and_starts_no_thread(
    rt: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(publish_mod.ENV_STATS, "0")

    def child() -> tuple[bool, bool, list[int]]:
        pool = ConnectionPool(dsn, min_size=1, name="quiet", open=True)
        pool.wait(timeout=20)
        for _ in range(3):
            with pool.connection():
                pass
        published = pool._published or pool._acct.use_hist is not None
        running = publish_mod._publisher.thread.running
        pids = [r.pid for r in runtime.read_records(rt)] if rt.exists() else []
        pool.close()
        return published, running, pids

    published, running, pids = in_child(child)
    assert not published and not running
    assert all(pid == os.getpid() for pid in pids)  # this process's own pools, if any


def test_unwritable_directory_is_logged_once_and_publishing_stops(
    tmp_path: Path, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(runtime.ENV_DIR, str(blocker / "rt"))  # cannot be created, even by root

    def child() -> tuple[list[str], bool]:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda rec: records.append(rec.getMessage())  # type: ignore[method-assign]
        logging.getLogger("mppool").addHandler(handler)
        pool = ConnectionPool(dsn, min_size=1, name="nowhere", open=True)
        pool.wait(timeout=20)
        wait_until(lambda: publish_mod._publisher.disabled, what="publishing off")
        for _ in range(20):  # the application goes on
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        second = ConnectionPool(dsn, min_size=1, name="nowhere2", open=True)
        second.wait(timeout=20)
        with second.connection():
            pass
        second.close()
        pool.close()
        return [m for m in records if "cannot publish" in m], publish_mod._publisher.thread.running

    warnings, running = in_child(child)
    assert len(warnings) == 1 and "MPPOOL_RUNTIME_DIR" in warnings[0]
    assert running is False


def test_roles_and_records_are_rewritten(rt: Path, dsn: str) -> None:
    def child() -> list[Any]:
        from mppool.hooks import _set_role

        pool = ConnectionPool(dsn, min_size=1, name="roles", open=True)
        pool.wait(timeout=20)
        wait_until(lambda: named(rt, "roles"))
        _set_role("celery child")
        wait_until(lambda: [p for p in named(rt, "roles") if p.role == "celery child"])

        def grandchild() -> Any:
            return runtime._role  # a fork forgets the role: its hooks set its own

        role_in_child = in_child(grandchild)
        pool.close()
        return [role_in_child]

    assert in_child(child) == [None]


def test_forking_waits_for_the_publisher_thread_to_end(rt: Path, dsn: str) -> None:
    """Before a fork the publisher thread ends, so that forking adds no thread."""

    def child() -> tuple[bool, bool, bool]:
        pool = ConnectionPool(dsn, min_size=1, name="forks", open=True)
        pool.wait(timeout=20)
        with pool.connection():
            pass  # a wait in the window: the publisher runs for a minute
        job = publish_mod._publisher.thread
        run = wait_until(lambda: job._run if job._run and job._run.native_id else None)
        task = str(run.native_id)
        before = task in os.listdir("/proc/self/task")
        ondemand._before_fork()
        during = task in os.listdir("/proc/self/task")  # as the kernel counts threads
        ondemand._after_fork_in_parent()
        restarted = job.running
        pool.close()
        return before, during, restarted

    assert in_child(child) == (True, False, True)


def test_the_hooks_name_each_process_role() -> None:
    def child() -> list[str | None]:
        from mppool.hooks import celery as celery_hooks
        from mppool.hooks import gunicorn as gunicorn_hooks

        seen = []
        gunicorn_hooks.when_ready(object())
        seen.append(runtime._role)
        gunicorn_hooks.post_fork(object(), object())
        seen.append(runtime._role)
        celery_hooks._on_worker_init(sender=None)
        seen.append(runtime._role)
        celery_hooks._on_worker_process_init()
        seen.append(runtime._role)
        return seen

    assert in_child(child) == ["gunicorn master", "gunicorn worker", "celery main", "celery child"]
