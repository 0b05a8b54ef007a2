"""A second frontend: lift a TensorRT-LLM checkpoint (config.json + rank{N}.safetensors) back into the IR.

`mexc verify` and `mexc inspect --ir` use it to run a compiled ``trtllm`` output through the reference
interpreter. It is derived from the writer (issue 15 item 7): the class that config.json's ``architecture``
names is looked up in :mod:`mexc.backends.trtllm.classes`; its name rows are inverted (tensor name -> node role
and IR param) and its ``read`` function turns config.json back into the IR attributes its ``config`` wrote
(norm kind, MLP form, parallel blocks, embedding scale, q/k norm). A class the writer does not know is refused
with one line. How shards merge follows the IR's declared param roles (:mod:`mexc.ir.ops`: column params
concatenated on dim 0, row on dim 1, the rest taken from the first rank), plus TensorRT-LLM's own per-rank
``[Q_r; K_r; V_r]`` (KV heads de-duplicated when replicated), stage-local layer numbering, ``lm_head`` padding and
MoE ``fc`` = ``[up; gate]`` per expert. Weights stay lazy.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from ..errors import CheckpointError
from ..ir import Builder, ModelConfig, Rope, SafetensorsStore, TensorType, derive, load
from ..ir.ops import param_spec
from ..ir.types import DType

_ST = {"F32": DType.f32, "BF16": DType.bf16, "F16": DType.f16, "F8_E4M3": DType.f8e4m3, "I8": DType.i8}
_OP = {"embedding": "embedding", "input_norm": "norm", "post_norm": "norm", "final_norm": "norm",
       "attention": "attention", "mlp": "mlp", "moe": "moe", "lm_head": "lm_head"}


def _config(root: Path) -> dict:
    cfg_path = root / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: missing", hint="give the directory `mexc compile --target trtllm` wrote") from None
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("mapping"), dict):
        raise CheckpointError(f"{cfg_path}: not a TensorRT-LLM checkpoint config (no mapping)")
    if (cfg.get("quantization") or {}).get("quant_algo"):
        raise CheckpointError(f"{cfg_path}: quantized checkpoints ({cfg['quantization']['quant_algo']}) are "
                              "quantized by trtllm-build; verify the float checkpoint instead",
                              hint="compile without --quant to verify, then build with --quant")
    return cfg


def _class(cfg: dict, cfg_path: Path):
    from ..backends.trtllm.classes import REGISTRY, by_architecture

    cls = by_architecture(str(cfg.get("architecture")))
    if cls is None:
        raise CheckpointError(f"{cfg_path}: architecture {cfg.get('architecture')!r} is not a class mexc's "
                              "trtllm target writes, so mexc cannot read it back",
                              hint=f"mexc reads {', '.join(c.name for c in REGISTRY)}")
    info = cls.extra["read"](cfg)
    if "refuse" in info:
        raise CheckpointError(f"{cfg_path}: {info['refuse']}")
    return cls, info


def lift_trtllm(path: str | Path):
    """The IR of a TensorRT-LLM checkpoint directory (weights lazy); a class mexc does not write, a missing
    rank file or tensor is one :class:`~mexc.errors.CheckpointError`."""
    root = Path(path)
    cfg = _config(root)
    cls, info = _class(cfg, root / "config.json")
    m = cfg["mapping"]
    tp, pp, ep = m.get("tp_size", 1), m.get("pp_size", 1), m.get("moe_ep_size", 1)
    store = SafetensorsStore("trt", str(root.resolve()))
    shapes: dict[int, dict[str, tuple[DType, tuple[int, ...]]]] = {}
    for r in range(tp * pp):
        f = root / f"rank{r}.safetensors"
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (mapping says tp={tp} pp={pp})", hint="copy every rank file")
        with safe_open(f, "pt") as h:   # safe_open is not iterable: keys()
            slices = {k: h.get_slice(k) for k in h.keys()}  # noqa: SIM118
            shapes[r] = {k: (_ST[v.get_dtype()], tuple(v.get_shape())) for k, v in slices.items()}
    names = {(row.role, row.params): row.name for row in cls.rows}

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

    def name(role, param, layer=None):
        row = names.get((role, param if isinstance(param, tuple) else (param,)))
        return None if row is None else row.format(L=local[layer] if layer is not None else "")

    def merged(stage, role, param, layer=None):
        """The param merged over the stage's TP ranks by its declared role (None when absent)."""
        n = name(role, param, layer)
        parts = [leaf(r, n) for r in ranks(stage)] if n else [None]
        if parts[0] is None:
            return None
        spec = param_spec(_OP[role], param)
        dim = spec.split_dim() if spec is not None else None
        if role == "embedding" and param == "word" and not cfg.get("use_parallel_embedding"):
            dim = None
        if dim is None or tp == 1:
            return parts[0]
        return derive("concat", *parts, dim=dim)

    def qkv(stage, param, layer):
        n = name("attention", param, layer)
        parts = [leaf(r, n) for r in ranks(stage)] if n else [None]
        if parts[0] is None:
            return None
        ql, kl = nh // tp * d, max(1, nkv // tp) * d
        step = max(1, tp // nkv)  # replicated KV heads: take one rank per head
        qs = [derive("slice", p, dim=0, start=0, stop=ql) for p in parts]
        ks = [derive("slice", p, dim=0, start=ql, stop=ql + kl) for p in parts[::step]]
        vs = [derive("slice", p, dim=0, start=ql + kl, stop=ql + 2 * kl) for p in parts[::step]]
        return derive("tag_qkv", derive("concat", *qs, *ks, *vs, dim=0), kind="concat", q=nh, kv=nkv, d=d)

    kind, gated, act = info["norm"], info["gated"], info["activation"]
    eps = cfg.get("norm_epsilon", 1e-5)
    pos = cfg.get("position_embedding_type", "learned_absolute")
    rope = Rope(interleaved=pos == "rope_gptj", **info["rope"])
    vocab = cfg["vocab_size"]
    mc = ModelConfig(family=cls.name, hidden_size=H, num_layers=L, vocab_size=vocab,
                     max_position_embeddings=cfg.get("max_position_embeddings") or 2048,
                     dtype=DType.parse(cfg["dtype"]))
    b = Builder(mc, stores={"trt": store}, meta={"source": "trtllm", "checkpoint": str(root.resolve())})
    word = merged(0, "embedding", "word")
    if word is None:
        raise CheckpointError(f"{root}/rank0.safetensors: no {name('embedding', 'word')}")
    if word.type.shape[0] != vocab:
        word = derive("slice", word, dim=0, start=0, stop=vocab)
    x = b.node("embedding", b.input_ids, scale=info.get("emb_scale", 1.0),
               params={"word": word, "position": merged(0, "embedding", "position")})
    E = info.get("experts", 0)
    qk = {"qk_norm": info["qk_norm"], "qk_norm_eps": info["qk_norm_eps"]} if info.get("qk_norm") else {}
    for i in range(L):
        s = stage_of[i]

        def norm(role, inp, s=s, i=i):
            return b.node("norm", inp, layer=i, kind=kind, eps=eps,
                          params={"weight": merged(s, role, "weight", i), "bias": merged(s, role, "bias", i)})

        h = norm("input_norm", x)
        if "mla" in info:   # multi-latent attention (DeepseekV2ForCausalLM): the class lifts its own tensors
            def attn(t, n, s=s, i=i):
                return leaf(ranks(s)[t], f"transformer.layers.{local[i]}.attention.{n}")
            a = info["mla"](b, h, i, cfg, attn, tp)
        else:
            a = b.node("attention", h, layer=i, num_heads=nh, num_kv_heads=nkv, head_dim=d,
                       position="rope" if pos.startswith("rope") else "none", rope=rope, **qk,
                       softmax_scale=info.get("softmax_scale"),
                       params={"qkv": qkv(s, "qkv", i), "qkv_bias": qkv(s, "qkv_bias", i),
                               "proj": merged(s, "attention", "proj", i),
                               "proj_bias": merged(s, "attention", "proj_bias", i),
                               **{p: merged(s, "attention", p, i) for p in ("q_norm", "k_norm") if qk}})
        parallel = info.get("parallel")
        if parallel:          # Falcon: x + attn(ln(x)) + mlp(ln(x) or mlp_layernorm(x))
            m_in = h if parallel == 1 else norm("post_norm", x)
            x = b.node("add", x, a, _mlp(b, m_in, i, s, merged, gated, act), layer=i)
            continue
        x = b.node("add", x, a, layer=i)
        h = norm("post_norm", x)
        if E and i not in info.get("dense_layers", ()):   # DeepseekV2: layer 0 dense
            mlp = _moe(b, h, i, s, cfg, info, leaf, ranks, name, tp, ep, merged)
        elif info.get("fused_up_gate"):   # Phi3: each rank's mlp.fc = [up_r; gate_r]
            mlp = _mlp(b, h, i, s, merged, gated, act, _up_gate([leaf(r, name("mlp", ("up", "gate"), i))
                                                                 for r in ranks(s)]))
        else:
            mlp = _mlp(b, h, i, s, merged, gated, act)
        x = b.node("add", x, mlp, layer=i)
    last = pp - 1
    x = b.node("norm", x, kind=kind, eps=info.get("final_eps", eps),
               params={"weight": merged(last, "final_norm", "weight"), "bias": merged(last, "final_norm", "bias")})
    head = merged(last, "lm_head", "weight")
    if head is None:
        head = word
    elif head.type.shape[0] != vocab:
        head = derive("slice", head, dim=0, start=0, stop=vocab)
    model = b.output(b.node("lm_head", x, params={"weight": head}))
    from ..ir import verify

    verify(model, context=f"(lifted from TensorRT-LLM checkpoint {root})")
    return model


def _mlp(b, h, i, s, merged, gated, act, fused=None):
    params = {"fc2": merged(s, "mlp", "fc2", i), "fc2_bias": merged(s, "mlp", "fc2_bias", i)}
    names = ("gate", "gate_bias", "up", "up_bias") if gated else ("fc1", "fc1_bias")
    params.update(fused or {p: merged(s, "mlp", p, i) for p in names})
    return b.node("mlp", h, layer=i, activation=act, gated=gated, params=params)


def _up_gate(parts) -> dict:
    """A swiglu MLP's fused ``fc`` over TP ranks, each ``[up_r; gate_r]`` (``functional.swiglu``: silu of the
    second half), as the IR's ``up`` and ``gate``."""
    if any(p is None for p in parts):
        raise CheckpointError("a Phi3ForCausalLM rank file lacks its fused mlp.fc.weight")
    half = parts[0].type.shape[0] // 2
    pick = [[derive("slice", p, dim=0, start=k * half, stop=(k + 1) * half) for p in parts] for k in (0, 1)]
    up, gate = (x[0] if len(x) == 1 else derive("concat", *x, dim=0) for x in pick)
    return {"up": up, "gate": gate}


def _moe(b, h, i, s, cfg, info, leaf, ranks, name, tp, ep, merged):
    """MoE: rank t holds expert block t % ep and ffn slice t // ep; ``fc`` = [up; gate] per expert."""
    fc = [leaf(r, name("moe", ("up", "gate"), i)) for r in ranks(s)]
    proj = [leaf(r, name("moe", "fc2", i)) for r in ranks(s)]
    f_l = fc[0].type.shape[1] // 2
    ups = [derive("slice", t, dim=1, start=0, stop=f_l) for t in fc]
    gates = [derive("slice", t, dim=1, start=f_l, stop=2 * f_l) for t in fc]
    moe_tp = tp // ep

    def join(ts, ffn_dim):
        blocks = []
        for e in range(ep):
            cols = [ts[t] for t in range(tp) if t % ep == e]
            blocks.append(cols[0] if moe_tp == 1 else derive("concat", *cols, dim=ffn_dim))
        return blocks[0] if ep == 1 else derive("concat", *blocks, dim=0)

    params = {"router": leaf(ranks(s)[0], name("moe", "router", i)), "gate": join(gates, 1),
              "up": join(ups, 1), "fc2": join(proj, 2)}
    shared = info.get("shared_expert", "none")
    if shared != "none":   # QWen qwen2_moe: shared_expert.fc = [up_r; gate_r] per TP rank, proj split on dim 1
        sfc = [leaf(r, name("moe", ("shared_up", "shared_gate"), i)) for r in ranks(s)]
        s_l = sfc[0].type.shape[0] // 2
        params["shared_up"] = derive("concat", *[derive("slice", t, dim=0, start=0, stop=s_l) for t in sfc], dim=0)
        params["shared_gate"] = derive("concat", *[derive("slice", t, dim=0, start=s_l, stop=2 * s_l) for t in sfc],
                                       dim=0)
        params["shared_fc2"] = merged(s, "moe", "shared_fc2", i)
        params["shared_expert_gate"] = merged(s, "moe", "shared_expert_gate", i)
    return b.node("moe", h, layer=i, num_experts=info["experts"], top_k=info["top_k"], activation="silu",
                  gated=True, pre_softmax=info["pre_softmax"], shared_expert=shared, params=params,
                  **info.get("moe_attrs", {}))
