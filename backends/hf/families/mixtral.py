"""MixtralForCausalLM: like Llama, every layer a softmax top-k MoE of gated SiLU experts, no biases."""

from __future__ import annotations

from .common import ATTN_BIAS, LLAMA_LIKE, decoder_rows, family, llama_config, no_qk_norm, rule, windowed

ROWS = decoder_rows(mlp="none") + """
moe   router   model.layers.{L}.block_sparse_moe.gate.weight               copy    always
moe   gate     model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight     expert  always
moe   fc2      model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight     expert  always
moe   up       model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight     expert  always
"""
_MOE_PARAMS = {"router", "gate", "up", "fc2"}


def _moe(f):
    p = []
    if f.mlps:
        p.append("mixed dense and MoE layers cannot be expressed by the mixtral family (MixtralForCausalLM): "
                 "every layer is an MoE")
    if f.has(f.attns, ATTN_BIAS):
        p.append("attention biases cannot be expressed by the mixtral family (MixtralForCausalLM)")
    for m in f.moes:
        a = m.attrs
        if a["score"] != "softmax":
            p.append(f"MoE routing with score={a['score']!r} (not softmax) cannot be expressed by the mixtral "
                     "family (MixtralForCausalLM routes by softmax top-k)")
        elif a["pre_softmax"] and a["top_k"] != a["num_experts"]:
            p.append("MoE pre-softmax routing (softmax over all experts, top-k weights not renormalized) "
                     "cannot be expressed by the mixtral family: MixtralForCausalLM renormalizes the top-k")
        if a["group_topk"]:
            p.append("group-limited top-k routing cannot be expressed by the mixtral family (MixtralForCausalLM)")
        if not a["gated"] or a["activation"] != "silu":
            p.append("the mixtral family (MixtralForCausalLM) needs gated SiLU experts, got "
                     f"activation={a['activation']!r} gated={a['gated']}")
        if set(m.params) - _MOE_PARAMS:
            p.append(f"MoE params {sorted(set(m.params) - _MOE_PARAMS)} cannot be expressed by the mixtral family")
        if p:
            break
    if len({(m.attrs["num_experts"], m.attrs["top_k"], m.params["fc2"].type.shape) for m in f.moes}) > 1:
        p.append("MoE layers differ in experts/top-k/size; MixtralForCausalLM has one per model")
    return p


def config(f, flags) -> dict:
    m = f.moes[0]
    cfg = llama_config(f, m)
    cfg.update({"num_local_experts": m.attrs["num_experts"], "num_experts_per_tok": m.attrs["top_k"],
                "output_router_logits": False, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.0,
                "sliding_window": _window(f)})
    return cfg


def _window(f) -> int | None:
    """MixtralModel's one ``sliding_window`` for every layer (the query counted: the IR's window + 1, see
    :mod:`.mistral`), or None."""
    w = windowed(f)
    return w[0].attrs["window"] + 1 if w else None


def _windows(f):
    sizes = {a.attrs["window"] for a in f.attns}
    if len(sizes) > 1:
        return (f"layers with different sliding windows ({', '.join(sorted(map(str, sizes)))}) cannot be expressed "
                "by the mixtral family (MixtralForCausalLM): its config has one sliding_window for every layer")


family("mixtral", "MixtralForCausalLM", rows=ROWS, moe=True,
       signature=lambda f: bool(f.moes) and not f.mlas,        # MLA models are DeepseekV3's
       rules=[rule("q/k normalization")(no_qk_norm), *LLAMA_LIKE,
              rule("dense layers, attention biases, routing other than softmax top-k renormalized, experts other "
                   "than gated SiLU, differing MoE layers")(_moe),
              rule("windowed and full layers mixed, or different windows")(_windows)], config=config, windows=True)
