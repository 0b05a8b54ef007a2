"""TensorRT-LLM FalconForCausalLM (tensorrt_llm/models/falcon/{model,config,convert}.py): parallel attention +
MLP blocks; one norm -> ``parallel_attention`` (falcon-7b), two -> ``new_decoder_architecture`` with
``num_ln_in_parallel_attn`` 2 and the MLP's own norm named ``mlp_layernorm`` (convert.py ``ln_mlp``). LayerNorm
with bias, a plain GELU MLP ("gelu" = tanh approximation), full rope_gpt_neox without scaling, head_size =
hidden/heads (its Attention is built without head_size), ln_f at LayerNorm's default eps 1e-5, all-or-no linear
biases."""

from __future__ import annotations

from ....ir.analysis import has_parallel_blocks
from .common import UNREWRITTEN, decoder_attention, falcon_layout, read_rope, rule, trt_class

CLS = "FalconForCausalLM"
ROWS = """
post_norm   weight      transformer.layers.{L}.mlp_layernorm.weight        copy    present
post_norm   bias        transformer.layers.{L}.mlp_layernorm.bias          copy    present
"""


def _rules(f):
    p = list(falcon_layout(f.model)[1])
    if f.kinds != {"layernorm"} or any("bias" not in n.params for n in f.norms):
        p.append(f"{CLS} uses LayerNorm with bias only")
    eps = {n.attrs["eps"] for n in f.norms}
    if len(eps) > 1 or 1e-5 not in eps:
        p.append(f"{CLS} builds ln_f with LayerNorm's default eps 1e-5 and its layer norms with "
                 f"norm_epsilon; this model's norm eps are {sorted(eps)}")
    if any(n.attrs["gated"] or n.attrs["activation"] not in ("gelu", "gelu-tanh") for n in f.mlps):
        acts = sorted({(n.attrs["activation"], n.attrs["gated"]) for n in f.mlps})
        p.append(f"{CLS} is emitted for a non-gated GELU MLP only; this model has (activation, gated) {acts}")
    a = f.a0
    if a["head_dim"] * a["num_heads"] != f.config.hidden_size:
        p.append(f"head_dim {a['head_dim']} != hidden_size / num_heads: TensorRT-LLM's {CLS} builds its "
                 "attention with head_size = hidden_size // num_attention_heads")
    biases = {(n.op, k) for n in f.attns + f.mlps for k in n.params if k.endswith("bias")}
    if biases and biases != {("attention", "qkv_bias"), ("attention", "proj_bias"), ("mlp", "fc1_bias"),
                             ("mlp", "fc2_bias")}:
        p.append(f"{CLS} has one bias flag for every linear; this model has only {sorted(b for _, b in biases)}")
    if biases and f.model.parallel.tp > 1:
        p.append(f"linear biases with tp > 1: TensorRT-LLM's {CLS} runs the parallel block's attention and "
                 "MLP without their all-reduce and adds the row-parallel biases (attention.dense, mlp.proj) "
                 "on every rank before one all-reduce, so they would count tp times; use --tp 1 or "
                 "--target hf")
    return p


def config(f, cfg: dict) -> dict:
    norms, _ = falcon_layout(f.model)
    cfg.update(hidden_act="gelu", bias="proj_bias" in f.attns[0].params, parallel_attention=True,
               new_decoder_architecture=norms == 2, num_ln_in_parallel_attn=norms)
    return cfg


def read(cfg: dict) -> dict:
    new = bool(cfg.get("new_decoder_architecture", False))
    return {"norm": "layernorm", "gated": False, "activation": "gelu-tanh", "rope": read_rope(cfg, percent=1.0),
            "parallel": (cfg.get("num_ln_in_parallel_attn") or 2) if new else 1,
            "final_eps": 1e-5}


trt_class(CLS, signature=lambda f: has_parallel_blocks(f.model),
          rules=[decoder_attention(("none",)), UNREWRITTEN,
                 rule("sequential blocks, norms other than LayerNorm with bias or at another eps, a gated or "
                      "non-GELU MLP, head_dim != hidden/heads, some but not all biases, biases with tp > 1")(
                     _rules)],
          config=config, read=read, extra_rows=ROWS,
          before=("QWenForCausalLM", "LlamaForCausalLM", "GPTForCausalLM"))
