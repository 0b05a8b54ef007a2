"""Qwen2MoeForCausalLM: Llama-style attention (q/k/v bias per ``qkv_bias``, no o_proj bias, no q/k norm) with
every layer a softmax top-k MoE plus a shared expert whose output is multiplied by
``sigmoid(shared_expert_gate(x))`` (transformers ``Qwen2MoeSparseMoeBlock``) = Megatron's ``SharedExpertMLP``
with ``moe_shared_expert_gate`` (megatron/core/transformer/moe/shared_experts.py). The class always has the gate:
a shared expert without one has no Qwen2-MoE form and is refused. Dense layers: ``mlp_only_layers``, as
Qwen3-MoE. Routing as Qwen3-MoE (``norm_topk_prob`` = not ``moe_router_pre_softmax``; Qwen2-MoE checkpoints are
trained pre-softmax)."""

from __future__ import annotations

from .common import LLAMA_LIKE, MLP_BIAS, decoder_rows, family, llama_config, no_qk_norm, rule
from .qwen3_moe import DENSE_ROWS, MOE_PARAMS, moe_config, moe_rules

L = "model.layers.{L}."
ROWS = decoder_rows(qkv_bias="attn_bias", mlp="none") + f"""
moe   router               {L}mlp.gate.weight                          copy    always
moe   gate                 {L}mlp.experts.{{E}}.gate_proj.weight         expert  always
moe   up                   {L}mlp.experts.{{E}}.up_proj.weight           expert  always
moe   fc2                  {L}mlp.experts.{{E}}.down_proj.weight         expert  always
moe   shared_gate          {L}mlp.shared_expert.gate_proj.weight       copy    always
moe   shared_up            {L}mlp.shared_expert.up_proj.weight         copy    always
moe   shared_fc2           {L}mlp.shared_expert.down_proj.weight       copy    always
moe   shared_expert_gate   {L}mlp.shared_expert_gate.weight            copy    always
""" + DENSE_ROWS
SHARED = {"shared_gate", "shared_up", "shared_fc2", "shared_expert_gate"}


def _shared(f):
    p = []
    for m in f.moes:
        if m.attrs["shared_expert"] != "sigmoid-gated":
            what = "without a shared expert" if m.attrs["shared_expert"] == "none" else "with an ungated shared expert"
            p.append(f"{m.location}: a MoE {what} cannot be expressed by the {f.name}: its shared expert is always "
                     "there and always sigmoid-gated (Megatron's moe_shared_expert_gate)")
            break
    if f.has(f.attns, ("proj_bias",)):
        p.append(f"an attention output bias cannot be expressed by the {f.name} (o_proj has none)")
    if f.has(f.mlps, MLP_BIAS):
        p.append(f"MLP biases cannot be expressed by the {f.name}")
    if len({m.params["shared_fc2"].type.shape for m in f.moes if "shared_fc2" in m.params}) > 1:
        p.append(f"shared expert sizes differ across layers; the {f.name} has one shared_expert_intermediate_size")
    return p


def config(f, flags) -> dict:
    cfg = llama_config(f, f.moes[0])
    cfg.update(moe_config(f))
    cfg.update(shared_expert_intermediate_size=f.moes[0].params["shared_fc2"].type.shape[-1],
               qkv_bias=flags["attn_bias"], use_sliding_window=False, sliding_window=None,
               max_window_layers=f.config.num_layers, layer_types=["full_attention"] * f.config.num_layers)
    return cfg


def _flags(f, base: dict) -> dict:
    # qkv_bias is one switch for q/k/v: on when any is present (the absent ones are written as zeros)
    return base | {"attn_bias": f.has(f.attns, ("q_bias", "k_bias", "v_bias")), "mlp_bias": False}


family("qwen2_moe", "Qwen2MoeForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: (bool(f.moes) and f.kinds == {"rmsnorm"} and f.positions == {"rope"}
                            and any(m.attrs["shared_expert"] != "none" for m in f.moes)),
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE,
              rule("dense layers other than gated bias-free MLPs of one size, routing other than softmax top-k, experts other than bias-free gated SiLU, "
                   "differing MoE layers")(lambda f: moe_rules(f, f.name, MOE_PARAMS | SHARED)),
              rule("a MoE without a sigmoid-gated shared expert; attention output or MLP biases; differing "
                   "shared expert sizes")(_shared)],
       config=config, flags=_flags, before=("mixtral",))
