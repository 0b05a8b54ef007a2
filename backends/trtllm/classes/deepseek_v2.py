"""TensorRT-LLM DeepseekV2ForCausalLM (tensorrt_llm/models/deepseek_v2/{model,config,convert}.py and
``DeepseekV2Attention`` in tensorrt_llm/layers/attention.py): multi-latent attention (the IR's ``mla``), RmsNorm,
dense GatedMLP layers.

Per layer and rank, what ``convert.py`` (``load_weights_from_hf_model``) writes and the model's ``load`` reads:

* ``attention.fused_a.weight`` = ``[q_a; kv_a_with_mqa]`` rows (Megatron ``q_down`` then ``kv_down``: latent
  ``kv_lora_rank`` + shared rope key), or ``kv_a`` alone without ``q_lora_rank``; replicated.
* ``attention.q_a_layernorm.weight`` (with ``q_lora_rank``), ``attention.kv_a_layernorm.weight``: RmsNorm at
  ``norm_epsilon`` (DeepseekV2Attention(eps=config.norm_epsilon)); replicated.
* ``attention.q_b_proj`` = the rank's heads of ``q_b`` (or ``q_proj``), ``[nh_r * (nope + rope), q_lora_rank or
  hidden]`` (no ``.weight``: a bare Parameter).
* ``attention.kv_b_proj`` = the rank's ``[k_nope of every head; v of every head]``, ``[nh_r * (nope + v), C]``.
* ``attention.fused_q_proj`` = the weight absorption convert.py computes per rank:
  ``einsum('hdq,hdk->hkq', q_nope, k_nope)`` (the query mapped into the latent space) with the rope rows of
  ``q_b`` after it per head, ``[nh_r * (C + rope), q_lora_rank or hidden]``; the engine's generation step
  scores ``fused_q_proj @ c_q`` against the cached ``[c_kv; k_pe]``. A lazy recipe (``mla_absorb``), computed in
  fp32 at write time.
* ``attention.dense.weight``: ``proj`` split on dim 1.

Sizes: TensorRT-LLM's MLA kernels are instantiated for ``kv_lora_rank`` 512 and ``qk_rope_head_dim`` 64 only
(``mlaKernels.cu``: ``applyMLARopeAndAssignQKVKernel*<T, 256, 512, 64>``) and its ``mlaParams`` / the later
``DeepseekV2Attention`` size ``kv_b_proj`` as ``h * qk_nope_head_dim * 2`` rows (``v_head_dim`` = nope): other
sizes would load and run wrong, so they are refused (DeepSeek-V2 / V2-Lite / V3 and Megatron's MLA defaults fit).

The decoupled rope is applied to GPT-J pairs (DeepSeek's and Megatron's layout: convert.py does not permute the
rows), with YaRN cos/sin from ``rotary_scaling`` (``create_sinusoidal_positions_yarn``), which the model reads
unconditionally: a plain rope is written as yarn with factor 1 (the same frequencies and mscale 1). The softmax
scale is ``1 / (q_scaling * sqrt(nope + rope))`` with ``q_scaling = 1 / get_mscale(factor, mscale_all_dim)^2``
when ``mscale_all_dim`` is set. Without MoE (``moe.num_experts`` 0) every layer is a GatedMLP (``hidden_act``
swiglu, made non-gated silu for the dense layers; ``mlp.fc`` = gate_proj, ``mlp.gate`` = up_proj).

MoE (DeepSeek-V2 / V2-Lite): ``DeepseekV2DecoderLayer`` builds a GatedMLP (``intermediate_size``) on layer 0 and,
once ``moe.num_experts`` is set, ``MOE`` / ``SharedMoE(use_shared_gate=False)`` (``moe_inter_size``) on every
later layer; convert.py writes the MoE tensors on layers ``>= first_k_dense_replace``: the two agree at 1 only, so
mexc writes ``first_k_dense_replace: 1`` and refuses any other dense / MoE layout (Megatron ``moe_layer_freq``
``[0] + [1] * (L - 1)`` is the one that fits). Per MoE layer and rank (convert.py): ``mlp.router.weight``
``[E, H]`` fp32, replicated; ``mlp.fc.weight`` ``[E / ep, 2 F / moe_tp, H]`` = ``[up; gate]`` per expert (the rank's
expert block ``tp_rank % moe_ep`` and ffn slice ``tp_rank // moe_ep``), ``mlp.proj.weight`` ``[E / ep, H, F / moe_tp]``;
the shared experts ``mlp.shared_expert.fc.weight`` ``[2 S / tp, H]`` = ``[up_r; gate_r]`` and
``mlp.shared_expert.proj.weight`` ``[H, S / tp]`` (a plain MLP over the whole TP group, no gate: DeepSeek's
shared experts are ungated; ``S`` = ``n_shared_experts * moe_intermediate_size``). Routing (layers/moe.py
``MixtureOfExperts.forward``, by ``moe.normalization_mode``): RENORMALIZE (1) = top-k of the fp32 logits, softmax
over those k (Megatron's default softmax router), NONE (0) = softmax over all, top-k (``moe_router_pre_softmax``);
DEVICE_LIMITED (3) / DEVICE_LIMITED_RENORM (4) = ``group_limited_greedy``: softmax over all, the
``device_limited_topk_group`` groups (of ``device_limited_n_group``) with the best single score kept, times
``device_limited_routed_scaling_factor``, top-k, (4) divided by their sum. Megatron's ``group_limited_topk`` ranks
groups by the sum of their best ``topk // group_topk`` scores: the same when that is 1, refused otherwise.
Megatron's ``moe_router_topk_scaling_factor`` is folded into the experts' ``proj`` (fold-moe-scaling), so the
config's routed scaling factor is 1 (TensorRT-LLM's own converter also asserts 1 with greedy routing).

Versions: this is the layout TensorRT-LLM's own converter writes (``fused_q_proj``, loaded by the 0.x
``DeepseekV2Attention``); later TensorRT-path sources declare ``k_b_proj_trans`` in its place and their
GPTAttentionPlugin refuses MLA ("use the PyTorch workflow"): with such a release serve ``--target hf``. No engine
was built from this layout here. Later MoeConfig versions add a ``topk_method`` field (with NOAUX_TC, DeepSeek-V3's
routing): mexc writes only the ``moe`` keys both generations accept (``topk_method`` at the top level, as
DeepSeekV2Config.from_hugging_face does) and refuses V3's sigmoid / expert-bias routing.
"""

from __future__ import annotations

import math

import torch

from ....errors import IRError
from ....ir import derive
from ....ir.semantics import yarn_softmax_mscale
from ....ir.tensors import recipe_op
from ....ir.types import Rope, TensorType
from .common import UNREWRITTEN, rule, trt_class

CLS = "DeepseekV2ForCausalLM"
_SHAPE = ("num_heads", "kv_lora_rank", "qk_head_dim", "qk_rope_dim", "v_head_dim", "rope", "latent_norm",
          "latent_norm_eps", "softmax_scale")
ROWS = """
moe   shared_up+shared_gate  transformer.layers.{L}.mlp.shared_expert.fc.weight     moe_fc  present
moe   shared_fc2             transformer.layers.{L}.mlp.shared_expert.proj.weight   copy    present
"""
_MOE_KNOWN = {"router", "gate", "up", "fc2", "shared_up", "shared_gate", "shared_fc2"}


@recipe_op("mla_absorb", "TensorRT-LLM DeepseekV2 fused_q_proj: per head [q_nope^T k_nope; q_rope] from a rank's "
           "q_b [nh*(nope+rope), R] and kv_b [nh*(nope+v), C] rows (computed in fp32, stored in q_b's dtype)")
def _mla_absorb():
    def infer(types, nope, rope, v):
        q, kv = types
        nh = q.shape[0] // (nope + rope)
        if q.shape[0] != nh * (nope + rope) or kv.shape[0] != nh * (nope + v):
            raise IRError(f"mla_absorb: q_b {q} / kv_b {kv} are not {nh} heads of {nope}+{rope} / {nope}+{v}")
        return TensorType(q.dtype, (nh * (kv.shape[1] + rope), q.shape[1]))

    def compute(xs, nope, rope, v):
        q, kv = xs
        nh = q.shape[0] // (nope + rope)
        qh = q.float().reshape(nh, nope + rope, q.shape[1])
        k_nope = kv.float().reshape(nh, nope + v, kv.shape[1])[:, :nope]
        absorbed = torch.einsum("hdq,hdk->hkq", qh[:, :nope], k_nope)        # [nh, C, R]
        return torch.cat([absorbed, qh[:, nope:]], dim=1).reshape(-1, q.shape[1]).to(q.dtype)

    return infer, compute


def _kv_b(kv, nope: int, v: int):
    """A rank's kv_up rows [nh_r*(nope+v), C] -> [k_nope of every head; v of every head] (convert.py)."""
    nh = kv.type.shape[0] // (nope + v)
    c = kv.type.shape[1]
    per = derive("reshape", kv, shape=(nh, nope + v, c))
    k = derive("reshape", derive("slice", per, dim=1, start=0, stop=nope), shape=(nh * nope, c))
    val = derive("reshape", derive("slice", per, dim=1, start=nope, stop=nope + v), shape=(nh * v, c))
    return derive("concat", k, val, dim=0)


def node_entries(node, role: str, tp_rank: int, shard) -> list | None:
    """(name, recipe) rows of one ``mla`` node on one rank (layer ``{L}``), or None for the common rows."""
    if role != "mla":
        return None
    a, p = node.attrs, node.params
    nope, rope, v = a["qk_head_dim"], a["qk_rope_dim"], a["v_head_dim"]
    L = "transformer.layers.{L}.attention."
    lora = "q_down" in p
    q_b = shard(p["q_up" if lora else "q"], tp_rank)
    kv_up = shard(p["kv_up"], tp_rank)
    out = [(L + "fused_a.weight", derive("concat", p["q_down"].source, p["kv_down"].source, dim=0) if lora
            else p["kv_down"].source),
           (L + "kv_a_layernorm.weight", p["kv_norm"].source)]
    if lora:
        out.append((L + "q_a_layernorm.weight", p["q_norm"].source))
    out += [(L + "q_b_proj", q_b), (L + "kv_b_proj", _kv_b(kv_up, nope, v)),
            (L + "fused_q_proj", derive("mla_absorb", q_b, kv_up, nope=nope, rope=rope, v=v)),
            (L + "dense.weight", shard(p["proj"], tp_rank))]
    return out


def _scale(a: dict) -> float:
    """The softmax scale DeepseekV2Attention runs: q_scaling from rotary_scaling's mscale_all_dim."""
    r, d = a["rope"], a["qk_head_dim"] + a["qk_rope_dim"]
    m = yarn_softmax_mscale(r) if r.scaling == "yarn" and r.mscale_all_dim else 1.0
    return m * m / math.sqrt(d)


def _rules(f) -> list[str]:
    p = []
    if f.attns:
        p.append(f"layers mixing multi-latent and plain attention are not expressible with {CLS}")
    p += _moe_rules(f)
    a = f.mlas[0].attrs
    if (a["kv_lora_rank"], a["qk_rope_dim"]) != (512, 64) or a["qk_head_dim"] != a["v_head_dim"]:
        p.append(f"multi-latent attention with kv_lora_rank {a['kv_lora_rank']}, qk_pos_emb_head_dim "
                 f"{a['qk_rope_dim']}, qk_head_dim {a['qk_head_dim']}, v_head_dim {a['v_head_dim']} is not expressible "
                 f"with {CLS}: TensorRT-LLM's MLA kernels are compiled for kv_lora_rank 512 and rope 64 only "
                 "(mlaKernels.cu applyMLARopeAndAssignQKVKernel*<T, 256, 512, 64>) and its kv_b_proj holds "
                 "h * qk_head_dim * 2 rows (v_head_dim = qk_head_dim)")
    if len({tuple(m.attrs[k] for k in _SHAPE) for m in f.mlas}) > 1 or len({"q" in m.params for m in f.mlas}) > 1:
        p.append(f"layers differ in multi-latent attention shape, rope or q_lora_rank; {CLS} has one per model")
    eps = f.norms[0].attrs["eps"] if f.norms else None
    if a["latent_norm"] != "rmsnorm" or a["latent_norm_eps"] != eps:
        p.append(f"latent norms {a['latent_norm']} at eps {a['latent_norm_eps']:g} are not expressible with {CLS}: "
                 f"its q_a / kv_a layernorms are RmsNorm at norm_epsilon ({eps}) (Megatron: qk_layernorm)")
    r = a["rope"]
    if r.percent != 1.0 or not r.interleaved or r.scaling not in ("none", "yarn") or \
            (r.scaling == "yarn" and not r.truncate):
        p.append(f"a decoupled rope other than whole GPT-J-pair rotation with no or (integer-rounded) yarn "
                 f"scaling is not expressible with {CLS} (rope {r})")
    scale = a["softmax_scale"] or (a["qk_head_dim"] + a["qk_rope_dim"]) ** -0.5
    if not math.isclose(scale, _scale(a), rel_tol=1e-9):
        p.append(f"a softmax scale of {scale:.6g} is not expressible with {CLS}, which computes {_scale(a):.6g} "
                 "from rotary_scaling (Megatron scales by rotary_scaling_factor / mscale_all_dim even without yarn)")
    if f.has(f.mlas, ("proj_bias",)) or f.has(f.mlps, ("gate_bias", "up_bias", "fc2_bias")):
        p.append(f"linear biases are not expressible with {CLS} (its attention and MLP have bias=False)")
    if f.kinds != {"rmsnorm"}:
        p.append(f"{CLS} uses RmsNorm only")
    if any(not m.attrs["gated"] or m.attrs["activation"] != "silu" for m in f.mlps):
        p.append(f"{CLS} is written for a SwiGLU MLP only")
    if len({m.params["fc2"].type.shape[-1] for m in f.mlps}) > 1:
        p.append(f"MLP sizes that differ across layers are not expressible with {CLS} (one intermediate_size)")
    if f.learned:
        p.append(f"learned position embeddings are not expressible with {CLS}")
    return p


def _moe_rules(f) -> list[str]:
    """What DeepseekV2DecoderLayer's MOE / SharedMoE cannot express (see the module docstring)."""
    if not f.moes:
        return []
    p, dense = [], sorted(m.layer for m in f.mlps)
    if dense != [0]:
        p.append(f"dense (non-MoE) layers {dense or 'none'} with MoE layers are not expressible with {CLS}: it "
                 "builds a GatedMLP on layer 0 and a MoE on every later layer (Megatron moe_layer_freq [0] + [1] * "
                 "(num_layers - 1))")
    for m in f.moes:
        a = m.attrs
        if a["score"] != "softmax" or "expert_bias" in m.params:
            return p + [f"MoE routing with score={a['score']!r} and expert bias (DeepSeek-V3's) is not expressible "
                        f"with {CLS}, which routes by softmax (DeepSeek-V2's greedy / group-limited greedy)"]
        k, gk = a["top_k"], a["group_topk"]
        if gk and k // gk != 1:
            p.append(f"group-limited routing ranking groups by the sum of their best {k // gk} scores (Megatron "
                     f"moe_router_topk {k} / moe_router_group_topk {gk}) is not expressible with {CLS}: its "
                     "group_limited_greedy ranks groups by their best score (moe_router_topk // group_topk must be 1)")
        if not a["gated"] or a["activation"] != "silu":
            p.append(f"{CLS} is written for SwiGLU experts only")
        if a["shared_expert"] == "sigmoid-gated":
            p.append(f"a shared expert with a sigmoid gate (moe_shared_expert_gate) is not expressible with {CLS}: "
                     "DeepseekV2DecoderLayer builds SharedMoE(use_shared_gate=False) (QWenForCausalLM qwen2_moe has "
                     "the gate)")
        if set(m.params) - _MOE_KNOWN - {"shared_expert_gate"}:
            p.append(f"MoE params {sorted(set(m.params) - _MOE_KNOWN - {'shared_expert_gate'})} (biases) are not "
                     f"expressible with {CLS} (its MOE and shared expert have bias=False)")
        if p:
            return p
    if len({(m.attrs["num_experts"], k, m.attrs["pre_softmax"], m.attrs["num_groups"], m.attrs["group_topk"],
             m.attrs["shared_expert"], m.params["fc2"].type.shape, _shared_size(m)) for m in f.moes}) > 1:
        p.append(f"MoE layers differ in experts / top-k / routing / sizes; {CLS} has one moe config per model")
    return p


def _shared_size(m) -> int:
    return m.params["shared_fc2"].type.shape[-1] if "shared_fc2" in m.params else 0


def _moe_config(m) -> dict:
    """config.json fields of the MoE layers (``m``: the first moe node; its topk_scale already folded)."""
    a, S = m.attrs, _shared_size(m)
    groups = bool(a["group_topk"])
    moe = {"num_experts": a["num_experts"], "top_k": a["top_k"],
           "normalization_mode": (3 if a["pre_softmax"] else 4) if groups else (0 if a["pre_softmax"] else 1),
           "shared_expert_intermediate_size": S}
    if groups:
        moe.update(device_limited_n_group=a["num_groups"], device_limited_topk_group=a["group_topk"],
                   device_limited_routed_scaling_factor=float(a["topk_scale"]))
    return {"moe_inter_size": m.params["fc2"].type.shape[-1], "first_k_dense_replace": 1,
            "topk_method": "group_limited_greedy" if groups else "greedy", "moe": moe}


def _read_moe(cfg: dict) -> dict:
    """The inverse of :func:`_moe_config`: the IR attributes of the MoE layers, or ``refuse``."""
    moe = cfg["moe"]
    E, k, mode = int(moe["num_experts"]), int(moe.get("top_k", 0)), int(moe.get("normalization_mode", 1))
    if int(cfg.get("first_k_dense_replace", 1)) != 1:
        return {"refuse": f"first_k_dense_replace {cfg['first_k_dense_replace']}: {CLS} builds layer 0 dense and "
                          "every later layer MoE, its converter the MoE on layers >= first_k_dense_replace; mexc "
                          "reads 1 only"}
    if mode not in (0, 1, 3, 4):
        return {"refuse": f"moe.normalization_mode {mode}: mexc reads {CLS} with NONE, RENORMALIZE, DEVICE_LIMITED "
                          "or DEVICE_LIMITED_RENORM routing only"}
    attrs = {}
    if mode in (3, 4):
        G, gk = int(moe.get("device_limited_n_group", 0)), int(moe.get("device_limited_topk_group", 0))
        if not gk or k // gk != 1:
            return {"refuse": f"group-limited routing with top_k {k}, topk_group {gk}: mexc reads it where top_k // "
                              "topk_group is 1 (groups ranked by their best score, as Megatron's group_limited_topk)"}
        attrs = {"num_groups": G, "group_topk": gk,
                 "topk_scale": float(moe.get("device_limited_routed_scaling_factor", 1.0)) if mode == 3 else 1.0}
    return {"experts": E, "top_k": k, "pre_softmax": mode in (0, 3), "dense_layers": (0,), "moe_attrs": attrs,
            "shared_expert": "ungated" if int(moe.get("shared_expert_intermediate_size", 0)) else "none"}


def _rotary_scaling(r, max_pos: int) -> dict:
    """config.json rotary_scaling: every knob DeepseekV2Attention reads (a plain rope: yarn with factor 1)."""
    if r.scaling == "yarn":
        return {"type": "yarn", "factor": r.factor, "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim,
                "original_max_position_embeddings": r.original_max_positions}
    return {"type": "yarn", "factor": 1.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
            "original_max_position_embeddings": max_pos}


def config(f, cfg: dict) -> dict:
    m = f.mlas[0]
    a, q = m.attrs, m.params.get("q_down")
    cfg.update(num_key_value_heads=1, head_size=a["kv_lora_rank"] + a["qk_rope_dim"], hidden_act="swiglu",
               position_embedding_type="rope_gpt_neox", rotary_base=a["rope"].base,
               rotary_scaling=_rotary_scaling(a["rope"], f.config.max_position_embeddings),
               q_lora_rank=q.type.shape[0] if q is not None else None, kv_lora_rank=a["kv_lora_rank"],
               qk_nope_head_dim=a["qk_head_dim"], qk_rope_head_dim=a["qk_rope_dim"], v_head_dim=a["v_head_dim"],
               mlp_bias=False, attn_bias=False, moe_inter_size=0, first_k_dense_replace=f.config.num_layers,
               moe_layer_freq=1, topk_method="greedy", coring_func="softmax", fp8_format=False,
               moe={"num_experts": 0, "top_k": 0, "normalization_mode": 0, "shared_expert_intermediate_size": 0})
    if f.moes:
        cfg.update(_moe_config(f.moes[0]))
    for k in ("rotary_pct",):
        cfg.pop(k, None)
    return cfg


def lift_mla(b, h, layer: int, cfg: dict, leaf, tp: int):
    """The ``mla`` node of one layer of a DeepseekV2ForCausalLM checkpoint (mexc's reader, :mod:`mexc.frontends.
    trtllm`), from the context-phase tensors: ``fused_a`` split back into ``q_down`` / ``kv_down``, the ranks'
    ``q_b_proj`` rows concatenated, each rank's ``[k_nope; v]`` rows of ``kv_b_proj`` regrouped per head.
    ``leaf(tp_rank, name)`` is the lazy tensor ``attention.<name>`` of that rank. ``fused_q_proj`` is checked
    against them by :func:`absorption_mismatches`."""
    R, C, nope, rope, v = (cfg.get("q_lora_rank"), cfg["kv_lora_rank"], cfg["qk_nope_head_dim"],
                           cfg["qk_rope_head_dim"], cfg["v_head_dim"])
    nh_r = cfg["num_attention_heads"] // tp
    fused = leaf(0, "fused_a.weight")
    kv_b = []
    for t in range(tp):
        w = leaf(t, "kv_b_proj")
        k = derive("reshape", derive("slice", w, dim=0, start=0, stop=nh_r * nope), shape=(nh_r, nope, C))
        val = derive("reshape", derive("slice", w, dim=0, start=nh_r * nope, stop=nh_r * (nope + v)), shape=(nh_r, v, C))
        kv_b.append(derive("reshape", derive("concat", k, val, dim=1), shape=(nh_r * (nope + v), C)))

    def cat(ts):
        return ts[0] if len(ts) == 1 else derive("concat", *ts, dim=0)

    params = {"kv_down": derive("slice", fused, dim=0, start=R or 0, stop=(R or 0) + C + rope),
              "kv_norm": leaf(0, "kv_a_layernorm.weight"), "kv_up": cat(kv_b),
              "proj": derive("concat", *[leaf(t, "dense.weight") for t in range(tp)], dim=1) if tp > 1
              else leaf(0, "dense.weight")}
    q_b = cat([leaf(t, "q_b_proj") for t in range(tp)])
    if R:
        params.update(q_down=derive("slice", fused, dim=0, start=0, stop=R), q_norm=leaf(0, "q_a_layernorm.weight"),
                      q_up=q_b)
    else:
        params["q"] = q_b
    rs = cfg["rotary_scaling"]
    r = Rope(base=float(cfg["rotary_base"]), interleaved=True, scaling="yarn", factor=float(rs["factor"]),
             beta_fast=float(rs["beta_fast"]), beta_slow=float(rs["beta_slow"]), mscale=float(rs["mscale"]),
             mscale_all_dim=float(rs["mscale_all_dim"]),
             original_max_positions=int(rs["original_max_position_embeddings"]))
    if r.factor == 1.0:   # yarn at factor 1: the plain frequencies, mscale 1
        r = Rope(base=r.base, interleaved=True)
    a = {"num_heads": cfg["num_attention_heads"], "kv_lora_rank": C, "qk_head_dim": nope, "qk_rope_dim": rope,
         "v_head_dim": v, "rope": r, "latent_norm": "rmsnorm", "latent_norm_eps": cfg["norm_epsilon"]}
    return b.node("mla", h, layer=layer, params=params, softmax_scale=_scale(a), **a)


def absorption_mismatches(out, cfg: dict) -> list[tuple[str, str, str]]:
    """(file, tensor, why) for each layer whose ``fused_q_proj`` is not the absorption of its rank's
    ``q_b_proj`` and ``kv_b_proj`` (the engine's generation step runs it, its context phase the other two: a
    mismatch serves different logits after the first token). Reads those tensors, one rank file at a time."""
    from safetensors import safe_open

    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    m = cfg.get("mapping") or {}
    problems = []
    for r in range(int(m.get("tp_size", 1)) * int(m.get("pp_size", 1))):
        with safe_open(out / f"rank{r}.safetensors", "pt") as f:
            for name in sorted(k for k in f.keys() if k.endswith(".attention.fused_q_proj")):  # noqa: SIM118
                pre = name[:-len("fused_q_proj")]
                q_b, kv_b = f.get_tensor(pre + "q_b_proj"), f.get_tensor(pre + "kv_b_proj")
                nh = kv_b.shape[0] // (nope + v)
                kv_up = torch.cat([kv_b[:nh * nope].reshape(nh, nope, -1), kv_b[nh * nope:].reshape(nh, v, -1)],
                                  dim=1).reshape(nh * (nope + v), -1)
                _, compute = _mla_absorb()
                want, got = compute([q_b, kv_up], nope, rope, v).float(), f.get_tensor(name).float()
                tol = 1e-5 if got.dtype == torch.float32 else 1e-2
                if got.shape != want.shape or (got - want).abs().max() > tol * max(1.0, want.abs().max().item()):
                    problems.append((f"rank{r}.safetensors", name, "is not the absorption of this rank's q_b_proj "
                                     "and kv_b_proj (einsum hdq,hdk->hkq with the rope rows): the engine's "
                                     "generation steps would disagree with its context phase"))
    return problems


def notes(f) -> list[str]:
    return [f"{CLS}: the layout TensorRT-LLM's deepseek_v2 converter writes (fused_q_proj, kv_lora_rank 512 / rope 64 "
            "kernels); a TensorRT-LLM whose GPTAttentionPlugin refuses MLA ('use the PyTorch workflow') cannot build "
            "it: serve --target hf there"]


def read(cfg: dict) -> dict:
    out = {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": {"base": float(cfg["rotary_base"])},
           "mla": lift_mla}
    if int((cfg.get("moe") or {}).get("num_experts", 0)):
        out.update(_read_moe(cfg))
    return out


_cls = trt_class(CLS, signature=lambda f: bool(f.mlas),
          rules=[UNREWRITTEN,
                 rule("plain attention layers mixed in; MLA shapes differing by layer; latent norms other than "
                      "RmsNorm at norm_epsilon; partial rope, scaling other than yarn; a softmax scale rotary_scaling "
                      "cannot give; biases; norms other than RmsNorm; a MLP other than SwiGLU; learned positions; "
                      "(MoE) dense layers other than layer 0 alone, sigmoid / expert-bias routing, groups ranked by "
                      "more than their best score, a gated shared expert, experts other than SwiGLU, MoE biases, "
                      "differing MoE layers")(_rules)],
          config=config, read=read, extra_rows=ROWS, node_entries=node_entries, check_ranks=absorption_mismatches,
          notes=notes,
          before=("QWenForCausalLM", "LlamaForCausalLM", "GPTForCausalLM", "GemmaForCausalLM", "FalconForCausalLM"))
# no attention node: its rows never apply (the mla tensors come from node_entries, listed in the docstring)
_cls.rows[:] = [r for r in _cls.rows if r.role != "attention"]
