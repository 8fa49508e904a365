"""The kit's one error type: a bad input or state, said in one line (the CLI prints it)."""

from __future__ import annotations


class KitError(Exception):
    """A data path, model folder, expert artifact or option the kit cannot use."""
