"""Qwen3NextForCausalLM with every layer full attention: Megatron's gated attention (``attention_output_gate``).

megatron-core's ``linear_qkv`` then emits, per query group, ``[q, gate, k, v]`` and the core attention output is
multiplied by ``sigmoid(gate)`` (per head and channel) before ``linear_proj`` (``SelfAttention
.get_query_key_value_tensors`` / ``_apply_output_gate``, megatron/core/transformer/attention.py); the lift keeps
the gate as the attention's ``gate`` param. transformers' ``Qwen3NextAttention`` computes the same: its ``q_proj``
emits ``[q_h; gate_h]`` head by head (``torch.chunk(q_proj(x).view(..., -1, 2 * head_dim), 2)``), so the row is
the IR's q and gate interleaved per head (the ``heads`` transform), and ``attn_output * sigmoid(gate)`` precedes
``o_proj`` (modeling_qwen3_next.py). Its attention always applies ``q_norm`` / ``k_norm`` (RMSNorm over head_dim
at ``rms_norm_eps``): only a model with Megatron's ``qk_layernorm`` RMSNorm at the layer norms' eps is
expressible. ``attention_bias`` switches on q (with the gate: one row interleaved per head), k, v and o biases
together; the ones Megatron lacks (o without ``add_bias_linear``) are written as zeros. Every ``Qwen3NextRMSNorm`` computes with ``(1 + w)``: the rows write ``w - 1`` (``zc``).
``layer_types`` all ``full_attention`` (no gated DeltaNet), ``num_experts = 0`` (every MLP dense SwiGLU) and an
explicit ``partial_rotary_factor`` (the config defaults to 0.25)."""

from __future__ import annotations

from .common import ATTN_BIAS, MLP_BIAS, ONE_MLP_SIZE, ROTARY_ONLY, family, llama_config, mlp_form, rule

L = "model.layers.{L}."
ROWS = f"""
embedding   word        model.embed_tokens.weight                  copy   always
input_norm  weight      {L}input_layernorm.weight                  zc     always
attention   q+gate      {L}self_attn.q_proj.weight                 heads  always
attention   k           {L}self_attn.k_proj.weight                 copy   always
attention   v           {L}self_attn.v_proj.weight                 copy   always
attention   proj        {L}self_attn.o_proj.weight                 copy   always
attention   q_bias+gate_bias  {L}self_attn.q_proj.bias           heads  attn_bias
attention   k_bias      {L}self_attn.k_proj.bias                   copy   attn_bias
attention   v_bias      {L}self_attn.v_proj.bias                   copy   attn_bias
attention   proj_bias   {L}self_attn.o_proj.bias                   copy   attn_bias
attention   q_norm      {L}self_attn.q_norm.weight                 zc     always
attention   k_norm      {L}self_attn.k_norm.weight                 zc     always
post_norm   weight      {L}post_attention_layernorm.weight         zc     always
mlp         gate        {L}mlp.gate_proj.weight                    copy   always
mlp         up          {L}mlp.up_proj.weight                      copy   always
mlp         fc2         {L}mlp.down_proj.weight                    copy   always
final_norm  weight      model.norm.weight                          zc     always
lm_head     weight      lm_head.weight                             copy   untied
"""


def _attention(f) -> list[str]:
    p = []
    if any(not a.attrs["output_gate"] for a in f.attns):
        p.append(f"layers without the output gate cannot be expressed by the {f.name}: its full-attention layers "
                 "all gate")
    if any(a.attrs["qk_norm"] != "rmsnorm" for a in f.attns):
        p.append(f"an attention output gate without RMSNorm q/k norms cannot be expressed by the {f.name}: "
                 "Qwen3NextAttention always applies q_norm / k_norm (Megatron: qk_layernorm with RMSNorm)")
    elif {a.attrs["qk_norm_eps"] for a in f.attns} != {n.attrs["eps"] for n in f.norms}:
        p.append(f"q/k norm eps differing from the layer norms' eps cannot be expressed by the {f.name} (one "
                 "rms_norm_eps)")
    if f.has(f.mlps, MLP_BIAS):
        p.append(f"MLP biases cannot be expressed by the {f.name}: its MLP has none")
    return p


def _flags(f, base: dict) -> dict:
    # attention_bias is one switch for q (with the gate), k, v and o: on when any is present (the absent ones
    # are written as zeros); Megatron's add_qkv_bias without add_bias_linear has no o_proj bias
    return base | {"attn_bias": f.has(f.attns, ATTN_BIAS + ("gate_bias",))}


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    percent = float(f.a0["rope"].percent)
    cfg["rope_parameters"]["partial_rotary_factor"] = percent   # transformers >= 5
    cfg.update(partial_rotary_factor=percent, attention_bias=flags["attn_bias"],
               layer_types=["full_attention"] * len(f.attns),
               num_experts=0, mlp_only_layers=[], decoder_sparse_step=1)
    return cfg


family("qwen3_next", "Qwen3NextForCausalLM", rows=ROWS, zero_centered=True,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"}
                            and any(a.attrs["output_gate"] for a in f.attns)),
       rules=[rule("layers without the gate; q/k norms other than RMSNorm at rms_norm_eps; MLP biases")(
           _attention), ROTARY_ONLY, rule("an MLP other than a gated one")(mlp_form(True, None)), ONE_MLP_SIZE],
       config=config, flags=_flags, before=("qwen3", "qwen2", "llama", "mistral", "ministral")).extra["output_gate"] = True
