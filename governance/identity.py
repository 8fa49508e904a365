"""Who is asking: the authenticated caller of a request, or the actor of a change.

One type serves both, so a data owner authenticated by key or JWT can be passed straight to a
service as the acting principal, and the operator's CLI acts as an admin under a label that
can never be a principal id (it contains a colon, which ids may not).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPERATOR_CLI = "operator:cli"
SYSTEM_REGISTRY = "system:registry"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated principal: id, roles, groups, and how it authenticated.

    `via` is "key", "jwt" or "operator"; `key_id` names the API key used, for the audit record.
    """

    id: str
    roles: frozenset[str] = field(default_factory=frozenset)
    groups: frozenset[str] = field(default_factory=frozenset)
    via: str = "key"
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @classmethod
    def operator(cls, label: str = OPERATOR_CLI) -> Identity:
        """The operator at the command line: acts as an admin, recorded under `label`."""
        return cls(id=label, roles=frozenset({"admin"}), via="operator")
