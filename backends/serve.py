"""The commands that serve a compiled output, per target and TensorRT-LLM flow (printed after `mexc compile`).

Flags follow TensorRT-LLM's own parsers (``tensorrt_llm/commands/serve.py``: ``trtllm-serve MODEL --backend
{pytorch,tensorrt} --tokenizer --tp_size --pp_size``, default backend pytorch; ``examples/run.py`` with
``examples/utils.py``: ``--max_output_len`` (required), ``--engine_dir``, ``--tokenizer_dir``,
``--input_text``); a multi-rank engine runs under ``mpirun -n TP*PP``. tests/test_served_commands.py parses
each command with those parsers (copies under tests/data, the commits named there).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

ENGINES = "engines"
MISSING = "TOKENIZER_DIR"   # shown where the output has no tokenizer yet


def _q(p: Path | str) -> str:
    return shlex.quote(str(p))


def serve_commands(out: str | Path, manifest: dict | None = None) -> list[str]:
    """One line per way to serve ``out``; a placeholder ``TOKENIZER_DIR`` (and the command that fills it)
    where the output has no tokenizer files."""
    out = Path(out)
    if manifest is None:
        try:
            manifest = json.loads((out / "mexc-manifest.json").read_text())
        except (OSError, ValueError):
            return []
    target = manifest.get("target")
    opts = manifest.get("options", {})
    has_tok = (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    tok = _q(out) if has_tok else MISSING
    lines: list[str] = []
    if not has_tok and target != "tensorrt":
        lines.append(f"first add the tokenizer: mexc tokenizer {_q(out)} --from PATH (then use {_q(out)} for "
                     f"{MISSING})")
    if target == "trtllm":
        tp, pp = int(opts.get("tp", 1)), int(opts.get("pp", 1))
        eng = _q(out / ENGINES)
        n_out = max(1, min(32, int(opts.get("max_seq_len", 2048)) - 1))
        par = f" --tp_size {tp} --pp_size {pp}" if tp * pp > 1 else ""
        lines.append(f"trtllm-serve {eng} --backend tensorrt --tokenizer {tok}{par}   (TensorRT-LLM <= 1.2.x, "
                     "after trtllm-build)")
        mpi = f"mpirun -n {tp * pp} " if tp * pp > 1 else ""
        lines.append(f"{mpi}python3 examples/run.py --engine_dir {eng} --tokenizer_dir {tok} "
                     f"--max_output_len {n_out} --input_text 'Hello'   (from TensorRT-LLM's source tree)")
    elif target == "hf":
        lines.append(f"vllm serve {_q(out)}" + ("" if has_tok else f" --tokenizer {MISSING}"))
        lines.append(f"trtllm-serve {_q(out)}" + ("" if has_tok else f" --tokenizer {MISSING}")
                     + "   (PyTorch backend, the default; add --tp_size N to shard)")
        if has_tok:
            lines.append(f"mexc run {_q(out)} --prompt 'Hello'   (transformers, on this machine)")
    elif target == "onnx":
        if opts.get("profile", "ort") == "ort" and has_tok:
            lines.append(f"mexc run {_q(out)} --prompt 'Hello'   (onnxruntime-genai: og.Model + og.Tokenizer)")
        elif opts.get("profile") == "tensorrt":
            lines.append(f"the tensorrt profile is for TensorRT's ONNX parser: mexc compile ... --target "
                         f"tensorrt, or trtexec --onnx={_q(out / 'model.onnx')}")
    elif target == "tensorrt":
        plan = out / "model.plan"
        lines.append(f"{_q(plan)}: " + ("a TensorRT engine of the decoder step; run it with the TensorRT Python "
                                        "API (docs/onnx.md); text generation needs your own sampling loop"
                                        if plan.is_file() else "not built here; build it with the trtexec "
                                        "command above on a machine with TensorRT >= 10.15"))
    return lines
