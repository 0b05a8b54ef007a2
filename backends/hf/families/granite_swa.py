"""GraniteSWAForCausalLM (transformers models/granite_swa): Granite with a learned sink per head
(``self_attn.sinks``; ``eager_attention_forward`` scales the attention output by ``sigmoid(lse - sink)``, the same
as one more softmax logit per head: megatron-core ``SoftmaxOne``) and ``layer_types`` of ``sliding_attention``
(``sliding_window`` = the IR's window + 1, the query counted) and ``full_attention``. The one stock transformers
class mexc writes a dense model with attention sinks as (megatron-core ``softmax_type`` learnable / off-by-one).

As for :mod:`.granite`: ``attention_multiplier`` is the softmax scale (written as ``head_dim ** -0.5`` when the
IR has none), ``embedding_multiplier``, ``residual_multiplier`` and ``logits_scaling`` are 1; ``attention_bias``
is one switch for q/k/v/o, ``mlp_bias`` one for gate/up/down; ``layer_rope_theta`` is left unset (every layer
rotates with ``rope_parameters``)."""

from __future__ import annotations

from .common import LLAMA_LIKE, ONE_MLP_SIZE, decoder_rows, family, llama_config, no_qk_norm, rule, windowed

ROWS = decoder_rows(qkv_bias="attn_bias", proj_bias="attn_bias", mlp_bias="mlp_bias") + """
attention  sinks  model.layers.{L}.self_attn.sinks  copy  always
"""


def _attention(f):
    p = []
    if not all(a.attrs["sinks"] for a in f.attns):
        p.append(f"layers without sinks mixed with layers with sinks cannot be expressed by the {f.name}: every "
                 "layer has self_attn.sinks")
    sizes = sorted({a.attrs["window"] for a in windowed(f)})
    if len(sizes) > 1:
        p.append(f"layers with different sliding windows {sizes} cannot be expressed by the {f.name}: its config "
                 "has one sliding_window")
    scales = {a.attrs["softmax_scale"] for a in f.attns}
    if len(scales) > 1:
        p.append(f"layers with different softmax scales {sorted(scales, key=str)} cannot be expressed by the "
                 f"{f.name}: attention_multiplier is one per model")
    if any(a.attrs["position"] != "rope" for a in f.attns):
        p.append(f"NoPE layers are not written for the {f.name} (layer_rope_theta 0) yet")
    return p


def config(f, flags) -> dict:
    cfg = llama_config(f, f.mlps[0])
    a, w = f.a0, windowed(f)
    by_layer = {n.layer: n.attrs["window"] for n in f.attns}
    cfg.update(attention_bias=flags["attn_bias"], mlp_bias=flags["mlp_bias"],
               attention_multiplier=float(a["softmax_scale"] or a["head_dim"] ** -0.5), embedding_multiplier=1.0,
               residual_multiplier=1.0, logits_scaling=1.0,
               # no windowed layer: the value is unused (GraniteSWAModel builds the mask it would need anyway)
               sliding_window=w[0].attrs["window"] + 1 if w else f.config.max_position_embeddings,
               layer_types=["full_attention" if by_layer[i] is None else "sliding_attention" for i in sorted(by_layer)],
               layer_rope_theta=None)
    return cfg


cls = family("granite_swa", "GraniteSWAForCausalLM", rows=ROWS, windows=True, sinks=True,
             signature=lambda f: (f.kinds == {"rmsnorm"} and f.positions <= {"rope", "none"}
                                  and any(a.attrs["sinks"] for a in f.attns)),
             rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE, ONE_MLP_SIZE,
                    rule("layers without sinks, differing windows or softmax scales, NoPE layers")(_attention)],
             config=config, before=("granite", "ministral", "mistral", "llama"))
cls.extra["any_softmax_scale"] = True   # the shared softmax-scale rule (common._attention_forms) lets it through
