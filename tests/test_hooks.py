"""mppool.hooks' actions on every managed pool of a process, whatever its class.

Run in a process of their own (tests/apps/probe_actions.py), driven step by
step: in this one, they would act on every other test's live pools too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from helpers_procs import ROOT, app_env, new_tag, wait_until


class Probe:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the probe exited: {self.proc.wait(10)}"
        result: dict[str, Any] = json.loads(line)
        return result

    def do(self, step: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(step + "\n")
        self.proc.stdin.flush()
        return self.read()


@pytest.fixture
def probe(tls_dsn: str) -> Iterator[tuple[Probe, str]]:
    tag = new_tag()
    env = app_env(MPPOOL_TEST_APP_DSN=tls_dsn, MPPOOL_TEST_APP_TAG=tag)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "apps" / "probe_actions.py")],
        env=env,
        cwd=str(ROOT),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        p = Probe(proc)
        assert p.read() == {"ready": True}
        yield p, tag
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # the probe closes its last pool and exits
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def counts(pg: Any, tag: str) -> dict[str, int]:
    """Connections by pool name (the probe names them ``<tag>:<pool>``)."""
    found: dict[str, int] = {}
    for name, _ in pg.sessions(tag + ":"):
        pool = name.split(":", 1)[1]
        found[pool] = found.get(pool, 0) + 1
    return found


def wait_counts(pg: Any, tag: str, expected: dict[str, int]) -> None:
    wait_until(
        lambda: counts(pg, tag) == expected, 20, lambda: f"{expected}, have {counts(pg, tag)}"
    )


def test_actions_on_every_pool_class(pg: Any, probe: tuple[Probe, str]) -> None:
    p, tag = probe
    wait_counts(pg, tag, {"psycopg2": 1, "unmanaged": 1})
    assert p.do("managed")["result"] == 3  # unmanaged left out

    # open: the pool fills to min_size in the background; the others are ready.
    assert p.do("open")["result"] == 3
    wait_counts(pg, tag, {"pool": 2, "psycopg2": 1, "unmanaged": 1})

    # disconnect: no connection left in the managed pools, all still open.
    step = p.do("disconnect")
    assert step["result"] == 3 and not any(step["closed"].values())
    wait_counts(pg, tag, {"unmanaged": 1})

    assert p.do("open")["result"] == 3
    wait_counts(pg, tag, {"pool": 2, "unmanaged": 1})

    # close: the managed pools only; opening again skips them without an error.
    step = p.do("close")
    assert step["result"] == 3
    assert step["closed"] == {"pool": True, "null": True, "psycopg2": True, "unmanaged": False}
    wait_counts(pg, tag, {"unmanaged": 1})
    assert p.do("open")["result"] == 0
    wait_counts(pg, tag, {"unmanaged": 1})
