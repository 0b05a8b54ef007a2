"""Structural analyses over the layer graph: node roles and the decoder-block patterns every backend asks for.

A layer is matched against three patterns (residual sums are ``add`` nodes; a sum of three terms may also be
written as two nested adds):

==================  ====================================================================================
pattern             wiring
==================  ====================================================================================
sequential          ``h = x + attn(n1(x)); out = h + ffn(n2(h))``, ffn an ``mlp`` or a ``moe`` (Llama, GPT)
parallel            ``out = x + attn(n1(x)) + mlp(n2(x))``, ``n1`` may be ``n2`` (Falcon, GPT-J)
moe-shared-expert   ``h = x + attn(n1(x)); out = h + moe(n2(h)) + mlp(n2(h))`` (Qwen2-MoE / DeepSeek-style
                    shared expert, Megatron's ``shared_experts``)
==================  ====================================================================================

:func:`match_block` gives the first pattern that holds, as a :class:`BlockMatch`; backends ask
:func:`is_parallel_block`, :func:`has_parallel_blocks`, :func:`parallel_block_norms` or
:func:`block_kinds`, all built on these matchers, so a shared-expert MoE is never taken for a Falcon block.
"""

from __future__ import annotations

from dataclasses import dataclass

from .graph import Model, Node, Value

SEQUENTIAL, PARALLEL, MOE_SHARED_EXPERT = "sequential", "parallel", "moe-shared-expert"
PATTERNS = (SEQUENTIAL, PARALLEL, MOE_SHARED_EXPERT)


def node_roles(model: Model) -> dict[Node, str]:
    """Name each node's role: embedding, input_norm, attention, post_norm, mlp, moe, residual, final_norm,
    lm_head. A norm is named by what consumes it: the attention's (and, in a parallel block, also the MLP's)
    input is ``input_norm``; a norm feeding only the MLP/MoE is ``post_norm``; the norm after the last layer
    is ``final_norm``."""
    roles: dict[Node, str] = {}
    for n in model.graph.nodes:
        if n.op == "norm":
            users = {u.op for u in n.output.uses}
            if n.layer is None:
                roles[n] = "final_norm"
            elif users & {"attention", "mla"}:
                roles[n] = "input_norm"
            elif users & {"mlp", "moe"}:
                roles[n] = "post_norm"
            else:
                roles[n] = "norm"
        elif n.op == "add":
            roles[n] = "residual"
        else:
            roles[n] = n.op
    return roles


@dataclass(frozen=True)
class BlockMatch:
    """One layer matched to a pattern: its block input ``x``, the norms in order (attention's first; one
    node twice when attention and MLP share it), the attention, the FFN branches (``mlp`` / ``moe``)."""

    kind: str
    layer: int
    x: Value
    norms: tuple[Node, ...]
    attention: Node
    ffn: tuple[Node, ...]

    @property
    def distinct_norms(self) -> int:
        return len(set(self.norms))


def _layer_nodes(model: Model, layer: int) -> list[Node]:
    return [n for n in model.graph.nodes if n.layer == layer]


def _out_add(nodes: list[Node]) -> Node | None:
    """The layer's last residual sum (its output), or None."""
    adds = [n for n in nodes if n.op == "add"]
    return adds[-1] if adds else None


def _terms(add: Node, layer: int) -> tuple[list[Value], list[Node]]:
    """The summed values of ``add`` (same-layer inner adds used only by it flattened), and those adds."""
    terms, inner = [], []
    for v in add.inputs:
        p = v.producer
        if p is not None and p.op == "add" and p.layer == layer and len(v.uses) == 1:
            t, i = _terms(p, layer)
            terms += t
            inner += [p, *i]
        else:
            terms.append(v)
    return terms, inner


def _branch(v: Value, op: tuple[str, ...], layer: int) -> Node | None:
    p = v.producer
    return p if p is not None and p.op in op and p.layer == layer else None


def _norm_of(n: Node, x: Value) -> Node | None:
    """The norm ``n`` reads, when that norm reads ``x``."""
    p = n.inputs[0].producer
    return p if p is not None and p.op == "norm" and p.inputs[0] is x else None


def _split(terms: list[Value], layer: int) -> tuple[list[Value], list[Node]]:
    """(residual terms, branch nodes) of a sum: branches are attention / mlp / moe outputs of this layer."""
    res = [v for v in terms if _branch(v, ("attention", "mla", "mlp", "moe"), layer) is None]
    return res, [v.producer for v in terms if v not in res]


def _exact(nodes: list[Node], used: list[Node]) -> bool:
    """True when the pattern accounts for every node of the layer (no stray node hides a different wiring)."""
    return {id(n) for n in nodes} == {id(n) for n in used}


def _attn_half(model: Model, layer: int, h: Value):
    """``h = x + attn(n1(x))``: (x, n1, attn, add) or None."""
    add = h.producer
    if add is None or add.op != "add" or add.layer != layer or len(add.inputs) != 2:
        return None
    res, br = _split(list(add.inputs), layer)
    if len(res) != 1 or len(br) != 1 or br[0].op not in ("attention", "mla"):
        return None
    n1 = _norm_of(br[0], res[0])
    return None if n1 is None else (res[0], n1, br[0], add)


def match_sequential_block(model: Model, layer: int) -> BlockMatch | None:
    """``h = x + attn(n1(x)); out = h + ffn(n2(h))`` with ffn one ``mlp`` or ``moe``."""
    nodes = _layer_nodes(model, layer)
    out = _out_add(nodes)
    if out is None or len(out.inputs) != 2:
        return None
    res, br = _split(list(out.inputs), layer)
    if len(res) != 1 or len(br) != 1 or br[0].op not in ("mlp", "moe"):
        return None
    first = _attn_half(model, layer, res[0])
    n2 = _norm_of(br[0], res[0])
    if first is None or n2 is None:
        return None
    x, n1, attn, add1 = first
    if not _exact(nodes, [n1, attn, add1, n2, br[0], out]):
        return None
    return BlockMatch(SEQUENTIAL, layer, x, (n1, n2), attn, (br[0],))


def match_parallel_block(model: Model, layer: int) -> BlockMatch | None:
    """``out = x + attn(n1(x)) + mlp(n2(x))`` (one norm or two, both reading the block input ``x``)."""
    return _match_parallel(model, layer)[0]


def _match_parallel(model: Model, layer: int) -> tuple[BlockMatch | None, str]:
    nodes = _layer_nodes(model, layer)
    out = _out_add(nodes)
    attn = [n for n in nodes if n.op == "attention"]
    mlp = [n for n in nodes if n.op == "mlp"]
    if out is None or len(attn) != 1 or len(mlp) != 1 or any(n.op == "moe" for n in nodes):
        return None, "not one parallel attention + MLP block"
    terms, inner = _terms(out, layer)
    res, br = _split(terms, layer)
    if len(terms) != 3 or len(res) != 1 or {id(n) for n in br} != {id(attn[0]), id(mlp[0])}:
        return None, "not one parallel attention + MLP block"
    a_in, m_in = attn[0].inputs[0].producer, mlp[0].inputs[0].producer
    if a_in is None or m_in is None or a_in.op != "norm" or m_in.op != "norm":
        return None, "attention and MLP must read a norm of the block input"
    x = res[0]
    if a_in.inputs[0] is not x or m_in.inputs[0] is not x or \
            not _exact(nodes, [a_in, m_in, attn[0], mlp[0], out, *inner]):
        return None, "attention and MLP norms must both read the block input"
    return BlockMatch(PARALLEL, layer, x, (a_in, m_in), attn[0], (mlp[0],)), ""


def match_moe_shared_expert(model: Model, layer: int) -> BlockMatch | None:
    """``h = x + attn(n1(x)); out = h + moe(n2(h)) + mlp(n2(h))``: routed experts plus an always-on shared
    expert reading the same normalized input. ``ffn`` is ``(moe, mlp)``."""
    nodes = _layer_nodes(model, layer)
    out = _out_add(nodes)
    if out is None:
        return None
    terms, inner = _terms(out, layer)
    res, br = _split(terms, layer)
    moe = [n for n in br if n.op == "moe"]
    mlp = [n for n in br if n.op == "mlp"]
    if len(terms) != 3 or len(res) != 1 or len(moe) != 1 or len(mlp) != 1:
        return None
    first = _attn_half(model, layer, res[0])
    n2 = _norm_of(moe[0], res[0])
    if first is None or n2 is None or _norm_of(mlp[0], res[0]) is not n2:
        return None
    x, n1, attn, add1 = first
    if not _exact(nodes, [n1, attn, add1, n2, moe[0], mlp[0], out, *inner]):
        return None
    return BlockMatch(MOE_SHARED_EXPERT, layer, x, (n1, n2), attn, (moe[0], mlp[0]))


_MATCHERS = {SEQUENTIAL: match_sequential_block, PARALLEL: match_parallel_block,
             MOE_SHARED_EXPERT: match_moe_shared_expert}


def match_block(model: Model, layer: int) -> BlockMatch | None:
    """The first pattern ``layer`` matches (see the module table), or None for any other wiring."""
    for fn in _MATCHERS.values():
        m = fn(model, layer)
        if m is not None:
            return m
    return None


def block_kinds(model: Model) -> dict[int, str | None]:
    """``layer -> pattern name`` (None where the wiring matches no pattern)."""
    layers = sorted({n.layer for n in model.graph.nodes if n.layer is not None})
    out = {}
    for layer in layers:
        m = match_block(model, layer)
        out[layer] = m.kind if m is not None else None
    return out


def is_parallel_block(model: Model, layer: int) -> bool:
    """True when ``layer`` is a parallel block (Falcon/GPT-J), or a wiring no pattern matches whose residual
    sums more than two terms: a candidate a Falcon-class backend must then explain (with
    :func:`parallel_block_norms`) rather than write as a sequential block. A sequential block and a MoE with
    a shared expert are never parallel blocks."""
    m = match_block(model, layer)
    if m is not None:
        return m.kind == PARALLEL
    out = _out_add(_layer_nodes(model, layer))
    return out is not None and len(_terms(out, layer)[0]) >= 3


def has_parallel_blocks(model: Model) -> bool:
    """True when any layer :func:`is_parallel_block`."""
    layers = sorted({n.layer for n in model.graph.find("add") if n.layer is not None})
    return any(is_parallel_block(model, layer) for layer in layers)


def parallel_block_norms(model: Model, layer: int) -> tuple[int | None, str]:
    """``(norms, "")`` when ``layer`` is exactly ``x + attn(norm(x)) + mlp(norm'(x))`` (``norms`` = 1 when
    both branches read one norm, 2 for two); ``(None, why not)`` otherwise."""
    m, why = _match_parallel(model, layer)
    return (m.distinct_norms, "") if m is not None else (None, why)
