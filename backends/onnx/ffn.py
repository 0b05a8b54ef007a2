"""MLP and MoE layers in the ONNX decoder: activations (incl. gated), dense MLPs, and MoE routing (softmax or
sigmoid scores, pre-softmax, renormalized top-k, expert bias, group-limited top-k, shared experts) expanded into
standard ops.

A mixin of :class:`mexc.backends.onnx.lower.Lowering`; numerics follow :mod:`mexc.ir.semantics`.
"""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from ...errors import BackendError
from ...ir.types import DType


class FFNLowering:
    """``op_mlp`` / ``op_moe``."""

    def activation(self, name: str, x: str, base: str) -> str:
        g = self.g
        if name == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x], f"{base}/Sigmoid")], f"{base}/Mul_silu")
        if name == "relu":
            return g.op("Relu", [x], f"{base}/Relu")
        if name == "squared-relu":
            r = g.op("Relu", [x], f"{base}/Relu")
            return g.op("Mul", [r, r], f"{base}/Mul_square")
        if name == "quick-gelu":
            s = g.op("Sigmoid", [g.op("Mul", [x, self.scalar(1.702)], f"{base}/Mul_1702")], f"{base}/Sigmoid")
            return g.op("Mul", [x, s], f"{base}/Mul_qgelu")
        if name in ("gelu", "gelu-tanh"):
            if self.profile == "ort":
                return g.op("Gelu", [x], f"{base}/Gelu", approximate="tanh" if name == "gelu-tanh" else "none")
            half = g.op("Mul", [x, self.scalar(0.5)], f"{base}/Mul_half")
            if name == "gelu":   # 0.5 x (1 + erf(x / sqrt 2))
                e = g.op("Erf", [g.op("Mul", [x, self.scalar(1 / math.sqrt(2))], f"{base}/Mul_rsqrt2")], f"{base}/Erf")
            else:                # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                x3 = g.op("Mul", [g.op("Mul", [x, x], f"{base}/Mul_x2"), x], f"{base}/Mul_x3")
                inner = g.op("Add", [x, g.op("Mul", [x3, self.scalar(0.044715)], f"{base}/Mul_c")], f"{base}/Add_in")
                e = g.op("Tanh", [g.op("Mul", [inner, self.scalar(math.sqrt(2 / math.pi))], f"{base}/Mul_k")],
                         f"{base}/Tanh")
            return g.op("Mul", [half, g.op("Add", [e, self.scalar(1.0)], f"{base}/Add_one")], f"{base}/Mul_gelu")
        raise BackendError(f"unknown activation {name!r}")

    def glu(self, a: dict, gate: str, up: str, base: str) -> str:
        """act(gate) * up; with ``glu_clamp`` / ``glu_offset`` (gpt-oss): act(Min(gate, c)) * (Clip(up, -c, c) + o),
        :func:`mexc.ir.semantics.glu`."""
        g, c, off = self.g, a.get("glu_clamp"), a.get("glu_offset", 0.0)
        if c is not None:
            gate = g.op("Min", [gate, self.scalar(float(c))], f"{base}/Min_gate")
            up = g.op("Clip", [up, self.scalar(-float(c)), self.scalar(float(c))], f"{base}/Clip_up")
        if off:
            up = g.op("Add", [up, self.scalar(float(off))], f"{base}/Add_offset")
        return g.op("Mul", [self.activation(a["activation"], gate, f"{base}/act_fn"), up], f"{base}/Mul")

    def op_mlp(self, node, x):
        base = f"{self.prefix(node)}/mlp"
        a = node.attrs
        if a["gated"]:
            gt = self.linear(node, x, "gate", "gate_bias", "mlp/gate_proj")
            up = self.linear(node, x, "up", "up_bias", "mlp/up_proj")
            h = self.glu(a, gt, up, base)
        else:
            h = self.activation(a["activation"], self.linear(node, x, "fc1", "fc1_bias", "mlp/fc1"), f"{base}/act_fn")
        return self.linear(node, h, "fc2", "fc2_bias", "mlp/down_proj")

    def op_moe(self, node, x):
        g, a = self.g, node.attrs
        base = f"{self.prefix(node)}/moe"
        E, k = a["num_experts"], a["top_k"]
        router = self.g.weight(f"{base}/router.weight", self.w(node, "router").float().t())
        xf = x if self.io == DType.f32 else g.op("Cast", [x], f"{base}/Cast_x", to=TensorProto.FLOAT)
        logits = g.op("MatMul", [xf, router], f"{base}/router/MatMul")
        if "router_bias" in node.params:
            rb = self.g.weight(f"{base}/router.bias", self.w(node, "router_bias").float())
            logits = g.op("Add", [logits, rb], f"{base}/router/Add_bias")
        K = g.const([k])

        def topk(t):
            return g.op("TopK", [self._group_mask(node, t, base), K], f"{base}/TopK", outputs=2, axis=-1)

        if a["score"] == "softmax":
            if a.get("pre_softmax", False):
                sm = g.op("Softmax", [logits], f"{base}/Softmax", axis=-1)
                probs, idx = topk(sm)
            else:
                top, idx = topk(logits)
                probs = g.op("Softmax", [top], f"{base}/Softmax", axis=-1)
        else:
            sg = g.op("Sigmoid", [logits], f"{base}/Sigmoid")
            if "expert_bias" in node.params:   # chooses the experts only; their weights are the plain scores
                bias = g.weight(f"{base}/expert_bias", self.w(node, "expert_bias").float())
                _, idx = topk(g.op("Add", [sg, bias], f"{base}/Add_bias"))
                probs = g.op("GatherElements", [sg, idx], f"{base}/GatherElements", axis=-1)
            else:
                probs, idx = topk(sg)
            if a["norm_topk"]:
                tot = g.op("ReduceSum", [probs, g.const([-1])], f"{base}/ReduceSum_norm", keepdims=1)
                probs = g.op("Div", [probs, tot], f"{base}/Div_norm")
        gated = a["gated"]
        first = "gate" if gated else "fc1"
        wg, wfc2 = self.w(node, first), self.w(node, "fc2")
        wup = self.w(node, "up") if gated else None
        bg, bup, b2 = (self.w(node, n) for n in (first + "_bias", "up_bias", "fc2_bias"))

        def bias(y, b, e, n, eb):   # + this expert's bias row
            return y if b is None else g.op("Add", [y, self.float_weight(f"{eb}/{n}.bias", b[e])], f"{eb}/{n}/Add")
        out = None
        for e in range(E):
            eb = f"{base}/experts.{e}"
            hit = g.op("Cast", [g.op("Equal", [idx, g.const(e)], f"{eb}/Equal")], f"{eb}/Cast", to=TensorProto.FLOAT)
            we = g.op("ReduceSum", [g.op("Mul", [probs, hit], f"{eb}/Mul_hit"), g.const([-1])], f"{eb}/ReduceSum",
                      keepdims=1)
            if self.io != DType.f32:
                we = g.op("Cast", [we], f"{eb}/Cast_w", to=self.io_type)
            h = g.op("MatMul", [x, self.float_weight(f"{eb}/{first}.weight", wg[e].t())], f"{eb}/{first}/MatMul")
            h = bias(h, bg, e, first, eb)
            if gated:
                u = g.op("MatMul", [x, self.float_weight(f"{eb}/up.weight", wup[e].t())], f"{eb}/up/MatMul")
                h = self.glu(a, h, bias(u, bup, e, "up", eb), eb)
            else:
                h = self.activation(a["activation"], h, f"{eb}/act_fn")
            y = g.op("MatMul", [h, self.float_weight(f"{eb}/down.weight", wfc2[e].t())], f"{eb}/down/MatMul")
            y = bias(y, b2, e, "down", eb)
            y = g.op("Mul", [we, y], f"{eb}/Mul_weight")
            out = y if out is None else g.op("Add", [out, y], f"{eb}/Add")
        del wg, wfc2, wup, bg, bup, b2
        if a["shared_expert"] != "none":   # Megatron's SharedExpertMLP (x sigmoid(x . gate) when gated)
            sb, act = f"{base}/shared_expert", a["activation"]
            if gated:
                h = self.activation(act, self.linear(node, x, "shared_gate", None, "moe/shared_expert/gate_proj"),
                                    f"{sb}/act_fn")
                h = g.op("Mul", [h, self.linear(node, x, "shared_up", None, "moe/shared_expert/up_proj")], f"{sb}/Mul")
            else:
                h = self.activation(act, self.linear(node, x, "shared_fc1", None, "moe/shared_expert/fc1"),
                                    f"{sb}/act_fn")
            y = self.linear(node, h, "shared_fc2", None, "moe/shared_expert/down_proj")
            if a["shared_expert"] == "sigmoid-gated":
                s = g.op("Sigmoid", [self.linear(node, x, "shared_expert_gate", None, "moe/shared_expert_gate")],
                         f"{sb}/Sigmoid")
                y = g.op("Mul", [s, y], f"{sb}/Mul_gate")
            out = g.op("Add", [out, y], f"{sb}/Add")
        return out

    def _group_mask(self, node, t, base):
        """Megatron's group_limited_topk: scores outside the group_topk groups whose best top_k/group_topk
        scores sum highest become -inf (``t`` unchanged without groups). Equal + ReduceMax, no OneHot."""
        g, a = self.g, node.attrs
        G, gk, k = a["num_groups"], a["group_topk"], a["top_k"]
        if not gk:
            return t
        gb = f"{base}/groups"
        t4 = g.op("Reshape", [t, g.const([0, 0, G, -1])], f"{gb}/Reshape")
        best = g.op("TopK", [t4, g.const([k // gk])], f"{gb}/TopK_in_group", outputs=2, axis=-1)[0]
        score = g.op("ReduceSum", [best, g.const([-1])], f"{gb}/ReduceSum", keepdims=0)
        chosen = g.op("TopK", [score, g.const([gk])], f"{gb}/TopK_groups", outputs=2, axis=-1)[1]
        hit = g.op("Equal", [g.op("Unsqueeze", [chosen, g.const([-1])], f"{gb}/Unsqueeze"), g.const(np.arange(G))],
                   f"{gb}/Equal")
        keep = g.op("ReduceMax", [g.op("Cast", [hit], f"{gb}/Cast", to=TensorProto.FLOAT), g.const([-2])],
                    f"{gb}/ReduceMax", keepdims=0)
        keep = g.op("Cast", [g.op("Unsqueeze", [keep, g.const([-1])], f"{gb}/Unsqueeze_keep")], f"{gb}/Cast_keep",
                    to=TensorProto.BOOL)
        masked = g.op("Where", [keep, t4, g.const(-np.inf, np.float32)], f"{gb}/Where")
        return g.op("Reshape", [masked, g.const([0, 0, -1])], f"{gb}/Reshape_back")

