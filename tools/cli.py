"""The `mexc` command: compile, inspect, passes, verify.

Errors print as one line (``error: ...`` plus a ``hint:`` line) and exit non-zero; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, MexcError, UsageError

EXAMPLES = {
    "compile": "example:\n  mexc compile examples/llama-tiny --target trtllm --tp 2 -o out/llama-trtllm\n"
               "  mexc compile examples/llama-tiny --target hf --dtype bfloat16 --vocab-size 100 -o out/llama-hf\n"
               "  mexc compile CKPT --target onnx --profile ort -o out/onnx --pipeline 'canonicalize'",
    "inspect": "example:\n  mexc inspect examples/llama-tiny\n  mexc inspect examples/llama-tiny --ir\n"
               "  mexc inspect out/llama-trtllm --json",
    "passes": "example:\n  mexc passes\n  mexc passes reshard",
    "verify": "example:\n  mexc verify out/llama-hf --against examples/llama-tiny",
    "run": "example:\n  mexc run out/llama-hf --prompt 'the quick brown'\n"
           "  mexc run out/llama-onnx --prompt 'hello world' --max-new-tokens 8 --json",
    "tokenizer": "example:\n  mexc tokenizer out/llama-hf --from /data/tokenizer\n"
                 "  mexc tokenizer out/llama-onnx --from tokenizer.model --force\n"
                 "  mexc tokenizer out/llama-trtllm --from vocab.json,merges.txt",
}


EXIT_CODES = """exit codes:
  0    done (verify: the output matches its source)
  1    bad input or environment: a checkpoint, output, config or tokenizer missing, damaged or not lowerable
       by the target; a tool not installed; disk full (verify: FAIL)
  2    usage: the command line must change (unknown option, bad value, options the target or model cannot
       take, an -o that exists)
  3    internal error: a bug in mexc (the traceback is printed; please report it)
  130  interrupted (Ctrl-C, SIGTERM, SIGHUP); an output is complete or absent"""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative token ids, got {text!r}")
    return ids


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        hint = f"run `{self.prog} --help` for usage"
        if "--quant" in message and "'fp8'" in message:
            hint = ("fp8 needs activation scales from calibration data, which mexc does not compute: calibrate with "
                    "NVIDIA ModelOpt, or quantize at load time (vllm serve OUT --quantization fp8)")
        sys.stderr.write(f"error: {message}\nhint: {hint}\n")
        raise SystemExit(EXIT_USAGE)


def _version() -> str:
    from importlib import metadata

    try:
        v = metadata.version("mexc")
    except metadata.PackageNotFoundError:
        from .. import __version__ as v
    return f"mexc {v}"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (importlib.metadata costs start-up time on every command)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def make_parser() -> argparse.ArgumentParser:
    from ..backends.registry import target_names   # stdlib only: no backend is imported here

    p = _Parser(prog="mexc", description="Compile Megatron-LM / Megatron-Core checkpoints for inference engines.",
                epilog="example:\n  mexc compile examples/llama-tiny --target trtllm -o out/trtllm\n\n" + EXIT_CODES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action=_VersionAction)
    sub = p.add_subparsers(dest="cmd", parser_class=_Parser)

    c = sub.add_parser("compile", help="compile a checkpoint to a target", epilog=EXAMPLES["compile"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("ckpt", help="Megatron save directory (or one iter_* directory)")
    c.add_argument("--target", required=True, choices=target_names(),
                   help="built-in: trtllm, hf, onnx, tensorrt; more from packages (mexc.backends entry points)")
    c.add_argument("-o", "--out", required=True, help="output directory (must not exist unless --force)")
    c.add_argument("--tp", type=_positive_int, default=1, help="target tensor-parallel size")
    c.add_argument("--pp", type=_positive_int, default=1, help="target pipeline-parallel size")
    c.add_argument("--ep", type=_positive_int, default=1, help="target expert-parallel size (MoE; must equal tp)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    c.add_argument("--quant", choices=["int8-wo", "int4-wo"],
                   help="weight-only quantization for trtllm (trtllm-build packs the weights) and onnx / tensorrt "
                        "(MatMulNBits / DequantizeLinear); not for hf. No fp8: it needs calibrated activation scales")
    c.add_argument("--group-size", type=_positive_int, help="int4-wo/int8-wo group size (default: per channel for "
                   "trtllm, 32 for onnx)")
    c.add_argument("--vocab-size", type=_positive_int, help="trim Megatron's vocab padding to the tokenizer's size")
    c.add_argument("--tokenizer", metavar="PATH", help="tokenizer written beside the model (HF dir, SentencePiece "
                   ".model, vocab.json,merges.txt or .tiktoken; default: the files the checkpoint's args name)")
    c.add_argument("--profile", choices=["ort", "tensorrt"], help="--target onnx flavour (default: ort)")
    c.add_argument("--accuracy-level", type=int, choices=range(5), default=4, metavar="{0..4}",
                   help="onnx ort --quant: MatMulNBits accuracy_level (4 = int8 compute on CPU, as onnxruntime-genai's "
                        "builder; 0 = compute in the activation dtype)")
    c.add_argument("--quant-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="onnx --quant: quantize the lm_head too (default: yes for --profile ort, as onnxruntime-genai's "
                        "builder; no for tensorrt)")
    c.add_argument("--pipeline", default="", help="extra passes to run first, e.g. 'canonicalize,dce'")
    c.add_argument("--load", action="append", default=[], metavar="FILE", help="load user passes from FILE")
    c.add_argument("--force", action="store_true", help="replace an earlier mexc output (a directory with a "
                   "mexc-manifest.json)")
    c.add_argument("--build", choices=["auto", "always", "never"], default="auto",
                   help="build engines: auto (if the tool is installed), always (absence is an error), never")
    c.add_argument("--iteration", type=int, help="checkpoint iteration (default: the latest)")
    c.add_argument("--config", help="YAML file overriding architecture fields the saved args lack or get wrong")
    c.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_override,
                   help="override one architecture field (after --config), e.g. --set num_kv_heads=8")
    c.add_argument("--replicated", choices=["check", "rank0", "mean"], default=None,
                   help="TP copies of replicated tensors (norms, row-parallel biases) in legacy checkpoints: check "
                        "they agree (default), take rank 0's, or average them; recorded in the manifest")
    c.add_argument("--parallel-embedding", action="store_true", help="split the embedding table over tp")
    c.add_argument("--max-batch-size", type=_positive_int, help="trtllm/tensorrt engines (default: 8)")
    c.add_argument("--max-input-len", type=_positive_int, help="trtllm/tensorrt engines (default: 1024)")
    c.add_argument("--max-seq-len", type=_positive_int, help="trtllm/tensorrt engines, onnx position tables "
                   "(default: 2048, or a learned position table's size)")
    c.add_argument("--jobs", type=_positive_int, default=2, help="ranks written in parallel")
    c.add_argument("--print-ir-after", action="append", default=[], metavar="PASS|all")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR before and after every pass to DIR")
    c.add_argument("--check-semantics", action="store_true",
                   help="run the reference interpreter before and after every pass; stop at a pass that changes "
                        "the logits (small models: it reads every weight)")
    c.add_argument("--quiet", action="store_true", help="print nothing but errors")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")

    i = sub.add_parser("inspect", help="summarize a checkpoint or a compiled output", epilog=EXAMPLES["inspect"],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("path")
    i.add_argument("--ir", action="store_true", help="print the IR")
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true", help="per-layer table")
    i.add_argument("--rules", action="store_true", help="print the Megatron key mapping table")
    i.add_argument("--args", action="store_true", help="print the Megatron argument table's verdict for each "
                   "argument the checkpoint saved (without CKPT's args: the whole table)")
    i.add_argument("--iteration", type=int)
    i.add_argument("--config")
    i.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_override)
    i.add_argument("--pipeline", default="", help="run these passes before printing")
    i.add_argument("--load", action="append", default=[], metavar="FILE")
    i.add_argument("--draw", metavar="FILE", help="draw the layer graph (.dot, .svg or .png)")

    ps = sub.add_parser("passes", help="list passes and their options", epilog=EXAMPLES["passes"],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("name", nargs="?")
    ps.add_argument("--load", action="append", default=[], metavar="FILE")

    v = sub.add_parser("verify", help="run a compiled output and compare its logits to the source",
                       epilog=EXAMPLES["verify"], formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("out")
    v.add_argument("--against", required=True, metavar="CKPT")
    v.add_argument("--tolerance", type=float, help="max |delta logits| allowed (default: by dtype)")
    v.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="greedy text generation from an hf or onnx output (transformers / "
                       "onnxruntime-genai)", epilog=EXAMPLES["run"], formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("out")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--prompt-ids", type=_token_ids, metavar="ID,ID,...",
                     help="token ids to continue (no tokenizer needed: prints the prompt and new ids)")
    r.add_argument("--max-new-tokens", type=_positive_int, default=16)
    r.add_argument("--json", action="store_true", help="print ids, text and runtime as JSON")
    t = sub.add_parser("tokenizer", help="add (or replace) the tokenizer of a compiled output",
                       epilog=EXAMPLES["tokenizer"], formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("out")
    t.add_argument("--from", dest="source", required=True, metavar="PATH",
                   help="HF tokenizer dir, SentencePiece .model, vocab.json,merges.txt or .tiktoken")
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_override,
                   help="override bos_token_id / eos_token_id / pad_token_id")
    t.add_argument("--force", action="store_true", help="replace tokenizer files already there")
    comp = sub.add_parser("completion", help="print a shell completion script",
                          epilog="example:\n  source <(mexc completion bash)\n  mexc completion zsh > ~/.zfunc/_mexc",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("shell", choices=["bash", "zsh"])
    return p


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
    from ..backends.base import CompileOptions
    from ..backends.serve import serve_commands
    from ..driver import compile_checkpoint
    from ..passes.instruments import SemanticCheck

    quiet = a.quiet or a.json
    log = (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr))
    opts = CompileOptions(target=a.target, tp=a.tp, pp=a.pp, ep=a.ep, dtype=a.dtype, quant=a.quant,
                          group_size=a.group_size, vocab_size=a.vocab_size, profile=a.profile, pipeline=a.pipeline,
                          build=a.build, force=a.force, max_batch_size=a.max_batch_size, max_input_len=a.max_input_len,
                          max_seq_len=a.max_seq_len, jobs=a.jobs, parallel_embedding=a.parallel_embedding,
                          accuracy_level=a.accuracy_level, quant_lm_head=a.quant_lm_head)
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
