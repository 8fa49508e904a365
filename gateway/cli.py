"""The one `flexgate` entry point.

Each package owns its commands (engine.cli, audit.cli, governance.cli, gateway.serve); this
module only wires them together. Sub-commands are imported lazily so that `flexgate keys list`
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# command name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "serve": "gateway.serve_cli:serve",
    "db": "audit.cli:db",
    "audit": "audit.cli:audit",
    "principals": "governance.cli:principals",
    "keys": "governance.cli:keys",
    "experts": "governance.cli:experts",
    "licenses": "governance.cli:licenses",
    "generate": "engine.cli:generate",
    "model": "engine.cli:model",
    "expert": "engine.cli:expert",
    "demo": "engine.cli:demo",
}


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when invoked or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A package not yet built holds no command; anything else missing is a real error.
            if exc.name == module_name:
                return None
            raise
        command: Any = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None


@click.group(
    cls=LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 done; 1 audit evidence does not verify; 2 bad input; 3 database, "
    "key or model not usable; 4 refused by the current state (docs/cli.md).",
)
@click.version_option(package_name="flexgate")
def cli() -> None:
    """FlexGate: serve FlexOlmo models under data-owner control."""


def main() -> None:
    cli(prog_name="flexgate")


if __name__ == "__main__":
    main()
