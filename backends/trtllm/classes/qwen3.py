"""TensorRT-LLM QWenForCausalLM with ``qwen_type: qwen3`` (tensorrt_llm/models/qwen/{model,config,convert}.py,
TensorRT-LLM 1.2): Llama-shaped decoder (RmsNorm, GatedMLP: ``fc`` = gate_proj, ``gate`` = up_proj), the
Attention built with ``qk_layernorm`` and ``layernorm_type=RmsNorm`` (``attention.q_layernorm`` /
``k_layernorm``, per head) and ``dense_bias=False``; QWenConfig reads ``attn_bias`` (default True: written
explicitly) and ``mlp_bias``. Its q/k RmsNorm takes the Attention's default eps 1e-5: the decoder layer does not
pass ``norm_epsilon`` to it (``norm_epsilon`` is the layer norms' eps)."""

from __future__ import annotations

from .common import PLAIN_DECODER, UNREWRITTEN, decoder_attention, read_rope, rule, trt_class

CLS = "QWenForCausalLM"
QK_NORM_EPS = 1e-5          # tensorrt_llm/layers/attention.py Attention(eps=1e-05), not passed by QWenDecoderLayer
ROWS = """
attention   q_norm      transformer.layers.{L}.attention.q_layernorm.weight   copy  present
attention   k_norm      transformer.layers.{L}.attention.k_layernorm.weight   copy  present
attention   proj_bias   transformer.layers.{L}.attention.dense.bias           copy  present
"""


def _rules(f):
    p = []
    if any(a.attrs["qk_norm"] != "rmsnorm" for a in f.attns):
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
    eps = sorted({a.attrs["qk_norm_eps"] for a in f.attns} - {QK_NORM_EPS})
    if not eps:
        return []
    return [(f"{CLS} (qwen3): TensorRT-LLM builds the q/k RmsNorm with eps {QK_NORM_EPS:g} (its Attention "
             f"default; QWenDecoderLayer does not pass norm_epsilon), this model's is {eps[0]:g}: the engine's "
             "logits differ slightly (1e-4 in fp32 on a test model); --target hf keeps it exact")]


def config(f, cfg: dict) -> dict:
    cfg.update(qwen_type="qwen3", hidden_act="silu", attn_bias="qkv_bias" in f.attns[0].params, mlp_bias=False,
               use_logn_attn=False, seq_length=f.config.max_position_embeddings, moe_intermediate_size=0,
               moe_shared_expert_intermediate_size=0, disable_weight_only_quant_plugin=False)
    return cfg


def read(cfg: dict) -> dict:
    if cfg.get("qwen_type") != "qwen3":
        return {"refuse": f"qwen_type {cfg.get('qwen_type')!r}: mexc reads QWenForCausalLM with qwen_type qwen3 only"}
    return {"norm": "rmsnorm", "gated": True, "activation": "silu", "rope": read_rope(cfg, percent=1.0),
            "qk_norm": "rmsnorm", "qk_norm_eps": QK_NORM_EPS}


trt_class(CLS, signature=lambda f: not f.moes and any(a.attrs["qk_norm"] != "none" for a in f.attns),
          rules=[decoder_attention(("none", "linear", "llama3"), qk_norm=True), PLAIN_DECODER, UNREWRITTEN,
                 rule("a LayerNorm q/k norm, norms other than RmsNorm, an MLP other than SwiGLU, an attention output "
                      "bias, MLP biases")(_rules)],
          config=config, read=read, extra_rows=ROWS, notes=notes, before=("LlamaForCausalLM", "GPTForCausalLM"))
