"""Exit codes of every `flexgate` command, one meaning each (documented in docs/cli.md).

Scripts and auditors branch on these, so a code never changes meaning between commands:
1 is reserved for "the evidence does not verify" and nothing else uses it.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    """The command did what it was asked."""
    TAMPERED = 1
    """Audit verification ran and the ledger, an export or a checkpoint does not verify."""
    USAGE = 2
    """Bad input: arguments, option values, files (click's own usage errors are 2 as well)."""
    UNAVAILABLE = 3
    """A dependency is not usable: database unreachable, schema out of date, signing key or
    model unreadable. Nothing was checked or changed."""
    REFUSED = 4
    """Valid input that the current state refuses: not found, already exists, conflicts, or an
    operation that needs explicit consent. Nothing was changed."""


__all__ = ["ExitCode"]
