"""The one error hierarchy of mexc.

Every error a user can cause is a :class:`MexcError` with a message that names the thing at fault (a file, a
pass, an IR location) and a ``hint`` that says how to fix it. The CLI prints ``error: <message>`` and
``hint: <hint>`` and exits non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class MexcError(Exception):
    """Base class of every error mexc raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class CheckpointError(MexcError):
    """A checkpoint is missing, corrupt, inconsistent or unsafe."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds a pickle that would import or run something outside the allow-list."""


class ConfigError(MexcError):
    """Architecture configuration is missing or contradictory."""


class IRError(MexcError):
    """The IR violates an invariant (raised by the verifier and by IR constructors)."""


class ParseError(MexcError):
    """Text (IR or pipeline) that does not parse."""


class PassError(MexcError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class BackendError(MexcError):
    """A backend cannot lower the model, or writing the artifact failed."""


class ToolNotFoundError(BackendError):
    """An optional tool (TensorRT, TensorRT-LLM) is not installed."""


class UsageError(MexcError):
    """Bad command-line usage."""

    exit_code = 2
