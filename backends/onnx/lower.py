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

from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import TensorProto

from ...errors import BackendError
from ...ir import Model, Node
from ...ir.analysis import node_roles
from ...ir.quant import quantize_tensor
from ...ir.types import DType
from .graph import GraphBuilder
from .mla import mla_layer_shape

from .attention import AttentionLowering
from .consts import B, IO_NUMPY, IO_TORCH, IO_TYPES, MS, OPSET, P, S, T  # noqa: F401 - re-exported
from .ffn import FFNLowering


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


class Lowering(AttentionLowering, FFNLowering):
    """The core: weights, linears (plain or weight-only quantized), the layer walk, embedding, norms, residual
    adds and the head; attention and MLP/MoE come from the mixins (:mod:`.attention`, :mod:`.ffn`)."""

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
