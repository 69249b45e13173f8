"""files.write_atomic: content, mode, and no temporary file left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vipfarm.files import write_atomic


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_text_and_bytes_replace_the_content(tmp_path: Path) -> None:
    path = tmp_path / "farm.toml"
    write_atomic(path, "first\n")
    assert path.read_text() == "first\n"
    write_atomic(path, b"\x00second")
    assert path.read_bytes() == b"\x00second"
    write_atomic(path, "é")
    assert path.read_bytes() == "é".encode()
    assert _names(tmp_path) == ["farm.toml"]


def test_the_mode_is_kept_or_set(tmp_path: Path) -> None:
    path = tmp_path / "farm.toml"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o7777 == 0o640
    write_atomic(path, "newer", mode=0o600)
    assert path.stat().st_mode & 0o7777 == 0o600
    assert _names(tmp_path) == ["farm.toml"]


def test_a_new_file_gets_the_mode_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o7777 == 0o640
    write_atomic(tmp_path / "b", "x", mode=0o604)
    assert (tmp_path / "b").stat().st_mode & 0o7777 == 0o604


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")

    def no_disk(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", no_disk)
    with pytest.raises(OSError, match="Input/output error"):
        write_atomic(path, "new")
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["state.json"]


def test_a_missing_directory_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "f", "x")
    assert _names(tmp_path) == []


def test_a_directory_in_the_way_leaves_no_temporary(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_atomic(tmp_path / "d", "x")
    assert _names(tmp_path) == ["d"]
