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
