"""TensorRT-LLM LlamaForCausalLM (tensorrt_llm/models/llama): RMSNorm, SwiGLU, rotary (none / linear / llama3
scaling), optional q/k/v/o and MLP biases; MoE of SwiGLU experts with softmax top-k routing."""

from __future__ import annotations

import math

from ....ir.analysis import MOE_SHARED_EXPERT, block_kinds
from .common import PLAIN_DECODER, UNREWRITTEN, qk_norm_and_scaling, read_rope, rule, trt_class


def _llama_like(f) -> bool:
    gated = f.gated | {m.attrs["gated"] for m in f.moes}
    acts = f.acts | {m.attrs["activation"] for m in f.moes}
    return f.kinds == {"rmsnorm"} and gated == {True} and acts == {"silu"} and not f.learned


def _rules(f):
    p, rope = qk_norm_and_scaling(f, softmax_scale=True), f.a0["rope"]
    if f.moes:
        shared = [layer for layer, kind in block_kinds(f.model).items() if kind == MOE_SHARED_EXPERT] + \
            [m.layer for m in f.moes if m.attrs["shared_expert"] != "none"]
        if shared:
            p.append(f"layer {shared[0]}: a MoE with a shared expert (x + moe(h) + mlp(h)) is not "
                     "expressible with TensorRT-LLM's Llama class (no shared expert)")
        if not _llama_like(f):
            p.append("MoE is emitted with TensorRT-LLM's Llama class (RMSNorm, SwiGLU experts) only")
        if any(n.attrs["score"] != "softmax" for n in f.moes):
            p.append("MoE routing other than softmax top-k is not expressible")
        if any(n.attrs["group_topk"] for n in f.moes):
            p.append("group-limited top-k routing (moe_router_num_groups / group_topk) is not expressible with "
                     "TensorRT-LLM's Llama class")
    elif f.a0["position"] == "rope" and rope.percent != 1.0:
        p.append("partial rotary (rotary_percent < 1) on a Llama-style model: TensorRT-LLM's Llama "
                 "class rotates the whole head (bias-free SwiGLU models are written as Phi3ForCausalLM); use --target hf")
    return p


def config(f, cfg: dict) -> dict:
    attn = f.attns[0]
    cfg.update(hidden_act="swiglu" if f.moes else "silu",
               attn_bias="qkv_bias" in attn.params or "proj_bias" in attn.params,
               mlp_bias=any("fc2_bias" in n.params for n in f.mlps))
    scale = f.a0["softmax_scale"]
    if scale is not None:
        # LLaMADecoderLayer builds Attention(q_scaling=1 / attention_multiplier), whose logits are divided by
        # q_scaling * sqrt(head_size) (tensorrt_llm/models/llama/model.py, layers/attention.py)
        cfg["attention_multiplier"] = float(scale) * math.sqrt(f.a0["head_dim"])
    if f.moes:
        m = f.moes[0].attrs
        cfg["moe"] = {"num_experts": m["num_experts"], "top_k": m["top_k"],
                      "normalization_mode": 0 if m["pre_softmax"] else 1, "shared_expert_intermediate_size": 0}
    return cfg


def read(cfg: dict) -> dict:
    moe = cfg.get("moe") or {}
    mult = float(cfg.get("attention_multiplier", 1.0))
    scale = None if mult == 1.0 else mult / math.sqrt(cfg.get("head_size") or
                                                        cfg["hidden_size"] // cfg["num_attention_heads"])
    return {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": read_rope(cfg, percent=1.0),
            "softmax_scale": scale,
            "experts": moe.get("num_experts", 0) or cfg.get("moe_num_experts", 0), "top_k": moe.get("top_k", 2),
            "pre_softmax": moe.get("normalization_mode", 1) == 0}


trt_class("LlamaForCausalLM", signature=lambda f: bool(f.moes) or _llama_like(f),
          rules=[PLAIN_DECODER, UNREWRITTEN, rule("QK norm, rope scaling other than linear/llama3, partial rotary, a shared "
                                   "expert, experts other than SwiGLU, routing other than softmax top-k")(_rules)],
          config=config, read=read, aliases=("MistralForCausalLM", "MixtralForCausalLM", "LLaMAForCausalLM"),
          before=("GPTForCausalLM",))
