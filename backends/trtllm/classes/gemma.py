"""TensorRT-LLM GemmaForCausalLM (tensorrt_llm/models/gemma/{model,config,convert}.py): the model multiplies the
embedding by sqrt(hidden_size) itself, its RmsNorm multiplies by the stored weight (the converter stores 1 + w:
canonicalize folds the gamma), its GatedMLP applies hidden_act to ``fc`` ("gelu" = the tanh approximation),
rope_gpt_neox is hard-coded and GemmaConfig forces share_embedding_table (and use_parallel_embedding = tp > 1)."""

from __future__ import annotations

import math

from ....ir.analysis import has_parallel_blocks
from .common import UNREWRITTEN, decoder_attention, read_rope, rule, trt_class

CLS = "GemmaForCausalLM"


def _rules(f):
    p = []
    scale, H = f.emb.attrs["scale"], f.config.hidden_size
    if abs(scale - math.sqrt(H)) > 1e-9 * scale:
        p.append(f"Gemma-style embedding x{scale:g}: TensorRT-LLM's {CLS} always multiplies by "
                 f"sqrt(hidden_size) = {math.sqrt(H):g}")
    if f.kinds != {"rmsnorm"}:
        p.append(f"{CLS} uses RMSNorm only")
    if any(not n.attrs["gated"] or n.attrs["activation"] != "gelu-tanh" for n in f.mlps):
        acts = sorted({(n.attrs["activation"], n.attrs["gated"]) for n in f.mlps})
        p.append(f"{CLS} is emitted for a GeGLU MLP with tanh GELU only (TensorRT-LLM's 'gelu' is the "
                 f"tanh approximation); this model has (activation, gated) {acts}")
    if f.has(f.attns, ("qkv_bias", "proj_bias")) or any(k.endswith("bias") for n in f.mlps for k in n.params):
        p.append(f"linear biases are not emitted with {CLS}")
    if not f.heads[0].attrs["tied"]:
        p.append("an untied output head: TensorRT-LLM's GemmaConfig forces share_embedding_table")
    if f.model.parallel.pp > 1:
        p.append(f"pipeline parallelism with {CLS}: its shared embedding table cannot be split over "
                 "pipeline stages (TensorRT-LLM refuses share_embedding_table with pp_size > 1)")
    if has_parallel_blocks(f.model):
        p.append(f"a parallel attention + MLP block is not expressible with {CLS}")
    return p


def config(f, cfg: dict) -> dict:
    cfg.update(hidden_act="gelu", attn_bias=False, mlp_bias=False, share_embedding_table=True,
               use_parallel_embedding=f.model.parallel.tp > 1, position_embedding_type="rope_gpt_neox")
    return cfg


def read(cfg: dict) -> dict:
    return {"norm": "rmsnorm", "gated": True, "activation": "gelu-tanh", "rope": read_rope(cfg, percent=1.0),
            "emb_scale": math.sqrt(cfg["hidden_size"])}


trt_class(CLS, signature=lambda f: f.emb.attrs["scale"] != 1.0,
          rules=[decoder_attention(("none", "linear", "llama3")), UNREWRITTEN,
                 rule("an embedding scale other than sqrt(hidden), norms other than RMSNorm, an MLP other than "
                      "tanh GeGLU, linear biases, an untied head, pp > 1, parallel blocks")(_rules)],
          config=config, read=read, parallel_embedding=lambda opts: opts.tp > 1,
          before=("FalconForCausalLM", "QWenForCausalLM", "LlamaForCausalLM", "GPTForCausalLM"))
