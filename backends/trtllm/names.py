"""IR param -> TensorRT-LLM checkpoint tensor name. One rule per line.

Keys are (node role, IR param); ``{l}`` is the layer index local to the pipeline stage. The gated MLP's
activated branch (IR ``gate``) is TensorRT-LLM's ``mlp.fc``; the other (IR ``up``) is ``mlp.gate``. MoE
``mlp.fc`` is assembled per rank as ``[up_r; gate_r]`` per expert (see ``MOE_FC``).
"""

from __future__ import annotations

NAMES: dict[tuple[str, str], str] = {
    ("embedding", "word"): "transformer.vocab_embedding.weight",
    ("embedding", "position"): "transformer.position_embedding.weight",
    ("input_norm", "weight"): "transformer.layers.{l}.input_layernorm.weight",
    ("input_norm", "bias"): "transformer.layers.{l}.input_layernorm.bias",
    ("attention", "qkv"): "transformer.layers.{l}.attention.qkv.weight",
    ("attention", "qkv_bias"): "transformer.layers.{l}.attention.qkv.bias",
    ("attention", "proj"): "transformer.layers.{l}.attention.dense.weight",
    ("attention", "proj_bias"): "transformer.layers.{l}.attention.dense.bias",
    ("attention", "q_norm"): "transformer.layers.{l}.attention.q_layernorm.weight",
    ("attention", "k_norm"): "transformer.layers.{l}.attention.k_layernorm.weight",
    ("post_norm", "weight"): "transformer.layers.{l}.post_layernorm.weight",
    ("post_norm", "bias"): "transformer.layers.{l}.post_layernorm.bias",
    ("mlp", "gate"): "transformer.layers.{l}.mlp.fc.weight",
    ("mlp", "gate_bias"): "transformer.layers.{l}.mlp.fc.bias",
    ("mlp", "up"): "transformer.layers.{l}.mlp.gate.weight",
    ("mlp", "up_bias"): "transformer.layers.{l}.mlp.gate.bias",
    ("mlp", "fc1"): "transformer.layers.{l}.mlp.fc.weight",
    ("mlp", "fc1_bias"): "transformer.layers.{l}.mlp.fc.bias",
    ("mlp", "fc2"): "transformer.layers.{l}.mlp.proj.weight",
    ("mlp", "fc2_bias"): "transformer.layers.{l}.mlp.proj.bias",
    ("moe", "router"): "transformer.layers.{l}.mlp.router.weight",
    ("moe", "fc2"): "transformer.layers.{l}.mlp.proj.weight",
    ("final_norm", "weight"): "transformer.ln_f.weight",
    ("final_norm", "bias"): "transformer.ln_f.bias",
    ("lm_head", "weight"): "lm_head.weight",
}
# Per TensorRT-LLM class, names that differ from NAMES. Falcon's new decoder architecture: the MLP's own
# norm is ``mlp_layernorm`` (tensorrt_llm/models/falcon/model.py, convert.py ``ln_mlp``); a parallel block has no
# ``post_layernorm``. Gemma uses NAMES as they are (its converter: gate_proj -> mlp.fc, up_proj -> mlp.gate).
CLASS_NAMES: dict[str, dict[tuple[str, str], str]] = {
    "FalconForCausalLM": {
        ("post_norm", "weight"): "transformer.layers.{l}.mlp_layernorm.weight",
        ("post_norm", "bias"): "transformer.layers.{l}.mlp_layernorm.bias",
    },
}
# MoE: the IR's (up, gate) pair becomes one tensor [E_local, 2 * F_local, H] = concat(up_r, gate_r) on dim 1
MOE_FC: tuple[tuple[str, ...], str] = (("up", "gate"), "transformer.layers.{l}.mlp.fc.weight")


def describe() -> str:
    rows = [f"{role + '.' + param:24s} -> {name}" for (role, param), name in NAMES.items()]
    rows.append(f"{'moe.up+gate':24s} -> {MOE_FC[1]}  (per expert [up_r; gate_r])")
    for cls, names in CLASS_NAMES.items():
        rows += [f"{role + '.' + param:24s} -> {name}  ({cls})" for (role, param), name in names.items()]
    return "\n".join(rows)
