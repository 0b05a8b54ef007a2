"""A small builder for decoder graphs (used by frontends, tests and user code)."""

from __future__ import annotations

from typing import Any

from .graph import Model, Node, Param, Value
from .ops import OPS, default_attrs
from .tensors import Recipe
from .types import ModelConfig, Sharding
from ..errors import IRError


class Builder:
    """Appends nodes in order; attributes not given take the op's defaults; params may be Recipes."""

    def __init__(self, config: ModelConfig, **model_kw):
        self.model = Model(config, **model_kw)

    @property
    def input_ids(self) -> Value:
        return self.model.graph.inputs[0]

    def node(self, op: str, *inputs: Value, layer: int | None = None, stage: int = 0,
             params: dict[str, Recipe | Param | None] | None = None, **attrs: Any) -> Value:
        if op not in OPS:
            raise IRError(f"unknown op {op!r}", hint=f"known: {', '.join(sorted(OPS))}")
        full = default_attrs(op)
        full.update(attrs)
        ps = {k: (v if isinstance(v, Param) else Param(v)) for k, v in (params or {}).items() if v is not None}
        return self.model.graph.append(Node(op, inputs, full, ps, layer=layer, stage=stage))

    def output(self, v: Value) -> Model:
        self.model.graph.outputs = [v]
        return self.model


def shard_all(model: Model, rules: dict[tuple[str, str], Sharding]) -> None:
    """Set shardings from a (op, param) -> Sharding table (params not in it become replicated)."""
    for node, name, p in model.graph.params():
        p.sharding = rules.get((node.op, name), Sharding())
