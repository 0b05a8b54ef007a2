"""transformers' DeepseekV2ForCausalLM (issue 17) from real megatron-core checkpoints of DeepSeek-V2's shape
(tests/fixture_makers/megatron_core.py): MLA (q_lora_rank 24, kv_lora_rank 512, decoupled rope 64 with YaRN), layer
0 a dense SwiGLU MLP, layer 1 a softmax-routed MoE with an ungated shared expert. Kinds ``deepseek-v2-greedy``
(``moe_router_pre_softmax``: top-2 of 4 experts, x 2.5; ``topk_method: greedy``) and ``deepseek-v2-group``
(pre-softmax top-3 of 8 within the best 2 of 4 groups, x 2.0; ``group_limited_greedy``): transformers loads the hf
output (every tensor used) and reproduces megatron-core's logits within 1e-4 in fp32, whole prompt and through its
KV cache, from legacy and torch_dist saves at TP1 and TP2. What the class cannot express is refused in one line:
Megatron's default (renormalized) softmax router (kind ``deepseek-v2``), groups ranked by more than their best
score, no or gated shared experts, dense layers after MoE ones, other latent norm eps. Dense MLA and sigmoid-routed
MLA stay DeepseekV3ForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import err, hf_cached_errors, hf_model
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.backends.hf import families  # noqa: E402
from mexc.driver import compile_checkpoint, lift  # noqa: E402
from mexc.tools.cli import main  # noqa: E402

TOL = 1e-4
SAVES = [(1, "torch"), (2, "torch"), (1, "torch_dist"), (2, "torch_dist")]
# kind -> (topk_method, n_group, topk_group, experts, top_k, n_shared_experts, moe_intermediate_size, scale)
KINDS = {"deepseek-v2-greedy": ("greedy", None, None, 4, 2, 2, 32, 2.5),
         "deepseek-v2-group": ("group_limited_greedy", 4, 2, 8, 3, 2, 16, 2.0)}


@pytest.mark.parametrize("tp,fmt", SAVES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_deepseek_v2_matches_megatron(tmp_path, kind, tp, fmt):
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["DeepseekV2ForCausalLM"], "deepseek_v2")
    method, groups, group_topk, E, k, shared, F, scale = KINDS[kind]
    assert (cfg["topk_method"], cfg["n_group"], cfg["topk_group"], cfg["n_routed_experts"],
            cfg["num_experts_per_tok"], cfg["n_shared_experts"], cfg["moe_intermediate_size"]) == \
        (method, groups, group_topk, E, k, shared, F)
    assert (cfg["first_k_dense_replace"], cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]) == \
        (1, 24, 512, 64)
    # the scale is either the config's routed_scaling_factor or folded into the experts' down_proj
    assert cfg["routed_scaling_factor"] in (1.0, scale)
    model = hf_model(out, "DeepseekV2ForCausalLM")
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["DeepseekV2MLP", "DeepseekV2Moe"]
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL
    assert max(hf_cached_errors(model, ref)) < TOL
    if method == "group_limited_greedy":        # the groups are what runs: plain greedy top-3 differs
        for layer in model.model.layers[1:]:
            layer.mlp.gate.topk_method = "greedy"
        with torch.no_grad():
            assert err(model(ref["tokens"]).logits, ref["logits"]) > 1e-3


def test_classification_by_routing():
    """Softmax-routed MLA MoE -> DeepseekV2; sigmoid-routed or dense MLA -> DeepseekV3 (as before)."""
    for kind, family in (("deepseek-v2-greedy", "deepseek_v2"), ("deepseek-v2-group", "deepseek_v2"),
                         ("deepseek-v3", "deepseek_v3"), ("mla-q", "deepseek_v3"), ("mla-512", "deepseek_v3")):
        assert families.classify(lift(megatron_checkpoint(kind) / "ckpt")) == (family, []), kind


def test_default_router_is_refused_in_one_line(tmp_path, capsys):
    """Megatron's default softmax router renormalizes the top-k (softmax of the top-k logits); DeepseekV2TopkRouter
    never does: refused, not approximated (here and with MoE on layer 0 too)."""
    for kind in ("deepseek-v2", "deepseek-v2-all-moe"):
        out = tmp_path / kind
        assert main(["compile", str(megatron_checkpoint(kind) / "ckpt"), "--target", "hf", "-o", str(out)]) != 0
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and not out.exists(), lines
        assert "DeepseekV2ForCausalLM" in lines[0] and "never renormalized" in lines[0], lines


def test_hf_refusals_name_the_class_and_reason():
    def problems(change) -> list[str]:
        m = lift(megatron_checkpoint("deepseek-v2-group") / "ckpt")
        change(m)
        family, lines = families.classify(m)
        assert family == "deepseek_v2" and lines, (family, lines)
        return lines

    def moes(m):
        return list(m.graph.find("moe"))

    def two_per_group(m):           # top-4 within 2 groups: Megatron sums each group's best 2, transformers the max
        for n in moes(m):
            n.attrs["top_k"] = 4

    def gated(m):
        for n in moes(m):
            n.attrs["shared_expert"] = "sigmoid-gated"

    def no_shared(m):
        for n in moes(m):
            n.attrs["shared_expert"] = "none"
            for k in ("shared_gate", "shared_up", "shared_fc2"):
                del n.params[k]

    def dense_last(m):              # layers 0 and 1 swap their FFN: a dense layer after a MoE layer
        mlp, moe = next(m.graph.find("mlp")), moes(m)[-1]
        mlp.layer, moe.layer = moe.layer, mlp.layer

    def latent_eps(m):
        for n in m.graph.find("mla"):
            n.attrs["latent_norm_eps"] = 1e-5

    assert any("best score" in p and "top_k // group_topk = 2" in p for p in problems(two_per_group))
    assert any("ungated shared experts" in p and "sigmoid-gated" in p for p in problems(gated))
    assert any("ungated shared experts" in p and "'none'" in p for p in problems(no_shared))
    assert any("first_k_dense_replace" in p for p in problems(dense_last))
    assert any("eps 1e-6" in p and "DeepseekV2ForCausalLM" in p for p in problems(latent_eps))
