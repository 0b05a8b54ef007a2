"""dce: remove nodes whose outputs nothing uses."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import Model
from .infra import Pass, PassResult, register_pass


@register_pass("dce")
@dataclass
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (and so their weights are never written)."""

    def run(self, model: Model) -> PassResult:
        removed = 0
        changed = True
        while changed:
            changed = False
            for node in reversed(model.graph.nodes):
                if not node.output.uses and node.output not in model.graph.outputs:
                    model.graph.remove(node)
                    removed += 1
                    changed = True
        return PassResult(removed > 0, {"removed": removed})
