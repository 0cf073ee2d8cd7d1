"""The errors a live request answers with: each carries its HTTP status and machine-readable code, which the
app's error handler turns into the JSON error body."""

from __future__ import annotations

from trainer.errors import HSAEError


class LiveError(HSAEError):
    status = 500
    code = "live_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}


class PromptTooLong(LiveError):
    status, code = 413, "prompt_too_long"


class LiveBusy(LiveError):
    status, code = 503, "busy"


class LiveTimeout(LiveError):
    status, code = 504, "timeout"


class LiveUnavailable(LiveError):
    """The run cannot be encoded live here (no checkpoint path, missing files, model not loadable)."""

    status, code = 409, "live_unavailable"
