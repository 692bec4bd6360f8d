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


class Conflict(TwinError):
    """The write clashes with the stored state (a unique code already taken, ...)."""

    status_code = 409


class PreconditionFailed(TwinError):
    """A precondition of the request (If-Match) does not hold for the stored item."""

    status_code = 412


class Unprocessable(TwinError):
    """Well-formed, but not something twin can store (an unknown property, a place outside
    the municipality, ...)."""

    status_code = 422


class DatabaseUnavailable(TwinError):
    status_code = 503


class StatementTimeout(TwinError):
    """A statement ran past ``TWIN_DB_STATEMENT_TIMEOUT_MS`` and PostgreSQL cancelled it."""

    status_code = 504
