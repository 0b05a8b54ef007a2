"""Replicated tensors of a legacy checkpoint: every TP rank saves its own copy, and the copies can differ.

Norm weights, biases of row-parallel layers, routers and position embeddings are replicated over the
tensor-parallel ranks, and each rank's forward pass uses its own copy. With sequence parallelism (or a bug in
gradient all-reduce) the copies drift apart, and a converter that takes rank 0's copy writes a model that no
rank of the trained model computes. So the lift keeps every copy and the recipe decides, lazily, when a
backend (or the reference executor) reads the tensor:

``check`` (default)  compare the copies when they are read (bit-exact); on a difference raise one error naming
                     the tensor, the ranks and the max |difference|
``rank0``            take rank 0's copy (what Megatron's own converters do)
``mean``             the element-wise mean of the copies, computed in fp32, stored in the checkpoint's dtype

The choice is the lift option ``replicated`` (``mexc compile --replicated``), recorded in the manifest.
"""

from __future__ import annotations

import torch

from ...errors import CheckpointError, UsageError
from ...ir import Recipe, derive
from ...ir.tensors import recipe_op

MODES = ("check", "rank0", "mean")


@recipe_op("replicated", "the copies of one replicated tensor from each TP rank: checked equal, or averaged")
def _replicated():
    def infer(types, what, mode, ranks):
        if len({(t.dtype, t.shape) for t in types}) != 1:
            raise CheckpointError(f"{what}: the TP ranks' copies differ in type: "
                                  f"{', '.join(map(str, types))}",
                                  hint="the TP ranks disagree on a replicated tensor; the checkpoint "
                                       "is inconsistent")
        return types[0]

    def compute(xs, what, mode, ranks):
        ref = xs[0]
        if mode == "mean":
            return torch.stack([x.float() for x in xs]).mean(0).to(ref.dtype)
        worst = None
        for r, x in zip(ranks[1:], xs[1:]):
            if not torch.equal(x, ref):
                d = (x.float() - ref.float()).abs().max().item()
                if worst is None or d > worst[1]:
                    worst = (r, d)
        if worst is not None:
            raise CheckpointError(
                f"{what}: the TP ranks hold different copies of this replicated tensor ({ranks[0]} vs "
                f"{worst[0]}: "
                f"max |difference| {worst[1]:.6g}); each rank computed with its own copy",
                hint="choose one copy explicitly: --replicated rank0 (rank 0's copy) or --replicated mean "
                     "(their mean); the choice is recorded in the manifest")
        return ref

    return infer, compute


def replicated(leaves: list[Recipe], ranks: list[str], what: str, mode: str) -> Recipe:
    """One recipe for the copies ``leaves`` (from rank directories ``ranks``) of the replicated tensor
    ``what``."""
    if mode not in MODES:
        raise UsageError(f"unknown --replicated mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
    if len(leaves) == 1 or mode == "rank0":
        return leaves[0]
    return derive("replicated", *leaves, what=what, mode=mode, ranks=tuple(ranks))


__all__ = ["MODES", "replicated"]
