"""canonicalize and trim-vocab: normal forms backends expect."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import PassError
from ..ir import Model, Param, derive
from ..ir.ops import VOCAB, param_spec
from .infra import Pass, PassResult, register_pass


@register_pass("canonicalize")
@dataclass
class Canonicalize(Pass):
    """Fold zero-centered gamma into norm weights (w + 1); tie or untie the output head (options)."""

    fold_gamma: bool = True
    tie: bool = False
    untie: bool = False

    def requires(self, model):
        return ["tie and untie are exclusive"] if self.tie and self.untie else []

    def run(self, model: Model) -> PassResult:
        stats = {"folded": 0, "tied": 0, "untied": 0}
        if self.fold_gamma:
            for node in model.graph.find("norm"):
                if node.attrs["zero_centered"]:
                    p = node.params["weight"]
                    p.source = derive("add_scalar", p.source, value=1.0)
                    node.attrs["zero_centered"] = False
                    stats["folded"] += 1
        emb = next(model.graph.find("embedding"), None)
        for head in model.graph.find("lm_head"):
            if self.tie and not head.attrs["tied"] and emb is not None:
                head.params["weight"] = Param(emb.params["word"].source, head.params["weight"].sharding)
                head.attrs["tied"] = True
                stats["tied"] += 1
            if self.untie and head.attrs["tied"]:
                head.attrs["tied"] = False
                stats["untied"] += 1
        return PassResult(any(stats.values()), stats)


def _vocab(op: str, name: str) -> bool:
    spec = param_spec(op, name)
    return spec is not None and spec.role == VOCAB


@register_pass("trim-vocab")
@dataclass
class TrimVocab(Pass):
    """Cut Megatron's vocab padding: embedding and lm_head rows beyond `size` (the tokenizer's vocab)."""

    size: int = 0

    def requires(self, model):
        if self.size <= 0:
            return [f"size must be a positive vocab size, got {self.size}"]
        out = []
        for node, name, p in model.graph.params():
            if _vocab(node.op, name) and p.type.shape[0] < self.size:
                out.append(f"{node.location}: {name} has {p.type.shape[0]} rows, fewer than size={self.size}")
        return out

    def run(self, model: Model) -> PassResult:
        n = 0
        for node, name, p in model.graph.params():
            if _vocab(node.op, name) and p.type.shape[0] != self.size:
                if p.sharding.dim == 0:
                    raise PassError(f"{node.location}: trim-vocab must run before reshard splits the vocab",
                                    hint="put trim-vocab before reshard in the pipeline")
                p.source = derive("slice", p.source, dim=0, start=0, stop=self.size)
                n += 1
        changed = model.config.vocab_size != self.size
        model.config = dataclasses.replace(model.config, vocab_size=self.size)
        return PassResult(n > 0 or changed, {"trimmed": n})
