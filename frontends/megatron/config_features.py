"""Architecture features read from the saved args beyond the sizes (:mod:`.config` assembles them): sliding
window, YaRN, multi-latent attention, softmax scale, NoPE layers, hybrid (Mamba) patterns; each as
megatron-core computes it, with the source named in its docstring."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ...ir.types import Rope
from .args_access import _FIELD_OF_ARG, _get
from .arguments import window_problem

if TYPE_CHECKING:
    from .config import MegatronArch


def _window(args: Any, where: str, overrides: dict, origins: dict[str, str], max_pos: int) -> dict[str, Any]:
    """``window_size`` / ``window_attn_skip_freq`` as megatron-core reads them (``TransformerConfig``;
    ``--window-size`` is a ``tuple_type``, NeMo saves a list). Honoured: ``(L, 0)`` with ``L >= 0`` (query i sees
    keys i-L..i). Refused by the argument table (:func:`.arguments.window_problem`), and here for an override: a
    right window (a query would see later tokens) and ``-1`` (Transformer Engine reads it as unbounded, the local
    attention's ``get_sliding_window_causal_mask`` as an empty window: the two disagree). Refused too, saved or
    overridden: ``L >= max_position_embeddings`` (a window longer than any sequence is full attention, which is
    said by giving no window, not by a window size no target means; docs/arguments.md)."""
    w = overrides["window_size"] if "window_size" in overrides else _get(args, "window_size")
    if w is None:
        return {}
    if "window_size" in overrides and window_problem(w):   # saved values were judged by the argument table
        raise ConfigError(f"{origins['window_size']}: {window_problem(w)}",
                          hint="give window_size: [L, 0] in --config FILE.yaml")
    if isinstance(w, str):
        w = [int(p) for p in w.strip("()[] ").split(",")]
    left = int(w[0])
    if left >= max_pos:
        raise ConfigError(f"{origins.get('window_size', where)}: a window of {left} tokens is not below "
                          f"max_position_embeddings={max_pos}: every query would see every earlier key (full "
                          "attention)", hint=f"give a window below {max_pos}, or no window for full attention "
                                             "(--set window_size=null)")
    skip = overrides["window_skip"] if "window_skip" in overrides else _get(args, "window_skip")
    where = origins.get("window_skip", where)
    if isinstance(skip, str):   # Megatron-LM's moe_freq_type keeps a list expression as text until parsed
        skip = [int(v) for v in skip.strip("[] ").split(",") if v.strip()] if "[" in skip else int(skip)
    if skip is not None and not (isinstance(skip, int) and not isinstance(skip, bool) and skip > 0) and not (
            isinstance(skip, (list, tuple)) and all(v in (0, 1) for v in skip)):
        raise ConfigError(f"{where}: window_attn_skip_freq = {str(skip)[:40]} is neither a positive int nor a 0/1 "
                          "list", hint="give window_skip: N or [1, 0, ...] in --config FILE.yaml (or --set)")
    return {"window_size": (left, 0), "window_skip": list(skip) if isinstance(skip, (list, tuple)) else skip}


def layer_window(arch: MegatronArch, layer: int) -> int | None:
    """The left window of 0-based ``layer`` (None: full attention), as megatron-core's
    ``is_layer_window_attention(window_size, window_attn_skip_freq, layer_number)`` decides with the 1-based
    ``layer_number``: every layer without a skip setting; with an int N, layers whose number is not a multiple of
    N; with a list, those whose entry is 1 (megatron/core/transformer/utils.py)."""
    if arch.window_size is None:
        return None
    n, skip = layer + 1, arch.window_skip
    if skip is None:
        windowed = True
    elif isinstance(skip, int):
        windowed = n % skip != 0
    else:
        windowed = bool(skip[layer]) if layer < len(skip) else False
    return arch.window_size[0] if windowed else None
def _yarn_rope(args: Any, rope: Rope, **kw) -> Rope:
    """YaRN knobs as megatron-core's YarnRotaryEmbedding takes them (None = its defaults: 4096 original
    positions, beta 32 / 1, mscale 1 / 0, rounded correction range)."""
    def f(field, default):
        v = _get(args, field)
        return default if v is None else v

    # _yarn_get_concentration_factor: with either mscale unset, get_mscale(factor) alone (= mscale 1 over 0)
    both = _get(args, "mscale") is not None and _get(args, "mscale_all_dim") is not None
    return dataclasses.replace(
        rope, scaling="yarn", factor=float(f("rotary_scaling_factor", 1.0)),
        original_max_positions=int(f("yarn_original_max", 4096)), beta_fast=float(f("yarn_beta_fast", 32.0)),
        beta_slow=float(f("yarn_beta_slow", 1.0)), mscale=float(f("mscale", 1.0)) if both else 1.0,
        mscale_all_dim=float(f("mscale_all_dim", 0.0)) if both else 0.0, truncate=bool(f("yarn_round", True)), **kw)


def _yarn(args: Any, where: str, rope: Rope) -> Rope:
    """position_embedding_type yarn on a GPTModel (Megatron-LM 0.19 ``_apply_yarn_config_from_args``: factor
    from rotary_scaling_factor, mscale / mscale_all_dim, yarn_*): megatron-core's YarnRotaryEmbedding rotates
    the whole head (it ignores rotary_percent) and asserts rotate-half."""
    if rope.interleaved:
        raise ConfigError(f"{where}: position_embedding_type yarn with rotary_interleaved: megatron-core's "
                          "YarnRotaryEmbedding does not support interleaved rotary", hint="the checkpoint's "
                          "args are inconsistent; if it was trained without, set `rope: {interleaved: false}` "
                          "in --config")
    if rope.percent != 1.0:
        raise ConfigError(f"{where}: position_embedding_type yarn with rotary_percent={rope.percent:g}: "
                          "megatron-core's YarnRotaryEmbedding ignores rotary_percent (it rotates the whole head)",
                          hint="set `rope: {percent: 1.0}` in --config (what megatron-core computed)")
    return _yarn_rope(args, rope)


def _mla(args: Any, where: str, rope: Rope, overrides: dict | None = None) -> dict[str, Any]:
    """Multi-latent attention sizes and its decoupled rope (megatron-core MultiLatentAttention: RotaryEmbedding
    or YarnRotaryEmbedding over qk_pos_emb_head_dim, applied to GPT-J pairs; softmax scale
    get_mscale(rotary_scaling_factor, mscale_all_dim)^2 / sqrt(qk_head_dim + qk_pos_emb_head_dim), whatever
    the rope type). rope_type None is MLATransformerConfig's default, yarn. A size in ``overrides`` (checked by
    :func:`_check_overrides`; qk_pos_emb_head_dim is the field qk_rope_dim) replaces the saved one."""
    from ...ir.semantics import yarn_softmax_mscale

    sizes = {}
    for f, default in (("kv_lora_rank", 32), ("qk_head_dim", 128), ("qk_pos_emb_head_dim", 64),
                       ("v_head_dim", 128)):
        field = _FIELD_OF_ARG.get(f, f)
        v = overrides[field] if field in (overrides or {}) else _get(args, f, default)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
            raise ConfigError(f"{where}: args.{f} = {str(v)[:40]} is not a size (1..65536)",
                              hint=f"the saved args are damaged; give {field} with --config FILE.yaml")
        sizes[f] = v
    q_lora = overrides["q_lora_rank"] if "q_lora_rank" in (overrides or {}) else _get(args, "q_lora_rank")
    if q_lora is not None and (not isinstance(q_lora, int) or isinstance(q_lora, bool) or not 1 <= q_lora <= 1 << 16):
        raise ConfigError(f"{where}: args.q_lora_rank = {str(q_lora)[:40]} is not a size (1..65536) or None",
                          hint="give q_lora_rank with --config FILE.yaml")
    kind = _get(args, "rope_type") or "yarn"
    base = Rope(base=rope.base, interleaved=True)
    if kind == "yarn":
        mrope = _yarn_rope(args, base)
    else:
        mrope = dataclasses.replace(base, percent=rope.percent)
    scaled = _yarn_rope(args, base)   # the softmax mscale reads rotary_scaling_factor for either rope type
    scale = yarn_softmax_mscale(scaled) ** 2 / math.sqrt(sizes["qk_head_dim"] + sizes["qk_pos_emb_head_dim"])
    return {"mla": True, "rope": mrope, "q_lora_rank": q_lora or 0, "kv_lora_rank": sizes["kv_lora_rank"],
            "qk_head_dim": sizes["qk_head_dim"], "qk_rope_dim": sizes["qk_pos_emb_head_dim"],
            "v_head_dim": sizes["v_head_dim"], "mla_softmax_scale": scale}
def _softmax_scale(args: Any, where: str) -> float | None:
    """Megatron's ``softmax_scale`` (the attention logits' multiplier; None: 1/sqrt(kv_channels)), refused
    unless a positive finite number."""
    v = _get(args, "softmax_scale")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ConfigError(f"{where}: args.softmax_scale = {str(v)[:40]} is not a positive number",
                          hint="the saved args are damaged; give softmax_scale with --config FILE.yaml")
    return float(v)


def _no_rope(args: Any, where: str, num_layers: int) -> tuple[int, ...] | None:
    """Megatron's ``no_rope_freq`` as one 0/1 per layer (1: that layer's attention gets no rotary), as megatron-core
    0.16.1 expands it (``TransformerConfig.__post_init__``): an int N is ``[0] * (N - 1) + [1]`` repeated, num_layers
    divisible by N; a list has one entry per layer (``attention.py``: ``no_rope_freq[layer_number - 1]``)."""
    v = _get(args, "no_rope")
    if v is None or v == 0 or v == []:
        return None
    fix = "give no_rope with --config FILE.yaml as a list of 0/1, one per layer"
    if isinstance(v, int) and not isinstance(v, bool):
        if v < 1 or num_layers % v:
            raise ConfigError(f"{where}: no_rope_freq={v} does not divide num_layers={num_layers}", hint=fix)
        return tuple(([0] * (v - 1) + [1]) * (num_layers // v))
    if isinstance(v, (list, tuple)) and len(v) == num_layers and all(x in (0, 1) and not isinstance(x, float)
                                                                     for x in v):
        return tuple(int(x) for x in v)
    raise ConfigError(f"{where}: no_rope_freq = {str(v)[:40]} is neither an int nor a 0/1 list of num_layers="
                      f"{num_layers} entries", hint=fix)


def _hybrid(args: Any, where: str, hidden: int, overrides: dict | None = None) -> dict[str, Any]:
    """The hybrid Mamba fields (megatron/core/ssm/mamba_mixer.py: nheads = mamba_num_heads, else
    expand * hidden / mamba_head_dim with expand = 2). The pattern's ``|`` (pipeline cuts) are dropped; an MTP
    part (``/``) is refused. A field in ``overrides`` replaces the saved one (and its check)."""
    overrides = overrides or {}
    pattern = overrides["hybrid_pattern"] if "hybrid_pattern" in overrides else _get(args, "hybrid_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise ConfigError(f"{where}: hybrid_override_pattern = {str(pattern)[:40]} is not a string",
                          hint="give hybrid_pattern: M-M*- in --config FILE.yaml")
    if pattern and "/" in pattern:
        raise ConfigError(f"{where}: hybrid pattern {pattern!r} has multi-token-prediction layers (after '/'), "
                          "which mexc does not lift", hint="convert the main model's layers: --set "
                          f"hybrid_pattern={pattern.split('/')[0].replace('|', '')}")
    out: dict[str, Any] = {"hybrid_pattern": pattern.replace("|", "") if pattern else None}
    for f in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads"):
        v = overrides[f] if f in overrides else _get(args, f)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16):
            raise ConfigError(f"{where}: args.{f} = {str(v)[:40]} is not a size (1..65536)",
                              hint=f"the saved args are damaged; give {f} with --config FILE.yaml")
        if v is not None:
            out[f] = v
    if not out.get("mamba_num_heads"):
        out["mamba_num_heads"] = 2 * hidden // out.get("mamba_head_dim", 64)
    return out


def _list_expression(text: str) -> list | None:
    """Megatron-LM's list text (``moe_freq_type``: digits, commas, brackets, parentheses, ``+`` and ``*``, e.g.
    ``([0]*1+[1]*2)``) evaluated without ``eval``: lists of ints, list + list, list * int; None if it is not one."""
    import ast

    def ev(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            return n.value
        if isinstance(n, (ast.List, ast.Tuple)):
            return [ev(e) for e in n.elts]
        if isinstance(n, ast.BinOp) and isinstance(n.op, (ast.Add, ast.Mult)):
            a, b = ev(n.left), ev(n.right)
            if isinstance(n.op, ast.Add) and isinstance(a, list) and isinstance(b, list):
                return a + b
            if isinstance(n.op, ast.Mult) and isinstance(a, list) != isinstance(b, list):
                k = b if isinstance(a, list) else a
                if 0 <= k <= 1 << 14:
                    return a * k if isinstance(a, list) else b * k
        raise ValueError(text)

    try:
        v = ev(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return v if isinstance(v, list) else None


def moe_layer_pattern(v: Any, num_layers: int, where: str) -> tuple[int, ...]:
    """Megatron's ``moe_layer_freq`` as one 0/1 per layer (1: a MoE layer), as megatron-core 0.16.1 expands it
    (``models/gpt/gpt_layer_specs.py`` ``get_gpt_decoder_layer_specs``): an int N is ``i % N == 0`` for layer i
    (0-based); a list has one entry per layer; Megatron-LM's text form (``moe_freq_type``: ``"2"`` or
    ``"([0]*1+[1]*2)"``) is read the same. Raises :class:`ConfigError` for anything else (megatron-core builds no
    model from it)."""
    if isinstance(v, str):
        v = _list_expression(v) if "[" in v else int(v) if v.strip().isdigit() else v
    fix = "give moe_layer_freq with --set / --config: an int N (every N-th layer from 0) or a 0/1 list per layer"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return tuple(int(i % v == 0) for i in range(num_layers))
    if isinstance(v, (list, tuple)) and len(v) == num_layers and all(type(x) is int and x in (0, 1) for x in v):
        return tuple(v)
    raise ConfigError(f"{where}: moe_layer_freq = {str(v)[:40]} is neither a positive int nor a 0/1 list of "
                      f"num_layers={num_layers} entries (megatron-core builds no MoE model from it)", hint=fix)
