"""TensorRT-LLM GPTForCausalLM (tensorrt_llm/models/gpt, ``gpt_variant: gpt2``): LayerNorm, learned, rotary or
no positions, plain or gated MLP, one ``bias`` flag."""

from __future__ import annotations

from .common import (GATED_ACT, HIDDEN_ACT, PLAIN_DECODER, UNREWRITTEN, qk_norm_and_scaling, read_rope, rule,
                     trt_class)

_ACT = {"gelu": "gelu-tanh", "gelu_new": "gelu-tanh", "relu": "relu", "squared-relu": "squared-relu",
        "silu": "silu", "swiglu": "silu", "geglu": "gelu-tanh", "quick_gelu": "quick-gelu"}


def config(f, cfg: dict) -> dict:
    m = f.mlps[0].attrs
    cfg.update(hidden_act=GATED_ACT[m["activation"]] if m["gated"] else HIDDEN_ACT[m["activation"]],
               gpt_variant="gpt2", bias="proj_bias" in f.attns[0].params, apply_query_key_layer_scaling=False,
               qk_layernorm=False)
    return cfg


def read(cfg: dict) -> dict:
    act = cfg.get("hidden_act", "gelu")
    return {"norm": "layernorm", "gated": act in ("swiglu", "geglu"), "activation": _ACT.get(act),
            "rope": read_rope(cfg)}


trt_class("GPTForCausalLM", signature=lambda f: f.kinds == {"layernorm"},
          rules=[PLAIN_DECODER, UNREWRITTEN, rule("QK norm, rope scaling other than linear/llama3")(qk_norm_and_scaling)], config=config,
          read=read)
