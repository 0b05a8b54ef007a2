"""The one error hierarchy of mexc.

Every error a user can cause is a :class:`MexcError` with a message that names the thing at fault (a file, a
pass, an IR location) and a ``hint`` that says how to fix it. The CLI prints ``error: <message>`` and
``hint: <hint>`` and exits non-zero; ``--debug`` shows the traceback.

Exit codes of the ``mexc`` command (README "Exit codes", ``mexc --help``), one per kind of failure:

* 0 (:data:`EXIT_OK`): done; ``verify``: the output matches its source.
* 1 (:data:`EXIT_INPUT`, :class:`MexcError` and every subclass but :class:`UsageError`): an input or the machine
  is at fault: a checkpoint, compiled output, config or tokenizer file that is missing, damaged, unsafe or not
  lowerable by the target; a tool or runtime not installed; a full disk; ``verify``: FAIL.
* 2 (:data:`EXIT_USAGE`, :class:`UsageError` and argparse): the command line must change: an unknown option, a
  bad value, options that contradict each other or the target, a size the model cannot split, an ``-o`` that
  exists.
* 3 (:data:`EXIT_INTERNAL`): an unexpected exception, a bug in mexc: the traceback is printed, then one
  ``error: internal error ...`` line.
* 130 (:data:`EXIT_INTERRUPTED`): interrupted (Ctrl-C, SIGTERM, SIGHUP); an output is complete or absent.
"""

from __future__ import annotations

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class MexcError(Exception):
    """Base class of every error mexc raises on purpose."""

    exit_code = EXIT_INPUT

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


class InputError(MexcError):
    """A file the command names that is not a checkpoint (a compiled output, a manifest, a tokenizer) is missing,
    damaged or not the kind the command needs."""


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
    """Bad command-line usage: the command line must change (exit code 2)."""

    exit_code = EXIT_USAGE
