"""The checks every model-family test makes, judged by an independent runtime against megatron-core's logits.

    from family_checks import err, hf_model, onnx_errors
    model = hf_model(out, "Qwen3ForCausalLM")       # transformers loads every tensor, none missing or unexpected
    assert err(model(tokens).logits, ref["logits"]) < 1e-4
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < 1e-4   # prefill, then one token at a time

The fixtures' logits are causal, so the logits of token t decoded through the KV cache equal megatron-core's
prefill logits at t (tests/fixture_makers/megatron_core.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def err(a, b) -> float:
    """max |a - b| over the vocabulary both share (a target may trim Megatron's padding rows), as a float."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    V = min(a.shape[-1], b.shape[-1])
    return (a[..., :V] - b[..., :V]).abs().max().item()


def hf_model(out: Path, architecture: str | None = None):
    """The fp32 transformers model of an hf output, asserting that loading used every tensor and missed none.

    architecture: the class name transformers must build (``config.json``'s ``architectures[0]``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info          # every tensor used, none missing
    if architecture is not None:
        assert type(model).__name__ == architecture
    return model.eval()


@dataclass
class DecodeErrors:
    """max |delta logits| of an ONNX decoder run: ``whole`` = the whole prompt in one step (None when not run),
    ``steps`` = the prefill of the first tokens, then each one-token decode step through the KV cache;
    ``past`` = the final cache (``past_key_values.*`` name -> array [B, kv_heads, S, head_dim])."""
    whole: float | None
    steps: list[float]
    past: dict

    @property
    def worst(self) -> float:
        return max(self.steps + ([self.whole] if self.whole is not None else []))


def onnx_errors(onnx_path: Path, ref: dict, *, prefix: int = 5, whole: bool = False) -> DecodeErrors:
    """Runs an ONNX decoder (tests/test_onnx_backend.py's ``Decoder``: onnxruntime CPU) on ``ref['tokens']``:
    the whole prompt (when ``whole``), then a prefill of ``prefix`` tokens and one token at a time, each compared
    with ``ref['logits']``; asserts the last logits are finite.

    ref: ``load_reference`` of a fixture (``tokens`` [B, S], ``logits`` [B, S, V])."""
    from test_onnx_backend import Decoder

    dec = Decoder(onnx_path)
    tokens, want = ref["tokens"].numpy(), ref["logits"].numpy()
    first = err(dec.step(tokens, None, 0)[0], want) if whole else None
    logits, past = dec.step(tokens[:, :prefix], None, 0)
    steps = [err(logits, want[:, :prefix])]
    for t in range(prefix, tokens.shape[1]):
        logits, past = dec.step(tokens[:, t:t + 1], past, t)
        steps.append(err(logits, want[:, t:t + 1]))
    assert np.isfinite(logits).all()
    return DecodeErrors(first, steps, past)


def hf_cached_errors(model, ref: dict, *, prefix: int = 2) -> list[float]:
    """[error of a transformers prefill of ``prefix`` tokens, then of each one-token step through its KV cache]
    against ``ref['logits']`` (model: ``hf_model``'s)."""
    tokens, want = ref["tokens"], ref["logits"]
    with torch.no_grad():
        o = model(tokens[:, :prefix], use_cache=True)
        errors = [err(o.logits, want[:, :prefix])]
        for t in range(prefix, tokens.shape[1]):
            o = model(tokens[:, t:t + 1], past_key_values=o.past_key_values, use_cache=True)
            errors.append(err(o.logits, want[:, t:t + 1]))
    return errors
