"""Test-side reader of TensorRT-LLM DeepseekV2ForCausalLM checkpoints (dense layers), written from TensorRT-LLM's
sources (tensorrt_llm/models/deepseek_v2/{config,convert,model}.py, ``DeepseekV2Attention`` in
tensorrt_llm/layers/attention.py and ``RopeEmbeddingUtils.create_sinusoidal_positions_yarn``); it never imports
mexc. Used by :mod:`trtllm_reader` for that architecture.

* :func:`read_checkpoint` checks config.json and every ``rank{N}.safetensors`` (names the model's ``load``
  requires, per-rank shapes, replicated tensors equal across TP ranks) and returns the per-rank tensors with
  GLOBAL layer numbers: ``ranks[tp_rank][name]``.
* :func:`forward` runs TensorRT-LLM's math in fp32, one TP rank at a time with the row-parallel outputs summed
  (the engine's all-reduce): ``fused_a`` -> ``[c_q | c_kv | k_pe]``, RmsNorm'd latents (eps ``norm_epsilon``);
  ``phase="generation"`` scores with the absorbed weights as the engine's generation step does
  (``fused_q_proj @ c_q`` per head = ``[q in latent space | q_pe]`` against the cached ``[c_kv | k_pe]``, the
  context a latent that the v rows of ``kv_b_proj`` lift per head); ``phase="context"`` up-projects as the
  context phase does (``q_b_proj``, the k_nope / v rows of ``kv_b_proj``). Rope on GPT-J pairs of ``q_pe`` /
  ``k_pe`` (convert.py keeps DeepSeek's row order) with YaRN cos/sin; softmax scale
  ``1 / (q_scaling * sqrt(nope + rope))``, ``q_scaling = 1 / get_mscale(factor, mscale_all_dim)^2`` when
  ``mscale_all_dim`` is set.
* MoE (``moe.num_experts`` set): ``DeepseekV2DecoderLayer`` builds a GatedMLP on layer 0 and ``MOE`` /
  ``SharedMoE(use_shared_gate=False)`` on every later layer (convert.py writes the experts on layers ``>=
  first_k_dense_replace``: 1 is the value on which both agree). Routing as ``MixtureOfExperts.forward`` by
  ``moe.normalization_mode`` on the fp32 router logits: NONE softmax + top-k; RENORMALIZE top-k of the logits then
  softmax over them; DEVICE_LIMITED(_RENORM) ``group_limited_greedy`` (softmax, groups ranked by their max score,
  the best ``device_limited_topk_group`` kept, x ``device_limited_routed_scaling_factor``, top-k, RENORM divides by
  the sum). Rank ``t`` holds experts block ``t % moe_ep_size`` and ffn slice ``t // moe_ep_size``
  (``Mapping.moe_ep_rank`` / ``moe_tp_rank``); ``mlp.fc`` = ``[up; gate]`` per expert, ``swiglu`` = silu of the
  second half times the first; the shared expert an MLP over the whole TP group; the rank's routed + shared
  output summed over ranks (SharedMoE's all-reduce).
"""
from __future__ import annotations

import json
import math
import os
import re

import torch

ARCH = "DeepseekV2ForCausalLM"
_LAYER = re.compile(r"transformer\.layers\.(\d+)\.(.+)")
_CFG = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "norm_epsilon", "rotary_base", "rotary_scaling",
        "max_position_embeddings", "moe", "mapping")
# DeepseekV2Attention / model.py read these keys of rotary_scaling unconditionally
_YARN = ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "original_max_position_embeddings")


def _fail(msg):
    raise AssertionError(msg)


def check_config(cfg: dict) -> list:
    p = [f"missing {k}" for k in _CFG if k not in cfg]
    if p:
        return p
    rs = cfg["rotary_scaling"]
    if not isinstance(rs, dict) or any(k not in rs for k in _YARN):
        p.append(f"rotary_scaling must hold {_YARN} (DeepseekV2Attention reads them)")
    moe, m = cfg["moe"], cfg["mapping"]
    E, k = int(moe.get("num_experts", 0)), int(moe.get("top_k", 0))
    if E:
        mode = int(moe.get("normalization_mode", 1))
        if "moe_inter_size" not in cfg:
            p.append("missing moe_inter_size (the experts' ffn size)")
        if int(cfg.get("first_k_dense_replace", 1)) != 1:
            p.append("first_k_dense_replace must be 1: the model builds layer 0 dense and the MoE on layer_idx > 0, "
                     "convert.py writes the experts on layers >= first_k_dense_replace")
        if mode not in (0, 1, 3, 4):
            p.append(f"normalization_mode {mode} is not a DeepseekV2 routing (NONE, RENORMALIZE, DEVICE_LIMITED*)")
        if mode in (3, 4):
            G, gk = int(moe.get("device_limited_n_group", 0)), int(moe.get("device_limited_topk_group", 0))
            if not G or E % G or not 1 <= gk <= G or gk * (E // G) < k:
                p.append(f"device_limited_n_group {G} / topk_group {gk} do not fit {E} experts, top_k {k}")
        ep = int(m.get("moe_ep_size", 1))
        mtp = int(m.get("moe_tp_size", int(m.get("tp_size", 1)) // ep))
        if mtp * ep != int(m.get("tp_size", 1)) or E % ep or not 1 <= k <= E:
            p.append(f"moe_tp_size {mtp} x moe_ep_size {ep} != tp_size, or {E} experts / top_k {k} do not fit")
    if cfg.get("hidden_act") != "swiglu":
        p.append(f"hidden_act {cfg.get('hidden_act')!r}: DeepseekV2 dense layers are non_gated_version(swiglu)")
    if cfg.get("num_key_value_heads") != 1 or \
            cfg.get("head_size") != cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]:
        p.append("num_key_value_heads must be 1 and head_size kv_lora_rank + qk_rope_head_dim (MLA's latent cache)")
    if (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) != (512, 64) or cfg["qk_nope_head_dim"] != cfg["v_head_dim"]:
        p.append("MLA kernels (mlaKernels.cu <T, 256, 512, 64>) take kv_lora_rank 512 / rope 64 only, and kv_b_proj "
                 "is sized h * qk_nope_head_dim * 2 (v_head_dim = qk_nope_head_dim)")
    if cfg["num_attention_heads"] % int(cfg["mapping"].get("tp_size", 1)):
        p.append("num_attention_heads not divisible by tp_size")
    return p


def _moe_split(cfg: dict) -> tuple[int, int]:
    m = cfg["mapping"]
    ep = int(m.get("moe_ep_size", 1))
    return int(m.get("moe_tp_size", int(m.get("tp_size", 1)) // ep)), ep


def _layer_shapes(cfg: dict, tp: int, layer: int = 0) -> dict:
    H, nh, C = cfg["hidden_size"], cfg["num_attention_heads"] // tp, cfg["kv_lora_rank"]
    nope, rope, v, I = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["intermediate_size"]
    R = cfg.get("q_lora_rank")
    a = "attention."
    s = {"input_layernorm.weight": (H,), "post_layernorm.weight": (H,),
         a + "fused_a.weight": ((R or 0) + C + rope, H), a + "kv_a_layernorm.weight": (C,),
         a + "q_b_proj": (nh * (nope + rope), R or H), a + "kv_b_proj": (nh * (nope + v), C),
         a + "fused_q_proj": (nh * (C + rope), R or H), a + "dense.weight": (H, nh * v),
         "mlp.fc.weight": (I // tp, H), "mlp.gate.weight": (I // tp, H), "mlp.proj.weight": (H, I // tp)}
    if R:
        s[a + "q_a_layernorm.weight"] = (R,)
    E, S = int(cfg["moe"].get("num_experts", 0)), int(cfg["moe"].get("shared_expert_intermediate_size", 0))
    if E and layer > 0:      # DeepseekV2DecoderLayer: MOE / SharedMoE once num_experts > 0 and layer_idx > 0
        mtp, ep = _moe_split(cfg)
        F = int(cfg["moe_inter_size"])
        for k in ("mlp.fc.weight", "mlp.gate.weight", "mlp.proj.weight"):
            del s[k]
        s.update({"mlp.router.weight": (E, H), "mlp.fc.weight": (E // ep, 2 * F // mtp, H),
                  "mlp.proj.weight": (E // ep, H, F // mtp)})
        if S:
            s.update({"mlp.shared_expert.fc.weight": (2 * S // tp, H), "mlp.shared_expert.proj.weight": (H, S // tp)})
    return s


def _replicated(name: str) -> bool:
    return name.endswith(("layernorm.weight", "fused_a.weight", "router.weight")) or name in (
        "transformer.vocab_embedding.weight", "transformer.ln_f.weight")


def read_checkpoint(ckpt_dir: str):
    """(cfg, ranks): ``ranks[t]`` maps global names to that TP rank's tensors (fp32)."""
    from safetensors.torch import load_file

    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("architecture") != ARCH:
        _fail(f"architecture {cfg.get('architecture')!r} is not {ARCH}")
    p = check_config(cfg)
    if p:
        _fail("config.json problems: " + "; ".join(p))
    tp, pp = int(cfg["mapping"].get("tp_size", 1)), int(cfg["mapping"].get("pp_size", 1))
    L, H, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    if cfg.get("use_parallel_embedding"):
        _fail("this reader reads a replicated vocab_embedding only")
    ranks = [dict() for _ in range(tp)]
    for s in range(pp):
        layers = torch.tensor_split(torch.arange(L), pp)[s].tolist()   # Mapping.pp_layers
        for t in range(tp):
            rank = s * tp + t
            path = os.path.join(ckpt_dir, f"rank{rank}.safetensors")
            if not os.path.exists(path):
                _fail(f"missing rank{rank}.safetensors (tp={tp}, pp={pp})")
            got = load_file(path)
            want = {f"transformer.layers.{i}.{k}": v for i, g in enumerate(layers)
                    for k, v in _layer_shapes(cfg, tp, g).items()}
            if s == 0:
                want["transformer.vocab_embedding.weight"] = (V, H)
            if s == pp - 1:
                want["transformer.ln_f.weight"] = (H,)
                want["lm_head.weight"] = (math.ceil(V / tp), H)
            if set(got) != set(want):
                _fail(f"rank{rank}: missing {sorted(set(want) - set(got))}, provided but not required "
                      f"{sorted(set(got) - set(want))}")
            for k, w in got.items():
                if tuple(w.shape) != tuple(want[k]):
                    _fail(f"rank{rank}: {k} has shape {tuple(w.shape)}, expected per-rank {want[k]}")
                m = _LAYER.fullmatch(k)
                g = f"transformer.layers.{layers[int(m.group(1))]}.{m.group(2)}" if m else k
                if k.endswith("router.weight") and w.dtype != torch.float32:
                    _fail(f"rank{rank}: {k} is {w.dtype}; MOE's router is a float32 RowLinear (strict_dtype)")
                ranks[t][g] = w.float()
    for k in ranks[0]:
        if _replicated(k) and any(not torch.equal(r[k], ranks[0][k]) for r in ranks[1:]):
            _fail(f"{k} must be replicated over the TP ranks")
    return cfg, ranks


def _mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_cos_sin(cfg: dict, positions: int):
    """create_sinusoidal_positions_yarn: YaRN frequencies over qk_rope_head_dim, cos/sin x mscale ratio."""
    rs, dim, base = cfg["rotary_scaling"], cfg["qk_rope_head_dim"], float(cfg["rotary_base"])
    factor, orig = float(rs["factor"]), int(rs["original_max_position_embeddings"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def corr_dim(rot):
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(corr_dim(rs["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    mask = 1 - ramp
    inv = inter * (1 - mask) + extra * mask
    freqs = torch.outer(torch.arange(positions, dtype=torch.float64), inv)
    ms = _mscale(factor, rs["mscale"]) / _mscale(factor, rs["mscale_all_dim"])
    return (freqs.cos() * ms).float(), (freqs.sin() * ms).float()


def _rope_pairs(x, cos, sin):
    """Rotate GPT-J pairs (x[2i], x[2i+1]) by position angle i: x [..., s, rope], cos/sin [s, rope/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _attention(cfg, w, pre, x, phase):
    """One rank's DeepseekV2Attention on x [b, s, H] -> its dense output (before the all-reduce)."""
    C, nope, rope, v = cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    R, eps = cfg.get("q_lora_rank"), cfg["norm_epsilon"]
    b, s, _ = x.shape
    a = x @ w[pre + "fused_a.weight"].T
    if R:
        c_q, c_kv, k_pe = a.split([R, C, rope], -1)
        c_q = _rms(c_q, w[pre + "q_a_layernorm.weight"], eps)
    else:
        (c_kv, k_pe), c_q = a.split([C, rope], -1), x
    c_kv = _rms(c_kv, w[pre + "kv_a_layernorm.weight"], eps)
    cos, sin = yarn_cos_sin(cfg, s)
    k_pe = _rope_pairs(k_pe, cos, sin)                                         # [b, s, rope], shared by heads
    kv_b = w[pre + "kv_b_proj"]
    nh = kv_b.shape[0] // (nope + v)
    k_nope_w, v_w = kv_b[:nh * nope].reshape(nh, nope, C), kv_b[nh * nope:].reshape(nh, v, C)
    rs = cfg["rotary_scaling"]
    q_scaling = 1.0 / _mscale(float(rs["factor"]), rs["mscale_all_dim"]) ** 2 if rs["mscale_all_dim"] else 1.0
    scale = 1.0 / (q_scaling * math.sqrt(nope + rope))
    mask = torch.full((s, s), float("-inf")).triu(1)
    if phase == "generation":    # absorbed: q in latent space, context in latent space, then v rows per head
        q = (c_q @ w[pre + "fused_q_proj"].T).reshape(b, s, nh, C + rope).transpose(1, 2)
        q_lat, q_pe = q.split([C, rope], -1)
        q_pe = _rope_pairs(q_pe, cos, sin)
        scores = q_lat @ c_kv.unsqueeze(1).transpose(-1, -2) + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)
        p = torch.softmax(scores * scale + mask, -1)
        ctx = torch.einsum("bhst,btc,hvc->bhsv", p, c_kv, v_w)
    else:                        # context phase: up-projected keys and values per head
        q = (c_q @ w[pre + "q_b_proj"].T).reshape(b, s, nh, nope + rope).transpose(1, 2)
        q_nope, q_pe = q.split([nope, rope], -1)
        q_pe = _rope_pairs(q_pe, cos, sin)
        k_nope = torch.einsum("btc,hdc->bhtd", c_kv, k_nope_w)
        val = torch.einsum("btc,hvc->bhtv", c_kv, v_w)
        scores = q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.unsqueeze(1).transpose(-1, -2)
        ctx = torch.softmax(scores * scale + mask, -1) @ val
    return ctx.transpose(1, 2).reshape(b, s, nh * v) @ w[pre + "dense.weight"].T


def _route(moe: dict, logits):
    """(expert ids, weights) [T, k] as ``MixtureOfExperts.forward`` computes them from fp32 router logits [T, E]."""
    k, mode = int(moe["top_k"]), int(moe.get("normalization_mode", 1))
    if mode == 1:            # RENORMALIZE: top-k of the logits, softmax over those
        top, idx = logits.topk(k, -1)
        return idx, top.softmax(-1)
    scores = logits.softmax(-1)
    if mode == 0:            # NONE (default_routing): softmax over all, top-k
        w, idx = scores.topk(k, -1)
        return idx, w
    G, gk = int(moe["device_limited_n_group"]), int(moe["device_limited_topk_group"])   # group_limited_greedy
    groups = scores.view(scores.shape[0], G, -1)
    keep = torch.zeros(scores.shape[0], G).scatter(1, groups.amax(-1).topk(gk, -1)[1], 1.0)
    masked = (groups * keep.unsqueeze(-1)).view_as(scores) * float(moe.get("device_limited_routed_scaling_factor", 1))
    w, idx = masked.topk(k, -1)
    return idx, (w / w.sum(-1, keepdim=True) if mode == 4 else w)


def _swiglu(x, fc, proj):
    """TensorRT-LLM MLP with swiglu: fc = [up; gate] rows, silu(second half) * first half, then proj."""
    up, gate = (x @ fc.T).chunk(2, -1)
    return (torch.nn.functional.silu(gate) * up) @ proj.T


def _moe(cfg, ranks, pre, x):
    """The MoE layer over every rank (SharedMoE: the rank's routed experts + its shared-expert slice, all-reduced)."""
    moe, (_, ep) = cfg["moe"], _moe_split(cfg)
    b, s, H = x.shape
    t = x.reshape(-1, H)
    idx, wts = _route(moe, t @ ranks[0][pre + "router.weight"].T)
    out = torch.zeros_like(t)
    for r, w in enumerate(ranks):
        fc, proj = w[pre + "fc.weight"], w[pre + "proj.weight"]
        for j in range(fc.shape[0]):
            e = (r % ep) * fc.shape[0] + j
            hit = idx == e                                                       # [T, k]
            rows = hit.any(-1)
            if rows.any():
                out[rows] += (wts * hit).sum(-1)[rows, None] * _swiglu(t[rows], fc[j], proj[j])
        if pre + "shared_expert.fc.weight" in w:
            out += _swiglu(t, w[pre + "shared_expert.fc.weight"], w[pre + "shared_expert.proj.weight"])
    return out.reshape(b, s, H)


@torch.no_grad()
def forward(cfg: dict, ranks: list, tokens: torch.LongTensor, phase: str = "generation") -> torch.Tensor:
    """fp32 logits [b, s, vocab_size] of the checkpoint, TP ranks simulated (row-parallel outputs summed)."""
    eps, w0 = cfg["norm_epsilon"], ranks[0]
    h = w0["transformer.vocab_embedding.weight"][tokens]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"transformer.layers.{i}."
        x = _rms(h, w0[pre + "input_layernorm.weight"], eps)
        h = h + sum(_attention(cfg, w, pre + "attention.", x, phase) for w in ranks)
        x = _rms(h, w0[pre + "post_layernorm.weight"], eps)
        if pre + "mlp.router.weight" in w0:
            h = h + _moe(cfg, ranks, pre + "mlp.", x)
        else:
            h = h + sum((torch.nn.functional.silu(x @ w[pre + "mlp.fc.weight"].T) * (x @ w[pre + "mlp.gate.weight"].T))
                        @ w[pre + "mlp.proj.weight"].T for w in ranks)
    h = _rms(h, w0["transformer.ln_f.weight"], eps)
    head = torch.cat([w["lm_head.weight"] for w in ranks])[:cfg["vocab_size"]]
    return h @ head.T


def logits(ckpt_dir: str, tokens: torch.LongTensor, phase: str = "generation") -> torch.Tensor:
    cfg, ranks = read_checkpoint(ckpt_dir)
    return forward(cfg, ranks, tokens, phase)
