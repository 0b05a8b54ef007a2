"""quantize: symmetric weight-only int8 / int4 (per channel or per group) and fp8-e4m3 per-tensor weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..ir import Model, Param, derive
from ..ir.ops import params_with
from .infra import Pass, PassResult, register_pass

# (op, param) pairs that are linear weights [out, in] (or [experts, out, in]): declared in mexc.ir.ops
LINEAR_WEIGHTS: frozenset[tuple[str, str]] = frozenset(params_with(linear=True))


@register_pass("quantize")
@dataclass
class Quantize(Pass):
    """Quantize linear weights: int8-wo / int4-wo (per channel, or per group of group-size) or fp8."""

    scheme: Literal["int8-wo", "int4-wo", "fp8", "fp8-channel"] = "int8-wo"
    group_size: int = 0
    exclude: tuple[str, ...] = ("lm_head",)

    def requires(self, model):
        out = []
        if self.group_size < 0:
            out.append(f"group-size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.scheme.startswith("fp8") and self.group_size:
            out.append("fp8 scales are per tensor or per channel; leave group-size at 0")
        if self.group_size:
            for node, name, p in model.graph.params():
                if (node.op, name) in LINEAR_WEIGHTS and node.op not in self.exclude and p.type.shape[-1] % self.group_size:
                    out.append(f"{node.location}: {name} has {p.type.shape[-1]} input features, not a multiple of "
                               f"group-size {self.group_size}")
        return out

    def run(self, model: Model) -> PassResult:
        n = 0
        for node in model.graph.nodes:
            if node.op in self.exclude:
                continue
            for name in list(node.params):
                p = node.params[name]
                if (node.op, name) not in LINEAR_WEIGHTS or not p.type.dtype.is_float or p.type.dtype.bits == 8:
                    continue
                kw = dict(scheme=self.scheme, group_size=self.group_size)
                src = p.source
                node.params[name] = Param(derive("quantize", src, **kw), p.sharding)
                node.params[name + "_scale"] = Param(derive("quant_scale", src, **kw))
                n += 1
        return PassResult(n > 0, {"quantized": n})
