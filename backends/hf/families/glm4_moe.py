"""Glm4MoeForCausalLM: Llama-style attention (q/k/v bias per ``attention_bias``, rotate-half rotary over the first
``partial_rotary_factor`` of each head) with every layer a sigmoid-routed MoE plus ungated shared experts, but
the first ``first_k_dense_replace`` layers: dense ``Glm4MoeMLP`` of ``intermediate_size`` (Megatron
``moe_layer_freq`` with its 0s first).

Routing (transformers ``Glm4MoeTopkRouter``): sigmoid of the fp32 router logits; ``e_score_correction_bias``
added to choose the experts (not to weigh them); ``n_group`` groups of which the ``topk_group`` whose best 2 scores
sum highest are kept; top-k; weights divided by their sum (+1e-20) with ``norm_topk_prob``; times
``routed_scaling_factor``. That is Megatron's sigmoid router (megatron/core/transformer/moe/moe_utils.py
``topk_routing_with_score_function`` / ``group_limited_topk``) with ``moe_router_enable_expert_bias``'s saved
``expert_bias`` and ``moe_router_num_groups`` / ``moe_router_group_topk`` when top_k / group_topk is 2 (Megatron
sums the best top_k / group_topk scores of a group). The shared experts (``Glm4MoeMLP`` of
``moe_intermediate_size * n_shared_experts``) are added ungated, as Megatron's SharedExpertMLP without
``moe_shared_expert_gate``."""

from __future__ import annotations

from .common import MLP_BIAS, ROTARY_ONLY, decoder_rows, family, llama_config, no_qk_norm, rule
from .qwen3_moe import DENSE_ROWS, MOE_PARAMS, dense_layers, dense_size, moe_rules

L = "model.layers.{L}."
# DeepSeek-V3's MoE names, which Glm4MoeForCausalLM keeps (and DeepseekV3ForCausalLM imports from here)
MOE_ROWS = f"""
moe   router       {L}mlp.gate.weight                              copy    always
moe   expert_bias  {L}mlp.gate.e_score_correction_bias             copy    always
moe   gate         {L}mlp.experts.{{E}}.gate_proj.weight             expert  always
moe   up           {L}mlp.experts.{{E}}.up_proj.weight               expert  always
moe   fc2          {L}mlp.experts.{{E}}.down_proj.weight             expert  always
moe   shared_gate  {L}mlp.shared_experts.gate_proj.weight          copy    always
moe   shared_up    {L}mlp.shared_experts.up_proj.weight            copy    always
moe   shared_fc2   {L}mlp.shared_experts.down_proj.weight          copy    always
"""
ROWS = decoder_rows(qkv_bias="attn_bias", mlp="none") + MOE_ROWS + DENSE_ROWS
PARAMS = MOE_PARAMS | {"expert_bias", "shared_gate", "shared_up", "shared_fc2"}


def moe_shape_problems(f, m, best: int) -> list[str]:
    """What the DeepSeek-style MoE classes (Glm4Moe, DeepseekV2 / V3) cannot take from one ``moe`` node: shared
    experts other than ungated ones of a multiple of the experts' size (``moe_intermediate_size x
    n_shared_experts``), and expert groups ranked other than by the sum of their ``best`` scores (Megatron's
    ``group_limited_topk`` sums the best ``top_k // group_topk``)."""
    a, F, p = m.attrs, m.params["fc2"].type.shape[-1], []
    if a["shared_expert"] != "ungated":
        p.append(f"{m.location}: the {f.name} always adds ungated shared experts; this MoE has "
                 f"shared_expert={a['shared_expert']!r}")
    elif _shared(m) % F:
        p.append(f"{m.location}: a shared expert of {_shared(m)} is not a multiple of the experts' {F}: the "
                 f"{f.name} sizes it moe_intermediate_size x n_shared_experts")
    if a["group_topk"] and a["top_k"] // a["group_topk"] != best:
        n = a["top_k"] // a["group_topk"]
        p.append(f"{m.location}: group-limited routing with top_k // group_topk = {n} (Megatron ranks a group by the "
                 f"sum of its best {n}) cannot be expressed by the {f.name}: it ranks groups by their best "
                 + ("score" if best == 1 else f"{best} scores"))
    return p


def _router(f):
    p = []
    for m in f.moes:
        if m.attrs["score"] != "sigmoid":
            p.append(f"{m.location}: score={m.attrs['score']!r} routing cannot be expressed by the {f.name}: it "
                     "routes by sigmoid (softmax MoEs become Mixtral / Qwen2-MoE / Qwen3-MoE)")
        p += moe_shape_problems(f, m, 2)
        if p:
            return p
    if len({(m.attrs["num_groups"], m.attrs["group_topk"], m.attrs["norm_topk"], _shared(m)) for m in f.moes}) > 1:
        p.append(f"MoE layers differ in routing groups / shared experts; the {f.name} has one per model")
    if f.has(f.attns, ("proj_bias",)):
        p.append(f"an attention output bias cannot be expressed by the {f.name} (o_proj has none)")
    if f.has(f.mlps, MLP_BIAS):
        p.append(f"MLP biases cannot be expressed by the {f.name}")
    return p


def _shared(m) -> int:
    return m.params["shared_fc2"].type.shape[-1] if "shared_fc2" in m.params else 0


def config(f, flags) -> dict:
    m = f.moes[0]
    a, F = m.attrs, m.params["fc2"].type.shape[-1]
    cfg = llama_config(f, m)
    pct = float(f.a0["rope"].percent)
    cfg["rope_parameters"]["partial_rotary_factor"] = pct      # transformers >= 5
    cfg.update(partial_rotary_factor=pct, attention_bias=flags["attn_bias"], use_qk_norm=False,
               n_routed_experts=a["num_experts"], num_experts_per_tok=a["top_k"], moe_intermediate_size=F,
               n_shared_experts=_shared(m) // F, routed_scaling_factor=float(a["topk_scale"]),
               n_group=a["num_groups"] or 1, topk_group=a["group_topk"] or 1, norm_topk_prob=bool(a["norm_topk"]),
               first_k_dense_replace=len(dense_layers(f)), intermediate_size=dense_size(f),
               num_nextn_predict_layers=0, output_router_logits=False)
    return cfg


def _flags(f, base: dict) -> dict:
    return base | {"attn_bias": f.has(f.attns, ("q_bias", "k_bias", "v_bias")), "mlp_bias": False}


family("glm4_moe", "Glm4MoeForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: (bool(f.moes) and f.kinds == {"rmsnorm"} and f.positions == {"rope"}
                            and any(m.attrs["score"] == "sigmoid" and m.attrs["shared_expert"] != "none"
                                    for m in f.moes)),
       rules=[rule("q/k normalization")(no_qk_norm), ROTARY_ONLY,
              rule("dense layers other than the first k (first_k_dense_replace) as gated bias-free MLPs of one size, "
                   "experts other than bias-free gated SiLU, differing MoE layers")(
                  lambda f: moe_rules(f, f.name, PARAMS, sigmoid=True, first_only=True)),
              rule("softmax routing, no or gated shared experts, a shared expert size not a multiple of the experts', "
                   "groups ranked by other than their best 2 scores, attention output or MLP biases")(_router)],
       config=config, flags=_flags, before=("mixtral",), router_fp32=True)
