"""mexc: a graph-IR compiler for trained Megatron-LM / Megatron-Core language models.

Lift a checkpoint (:mod:`mexc.frontends.megatron`), rewrite it with passes (:mod:`mexc.passes`), lower it with
a backend (:mod:`mexc.backends`): TensorRT-LLM checkpoints and engines, Hugging Face layout, ONNX / TensorRT.
"""

__version__ = "0.1.0"

STARTUP_SIGNALS: list[int] = []  # a Ctrl-C that reached the `mexc` command before its handlers were in


def _early_sigint(signum, frame):
    """While the `mexc` command starts up, a Ctrl-C is recorded (the CLI then stops cleanly), not raised inside
    whatever module is being imported."""
    STARTUP_SIGNALS.append(signum)


def _defer_startup_interrupt() -> None:
    import os
    import signal
    import sys

    if os.path.basename(sys.argv[0] if sys.argv else "") == "mexc" and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _early_sigint)  # only for the command, never for a program importing mexc


_defer_startup_interrupt()

from .errors import MexcError  # noqa: E402

__all__ = ["MexcError", "__version__"]
