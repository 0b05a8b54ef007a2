"""Qwen3MoeForCausalLM: Qwen3's attention (per-head RMSNorm of q and k before rotary, Megatron's
``qk_layernorm``) with every layer a softmax top-k MoE of gated SiLU experts, no shared expert, but the
``mlp_only_layers``: dense ``Qwen3MoeMLP`` of ``intermediate_size`` with the experts' ``hidden_act`` (Megatron
``moe_layer_freq`` 0s, anywhere).

Routing (transformers ``Qwen3MoeTopKRouter``): softmax over all experts in fp32, top-k, then, with
``norm_topk_prob``, the k weights divided by their sum. That is Megatron's softmax router either way
(megatron/core/transformer/moe/moe_utils.py ``topk_routing_with_score_function``): ``pre_softmax=False``
(softmax of the top-k logits) equals the renormalized form, ``pre_softmax=True`` (softmax, then top-k, no
renormalization) equals ``norm_topk_prob: false``. Hub tensor names: ``mlp.gate`` (router),
``mlp.experts.{E}.gate_proj / up_proj / down_proj`` (transformers 5 fuses them on load)."""

from __future__ import annotations

from .common import LLAMA_LIKE, MLP_BIAS, decoder_rows, family, llama_config, rule
from .qwen3 import _qk_norm

L = "model.layers.{L}."
# a dense layer among MoE ones (Megatron moe_layer_freq 0): the class's MLP of intermediate_size at mlp.*
DENSE_ROWS = f"""
mlp   gate     {L}mlp.gate_proj.weight                copy    always
mlp   up       {L}mlp.up_proj.weight                  copy    always
mlp   fc2      {L}mlp.down_proj.weight                copy    always
"""
ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", qk_norm=True, mlp="none") + f"""
moe   router   {L}mlp.gate.weight                     copy    always
moe   gate     {L}mlp.experts.{{E}}.gate_proj.weight    expert  always
moe   up       {L}mlp.experts.{{E}}.up_proj.weight      expert  always
moe   fc2      {L}mlp.experts.{{E}}.down_proj.weight    expert  always
""" + DENSE_ROWS
MOE_PARAMS = {"router", "gate", "up", "fc2"}


def dense_layers(f) -> list[int]:
    """The layers whose FFN is a dense MLP (Megatron ``moe_layer_freq`` 0), 0-based as transformers counts."""
    return sorted(m.layer for m in f.mlps)


def dense_rules(f, name: str, first_only: bool) -> list[str]:
    """Dense layers among the MoE ones: the class builds them as its gated MLP of ``intermediate_size`` with the
    experts' ``hidden_act`` and no bias; ``first_only``: only as the first ``first_k_dense_replace`` layers
    (DeepseekV3 / Glm4Moe ``layer_idx >= first_k_dense_replace``; Qwen2/3-MoE list them in ``mlp_only_layers``)."""
    if not f.mlps or not f.moes:
        return []
    p, dense, act = [], dense_layers(f), f.moes[0].attrs["activation"]
    if first_only and dense != list(range(len(dense))):
        p.append(f"dense layers {dense} are not all before the MoE layers: the {name} has dense layers only as the "
                 f"first first_k_dense_replace (Megatron moe_layer_freq with 0s first, e.g. [0]*k+[1]*n)")
    if any(not m.attrs["gated"] or m.attrs["activation"] != act for m in f.mlps):
        p.append(f"a dense layer's MLP must be gated with the experts' activation {act!r} in the {name} (one "
                 "hidden_act)")
    if len({m.params["fc2"].type.shape for m in f.mlps}) > 1:
        p.append(f"dense MLP sizes differ across layers; the {name} has one intermediate_size")
    if any(k.endswith("_bias") for m in f.mlps for k in m.params):
        p.append(f"dense MLP biases cannot be expressed by the {name}")
    return p


def moe_rules(f, name: str, params: set[str] = MOE_PARAMS, sigmoid: bool = False,
              first_only: bool = False) -> list[str]:
    """Every MoE layer one softmax (``sigmoid``: sigmoid, groups allowed) top-k MoE of bias-free gated SiLU
    experts, all alike (Qwen2/3-MoE, GLM-4-MoE, DeepSeek-V3); dense layers as :func:`dense_rules`."""
    p = dense_rules(f, name, first_only)
    for m in f.moes:
        a = m.attrs
        if a["score"] != "softmax" and not sigmoid:
            p.append(f"MoE routing with score={a['score']!r} cannot be expressed by the {name}: it routes by softmax")
        if a["group_topk"] and not sigmoid:
            p.append(f"group-limited top-k routing (num_groups={a['num_groups']}, group_topk={a['group_topk']}) "
                     f"cannot be expressed by the {name} (Glm4MoeForCausalLM has it, with sigmoid routing)")
        if not a["gated"] or a["activation"] != "silu":
            p.append(f"the {name} needs gated SiLU experts, got activation={a['activation']!r} gated={a['gated']}")
        if set(m.params) - params:
            p.append(f"MoE params {sorted(set(m.params) - params)} cannot be expressed by the {name}")
        if p:
            return p
    if len({(m.attrs["num_experts"], m.attrs["top_k"], m.attrs["pre_softmax"], m.params["fc2"].type.shape)
            for m in f.moes}) > 1:
        p.append(f"MoE layers differ in experts/top-k/routing/size; the {name} has one per model")
    return p


def dense_size(f) -> int:
    """``intermediate_size``: the dense layers' MLP size (the experts' when every layer is an MoE: unused)."""
    return (f.mlps or f.moes)[0].params["fc2"].type.shape[-1]


def moe_config(f) -> dict:
    """The MoE fields Qwen2-MoE and Qwen3-MoE share (dense layers: ``mlp_only_layers``)."""
    m = f.moes[0]
    return {"num_experts": m.attrs["num_experts"], "num_experts_per_tok": m.attrs["top_k"],
            "moe_intermediate_size": m.params["fc2"].type.shape[-1], "norm_topk_prob": not m.attrs["pre_softmax"],
            "decoder_sparse_step": 1, "mlp_only_layers": dense_layers(f), "intermediate_size": dense_size(f),
            "output_router_logits": False, "router_aux_loss_coef": 0.0}


def config(f, flags) -> dict:
    cfg = llama_config(f, f.moes[0])
    cfg.update(moe_config(f))
    cfg.update(attention_bias=flags["attn_bias"], use_sliding_window=False, sliding_window=None,
               max_window_layers=f.config.num_layers)
    return cfg


def _flags(f, base: dict) -> dict:
    return base | {"attn_bias": f.has(f.attns, ("q_bias", "k_bias", "v_bias", "proj_bias")), "mlp_bias": False}


family("qwen3_moe", "Qwen3MoeForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: (bool(f.moes) and f.kinds == {"rmsnorm"} and f.positions == {"rope"}
                            and any(a.attrs["qk_norm"] != "none" for a in f.attns)),
       rules=[rule("a LayerNorm q/k norm; a q/k norm eps other than rms_norm_eps")(_qk_norm), *LLAMA_LIKE,
              rule("dense layers other than gated bias-free MLPs of one size with the experts' activation, routing "
                   "other than softmax top-k, experts other than bias-free gated SiLU, differing MoE layers")(
                  lambda f: moe_rules(f, f.name)),
              rule("MLP biases")(lambda f: f"MLP biases cannot be expressed by the {f.name}"
                                 if f.has(f.mlps, MLP_BIAS) else None)],
       config=config, flags=_flags, before=("mixtral",))
