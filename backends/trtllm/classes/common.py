"""What every TensorRT-LLM class file shares: the registry, the row dialect's trtllm transforms and conditions,
the names TensorRT-LLM's classes have in common, the rules several classes reuse and the base config.json.

TensorRT-LLM (<= 1.2) names are uniform across its decoder classes (``transformer.layers.{L}.attention.qkv``
...); a class file takes :data:`ROWS` and adds or replaces rows (Falcon's ``mlp_layernorm``). ``{L}`` is the layer
index local to the pipeline stage. The gated MLP's activated branch (IR ``gate``) is TensorRT-LLM's ``mlp.fc``,
the other (IR ``up``) ``mlp.gate``; a MoE's ``mlp.fc`` is ``[up_r; gate_r]`` per expert, assembled per rank
(transform ``moe_fc``).
"""

from __future__ import annotations

from collections.abc import Callable

from ....ir.analysis import parallel_block_norms
from ....passes.fold_moe_scaling import has_topk_scale
from ....passes.rope_to_half import has_interleaved_rope
from ...lowering import Facts, Registry, Rule, TargetClass, parse_rows

# copy: the param's rank shard; moe_fc: up+gate concatenated per rank on their rows (dim 1 of [E, F, H] experts,
# dim 0 of a [S, H] shared expert)
TRANSFORMS = ("copy", "moe_fc")
# present: written when the IR has the param; attn_bias: also written, as zeros, when the IR lacks it and the
# config's attn_bias is on (TensorRT-LLM's Attention then has the bias)
CONDITIONS = ("present", "attn_bias")
ROWS = """
embedding   word        transformer.vocab_embedding.weight                 copy    present
embedding   position    transformer.position_embedding.weight              copy    present
input_norm  weight      transformer.layers.{L}.input_layernorm.weight      copy    present
input_norm  bias        transformer.layers.{L}.input_layernorm.bias        copy    present
attention   qkv         transformer.layers.{L}.attention.qkv.weight        copy    present
attention   qkv_bias    transformer.layers.{L}.attention.qkv.bias          copy    present
attention   proj        transformer.layers.{L}.attention.dense.weight      copy    present
attention   proj_bias   transformer.layers.{L}.attention.dense.bias        copy    attn_bias
post_norm   weight      transformer.layers.{L}.post_layernorm.weight       copy    present
post_norm   bias        transformer.layers.{L}.post_layernorm.bias         copy    present
mlp         gate        transformer.layers.{L}.mlp.fc.weight               copy    present
mlp         gate_bias   transformer.layers.{L}.mlp.fc.bias                 copy    present
mlp         up          transformer.layers.{L}.mlp.gate.weight             copy    present
mlp         up_bias     transformer.layers.{L}.mlp.gate.bias               copy    present
mlp         fc1         transformer.layers.{L}.mlp.fc.weight               copy    present
mlp         fc1_bias    transformer.layers.{L}.mlp.fc.bias                 copy    present
mlp         fc2         transformer.layers.{L}.mlp.proj.weight             copy    present
mlp         fc2_bias    transformer.layers.{L}.mlp.proj.bias               copy    present
moe         router      transformer.layers.{L}.mlp.router.weight           copy    present
moe         up+gate     transformer.layers.{L}.mlp.fc.weight               moe_fc  present
moe         fc2         transformer.layers.{L}.mlp.proj.weight             copy    present
final_norm  weight      transformer.ln_f.weight                            copy    present
final_norm  bias        transformer.ln_f.bias                              copy    present
lm_head     weight      lm_head.weight                                     copy    present
"""
HIDDEN_ACT = {"gelu": "gelu", "gelu-tanh": "gelu", "relu": "relu", "squared-relu": "squared-relu",
              "silu": "silu", "quick-gelu": "quick_gelu"}
GATED_ACT = {"silu": "swiglu", "gelu": "geglu", "gelu-tanh": "geglu"}


def _none_line(f: Facts) -> str:
    return (f"no TensorRT-LLM class for norm={sorted(f.kinds)}, activation="
            f"{sorted(f.acts | {m.attrs['activation'] for m in f.moes})}, "
            f"gated={sorted(f.gated | {m.attrs['gated'] for m in f.moes})}")


REGISTRY = Registry("trtllm", _none_line)


def rows(extra: str = "", where: str = "") -> list:
    """:data:`ROWS` with ``extra`` rows added; an extra row with the role and params of a common one replaces it."""
    add = parse_rows(extra, transforms=TRANSFORMS, conditions=CONDITIONS, where=f"trtllm {where}")
    keys = {(r.role, r.params) for r in add}
    base = [r for r in parse_rows(ROWS, transforms=TRANSFORMS, conditions=CONDITIONS, where="trtllm common")
            if (r.role, r.params) not in keys]
    return base + add


def trt_class(name: str, *, signature: Callable[[Facts], bool], rules: list[Rule], config: Callable,
              read: Callable[[dict], dict], extra_rows: str = "", **extra) -> TargetClass:
    """Register one TensorRT-LLM class: ``config(facts, cfg)`` fills its config.json fields on the shared base;
    ``read(cfg)`` is the inverse (config.json -> the IR attributes the reader builds: see
    :mod:`mexc.frontends.trtllm`)."""
    cls = TargetClass(name, name, signature, [PER_MODEL_ATTENTION, NO_SINKS, NO_CLAMPED_GLU, *rules],
                      rows(extra_rows, name), config,
                      {"read": read, **extra})
    return REGISTRY.register(cls)


def rule(cannot: str):
    return lambda fn: Rule(cannot, fn)


# ------------------------------------------------------------------------------- shared rules
def unrewritten(f: Facts) -> list[str]:
    """What the exact rewrites leave for a pipeline that skipped them: refused, never written and ignored."""
    p = []
    if has_interleaved_rope(f.model):
        p.append("interleaved (GPT-J) rotary: no TensorRT-LLM class applies rope_gptj to this layout; run "
                 "rope-to-half")
    if has_topk_scale(f.model):
        p.append("a MoE top-k scaling factor: TensorRT-LLM's MoE does not read one; run fold-moe-scaling")
    return p


UNREWRITTEN = Rule("interleaved rotary or a MoE top-k scale left unrewritten", unrewritten)


def decoder_attention(scaling_ok: tuple[str, ...], qk_norm: bool = False, moe: bool = False) -> Rule:
    """Attention features a rotary decoder class (Gemma, Falcon, QWen) cannot express (``moe``: the class
    checks its MoE itself)."""
    def check(f: Facts) -> list[str]:
        a, cls, p = f.a0, f.name, []
        rope = a["rope"]
        if a["position"] != "rope":
            p.append(f"{cls} uses rotary positions (rope_gpt_neox); this model has position={a['position']!r}")
        elif rope.interleaved:
            p.append(f"interleaved (GPT-J) rotary is not expressible with {cls} (it hard-codes rope_gpt_neox)")
        elif rope.percent != 1.0:
            p.append(f"partial rotary (rotary_percent {rope.percent:g}) is not expressible with {cls}: its "
                     "decoder layer rotates the whole head")
        elif rope.scaling not in scaling_ok:
            p.append(f"rope scaling {rope.scaling!r} is not expressible with {cls}")
        if a["qk_norm"] != "none" and not qk_norm:
            p.append(f"QK layernorm is not expressible with {cls}")
        if a["softmax_scale"] is not None:
            p.append(f"a softmax scale other than 1/sqrt(head_dim) is not expressible with {cls}")
        if f.learned:
            p.append(f"learned position embeddings are not expressible with {cls}")
        if f.moes and not moe:
            p.append(f"MoE is not expressible with {cls}")
        return p
    return Rule(f"positions other than full rotary ({'/'.join(scaling_ok)}); a softmax scale; learned positions"
                + ("" if moe else "; MoE") + ("" if qk_norm else "; QK norm"), check)


def _per_model_attention(f: Facts) -> list[str]:
    """TensorRT-LLM's decoder classes build every layer's Attention from one config: one
    ``position_embedding_type`` and one ``q_scaling`` / ``attention_multiplier`` for all layers."""
    p = []
    nope = [a.layer for a in f.attns if a.attrs["position"] != f.a0["position"]]
    if nope:
        p.append(f"layers with and without rotary positions (layer {nope[0]} differs from layer {f.attns[0].layer}: "
                 f"NoPE layers) are not expressible with {f.name}: its layers share one position_embedding_type")
    if len({a.attrs["softmax_scale"] for a in f.attns}) > 1:
        p.append(f"softmax scales that differ across layers are not expressible with {f.name}")
    return p


NO_SINKS = Rule("attention sinks", lambda f: None if not any(a.attrs.get("sinks") for a in f.attns) else
                "attention sinks (megatron-core softmax_type learnable / off-by-one, gpt-oss) cannot be expressed by "
                "a TensorRT-LLM 1.2 checkpoint class (no class in tensorrt_llm/models has a sink logit)")
NO_CLAMPED_GLU = Rule("a clamped / offset GLU", lambda f: None if not any(
    m.attrs.get("glu_clamp") is not None or m.attrs.get("glu_offset") for m in (*f.mlps, *f.moes)) else
    "a clamped / offset GLU (megatron-core activation_func_clamp_value / glu_linear_offset, gpt-oss) cannot be "
    "expressed by a TensorRT-LLM 1.2 checkpoint class (its MLP and MoE activations have no clamp or offset); use "
    "--target onnx")
PER_MODEL_ATTENTION = Rule("positions (rotary / none) or softmax scales that differ across layers",
                           _per_model_attention)


def falcon_layout(model) -> tuple[int | None, list[str]]:
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


def rope_config(a: dict) -> dict:
    """rotary_* fields of a rope attention."""
    rope = a["rope"]
    cfg = {"rotary_base": rope.base, "rotary_pct": rope.percent, "rotary_embedding_dim": rope.rotary_dim(a["head_dim"])}
    if rope.scaling == "linear":
        cfg["rotary_scaling"] = {"type": "linear", "factor": rope.factor}
    elif rope.scaling == "llama3":
        cfg["rotary_scaling"] = {"type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                                 "high_freq_factor": rope.high_freq_factor,
                                 "original_max_position_embeddings": rope.original_max_positions}
    else:
        cfg["rotary_scaling"] = None
    return cfg


def read_rope(cfg: dict, percent: float | None = None) -> dict:
    """The inverse of :func:`rope_config`: Rope fields from config.json."""
    rs = cfg.get("rotary_scaling") or {}
    out = {"base": float(cfg.get("rotary_base", 10000.0)),
           "percent": float(cfg.get("rotary_pct", 1.0)) if percent is None else percent,
           "scaling": rs.get("type", "none") if rs else "none", "factor": float(rs.get("factor", 1.0)) if rs else 1.0}
    if out["scaling"] == "llama3":
        out.update(low_freq_factor=float(rs["low_freq_factor"]), high_freq_factor=float(rs["high_freq_factor"]),
                   original_max_positions=int(rs["original_max_position_embeddings"]))
    return out


def qk_norm_and_scaling(f: Facts, softmax_scale: bool = False, yarn: bool = False) -> list[str]:
    """The Llama / GPT classes: no q/k norm; rope scaling none, linear or llama3 (and yarn where the class writes
    it: ``yarn``); a softmax scale only where the class has a field for it (``softmax_scale``)."""
    p = []
    if f.a0["softmax_scale"] is not None and not softmax_scale:
        p.append(f"a softmax scale other than 1/sqrt(head_dim) is not expressible with {f.name} (TensorRT-LLM's "
                 "LLaMA class has attention_multiplier; this class has none mexc writes)")
    if f.a0["qk_norm"] != "none":
        p.append("QK layernorm is not supported by the Llama/GPT checkpoint classes")
    rope = f.a0["rope"]
    if f.a0["position"] == "rope" and rope.scaling not in ("none", "linear", "llama3", *(("yarn",) if yarn else ())):
        p.append(f"rope scaling {rope.scaling!r} is not expressible")
    return p


def _plain(f: Facts) -> list[str]:
    p = []
    if f.emb.attrs["scale"] != 1.0:
        p.append(f"scaled embeddings (x{f.emb.attrs['scale']:g}) are not expressible with {f.name} "
                 "(GemmaForCausalLM scales by sqrt(hidden))")
    layers = [layer for layer in sorted({n.layer for n in f.attns}) if parallel_block_norms(f.model, layer)[0]]
    if layers:
        p.append(f"layer {layers[0]}: a parallel attention + MLP block is not expressible with {f.name} "
                 "(FalconForCausalLM has them)")
    return p


PLAIN_DECODER = Rule("scaled embeddings; parallel attention + MLP blocks", _plain)
