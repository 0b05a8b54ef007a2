"""SmolLM3ForCausalLM: Llama with layers that skip rotary (NoPE), named per layer by ``no_rope_layers``.

transformers' ``models/smollm3/modular_smollm3.py``: ``SmolLM3Attention`` is ``LlamaAttention`` that applies
rotary only when ``config.no_rope_layers[layer_idx]`` is 1 (1 = rope, 0 = NoPE: the opposite of Megatron's
``no_rope_freq`` list, where 1 = skip); the decoder layer, MLP, norms and rotary embedding are Llama's (Qwen2's
rotary, the same). mexc writes ``use_sliding_window: false`` so ``layer_types`` stay full attention.
"""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, decoder_rows, family, llama_config, no_qk_norm, rule

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", mlp_bias="mlp_bias")


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    cfg.update(attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"], use_sliding_window=False,
               sliding_window=None, no_rope_layers=[int(a.attrs["position"] == "rope") for a in f.attns])
    return cfg


family("smollm3", "SmolLM3ForCausalLM", rows=ROWS,
       signature=lambda f: f.kinds == {"rmsnorm"} and "none" in f.positions and not f.learned and not f.moes
       and len(f.attns) == f.config.num_layers,
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE], config=config,
       before=("llama",))
