"""The weightless q/k L2 norm (issue 17's ``qk_l2_norm`` row, Llama 4) from real megatron-core checkpoints,
honoured by hf (Llama4ForCausalLM made a dense Llama) and onnx, refused in one line by trtllm.

Oracle: megatron-core 0.16.1's own logits (tests/fixture_makers/megatron_core.py, kind ``qk-l2-norm``: the local spec
with ``qk_l2_norm=True``, so q_layernorm / k_layernorm are ``L2Norm`` built with ``eps=layernorm_epsilon`` (1e-6
here) and applied per head before rotary; megatron/core/models/gpt/gpt_layer_specs.py,
megatron/core/transformer/{attention,torch_norm}.py). ``L2Norm`` has no weight: the checkpoint holds no q/k norm
tensors. transformers' Llama4 applies its ``Llama4TextL2Norm`` after rotary on interleaved pairs; both orders
agree (a rotation keeps the mean of squares) and the hf rows permute q/k to pairs. ``qk-l2-norm-interleaved``
is the same model with ``rotary_interleaved`` (pairs: Llama 4's own rotary order)."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import err, hf_cached_errors, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import BackendError
from mexc.frontends.megatron.config import from_args
from mexc.passes import PassManager, parse_pipeline

TOL = 1e-4
PREFIX = 2


@pytest.mark.parametrize("kind,tp,fmt", [("qk-l2-norm", 1, "torch"), ("qk-l2-norm", 2, "torch_dist"),
                                         ("qk-l2-norm-interleaved", 1, "torch")])
def test_lift_and_interpreter_follow_megatron_core(kind, tp, fmt):
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    attns = list(m.graph.find("attention"))
    assert {(a.attrs["qk_norm"], a.attrs["qk_norm_eps"]) for a in attns} == {("l2", 1e-6)}
    assert not any("q_norm" in a.params or "k_norm" in a.params for a in attns)   # weightless
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for a in attns:                     # the eps is the one that runs
        a.attrs["qk_norm_eps"] = 1.0
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-3
    for a in attns:                     # and the norm matters
        a.attrs["qk_norm"] = "none"
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-2


@pytest.mark.parametrize("pipeline", ["reshard{tp=2}", "relayout-qkv{to=concat},reshard{tp=4}"])
def test_l2_norm_per_head_on_every_simulated_rank(pipeline):
    d = megatron_checkpoint("qk-l2-norm")
    ref = load_reference(d)
    m = lift(d / "ckpt")
    PassManager(parse_pipeline(pipeline))(m)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


def test_qk_l2_norm_argument_wins_over_qk_layernorm():
    """megatron-core's spec builds L2Norm when qk_l2_norm is set, whatever qk_layernorm says."""
    args = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128, swiglu=True,
                normalization="RMSNorm", position_embedding_type="rope")
    assert from_args(dict(args, qk_l2_norm=True, qk_layernorm=True), "CKPT").qk_l2_norm
    assert not from_args(args, "CKPT").qk_l2_norm


@pytest.mark.parametrize("kind", ["qk-l2-norm", "qk-l2-norm-interleaved"])
def test_hf_llama4_dense_reproduces_megatron_prefill_and_cached_decode(tmp_path, kind):
    """interleaved: rope-to-half, then the pairs rows: the two permutations compose to the identity."""
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["Llama4ForCausalLM"], "llama4_text")
    model = hf_model(out, "Llama4ForCausalLM")
    c = model.config      # exactly a dense Llama with the L2 norm: no MoE, no chunked / NoPE layers
    assert (c.moe_layers, c.no_rope_layers, c.layer_types) == ([], [1, 1], ["full_attention"] * 2)
    assert c.use_qk_norm and not c.attn_temperature_tuning and c.attention_chunk_size is None
    assert all(hasattr(layer.self_attn, "qk_norm") and not layer.is_moe_layer for layer in model.model.layers)
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL
    assert max(hf_cached_errors(model, ref, prefix=PREFIX)) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind", ["qk-l2-norm", "qk-l2-norm-interleaved"])
def test_onnx_prefill_and_decode_match_megatron(tmp_path, kind, profile):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=PREFIX, whole=True).worst < TOL


def test_refusals_are_one_line_each(tmp_path):
    from mexc.backends.hf import families
    from mexc.driver import get_backend

    d = megatron_checkpoint("qk-l2-norm")
    problems = get_backend("trtllm").check(lift(d / "ckpt"), CompileOptions(target="trtllm"))
    assert len(problems) == 1 and "qk_l2_norm" in problems[0] and "TensorRT-LLM" in problems[0]
    with pytest.raises(BackendError, match="qk_l2_norm"):
        compile_checkpoint(d / "ckpt", tmp_path / "t", CompileOptions(target="trtllm"))
    assert not (tmp_path / "t").exists()
    m = lift(d / "ckpt")
    PassManager(parse_pipeline("split-qkv"))(m)
    assert families.classify(m) == ("llama4", [])
    for a in m.graph.find("attention"):      # an eps Llama4TextL2Norm cannot take (it uses rms_norm_eps)
        a.attrs["qk_norm_eps"] = 1e-5
    family, problems = families.classify(m)
    assert family == "llama4" and len(problems) == 1 and "rms_norm_eps" in problems[0]
    for a in m.graph.find("attention"):      # partial rotary: Llama 4 rotates the whole head
        a.attrs["qk_norm_eps"] = 1e-6
        a.attrs["rope"] = type(a.attrs["rope"])(percent=0.5)
    family, problems = families.classify(m)
    assert family == "llama4" and len(problems) == 1 and "partial rotary" in problems[0]
