"""The feed-forward ops of the op set (:mod:`mexc.ir.ops` has the table and the machinery): ``mlp`` (plain or
gated, with gpt-oss's clamped GLU) and ``moe`` (routing variants, shared experts, biases). Each declares its
attributes and params as data."""

from __future__ import annotations

from .ops import A, ACTIVATIONS, COLUMN, EXPERT, MOE_SCORES, P, REPLICATED, ROUTER, ROW, SHARED_EXPERTS, op_schema

_GATED, _PLAIN = ("gated", (True,)), ("gated", (False,))
_SHARED = ("shared_expert", SHARED_EXPERTS[1:])


_GLU = {"glu_clamp": A((int, float, type(None)), None), "glu_offset": A((int, float), 0.0)}


@op_schema("mlp", 1, {"activation": A(str, "gelu", ACTIVATIONS), "gated": A(bool, False), **_GLU},
           "dense MLP: fc2(act(fc1 x)), or gated fc2(act(gate x) * up x) (glu_clamp / glu_offset: see _GLU)",
           params=[P("fc2", "H F", ROW, linear=True),
                   P("fc2_bias", "H", REPLICATED, required=False),
                   P("gate", "F H", COLUMN, linear=True, when=_GATED),
                   P("up", "F H", COLUMN, linear=True, when=_GATED),
                   P("fc1", "F H", COLUMN, linear=True, when=_PLAIN),
                   P("gate_bias", "F", COLUMN, required=False, when=_GATED),
                   P("up_bias", "F", COLUMN, required=False, when=_GATED),
                   P("fc1_bias", "F", COLUMN, required=False, when=_PLAIN)],
           dims=lambda a, c: {"H": c.hidden_size})
def _check_mlp(node, model):
    return _check_glu(node)


def _check_glu(node) -> list[str]:
    a = node.attrs
    if (a["glu_clamp"] is not None or a["glu_offset"]) and not a["gated"]:
        return ["glu_clamp / glu_offset need gated=True (they clamp and offset a GLU's two halves)"]
    return [] if a["glu_clamp"] is None or a["glu_clamp"] > 0 else [f"glu_clamp={a['glu_clamp']} must be > 0"]


@op_schema("moe", 1, {"num_experts": A(int, None), "top_k": A(int, 2),
                      "activation": A(str, "silu", ACTIVATIONS), "gated": A(bool, True),
                      "score": A(str, "softmax", MOE_SCORES), "pre_softmax": A(bool, False),
                      "norm_topk": A(bool, False), "topk_scale": A((int, float), 1.0),
                      "shared_expert": A(str, "none", SHARED_EXPERTS),
                      "num_groups": A(int, 0), "group_topk": A(int, 0), **_GLU},
           "mixture of experts: router, top-k, expert MLPs (Mixtral: softmax over top-k logits); the top-k "
           "routing weights are multiplied by topk_scale (Megatron's moe_router_topk_scaling_factor); plus, with "
           "shared_expert, an always-on MLP of the same activation/gating (Megatron's SharedExpertMLP, "
           "megatron/core/transformer/moe/shared_experts.py), its output times sigmoid(x . shared_expert_gate) "
           "when sigmoid-gated (moe_shared_expert_gate); expert_bias (sigmoid only) is added to the scores that "
           "choose the experts, not to their weights; num_groups / group_topk: the experts are chosen within the "
           "group_topk groups whose best top_k/group_topk scores sum highest (Megatron's group_limited_topk)",
           params=[P("router", "E H", ROUTER),
                   P("fc2", "E H F", EXPERT, linear=True, within=ROW),
                   P("gate", "E F H", EXPERT, linear=True, within=COLUMN, when=_GATED),
                   P("up", "E F H", EXPERT, linear=True, within=COLUMN, when=_GATED),
                   P("fc1", "E F H", EXPERT, linear=True, within=COLUMN, when=_PLAIN),
                   P("shared_fc2", "H S", ROW, linear=True, when=_SHARED),
                   P("shared_gate", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_up", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_fc1", "S H", COLUMN, linear=True, required=False, when=_SHARED),
                   P("shared_expert_gate", "U H", REPLICATED, when=("shared_expert", ("sigmoid-gated",))),
                   P("expert_bias", "E", ROUTER, required=False, when=("score", ("sigmoid",))),
                   # biases (gpt-oss; Megatron add_bias_linear): router logits + router_bias; each expert's fc2
                   # bias is scaled by its routing weight like its output (megatron-core MLP per_token_scale)
                   P("router_bias", "E", ROUTER, required=False),
                   P("gate_bias", "E F", EXPERT, required=False, within=COLUMN, when=_GATED),
                   P("up_bias", "E F", EXPERT, required=False, within=COLUMN, when=_GATED),
                   P("fc1_bias", "E F", EXPERT, required=False, within=COLUMN, when=_PLAIN),
                   P("fc2_bias", "E H", EXPERT, required=False, within=REPLICATED)],
           dims=lambda a, c: {"H": c.hidden_size, "E": a["num_experts"], "U": 1})
def _check_moe(node, model):
    E, k = node.attrs["num_experts"], node.attrs["top_k"]
    p = [] if 1 <= k <= E else [f"top_k={k} outside [1, {E}]"]
    G, gk = node.attrs["num_groups"], node.attrs["group_topk"]
    if (G or gk) and not (G >= 1 and 1 <= gk <= G and E % G == 0 and 1 <= k // gk <= E // G and gk * E // G >= k):
        p.append(f"group-limited routing num_groups={G} group_topk={gk} does not fit {E} experts, top_k={k} "
                 "(num_groups divides the experts, 1 <= group_topk <= min(num_groups, top_k), the chosen groups "
                 "hold top_k experts)")
    if node.attrs["shared_expert"] != "none":   # the shared expert is gated (GLU) exactly when the experts are
        want = ("shared_gate", "shared_up") if node.attrs["gated"] else ("shared_fc1",)
        unwanted = ("shared_fc1",) if node.attrs["gated"] else ("shared_gate", "shared_up")
        p += [f"missing param {n!r} (the shared expert of gated={node.attrs['gated']} experts)"
              for n in want if n not in node.params]
        p += [f"param {n!r} does not fit gated={node.attrs['gated']} experts" for n in unwanted if n in node.params]
    return p + _check_glu(node)


