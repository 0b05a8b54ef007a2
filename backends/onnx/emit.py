"""emit: the IR model -> ``model.onnx`` + ``model.onnx.data`` (+ ``genai_config.json`` for the ort profile)."""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import BackendError
from ...ir import Model
from ..base import CompileOptions, EmitResult, write_new
from ..options import OnnxOptions
from .graph import ExternalData, GraphBuilder
from .lower import MS, OPSET, Plan, lower

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_FILE = "genai_config.json"


def emit_onnx(model: Model, out: Path, opts: CompileOptions, profile: str, progress=None) -> EmitResult:
    out.mkdir(parents=True, exist_ok=True)
    if progress:   # an estimate: every param once, at the output width (tied/rope copies make it a bit more)
        width = {"f32": 4, "f16": 2, "bf16": 2, "i8": 1, "i4": 0.5}
        io_w = width.get(model.config.dtype.value, 4)
        seen, total = set(), 0
        for _, _, p in model.graph.params():
            if p.source.key not in seen:
                seen.add(p.source.key)
                total += int(p.type.numel * (width[p.type.dtype.value] if p.type.dtype.value in ("i8", "i4") else io_w))
        progress.start("write", total)
    data = ExternalData(out / DATA_FILE, on_tensor=(lambda name, n: progress.advance(n)) if progress else None)
    try:
        g = GraphBuilder(data)
        max_positions = max(model.config.max_position_embeddings, opts.max_seq_len)
        plan = lower(model, g, profile, max_positions=max_positions, progress=progress,
                     accuracy_level=getattr(opts, "accuracy_level", OnnxOptions.accuracy_level))
    finally:
        data.close()
        if progress:
            progress.finish()
    opsets = {"": OPSET}
    if any(d == MS for d, _ in g.op_types):
        opsets[MS] = 1
    proto = g.model(opsets)
    proto.doc_string = f"mexc {profile} profile; {model.config.family}, {model.config.num_layers} layers"
    for k, v in (("mexc.profile", profile), ("mexc.family", model.config.family),
                 ("mexc.io_dtype", plan.io_dtype.long_name)):
        e = proto.metadata_props.add()
        e.key, e.value = k, v
    raw = proto.SerializeToString()
    if len(raw) > (1 << 31) - 1:
        raise BackendError(f"{MODEL_FILE}: the graph proto is over 2 GB without its weights",
                           hint="this is a bug: weights should all be external")
    write_new(out / MODEL_FILE, raw)
    files = {MODEL_FILE: len(raw), DATA_FILE: (out / DATA_FILE).stat().st_size}
    notes = list(model.meta.get("notes", ())) + plan.notes
    if profile == "ort":
        cfg = genai_config(model, plan, opts)
        text = json.dumps(cfg, indent=4) + "\n"
        write_new(out / GENAI_FILE, text)
        files[GENAI_FILE] = len(text.encode())
    if plan.io_dtype.value == "bf16" and profile == "ort":
        notes.append("bf16 graph: ONNX Runtime has no bf16 CPU kernels for these ops; run it on CUDA")
    return EmitResult(out, files=files, tensors=data.count, notes=notes, checksums={DATA_FILE: dict(data.sums)})


def genai_config(model: Model, plan: Plan, opts: CompileOptions) -> dict:
    """``genai_config.json`` for onnxruntime-genai (keys as its model builder writes them)."""
    c = model.config
    ctx = max(c.max_position_embeddings, 1)
    # bos/eos/pad ids come from the tokenizer (or --set) through config.extra (mexc.frontends.tokenizer). Unknown
    # ids are left out, never written as 0; pad defaults to eos, as onnxruntime-genai's model builder does.
    eos = c.get("eos_token_id")
    ids = {"bos_token_id": c.get("bos_token_id"), "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
           "pad_token_id": c.get("pad_token_id", eos[0] if isinstance(eos, (list, tuple)) else eos)}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    layer0 = plan.layers[0] if plan.layers else None
    return {
        "model": {
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": layer0.head_dim if layer0 else 0,
                "hidden_size": c.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": plan.num_heads,
                "num_hidden_layers": len(plan.layers),
                "num_key_value_heads": layer0.kv_heads if layer0 else 0,
            },
            **{k: v for k, v in ids.items() if v is not None},
            "type": "decoder",
            "vocab_size": plan.vocab,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
