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

Classes: LlamaForCausalLM, GPTForCausalLM, GemmaForCausalLM (embedding x sqrt(hidden) left to the model, RMSNorm
weights with the 1 folded in as TensorRT-LLM's converter stores them, shared embedding table) and
FalconForCausalLM (parallel attention + MLP blocks; ``mlp_layernorm`` for the new decoder architecture), each
following tensorrt_llm/models/<family>/{model,config,convert}.py.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...errors import BackendError
from ...ir import Model, Param, derive
from ...ir.analysis import (MOE_SHARED_EXPERT, block_kinds, has_parallel_blocks, node_roles,
                             parallel_block_norms)
from ...ir.tensors import Recipe
from ...ir.tensors import TensorCache
from ...passes.fold_moe_scaling import has_topk_scale
from ...passes.rope_to_half import has_interleaved_rope
from ..base import (Backend, CompileOptions, EmitResult, TensorEntry, cache_bytes, recipe_entry,
                    register_backend, worker_thread_init, write_new, write_safetensors)
from .build import build_engines, require_tool
from .names import CLASS_NAMES, MOE_FC, NAMES

_WO_ALGO = {"int8-wo": "W8A16", "int4-wo": "W4A16"}
_HIDDEN_ACT = {"gelu": "gelu", "gelu-tanh": "gelu", "relu": "relu", "squared-relu": "squared-relu",
               "silu": "silu", "quick-gelu": "quick_gelu"}
_GATED_ACT = {"silu": "swiglu", "gelu": "geglu", "gelu-tanh": "geglu"}


def _arch(model: Model) -> tuple[str | None, list[str]]:
    """(TensorRT-LLM class, problems)."""
    g = model.graph
    problems = []
    norms = {n.attrs["kind"] for n in g.find("norm")}
    attn = next(g.find("attention"))
    mlps = list(g.find("mlp"))
    moes = list(g.find("moe"))
    emb = next(g.find("embedding"))
    if emb.attrs["scale"] != 1.0:
        return "GemmaForCausalLM", _gemma_problems(model)
    if has_parallel_blocks(model):
        return "FalconForCausalLM", _falcon_problems(model)
    if attn.attrs["qk_norm"] != "none":
        problems.append("QK layernorm is not supported by the Llama/GPT checkpoint classes")
    problems += _unrewritten(model)
    rope = attn.attrs["rope"]
    if attn.attrs["position"] == "rope" and rope.scaling not in ("none", "linear", "llama3"):
        problems.append(f"rope scaling {rope.scaling!r} is not expressible")
    gated = {n.attrs["gated"] for n in mlps} | {n.attrs["gated"] for n in moes}
    acts = {n.attrs["activation"] for n in mlps} | {n.attrs["activation"] for n in moes}
    llama_like = norms == {"rmsnorm"} and gated == {True} and acts == {"silu"} and "position" not in emb.params
    if moes:
        shared = [layer for layer, kind in block_kinds(model).items() if kind == MOE_SHARED_EXPERT]
        if shared:
            problems.append(f"layer {shared[0]}: a MoE with a shared expert (x + moe(h) + mlp(h)) is not "
                            "expressible with TensorRT-LLM's Llama class (no shared expert)")
        if not llama_like:
            problems.append("MoE is emitted with TensorRT-LLM's Llama class (RMSNorm, SwiGLU experts) only")
        if any(n.attrs["score"] != "softmax" for n in moes):
            problems.append("MoE routing other than softmax top-k is not expressible")
        return "LlamaForCausalLM", problems
    if llama_like:
        if attn.attrs["position"] == "rope" and rope.percent != 1.0:
            problems.append("partial rotary (rotary_percent < 1) on a Llama-style model: TensorRT-LLM's Llama "
                            "class rotates the whole head; use --target hf")
        return "LlamaForCausalLM", problems
    if norms == {"layernorm"}:
        return "GPTForCausalLM", problems
    problems.append(f"no TensorRT-LLM class for norm={sorted(norms)}, activation={sorted(acts)}, gated={sorted(gated)}")
    return None, problems


def _exact_rewrites(model: Model) -> list[str]:
    """Passes that turn what no TensorRT-LLM class reads into what they all do, exactly (issue 16)."""
    return (["rope-to-half"] if has_interleaved_rope(model) else []) + \
        (["fold-moe-scaling"] if has_topk_scale(model) else [])


def _unrewritten(model: Model) -> list[str]:
    """What the exact rewrites leave for a pipeline that skipped them: refused, never written and ignored."""
    p = []
    if has_interleaved_rope(model):
        p.append("interleaved (GPT-J) rotary: no TensorRT-LLM class applies rope_gptj to this layout; run "
                 "rope-to-half")
    if has_topk_scale(model):
        p.append("a MoE top-k scaling factor: TensorRT-LLM's MoE does not read one; run fold-moe-scaling")
    return p


def _attention_problems(model: Model, cls: str, scaling_ok: tuple[str, ...]) -> list[str]:
    """Attention features TensorRT-LLM's Gemma / Falcon decoder layers cannot express."""
    problems = []
    attn = next(model.graph.find("attention"))
    a = attn.attrs
    rope = a["rope"]
    problems += _unrewritten(model)
    if a["position"] != "rope":
        problems.append(f"{cls} uses rotary positions (rope_gpt_neox); this model has position={a['position']!r}")
    elif rope.interleaved:
        problems.append(f"interleaved (GPT-J) rotary is not expressible with {cls} (it hard-codes rope_gpt_neox)")
    elif rope.percent != 1.0:
        problems.append(f"partial rotary (rotary_percent {rope.percent:g}) is not expressible with {cls}: its "
                        "decoder layer rotates the whole head; use --target hf")
    elif rope.scaling not in scaling_ok:
        problems.append(f"rope scaling {rope.scaling!r} is not expressible with {cls}")
    if a["qk_norm"] != "none":
        problems.append(f"QK layernorm is not expressible with {cls}")
    if a["softmax_scale"] is not None:
        problems.append(f"a softmax scale other than 1/sqrt(head_dim) is not expressible with {cls}")
    if "position" in next(model.graph.find("embedding")).params:
        problems.append(f"learned position embeddings are not expressible with {cls}")
    if list(model.graph.find("moe")):
        problems.append(f"MoE is not expressible with {cls}")
    return problems


def _gemma_problems(model: Model) -> list[str]:
    """What TensorRT-LLM's GemmaForCausalLM (tensorrt_llm/models/gemma) cannot express. Its model multiplies the
    embedding by sqrt(hidden_size) itself, its RmsNorm multiplies by the stored weight (the converter stores
    1 + w), its GatedMLP applies hidden_act to ``fc``, and GemmaConfig forces share_embedding_table."""
    g = model.graph
    cls = "GemmaForCausalLM"
    problems = _attention_problems(model, cls, ("none", "linear", "llama3"))
    scale, H = next(g.find("embedding")).attrs["scale"], model.config.hidden_size
    if abs(scale - math.sqrt(H)) > 1e-9 * scale:
        problems.append(f"Gemma-style embedding x{scale:g}: TensorRT-LLM's {cls} always multiplies by "
                        f"sqrt(hidden_size) = {math.sqrt(H):g}")
    if {n.attrs["kind"] for n in g.find("norm")} != {"rmsnorm"}:
        problems.append(f"{cls} uses RMSNorm only")
    mlps = list(g.find("mlp"))
    if any(not n.attrs["gated"] or n.attrs["activation"] != "gelu-tanh" for n in mlps):
        acts = sorted({(n.attrs["activation"], n.attrs["gated"]) for n in mlps})
        problems.append(f"{cls} is emitted for a GeGLU MLP with tanh GELU only (TensorRT-LLM's 'gelu' is the "
                        f"tanh approximation); this model has (activation, gated) {acts}")
    if any(k in n.params for n in g.find("attention") for k in ("qkv_bias", "proj_bias")) or \
            any(k.endswith("bias") for n in mlps for k in n.params):
        problems.append(f"linear biases are not emitted with {cls}")
    if not next(g.find("lm_head")).attrs["tied"]:
        problems.append(f"an untied output head: TensorRT-LLM's GemmaConfig forces share_embedding_table; "
                        "use --target hf")
    if model.parallel.pp > 1:
        problems.append(f"pipeline parallelism with {cls}: its shared embedding table cannot be split over "
                        "pipeline stages (TensorRT-LLM refuses share_embedding_table with pp_size > 1)")
    if has_parallel_blocks(model):
        problems.append(f"a parallel attention + MLP block is not expressible with {cls}")
    return problems


def _falcon_layout(model: Model) -> tuple[int | None, list[str]]:
    """(norms per parallel block: 1 or 2, problems). Every layer must be x + attn(ln(x)) + mlp(ln'(x))."""
    counts, problems = set(), []
    for layer in sorted({n.layer for n in model.graph.nodes if n.layer is not None}):
        norms, why = parallel_block_norms(model, layer)
        if norms is None:
            problems.append(f"layer {layer}: {why} (FalconForCausalLM needs every layer parallel)")
        else:
            counts.add(norms)
    if len(counts) > 1:
        problems.append("layers mix one-norm and two-norm parallel blocks")
    return (counts.pop() if len(counts) == 1 else None), problems


def _falcon_problems(model: Model) -> list[str]:
    """What TensorRT-LLM's FalconForCausalLM (tensorrt_llm/models/falcon) cannot express: LayerNorm with bias,
    a plain (non-gated) GELU MLP, full rope_gpt_neox rotary without scaling, head_size = hidden/heads (its
    Attention is built without head_size), ln_f at LayerNorm's default eps 1e-5, all-or-no linear biases."""
    g = model.graph
    cls = "FalconForCausalLM"
    problems = _attention_problems(model, cls, ("none",))
    _, layout = _falcon_layout(model)
    problems += layout
    norms = list(g.find("norm"))
    if {n.attrs["kind"] for n in norms} != {"layernorm"} or any("bias" not in n.params for n in norms):
        problems.append(f"{cls} uses LayerNorm with bias only")
    eps = {n.attrs["eps"] for n in norms}
    if len(eps) > 1 or 1e-5 not in eps:
        problems.append(f"{cls} builds ln_f with LayerNorm's default eps 1e-5 and its layer norms with "
                        f"norm_epsilon; this model's norm eps are {sorted(eps)}")
    mlps = list(g.find("mlp"))
    if any(n.attrs["gated"] or n.attrs["activation"] not in ("gelu", "gelu-tanh") for n in mlps):
        acts = sorted({(n.attrs["activation"], n.attrs["gated"]) for n in mlps})
        problems.append(f"{cls} is emitted for a non-gated GELU MLP only; this model has (activation, gated) {acts}")
    a = next(g.find("attention")).attrs
    if a["head_dim"] * a["num_heads"] != model.config.hidden_size:
        problems.append(f"head_dim {a['head_dim']} != hidden_size / num_heads: TensorRT-LLM's {cls} builds its "
                        "attention with head_size = hidden_size // num_attention_heads")
    biases = {(n.op, k) for n in list(g.find("attention")) + mlps for k in n.params if k.endswith("bias")}
    if biases and biases != {("attention", "qkv_bias"), ("attention", "proj_bias"), ("mlp", "fc1_bias"),
                             ("mlp", "fc2_bias")}:
        problems.append(f"{cls} has one bias flag for every linear; this model has only {sorted(b for _, b in biases)}")
    if biases and model.parallel.tp > 1:
        problems.append(f"linear biases with tp > 1: TensorRT-LLM's {cls} runs the parallel block's attention and "
                        "MLP without their all-reduce and adds the row-parallel biases (attention.dense, mlp.proj) "
                        "on every rank before one all-reduce, so they would count tp times; use --tp 1 or "
                        "--target hf")
    return problems


class TRTLLMBackend(Backend):
    name = "trtllm"
    description = "TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) and trtllm-build engines"

    def legalize_pipeline(self, opts: CompileOptions, model: Model) -> str:
        steps = [*_exact_rewrites(model), "canonicalize{fold-gamma=true}", "relayout-qkv{to=concat}"]
        if any("q" in n.params for n in model.graph.find("attention")):
            steps.insert(0, "fuse-qkv")
        # GemmaConfig forces use_parallel_embedding = tp_size > 1 (its table is shared with lm_head)
        gemma = any(n.attrs["scale"] != 1.0 for n in model.graph.find("embedding"))
        par_emb = opts.parallel_embedding or (gemma and opts.tp > 1)
        steps.append(f"reshard{{tp={opts.tp} pp={opts.pp} ep={opts.ep} "
                     f"parallel-embedding={'true' if par_emb else 'false'}}}")
        if opts.dtype:
            steps.append(f"lower-dtype{{to={opts.dtype}}}")
        return ",".join(steps)

    def check(self, model: Model, opts: CompileOptions) -> list[str]:
        cls, problems = _arch(model)
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
        cls, problems = _arch(model)
        if problems:
            raise BackendError("; ".join(problems))
        g = model.graph
        c = model.config
        attn = next(g.find("attention"))
        a = attn.attrs
        emb = next(g.find("embedding"))
        head = next(g.find("lm_head"))
        norm = next(g.find("norm"))
        mlps, moes = list(g.find("mlp")), list(g.find("moe"))
        ffn_node = (mlps or moes)[0]
        ffn = ffn_node.params["fc2"].type.shape[-1]
        par = model.parallel
        word = emb.params["word"].source
        vocab = (word.inputs[0] if word.op == "pad" else word).type.shape[0]  # rows before TP padding
        dtype = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}[c.dtype.value]
        act = ffn_node.attrs["activation"]
        cfg: dict = {
            "architecture": cls,
            "dtype": dtype,
            "logits_dtype": "float32",
            "vocab_size": vocab,
            "max_position_embeddings": c.max_position_embeddings,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": a["num_heads"],
            "num_key_value_heads": a["num_kv_heads"],
            "head_size": a["head_dim"],
            "intermediate_size": ffn,
            "norm_epsilon": norm.attrs["eps"],
            # interleaved rope was rewritten to rotate-half by rope-to-half: TensorRT-LLM's Llama never reads
            # rope_gptj, so writing it would only be ignored
            "position_embedding_type": "learned_absolute" if "position" in emb.params else (
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
            rope = a["rope"]
            cfg["rotary_base"] = rope.base
            cfg["rotary_pct"] = rope.percent
            cfg["rotary_embedding_dim"] = rope.rotary_dim(a["head_dim"])
            if rope.scaling == "linear":
                cfg["rotary_scaling"] = {"type": "linear", "factor": rope.factor}
            elif rope.scaling == "llama3":
                cfg["rotary_scaling"] = {"type": "llama3", "factor": rope.factor,
                                         "low_freq_factor": rope.low_freq_factor,
                                         "high_freq_factor": rope.high_freq_factor,
                                         "original_max_position_embeddings": rope.original_max_positions}
            else:
                cfg["rotary_scaling"] = None
        if cls == "GemmaForCausalLM":
            # tensorrt_llm/models/gemma: GemmaConfig forces share_embedding_table and use_parallel_embedding =
            # tp > 1; GatedMLP applies ACT2FN[hidden_act] to fc ("gelu" = the tanh approximation); rope_gpt_neox
            # is hard-coded; the model scales the embedding by sqrt(hidden_size) itself.
            cfg["hidden_act"] = "gelu"
            cfg["attn_bias"] = False
            cfg["mlp_bias"] = False
            cfg["share_embedding_table"] = True
            cfg["use_parallel_embedding"] = par.tp > 1
            cfg["position_embedding_type"] = "rope_gpt_neox"
        elif cls == "FalconForCausalLM":
            # tensorrt_llm/models/falcon: one norm -> parallel_attention (falcon-7b); two norms ->
            # new_decoder_architecture with num_ln_in_parallel_attn 2 (input_layernorm + mlp_layernorm)
            norms, _ = _falcon_layout(model)
            cfg["hidden_act"] = "gelu"
            cfg["bias"] = "proj_bias" in attn.params
            cfg["parallel_attention"] = True
            cfg["new_decoder_architecture"] = norms == 2
            cfg["num_ln_in_parallel_attn"] = norms
        elif cls == "LlamaForCausalLM":
            cfg["hidden_act"] = "swiglu" if moes else "silu"
            cfg["attn_bias"] = "qkv_bias" in attn.params or "proj_bias" in attn.params
            cfg["mlp_bias"] = any("fc2_bias" in n.params for n in mlps)
            if moes:
                m = moes[0].attrs
                cfg["moe"] = {"num_experts": m["num_experts"], "top_k": m["top_k"],
                              "normalization_mode": 0 if m["pre_softmax"] else 1,
                              "shared_expert_intermediate_size": 0}
        else:
            gated = ffn_node.attrs["gated"]
            cfg["hidden_act"] = _GATED_ACT[act] if gated else _HIDDEN_ACT[act]
            cfg["gpt_variant"] = "gpt2"
            cfg["bias"] = "proj_bias" in attn.params
            cfg["apply_query_key_layer_scaling"] = False
            cfg["qk_layernorm"] = False
        return cfg

    # --------------------------------------------------------------------------------------- emit
    def rank_entries(self, model: Model, cfg: dict, tp_rank: int, pp_rank: int,
                     cache: TensorCache | None = None) -> list[TensorEntry]:
        roles = node_roles(model)
        entries: list[TensorEntry] = []
        first_layer = min((n.layer for n in model.graph.nodes if n.stage == pp_rank and n.layer is not None),
                          default=0)
        attn_bias = cfg.get("attn_bias", False)
        overrides = CLASS_NAMES.get(cfg["architecture"], {})
        for node in model.graph.nodes:
            if node.stage != pp_rank:
                continue
            role = roles[node]
            l = None if node.layer is None else node.layer - first_layer
            params = dict(node.params)
            if node.op == "moe":
                up, gate = (params.pop(k) for k in MOE_FC[0])
                fc = derive("concat", _shard(up, tp_rank), _shard(gate, tp_rank), dim=1)
                entries.append(recipe_entry(MOE_FC[1].format(l=l), fc, cache))
            if node.op == "attention" and attn_bias:
                H = model.config.hidden_size
                if "proj_bias" not in params:
                    params["proj_bias"] = Param(derive("zeros", shape=(H,), dtype=params["proj"].type.dtype.value))
            for pname, p in params.items():
                name = overrides.get((role, pname)) or NAMES.get((role, pname))
                if name is None:
                    raise BackendError(f"{node.location}: no TensorRT-LLM name for param {pname!r} of a {role}",
                                       hint="this model uses a feature the trtllm target does not map yet")
                entries.append(recipe_entry(name.format(l=l), _shard(p, tp_rank), cache))
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
