"""Phi3ForCausalLM: a Llama-style decoder (RMSNorm, gated MLP, GQA, no biases) whose rotary covers the first
``partial_rotary_factor`` of each head: Megatron's ``rotary_percent`` < 1 on a Llama-style model.

transformers 5 (``models/phi3/modeling_phi3.py``): ``self_attn.qkv_proj`` is one ``nn.Linear(bias=False)`` of
``[q (heads x head_dim); k (kv heads x head_dim); v]`` rows; ``mlp.gate_up_proj`` is ``[gate; up]`` and the MLP
computes ``down(up * act(gate))``; ``apply_rotary_pos_emb`` rotates ``q[..., :rot]`` with rotate-half (pairs
``i`` and ``i + rot/2``) and passes the rest, ``rot = int(head_dim * partial_rotary_factor)``, inverse frequencies
``base ** (-arange(0, rot, 2) / rot)``. That is megatron-core's partial rotary (``RotaryEmbedding``:
``dim = int(kv_channels * rotary_percent)``; ``apply_rotary_pos_emb_bshd`` rotates ``t[..., :dim]`` with
``_rotate_half`` and concatenates the rest). ``Phi3Config.validate_rope`` accepts ``default`` / ``longrope``
only, so any rope scaling is refused; ``head_dim`` is read from the config (the default is hidden / heads).
``Phi3Config`` defaults ``pad_token_id`` / ``eos_token_id`` to 32000: the written config always names them.
"""

from __future__ import annotations

from .common import (ATTN_BIAS, MLP_BIAS, ONE_MLP_SIZE, family, llama_config, mlp_form, no_qk_norm, rule)

L = "model.layers.{L}."
ROWS = f"""
embedding   word      model.embed_tokens.weight                    copy  always
input_norm  weight    {L}input_layernorm.weight                    copy  always
attention   q+k+v     {L}self_attn.qkv_proj.weight                 copy  always
attention   proj      {L}self_attn.o_proj.weight                   copy  always
post_norm   weight    {L}post_attention_layernorm.weight           copy  always
mlp         gate+up   {L}mlp.gate_up_proj.weight                   copy  always
mlp         fc2       {L}mlp.down_proj.weight                      copy  always
final_norm  weight    model.norm.weight                            copy  always
lm_head     weight    lm_head.weight                               copy  untied
"""


def _partial(f) -> bool:
    return f.a0["rope"].percent != 1.0


def _biases(f) -> bool:
    return f.has(f.attns, (*ATTN_BIAS, "qkv_bias")) or f.has(f.mlps, MLP_BIAS)   # fused before split-qkv


def _rope(f):
    rope, p = f.a0["rope"], []
    if f.learned:
        p.append(f"learned position embeddings on top of rotary cannot be expressed by the {f.name}")
    if rope.interleaved:
        p.append(f"interleaved (GPT-J style) rotary cannot be expressed by the {f.name}: it rotates halves")
    if rope.scaling != "none":
        p.append(f"rope scaling {rope.scaling!r} cannot be expressed by the {f.name}: Phi3Config accepts the "
                 "default rope and longrope only")
    return p


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg["rope_parameters"]["partial_rotary_factor"] = float(f.a0["rope"].percent)   # transformers >= 5
    cfg.update(partial_rotary_factor=float(f.a0["rope"].percent), original_max_position_embeddings=
               f.config.max_position_embeddings, resid_pdrop=0.0, embd_pdrop=0.0, sliding_window=None)
    return cfg


# before Llama (and the Llama-likes): a bias-free RMSNorm + rotary model rotating part of each head; a full-rotary
# model never has this signature, and a partial one with biases keeps its Llama / Qwen2 refusal
family("phi3", "Phi3ForCausalLM", rows=ROWS,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and _partial(f)
                            and not _biases(f) and all(a.attrs["qk_norm"] == "none" for a in f.attns)),
       rules=[rule("q/k normalization")(no_qk_norm),
              rule("learned positions, interleaved rotary, rope scaling")(_rope),
              rule("an MLP other than a gated one")(mlp_form(True, None)), ONE_MLP_SIZE],
       config=config, before=("qwen2", "llama"))
