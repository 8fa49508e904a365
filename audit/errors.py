"""Typed errors of the database layer, so callers (the gateway) can map them to responses."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of every error raised by the audit package."""


class DatabaseUnavailable(AuditError):
    """The database cannot be reached; the gateway answers 503."""


class SchemaOutOfDate(AuditError):
    """The database schema is not at the migrations' head; run `flexgate db upgrade`."""


class InvalidQuery(AuditError, ValueError):
    """A malformed filter or cursor."""


class SigningKeyError(AuditError):
    """The checkpoint signing key cannot be created, read, or is not private (mode 0600)."""
