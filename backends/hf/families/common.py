"""What every Hugging Face family file shares: the registry, the row dialect's hf transforms and conditions,
the rules every class holds, rule sets several classes reuse, and config helpers.

Config fields follow transformers 5 (``rope_parameters``, ``dtype``) and also carry the 4.x spellings
(``rope_theta``, ``rope_scaling``, ``torch_dtype``) so older loaders (vLLM, TensorRT-LLM's PyTorch backend
on transformers 4.x) read the same file.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ....ir.analysis import is_parallel_block, parallel_block_norms
from ...lowering import Facts, Registry, Rule, TargetClass, parse_rows

# hf transforms: copy; zc (a norm weight the HF module uses as 1 + w: the IR's zero-centered weight as is, or
# w - 1 for a norm that is not zero-centered); conv1d (GPT-2 Conv1D stores [in, out]); expert (one tensor per
# expert: row {E} of the IR's [E, ...] stack); depthwise (nn.Conv1d's [C, 1, K] from the IR's depthwise [C, K]);
# heads (the row's params interleaved head by head, head_dim rows each: Qwen3-Next's q_proj [q_h; gate_h]);
# pairs (q/k rows per head from rotate-half to interleaved-pair rotary order: Llama 4); gate_up, t12: GptOss
TRANSFORMS = ("copy", "zc", "conv1d", "expert", "depthwise", "heads", "pairs", "gate_up", "t12")
# always: the class always has the tensor (zeros when the IR has none); attn_bias / mlp_bias: exists when the
# config turns the bias on; untied: written only when the head is not tied to the embedding
CONDITIONS = ("always", "attn_bias", "mlp_bias", "untied", "q_lora", "q_direct")  # q_*: MLA's q form
HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu-tanh": "gelu_pytorch_tanh", "relu": "relu",
              "squared-relu": "relu2", "quick-gelu": "quick_gelu"}
DTYPE = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
ATTN_BIAS = ("q_bias", "k_bias", "v_bias", "proj_bias")
QKV_BIAS = ("q_bias", "k_bias", "v_bias")
MLP_BIAS = ("gate_bias", "up_bias", "fc1_bias", "fc2_bias")


def _none_line(f: Facts) -> str:
    return (f"no Hugging Face class in mexc for norm={sorted(f.kinds)} with positions="
            f"{sorted(f.positions | ({'learned'} if f.learned else set()))} (hf target: Llama/Qwen2/Qwen3/Mixtral/"
            "Gemma need RMSNorm + rotary; GPT-2/GPTBigCode need LayerNorm + learned or no positions; "
            "Nemotron/StableLM/Falcon need LayerNorm + rotary)")


REGISTRY = Registry("hf", _none_line)


def parallel_layers(f: Facts) -> list[int]:
    if "parallel" not in f.__dict__:
        f.parallel = [layer for layer in sorted({n.layer for n in f.attns}) if is_parallel_block(f.model, layer)]
    return f.parallel


def falcon_block(model, layer=None) -> str | None:
    """'one-norm' / 'two-norm' for a parallel block (attention and MLP read norms of the same input), else None;
    without ``layer``, the first attention layer's (default one-norm)."""
    if layer is None:
        return falcon_block(model, next(model.graph.find("attention")).layer) or "one-norm"
    norms, _ = parallel_block_norms(model, layer)
    return {1: "one-norm", 2: "two-norm"}.get(norms)


def family(name: str, architecture: str, *, rows: str, signature: Callable[[Facts], bool], rules: list[Rule],
           config: Callable[[Facts, dict], dict], model_type: str | None = None, zero_centered: bool = False,
           fused_qkv: bool = False, moe: bool = False, before: tuple[str, ...] = (),
           flags: Callable[[Facts, dict], dict] | None = None, windows: bool = False,
           sinks: bool = False, router_fp32: bool = False) -> TargetClass:
    """Register one HF family (one file per class): its rows, signature, rules (after :data:`COMMON`) and
    config builder. ``zero_centered``: the HF norm computes with (1 + w), so the gamma is not folded;
    ``fused_qkv``: the class keeps Megatron's grouped fused QKV; ``flags(facts, base)`` adjusts the row
    conditions; ``moe``: the class has experts (the others never take a model with them); ``before``: classes
    whose signature also holds for this one's models and that must be tried after it; ``windows``: the class
    expresses sliding-window attention (its own rules say which patterns); ``sinks``: the class has attention
    sinks (``self_attn.sinks``); ``router_fp32``: transformers keeps the router (``gate.weight``, and
    ``e_score_correction_bias`` where the class has it) in fp32 whatever the model's dtype (the class's
    ``_keep_in_fp32_modules_strict``), so ``--dtype`` leaves router-role params fp32 (tests/test_hf_backend.py
    checks the flag against transformers)."""
    def dense(f: Facts, structure=signature) -> bool:   # only the MoE class takes a model with experts
        return not f.moes and structure(f)

    cls = TargetClass(name, f"{name} family ({architecture})", signature if moe else dense, [*COMMON, *rules],
                      parse_rows(rows, transforms=TRANSFORMS, conditions=CONDITIONS, where=f"hf {name}",
                                 family=name),
                      config, {"architecture": architecture, "model_type": model_type or name, "before": before,
                               "zero_centered": zero_centered, "fused_qkv": fused_qkv, "flags": flags,
                               "windows": windows, "sinks": sinks, "router_fp32": router_fp32})
    return REGISTRY.register(cls)


def rule(cannot: str):
    """Decorator: a function ``f(facts) -> refusal line(s) | None`` becomes a :class:`Rule`."""
    return lambda fn: Rule(cannot, fn)


# ------------------------------------------------------------------------------- rows of the model.layers layout
def decoder_rows(*, norm: str = "copy", norm_bias: bool = False, qkv_bias: str | None = None,
                 proj_bias: str | None = None, qk_norm: bool = False, mlp: str = "gated",
                 mlp_bias: str | None = None) -> str:
    """Rows of the ``model.layers.{L}`` layout transformers' Llama-descended classes share (Llama, Qwen2/3,
    Mixtral, Gemma, Nemotron, StableLM): ``norm`` = the norm weights' transform (``zc`` when the class adds
    1 itself), ``norm_bias`` = LayerNorm biases, ``qkv_bias`` / ``proj_bias`` / ``mlp_bias`` = the condition
    of those biases (None: the class has none), ``qk_norm`` = q/k norm weights, ``mlp`` = ``gated``
    (gate/up/down), ``plain`` (up/down) or ``none`` (the class writes its own FFN rows)."""
    L = "model.layers.{L}."
    rows = [("embedding", "word", "model.embed_tokens.weight", "copy", "always"),
            ("input_norm", "weight", L + "input_layernorm.weight", norm, "always")]
    rows += [("input_norm", "bias", L + "input_layernorm.bias", "copy", "always")] if norm_bias else []
    rows += [("attention", p, L + f"self_attn.{p}_proj.weight", "copy", "always") for p in "qkv"]
    rows += [("attention", f"{p}_bias", L + f"self_attn.{p}_proj.bias", "copy", qkv_bias)
             for p in "qkv" if qkv_bias]
    rows += [("attention", "proj", L + "self_attn.o_proj.weight", "copy", "always")]
    rows += [("attention", "proj_bias", L + "self_attn.o_proj.bias", "copy", proj_bias)] if proj_bias else []
    rows += [("attention", f"{p}_norm", L + f"self_attn.{p}_norm.weight", "copy", "always")
             for p in "qk" if qk_norm]
    rows += [("post_norm", "weight", L + "post_attention_layernorm.weight", norm, "always")]
    rows += [("post_norm", "bias", L + "post_attention_layernorm.bias", "copy", "always")] if norm_bias else []
    ffn = {"gated": [("gate", "gate_proj"), ("up", "up_proj"), ("fc2", "down_proj")],
           "plain": [("fc1", "up_proj"), ("fc2", "down_proj")], "none": []}[mlp]
    rows += [("mlp", p, L + f"mlp.{hf}.weight", "copy", "always") for p, hf in ffn]
    rows += [("mlp", f"{p}_bias", L + f"mlp.{hf}.bias", "copy", mlp_bias) for p, hf in ffn if mlp_bias]
    rows += [("final_norm", "weight", "model.norm.weight", norm, "always")]
    rows += [("final_norm", "bias", "model.norm.bias", "copy", "always")] if norm_bias else []
    rows += [("lm_head", "weight", "lm_head.weight", "copy", "untied")]
    return "\n".join("  ".join(r) for r in rows)


# ------------------------------------------------------------------------------- rules every class holds
def _quantized(f: Facts):
    for _, pname, prm in f.model.graph.params():
        if not prm.type.dtype.is_float or prm.type.dtype.bits == 8 or pname.endswith("_scale"):
            return (f"quantized weights ({pname}: {prm.type}) cannot be written to the hf target: mexc emits no "
                    "loader-readable quantization config; drop the quantize pass / --quant")


def _attention_forms(f: Facts):
    fused = f.cls.extra["fused_qkv"]
    for a in f.attns:
        at = a.attrs
        if ("qkv" in a.params) != fused:
            return (f"{a.location}: fused QKV must be split (run split-qkv) before the hf target"
                    if "qkv" in a.params else f"{a.location}: the {f.name} needs a fused QKV (run fuse-qkv)")
        if "qkv" in a.params and a.params["qkv"].type.layout.kind != "grouped":
            return f"{a.location}: the {f.name} needs the grouped QKV layout (run relayout-qkv{{to=grouped}})"
        if at["softmax_scale"] is not None and not math.isclose(at["softmax_scale"], at["head_dim"] ** -0.5) \
                and not f.cls.extra.get("any_softmax_scale"):
            return f"a softmax scale of {at['softmax_scale']} (not 1/sqrt(head_dim)) cannot be expressed by the {f.name}"


def windowed(f: Facts) -> list:
    """The attention nodes with a sliding window (``attention.window`` set)."""
    return [a for a in f.attns if a.attrs["window"] is not None]


def _window(f: Facts):
    w = windowed(f)
    if w and not f.cls.extra["windows"]:
        return (f"sliding-window attention ({w[0].location}: window {w[0].attrs['window']}) cannot be expressed by "
                f"the {f.name}; mexc writes windowed RMSNorm + rotary + SwiGLU models without biases as "
                "MistralForCausalLM (every layer windowed), MinistralForCausalLM (windowed and full layers) or, "
                "with MoE layers, MixtralForCausalLM (every layer windowed)")


def _attention_variants(f: Facts):
    """The output gate and the weightless L2 q/k norm exist only in the classes that declare them
    (``extra['output_gate']`` / ``extra['qk_l2_norm']``, set by their family files)."""
    gated = [a for a in f.attns if a.attrs.get("output_gate")]
    if gated and not f.cls.extra.get("output_gate"):
        return (f"an attention output gate ({gated[0].location}: sigmoid(gate) * attention output, Megatron's "
                f"attention_output_gate) cannot be expressed by the {f.name}; mexc writes it as "
                "Qwen3NextForCausalLM (RMSNorm q/k norms, rotary, SwiGLU, no biases)")
    l2 = [a for a in f.attns if a.attrs["qk_norm"] == "l2"]
    if l2 and not f.cls.extra.get("qk_l2_norm"):
        return (f"a weightless L2 q/k norm ({l2[0].location}, Megatron's qk_l2_norm) cannot be expressed by the "
                f"{f.name}")
def _sinks(f: Facts):
    if any(a.attrs.get("sinks") for a in f.attns) and not f.cls.extra.get("sinks"):
        return (f"attention sinks (megatron-core softmax_type learnable / off-by-one) cannot be expressed by the "
                f"{f.name}; mexc writes sinks as GraniteSWAForCausalLM (dense, RMSNorm, rotary, gated MLP) or "
                "GptOssForCausalLM (MoE with a clamped GLU)")


def _clamped_glu(f: Facts):
    m = next((m for m in (*f.mlps, *f.moes) if m.attrs.get("glu_clamp") is not None or m.attrs.get("glu_offset")),
             None)
    if m is not None and f.cls.name != "gpt_oss":
        return (f"a clamped / offset GLU ({m.location}: clamp {m.attrs['glu_clamp']}, up + {m.attrs['glu_offset']}; "
                f"megatron-core activation_func_clamp_value / glu_linear_offset) cannot be expressed by the {f.name}; "
                "mexc writes it only as GptOssForCausalLM's experts (MoE with sinks)")


def _zero_centered(f: Facts):
    if any(n.attrs["zero_centered"] for n in f.norms) and not f.cls.extra["zero_centered"]:
        return "zero-centered norm gamma must be folded (run canonicalize) before the hf target"


COMMON = [
    rule("scaled embeddings (Gemma only)")(
        lambda f: None if f.emb.attrs["scale"] == 1.0 or f.cls.name == "gemma" else
        f"scaled embeddings (x{f.emb.attrs['scale']:g}, Gemma-style) cannot be expressed by the {f.name}; only "
        "GemmaForCausalLM scales its embeddings (by sqrt(hidden), with RMSNorm + rotary)"),
    rule("parallel attention + MLP blocks (Falcon only)")(
        lambda f: None if not parallel_layers(f) or f.cls.extra["fused_qkv"] else
        f"parallel attention+MLP blocks (layer {parallel_layers(f)[0]}) cannot be expressed by the {f.name}"),
    rule("quantized weights (no loader-readable quantization config)")(_quantized),
    rule("sliding-window attention (Mistral / Ministral only)")(_window),
    rule("an attention output gate or a weightless L2 q/k norm (the classes declaring them only)")(
        _attention_variants),
    rule("attention sinks (GptOss only)")(_sinks),
    rule("a clamped / offset GLU (GptOss only)")(_clamped_glu),
    rule("an unfolded zero-centered gamma (families whose norm does not add 1)")(_zero_centered),
    rule("norms with different eps")(
        lambda f: None if len({n.attrs["eps"] for n in f.norms}) <= 1 else
        f"the norms use different eps {sorted({n.attrs['eps'] for n in f.norms})}; the {f.name} has one"),
    rule("a QKV form other than the class's; a softmax scale other than 1/sqrt(head_dim)")(_attention_forms),
    rule("layers with different attention shapes or rotary settings")(
        lambda f: None if len({(a.attrs["num_heads"], a.attrs["num_kv_heads"], a.attrs["head_dim"], a.attrs["rope"])
                               for a in f.attns}) <= 1 else
        f"layers differ in attention shape or rotary settings; the {f.name} has one per model"),
    rule("multi-latent attention (DeepseekV3 / DeepseekV2 only)")(
        lambda f: None if not f.mlas or f.cls.name in ("deepseek_v3", "deepseek_v2") else
        f"multi-latent attention (DeepSeek MLA) cannot be expressed by the {f.name} (MLA models become "
        "DeepseekV3ForCausalLM, or DeepseekV2ForCausalLM with softmax-routed MoE layers)"),
    rule("an embedding and head of different vocab sizes")(
        lambda f: None if f.emb.params["word"].type.shape[0] == f.heads[0].params["weight"].type.shape[0] else
        f"embedding has {f.emb.params['word'].type.shape[0]} rows but lm_head "
        f"{f.heads[0].params['weight'].type.shape[0]}; the {f.name} has one vocab_size"),
]


def no_qk_norm(f: Facts):
    """Rule body: the class has no q/k norm."""
    if any(a.attrs["qk_norm"] != "none" for a in f.attns):
        return (f"QK normalization cannot be expressed by the {f.name} (QK-norm models become "
                "Qwen3ForCausalLM: RMSNorm, rotary, SwiGLU)")


# ------------------------------------------------------------------------------- shared rule sets
def _rotation(f: Facts, yarn: bool = False) -> list[str]:
    rope, p = f.a0["rope"], []
    if rope.interleaved:
        p.append(f"interleaved (GPT-J style) rotary cannot be expressed by the {f.name}: HF rotates halves")
    if rope.scaling not in ("none", "linear", "llama3", *(("yarn",) if yarn else ())):
        ok = "none, linear, llama3" + (", yarn" if yarn else "")
        p.append(f"rope scaling {rope.scaling!r} is not written by mexc's hf target for the {f.name} ({ok})")
    return p


def _rope_llama(f: Facts):
    rope, p = f.a0["rope"], []
    if f.learned:
        p.append(f"learned position embeddings on top of rotary cannot be expressed by the {f.name}")
    if rope.percent != 1.0:
        p.append(f"partial rotary (rotary_percent={rope.percent:g}) cannot be expressed by the {f.name} in the hf "
                 f"target: transformers' {f.cls.extra['architecture']} rotates the whole head (no "
                 "partial_rotary_factor); mexc writes bias-free partial-rotary models as Phi3ForCausalLM, a model with "
                 "q/k/v bias and partial rotary has no exact HF class")
    return p + _rotation(f, yarn=True)


def _gated_mlps(f: Facts):
    for m in f.mlps:
        if not m.attrs["gated"]:
            return f"a non-gated MLP cannot be expressed by the {f.name} (its MLP is always gate/up/down)"
        if m.attrs["activation"] not in HIDDEN_ACT:
            return f"activation {m.attrs['activation']!r} has no transformers name"


def _one_mlp_size(f: Facts):
    if len({m.params["fc2"].type.shape for m in f.mlps}) > 1:
        return f"MLP sizes differ across layers; the {f.name} has one intermediate_size"


LLAMA_LIKE = [rule("learned positions, partial or interleaved rotary, rope scaling other than linear/llama3")(
    _rope_llama), rule("a non-gated MLP")(_gated_mlps)]
ONE_MLP_SIZE = rule("MLP sizes that differ across layers")(_one_mlp_size)


def _rope_rotary_only(f: Facts):
    """Gemma / Nemotron / StableLM / Falcon: rotary only, half rotation, no exotic scaling."""
    p = []
    if f.learned:
        p.append(f"learned position embeddings cannot be expressed by the {f.name}")
    if f.positions != {"rope"}:
        p.append(f"the {f.name} is rotary-only (Falcon's ALiBi is not emitted by mexc)")
    return p + _rotation(f)


def full_rotary(f: Facts):
    if f.a0["rope"].percent != 1.0:
        return (f"partial rotary (rotary_percent={f.a0['rope'].percent:g}) cannot be expressed by the {f.name}: it "
                "rotates the whole head")


def odd_rotary(f: Facts):
    """An odd ``int(head_dim * rotary_percent)``: megatron-core rotates it rounded up to even (3 frequencies over
    5 -> 6 channels, :meth:`Rope.rotated_dim`); a class that slices ``int(head_dim * partial_rotary_factor)``
    channels itself (StableLM's ``rotary_ndims``) rotates another number."""
    a = f.a0
    rd = a["rope"].rotary_dim(a["head_dim"])
    if a["position"] == "rope" and rd % 2:
        return (f"an odd rotary dimension (int({a['head_dim']} x rotary_percent {a['rope'].percent:g}) = {rd}; "
                f"megatron-core rotates {rd + 1} channels) cannot be expressed by the {f.name}: it rotates "
                f"int(head_dim x partial_rotary_factor) = {rd} channels")


def head_dim_from_hidden(f: Facts):
    a = f.a0
    if a["num_heads"] * a["head_dim"] != f.config.hidden_size:
        return (f"head_dim {a['head_dim']} x {a['num_heads']} heads != hidden {f.config.hidden_size}: the {f.name} "
                "derives head_dim from hidden_size")


def mlp_form(gated: bool, act: str | None, why: str = ""):
    """Rule body: every MLP gated (or not) with activation ``act`` (any transformers-named one when None)."""
    def check(f: Facts):
        for m in f.mlps:
            a = m.attrs["activation"]
            if m.attrs["gated"] != gated:
                return f"a {'non-' if gated else ''}gated MLP cannot be expressed by the {f.name}"
            if act is not None and a != act:
                return f"activation {a!r} cannot be expressed by the {f.name}{why}"
            if a not in HIDDEN_ACT:
                return f"activation {a!r} has no transformers name"
    return check


ROTARY_ONLY = rule("learned or no positions, interleaved rotary, rope scaling other than linear/llama3")(
    _rope_rotary_only)


# ------------------------------------------------------------------------------- config helpers
def rope_fields(rope, out: dict) -> None:
    params: dict = {"rope_type": "default", "rope_theta": float(rope.base)}
    if rope.scaling == "linear":
        params.update(rope_type="linear", factor=float(rope.factor))
    elif rope.scaling == "llama3":
        params.update(rope_type="llama3", factor=float(rope.factor), low_freq_factor=float(rope.low_freq_factor),
                      high_freq_factor=float(rope.high_freq_factor),
                      original_max_position_embeddings=int(rope.original_max_positions))
    elif rope.scaling == "yarn":   # transformers _compute_yarn_parameters; the cos/sin factor written as computed
        from ....ir.semantics import yarn_attention_factor

        params.update(rope_type="yarn", factor=float(rope.factor),
                      original_max_position_embeddings=int(rope.original_max_positions),
                      beta_fast=float(rope.beta_fast), beta_slow=float(rope.beta_slow), truncate=bool(rope.truncate),
                      attention_factor=float(yarn_attention_factor(rope)), mscale=float(rope.mscale),
                      mscale_all_dim=float(rope.mscale_all_dim))
        # the context YaRN extends to, as DeepSeek-V3's Hub config has it (163840 = 4096 x 40): transformers warns
        # below it, and readers that derive the factor from max_position_embeddings / original get ``factor``
        out["max_position_embeddings"] = max(int(out.get("max_position_embeddings") or 0),
                                             int(rope.original_max_positions * rope.factor))
    out["rope_parameters"] = params                  # transformers >= 5
    out["rope_theta"] = float(rope.base)            # transformers 4.x, vLLM
    if params["rope_type"] != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def llama_config(f: Facts, ffn_node) -> dict:
    """Fields Llama, Qwen2, Qwen3 and Mixtral share."""
    c, a = f.config, f.a0
    cfg = {"vocab_size": f.emb.params["word"].type.shape[0], "hidden_size": c.hidden_size,
           "intermediate_size": ffn_node.params["fc2"].type.shape[-1], "num_hidden_layers": c.num_layers,
           "num_attention_heads": a["num_heads"], "num_key_value_heads": a["num_kv_heads"],
           "head_dim": a["head_dim"], "hidden_act": HIDDEN_ACT[ffn_node.attrs["activation"]],
           "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": f.norms[0].attrs["eps"],
           "attention_dropout": 0.0, "initializer_range": 0.02}
    rope_fields(a["rope"], cfg)
    return cfg


def rotary_config(f: Facts) -> dict:
    """Fields Gemma, Nemotron, StableLM and Falcon share (partial rotary always explicit: StableLM defaults to
    0.25 and Nemotron to 0.5)."""
    c, a = f.config, f.a0
    cfg: dict = {"vocab_size": f.emb.params["word"].type.shape[0], "hidden_size": c.hidden_size,
                 "num_hidden_layers": c.num_layers, "num_attention_heads": a["num_heads"],
                 "max_position_embeddings": c.max_position_embeddings, "attention_dropout": 0.0,
                 "initializer_range": 0.02}
    rope_fields(a["rope"], cfg)
    cfg["rope_parameters"]["partial_rotary_factor"] = float(a["rope"].percent)   # transformers >= 5
    cfg["partial_rotary_factor"] = float(a["rope"].percent)                      # 4.x
    return cfg
