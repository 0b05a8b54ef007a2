"""`mexc verify OUT --against CKPT`: run the compiled artifact and the source on fixed prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MexcError, UsageError

PROMPTS = torch.tensor([[1, 5, 9, 23, 42, 77, 3, 99], [0, 64, 31, 8, 15, 2, 50, 11]])
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
QUANT_TOLERANCE = {"int8-wo": 5e-2, "int4-wo": 5e-1, "fp8": 5e-1, "fp8-channel": 5e-1}


def artifact_logits(out: Path, target: str, tokens: torch.Tensor) -> torch.Tensor:
    if target == "hf":
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()

        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        with torch.no_grad():
            return m(tokens).logits
    if target in ("onnx", "tensorrt"):
        from ..backends.onnx.runtime import prefill_logits

        return prefill_logits(out, tokens)
    if target == "trtllm":
        from ..frontends.trtllm import lift_trtllm
        from ..backends.reference.executor import run

        return run(lift_trtllm(out), tokens)
    raise UsageError(f"verify does not know target {target!r}")


def verify_output(a) -> int:
    from ..driver import lift
    from ..backends.reference.executor import run

    out = Path(a.out)
    mf = out / "mexc-manifest.json"
    if not mf.is_file():
        raise UsageError(f"{out}: not a mexc output (no mexc-manifest.json)", hint="give the -o of `mexc compile`")
    manifest = json.loads(mf.read_text())
    target = manifest["target"]
    src = lift(a.against)
    vocab = manifest["model"]["vocab_size"]
    tokens = PROMPTS.clamp(max=vocab - 1)
    ref = run(src, tokens)[..., :vocab]
    try:
        got = artifact_logits(out, target, tokens)[..., :vocab].float()
    except MexcError:
        raise
    except ImportError as e:
        raise UsageError(f"verifying a {target} output needs a runtime that is not installed: {e}",
                         hint="pip install transformers onnxruntime") from None
    dtype = manifest["model"].get("dtype") or manifest["options"].get("dtype") or "float32"  # as written
    tol = a.tolerance if a.tolerance is not None else TOLERANCE[dtype]
    if a.tolerance is None:  # weights quantized by a pass: the scheme's error dominates
        import re

        for scheme in re.findall(r"quantize\{scheme=([\w-]+)", manifest["pipeline"]):
            tol = max(tol, QUANT_TOLERANCE.get(scheme, 5e-1))
    delta = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    ok = delta <= tol
    result = {"target": target, "max_abs_delta": delta, "top1_agreement": top1, "tolerance": tol, "ok": ok}
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{target}: max |delta logits| = {delta:.3g} (tolerance {tol:g}), top-1 agreement {top1:.1%}: "
              f"{'OK' if ok else 'FAIL'}")
    return 0 if ok else 1
