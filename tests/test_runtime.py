"""The runtime directory and per-process records, with real processes."""

from __future__ import annotations

import os
import signal
import stat
import time
from pathlib import Path

import pytest
from forkutil import in_child, start_child
from polling import wait_until

from mppool import runtime

pytestmark = pytest.mark.skipif(not runtime.supported(), reason="needs Linux OFD locks")


def test_directory_from_the_environment_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "rt"
    monkeypatch.setenv(runtime.ENV_DIR, str(target))
    assert runtime.runtime_dir() == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_default_directory_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(runtime.ENV_DIR, raising=False)
    path = runtime.runtime_dir(create=False)
    assert path.name == f"mppool-{os.getuid()}"


def test_unwritable_directory_says_what_to_do(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="MPPOOL_RUNTIME_DIR"):
        runtime.runtime_dir(locked)


def test_uncreatable_directory_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="MPPOOL_RUNTIME_DIR"):
        runtime.runtime_dir(blocker / "sub")


def test_a_record_is_read_by_another_process(tmp_path: Path) -> None:
    def child() -> list[tuple[int, object]]:
        return [(r.pid, r.payload) for r in runtime.read_records(tmp_path)]

    record = runtime.ProcessRecord.current(tmp_path)
    assert record is not None
    record.publish("pools", [{"name": "orders"}])
    assert in_child(child) == [(os.getpid(), {"pools": [{"name": "orders"}]})]


def test_a_killed_process_record_is_ignored_and_removed(tmp_path: Path) -> None:
    def child() -> None:
        record = runtime.ProcessRecord.current(tmp_path)
        assert record is not None
        record.publish("pools", [])
        os.write(w, b"x")
        time.sleep(60)  # until killed

    r, w = os.pipe()
    pid, fd = start_child(child)
    try:
        assert os.read(r, 1) == b"x"
        assert [rec.pid for rec in runtime.read_records(tmp_path)] == [pid]
        os.kill(pid, signal.SIGKILL)  # no cleanup code runs
        os.waitpid(pid, 0)
        assert runtime.read_records(tmp_path) == []
        assert not list(tmp_path.glob("proc-*.rec")), "the dead record was not removed"
    finally:
        os.close(fd)
        os.close(r)
        os.close(w)


def test_a_child_writes_a_record_of_its_own_and_keeps_the_parents_alive(
    tmp_path: Path,
) -> None:
    record = runtime.ProcessRecord.current(tmp_path)
    assert record is not None
    record.publish("who", "parent")

    def child() -> list[object]:
        inherited = runtime.ProcessRecord.current(tmp_path)
        assert inherited is not None and inherited is not record
        record.publish("who", "child via the parent's object")  # must write nothing
        inherited.publish("who", "child")
        return sorted(str(r.payload["who"]) for r in runtime.read_records(tmp_path))

    assert in_child(child) == ["child", "parent"]
    (mine,) = runtime.read_records(tmp_path)  # the child's is gone with it
    assert mine.payload == {"who": "parent"} and mine.pid == os.getpid()


def test_a_record_being_written_is_skipped_not_garbage(tmp_path: Path) -> None:
    record = runtime.ProcessRecord.current(tmp_path)
    assert record is not None
    record.publish("n", 1)
    header = runtime._HEADER
    magic, version, pad, seq, length = header.unpack(record._map[: header.size])
    record._map[: header.size] = header.pack(magic, version, pad, seq + 1, length)  # odd
    record._map[header.size : header.size + 4] = b"\xff\xfe\x00!"
    assert runtime.read_records(tmp_path) == []
    record.publish("n", 2)
    assert [r.payload for r in runtime.read_records(tmp_path)] == [{"n": 2}]


def test_a_record_being_made_is_not_taken_for_a_dead_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reader looks at the worst moment: the file made, its lock not yet taken.
    real = runtime.try_lock

    def a_reader_first(fd: int, start: int, length: int = 1, exclusive: bool = True) -> bool:
        runtime.read_records(tmp_path)  # removes what it takes for a dead process's record
        return real(fd, start, length, exclusive)

    monkeypatch.setattr(runtime, "try_lock", a_reader_first)
    record = runtime.ProcessRecord(tmp_path)
    monkeypatch.undo()
    record.publish("n", 1)
    assert [r.payload for r in runtime.read_records(tmp_path)] == [{"n": 1}]
    assert [p.name for p in tmp_path.iterdir()] == [record.path.name]
    record.close()


def test_a_record_whose_maker_died_before_naming_it_is_removed(tmp_path: Path) -> None:
    """Left under its temporary name by a process killed between making and renaming it."""
    old = time.time() - 2 * runtime._UNFINISHED_AGE
    dead = tmp_path / ".making-dead"
    dead.write_bytes(b"\0" * 8)
    os.utime(dead, (old, old))
    fresh = tmp_path / ".making-fresh"  # its maker may be about to lock it
    fresh.write_bytes(b"\0" * 8)
    held = tmp_path / ".making-held"  # a maker stopped (SIGSTOP) before renaming
    held.write_bytes(b"\0" * (runtime._LIVE_BYTE + 1))
    os.utime(held, (old, old))
    fd = os.open(held, os.O_RDWR)
    try:
        assert runtime.try_lock(fd, runtime._LIVE_BYTE)
        assert runtime.read_records(tmp_path) == []
        assert sorted(p.name for p in tmp_path.iterdir()) == [".making-fresh", ".making-held"]
        assert runtime.read_records(tmp_path, clean=False) == []
    finally:
        os.close(fd)
    runtime.read_records(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".making-fresh"]


def test_sections_are_kept_side_by_side(tmp_path: Path) -> None:
    record = runtime.ProcessRecord.current(tmp_path)
    assert record is not None
    record.publish("pools", [1])
    record.publish("budgets", {"b": 2})
    record.publish("pools", [3])
    (mine,) = runtime.read_records(tmp_path)
    assert mine.payload == {"pools": [3], "budgets": {"b": 2}}


def test_records_removed_at_clean_exit(tmp_path: Path) -> None:
    def child() -> bool:
        record = runtime.ProcessRecord.current(tmp_path)
        assert record is not None
        record.publish("pools", [])
        runtime._close_records_at_exit()
        return any(tmp_path.glob("proc-*.rec"))

    assert in_child(child) is False
    wait_until(lambda: not list(tmp_path.glob("proc-*.rec")), what="no record left")


def test_count_locked_counts_other_descriptions_bytes_merged_or_not(tmp_path: Path) -> None:
    path = tmp_path / "locks"
    path.write_bytes(b"")
    mine, theirs, probe = (os.open(path, os.O_RDWR) for _ in range(3))
    try:
        for byte in (3, 4, 5, 9):  # 3..5 merge into one lock of 3 bytes
            assert runtime.try_lock(theirs, byte)
        assert runtime.try_lock(mine, 7)
        assert runtime.count_locked(probe, 0, 20) == 5
        assert runtime.count_locked(mine, 0, 20) == 4  # its own lock is not "another's"
        assert runtime.count_locked(probe, 4, 5) == 3  # 4, 5 and 7: ranges clipped
        assert runtime.locked_range(probe, 10, 5) is None
    finally:
        for fd in (mine, theirs, probe):
            os.close(fd)
