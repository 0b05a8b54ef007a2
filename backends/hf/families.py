"""Which Hugging Face class a model becomes, what that class cannot express, and its config.json.

The family is chosen from the IR's structure (norm kind, positions, biases, experts), not from the source's
family label:

=========  ======================  ==========================================================================
family     HF class                IR shape
=========  ======================  ==========================================================================
llama      LlamaForCausalLM        RMSNorm, rotary, gated MLP; ``attention_bias`` / ``mlp_bias`` as needed
qwen2      Qwen2ForCausalLM        like llama, with q/k/v biases only (no o_proj / MLP bias)
mixtral    MixtralForCausalLM      like llama, every layer a softmax top-k MoE of gated experts, no biases
gpt2       GPT2LMHeadModel         LayerNorm, learned (or no) positions, plain MLP, MHA, head tied or not
gpt_bigcode GPTBigCodeForCausalLM  like gpt2 with multi-query attention (StarCoder), ``nn.Linear`` weights
gemma      GemmaForCausalLM        RMSNorm (1 + w), embedding x sqrt(hidden), GeGLU (tanh GELU), rotary
nemotron   NemotronForCausalLM     LayerNorm1p (1 + w), rotary (partial allowed), plain MLP (squared-relu)
stablelm   StableLmForCausalLM     LayerNorm, rotary (partial allowed), SwiGLU, q/k/v bias only (NeMo GPT-Next)
falcon     FalconForCausalLM       parallel attention + MLP off one LayerNorm, rotary, fused grouped QKV,
                                   biases all or none (falcon2: the same with ln_attn + ln_mlp, Falcon's
                                   new decoder architecture)
=========  ======================  ==========================================================================

Gemma and Nemotron store the norm weight zero-centered (their modules add 1 themselves): the hf backend does not
fold the gamma for them and writes ``w`` (or ``w - 1`` for a norm that was not zero-centered).

Config fields follow transformers 5 (``rope_parameters``, ``dtype``) and also carry the 4.x spellings
(``rope_theta``, ``rope_scaling``, ``torch_dtype``) so older loaders (vLLM, TensorRT-LLM's PyTorch backend
on transformers 4.x) read the same file.
"""

from __future__ import annotations

import math

from ...ir import Model
from ...ir.analysis import is_parallel_block, parallel_block_norms

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "gpt_bigcode": "GPTBigCodeForCausalLM", "gemma": "GemmaForCausalLM",
                 "nemotron": "NemotronForCausalLM", "stablelm": "StableLmForCausalLM",
                 "falcon": "FalconForCausalLM", "falcon2": "FalconForCausalLM"}
MODEL_TYPES = {f: f for f in ARCHITECTURES} | {"falcon2": "falcon"}
# families whose HF norm module computes with (1 + weight): the stored weight stays zero-centered
ZERO_CENTERED = ("gemma", "nemotron")
# families that keep the fused QKV (Falcon's query_key_value is Megatron's grouped layout)
FUSED_QKV = ("falcon", "falcon2")
# IR activation -> transformers ACT2FN name
HIDDEN_ACT = {"silu": "silu", "gelu": "gelu", "gelu-tanh": "gelu_pytorch_tanh", "relu": "relu",
              "squared-relu": "relu2", "quick-gelu": "quick_gelu"}
GPT2_ACT = {"gelu": "gelu", "gelu-tanh": "gelu_new", "relu": "relu", "quick-gelu": "quick_gelu",
            "squared-relu": "relu2", "silu": "silu"}
_DTYPE = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
_ATTN_BIAS = ("q_bias", "k_bias", "v_bias", "proj_bias")
_MLP_BIAS = ("gate_bias", "up_bias", "fc1_bias", "fc2_bias")


def _has(nodes, names) -> bool:
    return any(k in n.params for n in nodes for k in names)


def classify(model: Model) -> tuple[str | None, list[str]]:
    """(family, problems): the HF family this model maps to, and what that family cannot express."""
    g = model.graph
    p: list[str] = []
    attns, mlps, moes = list(g.find("attention")), list(g.find("mlp")), list(g.find("moe"))
    norms = list(g.find("norm"))
    emb = next(g.find("embedding"), None)
    heads = list(g.find("lm_head"))
    if emb is None or len(heads) != 1 or not attns:
        return None, ["the hf target needs one embedding, attention layers and one lm_head"]
    kinds = {n.attrs["kind"] for n in norms}
    positions = {a.attrs["position"] for a in attns}
    learned = "position" in emb.params
    parallel = [layer for layer in sorted({n.layer for n in attns}) if is_parallel_block(model, layer)]
    gated = {m.attrs["gated"] for m in mlps}
    a0 = attns[0].attrs
    acts = {m.attrs["activation"] for m in mlps}
    if moes:
        family = "mixtral"
    elif parallel and kinds == {"layernorm"} and positions == {"rope"}:
        family = "falcon2" if falcon_block(model) == "two-norm" else "falcon"
    elif emb.attrs["scale"] != 1.0 and kinds == {"rmsnorm"} and gated == {True} and acts <= {"gelu", "gelu-tanh"}:
        family = "gemma"
    elif kinds == {"layernorm"} and positions == {"none"}:
        family = "gpt_bigcode" if a0["num_kv_heads"] == 1 < a0["num_heads"] else "gpt2"
    elif kinds == {"layernorm"} and positions == {"rope"}:
        family = "stablelm" if gated == {True} else "nemotron"
    elif kinds == {"rmsnorm"} and positions == {"rope"}:
        qkv_bias = _has(attns, ("q_bias", "k_bias", "v_bias"))
        family = "qwen2" if qkv_bias and not _has(attns, ("proj_bias",)) and not _has(mlps, _MLP_BIAS) else "llama"
    else:
        return None, [f"no Hugging Face class in mexc for norm={sorted(kinds)} with positions="
                      f"{sorted(positions | ({'learned'} if learned else set()))} (hf target: Llama/Qwen2/Mixtral/"
                      "Gemma need RMSNorm + rotary; GPT-2/GPTBigCode need LayerNorm + learned or no positions; "
                      "Nemotron/StableLM/Falcon need LayerNorm + rotary)"]
    name = f"{family} family ({ARCHITECTURES[family]})"

    # --- what every family shares
    if emb.attrs["scale"] != 1.0 and family != "gemma":
        p.append(f"scaled embeddings (x{emb.attrs['scale']:g}, Gemma-style) cannot be expressed by the {name}; "
                 "only GemmaForCausalLM scales its embeddings (by sqrt(hidden), with RMSNorm + rotary)")
    if parallel and family not in FUSED_QKV:
        p.append(f"parallel attention+MLP blocks (layer {parallel[0]}) cannot be expressed by the {name}")
    for _, pname, prm in g.params():
        if not prm.type.dtype.is_float or prm.type.dtype.bits == 8 or pname.endswith("_scale"):
            p.append(f"quantized weights ({pname}: {prm.type}) cannot be written to the hf target: mexc emits no "
                     "loader-readable quantization config; drop the quantize pass / --quant")
            break
    if any(n.attrs["zero_centered"] for n in norms) and family not in ZERO_CENTERED:
        p.append("zero-centered norm gamma must be folded (run canonicalize) before the hf target")
    if len({n.attrs["eps"] for n in norms}) > 1:
        p.append(f"the norms use different eps {sorted({n.attrs['eps'] for n in norms})}; the {name} has one")
    for a in attns:
        at = a.attrs
        if ("qkv" in a.params) != (family in FUSED_QKV):
            p.append(f"{a.location}: fused QKV must be split (run split-qkv) before the hf target"
                     if "qkv" in a.params else f"{a.location}: the {name} needs a fused QKV (run fuse-qkv)")
            break
        if "qkv" in a.params and a.params["qkv"].type.layout.kind != "grouped":
            p.append(f"{a.location}: the {name} needs the grouped QKV layout (run relayout-qkv{{to=grouped}})")
            break
        if at["qk_norm"] != "none":
            p.append(f"QK normalization cannot be expressed by the {name} (Qwen3/OLMo2 classes are not emitted yet)")
            break
        if at["softmax_scale"] is not None and not math.isclose(at["softmax_scale"], at["head_dim"] ** -0.5):
            p.append(f"a softmax scale of {at['softmax_scale']} (not 1/sqrt(head_dim)) cannot be expressed by the "
                     f"{name}")
            break
    shapes = {(a.attrs["num_heads"], a.attrs["num_kv_heads"], a.attrs["head_dim"], a.attrs["rope"]) for a in attns}
    if len(shapes) > 1:
        p.append(f"layers differ in attention shape or rotary settings; the {name} has one per model")
    word, head = emb.params["word"].type.shape, heads[0].params["weight"].type.shape
    if word[0] != head[0]:
        p.append(f"embedding has {word[0]} rows but lm_head {head[0]}; the {name} has one vocab_size")

    # --- per family
    if family in ("llama", "qwen2", "mixtral"):
        rope = attns[0].attrs["rope"]
        if learned:
            p.append(f"learned position embeddings on top of rotary cannot be expressed by the {name}")
        if rope.percent != 1.0:
            p.append(f"partial rotary (rotary_percent={rope.percent:g}) cannot be expressed by the {name} in the hf "
                     f"target: transformers' {ARCHITECTURES[family]} rotates the whole head (no "
                     "partial_rotary_factor); a model with q/k/v bias and partial rotary has no exact HF class")
        if rope.interleaved:
            p.append(f"interleaved (GPT-J style) rotary cannot be expressed by the {name}: HF rotates halves")
        if rope.scaling not in ("none", "linear", "llama3"):
            p.append(f"rope scaling {rope.scaling!r} is not written by mexc's hf target (none, linear, llama3)")
        for m in mlps:
            if not m.attrs["gated"]:
                p.append(f"a non-gated MLP cannot be expressed by the {name} (its MLP is always gate/up/down)")
                break
            if m.attrs["activation"] not in HIDDEN_ACT:
                p.append(f"activation {m.attrs['activation']!r} has no transformers name")
                break
    if family == "mixtral":
        if mlps:
            p.append("mixed dense and MoE layers cannot be expressed by the mixtral family (MixtralForCausalLM): "
                     "every layer is an MoE")
        if _has(attns, _ATTN_BIAS):
            p.append("attention biases cannot be expressed by the mixtral family (MixtralForCausalLM)")
        for m in moes:
            a = m.attrs
            if a["score"] != "softmax":
                p.append(f"MoE routing with score={a['score']!r} (not softmax) cannot be expressed by the mixtral "
                         "family (MixtralForCausalLM routes by softmax top-k)")
            elif a["pre_softmax"] and a["top_k"] != a["num_experts"]:
                p.append("MoE pre-softmax routing (softmax over all experts, top-k weights not renormalized) "
                         "cannot be expressed by the mixtral family: MixtralForCausalLM renormalizes the top-k")
            if not a["gated"] or a["activation"] != "silu":
                p.append("the mixtral family (MixtralForCausalLM) needs gated SiLU experts, got "
                         f"activation={a['activation']!r} gated={a['gated']}")
            if set(m.params) - {"router", "gate", "up", "fc2"}:
                p.append(f"MoE params {sorted(set(m.params) - {'router', 'gate', 'up', 'fc2'})} cannot be "
                         "expressed by the mixtral family")
            if p:
                break
        if len({(m.attrs["num_experts"], m.attrs["top_k"], m.params["fc2"].type.shape) for m in moes}) > 1:
            p.append("MoE layers differ in experts/top-k/size; MixtralForCausalLM has one per model")
    if family in ("gpt2", "gpt_bigcode"):
        a = attns[0].attrs
        if a["num_kv_heads"] != a["num_heads"] and family == "gpt2":
            p.append(f"grouped/multi-query attention ({a['num_kv_heads']} KV heads for {a['num_heads']} heads) "
                     "cannot be expressed by the gpt2 family (GPT2LMHeadModel is multi-head only)")
        if a["num_heads"] * a["head_dim"] != model.config.hidden_size:
            p.append(f"head_dim {a['head_dim']} x {a['num_heads']} heads != hidden {model.config.hidden_size}: "
                     "the gpt2 family (GPT2LMHeadModel) derives head_dim from hidden_size")
        for m in mlps:
            if m.attrs["gated"]:
                p.append("a gated MLP cannot be expressed by the gpt2 family (GPT2LMHeadModel)")
                break
            if m.attrs["activation"] not in GPT2_ACT:
                p.append(f"activation {m.attrs['activation']!r} has no transformers name")
                break
        if len({m.params["fc2"].type.shape for m in mlps}) > 1:
            p.append("MLP sizes differ across layers; GPT2LMHeadModel has one n_inner")
    elif family in ("llama", "qwen2") and len({m.params["fc2"].type.shape for m in mlps}) > 1:
        p.append(f"MLP sizes differ across layers; the {name} has one intermediate_size")
    if family in ("gemma", "nemotron", "stablelm", "falcon", "falcon2"):
        p += _check_new_family(model, family, name, attns, mlps, emb, learned)
    return family, p


def _check_new_family(model, family, name, attns, mlps, emb, learned) -> list[str]:
    """What GemmaForCausalLM / NemotronForCausalLM / StableLmForCausalLM / FalconForCausalLM cannot express."""
    p: list[str] = []
    H = model.config.hidden_size
    a = attns[0].attrs
    rope = a["rope"]
    if learned:
        p.append(f"learned position embeddings cannot be expressed by the {name}")
    if {x.attrs["position"] for x in attns} != {"rope"}:
        p.append(f"the {name} is rotary-only (Falcon's ALiBi is not emitted by mexc)")
    if rope.interleaved:
        p.append(f"interleaved (GPT-J style) rotary cannot be expressed by the {name}: HF rotates halves")
    if rope.scaling not in ("none", "linear", "llama3"):
        p.append(f"rope scaling {rope.scaling!r} is not written by mexc's hf target (none, linear, llama3)")
    if rope.percent != 1.0 and family in ("gemma", "falcon", "falcon2"):
        p.append(f"partial rotary (rotary_percent={rope.percent:g}) cannot be expressed by the {name}: it rotates "
                 "the whole head")
    if family in ("stablelm", "falcon", "falcon2") and a["num_heads"] * a["head_dim"] != H:
        p.append(f"head_dim {a['head_dim']} x {a['num_heads']} heads != hidden {H}: the {name} derives head_dim "
                 "from hidden_size")
    want_gated = family in ("gemma", "stablelm")
    for m in mlps:
        act = m.attrs["activation"]
        if m.attrs["gated"] != want_gated:
            p.append(f"a {'non-' if want_gated else ''}gated MLP cannot be expressed by the {name}")
            break
        if family == "gemma" and act != "gelu-tanh":
            p.append(f"activation {act!r} cannot be expressed by the {name}: transformers' Gemma always uses the "
                     "tanh GELU (it rewrites hidden_act='gelu' to gelu_pytorch_tanh); Megatron's Gemma uses "
                     "openai_gelu (tanh)")
            break
        if family == "stablelm" and act != "silu":
            p.append(f"activation {act!r} cannot be expressed by the {name} (SwiGLU only)")
            break
        if act not in HIDDEN_ACT:
            p.append(f"activation {act!r} has no transformers name")
            break
    if len({m.params["fc2"].type.shape for m in mlps}) > 1:
        p.append(f"MLP sizes differ across layers; the {name} has one intermediate_size")
    if family in ("gemma", "stablelm") and _has(mlps, _MLP_BIAS):
        p.append(f"MLP biases cannot be expressed by the {name}")
    if family == "stablelm" and _has(attns, ("proj_bias",)):
        p.append(f"an attention output bias cannot be expressed by the {name} (use_qkv_bias covers q/k/v only)")
    if family == "gemma":
        if not math.isclose(emb.attrs["scale"], math.sqrt(H), rel_tol=1e-6):
            p.append(f"embedding scale {emb.attrs['scale']:g} cannot be expressed by the {name}: it multiplies by "
                     f"sqrt(hidden_size) = {math.sqrt(H):g}")
    if family in FUSED_QKV:
        layers = sorted({x.layer for x in attns})
        blocks = [_falcon_block(model, layer) for layer in layers]
        if any(b is None for b in blocks):
            p.append(f"layer {layers[blocks.index(None)]} is not a parallel attention+MLP block; the {name} has "
                     "one block kind per model")
        elif len(set(blocks)) > 1:
            p.append(f"layers mix one-norm and two-norm parallel blocks; the {name} has one per model")
    return p


def _falcon_block(model, layer) -> str | None:
    """'one-norm' / 'two-norm' for a parallel block (attention and MLP read norms of the same input), else None."""
    norms, _ = parallel_block_norms(model, layer)
    return {1: "one-norm", 2: "two-norm"}.get(norms)


def falcon_block(model) -> str:
    return _falcon_block(model, next(model.graph.find("attention")).layer) or "one-norm"


def flags(model: Model, family: str) -> dict[str, bool]:
    """The config switches the name table's ``when`` column reads."""
    g = model.graph
    head = next(g.find("lm_head"))
    attns, mlps = list(g.find("attention")), list(g.find("mlp"))
    attn_bias, mlp_bias = _has(attns, _ATTN_BIAS), _has(mlps, _MLP_BIAS)
    if family in FUSED_QKV:                      # Falcon: one `bias` switch for every linear
        attn_bias = mlp_bias = attn_bias or mlp_bias
    elif family == "stablelm":                   # use_qkv_bias
        attn_bias = _has(attns, ("q_bias", "k_bias", "v_bias"))
    return {"always": True, "untied": not head.attrs["tied"],
            "attn_bias": family in ("llama", "gemma", "nemotron", "stablelm", *FUSED_QKV) and attn_bias,
            "mlp_bias": family in ("llama", "nemotron", *FUSED_QKV) and mlp_bias}


def _rope_fields(rope, out: dict) -> None:
    params: dict = {"rope_type": "default", "rope_theta": float(rope.base)}
    if rope.scaling == "linear":
        params.update(rope_type="linear", factor=float(rope.factor))
    elif rope.scaling == "llama3":
        params.update(rope_type="llama3", factor=float(rope.factor), low_freq_factor=float(rope.low_freq_factor),
                      high_freq_factor=float(rope.high_freq_factor),
                      original_max_position_embeddings=int(rope.original_max_positions))
    out["rope_parameters"] = params                  # transformers >= 5
    out["rope_theta"] = float(rope.base)            # transformers 4.x, vLLM
    if params["rope_type"] != "default":
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}


def hf_config(model: Model, family: str) -> dict:
    """config.json for ``family`` (call after :func:`classify` found no problems)."""
    g, c = model.graph, model.config
    attn = next(g.find("attention"))
    a = attn.attrs
    emb = next(g.find("embedding"))
    head = next(g.find("lm_head"))
    norm = next(g.find("norm"))
    vocab = emb.params["word"].type.shape[0]
    dtype = _DTYPE.get(c.dtype.value, "float32")
    ids = {k: c.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}  # unknown -> null
    cfg: dict = {"architectures": [ARCHITECTURES[family]], "model_type": MODEL_TYPES[family]}
    if family in ("gemma", "nemotron", "stablelm", *FUSED_QKV):
        cfg.update(_new_family_config(model, family, vocab))
    elif family in ("gpt2", "gpt_bigcode"):
        mlp = next(g.find("mlp"))
        pos = emb.params.get("position")
        cfg.update({
            "vocab_size": vocab,
            "n_positions": pos.type.shape[0] if pos is not None else c.max_position_embeddings,
            "n_embd": c.hidden_size,
            "n_layer": c.num_layers,
            "n_head": a["num_heads"],
            "n_inner": mlp.params["fc2"].type.shape[1],
            "activation_function": GPT2_ACT[mlp.attrs["activation"]],
            "layer_norm_epsilon": norm.attrs["eps"],
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "initializer_range": 0.02,
        })
        if family == "gpt_bigcode":
            cfg["multi_query"] = True
    else:
        ffn_node = next(g.find("moe" if family == "mixtral" else "mlp"))
        cfg.update({
            "vocab_size": vocab,
            "hidden_size": c.hidden_size,
            "intermediate_size": ffn_node.params["fc2"].type.shape[-1],
            "num_hidden_layers": c.num_layers,
            "num_attention_heads": a["num_heads"],
            "num_key_value_heads": a["num_kv_heads"],
            "head_dim": a["head_dim"],
            "hidden_act": HIDDEN_ACT[ffn_node.attrs["activation"]],
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": norm.attrs["eps"],
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        })
        _rope_fields(a["rope"], cfg)
        f = flags(model, family)
        if family == "llama":
            cfg["attention_bias"] = f["attn_bias"]
            cfg["mlp_bias"] = f["mlp_bias"]
            cfg["pretraining_tp"] = 1
        elif family == "qwen2":
            cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": c.num_layers})
        else:
            m = ffn_node.attrs
            cfg.update({"num_local_experts": m["num_experts"], "num_experts_per_tok": m["top_k"],
                        "output_router_logits": False, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0,
                        "sliding_window": None})
    cfg.update({
        "tie_word_embeddings": bool(head.attrs["tied"]),
        "use_cache": True,
        **ids,
        "dtype": dtype,
        "torch_dtype": dtype,
    })
    return cfg


def _new_family_config(model: Model, family: str, vocab: int) -> dict:
    g, c = model.graph, model.config
    a = next(g.find("attention")).attrs
    mlp = next(g.find("mlp"))
    norm = next(g.find("norm"))
    f = flags(model, family)
    F = mlp.params["fc2"].type.shape[1]
    cfg: dict = {"vocab_size": vocab, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_layers,
                 "num_attention_heads": a["num_heads"], "max_position_embeddings": c.max_position_embeddings,
                 "attention_dropout": 0.0, "initializer_range": 0.02}
    rope = a["rope"]
    _rope_fields(rope, cfg)
    # always explicit: StableLM defaults to 0.25 and Nemotron to 0.5
    cfg["rope_parameters"]["partial_rotary_factor"] = float(rope.percent)   # transformers >= 5
    cfg["partial_rotary_factor"] = float(rope.percent)                      # 4.x
    eps = norm.attrs["eps"]
    act = HIDDEN_ACT[mlp.attrs["activation"]]
    if family == "gemma":
        cfg.update(intermediate_size=F, num_key_value_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                   hidden_act=act, hidden_activation=act, rms_norm_eps=eps, attention_bias=f["attn_bias"])
    elif family == "nemotron":
        cfg.update(intermediate_size=F, num_key_value_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                   hidden_act=act, norm_eps=eps, attention_bias=f["attn_bias"], mlp_bias=f["mlp_bias"])
    elif family == "stablelm":
        cfg.update(intermediate_size=F, num_key_value_heads=a["num_kv_heads"], hidden_act=act, layer_norm_eps=eps,
                   use_qkv_bias=f["attn_bias"], qk_layernorm=False, use_parallel_residual=False,
                   hidden_dropout=0.0)
    else:  # falcon
        nh, nkv = a["num_heads"], a["num_kv_heads"]
        two = family == "falcon2"
        new_arch = two or nkv not in (1, nh)
        cfg.update(ffn_hidden_size=F, activation=act, layer_norm_epsilon=eps, num_kv_heads=nkv, alibi=False,
                   parallel_attn=True, bias=f["attn_bias"], new_decoder_architecture=new_arch,
                   multi_query=nkv == 1 and not new_arch, num_ln_in_parallel_attn=(2 if two else 1) if new_arch
                   else None, hidden_dropout=0.0)
        if nh == 1:   # one head: MQA and MHA coincide
            cfg["multi_query"] = False
    return cfg


def generation_config(model: Model) -> dict:
    c = model.config
    out: dict = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if c.get(k) is not None:
            out[k] = c.get(k)
    return out
