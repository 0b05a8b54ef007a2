"""fold-moe-scaling: fold the MoE top-k scaling factor into every expert's down projection.

Megatron's router multiplies the top-k routing weights by ``moe_router_topk_scaling_factor`` (DeepSeek's
``routed_scaling_factor``): ``y = sum_e (s * p_e) * fc2_e(act(...))``. The experts are linear in their output
projection and carry no bias in the IR, so ``y = sum_e p_e * (s * fc2_e)(act(...))`` exactly: the pass
rescales ``fc2`` (a lazy ``mul_scalar`` recipe, computed in fp32 when written; nothing is read here) and resets the
``topk_scale`` attribute to 1, which every target can express.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PassError
from ..ir import Model, derive
from ..ir.tensors import recipe_op
from .infra import Pass, PassResult, register_pass


@recipe_op("mul_scalar", "multiply by a constant (computed in fp32, stored in the input's dtype)")
def _mul_scalar():
    def infer(types, value):
        return types[0]

    def compute(xs, value):
        return (xs[0].float() * value).to(xs[0].dtype)

    return infer, compute


@register_pass("fold-moe-scaling")
@dataclass
class FoldMoeScaling(Pass):
    """Fold each MoE node's topk_scale into its experts' fc2 (exact; lazy) and set topk_scale to 1."""

    def run(self, model: Model) -> PassResult:
        n = 0
        for node in model.graph.find("moe"):
            s = float(node.attrs.get("topk_scale", 1.0))
            if s == 1.0:
                continue
            fc2 = node.params["fc2"]
            if not fc2.type.dtype.is_float or "fc2_scale" in node.params:
                raise PassError(f"{node.location}: fc2 is quantized ({fc2.type}); fold the top-k scale first",
                                hint="put fold-moe-scaling before quantize in the pipeline")
            fc2.source = derive("mul_scalar", fc2.source, value=s)
            node.attrs["topk_scale"] = 1.0
            n += 1
        return PassResult(n > 0, {"folded": n})

    def ensures(self, model: Model) -> list[str]:
        return [f"{n.location}: topk_scale is still {n.attrs['topk_scale']}" for n in model.graph.find("moe")
                if n.attrs.get("topk_scale", 1.0) != 1.0]


def has_topk_scale(model: Model) -> bool:
    """True when some MoE node scales its routing weights (backends then add fold-moe-scaling)."""
    return any(n.attrs.get("topk_scale", 1.0) != 1.0 for n in model.graph.find("moe"))


__all__ = ["FoldMoeScaling", "has_topk_scale"]
