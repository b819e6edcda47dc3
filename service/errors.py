"""One error hierarchy for the whole service.

The tree (when each is raised → its HTTP status and `code`; service.api.errors maps them in one place):

* CMTError - base of every error raised on purpose; raised as such → 500 internal_error
  x InvalidInputError (a ValueError) - bad text, id, date, shape, dtype, dimension or config → 422 invalid_input
    + PayloadTooLargeError - a text, batch or question over a configured limit → 413 payload_too_large
  x NotFoundError (a KeyError) - a document id that is not stored → 404 not_found
  x CheckpointError - a checkpoint missing, malformed or of an unsupported format → 500 checkpoint_error
    + CheckpointMismatchError - a checkpoint made for another LLM or backbone → 500 checkpoint_mismatch
    + LLMSourceError (service.models.llm_source) - the LLM named cannot be found or converted → 500 llm_source_error
  x StorageUnavailableError - Redis down or failing, index unavailable → 503 storage_unavailable + Retry-After
    + CorruptMemoryError (service.storage.codec) - a stored value is no valid memory → 503 storage_corrupt + Retry-After
  x StaleMemoryError - memories of another compressor version (stale="raise") → 503 stale_memory
  x OverloadedError - a batcher queue is full or shutting down → 503 overloaded + Retry-After
  x ModelError - the LLM failed while generating an answer → 500 model_error

Each has a stable `code` and `http_status`; the body is `{"error": {"code", "message", "details"?}}` and
5xx ones are logged. Outside the tree, the same module maps request validation errors to 422 invalid_input,
HTTP exceptions to their status (401 unauthorized, 403 forbidden, 404, 405) and anything else to 500.
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


class ModelError(CMTError):
    """The frozen LLM failed while generating (a decode step raised); the question can be asked again."""

    code = "model_error"
    http_status = 500
