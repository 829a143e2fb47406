"""Package metadata that must agree with itself, with the code and with the docs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import mppool

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def project() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["project"])


def test_one_version_everywhere(project: dict[str, Any]) -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert released, "CHANGELOG.md lists no released version"
    assert project["version"] == mppool.__version__ == released[0]
    done = subprocess.run(
        [sys.executable, "-m", "mppool", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == f"mppool {mppool.__version__}"


def test_changelog_has_an_unreleased_section_on_top() -> None:
    heads = re.findall(r"^## (.*)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert heads[0] == "[Unreleased]"


def test_license(project: dict[str, Any]) -> None:
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_python_classifiers_are_the_versions_checked(project: dict[str, Any]) -> None:
    """Each Python version claimed is one docs/platforms.md says was checked, and how."""
    claimed = {
        c.rsplit(" :: ", 1)[1]
        for c in project["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    platforms = (ROOT / "docs" / "platforms.md").read_text()
    checked = set(re.findall(r"^\| (3\.\d+) \| [^|]*\S[^|]* \|", platforms, re.M))
    assert claimed, "no Python version classifiers"
    assert claimed == checked
    low = min(claimed, key=lambda v: int(v.split(".")[1]))
    assert project["requires-python"] == f">={low}"


def test_psycopg_is_a_library_dependency(project: dict[str, Any]) -> None:
    """psycopg itself, the implementation left to the application; binary as an extra."""
    assert project["dependencies"] == ["psycopg>=3.3,<4"]
    extras = project["optional-dependencies"]
    assert extras["binary"] == ["psycopg[binary]>=3.3,<4"]
    with_binary = re.compile(r"mppool\[([a-z,]*,)?binary(,[a-z,]*)?\]")
    for extra in ("demo", "test", "bench"):
        assert any(with_binary.fullmatch(r) for r in extras[extra]), extra
