"""The user pass shown in docs/writing_passes.md (tests/test_pipeline.py checks the two stay equal)."""

from dataclasses import dataclass

from mexc import ir
from mexc.passes import Pass, PassResult, register_pass


@register_pass("keep-norms-fp32")
@dataclass
class KeepNormsFp32(Pass):
    """Keep normalization weights in fp32 (a lazy cast; nothing is loaded)."""

    ops: tuple[str, ...] = ("norm",)

    def requires(self, model: ir.Model) -> list[str]:
        return [] if any(model.graph.find(self.ops)) else [f"the model has no {self.ops} nodes"]

    def run(self, model: ir.Model) -> PassResult:
        n, pinned = 0, []
        for node in model.graph.find(self.ops):
            for name, p in node.params.items():
                if p.type.dtype != ir.f32:
                    p.source = ir.derive("cast", p.source, dtype="f32")
                    n += 1
                pinned.append((node, name))   # a later target cast of these is an error, not silent
        return PassResult(modified=n > 0, stats={"cast": n}, pinned=pinned)
