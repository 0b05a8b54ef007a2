"""Architecture overrides (``--config FILE.yaml`` fields and ``--set FIELD=VALUE``): where each comes from, and the
checks every override passes before the lift reads it, the same as the saved args get (:mod:`.config`: sizes,
enums, lists; ``window_size`` / ``window_skip`` / ``no_rope`` by the saved args' own readers there).

A bad override is one :class:`~mexc.errors.ConfigError` naming it as the user wrote it (``--set FIELD=VALUE`` or
``--config FILE: FIELD: VALUE``) and the fix; never a traceback, nor a model that loads and answers wrongly."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

from ...errors import ConfigError, MexcError
from ...ir.types import DType, Rope

# field -> (lowest, highest) int; bounds as the saved args' (config._SIZE_BOUNDS, _mla, _hybrid), 0 = "none"
_BIG = {"num_layers": 1 << 14, "hidden_size": 1 << 18, "ffn_hidden_size": 1 << 21, "num_heads": 1 << 12,
        "num_kv_heads": 1 << 12, "head_dim": 1 << 14, "padded_vocab_size": 1 << 24, "vocab_size": 1 << 24,
        "max_position_embeddings": 1 << 26, "moe_topk": 1 << 16, "moe_ffn_hidden_size": 1 << 21}
SIZES: dict[str, tuple[int, int]] = {
    **{f: (1, b) for f, b in _BIG.items()},
    **{f: (0, b) for f, b in (("num_experts", 1 << 16), ("mtp_num_layers", 1 << 10), ("moe_shared_size", 1 << 21),
                              ("moe_num_groups", 1 << 16), ("moe_group_topk", 1 << 16), ("q_lora_rank", 1 << 16),
                              ("mamba_num_heads", 1 << 16))},
    **{f: (0, 1 << 16) for f in ("kv_lora_rank", "qk_head_dim", "qk_rope_dim", "v_head_dim")},   # 0: no MLA
    **{f: (1, 1 << 16) for f in ("mamba_state_dim", "mamba_head_dim", "mamba_num_groups")},
    **{f: (1, 1 << 12) for f in ("tp", "pp", "vp", "ep")},
}
_STAGE_LAYERS = ("first_stage_layers", "last_stage_layers")      # None or 0..num_layers
_POSITIVE = ("norm_eps", "moe_topk_scale", "embedding_scale")    # finite, > 0
_POSITIVE_OR_NONE = ("softmax_scale", "mla_softmax_scale", "glu_clamp")
_FINITE = ("glu_offset",)
_LATER = ("window_size", "window_skip", "no_rope")               # checked by config._window / config._no_rope


def _choices() -> dict[str, tuple[str, ...]]:
    from ...ir.ops import ACTIVATIONS, MOE_SCORES

    return {"normalization": ("layernorm", "rmsnorm"), "activation": ACTIVATIONS,
            "position": ("learned_absolute", "rope", "none"), "softmax_type": ("vanilla", "off-by-one", "learnable"),
            "moe_score": MOE_SCORES, "replicated": ("check", "rank0", "mean")}


def show(v: Any) -> str:
    """An override's value as the user typed it (YAML flow style, at most 40 characters)."""
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def merge_overrides(config: str | Path | None, flags: dict[str, Any] | None,
                    load) -> tuple[dict[str, Any], dict[str, str]]:
    """``--config`` fields (``load(config)``, a mapping) updated by ``--set`` ones, and where each comes from:
    field -> ``--config FILE: FIELD: VALUE`` or ``--set FIELD=VALUE`` (the name errors give it)."""
    ov = load(config)
    origins = {k: f"--config {config}: {k}: {show(v)}" for k, v in ov.items()}
    ov.update(flags or {})
    origins.update({k: f"--set {k}={show(v)}" for k, v in (flags or {}).items()})
    return ov, origins


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(field: str, v: Any, bools: set[str]) -> tuple[str, str] | None:
    """(what is wrong, an example of a right value) for override ``field = v``, or None when it is fine."""
    if field in SIZES:
        lo, hi = SIZES[field]
        if not (_is_int(v) and lo <= v <= hi):
            quoted = " (a number, without quotes)" if isinstance(v, str) and v.strip().isdigit() else ""
            return f"is not a size ({lo}..{hi}){quoted}", f"{field}: N"
    elif field in _STAGE_LAYERS:
        if v is not None and not (_is_int(v) and 0 <= v <= 1 << 14):
            return "is not a layer count (0..16384) or null", f"{field}: N"
    elif field in _POSITIVE or field in _POSITIVE_OR_NONE:
        if not (v is None and field in _POSITIVE_OR_NONE) and not (_is_num(v) and v > 0):
            return (f"is not a positive finite number{' or null' if field in _POSITIVE_OR_NONE else ''}",
                    f"{field}: 0.125")
    elif field in _FINITE:
        if not _is_num(v):
            return "is not a finite number", f"{field}: 0.0"
    elif field in bools:
        if not isinstance(v, bool):
            return "is not true or false", f"{field}: true"
    elif field in _choices():
        if v not in _choices()[field]:
            return f"is not one of {', '.join(_choices()[field])}", f"{field}: {_choices()[field][0]}"
    elif field == "dtype":
        try:
            DType.parse(str(v))
        except MexcError:
            return f"is not a dtype ({', '.join(d.value for d in DType)})", "dtype: bf16"
    elif field == "rope":
        want = {f.name: type(getattr(Rope(), f.name)) for f in dataclasses.fields(Rope)}
        ok = {float: _is_num, int: _is_int, bool: lambda x: isinstance(x, bool), str: lambda x: isinstance(x, str)}
        if not isinstance(v, (dict, Rope)) or isinstance(v, dict) and any(
                k not in want or not ok.get(want[k], lambda x: True)(x) for k, x in v.items()):
            return (f"is not a mapping of rope fields to values of their kind ({', '.join(want)})",
                    "rope: {base: 10000.0}")
    elif field in ("hybrid_pattern", "family"):
        if not (isinstance(v, str) or v is None and field == "hybrid_pattern"):
            return "is not a string", f"{field}: {'M-M*-' if field == 'hybrid_pattern' else 'llama'}"
    return None


def check_overrides(overrides: dict[str, Any], origins: dict[str, str]) -> None:
    """Refuse an unknown field or a value of the wrong kind or out of range, naming the override (before any
    use). ``window_size``, ``window_skip`` and ``no_rope`` depend on other fields: config._window / _no_rope."""
    from .config import MegatronArch

    fields = {f.name: f for f in dataclasses.fields(MegatronArch)}
    bools = {n for n, f in fields.items() if f.type in ("bool", bool)}
    for k, v in overrides.items():
        if k not in fields:
            raise ConfigError(f"{origins.get(k, k)}: unknown field {k!r}",
                              hint=f"--config / --set fields: {', '.join(sorted(fields))}")
        if k in _LATER:
            continue
        bad = _problem(k, v, bools)
        if bad:
            raise ConfigError(f"{origins[k]}: {k} = {show(v)} {bad[0]}",
                              hint=f"give `{bad[1]}` in --config FILE.yaml, or --set {bad[1].replace(': ', '=')}")


_SHAPE = re.compile(r"^(?P<loc>.*?): param '(?P<param>[^']+)' has shape (?P<got>\[[^\]]*\]), "
                    r"expected (?P<want>\[[^\]]*\])$")


def check_shapes(found: list[str], overrides: dict[str, Any], origins: dict[str, str]) -> None:
    """Verifier ``found`` problems (:func:`mexc.ir.problems`) where a param's saved shape differs from what the
    overridden sizes imply: one error naming the overrides, the first tensor's shape in the checkpoint and the
    shape the config implies. Nothing when no override is a size (the saved args are then at fault: the
    verifier's own error says so)."""
    sized = [o for f, o in origins.items() if f in SIZES or f in _STAGE_LAYERS]
    hits = [m for m in map(_SHAPE.match, found) if m]
    if not hits or not sized:
        return
    m = hits[0]
    more = f" ({len(hits) - 1} more tensors disagree)" if len(hits) > 1 else ""
    raise ConfigError(f"{', '.join(sized)}: implies {m['want']} for {m['loc']} param {m['param']!r}, but the "
                      f"checkpoint's tensor is {m['got']}{more}",
                      hint="give the checkpoint's value (`mexc inspect CKPT` shows the saved args) or drop the "
                           "override")
