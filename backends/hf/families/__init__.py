"""Which Hugging Face class a model becomes, what that class cannot express, and its config.json: one file per
class, registered in classification order (:mod:`.common` holds what they share; issue 15 item 2).

=========== ======================  =======================================================================
family      HF class                IR shape
=========== ======================  =======================================================================
deepseek_v3 DeepseekV3ForCausalLM   multi-latent attention (mla), RMSNorm, dense SwiGLU layers first
                                    (first_k_dense_replace), then sigmoid-routed MoEs + shared experts
deepseek_v2 DeepseekV2ForCausalLM   the same MLA, dense layers first, then pre-softmax (not renormalized) greedy /
                                    group-limited softmax MoEs + ungated shared experts
qwen3_moe   Qwen3MoeForCausalLM     like qwen3, softmax top-k MoEs (renormalized or not), mlp_only_layers
qwen2_moe   Qwen2MoeForCausalLM     like qwen2, softmax top-k MoEs + a sigmoid-gated shared expert,
                                    mlp_only_layers
glm4_moe    Glm4MoeForCausalLM      sigmoid routing (expert bias, groups) + ungated shared experts, partial
                                    rotary, dense layers first (first_k_dense_replace)
mixtral     MixtralForCausalLM      like llama, every layer a softmax top-k MoE of gated experts, no biases
falcon      FalconForCausalLM       parallel attention + MLP off one LayerNorm, rotary, fused grouped QKV
falcon2     FalconForCausalLM       the same with ln_attn + ln_mlp (Falcon's new decoder architecture)
gemma       GemmaForCausalLM        RMSNorm (1 + w), embedding x sqrt(hidden), GeGLU (tanh GELU), rotary
gpt_bigcode GPTBigCodeForCausalLM   like gpt2 with multi-query attention (StarCoder), ``nn.Linear`` weights
gpt2        GPT2LMHeadModel         LayerNorm, learned (or no) positions, plain MLP, MHA, head tied or not
stablelm    StableLmForCausalLM     LayerNorm, rotary (partial allowed), SwiGLU, q/k/v bias only (NeMo GPT-Next)
nemotron    NemotronForCausalLM     LayerNorm1p (1 + w), rotary (partial allowed), plain MLP (squared-relu)
qwen3_next  Qwen3NextForCausalLM    qwen3 with the attention output gate (attention_output_gate), all layers full
llama4      Llama4ForCausalLM       dense llama with the weightless L2 q/k norm (qk_l2_norm), interleaved-pair rope
qwen3       Qwen3ForCausalLM        like llama with RMSNorm q/k norms (Megatron's qk_layernorm)
granite     GraniteForCausalLM      like llama with a softmax scale (attention_multiplier), other multipliers 1
smollm3     SmolLM3ForCausalLM      like llama with NoPE layers (``no_rope_layers``: 1 = rotary, 0 = none)
qwen2       Qwen2ForCausalLM        like llama, with q/k/v biases only (no o_proj / MLP bias)
llama       LlamaForCausalLM        RMSNorm, rotary, gated MLP; ``attention_bias`` / ``mlp_bias`` as needed
mistral     MistralForCausalLM      like llama without biases, every layer one sliding window (Megatron window_size)
ministral   MinistralForCausalLM    the same, windowed and full layers mixed (``layer_types``; window_attn_skip_freq)
=========== ======================  =======================================================================

The family is chosen from the IR's structure, not from the source's family label: the first class whose
signature and rules hold (:meth:`mexc.backends.lowering.Registry.classify`).
"""

from __future__ import annotations

from ....ir import Model
from ...lowering import Facts, TargetClass, load_classes
from .common import ATTN_BIAS, DTYPE, HIDDEN_ACT, MLP_BIAS, REGISTRY, falcon_block  # noqa: F401 - re-exported

# every other module of this package is one family; the classification order is registration order with
# each file's before= (the first class whose signature and rules hold wins)
load_classes(__name__, __path__, REGISTRY)

ARCHITECTURES = {c.name: c.extra["architecture"] for c in REGISTRY}
MODEL_TYPES = {c.name: c.extra["model_type"] for c in REGISTRY}
ZERO_CENTERED = tuple(c.name for c in REGISTRY if c.extra["zero_centered"])
FUSED_QKV = tuple(c.name for c in REGISTRY if c.extra["fused_qkv"])


def classify_class(model: Model) -> tuple[TargetClass | None, list[str], Facts | None]:
    """(class, refusal lines, facts)."""
    facts = Facts(model, "hf")
    if facts.emb is None or len(facts.heads) != 1 or not (facts.attns or facts.mlas):
        return None, ["the hf target needs one embedding, attention layers and one lm_head"], None
    cls, problems = REGISTRY.classify(model, facts)
    return cls, problems, facts


def classify(model: Model) -> tuple[str | None, list[str]]:
    """(family, problems): the HF family this model maps to, and what that family cannot express."""
    cls, problems, _ = classify_class(model)
    return (cls.name if cls else None), problems


def flags(model: Model, family: str, facts: Facts | None = None) -> dict[str, bool]:
    """The switches the name rows' ``when`` column reads (the class may adjust the default biases)."""
    f = facts or Facts(model, "hf")
    base = {"always": True, "untied": not f.heads[0].attrs["tied"], "attn_bias": f.has(f.attns, ATTN_BIAS),
            "mlp_bias": f.has(f.mlps, MLP_BIAS)}
    adjust = REGISTRY[family].extra["flags"]
    return adjust(f, base) if adjust else base


def hf_config(model: Model, family: str) -> dict:
    """config.json for ``family`` (call after :func:`classify` found no problems)."""
    cls, c = REGISTRY[family], model.config
    f = Facts(model, "hf")
    f.name, f.cls = cls.label, cls
    dtype = DTYPE.get(c.dtype.value, "float32")
    cfg: dict = {"architectures": [cls.extra["architecture"]], "model_type": cls.extra["model_type"]}
    cfg.update(cls.config(f, flags(model, family, f)))
    cfg.update({"tie_word_embeddings": bool(f.heads[0].attrs["tied"]), "use_cache": True,
                **{k: c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},  # unknown -> null
                "dtype": dtype, "torch_dtype": dtype})
    return cfg


def generation_config(model: Model) -> dict:
    c = model.config
    out: dict = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if c.get(k) is not None:
            out[k] = c.get(k)
    return out


def describe(family: str | None = None) -> str:
    """Every class (or one): what it cannot express and its name rows."""
    return "\n".join(c.describe() for c in REGISTRY if family in (None, c.name))
