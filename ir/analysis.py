"""Structural analyses over the layer graph."""

from __future__ import annotations

from .graph import Model, Node


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
            elif "attention" in users:
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


def is_parallel_block(model: Model, layer: int) -> bool:
    """True when attention and MLP of ``layer`` read the same block input (Falcon/GPT-J style)."""
    nodes = [n for n in model.graph.nodes if n.layer == layer]
    adds = [n for n in nodes if n.op == "add"]
    return any(len(a.inputs) >= 3 for a in adds)


def has_parallel_blocks(model: Model) -> bool:
    """True when any layer is a parallel attention + MLP block (a residual add of three inputs)."""
    return any(len(n.inputs) > 2 for n in model.graph.find("add"))


def parallel_block_norms(model: Model, layer: int) -> tuple[int | None, str]:
    """``(norms, "")`` when ``layer`` is exactly ``x + attn(norm(x)) + mlp(norm'(x))`` (``norms`` = 1 when both
    branches read one norm, 2 for two); ``(None, why not)`` otherwise."""
    nodes = [n for n in model.graph.nodes if n.layer == layer]
    adds = [n for n in nodes if n.op == "add"]
    attn = next((n for n in nodes if n.op == "attention"), None)
    mlp = next((n for n in nodes if n.op == "mlp"), None)
    if len(adds) != 1 or len(adds[0].inputs) != 3 or attn is None or mlp is None:
        return None, "not one parallel attention + MLP block"
    a_in, m_in = attn.inputs[0].producer, mlp.inputs[0].producer
    if a_in is None or m_in is None or a_in.op != "norm" or m_in.op != "norm":
        return None, "attention and MLP must read a norm of the block input"
    x, ins = a_in.inputs[0], adds[0].inputs
    norms = [n for n in nodes if n.op == "norm"]
    if m_in.inputs[0] is not x or len(norms) != len({a_in, m_in}) or \
            {id(v) for v in ins} != {id(x), id(attn.output), id(mlp.output)}:
        return None, "attention and MLP norms must both read the block input"
    return len({a_in, m_in}), ""
