"""The token mixers of the op set (:mod:`mexc.ir.ops` has the table and the machinery): ``attention``
(MHA/GQA/MQA with its variants: QK norms, sliding window, sinks, output gate, softmax scale), ``mla``
(multi-latent attention) and ``mamba`` (Mamba-2). Each declares its attributes and params as data."""

from __future__ import annotations

from .ops import A, COLUMN, NORM, NORM_KINDS, P, POSITIONS, QK_NORM_KINDS, REPLICATED, ROPE_SCALINGS, ROW, op_schema
from .types import Rope

_QK = ("qk_norm", NORM_KINDS)


@op_schema("attention", 1, {"num_heads": A(int, None), "num_kv_heads": A(int, None), "head_dim": A(int, None),
                            "position": A(str, "rope", POSITIONS), "rope": A(Rope, Rope()),
                            "qk_norm": A(str, "none", QK_NORM_KINDS),
                            "qk_norm_eps": A((int, float), 1e-5),  # Megatron: layernorm_epsilon
                            "softmax_scale": A((int, float, type(None)), None),
                            # sliding window: query i sees keys i-window..i (Megatron window_size=(window, 0));
                            # None = full causal attention
                            "window": A((int, type(None)), None),
                            # sigmoid(gate x (+ gate_bias)) times the attention output, per head and channel,
                            # before proj (megatron-core attention_output_gate; Qwen3-Next)
                            "output_gate": A(bool, False),
                            # attention sinks: a learned logit per head in the softmax denominator (megatron-core
                            # softmax_type learnable / off-by-one, SoftmaxOne; gpt-oss): p = exp(s) / (exp(sink) +
                            # sum exp(s)); the sink has no value
                            "sinks": A(bool, False)},
           "causal self-attention, MHA/GQA/MQA",
           params=[P("qkv", "QKV H", COLUMN, linear=True, alt="fused"),
                   P("qkv_bias", "QKV", COLUMN, required=False, alt="fused"),
                   P("q", "Q H", COLUMN, linear=True, alt="separate"),
                   P("k", "KV H", COLUMN, linear=True, alt="separate"),
                   P("v", "KV H", COLUMN, linear=True, alt="separate"),
                   P("q_bias", "Q", COLUMN, required=False, alt="separate"),
                   P("k_bias", "KV", COLUMN, required=False, alt="separate"),
                   P("v_bias", "KV", COLUMN, required=False, alt="separate"),
                   P("proj", "H Q", ROW, linear=True),
                   P("proj_bias", "H", REPLICATED, required=False),  # added once, after the row reduction
                   P("q_norm", "d", NORM, when=_QK),
                   P("k_norm", "d", NORM, when=_QK),
                   P("gate", "Q H", COLUMN, linear=True, when=("output_gate", (True,))),
                   P("gate_bias", "Q", COLUMN, required=False, when=("output_gate", (True,))),
                   P("sinks", "NH", COLUMN, when=("sinks", (True,)))],   # TP: split by heads, as Megatron
           dims=lambda a, c: {"H": c.hidden_size, "d": a["head_dim"], "Q": a["num_heads"] * a["head_dim"],
                              "NH": a["num_heads"],
                              "KV": a["num_kv_heads"] * a["head_dim"],
                              "QKV": (a["num_heads"] + 2 * a["num_kv_heads"]) * a["head_dim"]})
def _check_attention(node, model):
    p = []
    a = node.attrs
    nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if nh % nkv:
        p.append(f"num_heads={nh} is not a multiple of num_kv_heads={nkv}")
    if a["window"] is not None and (isinstance(a["window"], bool) or a["window"] < 0):
        p.append(f"window={a['window']} must be None or an int >= 0 (keys i-window..i)")
    rope = a["rope"]
    if isinstance(rope, Rope) and rope.scaling not in ROPE_SCALINGS:
        p.append(f"attribute rope has scaling={rope.scaling!r}, not one of {', '.join(ROPE_SCALINGS)}")
    if "qkv" in node.params:
        t = node.params["qkv"].type
        if t.layout is None:
            p.append("param 'qkv' has no QKV layout in its type")
        elif (t.layout.q_heads, t.layout.kv_heads, t.layout.head_dim) != (nh, nkv, d):
            p.append(f"qkv layout {t.layout} disagrees with attrs heads={nh} kv={nkv} d={d}")
        if "qkv_bias" in node.params and node.params["qkv_bias"].type.layout != t.layout:
            bias = node.params["qkv_bias"].type.layout
            p.append(f"qkv_bias layout {bias} differs from qkv layout {t.layout}")
    return p


_MLA_DOC = ("multi-latent attention (DeepSeek-V2/V3; megatron-core MLASelfAttention, "
            "megatron/core/transformer/multi_latent_attention.py): q = q(x) or q_up(norm(q_down(x))) per head "
            "[qk_head_dim nope | qk_rope_dim rope]; kv_down(x) = [latent kv_lora_rank | shared k_rope qk_rope_dim]; "
            "kv_up(norm(latent)) per head = [k_nope qk_head_dim | v v_head_dim]; rope (GPT-J pairs, Megatron's "
            "de-interleave + rotate-half) on q_rope and the shared k_rope only; softmax scale softmax_scale (None: "
            "1/sqrt(qk_head_dim + qk_rope_dim)); proj. latent_norm none: Megatron without qk_layernorm")
_LATENT = ("latent_norm", NORM_KINDS)


@op_schema("mla", 1, {"num_heads": A(int, None), "kv_lora_rank": A(int, None), "qk_head_dim": A(int, None),
                      "qk_rope_dim": A(int, None), "v_head_dim": A(int, None),
                      "rope": A(Rope, Rope(interleaved=True)), "latent_norm": A(str, "rmsnorm", QK_NORM_KINDS),
                      "latent_norm_eps": A((int, float), 1e-5),  # Megatron: layernorm_epsilon
                      "softmax_scale": A((int, float, type(None)), None)},
           _MLA_DOC,
           params=[P("q", "Dq H", COLUMN, linear=True, alt="direct"),
                   P("q_down", "R H", REPLICATED, linear=True, alt="lora"),
                   P("q_norm", "R", NORM, alt="lora", when=_LATENT),
                   P("q_up", "Dq R", COLUMN, linear=True, alt="lora"),
                   P("kv_down", "KVA H", REPLICATED, linear=True),
                   P("kv_norm", "C", NORM, when=_LATENT),
                   P("kv_up", "KVB C", COLUMN, linear=True),
                   P("proj", "H O", ROW, linear=True),
                   P("proj_bias", "H", REPLICATED, required=False)],
           dims=lambda a, c: {"H": c.hidden_size, "C": a["kv_lora_rank"],
                              "Dq": a["num_heads"] * (a["qk_head_dim"] + a["qk_rope_dim"]),
                              "KVA": a["kv_lora_rank"] + a["qk_rope_dim"],
                              "KVB": a["num_heads"] * (a["qk_head_dim"] + a["v_head_dim"]),
                              "O": a["num_heads"] * a["v_head_dim"]})
def _check_mla(node, model):
    a, p = node.attrs, []
    if isinstance(a["rope"], Rope) and a["rope"].scaling not in ROPE_SCALINGS:
        p.append(f"attribute rope has scaling={a['rope'].scaling!r}, not one of {', '.join(ROPE_SCALINGS)}")
    if a["qk_rope_dim"] % 2:
        p.append(f"qk_rope_dim={a['qk_rope_dim']} is odd: rope rotates pairs")
    parts = {prm.sharding.parts for prm in node.params.values() if not prm.sharding.replicated}
    for n in sorted(parts):
        if a["num_heads"] % n:  # the column splits (q / q_up / kv_up rows, proj columns) hold whole heads
            p.append(f"split {n} ways, but num_heads={a['num_heads']} does not divide by {n}")
    return p


# clamped GLU (gpt-oss; megatron-core activation_func_clamp_value / glu_linear_offset, mlp.py glu()): gated only,
# act(min(gate, clamp)) * (clamp(up, -clamp, clamp) + offset); clamp None = no clamp

_MAMBA_DOC = ("Mamba-2 mixer (Megatron's MambaMixer, megatron/core/ssm/mamba_mixer.py): in_proj split into z, x, B, "
              "C, dt; depthwise causal conv1d (with bias) + SiLU over x, B, C; selective scan with A = -exp(A_log), "
              "dt = softplus(dt + dt_bias), B/C shared by the heads of a group, D skip; gated RMSNorm over groups "
              "of I/num_groups channels (norm_before_gate=False: norm(y * silu(z)) * w, Megatron's only form; "
              "True: norm(y) * w * silu(z)); out_proj")


@op_schema("mamba", 1, {"num_heads": A(int, None), "head_dim": A(int, None), "num_groups": A(int, None),
                        "state_dim": A(int, None), "conv_kernel": A(int, None),
                        "norm_eps": A((int, float), 1e-5),  # Megatron: MambaMixer's RMSNormGated eps=1e-5
                        "norm_before_gate": A(bool, False)},
           _MAMBA_DOC,
           params=[P("in_z", "I H", COLUMN, linear=True), P("in_x", "I H", COLUMN, linear=True),
                   P("in_B", "GN H", COLUMN, linear=True), P("in_C", "GN H", COLUMN, linear=True),
                   P("in_dt", "NH H", COLUMN, linear=True),
                   P("conv_x", "I K", COLUMN), P("conv_B", "GN K", COLUMN), P("conv_C", "GN K", COLUMN),
                   P("conv_x_bias", "I", COLUMN, required=False), P("conv_B_bias", "GN", COLUMN, required=False),
                   P("conv_C_bias", "GN", COLUMN, required=False),
                   P("dt_bias", "NH", COLUMN), P("A_log", "NH", COLUMN), P("D", "NH", COLUMN),
                   P("norm", "I", COLUMN),  # gated RMSNorm weight: TP-split with d_inner, as Megatron does
                   P("out", "H I", ROW, linear=True)],
           dims=lambda a, c: {"H": c.hidden_size, "I": a["num_heads"] * a["head_dim"], "NH": a["num_heads"],
                              "GN": a["num_groups"] * a["state_dim"], "K": a["conv_kernel"]})
def _check_mamba(node, model):
    a, p = node.attrs, []
    nh, g = a["num_heads"], a["num_groups"]
    if nh % g:
        p.append(f"num_heads={nh} is not a multiple of num_groups={g}")
    parts = {prm.sharding.parts for prm in node.params.values() if not prm.sharding.replicated}
    for n in sorted(parts):
        if nh % n or g % n:  # Megatron: each TP rank holds whole heads and whole groups
            p.append(f"split {n} ways, but num_heads={nh} / num_groups={g} do not both divide by {n}")
    return p


