"""The layer op set and its schemas.

| op          | inputs         | attrs                                                          | params                         |
|-------------|----------------|----------------------------------------------------------------|--------------------------------|
| embedding   | token ids      | scale (1.0; Gemma: sqrt(hidden))                               | word [V',H], position? [P,H]   |
| norm        | x              | kind (layernorm/rmsnorm), eps, zero_centered                   | weight [H], bias? [H]          |
| attention   | x              | num_heads, num_kv_heads, head_dim, position (rope/none), rope | qkv (QKV-typed) or q,k,v;      |
|             |                |                                                                | qkv_bias / q_bias,k_bias,v_bias;|
|             |                |                                                                | proj [H,nh*d], proj_bias?;     |
|             |                |                                                                | q_norm?, k_norm? [d]           |
| mlp         | x              | activation, gated                                              | gate,up [F,H] (gated) or fc1;  |
|             |                |                                                                | fc2 [H,F]; *_bias?             |
| moe         | x              | num_experts, top_k, activation, gated, score, norm_topk,       | router [E,H]; gate,up [E,F,H]  |
|             |                | pre_softmax, topk_scale                                        | or fc1; fc2 [E,H,F]            |
| add         | x, y, ...      |                                                                | (residual sum)                 |
| lm_head     | x              | tied                                                           | weight [V',H]                  |

Residual connections are explicit ``add`` nodes, so a parallel block (Falcon: attention and MLP off one
normalized input) is just a different wiring, not a special case.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .types import Rope

ACTIVATIONS = ("gelu", "gelu-tanh", "relu", "squared-relu", "silu", "quick-gelu")
NORM_KINDS = ("layernorm", "rmsnorm")


@dataclass(frozen=True)
class OpSchema:
    name: str
    arity: int | None                       # None = variadic (>= 2)
    attrs: dict[str, tuple[type | tuple, Any]] = field(default_factory=dict)  # name -> (types, default)
    check: Callable | None = None            # (node, model) -> list[str] problems
    doc: str = ""


OPS: dict[str, OpSchema] = {}


def op_schema(name, arity, attrs, doc=""):
    def deco(fn):
        OPS[name] = OpSchema(name, arity, attrs, fn, doc)
        return fn

    return deco


def _shape(node, key):
    p = node.params.get(key)
    return p.type.shape if p is not None else None


def _expect(problems, node, key, shape, required=True):
    s = _shape(node, key)
    if s is None:
        if required:
            problems.append(f"missing param '{key}' (expected shape {list(shape)})")
        return
    if tuple(s) != tuple(shape):
        problems.append(f"param '{key}' has shape {list(s)}, expected {list(shape)}")


def _allowed(problems, node, allowed):
    allowed = (*allowed, *(a + "_scale" for a in allowed))  # quantized weights carry their scales
    extra = set(node.params) - set(allowed)
    if extra:
        problems.append(f"unexpected params {sorted(extra)} (allowed: {sorted(allowed)})")


def _check_vocab_matrix(p, node, model, key):
    """A [vocab rows, hidden] matrix with at least vocab_size rows (padding beyond it is allowed)."""
    H = model.config.hidden_size
    w = _shape(node, key)
    if w is None or len(w) != 2 or w[1] != H:
        p.append(f"param '{key}' must be [vocab, {H}], got {w}")
    elif w[0] < model.config.vocab_size:
        p.append(f"{node.op} has {w[0]} rows, fewer than vocab_size={model.config.vocab_size}")


@op_schema("embedding", 1, {"scale": ((int, float), 1.0)}, "token (+ learned position) embedding")
def _check_embedding(node, model):
    p = []
    H = model.config.hidden_size
    _check_vocab_matrix(p, node, model, "word")
    pos = _shape(node, "position")
    if pos is not None and (len(pos) != 2 or pos[1] != H):
        p.append(f"param 'position' must be [positions, {H}], got {pos}")
    _allowed(p, node, ("word", "position"))
    return p


@op_schema("norm", 1, {"kind": (str, "rmsnorm"), "eps": ((int, float), 1e-5), "zero_centered": (bool, False)},
           "LayerNorm or RMSNorm; zero_centered: the stored gamma is (weight - 1)")
def _check_norm(node, model):
    p = []
    if node.attrs["kind"] not in NORM_KINDS:
        p.append(f"unknown norm kind {node.attrs['kind']!r} (use {NORM_KINDS})")
    w = _shape(node, "weight")
    dim = node.attrs.get("dim") or (w[0] if w else model.config.hidden_size)
    _expect(p, node, "weight", (dim,))
    _expect(p, node, "bias", (dim,), required=False)
    if node.attrs["kind"] == "rmsnorm" and "bias" in node.params:
        p.append("rmsnorm has no bias")
    _allowed(p, node, ("weight", "bias"))
    return p


@op_schema("attention", 1, {"num_heads": (int, None), "num_kv_heads": (int, None), "head_dim": (int, None),
                            "position": (str, "rope"), "rope": (Rope, Rope()), "qk_norm": (str, "none"),
                            "softmax_scale": ((int, float, type(None)), None)},
           "causal self-attention, MHA/GQA/MQA")
def _check_attention(node, model):
    p = []
    a = node.attrs
    H, nh, nkv, d = model.config.hidden_size, a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if not all(isinstance(x, int) and x > 0 for x in (nh, nkv, d)):
        return [f"num_heads/num_kv_heads/head_dim must be positive ints, got {nh}/{nkv}/{d}"]
    if nh % nkv:
        p.append(f"num_heads={nh} is not a multiple of num_kv_heads={nkv}")
    if a["position"] not in ("rope", "none"):
        p.append(f"unknown position {a['position']!r} (learned positions live on the embedding)")
    if "qkv" in node.params:
        t = node.params["qkv"].type
        if t.layout is None:
            p.append("param 'qkv' has no QKV layout in its type")
        elif (t.layout.q_heads, t.layout.kv_heads, t.layout.head_dim) != (nh, nkv, d):
            p.append(f"qkv layout {t.layout} disagrees with attrs heads={nh} kv={nkv} d={d}")
        _expect(p, node, "qkv", ((nh + 2 * nkv) * d, H))
        if "qkv_bias" in node.params:
            bt = node.params["qkv_bias"].type
            if bt.layout != t.layout:
                p.append(f"qkv_bias layout {bt.layout} differs from qkv layout {t.layout}")
            _expect(p, node, "qkv_bias", ((nh + 2 * nkv) * d,))
        qkv_names = ("qkv", "qkv_bias")
    else:
        _expect(p, node, "q", (nh * d, H))
        _expect(p, node, "k", (nkv * d, H))
        _expect(p, node, "v", (nkv * d, H))
        for n, rows in (("q_bias", nh * d), ("k_bias", nkv * d), ("v_bias", nkv * d)):
            _expect(p, node, n, (rows,), required=False)
        qkv_names = ("q", "k", "v", "q_bias", "k_bias", "v_bias")
    _expect(p, node, "proj", (H, nh * d))
    _expect(p, node, "proj_bias", (H,), required=False)
    _expect(p, node, "q_norm", (d,), required=False)
    _expect(p, node, "k_norm", (d,), required=False)
    _allowed(p, node, (*qkv_names, "proj", "proj_bias", "q_norm", "k_norm"))
    return p


@op_schema("mlp", 1, {"activation": (str, "gelu"), "gated": (bool, False)},
           "dense MLP: fc2(act(fc1 x)), or gated fc2(act(gate x) * up x)")
def _check_mlp(node, model):
    p = []
    H = model.config.hidden_size
    if node.attrs["activation"] not in ACTIVATIONS:
        p.append(f"unknown activation {node.attrs['activation']!r} (use {ACTIVATIONS})")
    fc2 = _shape(node, "fc2")
    if fc2 is None or len(fc2) != 2 or fc2[0] != H:
        return p + [f"param 'fc2' must be [{H}, ffn], got {fc2}"]
    F = fc2[1]
    names = ["fc2", "fc2_bias"]
    ins = ("gate", "up") if node.attrs["gated"] else ("fc1",)
    for n in ins:
        _expect(p, node, n, (F, H))
        _expect(p, node, n + "_bias", (F,), required=False)
        names += [n, n + "_bias"]
    _expect(p, node, "fc2_bias", (H,), required=False)
    _allowed(p, node, names)
    return p


@op_schema("moe", 1, {"num_experts": (int, None), "top_k": (int, 2), "activation": (str, "silu"),
                      "gated": (bool, True), "score": (str, "softmax"), "pre_softmax": (bool, False),
                      "norm_topk": (bool, False), "topk_scale": ((int, float), 1.0)},
           "mixture of experts: router, top-k, expert MLPs (Mixtral: softmax over top-k logits); the top-k "
           "routing weights are multiplied by topk_scale (Megatron's moe_router_topk_scaling_factor)")
def _check_moe(node, model):
    p = []
    H, E = model.config.hidden_size, node.attrs["num_experts"]
    if not isinstance(E, int) or E < 1:
        return [f"num_experts must be a positive int, got {E}"]
    if not 1 <= node.attrs["top_k"] <= E:
        p.append(f"top_k={node.attrs['top_k']} outside [1, {E}]")
    _expect(p, node, "router", (E, H))
    fc2 = _shape(node, "fc2")
    if fc2 is None or len(fc2) != 3 or fc2[:2] != (E, H):
        return p + [f"param 'fc2' must be [{E}, {H}, ffn], got {fc2}"]
    F = fc2[2]
    ins = ("gate", "up") if node.attrs["gated"] else ("fc1",)
    for n in ins:
        _expect(p, node, n, (E, F, H))
    _allowed(p, node, ("router", "fc2", *ins))
    return p


@op_schema("add", None, {}, "residual sum of two or more activations")
def _check_add(node, model):
    return [] if len(node.inputs) >= 2 else ["add needs at least two inputs"]


@op_schema("lm_head", 1, {"tied": (bool, False)}, "output projection to (padded) vocab logits")
def _check_lm_head(node, model):
    p = []
    _check_vocab_matrix(p, node, model, "weight")
    _allowed(p, node, ("weight",))
    return p


def default_attrs(op: str) -> dict[str, Any]:
    return {k: d for k, (_, d) in OPS[op].attrs.items()}
