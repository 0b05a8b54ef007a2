"""DeepseekV3ForCausalLM: multi-latent attention (the IR's ``mla``), RMSNorm, dense SwiGLU MLPs.

transformers' ``models/deepseek_v3/modeling_deepseek_v3.py``: ``DeepseekV3Attention`` has ``q_proj`` (no
``q_lora_rank``) or ``q_a_proj`` -> ``q_a_layernorm`` -> ``q_b_proj``, ``kv_a_proj_with_mqa`` (latent + shared
rope key) -> ``kv_a_layernorm`` -> ``kv_b_proj`` (k_nope | v per head), ``o_proj``; ``rope_interleave`` rotates
GPT-J pairs (Megatron's MLA convention); its softmax scale is ``qk_head_dim^-0.5 * get_mscale(factor,
mscale_all_dim)^2`` for a scaled rope (``yarn_apply_mscale``); its latent norms are ``DeepseekV3RMSNorm`` at the
default eps 1e-6. Layers below ``first_k_dense_replace`` have a dense ``DeepseekV3MLP`` of ``intermediate_size``
(Megatron ``moe_layer_freq`` with its 0s first, e.g. ``([0]*3+[1]*58)``; a model without MoE layers is written
with it = num_layers), the others a ``DeepseekV3MoE``: ``DeepseekV3TopkRouter`` routes as Glm4MoeForCausalLM's
(sigmoid, ``e_score_correction_bias`` = Megatron's ``expert_bias`` for the choice only, ``n_group`` /
``topk_group`` groups ranked by their best 2 scores, ``norm_topk_prob``, ``routed_scaling_factor`` =
``moe_router_topk_scaling_factor``; see :mod:`.glm4_moe`) over ``n_routed_experts`` SwiGLU experts of
``moe_intermediate_size``, plus ungated shared experts of ``moe_intermediate_size * n_shared_experts``
(Megatron's SharedExpertMLP without ``moe_shared_expert_gate``). Softmax routing (DeepSeek-V2's) is refused here
(:mod:`.deepseek_v2`, tried first, takes it).
"""

from __future__ import annotations

import math

from ....ir.semantics import yarn_softmax_mscale
from .common import HIDDEN_ACT, ONE_MLP_SIZE, family, mlp_form, rope_fields, rule
from .glm4_moe import MOE_ROWS
from .glm4_moe import PARAMS as MOE_PARAMS
from .glm4_moe import _router, _shared
from .qwen3_moe import dense_layers, moe_rules

_L = "model.layers.{L}."
ROWS = f"""
embedding   word      model.embed_tokens.weight                  copy  always
input_norm  weight    {_L}input_layernorm.weight                 copy  always
mla         q         {_L}self_attn.q_proj.weight                copy  q_direct
mla         q_down    {_L}self_attn.q_a_proj.weight              copy  q_lora
mla         q_norm    {_L}self_attn.q_a_layernorm.weight         copy  q_lora
mla         q_up      {_L}self_attn.q_b_proj.weight              copy  q_lora
mla         kv_down   {_L}self_attn.kv_a_proj_with_mqa.weight    copy  always
mla         kv_norm   {_L}self_attn.kv_a_layernorm.weight        copy  always
mla         kv_up     {_L}self_attn.kv_b_proj.weight             copy  always
mla         proj      {_L}self_attn.o_proj.weight                copy  always
post_norm   weight    {_L}post_attention_layernorm.weight        copy  always
mlp         gate      {_L}mlp.gate_proj.weight                   copy  always
mlp         up        {_L}mlp.up_proj.weight                     copy  always
mlp         fc2       {_L}mlp.down_proj.weight                   copy  always
final_norm  weight    model.norm.weight                          copy  always
lm_head     weight    lm_head.weight                             copy  untied
""" + MOE_ROWS

_SHAPE = ("num_heads", "kv_lora_rank", "qk_head_dim", "qk_rope_dim", "v_head_dim", "rope", "latent_norm",
          "latent_norm_eps", "softmax_scale")


def _hf_scale(a: dict) -> float:
    """The softmax scale DeepseekV3Attention computes from the config mexc writes."""
    s = (a["qk_head_dim"] + a["qk_rope_dim"]) ** -0.5
    r = a["rope"]
    return s * yarn_softmax_mscale(r) ** 2 if r.scaling == "yarn" and r.mscale_all_dim else s


def _mla(f):
    p, a = [], f.mlas[0].attrs
    if f.attns:
        p.append(f"layers mixing multi-latent and plain attention cannot be expressed by the {f.name}")
    if len({tuple(m.attrs[k] for k in _SHAPE) for m in f.mlas}) > 1 or \
            len({("q" in m.params) for m in f.mlas}) > 1:
        p.append(f"layers differ in multi-latent attention shape or rope; the {f.name} has one per model")
    if a["latent_norm"] != "rmsnorm" or a["latent_norm_eps"] != 1e-6:
        p.append(f"latent norms {a['latent_norm']} at eps {a['latent_norm_eps']:g} cannot be expressed by the "
                 f"{f.name}: its q_a / kv_a layernorms are RMSNorm at eps 1e-6 (Megatron: qk_layernorm with "
                 "RMSNorm, layernorm_epsilon 1e-6)")
    r = a["rope"]
    if r.percent != 1.0 or not r.interleaved or r.scaling not in ("none", "yarn"):
        p.append(f"a decoupled rope other than whole GPT-J-pair rotation with no or yarn scaling cannot be "
                 f"expressed by the {f.name} (rope {r})")
    scale = a["softmax_scale"] or (a["qk_head_dim"] + a["qk_rope_dim"]) ** -0.5
    if not math.isclose(scale, _hf_scale(a), rel_tol=1e-6):
        p.append(f"a softmax scale of {scale:.6g} cannot be expressed by the {f.name}, which computes "
                 f"{_hf_scale(a):.6g} from its rope (Megatron scales by rotary_scaling_factor / mscale_all_dim "
                 "even without yarn)")
    if f.has(f.mlas, ("proj_bias",)) or f.has(f.mlps, ("gate_bias", "up_bias", "fc2_bias")):
        p.append(f"linear biases cannot be expressed by the {f.name} (mexc writes attention_bias false)")
    return p


def _moe(f):
    if not f.moes:
        return []
    soft = [m for m in f.moes if m.attrs["score"] != "sigmoid"]
    if soft:
        return [f"{soft[0].location}: score={soft[0].attrs['score']!r} routing cannot be expressed by the {f.name}: "
                "its router is sigmoid with a correction bias (DeepSeek-V3; Megatron moe_router_score_function "
                "sigmoid); softmax-routed MLA (DeepSeek-V2) becomes DeepseekV2ForCausalLM"]
    return moe_rules(f, f.name, MOE_PARAMS, sigmoid=True, first_only=True) or _router(f)


def _no_learned(f):
    if f.learned:
        return f"learned position embeddings cannot be expressed by the {f.name}"


def _flags(f, base: dict) -> dict:
    lora = any("q_down" in m.params for m in f.mlas)
    return dict(base, q_lora=lora, q_direct=not lora)


def config(f, flags) -> dict:
    c, a, m = f.config, f.mlas[0].attrs, (f.mlps or f.moes)[0]
    ffn = m.params["fc2"].type.shape[-1]
    q = f.mlas[0].params.get("q_down")
    cfg = {"vocab_size": f.emb.params["word"].type.shape[0], "hidden_size": c.hidden_size,
           "intermediate_size": ffn, "moe_intermediate_size": ffn, "num_hidden_layers": c.num_layers,
           "first_k_dense_replace": c.num_layers, "num_attention_heads": a["num_heads"],
           "num_key_value_heads": a["num_heads"], "q_lora_rank": q.type.shape[0] if q is not None else None,
           "kv_lora_rank": a["kv_lora_rank"], "qk_nope_head_dim": a["qk_head_dim"],
           "qk_rope_head_dim": a["qk_rope_dim"], "v_head_dim": a["v_head_dim"], "head_dim": a["qk_rope_dim"],
           "hidden_act": HIDDEN_ACT[m.attrs["activation"]], "max_position_embeddings": c.max_position_embeddings,
           "rms_norm_eps": f.norms[0].attrs["eps"], "rope_interleave": True, "attention_bias": False,
           "attention_dropout": 0.0, "initializer_range": 0.02, "num_nextn_predict_layers": 0, "num_mtp_layers": 0}
    rope_fields(a["rope"], cfg)
    if f.moes:
        e = f.moes[0]
        ea, F = e.attrs, e.params["fc2"].type.shape[-1]
        cfg.update(moe_intermediate_size=F, first_k_dense_replace=len(dense_layers(f)),
                   n_routed_experts=ea["num_experts"], num_experts_per_tok=ea["top_k"],
                   n_shared_experts=_shared(e) // F, routed_scaling_factor=float(ea["topk_scale"]),
                   n_group=ea["num_groups"] or 1, topk_group=ea["group_topk"] or 1,
                   norm_topk_prob=bool(ea["norm_topk"]),
                   # transformers hard-codes both; vLLM's DeepseekV2MoE reads them (scoring_func defaults to
                   # softmax, e_score_correction_bias exists only with noaux_tc), as in DeepSeek-V3's Hub config
                   scoring_func="sigmoid", topk_method="noaux_tc")
    return cfg


family("deepseek_v3", "DeepseekV3ForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: bool(f.mlas) and f.kinds == {"rmsnorm"},
       rules=[rule("plain attention layers; MLA shapes differing by layer; latent norms other than RMSNorm at "
                   "1e-6; partial rope or scaling other than yarn; a softmax scale the config cannot give; "
                   "biases")(_mla), rule("learned positions")(_no_learned),
              rule("a MLP other than SwiGLU")(mlp_form(True, "silu", ": DeepseekV3MLP is SwiGLU")),
              ONE_MLP_SIZE,
              rule("softmax routing; dense layers other than the first k (first_k_dense_replace); experts other than "
                   "bias-free gated SiLU; no or gated shared experts, a shared expert size not a multiple of the "
                   "experts'; groups ranked by other than their best 2 scores; differing MoE layers")(_moe)],
       config=config, flags=_flags, router_fp32=True)
