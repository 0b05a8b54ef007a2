"""Issue 17, the smaller rows, each from a real megatron-core 0.16.1 checkpoint (tests/fixture_makers/megatron_core.py)
whose logits the reference interpreter, transformers (hf output) and onnxruntime (onnx output, both profiles,
prefill and KV-cache decode) reproduce within 1e-4 in fp32; the trtllm output is read back by the test-side
TensorRT-LLM reader (tests/trtllm_reader.py) where a TensorRT-LLM <= 1.2 class expresses the row, and refused
with one line where none does.

* ``softmax-scale``: Megatron's ``softmax_scale`` (1.0, not 1/sqrt(16)): hf GraniteForCausalLM
  (``attention_multiplier``), trtllm LLaMA class ``attention_multiplier`` = scale * sqrt(head_size).
* ``nope``: ``no_rope_freq=2`` (megatron-core: layers [rope, NoPE]): ``attention.position=none`` per layer, hf
  SmolLM3ForCausalLM (``no_rope_layers`` [1, 0]); trtllm refused (one position_embedding_type per model).
* ``mtp``: one multi-token-prediction layer (``mtp_num_layers=1``): its ``mtp.*`` tensors are left out with a
  compile note on every target; the main head's logits (megatron-core's, computed with the MTP layer present)
  are unchanged.
* ``moe-grouped``: the ``moe`` kind's weights saved by megatron-core's legacy GroupedMLP (``weight1`` / ``weight2``,
  loaded into it by megatron-core's own dist_checkpointing from the SequentialMLP model): each expert is a
  reshape / index / transpose of the rank's tensor, equal to the SequentialMLP save's, then Mixtral on every target.
* ``geglu-erf``: Gemma with GeGLU of the exact (erf) GELU: hf GemmaForCausalLM with ``hidden_act: gelu_python``
  (``hidden_activation: gelu``); trtllm refused (TensorRT-LLM's ``gelu`` is the tanh approximation).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import trtllm_reader
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, get_backend, lift
from mexc.errors import BackendError, CheckpointError, ConfigError
from mexc.tools.cli import main

TOL = 1e-4


def hf_logits(out, tokens, arch):
    """transformers' own class loading the hf output: every tensor used, none missing."""
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    model = hf_model(out, arch)
    with torch.no_grad():
        return cfg, model, model(tokens).logits


def onnx_matches(tmp_path, d, profile):
    """The onnx output's prefill of 5 tokens, then one token at a time through the KV cache: the worst error
    against megatron-core's logits."""
    ref = load_reference(d)
    out = tmp_path / f"onnx-{profile}"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    return onnx_errors(out / "model.onnx", ref, prefix=5).worst


# ------------------------------------------------------------------------------------------ softmax_scale
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_softmax_scale_lifted_and_run(fmt):
    d = megatron_checkpoint("softmax-scale", fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    attns = list(m.graph.find("attention"))
    assert {a.attrs["softmax_scale"] for a in attns} == {1.0}
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for a in attns:                    # the default 1/sqrt(16) = 0.25 is clearly wrong: the attribute runs
        a.attrs["softmax_scale"] = None
    assert err(run(m, ref["tokens"]), ref["logits"]) > 10 * TOL


def test_hf_granite_matches_megatron(tmp_path):
    d = megatron_checkpoint("softmax-scale")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg, model, logits = hf_logits(out, ref["tokens"], "GraniteForCausalLM")
    assert cfg["attention_multiplier"] == 1.0 and cfg["model_type"] == "granite"
    assert (cfg["embedding_multiplier"], cfg["residual_multiplier"], cfg["logits_scaling"]) == (1.0, 1.0, 1.0)
    assert model.model.layers[0].self_attn.scaling == 1.0
    assert err(logits, ref["logits"]) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_onnx_softmax_scale_matches_megatron(tmp_path, profile):
    assert onnx_matches(tmp_path, megatron_checkpoint("softmax-scale"), profile) < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_trtllm_llama_attention_multiplier_read_back(tmp_path, tp):
    d = megatron_checkpoint("softmax-scale")
    ref = load_reference(d)
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, build="never"))
    cfg, _ = trtllm_reader.read_checkpoint(str(out))
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert math.isclose(cfg["attention_multiplier"], 1.0 * 4.0)       # scale * sqrt(head_size 16)
    assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) < TOL
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0   # mexc's own reader agrees


def test_softmax_scale_refusals_name_the_class(tmp_path):
    m = lift(megatron_checkpoint("softmax-scale") / "ckpt")
    attns = list(m.graph.find("attention"))
    attns[1].attrs["softmax_scale"] = 0.3                      # one scale per model in every class
    from mexc.backends.hf import families

    fam, problems = families.classify(m)
    assert fam == "granite" and any("attention_multiplier is one per model" in p for p in problems)
    trt = get_backend("trtllm").check(m, CompileOptions(target="trtllm"))
    assert any("softmax scales that differ across layers" in p and "LlamaForCausalLM" in p for p in trt)
    g = lift(megatron_checkpoint("gpt") / "ckpt")               # the GPT class has no field mexc writes for it
    for a in g.graph.find("attention"):
        a.attrs["softmax_scale"] = 0.2
    trt = get_backend("trtllm").check(g, CompileOptions(target="trtllm"))
    assert any("softmax scale other than 1/sqrt(head_dim)" in p and "GPTForCausalLM" in p for p in trt)


def test_softmax_scale_argument_is_honoured_and_checked():
    from mexc.frontends.megatron.arguments import BY_NAME, HONOURED
    from mexc.frontends.megatron.config import from_args

    assert BY_NAME["softmax_scale"].verdict == HONOURED
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128)
    assert from_args(dict(base, softmax_scale=0.2), "x").softmax_scale == 0.2
    with pytest.raises(ConfigError, match="softmax_scale = -1 is not a positive number"):
        from_args(dict(base, softmax_scale=-1), "args.pt")


# ------------------------------------------------------------------------------------------ NoPE layers
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nope_layers_lifted_and_run(fmt):
    d = megatron_checkpoint("nope", fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    attns = list(m.graph.find("attention"))
    assert [a.attrs["position"] for a in attns] == ["rope", "none"]
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    attns[1].attrs["position"] = "rope"              # rotary on the NoPE layer is clearly wrong
    assert err(run(m, ref["tokens"]), ref["logits"]) > 10 * TOL


def test_no_rope_freq_forms():
    from mexc.frontends.megatron.arguments import BY_NAME, HONOURED
    from mexc.frontends.megatron.config import from_args

    assert BY_NAME["no_rope_freq"].verdict == HONOURED
    base = dict(num_layers=4, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                position_embedding_type="rope")
    assert from_args(dict(base, no_rope_freq=2), "x").no_rope == (0, 1, 0, 1)   # megatron-core's expansion
    assert from_args(dict(base, no_rope_freq=4), "x").no_rope == (0, 0, 0, 1)
    assert from_args(dict(base, no_rope_freq=[1, 0, 0, 1]), "x").no_rope == (1, 0, 0, 1)
    assert from_args(dict(base, no_rope_freq=[1, 0, 0, 1]), "x", {"no_rope": [0, 0, 0, 0]}).no_rope == (0,) * 4
    with pytest.raises(ConfigError, match="no_rope_freq=3 does not divide num_layers=4"):
        from_args(dict(base, no_rope_freq=3), "args.pt")
    with pytest.raises(ConfigError, match="neither an int nor a 0/1 list"):
        from_args(dict(base, no_rope_freq=[1, 0]), "args.pt")


def test_hf_smollm3_matches_megatron(tmp_path):
    d = megatron_checkpoint("nope")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg, model, logits = hf_logits(out, ref["tokens"], "SmolLM3ForCausalLM")
    assert cfg["no_rope_layers"] == [1, 0] and cfg["use_sliding_window"] is False
    assert [layer.self_attn.use_rope for layer in model.model.layers] == [1, 0]
    assert err(logits, ref["logits"]) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_onnx_nope_matches_megatron(tmp_path, profile):
    assert onnx_matches(tmp_path, megatron_checkpoint("nope"), profile) < TOL


def test_trtllm_refuses_nope_layers(tmp_path, capsys):
    d = megatron_checkpoint("nope")
    with pytest.raises(BackendError, match="NoPE layers.*LlamaForCausalLM|LlamaForCausalLM.*NoPE"):
        compile_checkpoint(d / "ckpt", tmp_path / "trt", CompileOptions(target="trtllm", build="never"))
    assert not (tmp_path / "trt").exists()
    capsys.readouterr()
    rc = main(["compile", str(d / "ckpt"), "--target", "trtllm", "--build", "never", "-o", str(tmp_path / "t")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "NoPE layers" in lines[0] and "Traceback" not in lines[0]


# ------------------------------------------------------------------------------------------ MTP heads
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_mtp_tensors_left_out_main_logits_unchanged(fmt):
    d = megatron_checkpoint("mtp", fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    keys = [str(p.source) for _, _, p in m.graph.params()]
    assert keys and not any("mtp." in k for k in keys)
    assert "left out the 1 multi-token-prediction layer(s) (10 mtp.* tensors" in m.meta["lift_note"]
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


@pytest.mark.parametrize("target", ["hf", "onnx", "trtllm"])
def test_mtp_every_target_notes_and_matches(tmp_path, target):
    d = megatron_checkpoint("mtp")
    ref = load_reference(d)
    out = tmp_path / target
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target=target, build="never"))
    assert any("multi-token-prediction" in n for n in res.notes), res.notes
    if target == "hf":
        logits = hf_logits(out, ref["tokens"], "LlamaForCausalLM")[2]
        assert err(logits, ref["logits"]) < TOL
    elif target == "trtllm":
        assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) < TOL
    else:
        assert onnx_matches(tmp_path, d, "ort") < TOL


def test_mtp_tensors_without_mtp_args_are_refused():
    d = megatron_checkpoint("mtp")
    with pytest.raises(CheckpointError, match="multi-token-prediction tensor.*no mtp_num_layers"):
        lift(d / "ckpt", overrides={"mtp_num_layers": 0})


# ------------------------------------------------------------------------------------------ legacy grouped GEMM
@pytest.mark.parametrize("tp,fmt", [(1, "torch"), (2, "torch"), (1, "torch_dist")])
def test_legacy_grouped_gemm_experts_are_views_of_sequential_ones(tp, fmt):
    d = megatron_checkpoint("moe-grouped", tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    seq = lift(megatron_checkpoint("moe") / "ckpt")      # the same weights saved by SequentialMLP
    for a, b in zip(m.graph.find("moe"), seq.graph.find("moe")):
        for k in ("router", "gate", "up", "fc2"):
            assert torch.equal(a.params[k].source.materialize(), b.params[k].source.materialize()), k
        leaf_ops = {r.op for r in _recipe_ops(a.params["gate"].source)}
        assert leaf_ops <= {"load", "reshape", "index", "transpose", "slice", "concat", "stack"}, leaf_ops
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    from mexc.ir import parse
    assert str(parse(str(m))) == str(m)      # the reshape recipe prints and parses back


def _recipe_ops(r):
    yield r
    for i in r.inputs:
        yield from _recipe_ops(i)


@pytest.mark.parametrize("target", ["hf", "onnx", "trtllm"])
def test_legacy_grouped_gemm_every_target(tmp_path, target):
    d = megatron_checkpoint("moe-grouped", tp=2)
    ref = load_reference(d)
    out = tmp_path / target
    compile_checkpoint(d / "ckpt", out, CompileOptions(target=target, build="never"))
    if target == "hf":
        assert err(hf_logits(out, ref["tokens"], "MixtralForCausalLM")[2], ref["logits"]) < TOL
    elif target == "trtllm":
        assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) < TOL
    else:
        assert onnx_matches(tmp_path, d, "ort") < TOL


def test_legacy_grouped_gemm_wrong_expert_count_is_one_error():
    d = megatron_checkpoint("moe-grouped")
    with pytest.raises(CheckpointError, match="not a GroupedMLP weight1 of 3 local experts"):
        lift(d / "ckpt", overrides={"num_experts": 3})


# ------------------------------------------------------------------------------------------ exact-erf GeGLU
@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_geglu_erf_lifted_and_run(fmt):
    d = megatron_checkpoint("geglu-erf", fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    assert {(n.attrs["activation"], n.attrs["gated"]) for n in m.graph.find("mlp")} == {("gelu", True)}
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


def test_hf_gemma_exact_gelu_matches_megatron(tmp_path):
    d = megatron_checkpoint("geglu-erf")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg, model, logits = hf_logits(out, ref["tokens"], "GemmaForCausalLM")
    assert (cfg["hidden_act"], cfg["hidden_activation"]) == ("gelu_python", "gelu")
    assert model.config.hidden_act == "gelu_python"            # not rewritten to the tanh GELU
    x = torch.linspace(-4, 4, 401)
    act = model.model.layers[0].mlp.act_fn
    assert torch.allclose(act(x), torch.nn.functional.gelu(x), atol=1e-6)
    assert (act(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max() > 1e-4
    assert err(logits, ref["logits"]) < TOL
    m = lift(d / "ckpt")        # the fixture's MLP gains make the tanh GELU measurably off on this model
    for n in m.graph.find("mlp"):
        n.attrs["activation"] = "gelu-tanh"
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1.5 * TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_onnx_exact_geglu_matches_megatron(tmp_path, profile):
    assert onnx_matches(tmp_path, megatron_checkpoint("geglu-erf"), profile) < TOL


def test_trtllm_refuses_exact_geglu(tmp_path):
    d = megatron_checkpoint("geglu-erf")
    with pytest.raises(BackendError, match="GemmaForCausalLM.*tanh GELU"):
        compile_checkpoint(d / "ckpt", tmp_path / "trt", CompileOptions(target="trtllm", build="never"))
    assert not (tmp_path / "trt").exists()
