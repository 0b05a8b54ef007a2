"""The numeric conventions of the IR ops, in one place: rope tables, rotation, norms, activations, and the
Mamba-2 pieces (causal conv1d, selective scan, gated RMSNorm).

The reference interpreter (:mod:`mexc.ir.interpreter`) computes with these, and every backend that builds
tables or formulas itself (the ONNX lowering's cos/sin caches) takes them from here, so a target agrees with
the oracle by construction. Sources of each convention are named in the docstrings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import BackendError
from .types import Rope


def rope_tables(rope: Rope, head_dim: int, positions: torch.Tensor):
    """cos/sin of shape [b, s, rotary_dim] for ``positions`` [b, s] (Megatron's convention: freqs repeated for
    rotate-half, ``repeat_interleave`` for GPT-J pairs; ``linear`` scaling divides positions by ``factor``,
    ``llama3`` rescales the inverse frequencies as :func:`llama3_inv_freq`, ``yarn`` blends them as
    :func:`yarn_inv_freq` and multiplies cos and sin by :func:`yarn_attention_factor`)."""
    rd = rope.rotary_dim(head_dim)
    inv = 1.0 / (rope.base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
    pos = positions.to(torch.float64)
    if rope.scaling == "linear":
        pos = pos / rope.factor
    elif rope.scaling == "llama3":
        inv = llama3_inv_freq(inv, rope)
    elif rope.scaling == "yarn":
        inv = yarn_inv_freq(inv, rope, rd)
    freqs = pos[..., None] * inv  # [b, s, rd/2]
    emb = freqs.repeat_interleave(2, -1) if rope.interleaved else torch.cat([freqs, freqs], -1)
    m = yarn_attention_factor(rope) if rope.scaling == "yarn" else 1.0
    return (emb.cos() * m).float(), (emb.sin() * m).float()


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(r: Rope) -> float:
    """YaRN's concentration factor on cos/sin: ``get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)``
    with ``get_mscale(s, m) = 0.1 m ln(s) + 1`` (1 for s <= 1) (megatron-core
    ``_yarn_get_concentration_factor``; transformers' yarn ``attention_factor``; TensorRT-LLM
    ``create_sinusoidal_positions_yarn``)."""
    return _yarn_mscale(r.factor, r.mscale) / _yarn_mscale(r.factor, r.mscale_all_dim)


def yarn_softmax_mscale(r: Rope) -> float:
    """``get_mscale(factor, mscale_all_dim)``: MLA's softmax scale is its square over sqrt(q head dim)
    (megatron-core ``MultiLatentAttention.__init__``, transformers ``yarn_apply_mscale``)."""
    return _yarn_mscale(r.factor, r.mscale_all_dim)


def yarn_inv_freq(inv: torch.Tensor, r: Rope, dim: int) -> torch.Tensor:
    """YaRN's blend of interpolated (``inv / factor``) and extrapolated (``inv``) inverse frequencies over the
    correction range of ``beta_fast`` / ``beta_slow`` rotations at ``original_max_positions`` (floored / ceiled
    when ``truncate``), a linear ramp between (megatron-core ``YarnRotaryEmbedding.get_emb``, transformers
    ``_compute_yarn_parameters``). ``dim``: the rotary dim."""
    def corr(rot):
        return dim * math.log(r.original_max_positions / (rot * 2 * math.pi)) / (2 * math.log(r.base))

    low, high = corr(r.beta_fast), corr(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra = 1.0 - ramp  # weight of the extrapolated (unscaled) frequency
    return inv / r.factor * (1 - extra) + inv * extra


def visible(sq: int, sk: int, window: int | None) -> torch.Tensor:
    """Bool [sq, sk]: query i (absolute position sk - sq + i) sees key j iff j <= its position and, with a
    ``window``, j >= its position - window. That is megatron-core's ``get_sliding_window_causal_mask`` for
    ``window_size=(window, 0)`` (megatron/core/transformer/utils.py: keys i-window..i, window + 1 of them);
    transformers' ``sliding_window`` counts the query itself (``kv_idx > q_idx - sliding_window``,
    masking_utils.py), so it is ``window + 1``."""
    q = torch.arange(sk - sq, sk)[:, None]
    k = torch.arange(sk)[None, :]
    ok = k <= q
    return ok & (k >= q - window) if window is not None else ok


def softmax_with_sinks(scores: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over the last dim of ``scores`` [b, heads, q, k] (masked keys at -inf) with, when ``sinks``
    [heads] is given, one more logit per head in the denominator that attends to nothing: megatron-core's
    ``SoftmaxOne`` (megatron/core/fusions/fused_softmax.py: softmax of ``cat([scores, sink])``, sink column
    dropped), transformers' gpt-oss ``eager_attention_forward``, onnxruntime GroupQueryAttention ``head_sink``."""
    if sinks is None:
        return scores.softmax(-1)
    col = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, col], -1).softmax(-1)[..., :-1]


def llama3_inv_freq(inv: torch.Tensor, r: Rope) -> torch.Tensor:
    """Llama 3.1's rope scaling of inverse frequencies (megatron-core ``RotaryEmbedding._apply_scaling``,
    transformers ``_compute_llama3_parameters``): long wavelengths divided by ``factor``, short ones kept,
    a smooth blend between."""
    low_wl = r.original_max_positions / r.low_freq_factor
    high_wl = r.original_max_positions / r.high_freq_factor
    wl = 2 * math.pi / inv
    out = torch.where(wl > low_wl, inv / r.factor, inv)
    smooth = (r.original_max_positions / wl - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    mid = (1 - smooth) * out / r.factor + smooth * out
    is_mid = (wl <= low_wl) & (wl >= high_wl)
    return torch.where(is_mid, mid, out)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [b, s, h, d]; rotates the first rotary_dim channels."""
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([-x2, x1], -1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, -1)
        rot = torch.cat([-x2, x1], -1)
    return torch.cat([xr * c + rot * s, xp], -1)


def l2_norm(x, eps):
    """Weightless normalization over the last dim, in fp32: x * rsqrt(mean(x^2) + eps) (megatron-core
    ``L2Norm`` in megatron/core/transformer/torch_norm.py, despite its name a mean; transformers'
    ``Llama4TextL2Norm``). megatron-core applies it to q and k per head before rotary, Llama 4 after; a rotation
    keeps the mean of squares, so both orders agree."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm(x, weight, bias, kind, eps, zero_centered):
    """LayerNorm or RMSNorm over the last dim; ``zero_centered``: the stored gamma is (weight - 1) (Gemma,
    Megatron's LayerNorm1p). RMSNorm: x * rsqrt(mean(x^2) + eps) * w (+ bias when given)."""
    w = weight + 1.0 if zero_centered else weight
    if kind == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), w, bias, eps)
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return y + bias if bias is not None else y


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The IR's activations (:data:`mexc.ir.ops.ACTIVATIONS`): gelu (erf), gelu-tanh, relu, squared-relu
    (Primer / Nemotron), silu, quick-gelu (x * sigmoid(1.702 x), CLIP)."""
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu-tanh":
        return F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu(x)
    if name == "squared-relu":
        return F.relu(x).pow(2)
    if name == "silu":
        return F.silu(x)
    if name == "quick-gelu":
        return x * torch.sigmoid(1.702 * x)
    raise BackendError(f"unknown activation {name!r}")


def glu(act: str, gate: torch.Tensor, up: torch.Tensor, clamp: float | None = None,
        offset: float = 0.0) -> torch.Tensor:
    """act(gate) * up, or gpt-oss's clamped form: act(min(gate, clamp)) * (clamp(up, -clamp, clamp) + offset)
    (megatron-core mlp.py / moe/experts.py ``glu`` with ``activation_func_clamp_value`` and
    ``glu_linear_offset``; transformers GptOssExperts._apply_gate with quick-gelu's 1.702 = ``alpha``)."""
    if clamp is not None:
        gate, up = gate.clamp(max=clamp), up.clamp(-clamp, clamp)
    return activation(act, gate) * (up + offset if offset else up)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal convolution over time: x [b, s, C], weight [C, K], bias [C] or None -> [b, s, C]; the
    output at t sees inputs t-K+1..t (left zero padding: Megatron's conv1d with padding=K-1, trimmed)."""
    k = weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :], bias, padding=k - 1, groups=weight.shape[0])
    return y[..., : x.shape[1]].transpose(1, 2)


def ssm_scan(x, dt, A_log, B, C, D, dt_bias):
    """Mamba-2 selective scan, sequential (the oracle form of mamba_ssm's chunked kernel).

    x [b, s, nh, p]; dt [b, s, nh] (before bias); A_log, D, dt_bias [nh]; B, C [b, s, g, n] shared by the
    nh/g consecutive heads of a group. dt' = softplus(dt + dt_bias), A = -exp(A_log); per step
    h = exp(dt' A) h + dt' x B^T and y = h C + D x. Returns y [b, s, nh, p]."""
    b, s, nh, p = x.shape
    rep = nh // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)  # [b, s, nh, n]
    dt = F.softplus(dt + dt_bias)
    A = -torch.exp(A_log)
    h = x.new_zeros(b, nh, p, B.shape[-1])
    ys = []
    for t in range(s):
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + \
            (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1) + D[:, None] * x[:, t])
    return torch.stack(ys, 1)


def gated_rmsnorm(y, z, weight, groups: int, eps: float, norm_before_gate: bool):
    """Mamba-2's gated RMSNorm (mamba_ssm RMSNormGated): RMS over ``groups`` contiguous channel groups of y
    [..., I]; norm_before_gate=False (Megatron): norm(y * silu(z)) * w; True: norm(y) * w * silu(z)."""
    if not norm_before_gate:
        y = y * F.silu(z)
    g = y.reshape(*y.shape[:-1], groups, -1)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    out = g.reshape(y.shape) * weight
    return out * F.silu(z) if norm_before_gate else out


__all__ = ["activation", "apply_rope", "causal_conv1d", "gated_rmsnorm", "llama3_inv_freq", "norm", "rope_tables",
           "ssm_scan"]
