"""NemotronHForCausalLM: a hybrid of Mamba-2 mixers, attention and MLP layers, one mixer per layer
(``hybrid_override_pattern``: M mamba, * attention, - MLP), each after an RMSNorm; attention without positions
(no rotary), GQA, no biases; plain MLP (``mlp_hidden_act``, Nemotron-H: relu2); untied head.

Names are the Hub's (``backbone.*``, what nvidia/Nemotron-H checkpoints, vLLM and TensorRT-LLM's PyTorch flow
load; transformers 5 renames ``backbone.`` to ``model.`` on load). The Mamba mixer follows transformers'
``NemotronHMamba2Mixer``: ``in_proj`` = ``[z; x; B; C; dt]``, ``conv1d`` = ``[x; B; C]`` as ``[C, 1, K]``, the
gated RMSNorm after the gate over ``n_groups`` groups at ``layer_norm_epsilon`` (Megatron: 1e-5, hard-coded),
``time_step_min`` 0: transformers 5 clamps softplus(dt) from below at ``time_step_min`` (an init setting
elsewhere; Hub configs say 1e-3), Megatron's forward does not (``dt_limit=(0.0, inf)``), so 0 keeps Megatron's
math. (A config with 0 loads with ``from_pretrained``; only a fresh random init would take its log.)"""

from __future__ import annotations

from ....ir.ops import layer_pattern
from .common import HIDDEN_ACT, ONE_MLP_SIZE, family, no_qk_norm, rule

_L = "backbone.layers.{L}."
ROWS = "\n".join(
    "  ".join(r)
    for r in [
        ("embedding", "word", "backbone.embeddings.weight", "copy", "always"),
        # every hybrid layer has one pre-norm, whatever the mixer (role: what consumes it)
        ("norm", "weight", _L + "norm.weight", "copy", "always"),
        ("input_norm", "weight", _L + "norm.weight", "copy", "always"),
        ("post_norm", "weight", _L + "norm.weight", "copy", "always"),
        ("mamba", "in_z+in_x+in_B+in_C+in_dt", _L + "mixer.in_proj.weight", "copy", "always"),
        ("mamba", "conv_x+conv_B+conv_C", _L + "mixer.conv1d.weight", "depthwise", "always"),
        ("mamba", "conv_x_bias+conv_B_bias+conv_C_bias", _L + "mixer.conv1d.bias", "copy", "always"),
        ("mamba", "A_log", _L + "mixer.A_log", "copy", "always"),
        ("mamba", "D", _L + "mixer.D", "copy", "always"),
        ("mamba", "dt_bias", _L + "mixer.dt_bias", "copy", "always"),
        ("mamba", "norm", _L + "mixer.norm.weight", "copy", "always"),
        ("mamba", "out", _L + "mixer.out_proj.weight", "copy", "always"),
        ("attention", "q", _L + "mixer.q_proj.weight", "copy", "always"),
        ("attention", "k", _L + "mixer.k_proj.weight", "copy", "always"),
        ("attention", "v", _L + "mixer.v_proj.weight", "copy", "always"),
        ("attention", "proj", _L + "mixer.o_proj.weight", "copy", "always"),
        ("mlp", "fc1", _L + "mixer.up_proj.weight", "copy", "always"),
        ("mlp", "fc1_bias", _L + "mixer.up_proj.bias", "copy", "mlp_bias"),
        ("mlp", "fc2", _L + "mixer.down_proj.weight", "copy", "always"),
        ("mlp", "fc2_bias", _L + "mixer.down_proj.bias", "copy", "mlp_bias"),
        ("final_norm", "weight", "backbone.norm_f.weight", "copy", "always"),
        # NemotronHForCausalLM ties nothing (_tied_weights_keys = {}): the head is always written
        ("lm_head", "weight", "lm_head.weight", "copy", "always"),
    ]
)


def _mambas(f):
    return list(f.model.graph.find("mamba"))


def _structure(f):
    p = []
    if layer_pattern(f.model.graph) is None:
        p.append(
            f"the {f.name} needs one mixer per layer (norm -> mamba | attention | MLP -> add); a layer with "
            "attention and an MLP has no hybrid pattern symbol"
        )
    if f.moes:
        p.append(
            f"MoE layers (E) cannot be expressed by the {f.name} in mexc: its MoE always has shared experts "
            "and sigmoid expert-bias routing, which the IR has no form for yet"
        )
    if f.kinds != {"rmsnorm"}:
        p.append(f"{sorted(f.kinds)} norms cannot be expressed by the {f.name}: it uses RMSNorm only")
    return p


def _attention(f):
    p = []
    if f.positions != {"none"} or f.learned:
        p.append(f"positions (rotary or learned) cannot be expressed by the {f.name}: its attention has none")
    if f.has(f.attns, ("q_bias", "k_bias", "v_bias", "proj_bias")):
        p.append(f"attention biases cannot be expressed by the {f.name} (its q/k/v/o projections have none)")
    return p


def _mixers(f):
    p, ms = [], _mambas(f)
    keys = ("num_heads", "head_dim", "num_groups", "state_dim", "conv_kernel", "norm_eps", "norm_before_gate")
    if len({tuple(m.attrs[k] for k in keys) for m in ms}) > 1:
        p.append(f"Mamba layers differ in shape or norm settings; the {f.name} has one per model")
    if any(m.attrs["norm_before_gate"] for m in ms):
        p.append(
            f"a gated norm before the gate cannot be expressed by the {f.name}: it normalizes y * silu(z)"
        )
    eps = {m.attrs["norm_eps"] for m in ms} | {n.attrs["eps"] for n in f.norms}
    if len(eps) > 1:
        p.append(
            f"the Mamba gated-norm eps {sorted({m.attrs['norm_eps'] for m in ms})} differs from the layer "
            f"norms' eps: the {f.name} uses layer_norm_epsilon for both"
        )
    return p


def _mlps(f):
    for m in f.mlps:
        if m.attrs["gated"]:
            return f"a gated MLP cannot be expressed by the {f.name} (its MLP is up_proj / down_proj)"
        if m.attrs["activation"] not in HIDDEN_ACT:
            return f"activation {m.attrs['activation']!r} has no transformers name"


def config(f, flags) -> dict:
    c, a, m = f.config, f.a0, _mambas(f)[0].attrs
    mlp = f.mlps[0] if f.mlps else None
    return {
        "vocab_size": f.emb.params["word"].type.shape[0],
        "hidden_size": c.hidden_size,
        "hybrid_override_pattern": layer_pattern(f.model.graph),
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": a["num_heads"],
        "num_key_value_heads": a["num_kv_heads"],
        "head_dim": a["head_dim"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "intermediate_size": mlp.params["fc2"].type.shape[1] if mlp else 4 * c.hidden_size,
        "mlp_hidden_act": HIDDEN_ACT[mlp.attrs["activation"]] if mlp else "relu2",
        "mlp_bias": flags["mlp_bias"],
        "mamba_num_heads": m["num_heads"],
        "mamba_head_dim": m["head_dim"],
        "n_groups": m["num_groups"],
        "ssm_state_size": m["state_dim"],
        "conv_kernel": m["conv_kernel"],
        "mamba_hidden_act": "silu",
        "expand": max(1, m["num_heads"] * m["head_dim"] // c.hidden_size),
        "use_conv_bias": True,
        "use_bias": False,
        "layer_norm_epsilon": f.norms[0].attrs["eps"],
        "residual_in_fp32": False,
        "time_step_min": 0.0,
        "chunk_size": 128,
        "max_position_embeddings": c.max_position_embeddings,
        "num_logits_to_keep": 1,
        "initializer_range": 0.02,
    }


def _flags(f, base: dict) -> dict:
    return base | {"attn_bias": False}


# the other classes never look for mamba nodes: this one is tried first
_OTHERS = (
    "falcon",
    "falcon2",
    "gemma",
    "gpt2",
    "gpt_bigcode",
    "llama",
    "mixtral",
    "nemotron",
    "qwen2",
    "qwen3",
    "stablelm",
)

family(
    "nemotron_h",
    "NemotronHForCausalLM",
    rows=ROWS,
    moe=True,
    before=_OTHERS,
    router_fp32=True,   # its (refused) MoE layers would keep gate.weight fp32 in transformers
    signature=lambda f: bool(_mambas(f)),
    rules=[
        rule("layers with more than one mixer; MoE layers; LayerNorm")(_structure),
        rule("positions; attention biases")(_attention),
        rule("q/k normalization")(no_qk_norm),
        rule(
            "Mamba layers of different shapes; a norm before the gate; a gated-norm eps other than the "
            "layer norms'"
        )(_mixers),
        rule("a gated MLP")(_mlps),
        ONE_MLP_SIZE,
    ],
    config=config,
    flags=_flags,
)
