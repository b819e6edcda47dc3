"""One error hierarchy for the whole service.

Every error a user can cause or a fault the service can meet is a `CMTError` subclass with a
stable `code` and the HTTP status it maps to; the HTTP layer maps them in one place.
"""

from __future__ import annotations

from typing import Any


class CMTError(Exception):
    """Base of every error the service raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return {"error": body}


class InvalidInputError(CMTError, ValueError):
    """The caller passed something the service cannot use (empty text, wrong shape or dtype...)."""

    code = "invalid_input"
    http_status = 422


class PayloadTooLargeError(InvalidInputError):
    """A text, batch or question exceeds a configured limit."""

    code = "payload_too_large"
    http_status = 413


class NotFoundError(CMTError, KeyError):
    """A document id that is not stored."""

    code = "not_found"
    http_status = 404

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class CheckpointError(CMTError):
    """A checkpoint is missing, malformed, or of an unsupported format version."""

    code = "checkpoint_error"
    http_status = 500


class CheckpointMismatchError(CheckpointError):
    """A checkpoint was made for another LLM (or backbone) than the one loaded."""

    code = "checkpoint_mismatch"


class StorageUnavailableError(CMTError):
    """Redis cannot be reached or answered with an error; retry once it is back."""

    code = "storage_unavailable"
    http_status = 503


class StaleMemoryError(CMTError):
    """Stored memories were made by another compressor version than the one serving."""

    code = "stale_memory"
    http_status = 503


class OverloadedError(CMTError):
    """The service's queues are full; the client should retry after a while."""

    code = "overloaded"
    http_status = 503
