"""TensorRT-LLM QWenForCausalLM with ``qwen_type: qwen3`` (tensorrt_llm/models/qwen/{model,config,convert}.py,
TensorRT-LLM 1.2): Llama-shaped decoder (RmsNorm, GatedMLP: ``fc`` = gate_proj, ``gate`` = up_proj), the
Attention built with ``qk_layernorm`` and ``layernorm_type=RmsNorm`` (``attention.q_layernorm`` /
``k_layernorm``, per head) and ``dense_bias=False``; QWenConfig reads ``attn_bias`` (default True: written
explicitly) and ``mlp_bias``. Its q/k RmsNorm takes the Attention's default eps 1e-5: the decoder layer does not
pass ``norm_epsilon`` to it (``norm_epsilon`` is the layer norms' eps).

``qwen_type: qwen3_moe`` (issue 17): the same decoder layer with ``MOE`` for the MLP (``config.moe.has_moe()``:
every layer; ``ffn_hidden_size = moe_intermediate_size``), named as the Llama MoE (``mlp.router`` fp32,
``mlp.fc`` = ``[up; gate]`` per expert, ``mlp.proj``). TensorRT-LLM's MOE takes the softmax over all experts,
then the top-k; ``moe.normalization_mode`` 1 (RENORMALIZE) divides the k weights by their sum, which is
Megatron's default softmax router (top-k of the logits, softmax over those k), 0 (NONE) is
``moe_router_pre_softmax``. QWenConfig.from_hugging_face writes NONE for every Qwen MoE; mexc writes the mode the
model was trained with (QWenConfig reads ``moe`` from config.json as given).

``qwen_type: qwen2_moe``: no q/k norm, ``SharedMoE(use_shared_gate=True)`` (layers/moe.py): the routed MOE plus
a shared ``MLP`` (``mlp.shared_expert.fc`` = ``[up; gate]`` TP-split per rank, ``mlp.shared_expert.proj``) whose
output is multiplied by ``sigmoid(mlp.shared_expert_gate(x))`` (``[1, H]``, replicated), as convert.py writes
it; its size is ``moe_shared_expert_intermediate_size``. The gate is always built: a shared expert without one
(Megatron without ``moe_shared_expert_gate``) has no TensorRT-LLM class and is refused."""

from __future__ import annotations

from .common import PLAIN_DECODER, UNREWRITTEN, decoder_attention, read_rope, rule, trt_class

CLS = "QWenForCausalLM"
QK_NORM_EPS = 1e-5          # tensorrt_llm/layers/attention.py Attention(eps=1e-05), not passed by QWenDecoderLayer
ROWS = """
attention   q_norm      transformer.layers.{L}.attention.q_layernorm.weight   copy  present
attention   k_norm      transformer.layers.{L}.attention.k_layernorm.weight   copy  present
attention   proj_bias   transformer.layers.{L}.attention.dense.bias           copy  present
moe   shared_up+shared_gate  transformer.layers.{L}.mlp.shared_expert.fc.weight     moe_fc  present
moe   shared_fc2             transformer.layers.{L}.mlp.shared_expert.proj.weight   copy    present
moe   shared_expert_gate     transformer.layers.{L}.mlp.shared_expert_gate.weight   copy    present
"""
_SHARED = {"shared_gate", "shared_up", "shared_fc2", "shared_expert_gate"}


def _moe_rules(f) -> list[str]:
    p = []
    if f.moes and f.mlps:
        p.append(f"dense (non-MoE) layers in a MoE model are not expressible with {CLS}: its decoder layer is an "
                 "MOE on every layer once moe.num_experts is set")
    for m in f.moes:
        a = m.attrs
        if a["score"] != "softmax":
            p.append(f"MoE routing with score={a['score']!r} (expert bias, group-limited top-k and all) has no "
                     f"TensorRT-LLM checkpoint class: {CLS} and LlamaForCausalLM route by softmax")
            return p
        if a["group_topk"]:
            p.append(f"group-limited top-k routing is not expressible with {CLS}")
        if not a["gated"] or a["activation"] != "silu":
            p.append(f"{CLS} ({_qwen_type(f)}) is emitted for SwiGLU experts only")
        if a["shared_expert"] == "ungated":
            p.append(f"a shared expert without a gate is not expressible with {CLS} (qwen2_moe's SharedMoE always "
                     "multiplies it by sigmoid(shared_expert_gate)) nor any other TensorRT-LLM checkpoint class")
        known = {"router", "gate", "up", "fc2"} | (_SHARED if a["shared_expert"] != "none" else set())
        if set(m.params) - known:
            p.append(f"MoE params {sorted(set(m.params) - known)} are not expressible with {CLS} ({_qwen_type(f)})")
        if p:
            return p
    if len({(m.attrs["num_experts"], m.attrs["top_k"], m.attrs["pre_softmax"], m.attrs["shared_expert"],
             m.params["fc2"].type.shape, _shared_size(m)) for m in f.moes}) > 1:
        p.append(f"MoE layers differ in experts/top-k/routing/size/shared expert; {CLS} has one moe config per model")
    return p


def _shared_size(m) -> int:
    return m.params["shared_fc2"].type.shape[-1] if "shared_fc2" in m.params else 0


def _qwen_type(f) -> str:
    if any(m.attrs["shared_expert"] != "none" for m in f.moes):
        return "qwen2_moe"
    return "qwen3_moe" if f.moes else "qwen3"


def _rules(f):
    p = _moe_rules(f)
    if _qwen_type(f) == "qwen2_moe":
        if any(a.attrs["qk_norm"] != "none" for a in f.attns):
            p.append(f"a q/k norm with a shared expert is not expressible with {CLS}: qwen2_moe (the one with a "
                     "shared expert) builds no q/k norm, qwen3 / qwen3_moe no shared expert")
    elif any(a.attrs["qk_norm"] != "rmsnorm" for a in f.attns):
        p.append(f"a LayerNorm q/k norm is not expressible with {CLS} (qwen3 builds RmsNorm q/k norms)")
    if f.kinds != {"rmsnorm"}:
        p.append(f"{CLS} (qwen3) uses RmsNorm only")
    if any(not m.attrs["gated"] or m.attrs["activation"] != "silu" for m in f.mlps):
        p.append(f"{CLS} (qwen3) is emitted for a SwiGLU MLP only")
    if f.has(f.attns, ("proj_bias",)):
        p.append(f"an attention output bias is not expressible with {CLS}: its Attention has dense_bias=False")
    if any(k.endswith("bias") for n in f.mlps for k in n.params):
        p.append(f"MLP biases are not emitted with {CLS} (qwen3)")
    return p


def notes(f) -> list[str]:
    eps = sorted({a.attrs["qk_norm_eps"] for a in f.attns if a.attrs["qk_norm"] != "none"} - {QK_NORM_EPS})
    if not eps:
        return []
    return [(f"{CLS} (qwen3): TensorRT-LLM builds the q/k RmsNorm with eps {QK_NORM_EPS:g} (its Attention "
             f"default; QWenDecoderLayer does not pass norm_epsilon), this model's is {eps[0]:g}: the engine's "
             "logits differ slightly (1e-4 in fp32 on a test model); --target hf keeps it exact")]


def config(f, cfg: dict) -> dict:
    cfg.update(qwen_type=_qwen_type(f), hidden_act="swiglu" if f.moes else "silu",
               attn_bias="qkv_bias" in f.attns[0].params, mlp_bias=False,
               use_logn_attn=False, seq_length=f.config.max_position_embeddings, moe_intermediate_size=0,
               moe_shared_expert_intermediate_size=0, disable_weight_only_quant_plugin=False)
    if f.moes:
        m = f.moes[0]
        cfg["moe_intermediate_size"] = m.params["fc2"].type.shape[-1]
        cfg["moe_shared_expert_intermediate_size"] = _shared_size(m)
        cfg["moe"] = {"num_experts": m.attrs["num_experts"], "top_k": m.attrs["top_k"],
                      "normalization_mode": 0 if m.attrs["pre_softmax"] else 1,
                      "shared_expert_intermediate_size": _shared_size(m)}
    return cfg


def read(cfg: dict) -> dict:
    qt = cfg.get("qwen_type")
    if qt not in ("qwen3", "qwen3_moe", "qwen2_moe"):
        return {"refuse": f"qwen_type {qt!r}: mexc reads QWenForCausalLM with qwen_type qwen3 / qwen3_moe / "
                          "qwen2_moe only"}
    out = {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": read_rope(cfg, percent=1.0)}
    if qt != "qwen2_moe":
        out.update(qk_norm="rmsnorm", qk_norm_eps=QK_NORM_EPS)
    if qt != "qwen3":
        moe = cfg.get("moe") or {}
        out.update(experts=moe.get("num_experts", 0), top_k=moe.get("top_k", 2),
                   pre_softmax=moe.get("normalization_mode", 0) == 0)
    if qt == "qwen2_moe":
        out["shared_expert"] = "sigmoid-gated"
    return out


trt_class(CLS, signature=lambda f: (any(a.attrs["qk_norm"] != "none" for a in f.attns)
                                    or any(m.attrs["shared_expert"] != "none" for m in f.moes)),
          rules=[decoder_attention(("none", "linear", "llama3"), qk_norm=True, moe=True), PLAIN_DECODER, UNREWRITTEN,
                 rule("a LayerNorm q/k norm, norms other than RmsNorm, an MLP other than SwiGLU, an attention output "
                      "bias, MLP biases; (qwen3_moe) dense layers, routing other than softmax top-k, experts other "
                      "than SwiGLU, differing MoE layers; (qwen2_moe) a shared expert without a sigmoid gate, a q/k "
                      "norm")(_rules)],
          config=config, read=read, extra_rows=ROWS, notes=notes, before=("LlamaForCausalLM", "GPTForCausalLM"))
