"""The `mexc` command line: its subcommands, options, help texts and the option types (stdlib only: building
the parser, ``--help`` and usage errors import no torch). :mod:`mexc.tools.cli` runs what it parses."""

from __future__ import annotations

import argparse
import sys

from ..errors import EXIT_USAGE

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
    c.add_argument("--accuracy-level", type=int, choices=range(5), metavar="{0..4}",
                   help="onnx ort --quant: MatMulNBits accuracy_level (default 4 = int8 compute on CPU, as "
                        "onnxruntime-genai's builder; 0 = compute in the activation dtype)")
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
    # the options one target takes (mexc.backends.options): left out = None, so that a flag given for a target
    # that does not take it is refused (tools/compile_flags.py)
    c.add_argument("--parallel-embedding", action="store_true", default=None,
                   help="trtllm: split the embedding table over tp")
    c.add_argument("--max-batch-size", type=_positive_int, help="trtllm/tensorrt engines (default: 8)")
    c.add_argument("--max-input-len", type=_positive_int, help="trtllm/tensorrt engines (default: 1024)")
    c.add_argument("--max-seq-len", type=_positive_int, help="trtllm/tensorrt engines, onnx position tables "
                   "(default: 2048, or a learned position table's size)")
    c.add_argument("--max-shard-size", type=_positive_int, metavar="BYTES", help="hf: largest safetensors shard "
                   "(default: 5000000000, transformers' 5GB)")
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
