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
}

# group name -> sub-command name -> "module:attribute": groups whose sub-commands live in
# several packages (`model inspect` is the engine's, `model pretrain` the kit's).
GROUPS: dict[str, dict[str, str]] = {
    "model": {
        "inspect": "engine.cli:inspect_cmd",
        "pretrain": "kit.cli:pretrain_cmd",
        "merge": "kit.cli:merge_cmd",
        "router-tune": "kit.cli:router_tune_cmd",
        "eval": "kit.cli:eval_cmd",
    },
    "expert": {"embed": "kit.cli:expert_embed", "train": "kit.cli:expert_train"},
    "demo": {"build": "kit.cli:demo_build", "principals": "governance.demo:principals"},
}
GROUP_HELP = {
    "model": "Inspect, pretrain, merge, router-tune and evaluate FlexOlmo models.",
    "expert": "A data owner's expert: its router embedding and its training.",
    "demo": "The demo model and its principals.",
}


def _load(target: str) -> click.Command | None:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A package not yet built holds no command; anything else missing is a real error.
        if exc.name == module_name or module_name.startswith(f"{exc.name}."):
            return None
        raise
    command: Any = getattr(module, attr, None)
    return command if isinstance(command, click.Command) else None


class LazySubGroup(click.Group):
    """A group whose sub-commands come lazily from several packages (GROUPS)."""

    def __init__(self, name: str, targets: dict[str, str]) -> None:
        super().__init__(name=name, help=GROUP_HELP.get(name))
        self.targets = targets

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.targets)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.targets.get(cmd_name)
        return None if target is None else _load(target)


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported only when invoked or listed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*(n for n in COMMANDS if self._get(n) is not None), *GROUPS])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._get(cmd_name)

    @staticmethod
    def _get(name: str) -> click.Command | None:
        if name in GROUPS:
            return LazySubGroup(name, GROUPS[name])
        target = COMMANDS.get(name)
        return None if target is None else _load(target)


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
