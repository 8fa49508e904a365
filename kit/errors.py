"""The kit's errors: a bad input or state, said in one line (the CLI prints it).

Exit codes follow contracts.exit_codes (docs/cli.md): a path, folder, artifact or option the
kit cannot use is bad input (2); an output that exists without `--force`, or an interrupted
run with other settings, is refused by the current state (4). 1 stays the audit's "tampered".
"""

from __future__ import annotations

from typing import ClassVar

from contracts.exit_codes import ExitCode


class KitError(Exception):
    """A data path, model folder, expert artifact or option the kit cannot use."""

    exit_code: ClassVar[ExitCode] = ExitCode.USAGE


class KitRefused(KitError):
    """Valid input that the state on disk refuses (an existing output, a partial run with
    other settings); nothing was changed."""

    exit_code = ExitCode.REFUSED
