"""reshard: lay the model out for a target tensor / pipeline / expert parallel size (a distribution transform).

IR weights are always logical (the frontend's recipes already merged the source's TP/PP/VP/EP shards, gated
fc1 halves per source shard included), so re-sharding is: set each param's :class:`Sharding` from its
declared role (:func:`split_of`), assign pipeline stages, and pad the vocab rows the target TP must split.
Backends materialize ``shard(...)`` of each param per rank; a fused QKV in the ``concat`` layout is split
into per-rank ``[Q_r; K_r; V_r]`` with KV heads replicated when tp exceeds them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PassError
from ..ir import Model, Sharding, derive
from ..ir.ops import EXPERT, VOCAB, param_spec
from .infra import Pass, PassResult, register_pass


def split_of(op: str, name: str, *, ep: int = 1, parallel_embedding: bool = False) -> tuple[int | None, str]:
    """``(dim, axis)`` a param of ``op`` is split on, from its declaration (:mod:`mexc.ir.ops`): column
    params on their output rows, row params on their input columns (their bias stays replicated, added once
    after the reduction), vocab rows (the embedding's only with ``parallel_embedding``); experts on dim 0
    over ``ep`` ranks when ``ep > 1``, else each expert's FFN over TP. ``dim`` None = replicated."""
    spec = param_spec(op, name)
    if spec is None or (spec.opt_in == "parallel_embedding" and not parallel_embedding):
        return None, "tp"
    if spec.role == EXPERT and ep > 1:
        return spec.split_dim(ep=True), "ep"
    return spec.split_dim(), "tp"


def pp_layers(num_layers: int, pp: int) -> list[range]:
    """TensorRT-LLM's rule: the first ``num_layers % pp`` stages get one extra layer."""
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@register_pass("reshard")
@dataclass
class Reshard(Pass):
    """Set the target TP/PP/EP layout: shard rules per param, pipeline stages, vocab padding for TP."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    parallel_embedding: bool = False

    def __post_init__(self):
        for k in ("tp", "pp", "ep"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise PassError(f"reshard: {k} must be a positive integer, got {v!r}",
                                hint=f"e.g. reshard{{{k}=2}}")

    def requires(self, model: Model) -> list[str]:
        out = []
        L = model.config.num_layers
        if self.pp > L:
            out.append(f"pp={self.pp} exceeds the {L} layers (each stage needs at least one layer)")
        if self.ep > 1 and self.ep != self.tp:
            out.append(f"ep={self.ep} must equal tp={self.tp} (TensorRT-LLM: moe_tp * moe_ep == tp)")
        if self.ep > 1 and not any(model.graph.find("moe")):
            out.append(f"ep={self.ep} on a model without experts")
        for n in model.graph.find("attention"):
            nh, nkv = n.attrs["num_heads"], n.attrs["num_kv_heads"]
            if nh % self.tp:
                out.append(f"{n.location}: {nh} attention heads do not split over tp={self.tp}")
            elif nkv % self.tp and self.tp % nkv:
                out.append(f"{n.location}: {nkv} KV heads cannot be spread over tp={self.tp} "
                           f"(tp must divide them or be a multiple of them)")
            elif "qkv" in n.params and n.params["qkv"].type.layout.kind == "grouped" and nkv % self.tp:
                out.append(f"{n.location}: Megatron-grouped QKV with {nkv} groups cannot split over tp={self.tp}; "
                           f"run relayout-qkv{{to=concat}} before reshard (KV heads are then replicated)")
            elif "q" in n.params and self.tp > nkv:
                out.append(f"{n.location}: separate q/k/v with {nkv} KV heads over tp={self.tp}: run fuse-qkv first")
        for n in model.graph.find(("mlp", "moe")):
            for name, p in n.params.items():
                dim, axis = split_of(n.op, name, ep=self.ep)
                if dim is not None and axis == "tp" and self.tp > 1 and p.type.shape[dim] % self.tp:
                    out.append(f"{n.location}: {name} {p.type} dim {dim} does not split over tp={self.tp}")
        return out

    def run(self, model: Model) -> PassResult:
        stats = {"sharded": 0, "padded": 0, "unpadded": 0}
        old = model.parallel
        model.parallel = type(old)(tp=self.tp, pp=self.pp, ep=self.ep)
        for node in model.graph.nodes:
            for name, p in list(node.params.items()):
                if name.endswith("_scale"):
                    continue
                spec = param_spec(node.op, name)
                vocab = spec is not None and spec.role == VOCAB
                if p.source.op == "pad" and vocab:
                    p.source = p.source.inputs[0]  # an earlier reshard's vocab padding: pad for this layout
                    stats["unpadded"] += 1
                dim, axis = split_of(node.op, name, ep=self.ep, parallel_embedding=self.parallel_embedding)
                parts = self.ep if axis == "ep" else self.tp
                if dim is None or parts == 1:
                    new = Sharding()
                else:
                    new = Sharding(dim, parts, axis)
                    if vocab:
                        rows = p.type.shape[0]
                        target = -(-rows // parts) * parts
                        if target != rows:
                            p.source = derive("pad", p.source, dim=0, size=target)
                            stats["padded"] += 1
                if new != p.sharding:
                    stats["sharded"] += 1
                p.sharding = new
                scale = node.params.get(name + "_scale")
                if scale is not None:
                    scale.sharding = _scale_sharding(new, p.type.shape, scale.type.shape)
        # pipeline stages
        ranges = pp_layers(model.config.num_layers, self.pp)
        stage_of = {layer: s for s, r in enumerate(ranges) for layer in r}
        moved = 0
        seen_layers = False
        for node in model.graph.nodes:
            if node.layer is not None:
                stage, seen_layers = stage_of[node.layer], True
            else:
                stage = self.pp - 1 if seen_layers else 0
            moved += stage != node.stage
            node.stage = stage
        stats["restaged"] = moved
        modified = old != model.parallel or any(stats.values())
        return PassResult(modified, stats)


def _scale_sharding(w: Sharding, wshape, sshape) -> Sharding:
    """Scales of quantized weights follow the weight's split where they have that dim with > 1 entries."""
    if w.dim is None or not sshape:
        return Sharding()
    d = w.dim % len(wshape)
    if d < len(sshape) and sshape[d] > 1 and sshape[d] % w.parts == 0:
        return w
    return Sharding()
