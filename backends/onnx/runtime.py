"""Running an emitted ONNX decoder with ONNX Runtime (CPU): prefill logits, used by `mexc verify`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}


def session(out: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact int4 DQ+MatMul
    return ort.InferenceSession(str(Path(out) / "model.onnx"), so, providers=["CPUExecutionProvider"])


def prefill_logits(out: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` of a prefill with an empty KV cache."""
    sess = session(out)
    b, s = tokens.shape
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = tokens.numpy().astype(np.int64)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, s), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s)).copy()
        elif i.name.startswith("past_key_values."):
            kv_heads, head_dim = i.shape[1], i.shape[3]
            feeds[i.name] = np.zeros((b, kv_heads, 0, head_dim), dtype=_NP.get(i.type, np.float32))
    (logits,) = sess.run(["logits"], feeds)
    return torch.from_numpy(np.asarray(logits, dtype=np.float32))
