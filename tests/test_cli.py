"""The ``mppool`` command line: subcommands, options, exit statuses."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mppool
from mppool.cli import build_parser, main


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "doctor" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mppool {mppool.__version__}"


def test_demo_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.dsn, args.unsafe) == (None, False)
    assert (args.requests, args.tasks, args.workers) == (3000, 300, 4)


def test_demo_knobs() -> None:
    args = build_parser().parse_args(
        ["demo", "--dsn", "host=x", "--requests", "300", "--tasks", "30", "--unsafe"]
    )
    assert (args.dsn, args.requests, args.tasks, args.unsafe) == ("host=x", 300, 30, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--requests", "0"],
        ["demo", "--workers", "many"],
        ["doctor", "--workers", "0"],
        ["doctor", "--dsn", "host=x", "--max-size", "-1"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: mppool" in capsys.readouterr().err


def test_doctor_defaults() -> None:
    args = build_parser().parse_args(["doctor", "--dsn", "host=x"])
    assert args.max_size == 4
    assert args.workers >= 3  # 2 x CPUs + 1


def test_python_m_mppool() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mppool", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--dsn", "--unsafe", "--requests", "--tasks"):
        assert option in done.stdout
