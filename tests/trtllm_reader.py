"""Independent reader of TensorRT-LLM checkpoints, used by the tests as an oracle.

A TensorRT-LLM checkpoint is the directory that ``trtllm-build --checkpoint_dir``
takes: one ``config.json`` plus one ``rank{N}.safetensors`` per (pp, tp) rank.
This module knows nothing about mexc (it must never import it).  It implements
TensorRT-LLM's documented conventions from the TensorRT-LLM side:

* ``check_config(cfg)``       -> list of problems with a config.json (empty = OK)
* ``read_checkpoint(dir)``    -> (cfg, tensors): every rank file is read, its
  per-rank shapes are checked against TensorRT-LLM's split rules, quantized
  linears are dequantized, and the shards are merged back into one unsharded
  set keyed by TRT-LLM names with GLOBAL layer numbers.
* ``to_hf(cfg, tensors)``     -> (transformers config, HF state dict)
* ``logits(dir, tokens)``     -> fp32 logits ``[b, s, vocab_size]`` of the HF
  model built from the checkpoint (full causal prefill, no attention mask).

Semantics that were checked against TensorRT-LLM's source (see the notes next to
the code): rank numbering, PP layer split (``torch.tensor_split``), per-rank QKV
``[Q_r; K_r; V_r]`` with KV-head duplication when tp > num_kv_heads, vocab
padding of ``lm_head`` to ``ceil(V/tp)*tp``, MoE ``fc = [w3; w1]`` per expert,
MoE expert placement (``moe_ep_rank = tp_rank % moe_ep``,
``moe_tp_rank = tp_rank // moe_ep``), weight-only int8/int4 quantization
(``symmetric_quantize_last_axis_of_batched_matrix``: scale = amax/2^(bits-1)
per output column of the ``[in, out]`` matrix, int4 packed two per byte along
the out axis, element 2j in the LOW nibble), TensorRT-LLM's ``gelu`` being the
tanh approximation; Gemma (gemma/model.py, config.py, convert.py: embedding x
sqrt(hidden_size) in the model, stored RmsNorm weight = 1 + w, GatedMLP with
``fc`` activated, shared table and parallel embedding when tp > 1) and Falcon
(falcon/model.py, config.py, convert.py: parallel_attention /
new_decoder_architecture with ``mlp_layernorm``, head_size = hidden/heads, ln_f
at eps 1e-5, a parallel block's row-parallel biases summed over TP ranks).
DeepseekV2ForCausalLM (multi-latent attention) is read by
``trtllm_reader_deepseek_v2`` (``logits`` dispatches to it): its absorbed
``fused_q_proj`` is run as the engine's generation step runs it.

Weight-only caveat: TensorRT-LLM's own converters store the *processed* bytes
returned by ``symmetric_quantize_last_axis_of_batched_matrix`` (CUTLASS
mixed-GEMM layout: row permutation, column-major sub-byte transpose, column
interleave and +8/+128 bias, which depends on the GPU's SM version at
conversion time), and the loader does NOT re-process int8 tensors.  This reader
decodes the *unprocessed* row-major layout ``[in, out]`` / ``[in, out/2]``
(what ``_symmetric_quantize_last_axis_of_batched_matrix`` returns first and
what ``unpack_int4_packed_tensor_to_int8`` inverts).  Float weights under
W8A16/W4A16 (which ``trtllm-build`` quantizes itself in
``preprocess_weights``/``weight_only_quantize_dict``) are quantized and
dequantized here the same way when ``emulate_build_quant=True``.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from typing import Dict, List, Tuple

import torch
import trtllm_reader_deepseek_v2   # DeepseekV2ForCausalLM (multi-latent attention): per-rank tensors, TRT-LLM's math

# --------------------------------------------------------------------------
# Known enumerations
# --------------------------------------------------------------------------

_GPT = "GPTForCausalLM"
_LLAMA = "LLaMAForCausalLM"
_GEMMA = "GemmaForCausalLM"
_FALCON = "FalconForCausalLM"
_QWEN = "QWenForCausalLM"
# qwen/config.py QWenConfig.from_hugging_face: the qwen_type values TensorRT-LLM accepts; this reader reads qwen3
# qwen3_moe and qwen2_moe
QWEN_TYPES = {"qwen", "qwen2", "qwen2_moe", "qwen2_llava_onevision", "qwen2_vl", "qwen2_audio", "qwen3",
              "qwen3_moe"}
# layers/attention.py Attention(eps=1e-05): QWenDecoderLayer builds its q/k RmsNorm without passing an eps
QWEN_QK_NORM_EPS = 1e-5

# architecture string -> TRT-LLM model class (tensorrt_llm/models/__init__.py MODEL_MAP,
# union over the 0.x/1.x versions).  The GPT, LLaMA, Gemma, Falcon and QWen (qwen3, qwen3_moe, qwen2_moe) classes
# can be read here.
MODEL_MAP: Dict[str, str] = {
    **{a: _GPT for a in (
        "GPTForCausalLM", "GPT2LMHeadModel", "GPT2LMHeadCustomModel", "GPTBigCodeForCausalLM",
        "Starcoder2ForCausalLM", "NemotronForCausalLM", "JAISLMHeadModel", "FuyuForCausalLM",
        "Kosmos2ForConditionalGeneration")},
    **{a: _LLAMA for a in (
        "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "ArcticForCausalLM",
        "InternLMForCausalLM", "InternLM2ForCausalLM", "InternLMXComposer2ForCausalLM",
        "GraniteForCausalLM", "GraniteMoeForCausalLM", "ExaoneForCausalLM", "SkyworkForCausalLM",
        "LlavaLlamaModel")},
    **{a: _FALCON for a in ("FalconForCausalLM", "RWForCausalLM")},
    _GEMMA: _GEMMA,
    _QWEN: _QWEN,
    **{a: "Other" for a in (
        "OPTForCausalLM", "BloomForCausalLM", "PhiForCausalLM", "Phi3ForCausalLM", "Phi3VForCausalLM",
        "Phi3SmallForCausalLM", "PhiMoEForCausalLM", "Phi4MMForCausalLM", "MambaForCausalLM",
        "GPTNeoXForCausalLM", "GPTJForCausalLM", "MPTForCausalLM", "MptForCausalLM", "GLMModel",
        "ChatGLMModel", "ChatGLMForCausalLM", "ChatGLMForConditionalGeneration",
        "Grok1ModelForCausalLM", "MedusaForCausalLM", "MedusaLlamaForCausalLM", "ReDrafterForCausalLM",
        "BaichuanForCausalLM", "BaiChuanForCausalLM", "Gemma2ForCausalLM",
        "Gemma3ForCausalLM", "QWenLMHeadModel", "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM", "Qwen2ForSequenceClassification", "DbrxForCausalLM",
        "RecurrentGemmaForCausalLM", "CogVLMForCausalLM", "DeepseekForCausalLM",
        "DeepseekV2ForCausalLM", "DeciLMForCausalLM", "WhisperEncoder", "EncoderModel",
        "DecoderModel", "DiT")},
}

# phi3/model.py Phi3ForCausalLM (the Phi-3 mini layout; not Phi3Small / PhiMoE): this reader reads it
_PHI3 = "Phi3ForCausalLM"
MODEL_MAP[_PHI3] = _PHI3

QUANT_ALGOS = {
    "W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W8A16_GPTQ", "W4A16_GPTQ",
    "W8A8_SQ_PER_CHANNEL", "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
    "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN",
    "W4A8_QSERVE_PER_GROUP", "W4A8_QSERVE_PER_CHANNEL", "FP8", "FP8_PER_CHANNEL_PER_TOKEN",
    "FP8_BLOCK_SCALES", "INT8", "MIXED_PRECISION", "NVFP4", "W4A8_NVFP4_FP8", "W4A8_MXFP4_FP8",
    "W4A8_MXFP4_MXFP8", "W4A16_MXFP4", "NO_QUANT",
}
KV_CACHE_QUANT_ALGOS = {"FP8", "INT8", "NVFP4"}
# quant algos this reader can dequantize
SUPPORTED_QUANT = {None, "NO_QUANT", "W8A16", "W4A16", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W4A16_AWQ"}

POSITION_EMBEDDING_TYPES = {
    "learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi", "alibi_with_scale",
    "relative", "chatglm", "yarn", "mrope", "deferred"}
HIDDEN_ACTS = {
    "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "openai-gelu", "quick_gelu", "relu",
    "silu", "swiglu", "fast-swiglu", "geglu", "gegelu", "squared-relu", "identity", "sigmoid",
    "softplus"}
GATED_ACTS = {"swiglu", "fast-swiglu", "geglu", "gegelu"}
DTYPES = {"float16", "bfloat16", "float32"}
REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "vocab_size", "hidden_act")

_TORCH_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _fail(msg: str):
    raise AssertionError(msg)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------

def _mapping(cfg: dict) -> dict:
    """Mapping with TRT-LLM's defaults filled in (tensorrt_llm/mapping.py)."""
    m = dict(cfg.get("mapping") or {})
    tp = int(m.get("tp_size", 1) or 1)
    pp = int(m.get("pp_size", 1) or 1)
    cp = int(m.get("cp_size", 1) or 1)
    ws = int(m.get("world_size", tp * pp * cp))
    moe_tp = m.get("moe_tp_size", -1)
    moe_ep = m.get("moe_ep_size", -1)
    moe_tp = -1 if moe_tp is None else int(moe_tp)
    moe_ep = -1 if moe_ep is None else int(moe_ep)
    cluster = m.get("moe_cluster_size", -1)
    cluster = 1 if cluster in (None, -1) else int(cluster)
    if moe_tp == -1 and moe_ep == -1:
        moe_tp, moe_ep = tp // cluster, 1
    elif moe_tp == -1:
        moe_tp = tp // (moe_ep * cluster) if moe_ep else -1
    elif moe_ep == -1:
        moe_ep = tp // (moe_tp * cluster) if moe_tp else -1
    return dict(world_size=ws, tp=tp, pp=pp, cp=cp, moe_tp=moe_tp, moe_ep=moe_ep,
                moe_cluster=cluster, auto_parallel=bool(m.get("auto_parallel", False)))


def _moe(cfg: dict) -> dict:
    """MoE block, accepting the legacy flat keys (moe_num_experts, moe_top_k...)."""
    moe = dict(cfg.get("moe") or {})
    if "moe_num_experts" in cfg and "num_experts" not in moe:
        moe["num_experts"] = cfg["moe_num_experts"]
    if "moe_top_k" in cfg and "top_k" not in moe:
        moe["top_k"] = cfg["moe_top_k"]
    if "moe_normalization_mode" in cfg and "normalization_mode" not in moe:
        moe["normalization_mode"] = cfg["moe_normalization_mode"]
    moe.setdefault("num_experts", 0)
    moe.setdefault("top_k", 0)
    moe.setdefault("normalization_mode", 1)
    moe.setdefault("shared_expert_intermediate_size", 0)
    return moe


def _head_size(cfg: dict) -> int:
    hs = cfg.get("head_size")
    if hs is None:
        hs = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(hs)


def _nkv(cfg: dict) -> int:
    n = cfg.get("num_key_value_heads")
    return int(cfg["num_attention_heads"] if n in (None, 0) else n)


def _inter(cfg: dict) -> int:
    if MODEL_MAP.get(cfg.get("architecture")) == _QWEN and cfg.get("qwen_type") in ("qwen2_moe", "qwen3_moe"):
        return int(cfg["moe_intermediate_size"])   # qwen/model.py: MOE(ffn_hidden_size=moe_intermediate_size)
    i = cfg.get("intermediate_size")
    return int(4 * cfg["hidden_size"] if i is None else i)


def _quant(cfg: dict) -> dict:
    q = dict(cfg.get("quantization") or {})
    q.setdefault("quant_algo", None)
    q.setdefault("kv_cache_quant_algo", None)
    q.setdefault("group_size", 128)
    q.setdefault("exclude_modules", None)
    return q


def check_config(cfg: dict) -> List[str]:
    """Problems with a TRT-LLM config.json (empty list = OK)."""
    p: List[str] = []
    if not isinstance(cfg, dict):
        return ["config is not a JSON object"]
    for k in REQUIRED:
        if cfg.get(k) is None:
            p.append(f"missing required field '{k}'")
    arch = cfg.get("architecture")
    if arch is not None and arch not in MODEL_MAP:
        p.append(f"architecture '{arch}' is not a key of TensorRT-LLM's MODEL_MAP")
    if cfg.get("dtype") is not None and cfg["dtype"] not in DTYPES:
        p.append(f"dtype '{cfg['dtype']}' not one of {sorted(DTYPES)}")
    if cfg.get("logits_dtype") is not None and cfg["logits_dtype"] not in DTYPES:
        p.append(f"logits_dtype '{cfg['logits_dtype']}' not one of {sorted(DTYPES)}")
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "intermediate_size", "num_key_value_heads", "head_size", "max_position_embeddings"):
        v = cfg.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            p.append(f"'{k}' must be a positive int, got {v!r}")
    act = cfg.get("hidden_act")
    if act is not None and act not in HIDDEN_ACTS:
        p.append(f"hidden_act '{act}' is not a TensorRT-LLM activation")
    pet = cfg.get("position_embedding_type", "learned_absolute")
    if pet not in POSITION_EMBEDDING_TYPES:
        p.append(f"position_embedding_type '{pet}' unknown")
    if pet == "learned_absolute" and MODEL_MAP.get(arch) == _GPT and not cfg.get("max_position_embeddings"):
        p.append("learned_absolute position embedding needs max_position_embeddings")
    if p and any(x.startswith("missing") for x in p):
        return p  # the rest needs the sizes

    try:
        H, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        nkv = _nkv(cfg)
        hs = _head_size(cfg)
        if cfg.get("head_size") is None and H % nh:
            p.append(f"hidden_size {H} not divisible by num_attention_heads {nh} and no head_size given")
        if nh % nkv:
            p.append(f"num_attention_heads {nh} not a multiple of num_key_value_heads {nkv}")
        rd = cfg.get("rotary_embedding_dim")
        if rd is not None and rd > hs:
            p.append(f"rotary_embedding_dim {rd} > head_size {hs}")
        rp = cfg.get("rotary_pct", 1.0)
        if not (0.0 < float(rp) <= 1.0):
            p.append(f"rotary_pct {rp} outside (0, 1]")
        if MODEL_MAP.get(arch) in (_LLAMA, _GEMMA, _FALCON, _QWEN) and float(rp) != 1.0:
            p.append(f"rotary_pct={rp} on the {MODEL_MAP[arch]} class: its TRT-LLM decoder layer does not "
                     "pass rotary_pct to its attention (it would rotate the full head)")
        if MODEL_MAP.get(arch) in (_GEMMA, _FALCON) and act in GATED_ACTS:
            p.append(f"hidden_act '{act}' on the {MODEL_MAP[arch]} class: its MLP applies hidden_act to one "
                     "projection (a gated name would split it)")
        if MODEL_MAP.get(arch) == _FALCON:
            # falcon/model.py builds Attention without attention_head_size (-> hidden_size // heads) and
            # without rotary_embedding_scaling
            if hs * nh != H:
                p.append(f"head_size {hs} != hidden_size/num_attention_heads on the Falcon class (its "
                         "attention ignores head_size)")
            if cfg.get("rotary_scaling"):
                p.append("rotary_scaling on the Falcon class: its decoder layer does not pass it to attention")
    except (TypeError, ValueError) as e:
        p.append(f"bad size fields: {e}")
        return p

    m = _mapping(cfg)
    tp, pp, cp = m["tp"], m["pp"], m["cp"]
    if min(tp, pp, cp) < 1:
        p.append(f"mapping sizes must be >= 1 (tp={tp}, pp={pp}, cp={cp})")
        return p
    if MODEL_MAP.get(arch) == _GEMMA:
        # gemma/config.py: GemmaConfig passes share_embedding_table=True and use_parallel_embedding =
        # tp_size > 1 whatever config.json says; a shared table cannot be split over pipeline stages
        if bool(cfg.get("use_parallel_embedding", False)) != (tp > 1):
            p.append(f"use_parallel_embedding={cfg.get('use_parallel_embedding')} on the Gemma class: "
                     f"GemmaConfig overrides it with tp_size > 1 = {tp > 1}")
        if cfg.get("use_parallel_embedding") and int(cfg.get("embedding_sharding_dim", 0)) != 0:
            p.append("the Gemma class shares its table with lm_head: embedding_sharding_dim must be 0")
        if pp > 1:
            p.append("the Gemma class shares its embedding table, which cannot be split over pipeline stages")
    if MODEL_MAP.get(arch) == _PHI3:
        # phi3/model.py Phi3DecoderLayer: Attention without attention_head_size (hidden // heads) and without
        # rotary_embedding_scaling (long_rope only, from longrope_scaling_* fields); MLP(hidden_act) with
        # swiglu: one fc of 2 x intermediate_size
        if _head_size(cfg) * cfg["num_attention_heads"] != cfg["hidden_size"]:
            p.append("head_size != hidden_size/num_attention_heads on the Phi3 class (its attention ignores "
                     "head_size)")
        if (cfg.get("rotary_scaling") or {}).get("type", "none") not in ("none", "default"):
            p.append("rotary_scaling on the Phi3 class: its decoder layer does not pass it to attention")
        if cfg.get("longrope_scaling_short_factors") is not None:
            p.append("long_rope factors on the Phi3 class: this reader reads rope_gpt_neox only")
    if MODEL_MAP.get(arch) == _QWEN:
        if cfg.get("qwen_type") not in QWEN_TYPES:
            p.append(f"qwen_type {cfg.get('qwen_type')!r} is not one QWenConfig accepts ({sorted(QWEN_TYPES)})")
        if act in GATED_ACTS and cfg.get("qwen_type") not in ("qwen2_moe", "qwen3_moe"):
            p.append(f"hidden_act '{act}' on a dense QWen model: its GatedMLP applies hidden_act to fc")
    if not m["auto_parallel"] and m["world_size"] != tp * pp * cp:
        p.append(f"mapping.world_size {m['world_size']} != tp_size*pp_size*cp_size = {tp}*{pp}*{cp}")
    L = cfg["num_hidden_layers"]
    if pp > L:
        p.append(f"pp_size {pp} > num_hidden_layers {L}")
    if nh % tp:
        p.append(f"num_attention_heads {nh} not divisible by tp_size {tp}")
    if nkv % tp and tp % nkv:
        p.append(f"num_key_value_heads {nkv} and tp_size {tp}: neither divides the other")
    moe = _moe(cfg)
    if bool(moe["num_experts"]) != bool(moe["top_k"]):
        p.append("moe.num_experts and moe.top_k must both be 0 or both non-zero")
    mm = cfg.get("mapping") or {}
    if ("moe_tp_size" in mm or "moe_ep_size" in mm or moe["num_experts"] > 1):
        if m["moe_tp"] < 1 or m["moe_ep"] < 1 or m["moe_tp"] * m["moe_ep"] * m["moe_cluster"] != tp:
            p.append(f"moe_tp_size*moe_ep_size*moe_cluster_size = {m['moe_tp']}*{m['moe_ep']}*"
                     f"{m['moe_cluster']} != tp_size {tp}")
        if m["moe_ep"] > 1 and cp > 1:
            p.append("MoE expert parallelism cannot be combined with context parallelism")
    if moe["num_experts"] > 1:
        if m["moe_ep"] >= 1 and moe["num_experts"] % m["moe_ep"]:
            p.append(f"num_experts {moe['num_experts']} not divisible by moe_ep_size {m['moe_ep']}")
        if MODEL_MAP.get(arch) in (_LLAMA, _QWEN) and act not in GATED_ACTS:
            p.append(f"MoE on the {MODEL_MAP[arch]} class needs a gated hidden_act (swiglu), got '{act}'")
        if moe["top_k"] > moe["num_experts"]:
            p.append("moe.top_k > moe.num_experts")
    if cfg.get("use_parallel_embedding"):
        if cfg.get("embedding_sharding_dim", 0) not in (0, 1):
            p.append("embedding_sharding_dim must be 0 or 1")
        elif cfg.get("embedding_sharding_dim", 0) == 1 and H % tp:
            p.append(f"embedding_sharding_dim=1 needs hidden_size {H} divisible by tp {tp}")
    q = _quant(cfg)
    if q["quant_algo"] is not None and q["quant_algo"] not in QUANT_ALGOS:
        p.append(f"quantization.quant_algo '{q['quant_algo']}' is not a QuantAlgo value")
    if q["kv_cache_quant_algo"] is not None and q["kv_cache_quant_algo"] not in KV_CACHE_QUANT_ALGOS:
        p.append(f"quantization.kv_cache_quant_algo '{q['kv_cache_quant_algo']}' not in "
                 f"{sorted(KV_CACHE_QUANT_ALGOS)}")
    rs = cfg.get("rotary_scaling")
    if rs is not None:
        if not isinstance(rs, dict) or "type" not in rs and "rope_type" not in rs:
            p.append("rotary_scaling must be a dict with a 'type'")
        elif rs.get("type", rs.get("rope_type")) == "yarn" and abs(_trt_yarn_mscale(rs) - 1.0) > 1e-12:
            # kernels/unfusedAttentionKernels/unfusedAttentionKernels_2_template.h: the v1 QKV-preprocessing
            # kernel (rotary dim not a multiple of 16, head sizes without a v2 kernel, sink tokens, sequences past
            # max_position_embeddings) recomputes cos/sin from rotary_inv_freq without the mscale the v2 kernel's
            # table has: the engine's math then depends on kernel selection
            p.append(f"rotary_scaling yarn with a cos/sin mscale of {_trt_yarn_mscale(rs):.6g} != 1: TensorRT-LLM "
                     "applies it only where its v2 rope kernel runs (the v1 fallback recomputes cos/sin without it)")
    return p


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------

def pp_layers(num_layers: int, pp_size: int, pp_rank: int) -> List[int]:
    """Global layer ids of a PP stage: torch.tensor_split(arange(L), pp)[pp_rank]."""
    return torch.tensor_split(torch.arange(num_layers), pp_size)[pp_rank].tolist()


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


_LAYER_RE = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")

_QUANT_AUX = ("per_channel_scale", "weights_scaling_factor", "activation_scaling_factor",
              "prequant_scaling_factor", "weights_scaling_factor_2", "alpha", "zero", "act_scale",
              "smoother", "scale_to_int", "quantization_scaling_factor")
_KV_AUX = ("kv_cache_scaling_factor", "kv_cache_rcp_scaling_factor", "k_cache_scaling_factor",
           "v_cache_scaling_factor")
_WO_LINEARS = ("qkv.weight", "dense.weight", "fc.weight", "proj.weight", "gate.weight")


def _is_excluded(name: str, excl) -> bool:
    if not excl:
        return False
    mod = name.rsplit(".", 1)[0]
    for pat in excl:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(mod, pat) or mod == pat:
            return True
        if pat.endswith("*") and mod.startswith(pat[:-1]):
            return True
    return False


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 tensor holding two int4 per byte along the last axis -> int8 tensor twice as wide.

    Element 2j is the LOW nibble, 2j+1 the HIGH nibble, both two's complement
    (cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp: unpack_int4_packed_tensor_to_int8 /
    pack_int8_tensor_to_packed_int4, and symmetric_quantize in cutlass_preprocessors.cpp)."""
    u = packed.to(torch.int16) & 0xFF
    lo = u & 0xF
    hi = (u >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    return out.to(torch.int8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Inverse of unpack_int4 (values in [-8, 7], even last dim)."""
    assert q.shape[-1] % 2 == 0
    q = q.to(torch.int16)
    lo = q[..., 0::2] & 0xF
    hi = q[..., 1::2] & 0xF
    b = lo | (hi << 4)
    return torch.where(b >= 128, b - 256, b).to(torch.int8)


def weight_only_quantize(w_out_in: torch.Tensor, bits: int):
    """TRT-LLM's symmetric per-output-channel weight-only quantization of an [.., out, in] weight.

    Returns (unprocessed int8 [.., in, out] (int4: [.., in, out/2] packed), scale [.., out]):
    scale = max|w| over `in` / 2^(bits-1); q = clip(round(w/scale)) (round half away from zero)."""
    v = w_out_in.transpose(-1, -2).float()
    amax = v.abs().amax(dim=-2)
    scale = amax / float(1 << (bits - 1))
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = _round_half_away(v / safe.unsqueeze(-2))
    q = torch.where(scale.unsqueeze(-2) == 0, torch.zeros_like(q), q)
    lo, hi = (-128, 127) if bits == 8 else (-8, 7)
    q = q.clamp(lo, hi).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def _dequant_weight_only(name, w, scale, bits):
    if w.dtype != torch.int8:
        _fail(f"{name}: weight-only quantized weight must be int8, got {w.dtype}")
    q = unpack_int4(w) if bits == 4 else w
    s = scale.float()
    out = q.shape[-1]
    if s.shape[-1] != out or s.numel() != (q.numel() // (q.shape[-2] * q.shape[-1])) * out:
        _fail(f"{name}: per_channel_scale shape {tuple(scale.shape)} does not match weight "
              f"{tuple(w.shape)} (unpacked [in, out] = {tuple(q.shape)})")
    s = s.reshape(*q.shape[:-2], 1, out)
    return (q.float() * s).transpose(-1, -2).contiguous()


def _dequant_fp8(name, w, wsf):
    if w.dtype == torch.int8:
        w = w.view(torch.float8_e4m3fn)
    if w.dtype != torch.float8_e4m3fn:
        _fail(f"{name}: FP8 weight must be float8_e4m3fn (or int8 bits), got {w.dtype}")
    s = wsf.float()
    wf = w.float()
    if s.numel() == 1:
        return wf * s.reshape(())
    if wf.dim() == 3 and s.numel() == wf.shape[0]:
        return wf * s.reshape(-1, 1, 1)
    if s.numel() == wf.shape[-2] * (wf.shape[0] if wf.dim() == 3 else 1):
        return wf * s.reshape(*wf.shape[:-1], 1)
    _fail(f"{name}: weights_scaling_factor shape {tuple(wsf.shape)} does not fit weight {tuple(w.shape)}")


def _dequant_awq(name, w, s, pqs, group):
    # ModelOpt/TRT-LLM checkpoint layout (modelopt quant_utils.to_quantized_weight):
    # int8 [out/2, in], byte (j, i) = W[2j, i] (low nibble) | W[2j+1, i] (high nibble);
    # weights_scaling_factor [out, in/group]; prequant_scaling_factor [in] multiplies the input.
    if w.dtype != torch.int8:
        _fail(f"{name}: AWQ weight must be int8, got {w.dtype}")
    q = unpack_int4(w.transpose(-1, -2).contiguous()).transpose(-1, -2)  # [.., out, in]
    out, inn = q.shape[-2], q.shape[-1]
    if s.shape[-2] != out or s.shape[-1] * group != inn:
        _fail(f"{name}: weights_scaling_factor {tuple(s.shape)} does not fit [out={out}, in={inn}] "
              f"with group_size {group}")
    sf = s.float().repeat_interleave(group, dim=-1)
    wf = q.float() * sf
    if pqs is not None:
        wf = wf * pqs.float().reshape(*([1] * (wf.dim() - 1)), inn) if pqs.dim() <= 2 \
            else wf * pqs.float()[..., None, :]
    return wf


def _dequantize_rank(cfg: dict, t: Dict[str, torch.Tensor], rank: int, emulate_build_quant: bool):
    """Turn quantized linears of one rank file into float [out, in] weights; drop scale tensors."""
    q = _quant(cfg)
    algo = q["quant_algo"]
    if algo not in SUPPORTED_QUANT:
        _fail(f"quant_algo {algo} is not supported by this reader")
    excl = q["exclude_modules"]
    dtype = _TORCH_DTYPE[cfg["dtype"]]
    out: Dict[str, torch.Tensor] = {}
    consumed = set()
    for name, w in t.items():
        if not name.endswith(".weight"):
            continue
        base = name[:-len(".weight")]
        if algo in ("W8A16", "W4A16"):
            bits = 8 if algo == "W8A16" else 4
            sname = base + ".per_channel_scale"
            if w.dtype == torch.int8:
                if sname not in t:
                    _fail(f"rank{rank}: {name} is int8 but {sname} is missing")
                out[name] = _dequant_weight_only(f"rank{rank}:{name}", w, t[sname], bits)
                consumed |= {name, sname}
            elif emulate_build_quant and any(k in name for k in _WO_LINEARS) \
                    and not _is_excluded(name, excl if excl is not None else ["*shared_expert_gate.weight"]):
                qw, sc = weight_only_quantize(w, bits)
                out[name] = _dequant_weight_only(name, qw, sc.to(w.dtype), bits)
                consumed.add(name)
        elif algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
            sname = base + ".weights_scaling_factor"
            if w.dtype in (torch.float8_e4m3fn, torch.int8):
                if sname not in t:
                    _fail(f"rank{rank}: {name} is {w.dtype} but {sname} is missing")
                out[name] = _dequant_fp8(f"rank{rank}:{name}", w, t[sname])
                consumed |= {name, sname}
                a = base + ".activation_scaling_factor"
                if a in t:
                    if t[a].numel() != 1 and algo == "FP8":
                        _fail(f"rank{rank}: {a} must have one element, got {tuple(t[a].shape)}")
                    consumed.add(a)
            elif any(k in name for k in _WO_LINEARS) and not _is_excluded(name, excl):
                _fail(f"rank{rank}: {name} is {w.dtype} in an FP8 checkpoint and not excluded")
        elif algo == "W4A16_AWQ":
            sname = base + ".weights_scaling_factor"
            if w.dtype == torch.int8:
                if sname not in t:
                    _fail(f"rank{rank}: {name} is int8 but {sname} is missing")
                pq = t.get(base + ".prequant_scaling_factor")
                out[name] = _dequant_awq(f"rank{rank}:{name}", w, t[sname], pq, int(q["group_size"]))
                consumed |= {name, sname, base + ".prequant_scaling_factor"}
    res = {}
    for name, v in t.items():
        if name in consumed and name not in out:
            continue
        if name in out:
            res[name] = out[name]
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _KV_AUX:
            continue  # KV-cache scales do not change context logits in this oracle
        if leaf in _QUANT_AUX:
            if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN") and name.startswith("lm_head."):
                continue  # the loader drops stray lm_head scales when lm_head stays unquantized
            _fail(f"rank{rank}: unexpected quantization tensor {name} for quant_algo {algo}")
        if v.dtype in (torch.int8, torch.float8_e4m3fn):
            _fail(f"rank{rank}: {name} is {v.dtype} but quant_algo is {algo}")
        if name.endswith("mlp.router.weight"):
            if v.dtype != torch.float32:
                _fail(f"rank{rank}: {name} must be float32 (MoE router), got {v.dtype}")
        elif v.dtype != dtype:
            _fail(f"rank{rank}: {name} has dtype {v.dtype}, config dtype is {cfg['dtype']}")
        res[name] = v
    return res


def _expected_layer_shapes(cfg: dict, sub: str, tp_rank: int):
    """Per-rank shape for a layer-local name (after dequantization), or None if unknown."""
    m = _mapping(cfg)
    tp = m["tp"]
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    nkv = _nkv(cfg)
    d = _head_size(cfg)
    I = _inter(cfg)
    moe = _moe(cfg)
    kv_l = nkv // tp if nkv >= tp else 1
    qkv_out = (nh // tp + 2 * kv_l) * d
    is_moe = moe["num_experts"] > 1
    E = moe["num_experts"]
    table = {
        "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
        "post_layernorm.weight": (H,), "post_layernorm.bias": (H,),
        "mlp_layernorm.weight": (H,), "mlp_layernorm.bias": (H,),
        "attention.qkv.weight": (qkv_out, H), "attention.qkv.bias": (qkv_out,),
        "attention.dense.weight": (H, nh * d // tp), "attention.dense.bias": (H,),
        "attention.q_layernorm.weight": (d,), "attention.k_layernorm.weight": (d,),
    }
    S = int(cfg.get("moe_shared_expert_intermediate_size") or 0)   # qwen2_moe shared expert: MLP over tp
    if S:
        table.update({"mlp.shared_expert.fc.weight": (2 * S // tp, H), "mlp.shared_expert.proj.weight": (H, S // tp),
                      "mlp.shared_expert_gate.weight": (1, H)})
    if is_moe:
        table.update({
            "mlp.router.weight": (E, H),
            "mlp.fc.weight": (E // m["moe_ep"], 2 * I // m["moe_tp"], H),
            "mlp.proj.weight": (E // m["moe_ep"], H, I // m["moe_tp"]),
        })
    else:
        table.update({
            "mlp.fc.weight": (I // tp, H), "mlp.fc.bias": (I // tp,),
            "mlp.gate.weight": (I // tp, H), "mlp.gate.bias": (I // tp,),
            "mlp.proj.weight": (H, I // tp), "mlp.proj.bias": (H,),
        })
    if MODEL_MAP.get(cfg["architecture"]) == _PHI3:   # MLP(swiglu): ColumnLinear(H, 2 * I) split over tp
        table["mlp.fc.weight"] = (2 * I // tp, H)
    return table.get(sub)


def _allowed_layer_names(cfg: dict) -> Tuple[set, set]:
    """(required, optional) layer-local names for the GPT / LLaMA classes."""
    cls = MODEL_MAP.get(cfg["architecture"])
    moe = _moe(cfg)
    act = cfg["hidden_act"]
    req = {"input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight",
           "post_layernorm.weight"}
    opt = set()
    if cls == _FALCON:
        # falcon/model.py: LayerNorm (weight + bias) everywhere; mlp_layernorm only for the new decoder
        # architecture with two norms; no post_layernorm in a parallel block; one `bias` flag for all linears
        req = {"input_layernorm.weight", "input_layernorm.bias", "attention.qkv.weight",
               "attention.dense.weight", "mlp.fc.weight", "mlp.proj.weight"}
        if _falcon_parallel(cfg):
            if _falcon_num_ln(cfg) == 2:
                req |= {"mlp_layernorm.weight", "mlp_layernorm.bias"}
        else:
            req |= {"post_layernorm.weight", "post_layernorm.bias"}
        if cfg.get("bias", False):
            req |= {"attention.qkv.bias", "attention.dense.bias", "mlp.fc.bias", "mlp.proj.bias"}
        return req, opt
    if cls == _PHI3:
        # phi3/model.py (Phi3ForCausalLM): RmsNorm layers, Attention(bias=False), MLP(bias=False) with one fc
        return req | {"mlp.fc.weight", "mlp.proj.weight"}, opt
    if cls == _QWEN:
        # qwen/model.py: RmsNorm layers, GatedMLP, Attention(bias=attn_bias (QWenConfig default True),
        # dense_bias=False, qk_layernorm for qwen3 / qwen3_moe), GatedMLP(bias=mlp_bias)
        qt = cfg.get("qwen_type")
        if qt not in ("qwen3", "qwen3_moe", "qwen2_moe"):
            _fail(f"QWenForCausalLM with qwen_type {qt!r} cannot be read by this reader")
        if qt != "qwen2_moe":   # qk_layernorm = qwen_type in (qwen3, qwen3_moe)
            req |= {"attention.q_layernorm.weight", "attention.k_layernorm.weight"}
        if qt == "qwen2_moe":   # SharedMoE(use_shared_gate=True): shared_expert MLP + shared_expert_gate [1, H]
            req |= {"mlp.shared_expert.fc.weight", "mlp.shared_expert.proj.weight", "mlp.shared_expert_gate.weight"}
        if qt != "qwen3":       # MOE on every layer: router (fp32), fc = [w3; w1] per expert, proj
            if moe["num_experts"] <= 1:
                _fail(f"QWenForCausalLM {qt} without moe.num_experts")
            req |= {"mlp.router.weight", "mlp.fc.weight", "mlp.proj.weight"}
        else:
            req |= {"mlp.fc.weight", "mlp.gate.weight", "mlp.proj.weight"}
        if cfg.get("attn_bias", True):
            req.add("attention.qkv.bias")
        if cfg.get("mlp_bias", False):
            req |= {"mlp.fc.bias", "mlp.gate.bias", "mlp.proj.bias"}
        return req, opt
    if cfg.get("qk_layernorm"):
        req |= {"attention.q_layernorm.weight", "attention.k_layernorm.weight"}
    if moe["num_experts"] > 1:
        req |= {"mlp.router.weight", "mlp.fc.weight", "mlp.proj.weight"}
    else:
        req |= {"mlp.fc.weight", "mlp.proj.weight"}
        if cls in (_LLAMA, _GEMMA) or act in GATED_ACTS:  # LLaMA and Gemma build a GatedMLP
            req.add("mlp.gate.weight")
    if cls in (_LLAMA, _GEMMA):
        if cfg.get("attn_bias"):
            req |= {"attention.qkv.bias", "attention.dense.bias"}
        if cfg.get("mlp_bias") and moe["num_experts"] <= 1:
            req |= {"mlp.fc.bias", "mlp.gate.bias", "mlp.proj.bias"}
    elif cls == _GPT:
        req |= {"input_layernorm.bias", "post_layernorm.bias"}
        lin_b = {"attention.qkv.bias", "attention.dense.bias", "mlp.fc.bias", "mlp.proj.bias"}
        if "mlp.gate.weight" in req:
            lin_b.add("mlp.gate.bias")
        if cfg.get("bias", True):
            req |= lin_b
    else:
        _fail(f"architecture {cfg['architecture']} ({cls}) cannot be read by this reader")
    return req, opt


def _falcon_parallel(cfg: dict) -> bool:
    """falcon/model.py is_parallel_attention: new_decoder_architecture or parallel_attention."""
    return bool(cfg.get("new_decoder_architecture", False) or cfg.get("parallel_attention", False))


def _falcon_num_ln(cfg: dict):
    """falcon/model.py: num_ln_in_parallel_attn, 2 when unset with the new decoder architecture."""
    n = cfg.get("num_ln_in_parallel_attn")
    if n is None and cfg.get("new_decoder_architecture", False):
        n = 2
    return n if cfg.get("new_decoder_architecture", False) else None


def _merge_replicated(name, shards):
    for i, s in enumerate(shards[1:], 1):
        if s.shape != shards[0].shape or not torch.equal(s, shards[0]):
            _fail(f"{name}: must be replicated across TP ranks but tp rank {i} differs from rank 0")
    return shards[0]


def _merge_qkv(cfg, name, shards):
    tp = len(shards)
    nh = cfg["num_attention_heads"]
    nkv = _nkv(cfg)
    d = _head_size(cfg)
    kv_l = nkv // tp if nkv >= tp else 1
    qs, ks, vs = [], [], []
    for s in shards:
        q, k, v = torch.split(s, [nh // tp * d, kv_l * d, kv_l * d], dim=0)
        qs.append(q), ks.append(k), vs.append(v)
    if nkv >= tp:
        k, v = torch.cat(ks, 0), torch.cat(vs, 0)
    else:
        reps = tp // nkv
        kk, vv = [], []
        for h in range(nkv):
            grp = range(h * reps, (h + 1) * reps)
            for r in grp:
                if not (torch.equal(ks[r], ks[grp[0]]) and torch.equal(vs[r], vs[grp[0]])):
                    _fail(f"{name}: KV head {h} duplicated over tp ranks {list(grp)} is not identical "
                          f"(rank {r} differs)")
            kk.append(ks[grp[0]]), vv.append(vs[grp[0]])
        k, v = torch.cat(kk, 0), torch.cat(vv, 0)
    return torch.cat([torch.cat(qs, 0), k, v], 0)


def _merge_layer_tensor(cfg, sub, name, shards):
    m = _mapping(cfg)
    moe = _moe(cfg)
    if sub.startswith("attention.qkv."):
        return _merge_qkv(cfg, name, shards)
    if MODEL_MAP.get(cfg["architecture"]) == _FALCON and _falcon_parallel(cfg) \
            and sub in ("attention.dense.bias", "mlp.proj.bias"):
        # falcon/model.py builds a parallel block's Attention and MLP with tp_group=None, so RowLinear
        # (layers/linear.py collect_and_bias) adds each rank's bias before the block's one allreduce:
        # the engine's bias is the sum over TP ranks.
        return torch.stack(shards).sum(0)
    if sub == "attention.dense.weight" or (sub == "mlp.proj.weight" and moe["num_experts"] <= 1) \
            or sub == "mlp.shared_expert.proj.weight":
        return torch.cat(shards, dim=1)
    if sub == "mlp.shared_expert.fc.weight" or (sub == "mlp.fc.weight"
                                                 and MODEL_MAP.get(cfg["architecture"]) == _PHI3):
        # convert.py: each rank [up_r; gate_r] -> [up; gate] (Phi3: functional.swiglu, x, gate = chunk(2))
        half = shards[0].shape[0] // 2
        return torch.cat([torch.cat([t[:half] for t in shards]), torch.cat([t[half:] for t in shards])])
    if sub in ("mlp.fc.weight", "mlp.gate.weight", "mlp.fc.bias", "mlp.gate.bias") \
            and moe["num_experts"] <= 1:
        return torch.cat(shards, dim=0)
    if moe["num_experts"] > 1 and sub in ("mlp.fc.weight", "mlp.proj.weight"):
        ep, mtp = m["moe_ep"], m["moe_tp"]
        I_l = _inter(cfg) // mtp
        blocks = []
        for e_rank in range(ep):
            ranks = [t for t in range(len(shards)) if t % ep == e_rank]
            ranks.sort(key=lambda t: t // ep)  # by moe_tp_rank
            parts = [shards[t] for t in ranks]
            if sub == "mlp.fc.weight":
                w3 = torch.cat([p[:, :I_l] for p in parts], dim=1)
                w1 = torch.cat([p[:, I_l:] for p in parts], dim=1)
                blocks.append(torch.cat([w3, w1], dim=1))
            else:
                blocks.append(torch.cat(parts, dim=2))
        return torch.cat(blocks, dim=0)
    return _merge_replicated(name, shards)


def read_checkpoint(ckpt_dir: str, emulate_build_quant: bool = True):
    """Read config.json + every rank{N}.safetensors; return (cfg, unsharded tensors).

    Raises AssertionError (naming the tensor / file) on any deviation from TRT-LLM's layout."""
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        cfg = json.load(f)
    probs = check_config(cfg)
    if probs:
        _fail("config.json problems: " + "; ".join(probs))
    cls = MODEL_MAP[cfg["architecture"]]
    if cfg["architecture"] == trtllm_reader_deepseek_v2.ARCH:
        _fail(f"{cfg['architecture']}: per-rank MLA tensors, read by trtllm_reader_deepseek_v2.read_checkpoint")
    if cls not in (_GPT, _LLAMA, _GEMMA, _FALCON, _QWEN, _PHI3):
        _fail(f"architecture {cfg['architecture']} ({cls}) not supported by this reader")
    m = _mapping(cfg)
    tp, pp = m["tp"], m["pp"]
    L = cfg["num_hidden_layers"]
    H = cfg["hidden_size"]
    V = cfg["vocab_size"]
    Vp = int(math.ceil(V / tp) * tp)
    pet = cfg.get("position_embedding_type", "learned_absolute")
    req_layer, opt_layer = _allowed_layer_names(cfg)
    files = sorted(f for f in os.listdir(ckpt_dir) if re.fullmatch(r"rank\d+\.safetensors", f))
    expected_files = {f"rank{r}.safetensors" for r in range(tp * pp)}
    missing = expected_files - set(files)
    if missing:
        _fail(f"missing rank files: {sorted(missing)} (tp={tp}, pp={pp})")
    extra = set(files) - expected_files
    if extra:
        _fail(f"unexpected rank files: {sorted(extra)} (tp={tp}, pp={pp})")

    par_emb = bool(cfg.get("use_parallel_embedding", False))
    if cls == _GEMMA:
        par_emb = tp > 1  # GemmaConfig overrides the flag (checked equal in check_config)
    sdim = int(cfg.get("embedding_sharding_dim", 0))

    def emb_shape(rows):
        if not par_emb:
            return (rows, H)
        if sdim == 0:
            return (int(math.ceil(rows / tp)), H)
        return (rows, H // tp)

    # collected[global_name] = [tensor per tp rank]
    collected: Dict[str, List[torch.Tensor]] = {}
    for p in range(pp):
        layers = pp_layers(L, pp, p)
        first, last = p == 0, p == pp - 1
        for t in range(tp):
            rank = p * tp + t
            raw = _load_safetensors(os.path.join(ckpt_dir, f"rank{rank}.safetensors"))
            ten = _dequantize_rank(cfg, raw, rank, emulate_build_quant)
            seen_layers = set()
            for name, v in ten.items():
                where = f"rank{rank} (pp={p}, tp={t}): {name}"
                mm = _LAYER_RE.match(name)
                if mm:
                    li, sub = int(mm.group(1)), mm.group(2)
                    if li >= len(layers):
                        _fail(f"{where}: local layer {li} but stage {p} owns {len(layers)} layers "
                              f"(global {layers})")
                    allowed = req_layer | opt_layer
                    if sub not in allowed:
                        _fail(f"{where}: provided but not required by {cls} with this config")
                    exp = _expected_layer_shapes(cfg, sub, t)
                    if exp is None or tuple(v.shape) != tuple(exp):
                        _fail(f"{where}: shape {tuple(v.shape)} != expected per-rank {exp}")
                    seen_layers.add((li, sub))
                    gname = f"transformer.layers.{layers[li]}.{sub}"
                elif name == "transformer.vocab_embedding.weight":
                    if not first:
                        _fail(f"{where}: vocab_embedding must only be on the first PP stage")
                    if tuple(v.shape) != emb_shape(V):
                        _fail(f"{where}: shape {tuple(v.shape)} != expected {emb_shape(V)}")
                    gname = name
                elif name == "transformer.position_embedding.weight":
                    if pet != "learned_absolute":
                        _fail(f"{where}: provided but position_embedding_type is {pet}")
                    if not first:
                        _fail(f"{where}: position_embedding must only be on the first PP stage")
                    P = cfg["max_position_embeddings"]
                    if tuple(v.shape) not in ((P, H), emb_shape(P)):
                        _fail(f"{where}: shape {tuple(v.shape)} != expected {(P, H)} or {emb_shape(P)}")
                    gname = name
                elif name in ("transformer.ln_f.weight", "transformer.ln_f.bias"):
                    if not last:
                        _fail(f"{where}: ln_f must only be on the last PP stage")
                    if name.endswith("bias") and cls not in (_GPT, _FALCON):
                        _fail(f"{where}: provided but not required (RmsNorm has no bias)")
                    if tuple(v.shape) != (H,):
                        _fail(f"{where}: shape {tuple(v.shape)} != expected {(H,)}")
                    gname = name
                elif name == "lm_head.weight":
                    if not last:
                        _fail(f"{where}: lm_head must only be on the last PP stage")
                    if tuple(v.shape) != (Vp // tp, H):
                        _fail(f"{where}: shape {tuple(v.shape)} != expected {(Vp // tp, H)} "
                              f"(vocab {V} padded to {Vp} then split over tp={tp})")
                    gname = name
                else:
                    _fail(f"{where}: unknown tensor name (provided but not required)")
                collected.setdefault(gname, [None] * tp)
                if collected[gname][t] is not None:
                    _fail(f"{where}: duplicate global tensor {gname}")
                collected[gname][t] = v
            for li in range(len(layers)):
                for sub in req_layer:
                    if (li, sub) not in seen_layers:
                        _fail(f"rank{rank} (pp={p}, tp={t}): missing transformer.layers.{li}.{sub} "
                              f"(global layer {layers[li]})")
            if first and "transformer.vocab_embedding.weight" not in ten:
                _fail(f"rank{rank}: missing transformer.vocab_embedding.weight on the first PP stage")
            if first and pet == "learned_absolute" and "transformer.position_embedding.weight" not in ten:
                _fail(f"rank{rank}: missing transformer.position_embedding.weight (learned_absolute)")
            if last and "transformer.ln_f.weight" not in ten:
                _fail(f"rank{rank}: missing transformer.ln_f.weight on the last PP stage")
            if last and cls in (_GPT, _FALCON) and "transformer.ln_f.bias" not in ten:
                _fail(f"rank{rank}: missing transformer.ln_f.bias on the last PP stage")
            if last and "lm_head.weight" not in ten and not (first and "transformer.vocab_embedding.weight" in ten):
                _fail(f"rank{rank}: missing lm_head.weight on the last PP stage (no embedding to share there)")

    tensors: Dict[str, torch.Tensor] = {}
    for gname, shards in collected.items():
        if any(s is None for s in shards):
            _fail(f"{gname}: present on some TP ranks only")
        mm = _LAYER_RE.match(gname)
        if mm:
            tensors[gname] = _merge_layer_tensor(cfg, mm.group(2), gname, shards)
        elif gname in ("transformer.vocab_embedding.weight", "transformer.position_embedding.weight"):
            rows = V if gname.endswith("vocab_embedding.weight") else cfg["max_position_embeddings"]
            if par_emb and tp > 1 and tuple(shards[0].shape) != (rows, H):
                full = torch.cat(shards, dim=0 if sdim == 0 else 1)
                tensors[gname] = full[:rows]  # drop the vocab padding rows (dim 0)
            else:
                tensors[gname] = _merge_replicated(gname, shards)
        elif gname == "lm_head.weight":
            tensors[gname] = torch.cat(shards, dim=0)[:V]
        else:
            tensors[gname] = _merge_replicated(gname, shards)
    return cfg, tensors


# --------------------------------------------------------------------------
# To Hugging Face
# --------------------------------------------------------------------------

# TRT-LLM activation -> transformers ACT2FN name.  Every TRT-LLM "gelu" flavour is the tanh
# approximation (tensorrt_llm/functional.py gelu), i.e. HF "gelu_new".
_ACT_TO_HF = {"gelu": "gelu_new", "gelu_new": "gelu_new", "gelu_fast": "gelu_new",
              "gelu_pytorch_tanh": "gelu_new", "openai-gelu": "gelu_new", "relu": "relu",
              "silu": "silu", "swiglu": "silu", "fast-swiglu": "silu", "squared-relu": "relu2",
              "identity": "linear", "quick_gelu": "quick_gelu", "sigmoid": "sigmoid"}


def _trt_yarn_mscale(rs: dict) -> float:
    """create_sinusoidal_positions_yarn's cos/sin factor: yarn_get_mscale(f, mscale) / yarn_get_mscale(f,
    mscale_all_dim), yarn_get_mscale(s, m) = 0.1 m ln(s) + 1 (1 for s <= 1)."""
    f = float(rs.get("factor", 1.0))

    def g(m):
        return 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0
    return g(float(rs.get("mscale", 1.0))) / g(float(rs.get("mscale_all_dim", 0.0)))


def _rope_parameters(cfg: dict, partial: float = None) -> dict:
    rp = {"rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000.0))}
    rs = cfg.get("rotary_scaling")
    if rs:
        typ = rs.get("type", rs.get("rope_type"))
        if typ in (None, "none", "default"):
            pass
        elif typ == "linear":
            rp.update(rope_type="linear", factor=float(rs["factor"]))
        elif typ == "llama3":
            rp.update(rope_type="llama3", factor=float(rs["factor"]),
                      low_freq_factor=float(rs["low_freq_factor"]),
                      high_freq_factor=float(rs["high_freq_factor"]),
                      original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
        elif typ == "yarn":
            # layers/attention.py create_attention_const_params (defaults) + RopeEmbeddingUtils.
            # create_sinusoidal_positions_yarn: transformers' yarn with the correction range rounded (truncate) and
            # cos/sin x yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
            f = float(rs.get("factor", 1.0))
            rp.update(rope_type="yarn", factor=f,
                      original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 4096)),
                      beta_fast=float(rs.get("beta_fast", 32.0)), beta_slow=float(rs.get("beta_slow", 1.0)),
                      truncate=True, attention_factor=_trt_yarn_mscale(rs))
        else:
            raise NotImplementedError(f"rotary_scaling type {typ!r} not supported by to_hf")
    if partial is not None:
        rp["partial_rotary_factor"] = float(partial)  # always explicit: GPTNeoX defaults to 0.25
    return rp


def _lm_head(cfg, t):
    emb = t["transformer.vocab_embedding.weight"]
    lm = t.get("lm_head.weight")
    tied = lm is None
    return (emb if tied else lm), tied


def _to_hf_llama(cfg: dict, t: Dict[str, torch.Tensor]):
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    pet = cfg.get("position_embedding_type", "rope_gpt_neox")
    if pet != "rope_gpt_neox":
        raise NotImplementedError(f"LLaMA class with position_embedding_type {pet}")
    for k in ("embedding_multiplier", "residual_multiplier", "output_multiplier_scale"):
        if float(cfg.get(k, 1.0)) != 1.0:
            raise NotImplementedError(f"LLaMA class with {k} != 1")
    if cfg.get("residual_mlp") or cfg.get("qk_layernorm"):
        raise NotImplementedError("residual_mlp / qk_layernorm")
    # rotary_pct is ignored by TRT-LLM's LLaMA decoder layer: full rotary, like HF Llama.
    moe = _moe(cfg)
    lm, tied = _lm_head(cfg, t)
    attn_bias = bool(cfg.get("attn_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    dense_bias_zero = all(
        not t[f"transformer.layers.{i}.attention.dense.bias"].any() for i in range(L)) if attn_bias else True
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                  num_attention_heads=nh, num_key_value_heads=nkv, hidden_act="silu",
                  rms_norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
                  max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                  tie_word_embeddings=tied, rope_parameters=_rope_parameters(cfg),
                  attention_dropout=0.0)
    if moe["num_experts"] > 1:
        if attn_bias or mlp_bias:
            raise NotImplementedError("MoE with biases")
        if moe["normalization_mode"] != 1 or moe["shared_expert_intermediate_size"]:
            raise NotImplementedError("MoE normalization_mode != RENORMALIZE or shared experts")
        if d != H // nh:
            common["head_dim"] = d
        hf_cfg = tr.MixtralConfig(num_local_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                                  router_jitter_noise=0.0, sliding_window=None, **common)
        kind = "mixtral"
    elif attn_bias and dense_bias_zero and not mlp_bias:
        # q/k/v bias only: Qwen2 is exactly Llama + q/k/v bias.
        hf_cfg = tr.Qwen2Config(use_sliding_window=False, head_dim=d, **common)
        kind = "qwen2"
    else:
        hf_cfg = tr.LlamaConfig(attention_bias=attn_bias, mlp_bias=mlp_bias, head_dim=d, **common)
        kind = "llama"
    mult = float(cfg.get("attention_multiplier", 1.0))
    if mult != 1.0:
        # LLaMADecoderLayer: Attention(q_scaling=1 / attention_multiplier); Attention divides the logits by
        # q_scaling * sqrt(head_size) (tensorrt_llm/models/llama/model.py, layers/attention.py): a softmax scale
        # of attention_multiplier / sqrt(head_size), which transformers' Granite (Llama otherwise) applies
        if kind == "mixtral":
            raise NotImplementedError("MoE with attention_multiplier != 1")
        hf_cfg = tr.GraniteConfig(attention_bias=attn_bias, mlp_bias=mlp_bias, head_dim=d,
                                  attention_multiplier=mult / math.sqrt(d), **common)
        kind = "llama"
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": t["transformer.ln_f.weight"]}
    sd["lm_head.weight"] = lm  # transformers 5 lists the tied head in state_dict too
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        sd[o + "input_layernorm.weight"] = t[s + "input_layernorm.weight"]
        sd[o + "post_attention_layernorm.weight"] = t[s + "post_layernorm.weight"]
        q, k, v = torch.split(t[s + "attention.qkv.weight"], [nh * d, nkv * d, nkv * d], 0)
        sd[o + "self_attn.q_proj.weight"], sd[o + "self_attn.k_proj.weight"], sd[o + "self_attn.v_proj.weight"] = q, k, v
        sd[o + "self_attn.o_proj.weight"] = t[s + "attention.dense.weight"]
        if attn_bias:
            qb, kb, vb = torch.split(t[s + "attention.qkv.bias"], [nh * d, nkv * d, nkv * d], 0)
            sd[o + "self_attn.q_proj.bias"], sd[o + "self_attn.k_proj.bias"], sd[o + "self_attn.v_proj.bias"] = qb, kb, vb
            if kind == "llama":
                sd[o + "self_attn.o_proj.bias"] = t[s + "attention.dense.bias"]
        if kind == "mixtral":
            fc = t[s + "mlp.fc.weight"]  # [E, 2I, H] = [w3 (up); w1 (gate)] per expert
            sd[o + "mlp.gate.weight"] = t[s + "mlp.router.weight"]
            sd[o + "mlp.experts.gate_up_proj"] = torch.cat([fc[:, I:], fc[:, :I]], dim=1)
            sd[o + "mlp.experts.down_proj"] = t[s + "mlp.proj.weight"]
        else:
            # TRT-LLM: mlp.fc is the activated branch (gate_proj), mlp.gate is up_proj
            sd[o + "mlp.gate_proj.weight"] = t[s + "mlp.fc.weight"]
            sd[o + "mlp.up_proj.weight"] = t[s + "mlp.gate.weight"]
            sd[o + "mlp.down_proj.weight"] = t[s + "mlp.proj.weight"]
            if mlp_bias:
                sd[o + "mlp.gate_proj.bias"] = t[s + "mlp.fc.bias"]
                sd[o + "mlp.up_proj.bias"] = t[s + "mlp.gate.bias"]
                sd[o + "mlp.down_proj.bias"] = t[s + "mlp.proj.bias"]
    return hf_cfg, sd


def _to_hf_qwen2_moe(cfg: dict, t: Dict[str, torch.Tensor]):
    """QWenForCausalLM qwen2_moe (qwen/model.py QWenDecoderLayer with SharedMoE(use_shared_gate=True), layers/moe.py):
    RmsNorm, Attention with qkv bias per attn_bias and no dense bias, no q/k norm; MOE (softmax over all
    experts, top-k, RENORMALIZE or not) + sigmoid(shared_expert_gate(x)) * shared_expert(x), the shared MLP's fc
    = [up; gate] (swiglu) -> Qwen2MoeForCausalLM."""
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    moe, S = _moe(cfg), int(cfg["moe_shared_expert_intermediate_size"])
    if cfg.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox" or cfg.get("use_logn_attn"):
        raise NotImplementedError("QWen qwen2_moe with other positions or logn attention")
    if cfg.get("hidden_act") != "swiglu" or cfg.get("mlp_bias") or moe["normalization_mode"] not in (0, 1):
        raise NotImplementedError("QWen qwen2_moe with experts other than bias-free SwiGLU or normalization_mode > 1")
    lm, tied = _lm_head(cfg, t)
    attn_bias = bool(cfg.get("attn_bias", True))
    hf_cfg = tr.Qwen2MoeConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                               num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d, hidden_act="silu",
                               rms_norm_eps=float(cfg.get("norm_epsilon", 1e-6)), qkv_bias=attn_bias,
                               max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                               tie_word_embeddings=tied, rope_parameters=_rope_parameters(cfg),
                               use_sliding_window=False, attention_dropout=0.0, num_experts=moe["num_experts"],
                               num_experts_per_tok=moe["top_k"], moe_intermediate_size=I,
                               shared_expert_intermediate_size=S, norm_topk_prob=moe["normalization_mode"] == 1,
                               decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0)
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": t["transformer.ln_f.weight"], "lm_head.weight": lm}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        sd[o + "input_layernorm.weight"] = t[s + "input_layernorm.weight"]
        sd[o + "post_attention_layernorm.weight"] = t[s + "post_layernorm.weight"]
        q, k, v = torch.split(t[s + "attention.qkv.weight"], [nh * d, nkv * d, nkv * d], 0)
        sd[o + "self_attn.q_proj.weight"], sd[o + "self_attn.k_proj.weight"], sd[o + "self_attn.v_proj.weight"] = q, k, v
        sd[o + "self_attn.o_proj.weight"] = t[s + "attention.dense.weight"]
        if attn_bias:
            qb, kb, vb = torch.split(t[s + "attention.qkv.bias"], [nh * d, nkv * d, nkv * d], 0)
            sd[o + "self_attn.q_proj.bias"], sd[o + "self_attn.k_proj.bias"], sd[o + "self_attn.v_proj.bias"] = qb, kb, vb
        fc = t[s + "mlp.fc.weight"]  # [E, 2I, H] = [w3 (up); w1 (gate)] per expert
        sd[o + "mlp.gate.weight"] = t[s + "mlp.router.weight"]
        sd[o + "mlp.experts.gate_up_proj"] = torch.cat([fc[:, I:], fc[:, :I]], dim=1)
        sd[o + "mlp.experts.down_proj"] = t[s + "mlp.proj.weight"]
        sfc = t[s + "mlp.shared_expert.fc.weight"]   # [2S, H] = [up; gate]
        sd[o + "mlp.shared_expert.up_proj.weight"], sd[o + "mlp.shared_expert.gate_proj.weight"] = sfc[:S], sfc[S:]
        sd[o + "mlp.shared_expert.down_proj.weight"] = t[s + "mlp.shared_expert.proj.weight"]
        sd[o + "mlp.shared_expert_gate.weight"] = t[s + "mlp.shared_expert_gate.weight"]
    return hf_cfg, sd


def _to_hf_qwen3(cfg: dict, t: Dict[str, torch.Tensor]):
    """QWenForCausalLM qwen3 (qwen/model.py QWenDecoderLayer): RmsNorm at norm_epsilon, Attention with qkv bias
    per attn_bias, no dense bias, per-head RmsNorm of q and k (attention.q_layernorm / k_layernorm) applied
    before rotary at eps 1e-5, GatedMLP (fc = gate_proj activated, gate = up_proj) -> Qwen3ForCausalLM."""
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    if cfg.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox" or cfg.get("use_logn_attn"):
        raise NotImplementedError("QWen qwen3 with other positions or logn attention")
    if cfg.get("hidden_act") != ("swiglu" if cfg.get("qwen_type") == "qwen3_moe" else "silu") or cfg.get("mlp_bias"):
        raise NotImplementedError("QWen qwen3 with an MLP other than bias-free SwiGLU")
    lm, tied = _lm_head(cfg, t)
    attn_bias = bool(cfg.get("attn_bias", True))
    hf_cfg = tr.Qwen3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                            num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d, hidden_act="silu",
                            rms_norm_eps=float(cfg.get("norm_epsilon", 1e-6)), attention_bias=attn_bias,
                            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                            tie_word_embeddings=tied, rope_parameters=_rope_parameters(cfg),
                            use_sliding_window=False, attention_dropout=0.0)
    moe = _moe(cfg)
    if cfg.get("qwen_type") == "qwen3_moe":
        # layers/moe.py: softmax over all experts, top-k; RENORMALIZE (1) divides the k weights by their sum
        # (= Qwen3Moe norm_topk_prob), NONE (0) keeps them; the other modes have no transformers class here
        if moe["normalization_mode"] not in (0, 1) or moe["shared_expert_intermediate_size"]:
            raise NotImplementedError("QWen qwen3_moe with normalization_mode > 1 or shared experts")
        hf_cfg = tr.Qwen3MoeConfig(num_experts=moe["num_experts"], num_experts_per_tok=moe["top_k"],
                                   moe_intermediate_size=I, norm_topk_prob=moe["normalization_mode"] == 1,
                                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.0,
                                   **{k: getattr(hf_cfg, k) for k in (
                                       "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                       "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                                       "attention_bias", "max_position_embeddings", "tie_word_embeddings",
                                       "rope_parameters", "use_sliding_window", "attention_dropout")})
    hf_cfg.trtllm_qk_norm_eps = QWEN_QK_NORM_EPS
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": t["transformer.ln_f.weight"], "lm_head.weight": lm}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        sd[o + "input_layernorm.weight"] = t[s + "input_layernorm.weight"]
        sd[o + "post_attention_layernorm.weight"] = t[s + "post_layernorm.weight"]
        q, k, v = torch.split(t[s + "attention.qkv.weight"], [nh * d, nkv * d, nkv * d], 0)
        sd[o + "self_attn.q_proj.weight"], sd[o + "self_attn.k_proj.weight"], sd[o + "self_attn.v_proj.weight"] = q, k, v
        sd[o + "self_attn.o_proj.weight"] = t[s + "attention.dense.weight"]
        if attn_bias:   # HF's attention_bias also gives o_proj a bias: TensorRT-LLM's dense has none (zeros)
            qb, kb, vb = torch.split(t[s + "attention.qkv.bias"], [nh * d, nkv * d, nkv * d], 0)
            sd[o + "self_attn.q_proj.bias"], sd[o + "self_attn.k_proj.bias"], sd[o + "self_attn.v_proj.bias"] = qb, kb, vb
            sd[o + "self_attn.o_proj.bias"] = torch.zeros(H, dtype=qb.dtype)
        sd[o + "self_attn.q_norm.weight"] = t[s + "attention.q_layernorm.weight"]
        sd[o + "self_attn.k_norm.weight"] = t[s + "attention.k_layernorm.weight"]
        if moe["num_experts"] > 1:
            fc = t[s + "mlp.fc.weight"]  # [E, 2I, H] = [w3 (up); w1 (gate)] per expert
            sd[o + "mlp.gate.weight"] = t[s + "mlp.router.weight"]
            sd[o + "mlp.experts.gate_up_proj"] = torch.cat([fc[:, I:], fc[:, :I]], dim=1)
            sd[o + "mlp.experts.down_proj"] = t[s + "mlp.proj.weight"]
            continue
        sd[o + "mlp.gate_proj.weight"] = t[s + "mlp.fc.weight"]
        sd[o + "mlp.up_proj.weight"] = t[s + "mlp.gate.weight"]
        sd[o + "mlp.down_proj.weight"] = t[s + "mlp.proj.weight"]
    return hf_cfg, sd


def _zeros_like_bias(t, key, n, ref):
    return t[key] if key in t else torch.zeros(n, dtype=ref.dtype)


def _to_hf_gpt(cfg: dict, t: Dict[str, torch.Tensor]):
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    act = cfg["hidden_act"]
    if act in GATED_ACTS:
        raise NotImplementedError("GPT class with a gated MLP has no transformers equivalent here")
    if _moe(cfg)["num_experts"] > 1:
        raise NotImplementedError("GPT class with MoE")
    if float(cfg.get("q_scaling", 1.0)) != 1.0 or cfg.get("apply_query_key_layer_scaling") \
            or cfg.get("embedding_scale") not in (None, 1.0, 1) or cfg.get("qk_layernorm") \
            or cfg.get("inner_layernorm") or cfg.get("norm_before_bmm1"):
        raise NotImplementedError("GPT class option without a transformers equivalent")
    if nkv != nh or d * nh != H:
        raise NotImplementedError("GPT class with GQA/MQA or head_size != hidden/heads")
    pet = cfg.get("position_embedding_type", "learned_absolute")
    lm, tied = _lm_head(cfg, t)
    eps = float(cfg.get("norm_epsilon", 1e-5))
    hf_act = _ACT_TO_HF[act]
    sd = {}
    if pet == "learned_absolute":
        # -> GPT2LMHeadModel (Conv1D weights are [in, out]; c_attn is [q; k; v] on the out axis)
        hf_cfg = tr.GPT2Config(vocab_size=V, n_positions=cfg["max_position_embeddings"], n_embd=H,
                               n_layer=L, n_head=nh, n_inner=I, activation_function=hf_act,
                               layer_norm_epsilon=eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               scale_attn_weights=True, tie_word_embeddings=tied)
        sd["transformer.wte.weight"] = t["transformer.vocab_embedding.weight"]
        sd["transformer.wpe.weight"] = t["transformer.position_embedding.weight"]
        sd["transformer.ln_f.weight"] = t["transformer.ln_f.weight"]
        sd["transformer.ln_f.bias"] = t["transformer.ln_f.bias"]
        sd["lm_head.weight"] = lm
        for i in range(L):
            s, o = f"transformer.layers.{i}.", f"transformer.h.{i}."
            ref = t[s + "attention.qkv.weight"]
            sd[o + "ln_1.weight"] = t[s + "input_layernorm.weight"]
            sd[o + "ln_1.bias"] = t[s + "input_layernorm.bias"]
            sd[o + "ln_2.weight"] = t[s + "post_layernorm.weight"]
            sd[o + "ln_2.bias"] = t[s + "post_layernorm.bias"]
            sd[o + "attn.c_attn.weight"] = ref.t().contiguous()
            sd[o + "attn.c_attn.bias"] = _zeros_like_bias(t, s + "attention.qkv.bias", 3 * H, ref)
            sd[o + "attn.c_proj.weight"] = t[s + "attention.dense.weight"].t().contiguous()
            sd[o + "attn.c_proj.bias"] = _zeros_like_bias(t, s + "attention.dense.bias", H, ref)
            sd[o + "mlp.c_fc.weight"] = t[s + "mlp.fc.weight"].t().contiguous()
            sd[o + "mlp.c_fc.bias"] = _zeros_like_bias(t, s + "mlp.fc.bias", I, ref)
            sd[o + "mlp.c_proj.weight"] = t[s + "mlp.proj.weight"].t().contiguous()
            sd[o + "mlp.c_proj.bias"] = _zeros_like_bias(t, s + "mlp.proj.bias", H, ref)
        return hf_cfg, sd
    if pet == "rope_gpt_neox":
        # -> GPTNeoXForCausalLM with sequential residual: LayerNorm+bias, rotate-half RoPE with
        # partial_rotary_factor = rotary_pct (the GPT class honours rotary_pct).
        rpct = float(cfg.get("rotary_pct", 1.0))
        if cfg.get("rotary_embedding_dim") is not None:
            rpct = cfg["rotary_embedding_dim"] / d
        hf_cfg = tr.GPTNeoXConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L,
                                  num_attention_heads=nh, intermediate_size=I, hidden_act=hf_act,
                                  max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                                  layer_norm_eps=eps, use_parallel_residual=False, attention_bias=True,
                                  hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=tied,
                                  rope_parameters=_rope_parameters(cfg, partial=rpct))
        sd["gpt_neox.embed_in.weight"] = t["transformer.vocab_embedding.weight"]
        sd["gpt_neox.final_layer_norm.weight"] = t["transformer.ln_f.weight"]
        sd["gpt_neox.final_layer_norm.bias"] = t["transformer.ln_f.bias"]
        sd["lm_head.weight"] = lm
        for i in range(L):
            s, o = f"transformer.layers.{i}.", f"gpt_neox.layers.{i}."
            ref = t[s + "attention.qkv.weight"]
            sd[o + "input_layernorm.weight"] = t[s + "input_layernorm.weight"]
            sd[o + "input_layernorm.bias"] = t[s + "input_layernorm.bias"]
            sd[o + "post_attention_layernorm.weight"] = t[s + "post_layernorm.weight"]
            sd[o + "post_attention_layernorm.bias"] = t[s + "post_layernorm.bias"]
            # [q; k; v] -> per-head interleaved [q_h; k_h; v_h]
            sd[o + "attention.query_key_value.weight"] = ref.reshape(3, nh, d, H).transpose(0, 1).reshape(3 * H, H)
            qb = _zeros_like_bias(t, s + "attention.qkv.bias", 3 * H, ref)
            sd[o + "attention.query_key_value.bias"] = qb.reshape(3, nh, d).transpose(0, 1).reshape(3 * H)
            sd[o + "attention.dense.weight"] = t[s + "attention.dense.weight"]
            sd[o + "attention.dense.bias"] = _zeros_like_bias(t, s + "attention.dense.bias", H, ref)
            sd[o + "mlp.dense_h_to_4h.weight"] = t[s + "mlp.fc.weight"]
            sd[o + "mlp.dense_h_to_4h.bias"] = _zeros_like_bias(t, s + "mlp.fc.bias", I, ref)
            sd[o + "mlp.dense_4h_to_h.weight"] = t[s + "mlp.proj.weight"]
            sd[o + "mlp.dense_4h_to_h.bias"] = _zeros_like_bias(t, s + "mlp.proj.bias", H, ref)
        return hf_cfg, sd
    raise NotImplementedError(f"GPT class with position_embedding_type {pet}")


def _to_hf_gemma(cfg: dict, t: Dict[str, torch.Tensor]):
    """Gemma class -> transformers GemmaForCausalLM.

    TRT-LLM (gemma/model.py): embedding x sqrt(hidden_size) in the model, RmsNorm multiplies by the stored
    weight (gemma/convert.py stores 1 + w), GatedMLP = ACT2FN[hidden_act](fc(x)) * gate(x), rope_gpt_neox on
    the whole head_size, q_scaling 1.  transformers' Gemma: the same embedding normalizer, GemmaRMSNorm
    multiplies by (1 + w): the HF weight is the stored one minus 1."""
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    act = cfg["hidden_act"]
    if _ACT_TO_HF.get(act) != "gelu_new":
        raise NotImplementedError(f"Gemma class with hidden_act {act!r} (transformers' Gemma is tanh GELU)")
    if cfg.get("attn_bias") or cfg.get("mlp_bias") or cfg.get("inter_layernorms"):
        raise NotImplementedError("Gemma class with biases / Gemma 2 layernorms")
    lm, tied = _lm_head(cfg, t)
    hf_cfg = tr.GemmaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                            num_attention_heads=nh, num_key_value_heads=nkv, head_dim=d,
                            hidden_act="gelu_pytorch_tanh", rms_norm_eps=float(cfg.get("norm_epsilon", 1e-6)),
                            max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                            tie_word_embeddings=tied, rope_parameters=_rope_parameters(cfg),
                            attention_bias=False, attention_dropout=0.0)
    one = lambda w: w.float() - 1.0  # noqa: E731
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": one(t["transformer.ln_f.weight"]), "lm_head.weight": lm}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        sd[o + "input_layernorm.weight"] = one(t[s + "input_layernorm.weight"])
        sd[o + "post_attention_layernorm.weight"] = one(t[s + "post_layernorm.weight"])
        q, k, v = torch.split(t[s + "attention.qkv.weight"], [nh * d, nkv * d, nkv * d], 0)
        sd[o + "self_attn.q_proj.weight"], sd[o + "self_attn.k_proj.weight"], sd[o + "self_attn.v_proj.weight"] = q, k, v
        sd[o + "self_attn.o_proj.weight"] = t[s + "attention.dense.weight"]
        sd[o + "mlp.gate_proj.weight"] = t[s + "mlp.fc.weight"]      # activated branch
        sd[o + "mlp.up_proj.weight"] = t[s + "mlp.gate.weight"]
        sd[o + "mlp.down_proj.weight"] = t[s + "mlp.proj.weight"]
    return hf_cfg, sd


def _to_hf_falcon(cfg: dict, t: Dict[str, torch.Tensor]):
    """Falcon class -> transformers FalconForCausalLM.

    TRT-LLM (falcon/model.py): LayerNorm input_layernorm (+ mlp_layernorm with the new decoder architecture
    and two norms), x + attn(ln(x)) + mlp(ln'(x)) in a parallel block, MLP = proj(ACT2FN[hidden_act](fc(x)))
    ("gelu" = tanh approximation), rope_gpt_neox over the whole head, ln_f at LayerNorm's default eps 1e-5.
    The fused QKV is [Q; K; V]; transformers' Falcon wants per-KV-group [q..., k, v] (new decoder
    architecture), [Q; K; V] (multi_query) or per-head [q, k, v] (MHA)."""
    import transformers as tr
    H, L, nh, nkv, d, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                              _nkv(cfg), _head_size(cfg), _inter(cfg), cfg["vocab_size"])
    act = cfg["hidden_act"]
    if act not in _ACT_TO_HF or act in GATED_ACTS:
        raise NotImplementedError(f"Falcon class with hidden_act {act!r}")
    if cfg.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox":
        raise NotImplementedError("Falcon class without rope_gpt_neox (alibi)")
    eps = float(cfg.get("norm_epsilon", 1e-5))
    if eps != 1e-5:
        raise NotImplementedError("Falcon class with norm_epsilon != 1e-5 (TRT-LLM's ln_f always uses 1e-5; "
                                  "transformers' Falcon one eps)")
    new = bool(cfg.get("new_decoder_architecture", False))
    par = _falcon_parallel(cfg)
    n_ln = _falcon_num_ln(cfg)
    if not new and nkv not in (1, nh):
        raise NotImplementedError("Falcon class with GQA outside the new decoder architecture")
    if new and n_ln != 2:
        raise NotImplementedError("Falcon new decoder architecture with one norm")
    bias = bool(cfg.get("bias", False))
    lm, tied = _lm_head(cfg, t)
    hf_cfg = tr.FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=nh,
                             num_kv_heads=nkv, new_decoder_architecture=new, multi_query=(nkv == 1 and not new),
                             parallel_attn=par, num_ln_in_parallel_attn=n_ln, bias=bias, alibi=False,
                             layer_norm_epsilon=eps, ffn_hidden_size=I, activation=_ACT_TO_HF[act],
                             max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                             rope_theta=float(cfg.get("rotary_base", 10000.0)), hidden_dropout=0.0,
                             attention_dropout=0.0, tie_word_embeddings=tied)
    if cfg.get("rotary_scaling"):
        raise NotImplementedError("Falcon class with rotary_scaling")

    def fuse(x):  # [Q; K; V] on dim 0 -> transformers' Falcon layout
        q, k, v = torch.split(x, [nh * d, nkv * d, nkv * d], 0)
        rest = x.shape[1:]
        if new:
            q = q.reshape(nkv, nh // nkv, d, *rest)
            return torch.cat([q, k.reshape(nkv, 1, d, *rest), v.reshape(nkv, 1, d, *rest)], 1).reshape(-1, *rest)
        if nkv == 1:
            return x
        return torch.stack([q.reshape(nh, d, *rest), k.reshape(nh, d, *rest), v.reshape(nh, d, *rest)],
                           1).reshape(-1, *rest)

    sd = {"transformer.word_embeddings.weight": t["transformer.vocab_embedding.weight"],
          "transformer.ln_f.weight": t["transformer.ln_f.weight"], "transformer.ln_f.bias": t["transformer.ln_f.bias"],
          "lm_head.weight": lm}
    norms = {"input_layernorm": "ln_attn" if new else "input_layernorm", "mlp_layernorm": "ln_mlp",
             "post_layernorm": "post_attention_layernorm"}
    lins = {"attention.dense": "self_attention.dense", "mlp.fc": "mlp.dense_h_to_4h",
            "mlp.proj": "mlp.dense_4h_to_h"}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"transformer.h.{i}."
        for a, b in norms.items():
            if s + a + ".weight" in t:
                sd[o + b + ".weight"], sd[o + b + ".bias"] = t[s + a + ".weight"], t[s + a + ".bias"]
        sd[o + "self_attention.query_key_value.weight"] = fuse(t[s + "attention.qkv.weight"])
        for a, b in lins.items():
            sd[o + b + ".weight"] = t[s + a + ".weight"]
        if bias:
            sd[o + "self_attention.query_key_value.bias"] = fuse(t[s + "attention.qkv.bias"])
            for a, b in lins.items():
                sd[o + b + ".bias"] = t[s + a + ".bias"]
    return hf_cfg, sd


def _to_hf_phi3(cfg: dict, t: Dict[str, torch.Tensor]):
    """Phi3ForCausalLM (phi3/model.py, not the small / MoE variants) -> transformers Phi3ForCausalLM: RmsNorm at
    norm_epsilon; Attention(rope_gpt_neox, rotary_embedding_percentage=rotary_pct, no bias) rotating the first
    int(head_size * rotary_pct) channels of each head (half rotation, like transformers' partial_rotary_factor);
    head_size = hidden // heads; MLP fc = [up; gate] with silu on gate (functional.swiglu) -> gate_up_proj =
    [gate; up] (phi3/convert.py swaps the halves the other way)."""
    import transformers as tr
    H, L, nh, nkv, I, V = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], _nkv(cfg),
                           _inter(cfg), cfg["vocab_size"])
    if cfg.get("position_embedding_type", "rope_gpt_neox") != "rope_gpt_neox" \
            or cfg.get("hidden_act") != "swiglu":
        raise NotImplementedError("Phi3 class other than rope_gpt_neox + swiglu")
    lm, tied = _lm_head(cfg, t)
    hf_cfg = tr.Phi3Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                           num_attention_heads=nh, num_key_value_heads=nkv, hidden_act="silu",
                           rms_norm_eps=float(cfg.get("norm_epsilon", 1e-5)),
                           max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                           tie_word_embeddings=tied, attention_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                           rope_parameters=_rope_parameters(cfg, partial=float(cfg.get("rotary_pct", 1.0))),
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": t["transformer.ln_f.weight"], "lm_head.weight": lm}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        up, gate = t[s + "mlp.fc.weight"].chunk(2, dim=0)
        sd.update({o + "input_layernorm.weight": t[s + "input_layernorm.weight"],
                   o + "post_attention_layernorm.weight": t[s + "post_layernorm.weight"],
                   o + "self_attn.qkv_proj.weight": t[s + "attention.qkv.weight"],
                   o + "self_attn.o_proj.weight": t[s + "attention.dense.weight"],
                   o + "mlp.gate_up_proj.weight": torch.cat([gate, up], 0),
                   o + "mlp.down_proj.weight": t[s + "mlp.proj.weight"]})
    return hf_cfg, sd


def to_hf(cfg: dict, tensors: Dict[str, torch.Tensor]):
    """(transformers config, state dict) equivalent to a read TRT-LLM checkpoint.

    GPT class + learned_absolute -> GPT2LMHeadModel; GPT class + rope_gpt_neox -> GPTNeoXForCausalLM
    (partial_rotary_factor = rotary_pct); LLaMA class -> LlamaForCausalLM, Qwen2ForCausalLM when
    attn_bias is set but the dense bias is all zeros, MixtralForCausalLM with a moe block; Gemma class ->
    GemmaForCausalLM; Falcon class -> FalconForCausalLM; QWen class (qwen3) -> Qwen3ForCausalLM whose q/k
    norms run at TensorRT-LLM's eps (see ``build_hf_model``)."""
    cls = MODEL_MAP.get(cfg["architecture"])
    if cls == _GEMMA:
        return _to_hf_gemma(cfg, tensors)
    if cls == _FALCON:
        return _to_hf_falcon(cfg, tensors)
    if cls == _LLAMA:
        return _to_hf_llama(cfg, tensors)
    if cls == _QWEN:
        return (_to_hf_qwen2_moe if cfg.get("qwen_type") == "qwen2_moe" else _to_hf_qwen3)(cfg, tensors)
    if cls == _GPT:
        return _to_hf_gpt(cfg, tensors)
    if cls == _PHI3:
        return _to_hf_phi3(cfg, tensors)
    raise NotImplementedError(f"to_hf for {cfg['architecture']}")


def build_hf_model(hf_cfg, sd):
    import transformers as tr
    hf_cfg._attn_implementation = "eager"
    model = tr.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager",
                                                dtype=torch.float32)
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    if getattr(hf_cfg, "tie_word_embeddings", False):
        model.tie_weights()
    qk_eps = getattr(hf_cfg, "trtllm_qk_norm_eps", None)
    if qk_eps is not None:   # TensorRT-LLM's QWen q/k RmsNorm eps, not rms_norm_eps
        for layer in model.model.layers:
            layer.self_attn.q_norm.variance_epsilon = layer.self_attn.k_norm.variance_epsilon = qk_eps
    return model.eval()


@torch.no_grad()
def logits(ckpt_dir: str, tokens: torch.LongTensor, emulate_build_quant: bool = True) -> torch.Tensor:
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        if json.load(f).get("architecture") == trtllm_reader_deepseek_v2.ARCH:   # MLA: its own reader and forward
            return trtllm_reader_deepseek_v2.logits(ckpt_dir, tokens)
    cfg, ten = read_checkpoint(ckpt_dir, emulate_build_quant=emulate_build_quant)
    hf_cfg, sd = to_hf(cfg, ten)
    model = build_hf_model(hf_cfg, sd)
    out = model(input_ids=tokens, use_cache=False).logits
    return out[..., :cfg["vocab_size"]].float()
