"""mppool.metrics.PoolCollector: the host's pools in Prometheus form, OpenTelemetry names."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from forkutil import in_child
from polling import wait_until

from mppool import ConnectionPool, hoststats, runtime

prometheus_client = pytest.importorskip("prometheus_client")
from mppool.metrics import PoolCollector, exposition  # noqa: E402

pytestmark = pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")

NAMES = [
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_idle_min",
    "db_client_connection_idle_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "db_client_connection_wait_time_seconds_bucket",
    "db_client_connection_use_time_seconds_bucket",
    "db_client_connection_create_time_seconds_bucket",
]


def samples(text: str, name: str) -> dict[str, float]:
    """`name`'s samples in exposition `text`: {label text: value}."""
    found = {}
    for line in text.splitlines():
        m = re.match(rf"{name}\{{(.*)\}} (\S+)$", line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


def hold_and_collect(dsn: str, rt: Path, per_process: bool = True) -> str:
    """In a child: a pool 'orders' with one connection lent, one idle; the collector's text."""

    def child() -> str:
        pool = ConnectionPool(dsn, min_size=2, name="orders", open=True)
        pool.wait(timeout=20)
        conn = pool.getconn()
        wait_until(
            lambda: [p for p in hoststats.read_pools(rt) if p.name == "orders" and p.row["used"]]
        )
        registry = prometheus_client.CollectorRegistry()
        registry.register(PoolCollector(per_process=per_process))
        text = prometheus_client.generate_latest(registry).decode()
        pool.putconn(conn)
        pool.close()
        return text

    return str(in_child(child))


def test_collector_in_a_fresh_registry(dsn: str, rt: Path) -> None:
    text = hold_and_collect(dsn, rt)
    count = {k: v for k, v in samples(text, "db_client_connection_count").items() if "orders" in k}
    (used,) = [v for k, v in count.items() if 'state="used"' in k]
    (idle,) = [v for k, v in count.items() if 'state="idle"' in k]
    assert (used, idle) == (1.0, 1.0)
    assert all(re.search(r'pid="\d+"', k) and 'pool_name="orders"' in k for k in count)
    for name in NAMES:
        assert samples(text, name), f"{name} missing"
    buckets = samples(text, "db_client_connection_wait_time_seconds_bucket")
    assert any('le="+Inf"' in k for k in buckets) and any('le="0.0"' in k for k in buckets)
    assert "# TYPE db_client_connection_timeouts_total counter" in text
    assert "# TYPE db_client_connection_use_time_seconds histogram" in text


def test_per_process_false_drops_the_pid_label(dsn: str, rt: Path) -> None:
    text = hold_and_collect(dsn, rt, per_process=False)
    count = samples(text, "db_client_connection_count")
    assert count['pool_name="orders",state="used"'] >= 1.0
    assert not any("pid=" in k for k in count)


def test_registering_twice_is_refused_as_with_any_collector(rt: Path) -> None:
    registry = prometheus_client.CollectorRegistry()
    registry.register(PoolCollector())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(PoolCollector())


def test_a_missing_directory_gives_names_and_no_samples(tmp_path: Path) -> None:
    text = exposition(tmp_path / "nowhere")
    assert "# TYPE db_client_connection_count gauge" in text
    assert not samples(text, "db_client_connection_count")


def test_stats_prometheus_prints_the_same_exposition(dsn: str, rt: Path) -> None:
    def child() -> tuple[str, str]:
        pool = ConnectionPool(dsn, min_size=1, name="orders", open=True)
        pool.wait(timeout=20)
        with pool.connection():
            pass
        wait_until(lambda: [p for p in hoststats.read_pools(rt) if p.name == "orders"])
        done = subprocess.run(
            [sys.executable, "-m", "mppool", "stats", "--prometheus"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        pool.close()
        return done.stdout, exposition()

    printed, direct = in_child(child)
    assert [line for line in printed.splitlines() if line.startswith("#")] == [
        line for line in direct.splitlines() if line.startswith("#")
    ]
    assert samples(printed, "db_client_connection_max") == samples(
        direct, "db_client_connection_max"
    )


def test_without_prometheus_client_the_command_says_what_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from mppool.cli import main\n"
        "sys.exit(main(['stats', '--prometheus', '--dir', sys.argv[1]]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert 'pip install "mppool[prometheus]"' in done.stderr


def test_importing_metrics_without_prometheus_client_says_what_to_install() -> None:
    code = "import sys; sys.modules['prometheus_client'] = None\nimport mppool.metrics\n"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert done.returncode == 1 and 'pip install "mppool[prometheus]"' in done.stderr
