"""Megatron state-dict key -> IR role, and how its tensor-parallel shards merge. One rule per line.

Keys are matched after removing the ``model/`` (or ``modelK/`` virtual-pipeline chunk) prefix; ``{L}`` is a
layer number (local to the stage in legacy files) and ``{E}`` a local expert number. Merge kinds:

``rep``    replicated on every TP rank (norms, row-parallel biases, router): take rank 0, check the others agree
``col``    column-parallel: concatenate on dim 0 (QKV keeps Megatron's group-interleaved rows)
``row``    row-parallel: concatenate on dim 1
``gated``  gated fc1: each rank holds ``[gate_r; up_r]``; halves are split per shard, then concatenated
``mamba_in``    Mamba in_proj: each rank holds ``[z_r; x_r; B_r; C_r; dt_r]``; merged to ``[z; x; B; C; dt]``
``mamba_conv``  Mamba conv1d weight / bias: each rank holds ``[x_r; B_r; C_r]``; merged to ``[x; B; C]``
``skip``   not a weight of the inference model
``grouped1`` / ``grouped2``  legacy GroupedMLP ``weight1`` [H, E_local * F_r * (2 if GLU)] / ``weight2``
           [E_local * F_r, H] (``moe_grouped_gemm`` saved without TE): each local expert is a view of the rank's
           tensor (``view(E_local, H, -1)[e].T`` / ``view(E_local, -1, H)[e].T``), then merged as ``gated?`` / ``row``
``mtp``    a multi-token-prediction head's tensor (megatron-core ``MultiTokenPredictionBlock``, ``mtp.layers.N.*``):
           dropped with a note when the args set ``mtp_num_layers`` (the main head's logits do not read it)
"""

from __future__ import annotations

import re

from ...ir import Recipe, derive

RULES: list[tuple[str, str, str]] = [
    # ---- megatron-core GPTModel, local spec and TransformerEngine spec
    (r"embedding\.word_embeddings\.weight", "embedding.word", "col"),
    (r"embedding\.position_embeddings\.weight", "embedding.position", "rep"),
    (r"decoder\.final_layernorm\.weight", "final_norm.weight", "rep"),
    (r"decoder\.final_layernorm\.bias", "final_norm.bias", "rep"),
    (r"decoder\.final_norm\.weight", "final_norm.weight", "rep"),
    (r"output_layer\.weight", "lm_head.weight", "col"),
    (r"decoder\.layers\.{L}\.input_layernorm\.weight", "input_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.input_layernorm\.bias", "input_norm.bias", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_qkv\.layer_norm_weight", "input_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_qkv\.layer_norm_bias", "input_norm.bias", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_qkv\.weight", "qkv.weight", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_qkv\.bias", "qkv.bias", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_proj\.weight", "proj.weight", "row"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_proj\.bias", "proj.bias", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.q_layernorm\.weight", "q_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.k_layernorm\.weight", "k_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.core_attention\.softmax_offset", "sinks", "col"),  # [heads / tp]
    (r"decoder\.layers\.{L}\.pre_mlp_layernorm\.weight", "post_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.pre_mlp_layernorm\.bias", "post_norm.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc1\.layer_norm_weight", "post_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc1\.layer_norm_bias", "post_norm.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc1\.weight", "fc1.weight", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc1\.bias", "fc1.bias", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc2\.weight", "fc2.weight", "row"),
    (r"decoder\.layers\.{L}\.mlp\.linear_fc2\.bias", "fc2.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.router\.weight", "router.weight", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.router\.expert_bias", "router.expert_bias", "rep"),  # fp32 buffer [E]
    (r"decoder\.layers\.{L}\.mlp\.experts\.local_experts\.{E}\.linear_fc1\.weight", "expert.fc1.weight", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.local_experts\.{E}\.linear_fc2\.weight", "expert.fc2.weight", "row"),
    (r"decoder\.layers\.{L}\.mlp\.router\.bias", "router.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.local_experts\.{E}\.linear_fc1\.bias", "expert.fc1.bias", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.local_experts\.{E}\.linear_fc2\.bias", "expert.fc2.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.linear_fc1\.weight{E}", "expert.fc1.weight", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.linear_fc2\.weight{E}", "expert.fc2.weight", "row"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.weight1", "expert.fc1.weight", "grouped1"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.weight2", "expert.fc2.weight", "grouped2"),
    # SharedExpertMLP (megatron/core/transformer/moe/shared_experts.py): a TP-split MLP + its sigmoid gate [1, H]
    (r"decoder\.layers\.{L}\.mlp\.shared_experts\.linear_fc1\.weight", "shared.fc1.weight", "gated?"),
    (r"decoder\.layers\.{L}\.mlp\.shared_experts\.linear_fc2\.weight", "shared.fc2.weight", "row"),
    (r"decoder\.layers\.{L}\.mlp\.shared_experts\.gate_weight", "shared.gate_weight", "rep"),
    # torch_dist global (expert-stacked) keys; TP merge already applied on disk
    (r"decoder\.layers\.{L}\.mlp\.experts\.experts\.linear_fc1\.weight", "experts.fc1.weight", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.experts\.linear_fc2\.weight", "experts.fc2.weight", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.experts\.linear_fc1\.bias", "experts.fc1.bias", "rep"),
    (r"decoder\.layers\.{L}\.mlp\.experts\.experts\.linear_fc2\.bias", "experts.fc2.bias", "rep"),
    # ---- multi-latent attention (megatron/core/transformer/multi_latent_attention.py); the TE spec fuses the
    # latent norms into the up projections (layer_norm_weight). Legacy files hold column shards of every linear
    (r"decoder\.layers\.{L}\.self_attention\.linear_q_proj\.weight", "mla.q", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_q_down_proj\.weight", "mla.q_down", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_q_up_proj\.weight", "mla.q_up", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_q_up_proj\.layer_norm_weight", "q_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_kv_down_proj\.weight", "mla.kv_down", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_kv_up_proj\.weight", "mla.kv_up", "col"),
    (r"decoder\.layers\.{L}\.self_attention\.linear_kv_up_proj\.layer_norm_weight", "mla.kv_norm", "rep"),
    (r"decoder\.layers\.{L}\.self_attention\.kv_layernorm\.weight", "mla.kv_norm", "rep"),
    # ---- MambaModel / HybridModel mixer (megatron/core/ssm/mamba_mixer.py); the layer's norm is the mixer's
    # fused TE norm or the local spec's MambaLayer.norm. Legacy files hold each rank's [z|x|B|C|dt] / [x|B|C]
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.layer_norm_weight", "mamba_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.norm\.weight", "mamba_norm.weight", "rep"),
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight", "mamba.in_proj", "mamba_in"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d[._]weight", "mamba.conv", "mamba_conv"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d[._]bias", "mamba.conv_bias", "mamba_conv"),
    (r"decoder\.layers\.{L}\.mixer\.A_log", "mamba.A_log", "col"),
    (r"decoder\.layers\.{L}\.mixer\.D", "mamba.D", "col"),
    (r"decoder\.layers\.{L}\.mixer\.dt_bias", "mamba.dt_bias", "col"),
    (r"decoder\.layers\.{L}\.mixer\.norm\.weight", "mamba.norm", "col"),
    (r"decoder\.layers\.{L}\.mixer\.out_proj\.weight", "mamba.out", "row"),
    # torch_dist: MambaMixer.sharded_state_dict saves the parts as separate global tensors
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight\.z", "mamba.in_z", "col"),
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight\.x", "mamba.in_x", "col"),
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight\.B", "mamba.in_B", "col"),
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight\.C", "mamba.in_C", "col"),
    (r"decoder\.layers\.{L}\.mixer\.in_proj\.weight\.dt", "mamba.in_dt", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.weight\.x", "mamba.conv_x", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.weight\.B", "mamba.conv_B", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.weight\.C", "mamba.conv_C", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.bias\.x", "mamba.conv_x_bias", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.bias\.B", "mamba.conv_B_bias", "col"),
    (r"decoder\.layers\.{L}\.mixer\.conv1d\.bias\.C", "mamba.conv_C_bias", "col"),
    # ---- pre-mcore (megatron/legacy/model): nested language_model dict
    (r"language_model\.embedding\.word_embeddings\.weight", "embedding.word", "col"),
    (r"language_model\.embedding\.position_embeddings\.weight", "embedding.position", "rep"),
    (r"language_model\.(?:encoder|transformer)\.final_(?:norm|layernorm)\.weight", "final_norm.weight", "rep"),
    (r"language_model\.(?:encoder|transformer)\.final_(?:norm|layernorm)\.bias", "final_norm.bias", "rep"),
    (r"language_model\.output_layer\.weight", "lm_head.weight", "col"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.input_(?:norm|layernorm)\.weight", "input_norm.weight", "rep"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.input_(?:norm|layernorm)\.bias", "input_norm.bias", "rep"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.(?:self_)?attention\.query_key_value\.weight", "qkv.weight", "col"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.(?:self_)?attention\.query_key_value\.bias", "qkv.bias", "col"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.(?:self_)?attention\.dense\.weight", "proj.weight", "row"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.(?:self_)?attention\.dense\.bias", "proj.bias", "rep"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.post_attention_(?:norm|layernorm)\.weight", "post_norm.weight", "rep"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.post_attention_(?:norm|layernorm)\.bias", "post_norm.bias", "rep"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.mlp\.dense_h_to_4h\.weight", "fc1.weight", "gated?"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.mlp\.dense_h_to_4h\.bias", "fc1.bias", "gated?"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.mlp\.dense_4h_to_h\.weight", "fc2.weight", "row"),
    (r"language_model\.(?:encoder|transformer)\.layers\.{L}\.mlp\.dense_4h_to_h\.bias", "fc2.bias", "rep"),
    (r"word_embeddings_for_head\.weight", "lm_head.tied_copy", "col"),
    # ---- not part of the inference model
    (r".*\._extra_state(?:/.*)?", "", "skip"),
    (r".*\.rotary_pos_emb\.inv_freq", "", "skip"),
    (r"decoder\.layers\.{L}\.mlp\.router\.expert_bias", "router.expert_bias", "rep"),
    (r"mtp\.layers\.\d+\..*", "", "mtp"),
]

_COMPILED = [(re.compile("^" + p.replace("{L}", r"(?P<L>\d+)").replace("{E}", r"(?P<E>\d+)") + "$"), role, merge)
             for p, role, merge in RULES]


def match(key: str) -> tuple[str, str, int | None, int | None] | None:
    """(role, merge, layer, expert) for a normalized key, or None when no rule matches."""
    for rx, role, merge in _COMPILED:
        m = rx.match(key)
        if m:
            g = m.groupdict()
            return role, merge, (int(g["L"]) if g.get("L") else None), (int(g["E"]) if g.get("E") else None)
    return None


def describe() -> str:
    """The table, one rule per line (for `mexc inspect --rules` and docs)."""
    return "\n".join(f"{merge:7s} {pattern:90s} -> {role or '(skipped)'}" for pattern, role, merge in RULES)


def ungate_qkv(w: Recipe, nh: int, ng: int, d: int) -> tuple[Recipe, Recipe]:
    """Split megatron-core's gated ``linear_qkv`` rows (weight or bias) into the grouped QKV rows and the gate
    rows. With ``attention_output_gate`` each query group holds ``[q (nh/ng heads), gate (nh/ng heads), k, v]``,
    ``d`` rows per head (``SelfAttention.get_query_key_value_tensors``, megatron/core/transformer/attention.py);
    the gate comes out in query-head order ``[nh * d, ...]``. Lazy: slices and concats only."""
    qd = nh // ng * d
    size = 2 * qd + 2 * d
    qkv, gate = [], []
    for g in range(ng):
        o = g * size
        qkv += [derive("slice", w, dim=0, start=o, stop=o + qd),
                derive("slice", w, dim=0, start=o + 2 * qd, stop=o + size)]
        gate.append(derive("slice", w, dim=0, start=o + qd, stop=o + 2 * qd))
    return derive("concat", *qkv, dim=0), (gate[0] if ng == 1 else derive("concat", *gate, dim=0))
