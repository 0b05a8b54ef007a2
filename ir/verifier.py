"""The IR verifier: every invariant, each violation named by its IR location and a fix."""

from __future__ import annotations

from ..errors import IRError
from .graph import Model
from .ops import OPS
from .tensors import RECIPE_OPS


def problems(model: Model) -> list[str]:
    """All invariant violations of ``model`` (empty when it is well-formed)."""
    out: list[str] = []
    g = model.graph
    par = model.parallel
    defined = set(map(id, g.inputs))
    last_stage = 0
    for i, node in enumerate(g.nodes):
        loc = node.location
        if node.graph is not g:
            out.append(f"{loc}: node.graph does not point at this graph")
        schema = OPS.get(node.op)
        if schema is None:
            out.append(f"{loc}: unknown op {node.op!r} (known: {', '.join(sorted(OPS))})")
            continue
        if schema.arity is not None and len(node.inputs) != schema.arity:
            out.append(f"{loc}: takes {schema.arity} input(s), has {len(node.inputs)}")
        for v in node.inputs:
            if id(v) not in defined:
                out.append(f"{loc}: uses {v!r} before it is defined (nodes must be in topological order)")
            if node not in v.uses:
                out.append(f"{loc}: missing from the uses of its input {v!r}")
        defined.add(id(node.output))
        for k, val in node.attrs.items():
            if k not in schema.attrs:
                out.append(f"{loc}: unknown attribute {k!r} (known: {', '.join(schema.attrs)})")
            elif val is not None and not isinstance(val, schema.attrs[k].types):
                out.append(f"{loc}: attribute {k}={val!r} has the wrong type")
            elif schema.attrs[k].choices is not None and val not in schema.attrs[k].choices:
                choices = ", ".join(map(repr, schema.attrs[k].choices))
                out.append(f"{loc}: attribute {k}={val!r} is not one of {choices}")
        missing = [k for k in schema.attrs if k not in node.attrs]
        if missing:
            out.append(f"{loc}: missing attributes {missing}")
            continue
        out += [f"{loc}: {p}" for p in schema.check(node, model)]
        # parallel layout
        if not 0 <= node.stage < par.pp:
            out.append(f"{loc}: stage {node.stage} outside [0, {par.pp})")
        if node.stage < last_stage:
            out.append(f"{loc}: stage {node.stage} after stage {last_stage} (stages must not go back)")
        last_stage = max(last_stage, node.stage)
        for name, p in node.params.items():
            s = p.sharding
            if s.dim is None:
                continue
            want = par.tp if s.axis == "tp" else par.ep
            if s.parts != want:
                out.append(f"{loc}: param {name!r} is split {s.parts} ways on {s.axis} but the model has "
                           f"{s.axis}={want} (run reshard)")
                continue
            try:
                RECIPE_OPS["shard"].infer([p.type], dim=s.dim, parts=s.parts, index=0)
            except IRError as e:
                out.append(f"{loc}: param {name!r} {p.type} cannot be {s}: {e.message}")
    for n in g.find("embedding"):
        if n.stage != 0:
            out.append(f"{n.location}: the embedding must be on stage 0")
    for n in g.find("lm_head"):
        if n.stage != par.pp - 1:
            out.append(f"{n.location}: lm_head must be on the last stage ({par.pp - 1})")
    if len(g.outputs) != 1 or id(g.outputs[0]) not in defined:
        out.append("graph: must return exactly one defined value (the logits)")
    layers = sorted({n.layer for n in g.nodes if n.layer is not None})
    if layers != list(range(model.config.num_layers)):
        out.append(f"graph: layers {layers} do not match num_layers={model.config.num_layers}")
    return out


def verify(model: Model, *, context: str = "") -> None:
    """Raise :class:`IRError` listing the violations on one line: the first 3 joined with '; ', then
    "(N more)" (the CLI prints one ``error:`` line; :func:`problems` gives them all)."""
    found = problems(model)
    if found:
        head = f"IR verification failed{' ' + context if context else ''}: {len(found)} problem(s): "
        more = f" ({len(found) - 3} more)" if len(found) > 3 else ""
        raise IRError(head + "; ".join(" ".join(p.split()) for p in found[:3]) + more,
                      hint="the first problem is usually the cause; --print-ir-after=all shows the IR")
