"""MinistralForCausalLM: Mistral whose layers alternate between sliding-window and full attention.

``layer_types[i]`` is ``sliding_attention`` or ``full_attention`` (configuration_ministral.py); a sliding layer
uses ``sliding_window`` (= the IR's window + 1, see :mod:`.mistral`), a full layer the causal mask
(``MinistralModel.forward`` builds both). Megatron picks the windowed layers with ``window_attn_skip_freq``
(megatron-core ``is_layer_window_attention``); the lift has already resolved it to ``attention.window`` per
layer, so the pattern is copied layer by layer."""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, decoder_rows, family, llama_config, no_qk_norm, rule, windowed
from .mistral import hf_window, one_window, plain_attention

ROWS = decoder_rows()


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    by_layer = {a.layer: a.attrs["window"] for a in f.attns}
    cfg.update(sliding_window=hf_window(f),
               layer_types=["full_attention" if by_layer[i] is None else "sliding_attention"
                            for i in sorted(by_layer)])
    return cfg


family("ministral", "MinistralForCausalLM", rows=ROWS, windows=True,
       signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions == {"rope"} and plain_attention(f)
                            and 0 < len(windowed(f)) < len(f.attns)),
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE,
              rule("differing windows; biases")(one_window)],
       config=config, before=("llama",))
