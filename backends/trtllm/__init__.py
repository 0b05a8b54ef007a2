"""TensorRT-LLM backend: the checkpoint format ``trtllm-build`` takes (config.json + rank{N}.safetensors).

TensorRT-LLM releases up to 1.2.x build engines from this format with ``trtllm-build``; TensorRT-LLM main
(2026) removed that flow and its PyTorch backend loads Hugging Face-layout checkpoints: use ``--target hf``
for it (see docs/targets.md).

Per rank ``pp_rank * tp + tp_rank``: layers of the stage renumbered from 0, per-rank ``[Q_r; K_r; V_r]`` (KV
heads replicated when tp exceeds them), gated MLP ``fc`` = activated half and ``gate`` = the other,
row-parallel weights split on dim 1 with their bias whole, ``lm_head`` rows padded to a multiple of tp,
embeddings on the first stage and ``ln_f``/``lm_head`` on the last. Weight-only int8/int4 is written as float
weights with ``quant_algo`` W8A16/W4A16: ``trtllm-build`` quantizes them into the GPU-specific packed layout
its kernels need (a raw int8 matrix would be wrong on some GPUs).

Classes, one file each in :mod:`.classes` (signature, legality rules, name rows, config builder and its inverse
for the reader), each following tensorrt_llm/models/<family>/{model,config,convert}.py: LlamaForCausalLM,
GPTForCausalLM, GemmaForCausalLM, FalconForCausalLM and QWenForCausalLM (qwen_type qwen3). This module lowers
through them: :func:`lowering_plan` (the class and its refusal lines, once per model state), the legalization
passes, config.json and the per-rank tensors from the class's rows.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...errors import BackendError
from ...ir import Model, Param, derive
from ...ir.analysis import node_roles
from ...ir.ops import layer_pattern
from ...ir.tensors import Recipe, TensorCache
from ...passes import format_pipeline
from ...passes.fold_moe_scaling import has_topk_scale
from ...passes.rope_to_half import has_interleaved_rope
from ..base import (Backend, CompileOptions, EmitResult, TensorEntry, cache_bytes, recipe_entry,
                    register_backend, worker_thread_init, write_new, write_safetensors)
from ..lowering import Facts, Plan, cached_plan, make_pass
from ..options import TrtllmOptions
from .build import build_engines, require_tool
from .classes import REGISTRY
from .classes.common import NO_SINKS, rope_config

_WO_ALGO = {"int8-wo": "W8A16", "int4-wo": "W4A16"}


def lowering_plan(model: Model) -> Plan:
    """The TensorRT-LLM class of this model state and its refusal lines, computed once and shared by legalize,
    check, config and emit."""
    return cached_plan("trtllm", model, _plan)


def _plan(m: Model) -> Plan:
    f = Facts(m, "trtllm")
    if f.mlas:   # multi-latent attention: DeepseekV2ForCausalLM or nothing (the other classes read attention nodes)
        cls = REGISTRY["DeepseekV2ForCausalLM"]
        return Plan(cls, cls.refusals(f))
    return Plan(*REGISTRY.classify(m, f))


def _has_mla(model: Model) -> bool:
    return next(model.graph.find("mla"), None) is not None


def _arch(model: Model) -> tuple[str | None, list[str]]:
    """(TensorRT-LLM class, problems)."""
    p = lowering_plan(model)
    return p.name, list(p.problems)


def _exact_rewrites(model: Model) -> list:
    """Passes that turn what no TensorRT-LLM class reads into what they all do, exactly (issue 16)."""
    return ([make_pass("rope-to-half")] if has_interleaved_rope(model) else []) + \
        ([make_pass("fold-moe-scaling")] if has_topk_scale(model) else [])


def describe() -> str:
    """Every class: what it cannot express and its name rows."""
    return "\n".join(c.describe() for c in REGISTRY)


class TRTLLMBackend(Backend):
    name = "trtllm"
    options = TrtllmOptions
    description = "TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) and trtllm-build engines"

    def legalize(self, opts: CompileOptions, model: Model) -> list:
        """Pass objects: the exact rewrites, a fused concat QKV, folded gammas, the layout, the dtype."""
        cls = lowering_plan(model).cls
        steps = [*_exact_rewrites(model), make_pass("canonicalize", fold_gamma=True),
                 make_pass("relayout-qkv", to="concat")]
        if any("q" in n.params for n in model.graph.find("attention")):
            steps.insert(0, make_pass("fuse-qkv"))
        # a class may force the parallel embedding (GemmaConfig: use_parallel_embedding = tp_size > 1)
        forced = cls is not None and cls.extra.get("parallel_embedding", lambda o: False)(opts)
        steps.append(make_pass("reshard", tp=opts.tp, pp=opts.pp, ep=opts.ep,
                               parallel_embedding=bool(opts.parallel_embedding or forced)))
        if opts.dtype:
            steps.append(make_pass("lower-dtype", to=opts.dtype))
        return steps

    def legalize_pipeline(self, opts: CompileOptions, model: Model) -> str:
        return format_pipeline(self.legalize(opts, model))

    def check(self, model: Model, opts: CompileOptions) -> list[str]:
        pattern = layer_pattern(model.graph)
        if any(True for _ in model.graph.find("mamba")):   # issue 18: one line, not the class search's
            return [f"Mamba-2 mixer layers (hybrid pattern {pattern or 'M...'}) have no TensorRT-LLM checkpoint "
                    "class: the checkpoint/engine flow mexc writes (tensorrt_llm.models, <= 1.2) has only the "
                    "Mamba-only MambaForCausalLM, no hybrid Mamba + attention model; TensorRT-LLM 1.2's PyTorch "
                    "flow has NemotronHForCausalLM: compile with --target hf and serve that with trtllm-serve"]
        attns = list(model.graph.find("attention"))
        if any(a.attrs.get("sinks") for a in attns):   # gpt-oss (issue 17): one line, before the window's
            return [NO_SINKS.check(Facts(model, "trtllm"))]
        windows = sorted((a.layer, a.attrs["window"]) for a in attns if a.attrs["window"] is not None)
        if windows:   # one line, not the class search's
            return [f"sliding-window attention (layer {windows[0][0]}: keys i-{windows[0][1]}..i; {len(windows)} of "
                    f"{len(attns)} layers windowed) is not written for TensorRT-LLM <= 1.2 engines: its checkpoint "
                    "config.json has no window field (the window is the runtime's max_attention_window_size, which an "
                    "engine does not record, so one run without it would attend to the whole context); compile with "
                    "--target hf (MistralForCausalLM / MinistralForCausalLM keep the window in sliding_window)"]
        gated = [a for a in attns if a.attrs["output_gate"]]
        l2 = [a for a in attns if a.attrs["qk_norm"] == "l2"]
        if gated or l2:   # one line each, not the class search's
            return ([f"an attention output gate ({gated[0].location}: Megatron's attention_output_gate) has no "
                     "TensorRT-LLM <= 1.2 checkpoint class (Qwen3-Next is only in its PyTorch flow): compile with "
                     "--target hf (Qwen3NextForCausalLM) or onnx"] if gated else []) + \
                ([f"a weightless L2 q/k norm ({l2[0].location}: Megatron's qk_l2_norm) has no TensorRT-LLM <= 1.2 "
                  "checkpoint class: compile with --target hf or onnx"] if l2 else [])
        problems = list(lowering_plan(model).problems)
        if opts.parallel_embedding and _has_mla(model):   # DeepseekV2Model: Embedding(vocab_size, hidden_size)
            problems.append("--parallel-embedding is not expressible with DeepseekV2ForCausalLM: its model builds the "
                            "vocab embedding whole on every rank (no tp split); compile without it")
        if opts.quant and _has_mla(model):   # DeepseekV2Attention's q_b / kv_b / fused_q_proj are bare Parameters
            problems.append("weight-only quantization of multi-latent attention is not written for "
                            "DeepseekV2ForCausalLM (its q_b_proj / kv_b_proj / fused_q_proj are plain parameters "
                            "trtllm-build does not quantize); compile without --quant")
        if opts.quant == "fp8":
            problems.append("fp8 for TensorRT-LLM needs activation scales from calibration data, which mexc does "
                            "not compute; use --quant int8-wo or int4-wo, or calibrate with NVIDIA ModelOpt")
        if opts.quant and opts.group_size:
            problems.append("group-wise int4 (AWQ/GPTQ) needs calibrated scales; use per-channel --quant int4-wo")
        for _, name, p in model.graph.params():
            if not p.type.dtype.is_float:
                problems.append(f"param {name} is already quantized ({p.type}); let trtllm-build quantize "
                                "(--quant) instead of a quantize pass")
                break
        return problems

    # --------------------------------------------------------------------------------------- config
    def config(self, model: Model, opts: CompileOptions) -> dict:
        plan = lowering_plan(model)
        if plan.problems:
            raise BackendError("; ".join(plan.problems))
        c, cls = model.config, plan.cls
        f = Facts(model, "trtllm")
        a = f.a0 or {"num_heads": f.mlas[0].attrs["num_heads"], "num_kv_heads": 1, "head_dim": 0,
                     "position": "mla"}   # multi-latent attention: the class fills its own fields
        emb, head, norm = f.emb, f.heads[0], f.norms[0]
        ffn_node = (f.mlps or f.moes)[0]
        par = model.parallel
        word = emb.params["word"].source
        vocab = (word.inputs[0] if word.op == "pad" else word).type.shape[0]  # rows before TP padding
        cfg: dict = {
            "architecture": cls.name,
            "dtype": {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[c.dtype.value],
            "logits_dtype": "float32",
            "vocab_size": vocab,
            "max_position_embeddings": c.max_position_embeddings,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": a["num_heads"],
            "num_key_value_heads": a["num_kv_heads"],
            "head_size": a["head_dim"],
            "intermediate_size": ffn_node.params["fc2"].type.shape[-1],
            "norm_epsilon": norm.attrs["eps"],
            # interleaved rope was rewritten to rotate-half by rope-to-half: TensorRT-LLM's Llama never reads
            # rope_gptj, so writing it would only be ignored
            "position_embedding_type": "learned_absolute" if f.learned else (
                "rope_gpt_neox" if a["position"] == "rope" else "none"),
            "use_parallel_embedding": not emb.params["word"].sharding.replicated,
            "embedding_sharding_dim": 0,
            "share_embedding_table": False,
            "tie_word_embeddings": bool(head.attrs["tied"]),
            "mapping": {"world_size": par.tp * par.pp, "tp_size": par.tp, "pp_size": par.pp, "cp_size": 1,
                        "moe_tp_size": par.tp // par.ep, "moe_ep_size": par.ep},
            "quantization": {"quant_algo": _WO_ALGO.get(opts.quant) if opts.quant else None,
                             "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"] if opts.quant else None},
            "producer": {"name": "mexc", "source": model.meta.get("source"), "format": model.meta.get("format")},
        }
        if a["position"] == "rope":
            cfg.update(rope_config(a))
        f.name, f.cls = cls.label, cls
        return cls.config(f, cfg)

    # --------------------------------------------------------------------------------------- emit
    def rank_entries(self, model: Model, cfg: dict, tp_rank: int, pp_rank: int,
                     cache: TensorCache | None = None) -> list[TensorEntry]:
        """One rank's tensors from the class's name rows: stage-local layer numbers, each param's TP shard."""
        roles = node_roles(model)
        rows = lowering_plan(model).cls.rows
        special = lowering_plan(model).cls.extra.get("node_entries")   # a class's own per-rank tensors
        flags = {"present": True, "attn_bias": bool(cfg.get("attn_bias", False))}
        entries: list[TensorEntry] = []
        first_layer = min((n.layer for n in model.graph.nodes if n.stage == pp_rank and n.layer is not None),
                          default=0)
        for node in model.graph.nodes:
            if node.stage != pp_rank:
                continue
            role = roles[node]
            loc = {"L": "" if node.layer is None else node.layer - first_layer}
            taken: set[str] = set()
            got = special(node, role, tp_rank, _shard) if special else None
            if got is not None:
                entries += [recipe_entry(n.format(**loc), rec, cache) for n, rec in got]
                continue
            for r in (r for r in rows if r.role == role):
                if not all(p in node.params for p in r.params):
                    if not flags[r.when] or r.when == "present" or len(r.params) > 1:
                        continue
                    ref = node.params["proj"].type.dtype.value   # a bias the class always has: zeros
                    node_param = Param(derive("zeros", shape=(model.config.hidden_size,), dtype=ref))
                else:
                    node_param = None
                if r.transform == "moe_fc":
                    up, gate = (_shard(node.params[p], tp_rank) for p in r.params)
                    rec = derive("concat", up, gate, dim=len(up.type.shape) - 2)  # experts [E, F, H]; shared [S, H]
                else:
                    rec = _shard(node_param or node.params[r.params[0]], tp_rank)
                entries.append(recipe_entry(r.name.format(**loc), rec, cache))
                taken.update(r.params)
            left = sorted(set(node.params) - taken)
            if left:
                raise BackendError(f"{node.location}: no TensorRT-LLM name for param {left[0]!r} of a {role} in "
                                   f"{cfg['architecture']}",
                                   hint="this model uses a feature the trtllm target does not map yet")
        return entries

    def emit(self, model: Model, out: Path, opts: CompileOptions, progress=None) -> EmitResult:
        cfg = self.config(model, opts)
        write_new(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        par = model.parallel
        cache = TensorCache(cache_bytes(model))  # a source read for rank 0 serves the other ranks too
        jobs = []
        for pp_rank in range(par.pp):
            for tp_rank in range(par.tp):
                rank = pp_rank * par.tp + tp_rank
                jobs.append((rank, self.rank_entries(model, cfg, tp_rank, pp_rank, cache)))
        total = sum(e.type.nbytes for _, es in jobs for e in es)
        if progress:
            progress.start("write", total)
        res = EmitResult(out, {"config.json": (out / "config.json").stat().st_size})

        cancel = threading.Event()  # Ctrl-C or a failing rank stops the other writers within one tensor

        def write(job):
            rank, entries = job
            path = out / f"rank{rank}.safetensors"
            sums = write_safetensors(path, entries, {"format": "pt", "producer": "mexc"},
                                     on_tensor=(lambda name, n: progress.advance(n)) if progress else None,
                                     cancel=cancel)
            return rank, path, sums, len(entries)

        ex = ThreadPoolExecutor(max_workers=max(1, min(opts.jobs, len(jobs))), initializer=worker_thread_init)
        try:
            for rank, path, sums, n in ex.map(write, jobs):
                res.files[path.name] = path.stat().st_size
                res.checksums[path.name] = sums
                res.tensors += n
        except BaseException:
            cancel.set()
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
            cache.clear()
        if progress:
            progress.finish()
        cls = lowering_plan(model).cls
        if "notes" in cls.extra:
            res.notes += cls.extra["notes"](Facts(model, "trtllm"))
        if opts.quant:
            res.notes.append(f"weights are written in {cfg['dtype']}; trtllm-build quantizes them to "
                             f"{cfg['quantization']['quant_algo']} when it builds the engine")
        return res

    def preflight(self, out: Path, opts: CompileOptions) -> None:
        require_tool(out, opts)

    def build(self, out: Path, opts: CompileOptions, log) -> list[str]:
        return build_engines(out, opts, log)


def _shard(p: Param, tp_rank: int) -> Recipe:
    s = p.sharding
    if s.replicated:
        return p.source
    return derive("shard", p.source, dim=s.dim, parts=s.parts, index=tp_rank % s.parts)


register_backend(TRTLLMBackend())
