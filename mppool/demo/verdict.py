"""The demo's verdict and table: pure functions over what the demo observed.

A backend is identified by its pid *and* its start time: PostgreSQL reuses the
pids of backends that have exited (on Linux the pid space can be as small as
32768), and two sessions that merely had the same pid one after the other
shared nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Backend",
    "Observations",
    "ProcessReport",
    "Verdict",
    "format_notes",
    "format_stats",
    "format_table",
    "judge",
    "shared_backends",
]

Backend = tuple[int, str]
"""(backend pid, backend_start as text): one PostgreSQL session."""

MASTER = "master"
WORKER = "worker"
CELERY_MAIN = "celery main"
CELERY_CHILD = "celery child"
ROLE_ORDER = {MASTER: 0, WORKER: 1, CELERY_MAIN: 2, CELERY_CHILD: 3}


@dataclass
class ProcessReport:
    """One process of the demo: what it is, which sessions it used, what it served."""

    pid: int
    role: str
    backends: set[Backend] = field(default_factory=set)
    """Every session it opened (its pool's ``configure`` callback records them) or used."""
    served: int = 0
    """Requests answered (gunicorn workers) or tasks run (celery children)."""
    stats: dict[str, int] | None = None
    """Its pool's ``get_stats()``, as last reported."""


@dataclass
class Observations:
    """Everything a run of the demo saw, as plain data."""

    processes: list[ProcessReport]
    requests_sent: int = 0
    requests_ok: int = 0
    tasks_sent: int = 0
    tasks_done: int = 0
    errors: list[str] = field(default_factory=list)
    """One line per failed request or task (or worker log line naming an error)."""
    left_on_server: int = 0
    """Sessions with the demo's application_name still on the server after shutdown."""
    budget: int | None = None
    """``--budget``: the host budget the pools shared."""
    most_connections: int | None = None
    """The most server connections the demo's processes held at once (client-side
    sockets, sampled every 20 ms), if counted."""


@dataclass
class Verdict:
    ok: bool
    problems: list[str]
    findings: list[str]
    """What was checked, as sentences, whatever the outcome."""
    shared: dict[Backend, list[ProcessReport]]

    def render(self) -> str:
        head = "Verdict: CLEAN" if self.ok else "Verdict: PROBLEMS FOUND"
        lines = [head] + [f"  - {p}" for p in self.problems] + [f"  + {f}" for f in self.findings]
        return "\n".join(lines)


def shared_backends(processes: Iterable[ProcessReport]) -> dict[Backend, list[ProcessReport]]:
    """Every backend that more than one process used, with those processes."""
    users: dict[Backend, list[ProcessReport]] = {}
    for proc in processes:
        for backend in proc.backends:
            users.setdefault(backend, []).append(proc)
    return {b: procs for b, procs in sorted(users.items()) if len(procs) > 1}


def judge(obs: Observations) -> Verdict:
    """Clean when no backend served two processes, everything sent was answered
    without error, and nothing of the demo's was left on the server at the end."""
    problems: list[str] = []
    findings: list[str] = []
    shared = shared_backends(obs.processes)
    for backend, procs in shared.items():
        who = ", ".join(f"{p.pid} ({p.role})" for p in procs)
        problems.append(f"backend {backend[0]} served {len(procs)} processes: {who}")
    nbackends = len({b for p in obs.processes for b in p.backends})
    if not shared:
        findings.append(f"{nbackends} backends, each used by one process only")
    if obs.requests_ok < obs.requests_sent:
        problems.append(
            f"{obs.requests_sent - obs.requests_ok} of {obs.requests_sent} requests failed"
        )
    if obs.tasks_done < obs.tasks_sent:
        problems.append(f"{obs.tasks_sent - obs.tasks_done} of {obs.tasks_sent} tasks not done")
    if obs.errors:
        first = obs.errors[0]
        problems.append(f"{len(obs.errors)} errors, the first: {first}")
    if obs.requests_ok == obs.requests_sent and obs.tasks_done == obs.tasks_sent:
        findings.append(
            f"{obs.requests_ok}/{obs.requests_sent} requests answered, "
            f"{obs.tasks_done}/{obs.tasks_sent} tasks done"
        )
    if not obs.errors:
        findings.append("no errors")
    if obs.left_on_server:
        problems.append(f"{obs.left_on_server} sessions still on the server after shutdown")
    else:
        findings.append("nothing left on the server after shutdown")
    if obs.most_connections is not None:
        most = f"at most {obs.most_connections} server connections at once"
        if obs.budget is None:
            findings.append(most)
        elif obs.most_connections <= obs.budget:
            findings.append(f"{most}, within the host budget of {obs.budget}")
        else:
            problems.append(f"{most}: above the host budget of {obs.budget}")
    elif obs.budget is not None:
        findings.append(
            f"host budget {obs.budget}: connections not counted (the server is reached "
            "through a Unix socket, not TCP)"
        )
    return Verdict(ok=not problems, problems=problems, findings=findings, shared=shared)


_STAT_NAMES = (
    ("pool_size", "size"),
    ("pool_available", "idle"),
    ("requests_num", "req"),
    ("requests_queued", "queued"),
    ("connections_num", "opened"),
    ("connections_lost", "lost"),
    ("connections_errors", "conn_err"),
    ("requests_errors", "req_err"),
    ("returns_bad", "bad"),
    ("budget_used", "budget"),
)


def format_stats(stats: Mapping[str, int] | None) -> str:
    """A pool's ``get_stats()`` in a few words: ``size=2/4 idle=2 req=750 opened=2``."""
    if stats is None:
        return "-"
    words = []
    for key, name in _STAT_NAMES:
        if key not in stats:
            continue
        value = f"{stats[key]}"
        if key == "pool_size" and "pool_max" in stats:
            value += f"/{stats['pool_max']}"
        if key == "budget_used" and "budget_limit" in stats:
            value += f"/{stats['budget_limit']}"
        words.append(f"{name}={value}")
    return " ".join(words)


def _backend_list(backends: set[Backend], limit: int = 4) -> str:
    pids = sorted(b[0] for b in backends)
    text = ",".join(str(p) for p in pids[:limit])
    if len(pids) > limit:
        text += f",+{len(pids) - limit}"
    return text or "-"


def format_table(processes: Iterable[ProcessReport]) -> str:
    """One line per process: pid, role, backends used, requests or tasks served, pool stats."""
    procs = sorted(processes, key=lambda p: (ROLE_ORDER.get(p.role, 9), p.pid))
    head = ("pid", "role", "backends", "served", "pool stats")
    rows = [head] + [
        (str(p.pid), p.role, _backend_list(p.backends), str(p.served), format_stats(p.stats))
        for p in procs
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for r in rows:
        cells = [r[0].rjust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
        cells += [r[3].rjust(widths[3]), r[4]]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def format_notes(processes: Iterable[ProcessReport]) -> str:
    """What the table's backends column means, and why a process may show none."""
    lines = ["backends: every session the process's pool opened, or that it used; - none."]
    silent = sorted(p.pid for p in processes if p.stats is None and not p.backends)
    if silent:
        lines.append(
            f"-: {', '.join(map(str, silent))} reported nothing (a worker that answered no "
            "request has nobody to tell which backends it opened)."
        )
    return "\n".join(lines)
