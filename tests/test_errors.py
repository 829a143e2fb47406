"""mppool's exceptions as psycopg_pool code sees them: caught by ``except psycopg_pool.X``
where psycopg_pool is installed, and nothing of psycopg_pool imported where it is not."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

import polling
import psycopg
import pytest

import mppool

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["PoolTimeout", "PoolClosed", "TooManyRequests"]

psycopg_pool = pytest.importorskip("psycopg_pool")


@pytest.mark.parametrize("name", NAMES)
def test_each_is_also_psycopg_pools(name: str) -> None:
    cls = getattr(mppool, name)
    assert issubclass(cls, getattr(psycopg_pool, name))
    assert issubclass(cls, mppool.PoolError)
    assert issubclass(cls, psycopg.OperationalError)
    assert cls.__module__ == "mppool"


def test_pool_error_is_not_a_psycopg_pool_error() -> None:
    """Only the three of the same name: psycopg_pool has no PoolError to match."""
    assert not issubclass(mppool.PoolError, psycopg.OperationalError)


def test_except_psycopg_pool_catches_a_real_timeout(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pool.connection():
        with pytest.raises(psycopg_pool.PoolTimeout) as caught:
            pool.getconn(timeout=0.1)
    assert type(caught.value) is mppool.PoolTimeout


def test_except_psycopg_pool_catches_a_closed_pool(make_pool: Any) -> None:
    pool = make_pool(min_size=1)
    pool.close()
    with pytest.raises(psycopg_pool.PoolClosed) as caught:
        pool.getconn()
    assert type(caught.value) is mppool.PoolClosed


def test_except_psycopg_pool_catches_too_many_requests(make_pool: Any) -> None:
    pool = make_pool(min_size=1, max_size=1, max_waiting=1)
    conn = pool.getconn()
    waiter_got: list[Any] = []
    waiter = threading.Thread(target=lambda: waiter_got.append(pool.getconn(timeout=30)))
    waiter.start()
    try:
        polling.wait_until(lambda: pool.get_stats()["requests_waiting"] == 1, 10, "a waiter")
        with pytest.raises(psycopg_pool.TooManyRequests) as caught:
            pool.getconn(timeout=1)
        assert type(caught.value) is mppool.TooManyRequests
    finally:
        pool.putconn(conn)
        waiter.join(30)
    pool.putconn(waiter_got[0])


# -- where psycopg_pool is not installed, or broken ------------------------------------


def site_without_psycopg_pool(tmp_path: Path) -> Path:
    """A directory of links to every installed distribution except psycopg_pool."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if entry.name.lower().startswith(("psycopg_pool", "psycopg-pool")):
            continue
        (view / entry.name).symlink_to(entry)
    return view


CHECK = """
import sys
import psycopg
import mppool
for name in ("PoolTimeout", "PoolClosed", "TooManyRequests"):
    cls = getattr(mppool, name)
    assert cls.__bases__ == (mppool.PoolError, psycopg.OperationalError), cls.__mro__
print("psycopg_pool" in sys.modules)
"""


def run_check(paths: list[Path]) -> str:
    # -S: no site-packages but the ones given, so psycopg_pool is really absent.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [*paths, ROOT])))
    done = subprocess.run(
        [sys.executable, "-S", "-c", CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_psycopg_pool_nothing_is_imported(tmp_path: Path) -> None:
    assert run_check([site_without_psycopg_pool(tmp_path)]) == "False"


def test_a_broken_psycopg_pool_does_not_break_mppool(tmp_path: Path) -> None:
    broken = tmp_path / "broken" / "psycopg_pool"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise RuntimeError('a psycopg_pool that cannot load')\n")
    assert run_check([broken.parent, site_without_psycopg_pool(tmp_path)]) == "False"
