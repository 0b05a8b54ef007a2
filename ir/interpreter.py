"""The reference interpreter: a plain-torch forward pass of an IR model (prefill logits for token ids).

It is the semantic oracle of mexc: every pass is tested by running the model before and after it. With
``simulate_ranks=True`` (the default when the model is laid out for tp > 1 or ep > 1) each tensor-parallel
rank computes with only the shards the target would give it, row-parallel partial sums are reduced and their
bias added once, vocab-parallel logits are gathered; pipeline stages run in order. So a wrong sharding rule
gives wrong logits here, not only in an engine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BackendError
from .graph import Model, Node
from .semantics import (activation, apply_rope, causal_conv1d, gated_rmsnorm, glu, l2_norm, norm, rope_tables,
                        softmax_with_sinks, ssm_scan, visible)
from .tensors import derive
from .types import DType


class _Weights:
    """Materializes params (dequantizing quantized ones) per rank, with a per-run cache."""

    def __init__(self, dtype: torch.dtype):
        self.cache: dict = {}
        self.dtype = dtype

    def get(self, node: Node, name: str, rank: int | None = None) -> torch.Tensor | None:
        p = node.params.get(name)
        if p is None:
            return None
        src = p.source
        if p.type.dtype in (DType.i8, DType.i4, DType.f8e4m3):
            scale = node.params.get(name + "_scale")
            if scale is None:
                raise BackendError(f"{node.location}: quantized param {name!r} has no {name}_scale")
            src = derive("dequantize", src, scale.source, dtype="f32")
        if rank is not None and not p.sharding.replicated:
            src = derive("shard", src, dim=p.sharding.dim, parts=p.sharding.parts, index=rank)
        return src.materialize(self.cache).to(self.dtype)


def _linear(x, w, b=None):
    y = x @ w.t()
    return y + b if b is not None else y


class ReferenceExecutor:
    def __init__(self, model: Model, *, dtype: torch.dtype = torch.float32, simulate_ranks: bool | None = None):
        self.model = model
        self.w = _Weights(dtype)
        self.dtype = dtype
        par = model.parallel
        self.simulate = (par.tp > 1 or par.ep > 1) if simulate_ranks is None else simulate_ranks
        self.tp = par.tp if self.simulate else 1
        self.ep = par.ep if self.simulate else 1

    # ranks ---------------------------------------------------------------------------------------------
    def _ranks(self, node: Node, *names: str) -> list[int | None]:
        if self.tp == 1 or all(node.params[n].sharding.replicated for n in names if n in node.params):
            return [None]
        return list(range(self.tp))

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        pos = position_ids if position_ids is not None else torch.arange(s).expand(b, s)
        env: dict[int, torch.Tensor] = {id(self.model.graph.inputs[0]): input_ids}
        for node in self.model.graph.nodes:  # stages are contiguous and in order
            args = [env[id(v)] for v in node.inputs]
            env[id(node.output)] = getattr(self, "op_" + node.op)(node, *args, pos=pos)
        return env[id(self.model.graph.outputs[0])]

    # ops -----------------------------------------------------------------------------------------------
    def op_embedding(self, node, ids, pos):
        ranks = self._ranks(node, "word")
        if ranks == [None]:
            x = F.embedding(ids, self.w.get(node, "word"))
        else:  # vocab-parallel: each rank looks up its rows, others contribute zeros; all-reduce
            x = 0
            for r in ranks:
                wr = self.w.get(node, "word", r)
                lo = r * wr.shape[0]
                local = ids - lo
                mask = (local < 0) | (local >= wr.shape[0])
                e = F.embedding(local.clamp(0, wr.shape[0] - 1), wr)
                x = x + e.masked_fill(mask[..., None], 0.0)
        if "position" in node.params:
            x = x + F.embedding(pos, self.w.get(node, "position"))
        return x * node.attrs["scale"] if node.attrs["scale"] != 1.0 else x

    def op_norm(self, node, x, pos):
        a = node.attrs
        return norm(x, self.w.get(node, "weight"), self.w.get(node, "bias"), a["kind"], a["eps"],
                     a["zero_centered"])

    def _qkv(self, node, x, r, nh, nkv, d):
        if "qkv" in node.params:
            w, bias = self.w.get(node, "qkv", r), self.w.get(node, "qkv_bias", r)
            y = _linear(x, w, bias)
            layout = node.params["qkv"].type.layout.kind
            if layout == "grouped":
                g = y.view(*y.shape[:2], nkv, nh // nkv + 2, d)
                q = g[..., : nh // nkv, :].reshape(*y.shape[:2], nh, d)
                k, v = g[..., -2, :], g[..., -1, :]
            else:
                q, k, v = y.split([nh * d, nkv * d, nkv * d], -1)
                q, k, v = (t.reshape(*y.shape[:2], -1, d) for t in (q, k, v))
            return q, k, v
        if r is not None and self.tp > node.attrs["num_kv_heads"]:
            raise BackendError(f"{node.location}: separate k/v params cannot be split over more ranks than "
                               "KV heads", hint="run fuse-qkv before reshard")
        q = _linear(x, self.w.get(node, "q", r), self.w.get(node, "q_bias", r))
        k = _linear(x, self.w.get(node, "k", r), self.w.get(node, "k_bias", r))
        v = _linear(x, self.w.get(node, "v", r), self.w.get(node, "v_bias", r))
        return (t.reshape(*x.shape[:2], -1, d) for t in (q, k, v))

    def op_attention(self, node, x, pos):
        a = node.attrs
        nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        qkv_name = "qkv" if "qkv" in node.params else "q"
        ranks = self._ranks(node, qkv_name, "proj")
        out = 0
        for r in ranks:
            lnh = nh if r is None else nh // self.tp
            lkv = nkv if r is None else max(1, nkv // self.tp)
            q, k, v = self._qkv(node, x, r, lnh, lkv, d)
            if a["qk_norm"] == "l2":
                q, k = l2_norm(q, a["qk_norm_eps"]), l2_norm(k, a["qk_norm_eps"])
            elif a["qk_norm"] != "none":
                kind = a["qk_norm"]
                q = norm(q, self.w.get(node, "q_norm"), None, kind, a["qk_norm_eps"], False)
                k = norm(k, self.w.get(node, "k_norm"), None, kind, a["qk_norm_eps"], False)
            if a["position"] == "rope":
                cos, sin = rope_tables(a["rope"], d, pos)
                q = apply_rope(q, cos, sin, a["rope"].interleaved)
                k = apply_rope(k, cos, sin, a["rope"].interleaved)
            k = k.repeat_interleave(lnh // lkv, 2)
            v = v.repeat_interleave(lnh // lkv, 2)
            scale = a["softmax_scale"] or 1.0 / math.sqrt(d)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            s = x.shape[1]
            p = softmax_with_sinks(scores.masked_fill(~visible(s, s, a["window"]), float("-inf")),
                                   self.w.get(node, "sinks", r) if a.get("sinks") else None)
            o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(*x.shape[:2], lnh * d)
            if a["output_gate"]:
                o = o * torch.sigmoid(_linear(x, self.w.get(node, "gate", r), self.w.get(node, "gate_bias", r)))
            out = out + o @ self.w.get(node, "proj", r).t()
        bias = self.w.get(node, "proj_bias")
        return out + bias if bias is not None else out

    def op_mla(self, node, x, pos):
        """Multi-latent attention (ops.py ``mla``) per TP rank: the down projections and latent norms are
        replicated, each rank up-projects its heads; the row-parallel proj's partial sums are reduced."""
        a = node.attrs
        nh, dn, dr, dv = a["num_heads"], a["qk_head_dim"], a["qk_rope_dim"], a["v_head_dim"]
        b, s = x.shape[:2]
        kind, eps = a["latent_norm"], a["latent_norm_eps"]
        kv = _linear(x, self.w.get(node, "kv_down"))
        c, k_pe = kv.split([a["kv_lora_rank"], dr], -1)
        if kind != "none":
            c = norm(c, self.w.get(node, "kv_norm"), None, kind, eps, False)
        qc = None
        if "q_down" in node.params:
            qc = _linear(x, self.w.get(node, "q_down"))
            if kind != "none":
                qc = norm(qc, self.w.get(node, "q_norm"), None, kind, eps, False)
        cos, sin = rope_tables(a["rope"], dr, pos)
        k_pe = apply_rope(k_pe[:, :, None, :], cos, sin, a["rope"].interleaved)
        scale = a["softmax_scale"] or 1.0 / math.sqrt(dn + dr)
        causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
        ranks = self._ranks(node, "q_up" if qc is not None else "q", "kv_up", "proj")
        out = 0
        for r in ranks:
            q = _linear(qc, self.w.get(node, "q_up", r)) if qc is not None else _linear(x, self.w.get(node, "q", r))
            q = q.view(b, s, -1, dn + dr)
            lnh = q.shape[2]
            q_nope, q_pe = q.split([dn, dr], -1)
            q = torch.cat([q_nope, apply_rope(q_pe, cos, sin, a["rope"].interleaved)], -1)
            k_nope, v = _linear(c, self.w.get(node, "kv_up", r)).view(b, s, lnh, dn + dv).split([dn, dv], -1)
            k = torch.cat([k_nope, k_pe.expand(b, s, lnh, dr)], -1)
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            p = scores.masked_fill(causal, float("-inf")).softmax(-1)
            o = torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, s, lnh * dv)
            out = out + o @ self.w.get(node, "proj", r).t()
        bias = self.w.get(node, "proj_bias")
        return out + bias if bias is not None else out

    def op_mlp(self, node, x, pos):
        a = node.attrs
        first = "gate" if a["gated"] else "fc1"
        out = 0
        for r in self._ranks(node, first, "fc2"):
            if a["gated"]:
                h = glu(a["activation"], _linear(x, self.w.get(node, "gate", r), self.w.get(node, "gate_bias", r)),
                        _linear(x, self.w.get(node, "up", r), self.w.get(node, "up_bias", r)),
                        a.get("glu_clamp"), a.get("glu_offset", 0.0))
            else:
                h = activation(a["activation"], _linear(x, self.w.get(node, "fc1", r), self.w.get(node, "fc1_bias", r)))
            out = out + h @ self.w.get(node, "fc2", r).t()
        bias = self.w.get(node, "fc2_bias")
        return out + bias if bias is not None else out

    def op_moe(self, node, x, pos):
        a = node.attrs
        k = a["top_k"]
        logits = x.float() @ self.w.get(node, "router").float().t()
        if "router_bias" in node.params:
            logits = logits + self.w.get(node, "router_bias").float()
        topk = _group_topk(k, a["num_groups"], a["group_topk"])
        if a["score"] == "softmax":
            if a.get("pre_softmax", False):
                probs, idx = topk(logits.softmax(-1))
            else:
                top, idx = topk(logits)
                probs = top.softmax(-1)
        else:  # sigmoid; an expert bias only chooses the experts (Megatron's aux-loss-free routing)
            scores = torch.sigmoid(logits)
            bias = self.w.get(node, "expert_bias")
            _, idx = topk(scores + bias.float() if bias is not None else scores)
            probs = scores.gather(-1, idx)
            if a["norm_topk"]:
                probs = probs / probs.sum(-1, keepdim=True)
        probs = probs * a.get("topk_scale", 1.0)  # Megatron's moe_router_topk_scaling_factor
        gated = a["gated"]
        first = "gate" if gated else "fc1"
        ep_split = not node.params[first].sharding.replicated and node.params[first].sharding.axis == "ep"
        out = torch.zeros_like(x)
        ranks = list(range(self.ep)) if (self.simulate and ep_split) else [None]
        for r in ranks:
            fc2 = self.w.get(node, "fc2", r)
            g = self.w.get(node, first, r)
            up = self.w.get(node, "up", r) if gated else None
            gb, ub, b2 = (self.w.get(node, n, r) for n in (first + "_bias", "up_bias", "fc2_bias"))
            e0 = 0 if r is None else r * g.shape[0]
            for j in range(g.shape[0]):
                e = e0 + j
                weight = (probs * (idx == e)).sum(-1, keepdim=True).to(x.dtype)
                hg = _linear(x, g[j], None if gb is None else gb[j])
                if gated:
                    h = glu(a["activation"], hg, _linear(x, up[j], None if ub is None else ub[j]), a.get("glu_clamp"),
                            a.get("glu_offset", 0.0))
                else:
                    h = activation(a["activation"], hg)
                out = out + weight * _linear(h, fc2[j], None if b2 is None else b2[j])
        return out + self._shared_expert(node, x) if a["shared_expert"] != "none" else out

    def _shared_expert(self, node, x):
        """Megatron's SharedExpertMLP: a TP-split MLP (its row-parallel partial sums reduced), times
        sigmoid(x . shared_expert_gate) when sigmoid-gated."""
        a = node.attrs
        out = 0
        for r in self._ranks(node, "shared_fc2"):
            if a["gated"]:
                h = activation(a["activation"], x @ self.w.get(node, "shared_gate", r).t())
                h = h * (x @ self.w.get(node, "shared_up", r).t())
            else:
                h = activation(a["activation"], x @ self.w.get(node, "shared_fc1", r).t())
            out = out + h @ self.w.get(node, "shared_fc2", r).t()
        if a["shared_expert"] == "sigmoid-gated":
            out = out * torch.sigmoid(x @ self.w.get(node, "shared_expert_gate").t())
        return out

    def op_mamba(self, node, x, pos):
        """Mamba-2 mixer per TP rank (whole heads and groups per rank, as Megatron shards them); the row-parallel
        out projection's partial sums are reduced."""
        a = node.attrs
        nh, p, g, n = a["num_heads"], a["head_dim"], a["num_groups"], a["state_dim"]
        ranks = self._ranks(node, "in_x", "out")
        parts = len(ranks) if ranks != [None] else 1
        out = 0
        for r in ranks:
            w = {k: self.w.get(node, k, r) for k in node.params if not k.endswith("_scale")}
            b, s = x.shape[:2]
            z, xs = _linear(x, w["in_z"]), _linear(x, w["in_x"])
            B, C, dt = _linear(x, w["in_B"]), _linear(x, w["in_C"]), _linear(x, w["in_dt"])
            xs = F.silu(causal_conv1d(xs, w["conv_x"], w.get("conv_x_bias")))
            B = F.silu(causal_conv1d(B, w["conv_B"], w.get("conv_B_bias")))
            C = F.silu(causal_conv1d(C, w["conv_C"], w.get("conv_C_bias")))
            lnh, lg = nh // parts, g // parts
            y = ssm_scan(xs.view(b, s, lnh, p), dt, w["A_log"], B.view(b, s, lg, n), C.view(b, s, lg, n),
                         w["D"], w["dt_bias"]).reshape(b, s, lnh * p)
            y = gated_rmsnorm(y, z, w["norm"], lg, a["norm_eps"], a["norm_before_gate"])
            out = out + y @ w["out"].t()
        return out

    def op_add(self, node, *xs, pos):
        out = xs[0]
        for t in xs[1:]:
            out = out + t
        return out

    def op_lm_head(self, node, x, pos):
        ranks = self._ranks(node, "weight")
        return torch.cat([x @ self.w.get(node, "weight", r).t() for r in ranks], -1)


def _group_topk(k: int, groups: int, group_topk: int):
    """``scores -> (values, indices)`` of the top ``k``; group-limited as Megatron's ``group_limited_topk``
    (megatron/core/transformer/moe/moe_utils.py): the ``group_topk`` groups whose best ``k // group_topk``
    scores sum highest, the top ``k`` inside them."""
    if not group_topk:
        return lambda s: s.topk(k, -1)

    def topk(s):
        g = s.unflatten(-1, (groups, -1))
        chosen = g.topk(k // group_topk, -1)[0].sum(-1).topk(group_topk, -1)[1]
        mask = torch.zeros_like(g[..., 0]).scatter(-1, chosen, 1.0).bool()[..., None].expand_as(g)
        return g.masked_fill(~mask, float("-inf")).flatten(-2).topk(k, -1)
    return topk


def run(model: Model, input_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32,
        simulate_ranks: bool | None = None, trim_vocab: bool = False) -> torch.Tensor:
    """Prefill logits ``[b, s, V]`` (V = lm_head rows, or ``vocab_size`` with ``trim_vocab``)."""
    with torch.no_grad():
        logits = ReferenceExecutor(model, dtype=dtype, simulate_ranks=simulate_ranks).run(input_ids)
    return logits[..., : model.config.vocab_size] if trim_vocab else logits


__all__ = ["ReferenceExecutor", "run"]
