"""fuse-qkv / split-qkv: join separate q, k, v projections into one [Q;K;V] weight, or split them apart."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PassError
from ..ir import Model, Param, derive
from .infra import Pass, PassResult, register_pass


@register_pass("fuse-qkv")
@dataclass
class FuseQKV(Pass):
    """Fuse separate q, k, v weights (and biases) into one QKV param with the [Q;K;V] concat layout."""

    def run(self, model: Model) -> PassResult:
        n = 0
        for node in model.graph.find("attention"):
            if "q" not in node.params:
                continue
            if "q_scale" in node.params:
                raise PassError(f"{node.location}: fuse-qkv of quantized q/k/v (their scales differ)",
                                hint="run fuse-qkv before quantize")
            a = node.attrs
            lay = dict(kind="concat", q=a["num_heads"], kv=a["num_kv_heads"], d=a["head_dim"])
            ps = node.params
            qkv = derive("tag_qkv", derive("concat", ps["q"].source, ps["k"].source, ps["v"].source, dim=0), **lay)
            fused = {"qkv": Param(qkv, ps["q"].sharding)}
            if "q_bias" in ps:
                b = derive("concat", ps["q_bias"].source, ps["k_bias"].source, ps["v_bias"].source, dim=0)
                fused["qkv_bias"] = Param(derive("tag_qkv", b, **lay), ps["q_bias"].sharding)
            rest = {k: v for k, v in ps.items() if k not in ("q", "k", "v", "q_bias", "k_bias", "v_bias")}
            node.params = {**fused, **rest}
            n += 1
        return PassResult(n > 0, {"fused": n})


@register_pass("split-qkv")
@dataclass
class SplitQKV(Pass):
    """Split a fused QKV param (any layout) into separate q, k, v params (and biases)."""

    def run(self, model: Model) -> PassResult:
        n = 0
        for node in model.graph.find("attention"):
            if "qkv" not in node.params:
                continue
            a = node.attrs
            nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
            bounds = {"q": (0, nh * d), "k": (nh * d, (nh + nkv) * d), "v": ((nh + nkv) * d, (nh + 2 * nkv) * d)}
            out = {}
            for src_name, suffix in (("qkv", ""), ("qkv_bias", "_bias"), ("qkv_scale", "_scale")):
                p = node.params.get(src_name)
                if p is None:
                    continue
                if p.type.layout is None:  # a per-tensor scale (fp8) applies to each part alike
                    for role in bounds:
                        out[role + suffix] = Param(p.source, p.sharding)
                    continue
                concat = derive("regroup_qkv", p.source, to="concat")
                plain = derive("tag_qkv", concat, kind=None, q=0, kv=0, d=0)
                for role, (lo, hi) in bounds.items():
                    out[role + suffix] = Param(derive("slice", plain, dim=0, start=lo, stop=hi), p.sharding)
            rest = {k: v for k, v in node.params.items() if k not in ("qkv", "qkv_bias", "qkv_scale")}
            node.params = {**out, **rest}
            n += 1
        return PassResult(n > 0, {"split": n})
