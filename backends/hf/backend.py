"""Hugging Face backend: ``config.json``, ``generation_config.json`` and ``model.safetensors`` (or shards plus
``model.safetensors.index.json``) in the layout ``transformers.AutoModelForCausalLM.from_pretrained`` loads,
and with it vLLM and TensorRT-LLM's PyTorch backend.

The output is unsharded (tp=1 pp=1): loaders shard at load time. Tensors are streamed: each file's header is
computed from the IR types, then every tensor is materialized, written and freed one at a time. The vocab is the
embedding's rows (Megatron's padded vocab, or ``--vocab-size`` after trim-vocab); logits past the tokenizer's
vocab are padding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import BackendError
from ...ir import Model, derive
from ...ir.analysis import node_roles
from ...ir.ops import absent_shape
from ...ir.tensors import Recipe, TensorCache
from ...passes import format_pipeline
from ...passes.fold_moe_scaling import has_topk_scale
from ...passes.rope_to_half import has_interleaved_rope
from ..base import (Backend, CompileOptions, EmitResult, TensorEntry, cache_bytes, recipe_entry, write_new,
                    write_safetensors)
from ..lowering import Plan, cached_plan, make_pass
from ..options import HFOptions
from . import families
from .names import Rule, rules_for

# Largest shard in bytes (transformers' default max_shard_size "5GB" = 5 * 10**9). Tests lower it to force
# sharding; the environment variable MEXC_HF_MAX_SHARD_BYTES overrides it too, and --max-shard-size
# (HFOptions.max_shard_size) both.
MAX_SHARD_BYTES = 5 * 10**9
SAFETENSORS_METADATA = {"format": "pt"}


def max_shard_bytes() -> int:
    env = os.environ.get("MEXC_HF_MAX_SHARD_BYTES")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise BackendError(f"MEXC_HF_MAX_SHARD_BYTES={env!r} is not a number of bytes",
                               hint="e.g. MEXC_HF_MAX_SHARD_BYTES=2000000000") from None
    return MAX_SHARD_BYTES


def _absent_shape(model: Model, node, param: str) -> tuple[int, ...]:
    """Shape of a param the IR does not have but the HF class does (a zero bias, zero positions): the param's
    declared shape rule (:func:`mexc.ir.ops.absent_shape`)."""
    shape = absent_shape(node, param, model.config)
    if shape is None:
        raise BackendError(f"{node.location}: the hf target needs param {param!r}, which this model lacks",
                           hint="this is a gap in the hf name table")
    return shape


def plan(model: Model, family: str, cache=None) -> tuple[list[TensorEntry], list[str]]:
    """The entries in model order, and problems (IR params no active row writes)."""
    pairs, problems = _lower(model, family)
    return [recipe_entry(name, rec, cache) for name, rec in pairs], problems


def _lower(model: Model, family: str) -> tuple[list[tuple[str, Recipe]], list[str]]:
    """(tensor name, recipe) pairs in model order from the family's rows, and the params no row takes."""
    roles = node_roles(model)
    rules = rules_for(family)
    fl = families.flags(model, family)
    pairs: list[tuple[str, Recipe]] = []
    problems: list[str] = []
    dtype = model.config.dtype.value
    for node in model.graph.nodes:
        role = roles[node]
        taken: set[str] = set()
        for r in (r for r in rules if r.role == role):
            if not fl[r.when]:
                continue
            srcs: list[Recipe] = []
            for pname in r.params:
                p = node.params.get(pname)
                if p is not None:
                    srcs.append(p.source)
                else:
                    ref = next((node.params[q].type.dtype.value for q in r.params if q in node.params), None)
                    srcs.append(derive("zeros", shape=_absent_shape(model, node, pname),
                                       dtype=ref or _ref_dtype(node, dtype)))
                taken.add(pname)
            src = srcs[0] if len(srcs) == 1 else derive("concat", *srcs, dim=0)
            pairs += _apply(r, src, node)
        if role == "lm_head" and node.attrs["tied"]:
            taken.add("weight")
        left = sorted(set(node.params) - taken)
        if left:
            problems.append(f"{node.location}: params {left} have no place in the {family} family "
                            f"({families.ARCHITECTURES[family]}) and would be dropped")
    return pairs, problems


def lowering_plan(model: Model) -> Plan:
    """The model's :class:`~mexc.backends.lowering.Plan` for the hf target: the family, its refusal lines and
    the (name, recipe) pairs, computed once for this model state and shared by check and emit."""
    return cached_plan("hf", model, _compute_plan)


def _compute_plan(model: Model) -> Plan:
    cls, problems, _ = families.classify_class(model)
    p = Plan(cls, problems)
    if cls is not None and not problems:
        p.data["pairs"], p.problems = _lower(model, cls.name)
    return p


def _ref_dtype(node, default: str) -> str:
    for p in node.params.values():
        if p.type.dtype.is_float:
            return p.type.dtype.value
    return default


def _apply(r: Rule, src: Recipe, node) -> list[tuple[str, Recipe]]:
    name = r.name.replace("{L}", str(node.layer)) if node.layer is not None else r.name
    if "{L}" in name:
        raise BackendError(f"hf name table line {r.line}: {r.name} needs a layer, {node.location} has none")
    if r.transform == "copy":
        return [(name, src)]
    if r.transform == "zc":   # the HF module computes with (1 + w)
        if node.attrs.get("zero_centered", False):   # an attention's q/k norm weights never are
            return [(name, src)]
        # un-fold a folded gamma in fp32: (1 + w) - 1 in bf16 would lose most of w's bits
        dt = src.type.dtype.value
        base = src.inputs[0] if src.op == "cast" else src
        unfolded = derive("add_scalar", derive("cast", base, dtype="f32"), value=-1.0)
        return [(name, derive("cast", unfolded, dtype=dt))]
    if r.transform == "heads":   # [p1 head 0; p2 head 0; p1 head 1; ...] from [p1; p2] (each heads x head_dim)
        d, n = node.attrs["head_dim"], len(r.params)
        rows = src.type.shape[0] // n
        return [(name, derive("concat", *(derive("slice", src, dim=0, start=p * rows + h * d,
                                                  stop=p * rows + (h + 1) * d)
                                           for h in range(rows // d) for p in range(n)), dim=0))]
    if r.transform == "pairs":   # recipe op registered by families/llama4.py
        return [(name, derive("rope_to_pairs", src, head_dim=node.attrs["head_dim"]))]
    if r.transform == "conv1d":
        return [(name, derive("transpose", src, d0=0, d1=1))]
    if r.transform == "depthwise":   # [C, K] -> nn.Conv1d(groups=C)'s [C, 1, K]
        return [(name, derive("transpose", derive("stack", src), d0=0, d1=1))]
    if r.transform == "gate_up":   # GptOss: [gate; up] on dim 0 -> [E, (H,) 2F], gate / up alternating on the last dim
        two_e, *rest = src.type.shape
        x = derive("reshape", src, shape=(2, two_e // 2, *rest))          # [2, E, F(, H)]
        x = derive("transpose", x, d0=0, d1=len(rest) + 1)                # [H or F, E, F(, 2)] ...
        x = derive("transpose", x, d0=0, d1=1)                            # [E, H, F, 2] or [E, F, 2]
        return [(name, derive("reshape", x, shape=(*x.type.shape[:-2], 2 * x.type.shape[-2])))]
    if r.transform == "t12":       # GptOss down_proj: [E, H, F] -> [E, F, H] (x @ W)
        return [(name, derive("transpose", src, d0=1, d1=2))]
    return [(name.replace("{E}", str(e)), derive("index", src, i=e)) for e in range(src.type.shape[0])]


def _shards(entries: list[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Greedy, in model order: start a new shard when the next tensor would pass ``limit``."""
    out: list[list] = [[]]
    size = 0
    for e in entries:
        n = e.type.nbytes
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(e)
        size += n
    return out


class HFBackend(Backend):
    name = "hf"
    options = HFOptions
    description = "Hugging Face layout (config.json + model.safetensors) for transformers, vLLM, TRT-LLM PyTorch"

    def legalize(self, opts: CompileOptions, model: Model) -> list:
        """The passes (objects) that bring a lifted model into the form ``emit`` takes, from its family."""
        cls = families.classify_class(model)[0]
        fused = cls is not None and cls.extra["fused_qkv"]
        qkv = [make_pass("fuse-qkv"), make_pass("relayout-qkv", to="grouped")] if fused else [make_pass("split-qkv")]
        # Gemma/Nemotron norms add 1 themselves: their gamma is not folded
        fold = not (cls is not None and cls.extra["zero_centered"])
        exact = ([make_pass("rope-to-half")] if has_interleaved_rope(model) else []) + \
            ([make_pass("fold-moe-scaling")] if has_topk_scale(model) else [])   # exact rewrites (issue 16)
        steps = [*exact, *qkv, make_pass("canonicalize", fold_gamma=fold), make_pass("reshard", tp=1, pp=1, ep=1)]
        if opts.dtype:
            router = cls is not None and cls.extra["router_fp32"]   # the class's _keep_in_fp32_modules_strict
            steps.append(make_pass("lower-dtype", to=opts.dtype, keep_norms_fp32=False, keep_router_fp32=router))
        return steps

    def legalize_pipeline(self, opts: CompileOptions, model: Model) -> str:
        return format_pipeline(self.legalize(opts, model))

    def check(self, model: Model, opts: CompileOptions) -> list[str]:
        problems: list[str] = []
        if opts.quant:
            problems.append(f"--quant {opts.quant} is not supported for the hf target: mexc writes no "
                            "loader-readable quantization config (drop --quant, or quantize at load time, "
                            "e.g. vLLM --quantization fp8)")
        if opts.tp != 1 or opts.pp != 1 or opts.ep != 1:
            problems.append(f"the hf target writes one unsharded model (got --tp {opts.tp} --pp {opts.pp} "
                            f"--ep {opts.ep}); loaders shard it at load time: drop --tp/--pp/--ep")
        problems += lowering_plan(model).problems
        if has_topk_scale(model):
            problems.append("a MoE top-k scaling factor: no transformers class reads one; run fold-moe-scaling")
        return problems

    def emit(self, model: Model, out: Path, opts: CompileOptions, progress=None) -> EmitResult:
        lp = lowering_plan(model)
        family, problems = lp.name, list(lp.problems)
        cache = TensorCache(cache_bytes(model))
        entries = [recipe_entry(name, rec, cache) for name, rec in lp.data.get("pairs", [])]
        if problems:
            raise BackendError("the hf target cannot lower this model: " + "; ".join(problems))
        out = Path(out)
        cfg = families.hf_config(model, family)
        res = EmitResult(out)
        for fname, data in (("config.json", cfg), ("generation_config.json", families.generation_config(model))):
            text = json.dumps(data, indent=2) + "\n"
            write_new(out / fname, text)
            res.files[fname] = len(text.encode())
        shards = _shards(entries, getattr(opts, "max_shard_size", None) or max_shard_bytes())
        total = sum(e.type.nbytes for e in entries)
        if progress:
            progress.start("write", total)
        weight_map: dict[str, str] = {}
        n = len(shards)
        for i, shard in enumerate(shards, 1):
            fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            # write_safetensors writes in name order; entries of one layer stay contiguous under it
            sums = write_safetensors(out / fname, shard, SAFETENSORS_METADATA,
                                     on_tensor=(lambda name, nb: progress.advance(nb)) if progress else None)
            res.checksums[fname] = sums
            res.files[fname] = (out / fname).stat().st_size
            res.tensors += len(sums)
            weight_map.update({name: fname for name in sums})
        cache.clear()
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2) + "\n"
            write_new(out / "model.safetensors.index.json", text)
            res.files["model.safetensors.index.json"] = len(text.encode())
        if progress:
            progress.finish()
        note = f"hf: {families.ARCHITECTURES[family]}, {res.tensors} tensors in {n} file(s), vocab {cfg['vocab_size']}"
        if cfg["vocab_size"] > model.config.vocab_size:
            note += (f" (tokenizer vocab {model.config.vocab_size}: logits past it are padding; --vocab-size "
                     f"{model.config.vocab_size} trims them)")
        res.notes.append(note)
        return res
