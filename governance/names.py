"""The vocabulary of the policy: ids, roles, groups, grantees and purposes, and their checks.

The character sets are deliberately narrow. Casbin stores a rule as comma-separated text and
the policy gives meaning to `*`, `:` (the `group:` / `role:` / `status:` prefixes) and `|`
(the purpose separator), so no id, group or purpose may contain any of them: a principal
called `group:x` or `*` would otherwise alias a whole group, and a purpose `a|b` would grant
two. Ids are matched exactly everywhere (no prefix or glob matching).

Documented sets:

- principal, expert and group ids: `[A-Za-z0-9][A-Za-z0-9._@-]{0,127}` (the grammar of
  `contracts.experts`, shared with the engine and experts.json)
- purposes: `[a-z0-9][a-z0-9._-]{0,63}` (lower case), or `*` for every purpose in a license
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable

from contracts import experts as expert_contract
from governance.errors import InvalidGrantee, InvalidId, InvalidInput, InvalidPurpose, InvalidRole

ROLES: frozenset[str] = frozenset({"application", "data_owner", "compliance_officer", "admin"})
ANY = "*"
GROUP_PREFIX = "group:"
ROLE_PREFIX = "role:"
DEFAULT_PURPOSE = "general"
PURPOSE_SEPARATOR = "|"

_PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_PURPOSES_TEXT = 255
"""A license's purposes joined by `|` fill one Casbin rule field (casbin_rule.v2, 255 wide)."""
_UNSTORABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid principal/expert/group id, else raise InvalidId."""
    try:
        return expert_contract.check_id(value, what)
    except expert_contract.InvalidIdError as exc:
        raise InvalidId(str(exc)) from None


def check_role(value: str) -> str:
    if value not in ROLES:
        raise InvalidRole(f"unknown role {value!r}: one of {', '.join(sorted(ROLES))}")
    return value


def check_purpose(value: str) -> str:
    """A request's purpose: one name from the documented set (never `*`)."""
    if not isinstance(value, str) or not _PURPOSE_RE.fullmatch(value):
        raise InvalidPurpose(
            f"invalid purpose {value!r}: use 1-64 of a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return value


def normalise_purposes(values: Iterable[str] | None) -> tuple[str, ...]:
    """A license's purposes: sorted, without duplicates; `("*",)` for every purpose.

    None or an empty list means every purpose, as does any list containing `*`.
    """
    items = list(values or [])
    if not items or ANY in items:
        return (ANY,)
    purposes = tuple(sorted({check_purpose(v) for v in items}))
    if len(PURPOSE_SEPARATOR.join(purposes)) > MAX_PURPOSES_TEXT:
        raise InvalidPurpose(
            f"{len(purposes)} purposes take more than {MAX_PURPOSES_TEXT} characters "
            "together: grant fewer per license"
        )
    return purposes


def check_text(value: str | None, what: str, max_length: int) -> str | None:
    """Free text (a display name, a note): at most `max_length` characters, no control
    characters but tab and newline, no lone surrogates (neither survives the ledger's JSON)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text")
    if len(value) > max_length:
        raise InvalidInput(f"{what} is {len(value)} characters long; at most {max_length}")
    bad = _UNSTORABLE.search(value)
    if bad is not None:
        raise InvalidInput(f"{what} contains the character U+{ord(bad.group()):04X}")
    return value


def subject_of_role(role: str) -> str:
    return ROLE_PREFIX + check_role(role)


def subject_of_group(group: str) -> str:
    return GROUP_PREFIX + check_id(group, "group")


def parse_grantee(value: str) -> tuple[str, str]:
    """Validate a grantee and split it into (kind, name).

    Kinds: ("principal", id), ("group", name), ("role", name), ("any", "*"). The policy
    subject is the grantee string itself.
    """
    if value == ANY:
        return "any", ANY
    if value.startswith(GROUP_PREFIX):
        name = value[len(GROUP_PREFIX) :]
        try:
            check_id(name, "group")
        except InvalidId as exc:
            raise InvalidGrantee(str(exc)) from None
        return "group", name
    if value.startswith(ROLE_PREFIX):
        name = value[len(ROLE_PREFIX) :]
        try:
            check_role(name)
        except InvalidRole as exc:
            raise InvalidGrantee(str(exc)) from None
        return "role", name
    try:
        check_id(value, "principal id")
    except InvalidId:
        raise InvalidGrantee(
            f"invalid grantee {value!r}: a principal id, group:NAME, role:NAME or *"
        ) from None
    return "principal", value


def new_id(prefix: str) -> str:
    """A short random id for licenses (`lic_…`) and deny rules (`den_…`), easy to type."""
    return f"{prefix}_{secrets.token_hex(8)}"
