"""The layer op set: each op's attributes and params, declared as data.

| op          | inputs         | attrs                                                          | params                         |
|-------------|----------------|----------------------------------------------------------------|--------------------------------|
| embedding   | token ids      | scale (1.0; Gemma: sqrt(hidden))                               | word [V',H], position? [P,H]   |
| norm        | x              | kind (layernorm/rmsnorm), eps, zero_centered                   | weight [D], bias? [D]          |
| attention   | x              | num_heads, num_kv_heads, head_dim, position (rope/none), rope, | qkv (QKV-typed) or q,k,v;      |
|             |                | qk_norm (none/layernorm/rmsnorm), softmax_scale, window, sinks | qkv_bias / q_bias,k_bias,v_bias;|
|             |                | qk_norm l2 (weightless), output_gate                           | proj [H,nh*d], proj_bias?;     |
|             |                |                                                                | sinks [nh] (sinks)             |
|             |                |                                                                | q_norm, k_norm [d] (qk_norm)   |
|             |                |                                                                | gate [nh*d,H], gate_bias?      |
| mla         | x              | num_heads, kv_lora_rank, qk_head_dim, qk_rope_dim, v_head_dim, | q [Dq,H] or q_down [R,H],      |
|             |                | rope (pairs), latent_norm, latent_norm_eps, softmax_scale      | q_norm [R], q_up [Dq,R];       |
|             |                | (DeepSeek multi-latent attention, see its doc)                 | kv_down, kv_norm, kv_up; proj  |
| mlp         | x              | activation, gated                                              | gate,up [F,H] (gated) or fc1;  |
|             |                |                                                                | fc2 [H,F]; *_bias?             |
| moe         | x              | num_experts, top_k, activation, gated, score, norm_topk,       | router [E,H]; gate,up [E,F,H]  |
|             |                | pre_softmax, topk_scale, shared_expert (none / ungated /       | or fc1; fc2 [E,H,F]; shared_*  |
|             |                | sigmoid-gated), num_groups, group_topk (0: not group-limited), | [S,H] / [H,S]; shared_expert_  |
|             |                | glu_clamp, glu_offset                                          | gate [1,H]; expert_bias [E];   |
|             |                |                                                                | router_bias [E], *_bias?       |
| mamba       | x              | num_heads, head_dim, num_groups, state_dim, conv_kernel,       | in_z,in_x [I,H]; in_B,in_C     |
|             |                | norm_eps, norm_before_gate (Mamba-2 mixer, see its doc)        | [GN,H]; in_dt [NH,H]; conv_*   |
|             |                |                                                                | [.,K] (+bias); dt_bias, A_log, |
|             |                |                                                                | D [NH]; norm [I]; out [H,I]    |
| add         | x, y, ...      |                                                                | (residual sum)                 |
| lm_head     | x              | tied                                                           | weight [V',H]                  |

Residual connections are explicit ``add`` nodes, so a parallel block (Falcon: attention and MLP off one
normalized input) is just a different wiring, not a special case. A hybrid model (Megatron's ``MambaModel`` /
``HybridModel``, Nemotron-H) is the same wiring with one mixer per layer: ``norm -> mamba | attention | mlp |
moe -> add``; :func:`layer_pattern` spells it as Megatron's ``hybrid_override_pattern`` (``M*-E``).

Each param is a :class:`ParamSpec` (name, shape rule, role, linear or not, the attribute values that require
it); the reshard TP/EP rules, quantize's linear weights, lower-dtype's keep-fp32 rule, the shape of a param a
target needs but the IR lacks (:func:`absent_shape`) and the verifier all derive from these declarations
(the Megatron-Bridge ``AutoMapping`` column / row / replicated vocabulary; tinygrad's "the spec is data").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .types import QKVLayout, Rope

# ---------------------------------------------------------------------------------------- enums (closed sets)

ACTIVATIONS = ("gelu", "gelu-tanh", "relu", "squared-relu", "silu", "quick-gelu")
NORM_KINDS = ("layernorm", "rmsnorm")
QK_NORM_KINDS = ("none", *NORM_KINDS, "l2")   # l2: weightless x * rsqrt(mean(x^2) + eps) (Llama 4)
POSITIONS = ("rope", "none")  # learned positions are a param of the embedding
ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")
MOE_SCORES = ("softmax", "sigmoid")
SHARED_EXPERTS = ("none", "ungated", "sigmoid-gated")  # Megatron: moe_shared_expert_intermediate_size, _gate
QKV_LAYOUTS = QKVLayout.KINDS

# ---------------------------------------------------------------------------------------- param roles

COLUMN, ROW, REPLICATED, VOCAB, NORM, ROUTER, EXPERT = (
    "column", "row", "replicated", "vocab", "norm", "router", "expert")
ROLES = (COLUMN, ROW, REPLICATED, VOCAB, NORM, ROUTER, EXPERT)
_SPLIT = {COLUMN: 0, ROW: 1, VOCAB: 0}  # tensor-parallel split dim of a role (others: replicated)


class AttrSpec(NamedTuple):
    """One attribute: accepted python types, default, and (for enums) the closed set of values."""

    types: type | tuple
    default: Any
    choices: tuple | None = None


@dataclass(frozen=True)
class ParamSpec:
    """One weight of an op.

    ``shape``: dim symbols (see :attr:`OpSchema.dims`); a symbol the op does not define is bound by the first
    param (in declaration order) that has it, so every later param must agree. ``V`` means vocab rows (at
    least ``vocab_size``; Megatron pads). ``role``: column (split on output rows), row (split on input
    columns), replicated, vocab (rows split and padded for TP), norm, router, expert (``[E, ...]``: EP splits
    dim 0, TP splits ``within``'s dim of one expert). ``when``: ``(attr, values)``: the param exists exactly
    when the attribute has one of these values. ``alt``: alternative group (a node uses one). ``opt_in``: the
    reshard option that turns the split on (``parallel_embedding``).
    """

    name: str
    shape: tuple[str, ...]
    role: str
    linear: bool = False
    required: bool = True
    when: tuple[str, tuple] | None = None
    alt: str | None = None
    within: str | None = None
    opt_in: str | None = None

    def __post_init__(self):
        assert self.role in ROLES and (self.role != EXPERT) == (self.within is None), self

    def split_dim(self, *, ep: bool = False) -> int | None:
        """The dim the tensor-parallel (or, with ``ep``, expert-parallel) axis splits; None = replicated."""
        if self.role == EXPERT:
            return 0 if ep else (1 + _SPLIT[self.within] if self.within in _SPLIT else None)
        return None if ep else _SPLIT.get(self.role)


@dataclass(frozen=True)
class OpSchema:
    name: str
    arity: int | None                       # None = variadic (>= 2)
    attrs: dict[str, AttrSpec] = field(default_factory=dict)
    check: Callable | None = None           # (node, model) -> list[str] problems beyond the declarations
    doc: str = ""
    params: tuple[ParamSpec, ...] = ()
    dims: Callable | None = None            # (attrs, config) -> {symbol: size} the op defines

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


OPS: dict[str, OpSchema] = {}


def P(name, shape, role, **kw) -> ParamSpec:
    return ParamSpec(name, tuple(shape.split()), role, **kw)


def A(types, default, choices=None) -> AttrSpec:
    return AttrSpec(types, default, choices)


def op_schema(name, arity, attrs, doc="", params=(), dims=None):
    """Register an op; the decorated function checks what the declarations cannot say (problems list)."""

    def deco(fn):
        OPS[name] = OpSchema(name, arity, dict(attrs), _checker(fn, dims), doc, tuple(params), dims)
        return fn

    return deco


def _checker(extra, dims):
    def check(node, model):
        if dims is not None and _declared_dims(node, model.config) is None:
            ints = _int_attrs(node.op)
            what = "positive ints" if len(ints) > 1 else "a positive int"
            got = "/".join(str(node.attrs[k]) for k in ints)
            return [f"{'/'.join(ints)} must be {what}, got {got}"]
        return check_params(node, model) + extra(node, model)

    return check


# ---------------------------------------------------------------------------------------- the op set

_GATED, _PLAIN = ("gated", (True,)), ("gated", (False,))
_SHARED = ("shared_expert", SHARED_EXPERTS[1:])
_QK = ("qk_norm", NORM_KINDS)


@op_schema("embedding", 1, {"scale": A((int, float), 1.0)}, "token (+ learned position) embedding",
           params=[P("word", "V H", VOCAB, opt_in="parallel_embedding"),
                   P("position", "P H", REPLICATED, required=False)],
           dims=lambda a, c: {"H": c.hidden_size})
def _check_embedding(node, model):
    return []


@op_schema("norm", 1, {"kind": A(str, "rmsnorm", NORM_KINDS), "eps": A((int, float), 1e-5),
                       "zero_centered": A(bool, False)},
           "LayerNorm or RMSNorm; zero_centered: the stored gamma is (weight - 1)",
           params=[P("weight", "D", NORM),
                   P("bias", "D", NORM, required=False, when=("kind", ("layernorm",)))],
           dims=lambda a, c: {})
def _check_norm(node, model):
    return []


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
_GLU = {"glu_clamp": A((int, float, type(None)), None), "glu_offset": A((int, float), 0.0)}


@op_schema("mlp", 1, {"activation": A(str, "gelu", ACTIVATIONS), "gated": A(bool, False), **_GLU},
           "dense MLP: fc2(act(fc1 x)), or gated fc2(act(gate x) * up x) (glu_clamp / glu_offset: see _GLU)",
           params=[P("fc2", "H F", ROW, linear=True),
                   P("fc2_bias", "H", REPLICATED, required=False),
                   P("gate", "F H", COLUMN, linear=True, when=_GATED),
                   P("up", "F H", COLUMN, linear=True, when=_GATED),
                   P("fc1", "F H", COLUMN, linear=True, when=_PLAIN),
                   P("gate_bias", "F", COLUMN, required=False, when=_GATED),
                   P("up_bias", "F", COLUMN, required=False, when=_GATED),
                   P("fc1_bias", "F", COLUMN, required=False, when=_PLAIN)],
           dims=lambda a, c: {"H": c.hidden_size})
def _check_mlp(node, model):
    return _check_glu(node)


def _check_glu(node) -> list[str]:
    a = node.attrs
    if (a["glu_clamp"] is not None or a["glu_offset"]) and not a["gated"]:
        return ["glu_clamp / glu_offset need gated=True (they clamp and offset a GLU's two halves)"]
    return [] if a["glu_clamp"] is None or a["glu_clamp"] > 0 else [f"glu_clamp={a['glu_clamp']} must be > 0"]


@op_schema("moe", 1, {"num_experts": A(int, None), "top_k": A(int, 2),
                      "activation": A(str, "silu", ACTIVATIONS), "gated": A(bool, True),
                      "score": A(str, "softmax", MOE_SCORES), "pre_softmax": A(bool, False),
                      "norm_topk": A(bool, False), "topk_scale": A((int, float), 1.0),
                      "shared_expert": A(str, "none", SHARED_EXPERTS),
                      "num_groups": A(int, 0), "group_topk": A(int, 0), **_GLU},
           "mixture of experts: router, top-k, expert MLPs (Mixtral: softmax over top-k logits); the top-k "
           "routing weights are multiplied by topk_scale (Megatron's moe_router_topk_scaling_factor); plus, with "
           "shared_expert, an always-on MLP of the same activation/gating (Megatron's SharedExpertMLP, "
           "megatron/core/transformer/moe/shared_experts.py), its output times sigmoid(x . shared_expert_gate) "
           "when sigmoid-gated (moe_shared_expert_gate); expert_bias (sigmoid only) is added to the scores that "
           "choose the experts, not to their weights; num_groups / group_topk: the experts are chosen within the "
           "group_topk groups whose best top_k/group_topk scores sum highest (Megatron's group_limited_topk)",
           params=[P("router", "E H", ROUTER),
                   P("fc2", "E H F", EXPERT, linear=True, within=ROW),
                   P("gate", "E F H", EXPERT, linear=True, within=COLUMN, when=_GATED),
                   P("up", "E F H", EXPERT, linear=True, within=COLUMN, when=_GATED),
                   P("fc1", "E F H", EXPERT, linear=True, within=COLUMN, when=_PLAIN),
                   P("shared_fc2", "H S", ROW, linear=True, when=_SHARED),
                   P("shared_gate", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_up", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_fc1", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_expert_gate", "U H", REPLICATED, when=("shared_expert", ("sigmoid-gated",))),
                   P("expert_bias", "E", ROUTER, required=False, when=("score", ("sigmoid",))),
                   # biases (gpt-oss; Megatron add_bias_linear): router logits + router_bias; each expert's fc2
                   # bias is scaled by its routing weight like its output (megatron-core MLP per_token_scale)
                   P("router_bias", "E", ROUTER, required=False),
                   P("gate_bias", "E F", EXPERT, required=False, within=COLUMN, when=_GATED),
                   P("up_bias", "E F", EXPERT, required=False, within=COLUMN, when=_GATED),
                   P("fc1_bias", "E F", EXPERT, required=False, within=COLUMN, when=_PLAIN),
                   P("fc2_bias", "E H", EXPERT, required=False, within=REPLICATED)],
           dims=lambda a, c: {"H": c.hidden_size, "E": a["num_experts"], "U": 1})
def _check_moe(node, model):
    E, k = node.attrs["num_experts"], node.attrs["top_k"]
    p = [] if 1 <= k <= E else [f"top_k={k} outside [1, {E}]"]
    G, gk = node.attrs["num_groups"], node.attrs["group_topk"]
    if (G or gk) and not (G >= 1 and 1 <= gk <= G and E % G == 0 and 1 <= k // gk <= E // G and gk * E // G >= k):
        p.append(f"group-limited routing num_groups={G} group_topk={gk} does not fit {E} experts, top_k={k} "
                 "(num_groups divides the experts, 1 <= group_topk <= min(num_groups, top_k), the chosen groups "
                 "hold top_k experts)")
    if node.attrs["shared_expert"] != "none":   # the shared expert is gated (GLU) exactly when the experts are
        want = ("shared_gate", "shared_up") if node.attrs["gated"] else ("shared_fc1",)
        unwanted = ("shared_fc1",) if node.attrs["gated"] else ("shared_gate", "shared_up")
        p += [f"missing param {n!r} (the shared expert of gated={node.attrs['gated']} experts)"
              for n in want if n not in node.params]
        p += [f"param {n!r} does not fit gated={node.attrs['gated']} experts" for n in unwanted if n in node.params]
    return p + _check_glu(node)


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


@op_schema("add", None, {}, "residual sum of two or more activations", dims=lambda a, c: {})
def _check_add(node, model):
    return [] if len(node.inputs) >= 2 else ["add needs at least two inputs"]


@op_schema("lm_head", 1, {"tied": A(bool, False)}, "output projection to (padded) vocab logits",
           params=[P("weight", "V H", VOCAB, linear=True)], dims=lambda a, c: {"H": c.hidden_size})
def _check_lm_head(node, model):
    return []


# ---------------------------------------------------------------------------------------- derived views

# Megatron's hybrid layer symbols (megatron/core/models/hybrid/hybrid_layer_allocation.py, Symbols)
HYBRID_SYMBOLS = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
ATTENTION_OPS = ("attention", "mla")  # the ops that mix tokens through a KV cache


def layer_pattern(graph) -> str | None:
    """The hybrid pattern of a graph whose layers hold one mixer each (``"M-M*-"``), else None (a layer with
    attention and an MLP, or none of the mixers)."""
    ops: dict[int, list[str]] = {}
    for n in graph.nodes:
        if n.layer is not None and n.op in HYBRID_SYMBOLS:
            ops.setdefault(n.layer, []).append(n.op)
    if not ops or any(len(v) != 1 for v in ops.values()):
        return None
    return "".join(HYBRID_SYMBOLS[ops[i][0]] for i in sorted(ops))



def default_attrs(op: str) -> dict[str, Any]:
    return {k: s.default for k, s in OPS[op].attrs.items()}


def param_spec(op: str, name: str) -> ParamSpec | None:
    """The declaration of ``op``'s param ``name`` (None for undeclared names and quantization scales)."""
    schema = OPS.get(op)
    return schema.param(name) if schema is not None else None


def params_with(**match) -> set[tuple[str, str]]:
    """``(op, param)`` pairs whose declaration has these field values, e.g. ``params_with(linear=True)``."""
    return {(op, p.name) for op, s in OPS.items() for p in s.params
            if all(getattr(p, k) == v for k, v in match.items())}


def _int_attrs(op: str) -> list[str]:
    """The size attributes an op's dims are made of (int, no default)."""
    return [k for k, s in OPS[op].attrs.items() if s.default is None and s.types is int]


def _declared_dims(node, config) -> dict[str, int] | None:
    """The op's own dims, or None when the attributes they need are not positive ints."""
    vals = [node.attrs.get(k) for k in _int_attrs(node.op)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        return None
    return dict(OPS[node.op].dims(node.attrs, config))


def bind_dims(node, config) -> dict[str, int]:
    """Every dim symbol of ``node``: the op's own, then free ones (F, D, P, V) from its params in order."""
    env = _declared_dims(node, config) or {}
    for spec in OPS[node.op].params:
        p = node.params.get(spec.name)
        if p is not None and len(p.type.shape) == len(spec.shape):
            for sym, n in zip(spec.shape, p.type.shape):
                env.setdefault(sym, n)
    return env


def absent_shape(node, name: str, config) -> tuple[int, ...] | None:
    """Shape of a declared param ``node`` lacks but a target needs (a zero bias, zero learned positions):
    positions default to ``max_position_embeddings``, vocab rows to ``vocab_size``. None when undeclared."""
    spec = param_spec(node.op, name)
    if spec is None:
        return None
    env = {"P": config.max_position_embeddings, "V": config.vocab_size, **bind_dims(node, config)}
    if any(s not in env for s in spec.shape):
        return None
    return tuple(env[s] for s in spec.shape)


def chosen_alt(node) -> str | None:
    """The alternative group ``node`` uses: the first that has a param present (else the first declared)."""
    alts = list(dict.fromkeys(p.alt for p in OPS[node.op].params if p.alt))
    return next((a for a in alts if any(p.alt == a and p.name in node.params for p in OPS[node.op].params)),
                alts[0] if alts else None)


def check_params(node, model) -> list[str]:
    """Problems of ``node``'s params against its op's declarations: presence (attribute <-> param),
    alternatives, shapes (dim symbols bound consistently), vocab rows."""
    schema, cfg, out = OPS[node.op], model.config, []
    env = _declared_dims(node, cfg) or {}
    alt = chosen_alt(node)
    declared = {p.name for p in schema.params}
    extra = sorted(n for n in node.params if n not in declared and not
                   (n.endswith("_scale") and n[: -len("_scale")] in declared))
    if extra:
        out.append(f"unexpected params {extra} (allowed: {sorted(declared)})")
    for spec in schema.params:
        present = spec.name in node.params
        if spec.alt is not None and spec.alt != alt:
            if present:
                out.append(f"param {spec.name!r} ({spec.alt}) mixed with {alt} params: keep one form")
            continue
        if spec.when is not None:
            attr, values = spec.when
            if node.attrs[attr] not in values:
                if present:
                    want = " or ".join(map(repr, values))
                    out.append(f"param {spec.name!r} needs {attr}={want}, but {attr}={node.attrs[attr]!r} "
                               f"(targets would drop the weight): set {attr}={values[0]!r} (or the value it "
                               f"was trained with), or drop the param")
                continue
        shape = [env.get(s, s) for s in spec.shape]
        if not present:
            if spec.required:
                why = f"; required by {spec.when[0]}={node.attrs[spec.when[0]]!r}" if spec.when else ""
                out.append(f"missing param {spec.name!r} (expected shape {_fmt(shape)}{why})")
            continue
        got = node.params[spec.name].type.shape
        if len(got) != len(shape) or any(isinstance(w, int) and w != g for w, g in zip(shape, got)):
            out.append(f"param {spec.name!r} has shape {list(got)}, expected {_fmt(shape)}")
            continue
        for s, g in zip(spec.shape, got):
            if s == "V" and g < cfg.vocab_size:
                out.append(f"{node.op} has {g} rows, fewer than vocab_size={cfg.vocab_size}")
            env.setdefault(s, g)
    return out


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"
