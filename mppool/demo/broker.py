"""The demo's celery configuration: the ``filesystem://`` broker, no broker server.

Shared by the worker's app (`mppool.demo.tasks`) and the demo's client, which
sends tasks by name and so never imports the tasks module (nor creates its pool).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["TASK_NAME", "make_app"]

TASK_NAME = "mppool_demo.record"


def make_app(data_dir: str | Path) -> Any:
    """A Celery app whose broker keeps its messages in files under `data_dir`."""
    celery: Any = importlib.import_module("celery")  # untyped: imported as Any
    base = Path(data_dir)
    folders = {name: base / name for name in ("queue", "processed", "control")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    app = celery.Celery("mppool_demo", broker="filesystem://", set_as_current=False)
    app.conf.update(
        broker_transport_options={
            # one folder in and out: the client writes where the worker reads
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "store_processed": True,  # else consumed messages pass through the system's /tmp
            "control_folder": str(folders["control"]),
            "polling_interval": 0.05,
        },
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
    )
    return app
