from __future__ import annotations

from pathlib import Path

import pytest

from kit.documents import read_documents
from kit.errors import KitError


def test_reads_folders_recursively_and_counts_skipped(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "sub" / "b.md").write_text("second document")
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00\x81binary")
    (tmp_path / "empty.txt").write_text("  \n")
    docs = read_documents([tmp_path])
    assert docs.texts == ["hello world", "second document"]
    assert (docs.files, docs.skipped_not_utf8, docs.skipped_empty) == (4, 1, 1)
    assert "skipped 1 not UTF-8, 1 empty" in docs.summary()


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KitError, match="no such file or folder"):
        read_documents([tmp_path / "nope"])


def test_folder_without_text_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\x80\x81")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(KitError, match="no text to train on"):
        read_documents([tmp_path])
    with pytest.raises(KitError, match="no text"):
        read_documents([tmp_path / "e.txt"])


def test_no_path_is_an_error() -> None:
    with pytest.raises(KitError, match="no data path"):
        read_documents([])


def test_unreadable_file_in_a_folder_is_an_error(tmp_path: Path) -> None:
    # a dangling link is listed in its folder but cannot be read (root reads any mode bits)
    (tmp_path / "ok.txt").write_text("text")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing-target")
    with pytest.raises(KitError, match=r"gone\.txt: cannot read"):
        read_documents([tmp_path])
