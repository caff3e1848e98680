"""What the data plane (predictor, batcher) raises when it refuses a request: transport-free.

`api/errors.py` maps each of these to its problem+json response, once, in an exception handler.
"""

from __future__ import annotations


class DomainError(Exception):
    """A refusal the client is told about, as opposed to a bug."""


class InvalidInput(DomainError):
    """`field` of the request holds a value the model cannot use; `limit`, when given, is what it allows."""

    def __init__(self, field: str, message: str, limit: float | int | str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.limit = limit


class InputTooLarge(DomainError):
    """`field` of the request exceeds `limit` (in the unit `message` names)."""

    def __init__(self, field: str, message: str, limit: float | int) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.limit = limit


class Overloaded(DomainError):
    """The queue is full."""


class ModelUnavailable(DomainError):
    """No model is loaded, or the service is stopping."""


class ModelChanged(DomainError):
    """Turns kept by a live stream were encoded by a model that is no longer the one served."""

    def __init__(self, kept: str, serving: str) -> None:
        super().__init__(
            f"the served model changed from {kept} to {serving}; the turns this stream kept were encoded by {kept}, "
            "so its context cannot continue: open a new stream"
        )
        self.kept = kept
        self.serving = serving
