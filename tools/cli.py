"""The `mexc` command: compile, inspect, passes, verify, run, tokenizer (its parser: :mod:`.cli_parser`).

Errors print as one line (``error: ...`` plus a ``hint:`` line) and exit non-zero; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, MexcError, UsageError

from .cli_parser import EXIT_CODES, make_parser  # noqa: F401 - EXIT_CODES re-exported


class Progress:
    """Phase progress on a terminal (bytes and ETA while writing); silent when not a tty or --quiet."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.total = self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def start(self, phase: str, total: int):
        self.phase, self.total, self.done, self.t0 = phase, total, 0, time.perf_counter()

    def advance(self, n: int):
        self.done += n
        self.total = max(self.total, self.done)   # an estimated total (ONNX) may be passed; never ETA < 0
        now = time.perf_counter()
        if self.enabled and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            sys.stderr.write(f"\r{self.phase}: {self.done / 1e6:8.1f} / {self.total / 1e6:.1f} MB "
                             f"({rate / 1e6:.0f} MB/s, ETA {eta:4.0f}s)")
            sys.stderr.flush()

    def finish(self):
        if self.enabled and self.total:
            sys.stderr.write("\n")


def _on_signal(signum, frame):
    from ..backends.base import INTERRUPTED

    INTERRUPTED.set()  # writers stop within one tensor, wherever the KeyboardInterrupt lands
    raise KeyboardInterrupt(f"signal {signum}")


def _install_signal_handlers():
    """SIGTERM, and SIGINT / SIGHUP (terminal closed) unless inherited as ignored (a background job, nohup),
    cancel the command cleanly: writers stop, the temporary output is removed."""
    from ..backends.base import INTERRUPTED
    from ..backends.output import COMMITTED

    INTERRUPTED.clear()
    COMMITTED.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    from .. import STARTUP_SIGNALS, _early_sigint

    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _on_signal, _early_sigint):
        signal.signal(signal.SIGINT, _on_signal)
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, _on_signal):
        signal.signal(signal.SIGHUP, _on_signal)
    if STARTUP_SIGNALS:  # a Ctrl-C during start-up: stop now, before any work
        _on_signal(STARTUP_SIGNALS.pop(), None)


def cmd_compile(a) -> int:
    from ..backends.serve import serve_commands
    from ..driver import compile_checkpoint
    from ..passes.instruments import SemanticCheck
    from .compile_flags import compile_options

    quiet = a.quiet or a.json
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    opts = compile_options(a)   # the target's options class (mexc.backends.options), from the checked flags
    progress = Progress(enabled=not quiet and sys.stderr.isatty())
    res = compile_checkpoint(a.ckpt, a.out, opts, iteration=a.iteration, config=a.config,
                             overrides={**dict(a.set), **({"replicated": a.replicated} if a.replicated else {})},
                             load=a.load,
                             print_ir_after=set(a.print_ir_after), dump_ir=Path(a.dump_ir) if a.dump_ir else None,
                             log=log, progress=progress, tokenizer=a.tokenizer,
                             instruments=[SemanticCheck(log=log)] if a.check_semantics else [])
    if a.json:
        print(json.dumps({**res.summary(), "serve": serve_commands(res.out)}, indent=2))
    elif not quiet:
        size = sum(res.emit.files.values())
        print(f"wrote {res.out} ({len(res.emit.files)} files, {size / 1e6:.2f} MB, {res.emit.tensors} tensors) "
              f"in {sum(res.seconds.values()):.2f}s", file=sys.stderr)
        print(f"pipeline: {res.pipeline}", file=sys.stderr)
        for n in res.notes:
            print(f"note: {n}", file=sys.stderr)
        for cmd in serve_commands(res.out):
            print(f"serve: {cmd}", file=sys.stderr)
    return 0


def _precheck_inspect(a) -> None:
    """Option combinations `mexc inspect` refuses from the command line alone (no torch imported)."""
    if a.ir and a.json:
        raise UsageError("--ir prints the IR as text; it has no JSON form", hint="drop --json (or --ir)")
    if (Path(a.path) / "mexc-manifest.json").is_file():
        only_ckpt = [f for f, v in (("--draw", a.draw), ("--layers", a.layers), ("--pipeline", a.pipeline),
                                    ("--config", a.config), ("--set", a.set), ("--iteration", a.iteration),
                                    ("--load", a.load)) if v]
        if only_ckpt:
            raise UsageError(f"{a.path}: {only_ckpt[0]} applies to checkpoints, not to a compiled output",
                             hint=f"run `mexc inspect CKPT {only_ckpt[0]} ...` on the source checkpoint")


def cmd_inspect(a) -> int:
    from ..tools.inspect import inspect_path

    return inspect_path(a)


def cmd_passes(a) -> int:
    import dataclasses
    import typing

    from ..passes import PASSES, load_entry_point_passes, load_pass_file

    for f in a.load:
        load_pass_file(f)
    load_entry_point_passes()
    if a.name:
        if a.name not in PASSES:
            raise UsageError(f"unknown pass {a.name!r}", hint=f"known: {', '.join(sorted(PASSES))}")
        cls = PASSES[a.name]
        print(f"{a.name}  ({cls.__module__}.{cls.__qualname__})\n")
        print((cls.__doc__ or "").strip() + "\n")
        mod_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        if mod_doc:
            print(mod_doc + "\n")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            print(f"  {f.name.replace('_', '-')}: {_type_name(hints.get(f.name))} = {_default(f)}")
        return 0
    for name in sorted(PASSES):
        cls = PASSES[name]
        hints = typing.get_type_hints(cls)
        opts = " ".join(f"{f.name.replace('_', '-')}:{_type_name(hints.get(f.name))}={_default(f)}"
                        for f in dataclasses.fields(cls))
        print(f"{name:14s} {cls.summary()}")
        if opts:
            print(f"{'':14s}   options: {opts}")
    return 0


def _type_name(t) -> str:
    import typing

    if t is None:
        return "?"
    if typing.get_origin(t) is typing.Literal:
        return "|".join(map(str, typing.get_args(t)))
    if typing.get_origin(t) in (tuple, list):
        return "list"
    return getattr(t, "__name__", str(t))


def _default(f) -> str:
    import dataclasses

    from ..passes.pipeline import _fmt_value

    if f.default is not dataclasses.MISSING:
        return _fmt_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _fmt_value(f.default_factory())
    return "(required)"


def cmd_verify(a) -> int:
    from .verify import verify_output

    return verify_output(a)


def cmd_run(a) -> int:
    from .run import cmd_run as run

    return run(a)


def cmd_tokenizer(a) -> int:
    from .tokenizer import add_tokenizer

    return add_tokenizer(a)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    a = parser.parse_args(argv)
    if a.cmd is None:
        parser.print_help()
        return EXIT_USAGE
    if a.cmd == "completion":
        from .completion import completion_script

        sys.stdout.write(completion_script(parser, a.shell))
        return 0
    try:
        from .compile_flags import precheck_compile

        precheck = {"compile": precheck_compile, "inspect": _precheck_inspect}.get(a.cmd)
        if precheck:  # usage errors are judged before torch is imported (tools/bench_startup.py)
            precheck(a)
        _install_signal_handlers()  # imports torch: a Ctrl-C here is an interrupt like any other
        return {"compile": cmd_compile, "inspect": cmd_inspect, "passes": cmd_passes, "verify": cmd_verify,
                "run": cmd_run, "tokenizer": cmd_tokenizer}[a.cmd](a)
    except MexcError as e:
        if a.debug:
            raise
        sys.stderr.write(f"error: {_one_line(e.message)}\n")
        if e.hint:
            sys.stderr.write(f"hint: {_one_line(e.hint)}\n")
        return e.exit_code
    except BrokenPipeError:
        os._exit(0)
    except BaseException as e:
        if not _interrupted(e):
            if a.debug or not isinstance(e, Exception):
                raise
            return _internal_error(e)
        if a.debug:
            raise
        from ..backends.output import COMMITTED

        try:  # after SIGHUP the terminal may be gone
            sys.stderr.write(f"error: interrupted after {COMMITTED[-1]} was written in full; stopped before "
                             "anything else\n" if COMMITTED else "error: interrupted; nothing was left behind\n")
        except OSError:
            pass
        return EXIT_INTERRUPTED


def _internal_error(e: Exception) -> int:
    """An exception mexc did not raise on purpose is a bug: its traceback (what a report needs; the run may be
    too long to repeat with --debug), then one error line, exit 3."""
    import traceback

    traceback.print_exception(e)
    sys.stderr.write(f"error: internal error in mexc (a bug, not a fault of the input): {type(e).__name__}: "
                     f"{_one_line(e)}\nhint: please report it with the traceback above and the command line\n")
    return EXIT_INTERNAL


def _one_line(text: str) -> str:
    """A message as one printable line: control characters from a checkpoint's strings (a newline that would
    forge a `hint:` line, an ANSI escape) are shown escaped, never acted on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C / SIGTERM, or a writer stopped by the interrupt flag before the KeyboardInterrupt arrived."""
    if isinstance(e, KeyboardInterrupt):
        return True
    if "mexc.backends.base" not in sys.modules:
        return False
    from ..backends.base import INTERRUPTED, Cancelled

    return isinstance(e, Cancelled) and INTERRUPTED.is_set()


if __name__ == "__main__":
    sys.exit(main())
