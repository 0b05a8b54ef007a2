"""IR -> ONNX decoder graph with KV cache, in one of two profiles.

``ort``: opset 23 + com.microsoft contrib ops (GroupQueryAttention with packed QKV and, where it fits, fused
RoPE; Skip(Simplified)LayerNormalization; com.microsoft RotaryEmbedding when RoPE cannot be fused;
MatMulNBits for int4/int8 weight-only).

``tensorrt``: standard ONNX ops only (opset 23): RMSNormalization / LayerNormalization, RotaryEmbedding-23,
a growing cache (Concat of past and new K/V) and a 4-D ``Attention`` with an explicit boolean mask and no
past/present inputs (the form TensorRT's parser accepts), DequantizeLinear + MatMul for weight-only quant.

Every numeric convention follows :mod:`mexc.ir.semantics` (what the reference interpreter computes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import TensorProto

from ...errors import BackendError
from ...ir import Model, Node
from ...ir.analysis import node_roles
from ...ir.semantics import rope_tables
from ...ir.quant import quantize_tensor
from ...ir.types import DType, Rope
from .graph import GraphBuilder

OPSET = 23
MS = "com.microsoft"

IO_TYPES = {DType.f32: TensorProto.FLOAT, DType.f16: TensorProto.FLOAT16, DType.bf16: TensorProto.BFLOAT16}
IO_TORCH = {DType.f32: torch.float32, DType.f16: torch.float16, DType.bf16: torch.bfloat16}
IO_NUMPY = {DType.f32: np.float32, DType.f16: np.float16}

# dimension names (the onnxruntime-genai / Optimum convention)
B, S, T, P = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"


@dataclass
class LayerInfo:
    index: int              # 0..L-1, order of attention nodes
    kv_heads: int
    head_dim: int


@dataclass
class Plan:
    """What the emitted graph looks like (also used by genai_config and the TensorRT profile shapes)."""

    profile: str
    io_dtype: DType
    layers: list[LayerInfo] = field(default_factory=list)
    num_heads: int = 0
    vocab: int = 0
    fused_rope: bool = False
    uses_position_ids: bool = False
    rope_cache_len: int = 0
    notes: list[str] = field(default_factory=list)


def io_dtype_of(model: Model) -> DType:
    dt = model.config.dtype
    return dt if dt in IO_TYPES else DType.f32


def gqa_rope_fusable(node: Node) -> bool:
    """GroupQueryAttention (CPU) can apply this node's RoPE itself (cos/sin caches, do_rotary=1)."""
    a = node.attrs
    return (a["position"] == "rope" and a["qk_norm"] == "none" and a["head_dim"] % 16 == 0
            and a["rope"].rotary_dim(a["head_dim"]) == a["head_dim"])


class Lowering:
    def __init__(self, model: Model, g: GraphBuilder, profile: str, *, max_positions: int, progress=None,
                 accuracy_level: int = 4):
        self.m = model
        self.accuracy_level = accuracy_level
        self.g = g
        self.profile = profile
        self.io = io_dtype_of(model)
        self.io_type = IO_TYPES[self.io]
        self.io_torch = IO_TORCH[self.io]
        self.max_positions = max_positions
        self.progress = progress
        self.env: dict[int, str] = {}
        self.skip: set[int] = set()            # norm nodes already emitted (fused with their residual add)
        self.rope_caches: dict[tuple, tuple[str, str]] = {}
        self._gqa_lens: tuple[str, str] | None = None
        self._mask: str | None = None
        self._window_masks: dict[int, str] = {}
        self.plan = Plan(profile, self.io)
        self.roles = node_roles(model)
        self.attn_index = {id(n): i for i, n in enumerate(n for n in model.graph.nodes
                                                          if n.op in ("attention", "mla"))}

    # ------------------------------------------------------------------------------------------ helpers
    def w(self, node: Node, name: str) -> torch.Tensor | None:
        p = node.params.get(name)
        if p is None:
            return None
        return p.source.materialize()

    def prefix(self, node: Node) -> str:
        if node.layer is None:
            return "/model" if node.op != "norm" else "/model/final_norm"
        return f"/model/layers.{node.layer}"

    def float_weight(self, name: str, t: torch.Tensor) -> str:
        return self.g.weight(name, t.to(self.io_torch))

    def scalar(self, v: float) -> str:
        if self.io == DType.bf16:
            return self._bf16_scalar(v)
        return self.g.const(v, dtype=IO_NUMPY[self.io])

    def _bf16_scalar(self, v: float) -> str:
        c = self.g.const(v, dtype=np.float32)
        return self.g.op("Cast", [c], f"/model/constants/bf16/{v}", to=TensorProto.BFLOAT16)

    def linear(self, node: Node, x: str, wname: str, bname: str | None, name: str) -> str:
        """x @ W^T (+ b): MatMul on a transposed float weight, MatMulNBits (ort) or DequantizeLinear+MatMul."""
        p = node.params[wname]
        base = f"{self.prefix(node)}/{name}"
        if p.type.dtype in (DType.i4, DType.i8):
            y = self.quant_linear(node, x, wname, base)
        elif p.type.dtype == DType.f8e4m3:
            raise BackendError(f"{node.location}: fp8 weights are not supported by the onnx backend",
                               hint="use --quant int4-wo or int8-wo")
        else:
            wt = self.w(node, wname)
            init = self.float_weight(f"{base}.weight", wt.t())
            del wt
            y = self.g.op("MatMul", [x, init], f"{base}/MatMul")
        if bname and bname in node.params:
            b = self.float_weight(f"{base}.bias", self.w(node, bname))
            y = self.g.op("Add", [y, b], f"{base}/Add")
        return y

    def quant_linear(self, node: Node, x: str, wname: str, base: str) -> str:
        p = node.params[wname]
        bits = 4 if p.type.dtype == DType.i4 else 8
        q, scale = self.codes_and_scales(node, wname)      # int8 [N, K] symmetric codes, float [N, K/G]
        N, K = q.shape
        G = K // scale.shape[-1]
        if self.profile == "ort":
            zp = 1 << (bits - 1)
            u = (q.view(torch.uint8) + zp).reshape(N, K // G, G)   # code + 2^(bits-1), modulo 256
            if bits == 4:
                u = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()
            wq = self.g.weight(f"{base}.weight_q", u)
            sc = self.float_weight(f"{base}.weight_scale", scale.reshape(N * (K // G)))
            return self.g.op("MatMulNBits", [x, wq, sc], f"{base}/MatMulNBits", domain=MS, K=K, N=N, bits=bits,
                             block_size=G, accuracy_level=self.accuracy_level)
        # tensorrt: symmetric blocked DequantizeLinear (zero point 0) on [K, N] codes, then MatMul
        qt = q.t().contiguous()                             # [K, N]
        if bits == 4:
            flat = (qt.reshape(-1) & 0xF).to(torch.uint8)
            if flat.numel() % 2:
                flat = torch.cat([flat, flat.new_zeros(1)])
            packed = (flat[0::2] | (flat[1::2] << 4)).contiguous()
            wq = self.g.weight(f"{base}.weight_q", packed, TensorProto.INT4, (K, N))
        else:
            wq = self.g.weight(f"{base}.weight_q", qt.to(torch.int8))
        if G == K:   # per output channel: scale [N] along axis 1 of [K, N]
            sc = self.float_weight(f"{base}.weight_scale", scale.reshape(N))
            kw = dict(axis=1)
        else:        # per group of G inputs: scale [K/G, N], blocked along axis 0
            sc = self.float_weight(f"{base}.weight_scale", scale.t().contiguous())
            kw = dict(axis=0, block_size=G)
        w = self.g.op("DequantizeLinear", [wq, sc], f"{base}/DequantizeLinear", **kw)
        return self.g.op("MatMul", [x, w], f"{base}/MatMul")

    def codes_and_scales(self, node: Node, wname: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 codes and float scales of a quantized weight. When both recipes quantize the same source
        (what the quantize pass makes), the float weight is read once and :func:`mexc.ir.quant.quantize_tensor`
        (the recipes' own numerics) gives both; otherwise each recipe is materialized."""
        cs, ss = node.params[wname].source, node.params[wname + "_scale"].source
        same = cs.attrs == ss.attrs and cs.inputs[0].key == ss.inputs[0].key if cs.inputs and ss.inputs else False
        if (cs.op, ss.op) == ("quantize", "quant_scale") and same:
            q, scale = quantize_tensor(cs.inputs[0].materialize(), cs.attrs["scheme"], cs.attrs["group_size"])
        else:
            q, scale = cs.materialize(), ss.materialize()
        return q.to(torch.int8), scale.float()

    # ------------------------------------------------------------------------------------------ shared subgraphs
    def gqa_lengths(self) -> tuple[str, str]:
        """seqlens_k [B] int32 (= valid total length - 1) and total_sequence_length (int32 scalar)."""
        if self._gqa_lens is None:
            g = self.g
            s = g.op("ReduceSum", ["attention_mask", g.const([1])], "/model/attn_mask_reformat/ReduceSum", keepdims=0)
            s = g.op("Sub", [s, g.const(1)], "/model/attn_mask_reformat/Sub")
            seqlens = g.op("Cast", [s], "/model/attn_mask_reformat/Cast_seqlens", to=TensorProto.INT32)
            shp = g.op("Shape", ["attention_mask"], "/model/attn_mask_reformat/Shape")
            tot = g.op("Gather", [shp, g.const(1)], "/model/attn_mask_reformat/Gather", axis=0)
            tot = g.op("Cast", [tot], "/model/attn_mask_reformat/Cast_total", to=TensorProto.INT32)
            self._gqa_lens = (seqlens, tot)
        return self._gqa_lens

    def causal_mask(self) -> str:
        """Boolean [B, 1, S, T]: query i (absolute position T-S+i) sees key j iff j <= T-S+i and mask[b, j]."""
        if self._mask is None:
            g, p = self.g, "/model/attn_mask"
            T_ = g.op("Gather", [g.op("Shape", ["attention_mask"], f"{p}/Shape_T"), g.const(1)], f"{p}/Gather_T",
                      axis=0)
            S_ = g.op("Gather", [g.op("Shape", ["input_ids"], f"{p}/Shape_S"), g.const(1)], f"{p}/Gather_S", axis=0)
            past = g.op("Sub", [T_, S_], f"{p}/Sub_past")
            kpos = g.op("Range", [g.const(0), T_, g.const(1)], f"{p}/Range_k")
            qpos = g.op("Range", [past, T_, g.const(1)], f"{p}/Range_q")
            kpos = g.op("Unsqueeze", [kpos, g.const([0])], f"{p}/Unsqueeze_k")      # [1, T]
            qpos = g.op("Unsqueeze", [qpos, g.const([1])], f"{p}/Unsqueeze_q")      # [S, 1]
            causal = g.op("LessOrEqual", [kpos, qpos], f"{p}/LessOrEqual")          # [S, T]
            pad = g.op("Cast", ["attention_mask"], f"{p}/Cast_pad", to=TensorProto.BOOL)
            pad = g.op("Unsqueeze", [pad, g.const([1, 2])], f"{p}/Unsqueeze_pad")   # [B, 1, 1, T]
            self._mask = g.op("And", [pad, causal], f"{p}/And")                    # [B, 1, S, T]
            self._positions = (kpos, qpos)
        return self._mask

    def window_mask(self, window: int | None) -> str:
        """:meth:`causal_mask` and, with a sliding ``window``, key j >= query position - window (the IR's
        window: keys i-window..i, :func:`mexc.ir.semantics.visible`); one mask per window size."""
        causal = self.causal_mask()
        if window is None:
            return causal
        if window not in self._window_masks:
            g, p = self.g, f"/model/attn_mask_window{window}"
            kpos, qpos = self._positions
            lo = g.op("Sub", [qpos, g.const(window)], f"{p}/Sub")                    # [S, 1]
            inside = g.op("GreaterOrEqual", [kpos, lo], f"{p}/GreaterOrEqual")     # [S, T]
            self._window_masks[window] = g.op("And", [causal, inside], f"{p}/And")  # [B, 1, S, T]
        return self._window_masks[window]

    def rope_cache(self, rope: Rope, head_dim: int) -> tuple[str, str]:
        """cos/sin caches [max_positions, rotary_dim/2] computed exactly as the reference executor does."""
        key = (rope, head_dim)
        if key not in self.rope_caches:
            pos = torch.arange(self.max_positions)[None]
            cos, sin = rope_tables(rope, head_dim, pos)    # [1, P, rd] (rotate-half: halves repeated)
            cos, sin = cos[0], sin[0]
            if rope.interleaved:
                cos, sin = cos[:, 0::2], sin[:, 0::2]
            else:
                half = cos.shape[-1] // 2
                cos, sin = cos[:, :half], sin[:, :half]
            i = len(self.rope_caches)
            sfx = "" if i == 0 else f"_{i}"
            c = self.float_weight(f"/model/rotemb_caches/cos_cache{sfx}", cos.contiguous())
            s = self.float_weight(f"/model/rotemb_caches/sin_cache{sfx}", sin.contiguous())
            self.rope_caches[key] = (c, s)
            self.plan.rope_cache_len = self.max_positions
        return self.rope_caches[key]

    # ------------------------------------------------------------------------------------------ driver
    def run(self) -> Plan:
        g = self.g
        g.input("input_ids", TensorProto.INT64, [B, S])
        g.input("attention_mask", TensorProto.INT64, [B, T])
        g.input("position_ids", TensorProto.INT64, [B, S])
        for n in (n for n in self.m.graph.nodes if id(n) in self.attn_index):
            i = self.attn_index[id(n)]
            d, kv = (n.attrs["head_dim"], n.attrs["num_kv_heads"]) if n.op == "attention" else \
                mla_layer_shape(n)
            self.plan.layers.append(LayerInfo(i, kv, d))
            self.plan.num_heads = n.attrs["num_heads"]
            for kind in ("key", "value"):
                g.input(f"past_key_values.{i}.{kind}", self.io_type, [B, kv, P, d])
        self.env[id(self.m.graph.inputs[0])] = "input_ids"
        nodes = self.m.graph.nodes
        for k, node in enumerate(nodes):
            if id(node) in self.skip:
                continue
            fn = getattr(self, "op_" + node.op, None)
            if fn is None:
                raise BackendError(f"{node.location}: op {node.op!r} has no ONNX lowering")
            out = fn(node, *[self.env[id(v)] for v in node.inputs])
            if out is not None:
                self.env[id(node.output)] = out
            for p in node.params.values():  # its weights are written: memory-mapped sources may drop pages
                p.source.release()
        final = self.env[id(self.m.graph.outputs[0])]
        _rename_output(g, final, "logits")
        g.output("logits", self.io_type, [B, S, self.plan.vocab])
        for li in self.plan.layers:
            for kind in ("key", "value"):
                g.output(f"present.{li.index}.{kind}", self.io_type, [B, li.kv_heads, T, li.head_dim])
        return self.plan

    # ------------------------------------------------------------------------------------------ ops
    def op_embedding(self, node, ids):
        g, base = self.g, "/model/embed_tokens"
        word = self.float_weight(f"{base}.weight", self.w(node, "word"))
        x = g.op("Gather", [word, ids], f"{base}/Gather", axis=0)
        if "position" in node.params:
            self.plan.uses_position_ids = True
            pw = self.float_weight("/model/embed_positions.weight", self.w(node, "position"))
            pe = g.op("Gather", [pw, "position_ids"], "/model/embed_positions/Gather", axis=0)
            x = g.op("Add", [x, pe], f"{base}/Add_positions")
        if node.attrs["scale"] != 1.0:
            x = g.op("Mul", [x, self.scalar(float(node.attrs["scale"]))], f"{base}/Mul_scale")
        return x

    def _norm_name(self, node) -> str:
        role = self.roles.get(node, "norm")
        if role == "final_norm":
            return "/model/final_norm"
        return f"/model/layers.{node.layer}/" + {"input_norm": "input_layernorm",
                                                 "post_norm": "post_attention_layernorm"}.get(role, "norm")

    def _norm_params(self, node, base):
        if node.attrs["zero_centered"]:
            raise BackendError(f"{node.location}: zero-centered gamma must be folded first",
                               hint="run canonicalize before the onnx backend")
        gamma = self.float_weight(f"{base}.weight", self.w(node, "weight"))
        beta = self.float_weight(f"{base}.bias", self.w(node, "bias")) if "bias" in node.params else None
        return gamma, beta

    def op_norm(self, node, x):
        g, base = self.g, self._norm_name(node)
        gamma, beta = self._norm_params(node, base)
        eps = float(node.attrs["eps"])
        if node.attrs["kind"] == "rmsnorm":
            y = g.op("RMSNormalization", [x, gamma], f"{base}/RMSNormalization", axis=-1, epsilon=eps, stash_type=1)
            if beta:
                y = g.op("Add", [y, beta], f"{base}/Add_bias")
            return y
        ins = [x, gamma] + ([beta] if beta else [])
        return g.op("LayerNormalization", ins, f"{base}/LayerNormalization", axis=-1, epsilon=eps, stash_type=1)

    def op_add(self, node, *xs):
        g = self.g
        base = f"/model/layers.{node.layer}/residual" if node.layer is not None else "/model/residual"
        if self.profile == "ort" and len(xs) == 2:
            norm = next((u for u in self.m.graph.nodes if u.op == "norm" and node.output in u.inputs), None)
            if norm is not None and self.io != DType.bf16:
                # Skip(Simplified)LayerNormalization: out0 = norm(a + b), out3 = a + b (the new residual)
                nb = self._norm_name(norm)
                gamma, beta = self._norm_params(norm, nb)
                eps = float(norm.attrs["eps"])
                if norm.attrs["kind"] == "rmsnorm" and beta is None:
                    outs = g.op("SkipSimplifiedLayerNormalization", [xs[0], xs[1], gamma],
                                f"{nb}/SkipSimplifiedLayerNorm", outputs=4, domain=MS, epsilon=eps)
                elif norm.attrs["kind"] == "layernorm":
                    ins = [xs[0], xs[1], gamma] + ([beta] if beta else [])
                    outs = g.op("SkipLayerNormalization", ins, f"{nb}/SkipLayerNorm", outputs=4, domain=MS,
                                epsilon=eps)
                else:
                    outs = None
                if outs is not None:
                    used = [outs[0], "", "", outs[3]]
                    g.nodes[-1].ClearField("output")
                    g.nodes[-1].output.extend(used)
                    self.env[id(norm.output)] = outs[0]
                    self.skip.add(id(norm))
                    return outs[3]
        y = xs[0]
        for k, t in enumerate(xs[1:]):
            y = g.op("Add", [y, t], f"{base}/Add_{k}" if len(xs) > 2 else f"{base}/Add")
        return y

    def op_lm_head(self, node, x):
        wt = self.w(node, "weight")
        self.plan.vocab = wt.shape[0]
        if "weight_scale" in node.params:     # /lm_head.weight_q, /lm_head/MatMulNBits (float: /lm_head/MatMul)
            del wt
            return self.quant_linear(node, x, "weight", "/lm_head")
        init = self.float_weight("/lm_head.weight", wt.t())
        del wt
        return self.g.op("MatMul", [x, init], "/lm_head/MatMul")

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
        if a["score"] == "softmax":
            if a.get("pre_softmax", False):
                sm = g.op("Softmax", [logits], f"{base}/Softmax", axis=-1)
                probs, idx = g.op("TopK", [sm, K], f"{base}/TopK", outputs=2, axis=-1)
            else:
                top, idx = g.op("TopK", [logits, K], f"{base}/TopK", outputs=2, axis=-1)
                probs = g.op("Softmax", [top], f"{base}/Softmax", axis=-1)
        else:
            sg = g.op("Sigmoid", [logits], f"{base}/Sigmoid")
            probs, idx = g.op("TopK", [sg, K], f"{base}/TopK", outputs=2, axis=-1)
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
        return out

    # ------------------------------------------------------------------------------------------ attention
    def op_mla(self, node, x):
        """Multi-latent attention as plain attention after up-projection (:mod:`.mla`)."""
        return lower_mla(self, node, x, self.attn_index[id(node)])

    def op_attention(self, node, x):
        if "qkv" not in node.params:
            raise BackendError(f"{node.location}: separate q/k/v params", hint="run fuse-qkv before the onnx backend")
        if node.params["qkv"].type.layout.kind != "concat":
            raise BackendError(f"{node.location}: QKV layout is {node.params['qkv'].type.layout.kind}",
                               hint="run relayout-qkv{to=concat} before the onnx backend")
        i = self.attn_index[id(node)]
        base = f"/model/layers.{node.layer}/attn"
        qkv = self.linear(node, x, "qkv", "qkv_bias", "attn/qkv_proj")
        if self.profile == "ort":
            o = self.attention_ort(node, qkv, i, base)
        else:
            o = self.attention_tensorrt(node, qkv, i, base)
        return self.linear(node, o, "proj", "proj_bias", "attn/o_proj")

    def _split_qkv(self, node, qkv, base):
        a = node.attrs
        nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        return self.g.op("Split", [qkv, self.g.const([nh * d, nkv * d, nkv * d])], f"{base}/Split_qkv",
                         outputs=3, axis=-1)

    def _qk_norm(self, node, t, heads, name, base, four_d):
        """RMS/Layer norm over head_dim at the attention's qk_norm_eps, no bias."""
        g, a = self.g, node.attrs
        d = a["head_dim"]
        w = self.float_weight(f"{base}/{name}.weight", self.w(node, name))
        if not four_d:
            t = g.op("Reshape", [t, g.const([0, 0, heads, d])], f"{base}/{name}/Reshape_in")
        if a["qk_norm"] == "rmsnorm":
            t = g.op("RMSNormalization", [t, w], f"{base}/{name}/RMSNormalization", axis=-1,
                     epsilon=a["qk_norm_eps"], stash_type=1)
        else:
            t = g.op("LayerNormalization", [t, w], f"{base}/{name}/LayerNormalization", axis=-1,
                     epsilon=a["qk_norm_eps"], stash_type=1)
        if not four_d:
            t = g.op("Reshape", [t, g.const([0, 0, heads * d])], f"{base}/{name}/Reshape_out")
        return t

    def attention_ort(self, node, qkv, i, base):
        g, a = self.g, node.attrs
        nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        seqlens, total = self.gqa_lengths()
        past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        present = [f"present.{i}.key", f"present.{i}.value"]
        attrs = dict(num_heads=nh, kv_num_heads=nkv, scale=float(a["softmax_scale"]) if a["softmax_scale"] else None)
        if a["window"] is not None:
            # GQA's local_window_size counts the query too (as transformers' sliding_window): window + 1 since
            # microsoft/onnxruntime#25927 (Sept. 2025, after 1.23.0); earlier releases attend to one key more
            attrs["local_window_size"] = a["window"] + 1
            note = ("sliding-window layers use GroupQueryAttention local_window_size = window + 1 (the query "
                    "counted), onnxruntime's meaning since microsoft/onnxruntime#25927 (after 1.23.0): an older "
                    "onnxruntime attends to one token more; the tensorrt profile's explicit mask has no such "
                    "dependence")
            if note not in self.plan.notes:
                self.plan.notes.append(note)
        if a["position"] == "rope" and gqa_rope_fusable(node):
            cos, sin = self.rope_cache(a["rope"], d)
            self.plan.fused_rope = True
            ins = [qkv, "", "", *past, seqlens, total, cos, sin]
            attrs.update(do_rotary=1, rotary_interleaved=int(a["rope"].interleaved))
        else:
            q, k, v = self._split_qkv(node, qkv, base)
            if a["qk_norm"] != "none":
                q = self._qk_norm(node, q, nh, "q_norm", base, False)
                k = self._qk_norm(node, k, nkv, "k_norm", base, False)
            if a["position"] == "rope":
                self.plan.uses_position_ids = True
                cos, sin = self.rope_cache(a["rope"], d)
                rd = a["rope"].rotary_dim(d)
                kw = dict(interleaved=int(a["rope"].interleaved), rotary_embedding_dim=rd if rd != d else None)
                q = g.op("RotaryEmbedding", [q, "position_ids", cos, sin], f"{base}/q_rotary/RotaryEmbedding",
                         domain=MS, num_heads=nh, **kw)
                k = g.op("RotaryEmbedding", [k, "position_ids", cos, sin], f"{base}/k_rotary/RotaryEmbedding",
                         domain=MS, num_heads=nkv, **kw)
            ins = [q, k, v, *past, seqlens, total]
            attrs.update(do_rotary=0)
        if a.get("sinks"):   # head_sink (input 11, onnxruntime >= 1.23): the sink logit per head
            ins += [""] * (11 - len(ins)) + [self.float_weight(f"{base}/sinks", self.w(node, "sinks"))]
        out = g.op("GroupQueryAttention", ins, f"{base}/GroupQueryAttention", domain=MS,
                   outputs=[f"{base}/GroupQueryAttention/output_0", *present], **attrs)
        return out[0]

    def attention_tensorrt(self, node, qkv, i, base):
        g, a = self.g, node.attrs
        nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        q, k, v = self._split_qkv(node, qkv, base)

        def bhsd(t, heads, n):   # [B, S, h*d] -> [B, h, S, d]
            t = g.op("Reshape", [t, g.const([0, 0, heads, d])], f"{base}/{n}/Reshape")
            return g.op("Transpose", [t], f"{base}/{n}/Transpose", perm=[0, 2, 1, 3])

        q, k, v = bhsd(q, nh, "q"), bhsd(k, nkv, "k"), bhsd(v, nkv, "v")
        if a["qk_norm"] != "none":
            q = self._qk_norm(node, q, nh, "q_norm", base, True)
            k = self._qk_norm(node, k, nkv, "k_norm", base, True)
        if a["position"] == "rope":
            self.plan.uses_position_ids = True
            cos, sin = self.rope_cache(a["rope"], d)
            rd = a["rope"].rotary_dim(d)
            kw = dict(interleaved=int(a["rope"].interleaved), rotary_embedding_dim=rd if rd != d else None)
            q = g.op("RotaryEmbedding", [q, cos, sin, "position_ids"], f"{base}/q_rotary/RotaryEmbedding", **kw)
            k = g.op("RotaryEmbedding", [k, cos, sin, "position_ids"], f"{base}/k_rotary/RotaryEmbedding", **kw)
        k = g.op("Concat", [f"past_key_values.{i}.key", k], f"{base}/Concat_k", outputs=[f"present.{i}.key"], axis=2)
        v = g.op("Concat", [f"past_key_values.{i}.value", v], f"{base}/Concat_v", outputs=[f"present.{i}.value"],
                 axis=2)
        scale = float(a["softmax_scale"]) if a["softmax_scale"] else 1.0 / math.sqrt(d)
        mask = self.window_mask(a["window"])
        if a.get("sinks"):
            k, v, mask = self._sink_column(node, k, v, mask, base)
        o = g.op("Attention", [q, k, v, mask], f"{base}/Attention", scale=scale)
        o = g.op("Transpose", [o], f"{base}/Transpose_out", perm=[0, 2, 1, 3])
        return g.op("Reshape", [o, g.const([0, 0, nh * d])], f"{base}/Reshape_out")

    def _sink_column(self, node, k, v, mask, base):
        """Attention sinks in standard ONNX (Attention-23 has no sink input): one more key and value, both zero,
        whose score is set by a float mask column equal to the head's sink (q . 0 + sink), every other column 0
        (visible) or -inf. The softmax denominator gains exp(sink) and the zero value adds nothing to the output:
        :func:`mexc.ir.semantics.softmax_with_sinks`. The extra key is not part of the present cache."""
        g, nh = self.g, node.attrs["num_heads"]
        zero, ninf = self.scalar(0.0), self.scalar(float("-inf"))

        def first_zeroed(t, axis, n):   # t[..., :1 on axis, ...] * 0: zeros shaped like one position of t
            one = g.op("Slice", [t, g.const([0]), g.const([1]), g.const([axis])], f"{base}/sink/Slice_{n}")
            if n == "mask":
                one = g.op("Cast", [one], f"{base}/sink/Cast_mask", to=self.io_type)
            return g.op("Mul", [one, zero], f"{base}/sink/Mul_{n}")

        k2 = g.op("Concat", [k, first_zeroed(k, 2, "k")], f"{base}/sink/Concat_k", axis=2)
        v2 = g.op("Concat", [v, first_zeroed(v, 2, "v")], f"{base}/sink/Concat_v", axis=2)
        sink = self.float_weight(f"{base}/sinks", self.w(node, "sinks").reshape(1, nh, 1, 1))
        col = g.op("Add", [first_zeroed(mask, 3, "mask"), sink], f"{base}/sink/Add_col")           # [B, nh, S, 1]
        fm = g.op("Where", [mask, zero, ninf], f"{base}/sink/Where")                              # [B, 1, S, T]
        fm = g.op("Add", [fm, g.op("Mul", [sink, zero], f"{base}/sink/Mul_heads")], f"{base}/sink/Add_heads")
        return k2, v2, g.op("Concat", [fm, col], f"{base}/sink/Concat_mask", axis=3)


from .mla import lower_mla, mla_layer_shape  # noqa: E402 - mla.py imports this module's names


def _rename_output(g: GraphBuilder, name: str, new: str):
    """Make the node that produces ``name`` produce ``new`` instead (graph outputs keep their GenAI names)."""
    for n in g.nodes:
        for j, o in enumerate(n.output):
            if o == name:
                n.output[j] = new
                for m in g.nodes:
                    for jj, inp in enumerate(m.input):
                        if inp == name:
                            m.input[jj] = new
                return
    raise BackendError(f"no node produces {name}")


def lower(model: Model, g: GraphBuilder, profile: str, *, max_positions: int, progress=None,
          accuracy_level: int = 4) -> Plan:
    """Emit ``model`` into ``g``. ``accuracy_level`` is MatMulNBits' (ort profile): 4 quantizes activations to int8
    per block on CPU (onnxruntime-genai's builder's CPU default), 0 computes in the activation dtype."""
    return Lowering(model, g, profile, max_positions=max_positions, progress=progress,
                    accuracy_level=accuracy_level).run()
