"""A second frontend: lift a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) back into the IR.

`mexc verify` uses it to run a compiled ``trtllm`` output through the reference executor. It inverts
TensorRT-LLM's documented rules: per-rank ``[Q_r; K_r; V_r]`` (KV heads de-duplicated when they were
replicated), column-parallel weights concatenated on dim 0, row-parallel on dim 1, stage-local layer
numbering, ``lm_head`` padding, MoE ``fc`` = ``[up; gate]`` per expert. Weights stay lazy.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ..errors import CheckpointError
from ..ir import Builder, ModelConfig, Recipe, Rope, SafetensorsStore, TensorType, derive, load
from ..ir.types import DType

_ST = {"F32": DType.f32, "BF16": DType.bf16, "F16": DType.f16, "F8_E4M3": DType.f8e4m3, "I8": DType.i8}
_ACT = {"gelu": "gelu-tanh", "gelu_new": "gelu-tanh", "relu": "relu", "squared-relu": "squared-relu",
        "silu": "silu", "swiglu": "silu", "geglu": "gelu-tanh", "quick_gelu": "quick-gelu"}


def lift_trtllm(path: str | Path):
    root = Path(path)
    cfg_path = root / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing", hint="give the directory `mexc compile --target trtllm` wrote") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if (cfg.get("quantization") or {}).get("quant_algo"):
        raise CheckpointError(f"{cfg_path}: quantized checkpoints ({cfg['quantization']['quant_algo']}) are "
                              "quantized by trtllm-build; verify the float checkpoint instead",
                              hint="compile without --quant to verify, then build with --quant")
    m = cfg["mapping"]
    tp, pp = m.get("tp_size", 1), m.get("pp_size", 1)
    ep = m.get("moe_ep_size", 1)
    store = SafetensorsStore("trt", str(root.resolve()))
    shapes: dict[int, dict[str, tuple[DType, tuple[int, ...]]]] = {}
    for r in range(tp * pp):
        f = root / f"rank{r}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (mapping says tp={tp} pp={pp})", hint="copy every rank file")
        with safe_open(f, "pt") as h:
            shapes[r] = {k: (_ST[h.get_slice(k).get_dtype()], tuple(h.get_slice(k).get_shape())) for k in h.keys()}

    def leaf(rank, name):
        if name not in shapes[rank]:
            return None
        dt, sh = shapes[rank][name]
        return load(store, f"rank{rank}.safetensors:{name}", TensorType(dt, sh))

    L, H = cfg["num_hidden_layers"], cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    d = cfg.get("head_size") or H // nh
    stage_of, local = [], []
    base, extra = divmod(L, pp)
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        stage_of += [s] * n
        local += list(range(n))

    def ranks(stage):
        return [stage * tp + t for t in range(tp)]

    def merged(stage, name, dim):
        parts = [leaf(r, name) for r in ranks(stage)]
        if parts[0] is None:
            return None
        if dim is None or tp == 1:
            return parts[0]
        return derive("concat", *parts, dim=dim)

    def qkv(stage, name):
        parts = [leaf(r, name) for r in ranks(stage)]
        if parts[0] is None:
            return None
        ql, kl = nh // tp * d, max(1, nkv // tp) * d
        step = max(1, tp // nkv)  # replicated KV heads: take one rank per head
        qs = [derive("slice", p, dim=0, start=0, stop=ql) for p in parts]
        ks = [derive("slice", p, dim=0, start=ql, stop=ql + kl) for p in parts[::step]]
        vs = [derive("slice", p, dim=0, start=ql + kl, stop=ql + 2 * kl) for p in parts[::step]]
        return derive("tag_qkv", derive("concat", *qs, *ks, *vs, dim=0), kind="concat", q=nh, kv=nkv, d=d)

    llama = cfg["architecture"] in ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
    act = _ACT.get(cfg.get("hidden_act", "gelu"))
    gated = llama or cfg.get("hidden_act") in ("swiglu", "geglu")
    kind = "rmsnorm" if llama else "layernorm"
    eps = cfg.get("norm_epsilon", 1e-5)
    pos = cfg.get("position_embedding_type", "learned_absolute")
    rs = cfg.get("rotary_scaling") or {}
    rope = Rope(base=float(cfg.get("rotary_base", 10000.0)), percent=1.0 if llama else float(cfg.get("rotary_pct", 1.0)),
                interleaved=pos == "rope_gptj", scaling=rs.get("type", "none") if rs else "none",
                factor=float(rs.get("factor", 1.0)) if rs else 1.0)
    vocab = cfg["vocab_size"]
    dtype = DType.parse(cfg["dtype"])
    mc = ModelConfig(family="llama" if llama else "gpt", hidden_size=H, num_layers=L, vocab_size=vocab,
                     max_position_embeddings=cfg.get("max_position_embeddings") or 2048, dtype=dtype)
    b = Builder(mc, stores={"trt": store}, meta={"source": "trtllm", "checkpoint": str(root.resolve())})
    emb_dim = 0 if cfg.get("use_parallel_embedding") else None
    word = merged(0, "transformer.vocab_embedding.weight", emb_dim)
    if word is None:
        raise CheckpointError(f"{root}/rank0.safetensors: no transformer.vocab_embedding.weight")
    if word.type.shape[0] != vocab:
        word = derive("slice", word, dim=0, start=0, stop=vocab)
    x = b.node("embedding", b.input_ids, params={"word": word,
                                                 "position": merged(0, "transformer.position_embedding.weight", emb_dim)})
    moe = cfg.get("moe") or {}
    E = moe.get("num_experts", 0) or cfg.get("moe_num_experts", 0)
    for i in range(L):
        s, p = stage_of[i], f"transformer.layers.{local[i]}."

        def rep(name, s=s):
            return leaf(ranks(s)[0], name)

        h = b.node("norm", x, layer=i, stage=0, kind=kind, eps=eps,
                   params={"weight": rep(p + "input_layernorm.weight"), "bias": rep(p + "input_layernorm.bias")})
        a = b.node("attention", h, layer=i, num_heads=nh, num_kv_heads=nkv, head_dim=d,
                   position="rope" if pos.startswith("rope") else "none", rope=rope,
                   params={"qkv": qkv(s, p + "attention.qkv.weight"), "qkv_bias": qkv(s, p + "attention.qkv.bias"),
                           "proj": merged(s, p + "attention.dense.weight", 1),
                           "proj_bias": rep(p + "attention.dense.bias")})
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, kind=kind, eps=eps,
                   params={"weight": rep(p + "post_layernorm.weight"), "bias": rep(p + "post_layernorm.bias")})
        if E:
            fc = [leaf(r, p + "mlp.fc.weight") for r in ranks(s)]
            proj = [leaf(r, p + "mlp.proj.weight") for r in ranks(s)]
            f_l = fc[0].type.shape[1] // 2
            ups = [derive("slice", t, dim=1, start=0, stop=f_l) for t in fc]
            gates = [derive("slice", t, dim=1, start=f_l, stop=2 * f_l) for t in fc]
            moe_tp = tp // ep
            # rank t holds expert block t % ep and ffn slice t // ep
            def join(ts, ffn_dim):
                blocks = []
                for e in range(ep):
                    cols = [ts[t] for t in range(tp) if t % ep == e]
                    blocks.append(cols[0] if moe_tp == 1 else derive("concat", *cols, dim=ffn_dim))
                return blocks[0] if ep == 1 else derive("concat", *blocks, dim=0)

            mlp = b.node("moe", h, layer=i, num_experts=E, top_k=moe.get("top_k", 2), activation="silu", gated=True,
                         pre_softmax=moe.get("normalization_mode", 1) == 0,
                         params={"router": rep(p + "mlp.router.weight"), "gate": join(gates, 1), "up": join(ups, 1),
                                 "fc2": join(proj, 2)})
        else:
            params: dict[str, Recipe | None] = {"fc2": merged(s, p + "mlp.proj.weight", 1),
                                                "fc2_bias": rep(p + "mlp.proj.bias")}
            if gated:
                params.update(gate=merged(s, p + "mlp.fc.weight", 0), gate_bias=merged(s, p + "mlp.fc.bias", 0),
                              up=merged(s, p + "mlp.gate.weight", 0), up_bias=merged(s, p + "mlp.gate.bias", 0))
            else:
                params.update(fc1=merged(s, p + "mlp.fc.weight", 0), fc1_bias=merged(s, p + "mlp.fc.bias", 0))
            mlp = b.node("mlp", h, layer=i, activation=act, gated=gated, params=params)
        x = b.node("add", x, mlp, layer=i)
    last = pp - 1
    x = b.node("norm", x, kind=kind, eps=eps, params={"weight": leaf(ranks(last)[0], "transformer.ln_f.weight"),
                                                      "bias": leaf(ranks(last)[0], "transformer.ln_f.bias")})
    head = merged(last, "lm_head.weight", 0)
    if head is None:
        head = word
    elif head.type.shape[0] != vocab:
        head = derive("slice", head, dim=0, start=0, stop=vocab)
    model = b.output(b.node("lm_head", x, params={"weight": head}))
    from ..ir import verify

    verify(model, context=f"(lifted from TensorRT-LLM checkpoint {root})")
    return model
