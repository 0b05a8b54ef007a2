"""Multi-latent attention (the IR's ``mla``) in the ONNX decoder: plain attention after up-projection.

The KV cache holds the up-projected per-head keys ``[k_nope | rope(k_rope)]`` (``qk_head_dim + qk_rope_dim``)
and values, not the compressed latent (the latent cache needs the absorbed-weight kernels no standard ONNX op
has). So each layer is ordinary multi-head attention with ``kv_heads = num_heads`` and ``head_size =
qk_head_dim + qk_rope_dim``; the values are zero-padded from ``v_head_dim`` to that head size (rows of zeros in
the v up-projection, zero columns in ``o_proj``) because onnxruntime-genai and GroupQueryAttention use one head
size for keys and values. The decoupled rope rotates GPT-J pairs of the rope part only (Megatron's MLA
de-interleave + rotate-half; the same dot products). Numerics follow :mod:`mexc.ir.semantics` as the reference
executor does.
"""

from __future__ import annotations

import math

import torch

from ...errors import BackendError
from .consts import MS

# the ops emitted by :func:`lower_mla`, in order: down projections, latent norms, up projections, rope,
# attention (GroupQueryAttention in the ort profile, Attention + Concat caches in tensorrt), output projection


def mla_layer_shape(node) -> tuple[int, int]:
    """(head size, kv heads) of the layer's KV cache."""
    a = node.attrs
    return a["qk_head_dim"] + a["qk_rope_dim"], a["num_heads"]


def lower_mla(lo, node, x: str, i: int) -> str:
    """Emit one mla node reading ``x`` [B, S, H]; ``i`` is its KV-cache index. Returns [B, S, H]."""
    g, a = lo.g, node.attrs
    nh, dn, dr, dv, C = a["num_heads"], a["qk_head_dim"], a["qk_rope_dim"], a["v_head_dim"], a["kv_lora_rank"]
    dq = dn + dr
    base = f"/model/layers.{node.layer}/attn"
    if any(p.type.dtype.bits < 16 or not p.type.dtype.is_float for p in node.params.values()):
        raise BackendError(f"{node.location}: quantized multi-latent attention weights are not lowered",
                           hint="drop --quant (the onnx target refuses it for MLA models before lowering)")

    def mm(t, w, name):  # t @ w^T for a float torch weight w [out, in]
        return g.op("MatMul", [t, lo.float_weight(f"{base}/{name}.weight", w.t().contiguous())], f"{base}/{name}/MatMul")

    def latent_norm(t, pname):
        if a["latent_norm"] == "none":
            return t
        w = lo.float_weight(f"{base}/{pname}.weight", lo.w(node, pname))
        op = "RMSNormalization" if a["latent_norm"] == "rmsnorm" else "LayerNormalization"
        return g.op(op, [t, w], f"{base}/{pname}/{op}", axis=-1, epsilon=float(a["latent_norm_eps"]), stash_type=1)

    kv = mm(x, lo.w(node, "kv_down"), "kv_a_proj")
    c, k_pe = g.op("Split", [kv, g.const([C, dr])], f"{base}/Split_kv_a", outputs=2, axis=-1)
    c = latent_norm(c, "kv_norm")
    if "q_down" in node.params:
        q = mm(latent_norm(mm(x, lo.w(node, "q_down"), "q_a_proj"), "q_norm"), lo.w(node, "q_up"), "q_b_proj")
    else:
        q = mm(x, lo.w(node, "q"), "q_proj")
    # kv_up rows per head [k_nope dn | v dv] -> separate k_nope [nh*dn] and zero-padded v [nh*dq] weights
    up = lo.w(node, "kv_up").view(nh, dn + dv, C)
    wk = up[:, :dn].reshape(nh * dn, C)
    wv = torch.cat([up[:, dn:], up.new_zeros(nh, dq - dv, C)], 1).reshape(nh * dq, C)
    k_nope = mm(c, wk, "k_b_proj")
    v = mm(c, wv, "v_b_proj")
    # rope on the rope part of each q head and on the shared rope key, GPT-J pairs
    q4 = g.op("Reshape", [q, g.const([0, 0, nh, dq])], f"{base}/Reshape_q")
    q_nope, q_pe = g.op("Split", [q4, g.const([dn, dr])], f"{base}/Split_q", outputs=2, axis=-1)
    q_pe = _rope(lo, a["rope"], g.op("Reshape", [q_pe, g.const([0, 0, nh * dr])], f"{base}/Reshape_q_pe"),
                 nh, dr, f"{base}/q_rotary")
    k_pe = _rope(lo, a["rope"], k_pe, 1, dr, f"{base}/k_rotary")
    q = g.op("Concat", [q_nope, g.op("Reshape", [q_pe, g.const([0, 0, nh, dr])], f"{base}/Reshape_q_pe4")],
             f"{base}/Concat_q", axis=-1)
    q = g.op("Reshape", [q, g.const([0, 0, nh * dq])], f"{base}/Reshape_q_out")
    k_pe = g.op("Reshape", [k_pe, g.const([0, 0, 1, dr])], f"{base}/Reshape_k_pe")
    shp = g.op("Shape", [k_pe], f"{base}/Shape_k_pe")
    tile = g.op("Concat", [g.op("Slice", [shp, g.const([0]), g.const([2])], f"{base}/Slice_bs"),
                           g.const([nh, dr])], f"{base}/Concat_expand", axis=0)
    k_pe = g.op("Expand", [k_pe, tile], f"{base}/Expand_k_pe")
    k = g.op("Concat", [g.op("Reshape", [k_nope, g.const([0, 0, nh, dn])], f"{base}/Reshape_k_nope"), k_pe],
             f"{base}/Concat_k", axis=-1)
    k = g.op("Reshape", [k, g.const([0, 0, nh * dq])], f"{base}/Reshape_k_out")
    scale = float(a["softmax_scale"]) if a["softmax_scale"] else 1.0 / math.sqrt(dq)
    o = _attend(lo, q, k, v, i, nh, dq, scale, base)
    proj = lo.w(node, "proj").view(-1, nh, dv)
    proj = torch.cat([proj, proj.new_zeros(proj.shape[0], nh, dq - dv)], 2).reshape(proj.shape[0], nh * dq)
    y = mm(o, proj, "o_proj")
    if "proj_bias" in node.params:
        y = g.op("Add", [y, lo.float_weight(f"{base}/o_proj.bias", lo.w(node, "proj_bias"))], f"{base}/o_proj/Add")
    return y


def _rope(lo, rope, t, heads, d, name):
    """Rotary on ``t`` [B, S, heads*d] at ``position_ids`` with the caches of :meth:`Lowering.rope_cache`."""
    lo.plan.uses_position_ids = True
    cos, sin = lo.rope_cache(rope, d)
    rd = rope.rotated_dim(d)   # even: the cos cache holds rd / 2
    kw = dict(interleaved=int(rope.interleaved), rotary_embedding_dim=rd if rd != d else None, num_heads=heads)
    if lo.profile == "ort":
        return lo.g.op("RotaryEmbedding", [t, "position_ids", cos, sin], f"{name}/RotaryEmbedding", domain=MS, **kw)
    return lo.g.op("RotaryEmbedding", [t, cos, sin, "position_ids"], f"{name}/RotaryEmbedding", **kw)


def _attend(lo, q, k, v, i, nh, d, scale, base):
    """Causal attention of q/k/v [B, S, nh*d] with the layer's KV cache; [B, S, nh*d]."""
    g = lo.g
    past = [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    present = [f"present.{i}.key", f"present.{i}.value"]
    if lo.profile == "ort":
        seqlens, total = lo.gqa_lengths()
        out = g.op("GroupQueryAttention", [q, k, v, *past, seqlens, total], f"{base}/GroupQueryAttention",
                   domain=MS, outputs=[f"{base}/GroupQueryAttention/output_0", *present], num_heads=nh,
                   kv_num_heads=nh, scale=scale, do_rotary=0)
        return out[0]

    def bhsd(t, n):
        t = g.op("Reshape", [t, g.const([0, 0, nh, d])], f"{base}/{n}/Reshape")
        return g.op("Transpose", [t], f"{base}/{n}/Transpose", perm=[0, 2, 1, 3])

    q, k, v = bhsd(q, "q"), bhsd(k, "k"), bhsd(v, "v")
    k = g.op("Concat", [past[0], k], f"{base}/Concat_k_cache", outputs=[present[0]], axis=2)
    v = g.op("Concat", [past[1], v], f"{base}/Concat_v_cache", outputs=[present[1]], axis=2)
    o = g.op("Attention", [q, k, v, lo.causal_mask()], f"{base}/Attention", scale=scale)
    o = g.op("Transpose", [o], f"{base}/Transpose_out", perm=[0, 2, 1, 3])
    return g.op("Reshape", [o, g.const([0, 0, nh * d])], f"{base}/Reshape_out")
