"""The one settings object of a FlexGate process, read from the environment once.

Every package reads its configuration from `settings()`; nothing else reads `os.environ`
(tests and the CLI that point a process at another folder call `settings.cache_clear()` or
pass `Settings.from_env(env)` explicitly). A bad value is a `SettingsError` naming the
variable, raised when the process starts rather than on the first request that needs it.

The table in DESIGN.md ("Configuration") and the README lists the variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value FlexGate cannot use; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r}: must be at least {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r}: expected a number") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"{name}={raw!r}: must be a finite number >= {minimum}")
    return value


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in {"", "0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on"}:
        return True
    raise SettingsError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated values; empty items dropped."""
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


WITNESS_SCHEMES = ("dir:", "cmd:", "http://", "https://")


def _witnesses(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated witness locations, each `dir:PATH`, `cmd:PROGRAM [ARGS]` or a URL."""
    items = _list(env, name)
    for item in items:
        if not item.startswith(WITNESS_SCHEMES) or item.rstrip(":/") in (
            "dir",
            "cmd",
            "http:",
            "https:",
        ):
            raise SettingsError(
                f"{name}: {item!r} is not dir:PATH, cmd:PROGRAM [ARGS], http://… or https://…"
            )
    return items


@dataclass(frozen=True)
class Settings:
    """Process-wide configuration; see `from_env` for the variable of each field."""

    home: Path
    database_url: str
    model_dir: Path
    audit_store_text: bool = False
    audit_checkpoint_every: int = 1000
    audit_checkpoint_seconds: float = 60.0
    audit_witnesses: tuple[str, ...] = ()
    """Where each signed checkpoint is also sent (docs/audit.md, "Anchors and witnesses"):
    `dir:PATH` (appended to PATH/flexgate-anchor.jsonl), `cmd:PROGRAM [ARGS]` (run with the
    checkpoint on stdin; exit 0 accepts it), or an `http://` / `https://` URL (POSTed)."""
    audit_witness_timeout_s: float = 10.0
    otel_endpoint: str | None = None
    metrics_dir: Path | None = None
    """Where the workers of one `flexgate serve` keep their metrics so that /metrics answers
    for all of them (PROMETHEUS_MULTIPROC_DIR, prometheus_client's multiprocess mode; serve
    sets it); None: each process reports only itself."""
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks: str | None = None
    """A JWKS file path or an http(s) URL; JWT bearers are off unless issuer, audience and
    JWKS are all set."""
    oidc_principal_claim: str = "sub"
    oidc_roles_claim: str = "roles"
    model_name: str | None = None
    """The served model's id in the OpenAI API (FLEXGATE_MODEL_NAME); None: the folder name."""
    device: str = "cpu"
    """Where the engine places the model (FLEXGATE_DEVICE: `cpu`, `auto`, `cuda:0`, ...)."""
    max_body_bytes: int = 1_048_576
    """Largest request body the gateway reads (FLEXGATE_MAX_BODY_BYTES); larger is a 413."""
    policy_poll_s: float = 0.25
    """How often a worker checks the policy version for running streams
    (FLEXGATE_POLICY_POLL_SECONDS)."""
    console_idle_s: int = 1800
    """A console session ends after this many seconds without a page
    (FLEXGATE_CONSOLE_IDLE_SECONDS)."""
    console_absolute_s: int = 43200
    """A console session ends this long after sign-in, however busy
    (FLEXGATE_CONSOLE_ABSOLUTE_SECONDS)."""
    # Per-key limits (gateway.limits): server-wide defaults for keys without their own;
    # 0 = that limit is off.
    rate_rpm: int = 600
    rate_tpm: int = 1_000_000
    rate_max_parallel: int = 32
    rate_lease_seconds: float = 900.0
    kv_cache_bytes: int = 0
    """The engine's KV memory budget in bytes (FLEXGATE_KV_CACHE_BYTES); 0: a quarter of the
    memory available on the engine's device when its scheduler starts (docs/generation.md)."""
    prefill_chunk_tokens: int = 256
    """Most prompt tokens the engine runs between two decoding steps
    (FLEXGATE_PREFILL_CHUNK_TOKENS); 0: every prompt in one pass."""

    @property
    def served_model_name(self) -> str:
        return self.model_name or self.model_dir.name

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("FLEXGATE_HOME") or "./var").expanduser().resolve()
        database_url = env.get("FLEXGATE_DATABASE_URL") or (
            f"sqlite+aiosqlite:///{home / 'flexgate.db'}"
        )
        model = env.get("FLEXGATE_MODEL")
        model_dir = Path(model).expanduser().resolve() if model else home / "demo-model"
        return cls(
            home=home,
            database_url=database_url,
            model_dir=model_dir,
            audit_store_text=_bool(env, "FLEXGATE_AUDIT_STORE_TEXT"),
            audit_checkpoint_every=_int(env, "FLEXGATE_AUDIT_CHECKPOINT_EVERY", 1000, minimum=1),
            audit_checkpoint_seconds=_float(env, "FLEXGATE_AUDIT_CHECKPOINT_SECONDS", 60.0),
            audit_witnesses=_witnesses(env, "FLEXGATE_AUDIT_WITNESSES"),
            audit_witness_timeout_s=_float(env, "FLEXGATE_AUDIT_WITNESS_TIMEOUT_S", 10.0),
            otel_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            metrics_dir=(
                Path(env["PROMETHEUS_MULTIPROC_DIR"])
                if env.get("PROMETHEUS_MULTIPROC_DIR")
                else None
            ),
            oidc_issuer=env.get("FLEXGATE_OIDC_ISSUER") or None,
            oidc_audience=env.get("FLEXGATE_OIDC_AUDIENCE") or None,
            oidc_jwks=env.get("FLEXGATE_OIDC_JWKS") or None,
            oidc_principal_claim=env.get("FLEXGATE_OIDC_PRINCIPAL_CLAIM") or "sub",
            oidc_roles_claim=env.get("FLEXGATE_OIDC_ROLES_CLAIM") or "roles",
            model_name=(env.get("FLEXGATE_MODEL_NAME") or "").strip() or None,
            device=(env.get("FLEXGATE_DEVICE") or "").strip() or "cpu",
            max_body_bytes=_int(env, "FLEXGATE_MAX_BODY_BYTES", 1_048_576, minimum=1024),
            policy_poll_s=_float(env, "FLEXGATE_POLICY_POLL_SECONDS", 0.25, minimum=0.01),
            console_idle_s=_int(env, "FLEXGATE_CONSOLE_IDLE_SECONDS", 1800, minimum=1),
            console_absolute_s=_int(env, "FLEXGATE_CONSOLE_ABSOLUTE_SECONDS", 43200, minimum=1),
            rate_rpm=_int(env, "FLEXGATE_RATE_RPM", 600),
            rate_tpm=_int(env, "FLEXGATE_RATE_TPM", 1_000_000),
            rate_max_parallel=_int(env, "FLEXGATE_RATE_MAX_PARALLEL", 32),
            rate_lease_seconds=_float(env, "FLEXGATE_RATE_LEASE_SECONDS", 900.0, minimum=1.0),
            kv_cache_bytes=_int(env, "FLEXGATE_KV_CACHE_BYTES", 0),
            prefill_chunk_tokens=_int(env, "FLEXGATE_PREFILL_CHUNK_TOKENS", 256),
        )


@cache
def settings() -> Settings:
    """This process's settings, read from the environment on first use."""
    return Settings.from_env()


__all__ = ["Settings", "SettingsError", "settings"]
