"""GPT2LMHeadModel: LayerNorm, learned (or no) positions, plain MLP, multi-head attention, head tied or not;
``Conv1D`` weights stored ``[in, out]``."""

from __future__ import annotations

from .common import family, no_qk_norm, rule

ROWS = """
embedding   word                  transformer.wte.weight                 copy    always
embedding   position              transformer.wpe.weight                 copy    always
input_norm  weight                transformer.h.{L}.ln_1.weight          copy    always
input_norm  bias                  transformer.h.{L}.ln_1.bias            copy    always
attention   q+k+v                 transformer.h.{L}.attn.c_attn.weight   conv1d  always
attention   q_bias+k_bias+v_bias  transformer.h.{L}.attn.c_attn.bias     copy    always
attention   proj                  transformer.h.{L}.attn.c_proj.weight   conv1d  always
attention   proj_bias             transformer.h.{L}.attn.c_proj.bias     copy    always
post_norm   weight                transformer.h.{L}.ln_2.weight          copy    always
post_norm   bias                  transformer.h.{L}.ln_2.bias            copy    always
mlp         fc1                   transformer.h.{L}.mlp.c_fc.weight      conv1d  always
mlp         fc1_bias              transformer.h.{L}.mlp.c_fc.bias        copy    always
mlp         fc2                   transformer.h.{L}.mlp.c_proj.weight    conv1d  always
mlp         fc2_bias              transformer.h.{L}.mlp.c_proj.bias      copy    always
final_norm  weight                transformer.ln_f.weight                copy    always
final_norm  bias                  transformer.ln_f.bias                  copy    always
lm_head     weight                lm_head.weight                         copy    untied
"""
GPT2_ACT = {"gelu": "gelu", "gelu-tanh": "gelu_new", "relu": "relu", "quick-gelu": "quick_gelu",
            "squared-relu": "relu2", "silu": "silu"}


def gpt_rules(f):
    """What GPT2LMHeadModel / GPTBigCodeForCausalLM cannot express (GQA only for the multi-head GPT-2)."""
    a, p = f.a0, []
    if a["num_kv_heads"] != a["num_heads"] and f.cls.name == "gpt2":
        p.append(f"grouped/multi-query attention ({a['num_kv_heads']} KV heads for {a['num_heads']} heads) "
                 "cannot be expressed by the gpt2 family (GPT2LMHeadModel is multi-head only)")
    if a["num_heads"] * a["head_dim"] != f.config.hidden_size:
        p.append(f"head_dim {a['head_dim']} x {a['num_heads']} heads != hidden {f.config.hidden_size}: "
                 "the gpt2 family (GPT2LMHeadModel) derives head_dim from hidden_size")
    for m in f.mlps:
        if m.attrs["gated"]:
            p.append("a gated MLP cannot be expressed by the gpt2 family (GPT2LMHeadModel)")
            break
        if m.attrs["activation"] not in GPT2_ACT:
            p.append(f"activation {m.attrs['activation']!r} has no transformers name")
            break
    if len({m.params["fc2"].type.shape for m in f.mlps}) > 1:
        p.append("MLP sizes differ across layers; GPT2LMHeadModel has one n_inner")
    return p


GPT_RULES = [rule("q/k normalization")(no_qk_norm),
             rule("GQA (gpt2), head_dim != hidden/heads, a gated MLP, MLP sizes that differ")(gpt_rules)]


def config(f, flags) -> dict:
    c, mlp, pos = f.config, f.mlps[0], f.emb.params.get("position")
    return {"vocab_size": f.emb.params["word"].type.shape[0],
            "n_positions": pos.type.shape[0] if pos is not None else c.max_position_embeddings,
            "n_embd": c.hidden_size, "n_layer": c.num_layers, "n_head": f.a0["num_heads"],
            "n_inner": mlp.params["fc2"].type.shape[1], "activation_function": GPT2_ACT[mlp.attrs["activation"]],
            "layer_norm_epsilon": f.norms[0].attrs["eps"], "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "initializer_range": 0.02}


family("gpt2", "GPT2LMHeadModel", rows=ROWS,
       signature=lambda f: (f.kinds == {"layernorm"} and f.positions == {"none"}
                            and not f.a0["num_kv_heads"] == 1 < f.a0["num_heads"]),
       rules=GPT_RULES, config=config)
