"""The architecture of a Megatron checkpoint, read from its saved args with every alias, overridable."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...ir.types import DType, Rope
from .args_access import _FIELD_OF_ARG, ARG_ALIASES, _get  # noqa: F401 - ARG_ALIASES re-exported
from .arguments import refuse
from .config_features import _hybrid, _mla, _no_rope, _softmax_scale, _window, _yarn, _yarn_rope
from .overrides import check_overrides as _check_overrides
from .overrides import show as _show

@dataclass(frozen=True)
class MegatronArch:
    """What the IR needs from the args; `from_args` fills it, `overrides` (YAML/flags) may replace fields."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    padded_vocab_size: int
    vocab_size: int
    max_position_embeddings: int
    normalization: str = "layernorm"      # layernorm | rmsnorm
    norm_eps: float = 1e-5
    zero_centered_gamma: bool = False
    activation: str = "gelu"              # gelu | squared-relu | silu | relu ...
    gated: bool = False
    glu_clamp: float | None = None        # activation_func_clamp_value (gpt-oss clamped GLU)
    glu_offset: float = 0.0               # glu_linear_offset: act(gate) * (up + offset)
    add_bias_linear: bool = True
    add_qkv_bias: bool = True
    position: str = "learned_absolute"    # learned_absolute | rope | none
    rope: Rope = Rope()
    tied: bool = True
    qk_layernorm: bool = False
    qk_l2_norm: bool = False              # Llama 4's weightless q/k norm (megatron-core L2Norm)
    output_gate: bool = False             # attention_output_gate: linear_qkv also emits a gate per query head
    window_size: tuple[int, int] | None = None   # Megatron's (left, right) sliding window; right is 0
    window_skip: int | list | None = None  # window_attn_skip_freq: int N (every N-th layer full) or 0/1 list
    softmax_scale: float | None = None   # None: 1/sqrt(head_dim) (megatron-core DotProductAttention)
    softmax_type: str = "vanilla"         # vanilla | off-by-one | learnable (attention sinks, SoftmaxOne)
    no_rope: tuple[int, ...] | None = None  # per layer, 1 = no rotary on that layer (Megatron's no_rope_freq)
    mtp_num_layers: int = 0               # multi-token-prediction layers: their mtp.* tensors are dropped
    num_experts: int = 0
    moe_topk: int = 2
    moe_ffn_hidden_size: int = 0
    moe_score: str = "softmax"
    moe_pre_softmax: bool = False
    moe_topk_scale: float = 1.0           # moe_router_topk_scaling_factor (None in the args = 1)
    moe_shared_size: int = 0              # moe_shared_expert_intermediate_size (0: no shared expert)
    moe_shared_gate: bool = False         # moe_shared_expert_gate
    moe_num_groups: int = 0               # moe_router_num_groups (0: not group-limited)
    moe_group_topk: int = 0               # moe_router_group_topk
    moe_expert_bias: bool = False         # moe_router_enable_expert_bias
    moe_layer_freq: int | list | str | None = 1   # as saved; config_features.moe_layer_pattern expands it
    parallel_block: bool = False
    embedding_scale: float = 1.0
    tp: int = 1
    pp: int = 1
    vp: int = 1
    ep: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    dtype: DType = DType.f32
    family: str = "gpt"
    replicated: str = "check"             # TP copies of replicated tensors: check | rank0 | mean (replicated.py)
    hybrid_pattern: str | None = None     # Megatron's hybrid_override_pattern (M * - E), pipes removed
    mamba_state_dim: int = 128
    mamba_head_dim: int = 64
    mamba_num_groups: int = 8
    mamba_num_heads: int = 0              # 0: Megatron's default, 2 x hidden / mamba_head_dim
    mla: bool = False                     # multi_latent_attention: rope is the decoupled rope's (GPT-J pairs)
    q_lora_rank: int = 0                  # 0: one q projection (q_lora_rank None)
    kv_lora_rank: int = 0
    qk_head_dim: int = 0
    qk_rope_dim: int = 0                  # qk_pos_emb_head_dim
    v_head_dim: int = 0
    mla_softmax_scale: float | None = None


# saved sizes an untrusted checkpoint may lie about: each an int in [1, bound] when present (bounds far above any
# real model, so that no later product, loop or allocation is unbounded)
_SIZE_BOUNDS = {
    "num_layers": 1 << 14, "hidden_size": 1 << 18, "ffn_hidden_size": 1 << 21, "num_attention_heads": 1 << 12,
    "num_query_groups": 1 << 12, "kv_channels": 1 << 14, "padded_vocab_size": 1 << 24, "vocab_size": 1 << 24,
    "seq_length": 1 << 26, "max_position_embeddings": 1 << 26, "num_experts": 1 << 16, "moe_router_topk": 1 << 16,
    "moe_ffn_hidden_size": 1 << 21, "mtp_num_layers": 1 << 10,
}


# saved arg name -> the MegatronArch field (the name --config / --set accept) that replaces it


def _check_sizes(args: Any, where: str, overrides: dict | None = None) -> None:
    """Refuse a saved size that is not a positive int within bounds, naming the argument (before any use) and
    the field that replaces it (a size an override replaces is not read)."""
    import torch

    for name, bound in _SIZE_BOUNDS.items():
        v = args.get(name) if isinstance(args, dict) else getattr(args, name, None)
        field = _FIELD_OF_ARG.get(name, name)
        if v is None or field in (overrides or {}):
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= bound:
            raise ConfigError(f"{where}: args.{name} = {str(v)[:40]} is not a size (1..{bound})",
                              hint=f"the saved args are damaged; give {field} with --config FILE.yaml")
    dt = args.get("params_dtype") if isinstance(args, dict) else getattr(args, "params_dtype", None)
    if dt is not None and not isinstance(dt, torch.dtype) and "dtype" not in (overrides or {}):
        raise ConfigError(f"{where}: args.params_dtype = {str(dt)[:40]} is not a torch dtype",
                          hint="the saved args are damaged; give dtype with --config FILE.yaml")


def from_args(args: Any, where: str, overrides: dict[str, Any] | None = None,
              origins: dict[str, str] | None = None) -> MegatronArch:
    """Build the architecture from saved args (``where`` names the file for errors).

    ``overrides`` (field -> value, from --config / --set) pass the same checks as the saved args; ``origins``
    (field -> ``--set FIELD=VALUE`` or ``--config FILE: FIELD: VALUE``, :func:`merge_overrides`) names an
    override in its error. Raises :class:`ConfigError` when a saved argument changes the math and mexc does not
    honour it (the argument table, :mod:`.arguments`), or when the args or an override are missing, out of
    range or inconsistent."""
    overrides = dict(overrides or {})
    origins = {k: (origins or {}).get(k) or f"config override {k}={_show(v)}" for k, v in overrides.items()}
    _check_overrides(overrides, origins)
    _check_sizes(args, where, overrides)
    refuse(args, where, overridden={f for f in overrides if f in ARG_ALIASES})

    def need(field):
        if field in overrides:
            return overrides[field]
        v = _get(args, field)
        if v is None:
            raise ConfigError(f"{where}: the saved args have no {' / '.join(ARG_ALIASES[field])}",
                              hint=f"give it in --config FILE.yaml as `{field}: VALUE`")
        return v

    L, H, nh = int(need("num_layers")), int(need("hidden_size")), int(need("num_heads"))
    gqa = bool(_get(args, "gqa", False))
    nkv = int(overrides.get("num_kv_heads") or (_get(args, "num_query_groups") if gqa else nh) or nh)
    d = int(overrides.get("head_dim") or _get(args, "kv_channels") or H // nh)
    swiglu = bool(_get(args, "swiglu", False))
    squared = bool(_get(args, "squared_relu", False))
    ffn = _get(args, "ffn_hidden_size")
    if ffn is None:
        ffn = int(8 * H / 3 / 64) * 64 if swiglu else 4 * H
    norm = str(_get(args, "normalization", "LayerNorm")).lower()
    norm = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}.get(norm)
    if norm is None and "normalization" not in overrides:
        raise ConfigError(f"{where}: unknown normalization {_get(args, 'normalization')!r}",
                          hint="mexc reads LayerNorm and RMSNorm; set `normalization:` in --config")
    pos = _get(args, "position_embedding_type")
    if pos is None:
        pos = "rope" if _get(args, "use_rotary", False) else "learned_absolute"
    if pos not in ("rope", "learned_absolute", "none", "yarn") and "position" not in overrides:
        raise ConfigError(f"{where}: position_embedding_type {pos!r} is not supported yet",
                          hint="mexc lifts rope, yarn, learned_absolute and none (field `position:` in --config "
                               "if the args are wrong)")
    scaling, factor = "none", 1.0
    if _get(args, "use_rope_scaling", False):
        scaling, factor = "llama3", float(_get(args, "rope_scaling_factor", 8.0))
    elif _get(args, "rope_interpolation"):
        scaling, factor = "linear", float(_get(args, "rope_interpolation"))
    rope = Rope(base=float(_get(args, "rotary_base", 10000)), percent=float(_get(args, "rotary_percent", 1.0)),
                interleaved=bool(_get(args, "rotary_interleaved", False)), scaling=scaling, factor=factor)
    mla_fields = _mla(args, where, rope, overrides) if _get(args, "mla", False) else {}
    if mla_fields:
        rope, pos = mla_fields["rope"], "rope"
    elif pos == "yarn":   # an overridden rope replaces the saved yarn knobs (and their checks)
        rope, pos = (_yarn_rope(args, rope) if "rope" in overrides else _yarn(args, where, rope)), "rope"
    bias = bool(_get(args, "add_bias_linear", not _get(args, "disable_bias_linear", False)))
    padded = int(need("padded_vocab_size"))
    vocab = int(overrides.get("vocab_size") or _get(args, "vocab_size") or padded)
    if "vocab_size" not in overrides and _get(args, "vocab_size") and \
            (args.get("tokenizer_type") if isinstance(args, dict) else getattr(args, "tokenizer_type", None)) \
            == "NullTokenizer":
        # Megatron-LM's NullTokenizer has --vocab-size ids plus its end-of-document id (= vocab_size): its
        # vocab_size property is vocab_size + 1 (megatron/training/tokenizer/tokenizer.py, _NullTokenizer)
        vocab = min(vocab + 1, padded)
    params_dtype = _get(args, "params_dtype")
    if _get(args, "bf16", False):
        dtype = DType.bf16
    elif _get(args, "fp16", False):
        dtype = DType.f16
    else:
        dtype = DType.f32 if params_dtype is None else DType.from_torch(params_dtype)
    E = int(_get(args, "num_experts") or 0)
    # absent (0.9: every layer MoE) reads as 1; a saved None stays None (megatron-core builds no model from it)
    freq = args.get("moe_layer_freq", 1) if isinstance(args, dict) else getattr(args, "moe_layer_freq", 1)
    vp = _get(args, "vp") or 1
    # swiglu = gated SiLU; gated_linear_unit (NeMo) gates whichever activation the other flags pick (Gemma: GeGLU
    # with openai_gelu = tanh GELU); openai_gelu / squared_relu as in Megatron-LM's core_transformer_config_from_args
    quick = bool(_get(args, "quick_geglu", False))
    gated = swiglu or quick or bool(_get(args, "gated_linear_unit", False))
    if swiglu:
        activation = "silu"
    elif squared:
        activation = "squared-relu"
    elif quick:                                # gpt-oss: quick_gelu GLU (Megatron-LM sets gated_linear_unit)
        activation = "quick-gelu"
    elif _get(args, "openai_gelu", False):
        activation = "gelu-tanh"
    else:
        activation = "gelu"
    emb_scale = _get(args, "embedding_scale", 1.0)
    if emb_scale is True:                      # NeMo's scale_embedding / Gemma: sqrt(hidden)
        emb_scale = math.sqrt(H)
    emb_scale = float(emb_scale or 1.0)
    parallel = bool(_get(args, "parallel_attn", False))
    if E:
        family = "mixtral"
    elif emb_scale != 1.0:
        family = "gemma"
    elif parallel:
        family = "falcon"
    elif squared:
        family = "nemotron"
    elif norm == "rmsnorm" and swiglu and pos == "rope":
        family = "llama"
    else:
        family = "gpt"
    fields = dict(
        num_layers=L, hidden_size=H, num_heads=nh, num_kv_heads=nkv, head_dim=d, ffn_hidden_size=int(ffn),
        padded_vocab_size=padded, vocab_size=min(vocab, padded),
        max_position_embeddings=int(_get(args, "max_position_embeddings", 4096)), normalization=norm,
        norm_eps=float(_get(args, "norm_eps", 1e-5)), zero_centered_gamma=bool(_get(args, "zero_centered_gamma", False)),
        activation=activation, gated=gated, add_bias_linear=bias,
        glu_clamp=None if _get(args, "glu_clamp") is None else float(_get(args, "glu_clamp")),
        glu_offset=float(_get(args, "glu_offset") or 0.0),
        add_qkv_bias=bool(_get(args, "add_qkv_bias", False)) or bias, position=pos, rope=rope,
        tied=not bool(_get(args, "untie", False)), qk_layernorm=bool(_get(args, "qk_layernorm", False)),
        qk_l2_norm=bool(_get(args, "qk_l2_norm", False)), output_gate=bool(_get(args, "output_gate", False)),
        **_window(args, where, overrides, origins,
                  int(overrides.get("max_position_embeddings") or _get(args, "max_position_embeddings", 4096))),
        softmax_scale=None if "softmax_scale" in overrides else _softmax_scale(args, where),
        softmax_type=str(_get(args, "softmax_type") or "vanilla"),
        no_rope=_no_rope({"no_rope_freq": overrides["no_rope"]} if "no_rope" in overrides else args,
                         origins.get("no_rope", where), L),
        mtp_num_layers=int(_get(args, "mtp_num_layers") or 0),
        num_experts=E, moe_topk=int(_get(args, "moe_topk", 2) or 2),
        moe_ffn_hidden_size=int(_get(args, "moe_ffn_hidden_size") or ffn),
        moe_score=str(_get(args, "moe_score", "softmax")), moe_pre_softmax=bool(_get(args, "moe_pre_softmax", False)),
        moe_topk_scale=float(_get(args, "moe_topk_scale") or 1.0),
        moe_shared_size=int(_get(args, "moe_shared_size") or 0),
        moe_shared_gate=bool(_get(args, "moe_shared_gate", False)),
        moe_num_groups=int(_get(args, "moe_num_groups") or 0), moe_group_topk=int(_get(args, "moe_group_topk") or 0),
        moe_expert_bias=bool(_get(args, "moe_expert_bias", False)),
        moe_layer_freq=freq,
        parallel_block=parallel,
        embedding_scale=emb_scale,
        tp=int(_get(args, "tp", 1) or 1), pp=int(_get(args, "pp", 1) or 1), vp=int(vp), ep=int(_get(args, "ep", 1) or 1),
        first_stage_layers=_get(args, "first_stage_layers"), last_stage_layers=_get(args, "last_stage_layers"),
        dtype=dtype, family=family,
    )
    fields.update(_hybrid(args, where, H, overrides))
    fields.update(mla_fields)
    if mla_fields:
        fields["family"] = "deepseek"
    if fields["hybrid_pattern"]:
        fields["family"] = "nemotron_h"
    for k, v in overrides.items():
        if k in ("window_size", "window_skip", "no_rope"):   # read (and checked) by _window / _no_rope
            continue
        if k == "rope" and isinstance(v, dict):   # the fields given replace the lifted rope's
            v = dataclasses.replace(fields["rope"], **v)
        if k == "dtype":
            v = DType.parse(v)
        fields[k] = v
    arch = MegatronArch(**fields)
    _validate(arch, where, origins)
    return arch


def _validate(a: MegatronArch, where: str, origins: dict[str, str] | None = None):
    """Refuse sizes that do not fit together; the message names the overrides among the fields involved (else
    ``where``, the checkpoint's args file)."""
    problems, involved = [], []
    if a.num_heads % a.num_kv_heads:
        problems.append(f"num_attention_heads={a.num_heads} is not a multiple of num_query_groups={a.num_kv_heads}")
    if a.padded_vocab_size % a.tp:
        problems.append(f"padded_vocab_size={a.padded_vocab_size} does not split over tp={a.tp}")
    if a.num_layers % (a.pp * a.vp) and a.first_stage_layers is None and a.last_stage_layers is None:
        problems.append(f"num_layers={a.num_layers} does not split over pp={a.pp} x vp={a.vp}")
    if a.hybrid_pattern is not None:
        bad = sorted(set(a.hybrid_pattern) - set("M*-E"))
        if bad:
            problems.append(f"hybrid pattern {a.hybrid_pattern!r} has layer symbols {bad} mexc does not lift "
                            "(M mamba, * attention, - MLP, E MoE)")
        elif len(a.hybrid_pattern) != a.num_layers:
            problems.append(f"hybrid pattern {a.hybrid_pattern!r} has {len(a.hybrid_pattern)} layers, "
                            f"num_layers={a.num_layers}")
        if a.mamba_num_heads % a.mamba_num_groups:
            problems.append(f"mamba_num_heads={a.mamba_num_heads} is not a multiple of mamba_num_groups="
                            f"{a.mamba_num_groups}")
    if isinstance(a.window_skip, list) and a.window_size is not None and len(a.window_skip) != a.num_layers:
        problems.append(f"window_attn_skip_freq lists {len(a.window_skip)} layers, num_layers={a.num_layers}")
    if a.replicated not in ("check", "rank0", "mean"):
        problems.append(f"replicated={a.replicated!r} (use check, rank0 or mean)")
    if a.num_experts and a.moe_num_groups:   # megatron-core group_limited_topk: experts split into equal groups
        if a.num_experts % a.moe_num_groups:
            problems.append(f"num_experts={a.num_experts} is not a multiple of moe_num_groups={a.moe_num_groups}")
        if not 1 <= a.moe_group_topk <= a.moe_num_groups:
            problems.append(f"moe_group_topk={a.moe_group_topk} is not in 1..moe_num_groups={a.moe_num_groups}")
        elif a.moe_group_topk * (a.num_experts // a.moe_num_groups) < a.moe_topk:   # top-k among the kept groups
            problems.append(f"moe_group_topk={a.moe_group_topk} groups of {a.num_experts // a.moe_num_groups} experts "
                            f"(num_experts={a.num_experts} / moe_num_groups={a.moe_num_groups}) hold fewer than "
                            f"moe_topk={a.moe_topk} experts")
        elif a.moe_topk < a.moe_group_topk:   # a group's score sums its best moe_topk // moe_group_topk = 0
            problems.append(f"moe_topk={a.moe_topk} is below moe_group_topk={a.moe_group_topk}: megatron-core ranks a "
                            "group by the sum of its best moe_topk // moe_group_topk scores")
    def said(f, p):   # problem p names field f (or a saved arg it replaces)
        names = {f, *ARG_ALIASES.get(f, ()), *(a for a, g in _FIELD_OF_ARG.items() if g == f)}
        return any(f"{n}=" in p or f" {n} " in f" {p} " for n in names)
    involved = [o for f, o in (origins or {}).items() if any(said(f, p) for p in problems)]
    if problems and involved:
        raise ConfigError(f"{', '.join(involved)}: does not fit the checkpoint: " + "; ".join(problems),
                          hint="give values that fit together (`mexc inspect CKPT` shows the saved args)")
    if problems:
        raise ConfigError(f"{where}: inconsistent args: " + "; ".join(problems),
                          hint="fix them with --config FILE.yaml")


def load_overrides(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file", hint="give --config the path of a YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})", hint="write `field: value` lines") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of field: value", hint="write `field: value` lines")
    return data

