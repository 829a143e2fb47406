"""The API reference (docs/reference.md, as mkdocs renders it) has every public name.

Public means: in the ``__all__`` of `mppool` or of a module users import, and,
for a class there, each of its attributes and methods not starting with ``_``
that mppool defines (inherited ones included: psycopg2's pools get ``getconn``
from a private base). A name counts as present when the rendered page has its
anchor, on the class itself or on a public base class rendered there too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = [
    "mppool",
    "mppool.hooks",
    "mppool.hooks.gunicorn",
    "mppool.hooks.celery",
    # Checked once they exist:
    "mppool.metrics",
    "mppool.django",
    "mppool.sqlalchemy",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("mkdocs", reason="the docs extra (in the test extra) builds the site")
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return (site / "reference" / "index.html").read_text()


def anchors(page: str) -> set[str]:
    return set(re.findall(r'id="(mppool[\w.]*)"', page))


def load(name: str) -> Any:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} does not exist yet")
    return importlib.import_module(name)


def public_members(cls: type) -> dict[str, type]:
    """Each public attribute mppool defines on `cls` or its bases, with the defining class."""
    found = {}
    for attr in dir(cls):
        if attr.startswith("_"):
            continue
        owner = next(k for k in cls.__mro__ if attr in vars(k))
        if owner.__module__.split(".")[0] == "mppool":
            found[attr] = owner
    return found


def public_classes() -> dict[type, str]:
    """Every class in a checked __all__, with the name it is documented under."""
    classes: dict[type, str] = {}
    for name in MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        for attr in module.__all__:
            obj = getattr(module, attr)
            if inspect.isclass(obj):
                classes.setdefault(obj, f"{name}.{attr}")
    return classes


@pytest.mark.parametrize("name", MODULES)
def test_every_name_in_all_is_in_the_reference(reference: str, name: str) -> None:
    module = load(name)
    ids = anchors(reference)
    missing = [f"{name}.{attr}" for attr in module.__all__ if f"{name}.{attr}" not in ids]
    assert not missing, f"not in docs/reference.md: {missing}"


@pytest.mark.parametrize("name", MODULES)
def test_every_public_member_is_in_the_reference(reference: str, name: str) -> None:
    module = load(name)
    ids = anchors(reference)
    documented = public_classes()
    missing = []
    for attr in module.__all__:
        cls = getattr(module, attr)
        if not inspect.isclass(cls):
            continue
        for member in public_members(cls):
            # On the class itself, or on a public base class the reference renders.
            places = [f"{documented[k]}.{member}" for k in cls.__mro__ if k in documented]
            if not any(place in ids for place in places):
                missing.append(f"{name}.{attr}.{member}")
    assert not missing, f"not in docs/reference.md: {missing}"


def test_the_reference_test_sees_inherited_methods() -> None:
    """What the issue found missing is among the names checked."""
    import mppool

    for cls in (mppool.SimpleConnectionPool, mppool.ThreadedConnectionPool):
        assert {"getconn", "putconn", "closeall", "managed"} <= set(public_members(cls))


@pytest.mark.parametrize("cls", ["ConnectionPool", "NullConnectionPool"])
def test_one_signature_per_class(reference: str, cls: str) -> None:
    """Not one per overload of __init__."""
    start = reference.index(f'id="mppool.{cls}"')
    end = reference.index(f'id="mppool.{cls}.', start)
    assert reference[start:end].count("doc-signature") == 1
