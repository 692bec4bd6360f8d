"""twin's own exceptions. Domain code raises these; the API maps them to HTTP once."""

from __future__ import annotations


class TwinError(Exception):
    """Base class; ``str(error)`` is a message safe to show to the client."""

    status_code = 500


class ClusterError(TwinError):
    """The managed PostgreSQL cluster could not be set up, started or stopped."""


class LoadError(TwinError):
    """A dataset could not be loaded; the database is left as it was."""


class InvalidParameter(TwinError):
    status_code = 400


class NotFound(TwinError):
    status_code = 404


class DatabaseUnavailable(TwinError):
    status_code = 503


class StatementTimeout(TwinError):
    """A statement ran past ``TWIN_DB_STATEMENT_TIMEOUT_MS`` and PostgreSQL cancelled it."""

    status_code = 504
