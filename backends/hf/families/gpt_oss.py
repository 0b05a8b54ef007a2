"""GptOssForCausalLM (transformers models/gpt_oss/modeling_gpt_oss.py): Llama-layout attention with one
``attention_bias`` switch for q/k/v/o and a learned sink per head (``self_attn.sinks``, the extra softmax logit of
``eager_attention_forward``); ``layer_types`` of ``sliding_attention`` (``sliding_window`` = the IR's window + 1,
the query counted) and ``full_attention``; rotary (rotate-half, ``rope_parameters`` yarn or default); every layer
an MoE: ``GptOssTopKRouter`` (linear with bias, top-k of the logits, softmax over the k) and ``GptOssExperts``
whose ``gate_up_proj`` ``[E, H, 2F]`` interleaves gate (even columns) and up (odd), with
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g)``, ``g = min(gate, limit)``, and ``down_proj`` ``[E, F, H]``
(x @ W, not W x), each with a bias; the down bias is scaled by the routing weight with the output.

That is megatron-core's gpt-oss: ``softmax_type="learnable"``, ``window_size`` + ``window_attn_skip_freq``, yarn,
``add_bias_linear``, ``quick_geglu`` (quick_gelu = x sigmoid(1.702 x): ``swiglu_alpha``) with
``glu_linear_offset=1`` and ``activation_func_clamp_value`` (``swiglu_limit``), softmax top-k routing."""

from __future__ import annotations

from .common import decoder_rows, family, llama_config, no_qk_norm, rule, windowed

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", mlp="none") + """
attention  sinks              model.layers.{L}.self_attn.sinks                  copy     always
moe        router             model.layers.{L}.mlp.router.weight                copy     always
moe        router_bias        model.layers.{L}.mlp.router.bias                  copy     always
moe        gate+up            model.layers.{L}.mlp.experts.gate_up_proj         gate_up  always
moe        gate_bias+up_bias  model.layers.{L}.mlp.experts.gate_up_proj_bias    gate_up  always
moe        fc2                model.layers.{L}.mlp.experts.down_proj            t12      always
moe        fc2_bias           model.layers.{L}.mlp.experts.down_proj_bias       copy     always
"""


def _attention(f):
    p = []
    if not all(a.attrs["sinks"] for a in f.attns):
        p.append(f"attention without sinks cannot be expressed by the {f.name}: every layer has self_attn.sinks")
    sizes = sorted({a.attrs["window"] for a in windowed(f)})
    if len(sizes) > 1:
        p.append(f"layers with different sliding windows {sizes} cannot be expressed by the {f.name}: its config "
                 "has one sliding_window")
    rope = f.a0["rope"]
    if f.positions != {"rope"} or rope.interleaved or rope.percent != 1.0 or rope.scaling not in ("none", "yarn"):
        p.append(f"positions other than full rotate-half rotary with default or yarn scaling cannot be expressed by "
                 f"the {f.name}")
    if f.kinds != {"rmsnorm"}:
        p.append(f"LayerNorm cannot be expressed by the {f.name}: its norms are RMSNorm")
    return p


def _experts(f):
    p = []
    if f.mlps:
        p.append(f"dense MLP layers cannot be expressed by the {f.name}: every layer is an MoE")
    for m in f.moes:
        a = m.attrs
        if a["score"] != "softmax" or a["pre_softmax"] or a["norm_topk"] or a["topk_scale"] != 1.0:
            p.append(f"{m.location}: routing other than softmax over the top-k logits cannot be expressed by the "
                     f"{f.name} (GptOssTopKRouter)")
        if (a["activation"], a["gated"], a["glu_offset"]) != ("quick-gelu", True, 1.0) or a["glu_clamp"] is None:
            p.append(f"{m.location}: experts other than a clamped quick-GELU GLU with up + 1 (megatron-core "
                     f"quick_geglu, glu_linear_offset=1, activation_func_clamp_value) cannot be expressed by the "
                     f"{f.name}")
        if p:
            break
    if len({(m.attrs["num_experts"], m.attrs["top_k"], m.attrs["glu_clamp"], m.params["fc2"].type.shape)
            for m in f.moes}) > 1:
        p.append(f"MoE layers differ in experts / top-k / clamp / size; the {f.name} has one per model")
    return p


def config(f, flags) -> dict:
    m = f.moes[0]
    cfg = llama_config(f, m)
    by_layer = {a.layer: a.attrs["window"] for a in f.attns}
    w = windowed(f)
    cfg.update(num_local_experts=m.attrs["num_experts"], num_experts_per_tok=m.attrs["top_k"],
               swiglu_limit=float(m.attrs["glu_clamp"]), swiglu_alpha=1.702, attention_bias=flags["attn_bias"],
               sliding_window=w[0].attrs["window"] + 1 if w else None,
               layer_types=["full_attention" if by_layer[i] is None else "sliding_attention" for i in sorted(by_layer)],
               router_aux_loss_coef=0.0, output_router_logits=False)
    return cfg


def _flags(f, base: dict) -> dict:
    # attention_bias is one switch for q/k/v/o: on when any is present (the absent ones are written as zeros)
    return base | {"attn_bias": f.has(f.attns, ("q_bias", "k_bias", "v_bias", "proj_bias"))}


family("gpt_oss", "GptOssForCausalLM", rows=ROWS, moe=True, windows=True, sinks=True,
       signature=lambda f: bool(f.moes) and any(a.attrs["sinks"] for a in f.attns),
       rules=[rule("q/k normalization")(no_qk_norm),
              rule("attention without sinks, differing windows, positions other than rotate-half rotary (default / "
                   "yarn), LayerNorm")(_attention),
              rule("dense layers, routing other than softmax top-k, experts other than clamped quick-GELU GLU "
                   "(up + 1), differing MoE layers")(_experts)],
       config=config, flags=_flags, before=("mixtral",))
