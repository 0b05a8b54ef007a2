"""Llama4ForCausalLM (text only, dense): Llama with Megatron's weightless q/k L2 norm (``qk_l2_norm``).

megatron-core's ``L2Norm`` (megatron/core/transformer/torch_norm.py) computes ``x * rsqrt(mean(x^2) + eps)`` over
head_dim at ``layernorm_epsilon``, on q and k before rotary; transformers' ``Llama4TextL2Norm`` is the same at
``rms_norm_eps``, after rotary (modeling_llama4.py): a rotation keeps the mean of squares, so the orders agree.
The class is made exactly a dense Llama: ``moe_layers = []`` (every layer ``Llama4TextMLP`` of
``intermediate_size_mlp``), ``no_rope_layers`` all 1 (every layer rotary, so every layer has the norm),
``attention_chunk_size = None`` (``layer_types`` all ``full_attention``), ``attn_temperature_tuning`` off (it only
touches NoPE layers anyway), ``use_qk_norm``, no biases. Llama 4 rotates interleaved pairs ``(2i, 2i+1)``
(``apply_rotary_emb`` through ``view_as_complex``) where Megatron rotates halves ``(i, i + d/2)``: the q and k rows
are permuted per head (the ``pairs`` transform, the inverse of :mod:`mexc.passes.rope_to_half`); attention scores
do not change because q and k move alike, and the L2 norm ignores the order. The MLP is ``feed_forward``."""

from __future__ import annotations

import torch

from ....errors import IRError
from ....ir.recipes import recipe_op
from .common import ATTN_BIAS, LLAMA_LIKE, MLP_BIAS, ONE_MLP_SIZE, family, llama_config, rule


def pairs_perm(rows: int, head_dim: int) -> torch.Tensor:
    """Row i of a head takes the rotate-half row: 2j <- j, 2j + 1 <- j + head_dim / 2 (whole heads)."""
    half = head_dim // 2
    per = torch.tensor([j // 2 + (half if j % 2 else 0) for j in range(head_dim)])
    return torch.cat([h * head_dim + per for h in range(rows // head_dim)])


@recipe_op("rope_to_pairs", "per-head Q/K row permutation from rotate-half to interleaved-pair rotary order")
def _rope_to_pairs():
    def infer(types, head_dim):
        (t,) = types
        if not t.shape or t.shape[0] % head_dim or head_dim % 2:
            raise IRError(f"rope_to_pairs(head_dim={head_dim}) does not fit {t}")
        return t

    def compute(xs, head_dim):
        return xs[0].index_select(0, pairs_perm(xs[0].shape[0], head_dim))

    return infer, compute


L = "model.layers.{L}."
ROWS = f"""
embedding   word        model.embed_tokens.weight                  copy   always
input_norm  weight      {L}input_layernorm.weight                  copy   always
attention   q           {L}self_attn.q_proj.weight                 pairs  always
attention   k           {L}self_attn.k_proj.weight                 pairs  always
attention   v           {L}self_attn.v_proj.weight                 copy   always
attention   proj        {L}self_attn.o_proj.weight                 copy   always
post_norm   weight      {L}post_attention_layernorm.weight         copy   always
mlp         gate        {L}feed_forward.gate_proj.weight           copy   always
mlp         up          {L}feed_forward.up_proj.weight             copy   always
mlp         fc2         {L}feed_forward.down_proj.weight           copy   always
final_norm  weight      model.norm.weight                          copy   always
lm_head     weight      lm_head.weight                             copy   untied
"""


def _qk(f) -> list[str]:
    p = []
    if any(a.attrs["qk_norm"] != "l2" for a in f.attns):
        p.append(f"layers without the L2 q/k norm cannot be expressed by the {f.name} (use_qk_norm is one switch)")
    elif {a.attrs["qk_norm_eps"] for a in f.attns} != {n.attrs["eps"] for n in f.norms}:
        p.append(f"an L2 q/k norm eps differing from the layer norms' eps cannot be expressed by the {f.name} "
                 "(Llama4TextL2Norm uses rms_norm_eps)")
    if f.has(f.attns, ATTN_BIAS) or f.has(f.mlps, MLP_BIAS):
        p.append(f"linear biases cannot be expressed by the {f.name}: its MLP has none (mexc writes no "
                 "attention_bias for it)")
    return p


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    n = len(f.attns)
    cfg.update(intermediate_size_mlp=cfg["intermediate_size"], moe_layers=[], interleave_moe_layer_step=0,
               no_rope_layers=[1] * n, attention_chunk_size=None, layer_types=["full_attention"] * n,
               attn_temperature_tuning=False, use_qk_norm=True, attention_bias=False, num_local_experts=0,
               num_experts_per_tok=0)
    return cfg


family("llama4", "Llama4ForCausalLM", rows=ROWS, model_type="llama4_text",
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"}
                            and any(a.attrs["qk_norm"] == "l2" for a in f.attns)),
       rules=[rule("layers without the L2 q/k norm; its eps other than rms_norm_eps; biases")(_qk), *LLAMA_LIKE,
              ONE_MLP_SIZE],
       config=config, before=("qwen3", "qwen2", "llama", "mistral", "ministral")).extra["qk_l2_norm"] = True
