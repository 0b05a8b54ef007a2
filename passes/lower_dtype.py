"""lower-dtype: cast float weights to the target dtype (lazy casts), keeping sensitive weights in fp32."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from ..ir import DType, Model, derive
from ..ir.ops import NORM, ROUTER, param_spec
from .infra import Pass, PassResult, register_pass


@register_pass("lower-dtype")
@dataclass
class LowerDType(Pass):
    """Cast float weights to bf16/fp16/fp32; norms and the MoE router may stay fp32 (options).

    Which weights are norms or routers is their declared role (:mod:`mexc.ir.ops`)."""

    to: Literal["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"] = "bf16"
    keep_norms_fp32: bool = False
    keep_router_fp32: bool = True

    def run(self, model: Model) -> PassResult:
        target = DType.parse(self.to)
        n = 0
        for node, name, p in model.graph.params():
            if not p.type.dtype.is_float or p.type.dtype == DType.f8e4m3 or name.endswith("_scale"):
                continue
            spec = param_spec(node.op, name)
            role = spec.role if spec is not None else None
            keep = (self.keep_norms_fp32 and role == NORM) or (self.keep_router_fp32 and role == ROUTER)
            want = DType.f32 if keep else target
            if p.type.dtype != want:
                p.source = derive("cast", p.source, dtype=want.value)
                n += 1
        changed = model.config.dtype != target
        model.config = dataclasses.replace(model.config, dtype=target)
        return PassResult(n > 0 or changed, {"cast": n})
