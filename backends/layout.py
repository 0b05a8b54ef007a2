"""Whether a model fits the target layout (``--tp`` / ``--pp``), said in one line with the sizes that do fit.

``reshard``'s precondition lists every node that does not split (thousands of characters for a large model);
before the pipeline runs, :func:`check_layout` asks the same precondition for the requested sizes and for
each candidate, and raises one :class:`~mexc.errors.UsageError` such as
``--tp 3 does not divide 16 attention heads / 4 KV heads; use --tp 1, 2 or 4``. Problems a later pass of the
pipeline fixes (QKV layouts: fuse-qkv, relayout-qkv) are not counted.
"""

from __future__ import annotations

import re

from ..errors import UsageError
from ..ir import Model

_FIXED_BY_PIPELINE = re.compile(r"relayout-qkv|fuse-qkv")


def _problems(model: Model, tp: int, pp: int, ep: int) -> list[str]:
    from ..passes.reshard import Reshard

    return [p for p in Reshard(tp=tp, pp=pp, ep=ep).requires(model) if not _FIXED_BY_PIPELINE.search(p)]


def _choices(values: list[int]) -> str:
    v = [str(x) for x in values]
    return v[0] if len(v) == 1 else ", ".join(v[:-1]) + " or " + v[-1]


def check_layout(model: Model, passes: list) -> None:
    """Raise one summarised UsageError when the pipeline's ``reshard`` cannot split ``model``."""
    reshard = next((p for p in passes if getattr(p, "name", "") == "reshard"), None)
    if reshard is None:
        return
    tp, pp, ep = reshard.tp, reshard.pp, reshard.ep
    if not _problems(model, tp, pp, ep):
        return
    if ep > 1 and not any(True for _ in model.graph.find("moe")):
        raise UsageError(f"--ep {ep}: this {model.config.family} model has no experts to split (expert parallelism "
                         "is for MoE layers)", hint=f"drop --ep (--tp {tp} alone splits the dense layers)")
    L = model.config.num_layers
    if pp > L:
        fits = [p for p in range(1, L + 1) if not _problems(model, tp, p, ep)] or [1]
        raise UsageError(f"--pp {pp} exceeds the model's {L} layers; use --pp {_choices(fits[:8])}",
                         hint="each pipeline stage needs at least one layer")
    if _problems(model, 1, pp, 1) or (ep > 1 and ep != tp):
        return   # not a TP size problem: reshard's own message says what
    attn = {(n.attrs["num_heads"], n.attrs["num_kv_heads"]) for n in model.graph.find("attention")}
    top = max([nh for nh, _ in attn] or [tp])
    fits = [t for t in range(1, max(top, 1) + 1) if not _problems(model, t, pp, t if ep > 1 else 1)]
    heads = " and ".join(f"{nh} attention heads / {nkv} KV heads" for nh, nkv in sorted(attn))
    bad_heads = any(nh % tp or (nkv % tp and tp % nkv) for nh, nkv in attn)
    if bad_heads:
        what = f"does not divide {heads}"
    else:
        ffn = sorted({n.params["fc2"].type.shape[-1] for n in model.graph.find(("mlp", "moe"))
                      if "fc2" in n.params})
        what = (f"does not divide the MLP's {' / '.join(map(str, ffn))} hidden units" if ffn
                else "does not split this model")
    use = f"use --tp {_choices(fits)}" if fits else "no tensor-parallel size fits"
    raise UsageError(f"--tp {tp} {what}; {use}",
                     hint="a TP size must divide the attention heads, divide or be a multiple of the KV heads, "
                          "and divide the MLP width")


def check_group_size(model: Model, passes: list) -> None:
    """One summarised UsageError when a ``quantize`` pass's group size does not divide the input features of
    the weights it quantizes (its precondition lists every such weight, one clause each)."""
    from ..passes.quantize import LINEAR_WEIGHTS

    for q in passes:
        gs = getattr(q, "group_size", 0) if getattr(q, "name", "") == "quantize" else 0
        if not gs:
            continue
        feats = sorted({p.type.shape[-1] for node, name, p in model.graph.params()
                        if (node.op, name) in LINEAR_WEIGHTS and node.op not in q.exclude})
        bad = [f for f in feats if f % gs]
        if not bad:
            continue
        fits = [g for g in (16, 32, 64, 128, 256) if g < gs and all(f % g == 0 for f in feats)]
        use = f"use --group-size {_choices(fits)}" if fits else "drop --group-size (per channel)"
        raise UsageError(f"--group-size {gs} does not divide the input features of the quantized weights "
                         f"({' / '.join(map(str, bad))} of {' / '.join(map(str, feats))}); {use}",
                         hint="a quantization group must divide every quantized weight's input features")


def check_print_ir_after(names: set[str], passes: list) -> None:
    """``--print-ir-after`` names must be passes of this pipeline (or ``all``): a misspelt one prints nothing."""
    known = [p.name for p in passes]
    unknown = sorted(set(names) - set(known) - {"all"})
    if unknown:
        raise UsageError(f"--print-ir-after {unknown[0]}: no such pass in this compile's pipeline",
                         hint=f"one of: all, {', '.join(dict.fromkeys(known))}")


def fit_sequence(model: Model, opts) -> str | None:
    """A learned position table (GPT, StarCoder) has no rows past its size: ``--max-seq-len`` beyond it is an
    error when given, and the default (2048) is lowered to the table with a note (returned)."""
    emb = next(iter(model.graph.find("embedding")), None)
    pos = emb.params.get("position") if emb is not None else None
    if pos is None or opts.max_seq_len <= pos.type.shape[0]:
        return None
    rows = pos.type.shape[0]
    default = type(opts)()   # the target's defaults
    if opts.max_seq_len != default.max_seq_len:
        raise UsageError(f"--max-seq-len {opts.max_seq_len} is beyond the model's learned position table "
                         f"({rows} positions)", hint=f"use --max-seq-len {rows} or less")
    opts.max_seq_len = rows
    if not hasattr(opts, "max_input_len"):   # onnx: no engine input length
        return f"sequence length {rows} (the learned position table), not the default {default.max_seq_len}"
    opts.max_input_len = min(opts.max_input_len, rows)
    return (f"sequence length {rows} (the learned position table), not the default {default.max_seq_len}; "
            f"input length {opts.max_input_len}")
