"""relayout-qkv: change the row layout of fused QKV weights and biases (a format transform only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..ir import Model, derive
from .infra import Pass, PassResult, register_pass

_ALIASES = {"megatron": "grouped", "grouped": "grouped", "concat": "concat"}


@register_pass("relayout-qkv")
@dataclass
class RelayoutQKV(Pass):
    """Re-layout fused QKV between Megatron's group-interleaved rows and [Q;K;V] (GQA/MQA aware)."""

    to: Literal["concat", "megatron", "grouped"] = "concat"

    def run(self, model: Model) -> PassResult:
        want = _ALIASES[self.to]
        n = 0
        for node in model.graph.find("attention"):
            for p in node.params.values():  # qkv, its bias, and the per-row scales of a quantized qkv
                if p.type.layout is not None and p.type.layout.kind != want:
                    p.source = derive("regroup_qkv", p.source, to=want)
                    n += 1
        return PassResult(n > 0, {"relayout": n})

    def ensures(self, model):
        want = _ALIASES[self.to]
        return [f"{n.location}: {k} still {p.type.layout}" for n in model.graph.find("attention")
                for k, p in n.params.items() if p.type.layout is not None and p.type.layout.kind != want]
