"""DeepseekV2ForCausalLM: multi-latent attention as DeepseekV3ForCausalLM's (see :mod:`.deepseek_v3`) with
DeepSeek-V2's softmax-routed MoE layers after the first ``first_k_dense_replace`` dense ones.

transformers 5.x ``models/deepseek_v2/modeling_deepseek_v2.py``: ``DeepseekV2Attention`` has the same tensors as
DeepseekV3's (``q_proj`` or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``, ``kv_a_proj_with_mqa``,
``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), its latent norms ``DeepseekV2RMSNorm`` at the fixed eps 1e-6, the
decoupled rope always on GPT-J pairs (``apply_rotary_emb``: ``view_as_complex`` of consecutive pairs, Megatron's
MLA convention) and the softmax scale of ``yarn_apply_mscale`` (DeepseekV3's). ``DeepseekV2TopkRouter``: softmax
of the fp32 router logits over all experts, top-k (``topk_method: greedy``) or, with ``group_limited_greedy``, the
top-k within the ``topk_group`` of ``n_group`` groups ranked by their **best** score; the k scores times
``routed_scaling_factor``, never renormalized (``norm_topk_prob`` is not read). That is Megatron's
``moe_router_pre_softmax`` router (megatron/core/transformer/moe/moe_utils.py ``topk_routing_with_score_function``),
with ``moe_router_num_groups`` / ``moe_router_group_topk`` when ``top_k // group_topk`` = 1 (Megatron's
``group_limited_topk`` ranks a group by the sum of its best ``top_k // group_topk`` scores).
Megatron's default softmax router (softmax of the top-k logits: the k scores renormalized) is refused, as are
sigmoid routing (DeepseekV3ForCausalLM), no or gated shared experts (``DeepseekV2Moe`` always adds ungated
shared experts of ``moe_intermediate_size * n_shared_experts``)."""

from __future__ import annotations

from .common import ONE_MLP_SIZE, family, mlp_form, rule
from .deepseek_v3 import ROWS as V3_ROWS
from .deepseek_v3 import _flags, _mla, _no_learned
from .deepseek_v3 import config as v3_config
from .glm4_moe import _shared, moe_shape_problems
from .qwen3_moe import MOE_PARAMS, moe_rules

ROWS = "\n".join(r for r in V3_ROWS.splitlines() if "e_score_correction_bias" not in r)
PARAMS = MOE_PARAMS | {"shared_gate", "shared_up", "shared_fc2"}


def _router(f) -> list[str]:
    p = moe_rules(f, f.name, PARAMS, sigmoid=True, first_only=True)  # sigmoid=True: groups allowed, checked here
    for m in f.moes:
        a, why = m.attrs, f"{m.location}: the {f.name}"
        if a["score"] != "softmax":
            p.append(f"{why} routes by softmax; score={a['score']!r} routing with MLA becomes DeepseekV3ForCausalLM")
        elif not a["pre_softmax"]:
            p.append(f"{why} weighs the top-k by their softmax over all experts, never renormalized: Megatron's "
                     "default router (softmax of the top-k logits) cannot be expressed; moe_router_pre_softmax can")
        p += moe_shape_problems(f, m, 1)
        if p:
            return p
    if len({(m.attrs["num_groups"], m.attrs["group_topk"], m.attrs["topk_scale"], _shared(m)) for m in f.moes}) > 1:
        p.append(f"MoE layers differ in routing groups / scaling / shared experts; the {f.name} has one per model")
    return p


def config(f, flags) -> dict:
    cfg = v3_config(f, flags)
    for k in ("rope_interleave", "num_nextn_predict_layers", "num_mtp_layers"):  # DeepseekV2 always interleaves
        cfg.pop(k)
    a = f.moes[0].attrs
    groups = bool(a["num_groups"])
    cfg.update(topk_method="group_limited_greedy" if groups else "greedy", n_group=a["num_groups"] if groups else None,
               topk_group=a["group_topk"] if groups else None, norm_topk_prob=False, mlp_bias=False)
    return cfg


family("deepseek_v2", "DeepseekV2ForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: (bool(f.mlas) and f.kinds == {"rmsnorm"}
                            and any(m.attrs["score"] == "softmax" for m in f.moes)),
       rules=[rule("plain attention layers; MLA shapes differing by layer; latent norms other than RMSNorm at "
                   "1e-6; partial rope or scaling other than yarn; a softmax scale the config cannot give; "
                   "biases")(_mla), rule("learned positions")(_no_learned),
              rule("a MLP other than SwiGLU")(mlp_form(True, "silu", ": DeepseekV2MLP is SwiGLU")), ONE_MLP_SIZE,
              rule("sigmoid routing; renormalized top-k (Megatron's default softmax router); groups ranked by more "
                   "than their best score; dense layers other than the first k; experts other than bias-free gated "
                   "SiLU; no or gated shared experts, a shared size not a multiple of the experts'; differing MoE "
                   "layers")(_router)],
       config=config, flags=_flags, before=("deepseek_v3",), router_fp32=True)
