"""A data owner's documents: every text file under the paths given, one document per file.

Files that are not UTF-8 (binaries, other encodings) and empty files are skipped and counted,
never fatal: a real corpus folder holds a few of both. A path that is missing or unreadable, or
paths that hold no text at all, are errors: training on nothing must not look like success.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kit.errors import KitError

__all__ = ["Documents", "read_documents"]


@dataclass
class Documents:
    """Texts read from data paths, and what was skipped."""

    texts: list[str] = field(default_factory=list)
    files: int = 0
    skipped_not_utf8: int = 0
    skipped_empty: int = 0

    @property
    def chars(self) -> int:
        return sum(len(t) for t in self.texts)

    def summary(self) -> str:
        return (
            f"{len(self.texts)} documents ({self.chars:,} characters) from {self.files} files; "
            f"skipped {self.skipped_not_utf8} not UTF-8, {self.skipped_empty} empty"
        )


def _files_under(path: Path) -> Iterable[Path]:
    if path.is_file():
        yield path
        return
    for root, dirs, names in os.walk(path, onerror=_raise):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def _raise(exc: OSError) -> None:
    raise KitError(f"{exc.filename}: cannot read ({exc.strerror})")


def read_documents(paths: Sequence[str | Path]) -> Documents:
    """Read every file under ``paths`` (files or folders, recursively, in sorted order)."""
    if not paths:
        raise KitError("no data path given")
    docs = Documents()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise KitError(f"{path}: no such file or folder")
        if not os.access(path, os.R_OK):
            raise KitError(f"{path}: not readable (permission denied)")
        for file in _files_under(path):
            try:
                data = file.read_bytes()
            except OSError as exc:
                raise KitError(f"{file}: cannot read ({exc.strerror})") from exc
            docs.files += 1
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                docs.skipped_not_utf8 += 1
                continue
            if not text.strip():
                docs.skipped_empty += 1
                continue
            docs.texts.append(text)
    if not docs.texts:
        where = ", ".join(str(p) for p in paths)
        raise KitError(f"{where}: no text to train on ({docs.summary()})")
    return docs
