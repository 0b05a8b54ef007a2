"""TensorRT-LLM LlamaForCausalLM (tensorrt_llm/models/llama): RMSNorm, SwiGLU, rotary (none / linear / llama3 /
yarn scaling), optional q/k/v/o and MLP biases; MoE of SwiGLU experts with softmax top-k routing.

YaRN (TensorRT-LLM <= 1.2, TensorRT path): ``LLaMAConfig`` keeps ``rotary_scaling`` as written and its decoder
layer passes it to ``Attention``; ``Attention.create_attention_const_params`` (layers/attention.py), for a
``rotary_scaling.type`` of ``yarn`` on a rope position type, builds ``rotary_inv_freq`` and the plugin's cos/sin
table ``embed_positions_for_gpt_attention`` with ``RopeEmbeddingUtils.create_sinusoidal_positions_yarn``: the
inverse frequencies blended between ``inv`` and ``inv / factor`` over the correction range of ``beta_fast`` /
``beta_slow`` at ``original_max_position_embeddings`` (rounded with floor / ceil, as megatron-core with
``yarn_correction_range_round_to_int``), and cos / sin times ``get_mscale(factor, mscale) / get_mscale(factor,
mscale_all_dim)``. The attention plugin does not always read that table: its QKV preprocessing
(kernels/unfusedAttentionKernels/unfusedAttentionKernels_2_template.h ``invokeApplyBiasRopeUpdateKVCacheDispatch``)
falls back to the v1 kernel, which recomputes cos / sin from ``rotary_inv_freq`` alone (no mscale), when the
rotary dim is not a multiple of 16, the head size is not one of its v2 sizes, sink tokens are used or the
sequence passes ``max_position_embeddings``. So mexc writes ``mscale = mscale_all_dim = 0`` (a factor of 1: table
and recompute agree) and folds Megatron's factor ``m`` into the logits instead: ``q`` and ``k`` are each
``m x`` the rotated vectors (full rotary), so the logits are ``m^2`` times, which the class's
``attention_multiplier`` expresses exactly."""

from __future__ import annotations

import math

from ....ir.analysis import MOE_SHARED_EXPERT, block_kinds
from ....ir.semantics import yarn_attention_factor
from .common import PLAIN_DECODER, UNREWRITTEN, qk_norm_and_scaling, read_rope, rule, trt_class


def _llama_like(f) -> bool:
    gated = f.gated | {m.attrs["gated"] for m in f.moes}
    acts = f.acts | {m.attrs["activation"] for m in f.moes}
    return f.kinds == {"rmsnorm"} and gated == {True} and acts == {"silu"} and not f.learned


def _rules(f):
    p, rope = qk_norm_and_scaling(f, softmax_scale=True, yarn=True), f.a0["rope"]
    if f.a0["position"] == "rope" and rope.scaling == "yarn" and not rope.truncate:
        p.append("YaRN without a rounded correction range (yarn_correction_range_round_to_int false) is not "
                 "expressible: TensorRT-LLM's create_sinusoidal_positions_yarn always floors / ceils it")
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
                 "class rotates the whole head (bias-free SwiGLU models are written as Phi3ForCausalLM)")
    return p


def config(f, cfg: dict) -> dict:
    attn = f.attns[0]
    cfg.update(hidden_act="swiglu" if f.moes else "silu",
               attn_bias="qkv_bias" in attn.params or "proj_bias" in attn.params,
               mlp_bias=any("fc2_bias" in n.params for n in f.mlps))
    scale, rope = f.a0["softmax_scale"], f.a0["rope"]
    mult = 1.0 if scale is None else float(scale) * math.sqrt(f.a0["head_dim"])
    if f.a0["position"] == "rope" and rope.scaling == "yarn":   # see the module docstring
        cfg["rotary_scaling"] = {"type": "yarn", "factor": float(rope.factor),
                                 "original_max_position_embeddings": int(rope.original_max_positions),
                                 "beta_fast": float(rope.beta_fast), "beta_slow": float(rope.beta_slow),
                                 "mscale": 0.0, "mscale_all_dim": 0.0}
        mult *= yarn_attention_factor(rope) ** 2
    if mult != 1.0:
        # LLaMADecoderLayer builds Attention(q_scaling=1 / attention_multiplier), whose logits are divided by
        # q_scaling * sqrt(head_size) (tensorrt_llm/models/llama/model.py, layers/attention.py)
        cfg["attention_multiplier"] = mult
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
    rope, rs = read_rope(cfg, percent=1.0), cfg.get("rotary_scaling") or {}
    if rope["scaling"] == "yarn":   # create_attention_const_params' defaults; the correction range always rounded
        rope.update(original_max_positions=int(rs.get("original_max_position_embeddings", 4096)),
                    beta_fast=float(rs.get("beta_fast", 32.0)), beta_slow=float(rs.get("beta_slow", 1.0)),
                    mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
                    truncate=True)
    return {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": rope,
            "softmax_scale": scale,
            "experts": moe.get("num_experts", 0) or cfg.get("moe_num_experts", 0), "top_k": moe.get("top_k", 2),
            "pre_softmax": moe.get("normalization_mode", 1) == 0}


def notes(f) -> list[str]:
    rope = f.a0["rope"]
    if f.a0["position"] != "rope" or rope.scaling != "yarn" or yarn_attention_factor(rope) == 1.0:
        return []
    m = yarn_attention_factor(rope)
    return [f"YaRN's cos/sin factor {m:.6g} (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)) is "
            f"written as attention_multiplier x {m * m:.6g} with rotary_scaling mscale = mscale_all_dim = 0: "
            "TensorRT-LLM's v1 rope kernel recomputes cos/sin without the factor"]


trt_class("LlamaForCausalLM", signature=lambda f: bool(f.moes) or _llama_like(f),
          rules=[PLAIN_DECODER, UNREWRITTEN, rule("QK norm, rope scaling other than linear/llama3/yarn, YaRN without a "
                                                  "rounded correction range, partial rotary, a shared expert, experts "
                                                  "other than SwiGLU, routing other than softmax top-k")(_rules)],
          config=config, read=read, notes=notes, aliases=("MistralForCausalLM", "MixtralForCausalLM", "LLaMAForCausalLM"),
          before=("GPTForCausalLM",))
