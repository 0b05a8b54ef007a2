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

from .types import QKVLayout

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


# the other ops register themselves on import (they use the machinery above)
from . import ops_ffn, ops_mixers  # noqa: E402,F401 - registration
