"""Attention in the ONNX decoder: causal and sliding-window masks, rope caches, GroupQueryAttention (``ort``
profile) or the standard 4-D ``Attention`` with an explicit mask and a growing cache (``tensorrt`` profile), QK
norms, output gates, and multi-latent attention through :mod:`.mla`.

A mixin of :class:`mexc.backends.onnx.lower.Lowering` (it uses the core's ``linear``, ``scalar``, ``g``, ``plan``);
numerics follow :mod:`mexc.ir.semantics`.
"""

from __future__ import annotations

import math

import torch
from onnx import TensorProto

from ...errors import BackendError
from ...ir import Node
from ...ir.semantics import rope_tables
from ...ir.types import Rope
from .consts import MS
from .mla import lower_mla


def gqa_rope_fusable(node: Node) -> bool:
    """GroupQueryAttention (CPU) can apply this node's RoPE itself (cos/sin caches, do_rotary=1)."""
    a = node.attrs
    return (a["position"] == "rope" and a["qk_norm"] == "none" and a["head_dim"] % 16 == 0
            and a["rope"].rotary_dim(a["head_dim"]) == a["head_dim"])




class AttentionLowering:
    """``op_attention`` / ``op_mla`` and the subgraphs they share."""

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
        if node.attrs["output_gate"]:   # o * sigmoid(gate x + gate_bias), per head and channel (both profiles)
            gate = self.linear(node, x, "gate", "gate_bias", "attn/gate_proj")
            o = self.g.op("Mul", [o, self.g.op("Sigmoid", [gate], f"{base}/gate/Sigmoid")], f"{base}/gate/Mul")
        return self.linear(node, o, "proj", "proj_bias", "attn/o_proj")

    def _split_qkv(self, node, qkv, base):
        a = node.attrs
        nh, nkv, d = a["num_heads"], a["num_kv_heads"], a["head_dim"]
        return self.g.op("Split", [qkv, self.g.const([nh * d, nkv * d, nkv * d])], f"{base}/Split_qkv",
                         outputs=3, axis=-1)

    def _qk_norm(self, node, t, heads, name, base, four_d):
        """RMS/Layer norm over head_dim at the attention's qk_norm_eps, no bias; l2 (weightless): RMSNormalization
        with a scale of ones."""
        g, a = self.g, node.attrs
        d = a["head_dim"]
        w = self.float_weight(f"{base}/{name}.weight", torch.ones(d) if a["qk_norm"] == "l2" else self.w(node, name))
        if not four_d:
            t = g.op("Reshape", [t, g.const([0, 0, heads, d])], f"{base}/{name}/Reshape_in")
        if a["qk_norm"] in ("rmsnorm", "l2"):
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
                rd = a["rope"].rotated_dim(d)   # even: the cos cache holds rd / 2
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
            rd = a["rope"].rotated_dim(d)   # even: the cos cache holds rd / 2
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


