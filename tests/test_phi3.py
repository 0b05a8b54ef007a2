"""Partial rotary on a Llama-style model (issue 17: `rotary_percent` < 1) from a real megatron-core checkpoint
(fixture kind phi3: RMSNorm, SwiGLU, GQA, no biases, untied, rotary_percent 0.5, norms perturbed): the hf output
through transformers' own Phi3ForCausalLM (partial_rotary_factor, fused qkv_proj / gate_up_proj) and the onnx output
through onnxruntime (both profiles, prefill and KV-cache decode steps) reproduce megatron-core's logits within 1e-4
in fp32, from legacy and torch_dist saves at tp 1 and 2; the trtllm output is TensorRT-LLM's Phi3ForCausalLM
(rotary_pct, one swiglu fc per rank), read back by the test-side reader (tests/trtllm_reader.py) and by mexc's
own reader (`mexc verify`). Full-rotary Llama models still become Llama in both targets."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import trtllm_reader
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.hf import families
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, get_backend, lift
from mexc.tools.cli import main

TOL = 1e-4
SAVES = [(1, "torch"), (2, "torch"), (1, "torch_dist"), (2, "torch_dist")]


def _load_hf(out):
    model = hf_model(out)
    return model.eval()


@pytest.mark.parametrize("tp,fmt", SAVES)
def test_hf_phi3_matches_megatron(tmp_path, tp, fmt):
    d = megatron_checkpoint("phi3", tp=tp, fmt=fmt)
    ref = load_reference(d)
    src = lift(d / "ckpt")
    assert {a.attrs["rope"].percent for a in src.graph.find("attention")} == {0.5}
    assert err(run(src, ref["tokens"]), ref["logits"]) < 1e-5
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["Phi3ForCausalLM"], "phi3")
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert (cfg["head_dim"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (16, 2, False)
    assert cfg["pad_token_id"] is None          # Phi3Config's default 32000 would be outside this vocab
    model = _load_hf(out)
    assert type(model).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL


def test_hf_partial_rotary_factor_is_what_runs(tmp_path):
    """The same weights with the whole head rotating (what Llama would do) are measurably wrong."""
    d = megatron_checkpoint("phi3")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"]["partial_rotary_factor"] = cfg["partial_rotary_factor"] = 1.0
    (out / "config.json").write_text(json.dumps(cfg))
    with torch.no_grad():
        assert err(_load_hf(out)(ref["tokens"]).logits, ref["logits"]) > 1e-3


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_onnx_phi3_prefill_and_decode_match_megatron(tmp_path, profile):
    d = megatron_checkpoint("phi3")
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < TOL


@pytest.mark.parametrize("tp,fmt", SAVES)
def test_trtllm_phi3_class_read_back(tmp_path, tp, fmt):
    d = megatron_checkpoint("phi3", tp=tp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, build="never"))
    cfg, t = trtllm_reader.read_checkpoint(str(out))          # config checks, shapes, TP merge, names
    assert (cfg["architecture"], cfg["hidden_act"], cfg["rotary_pct"], cfg["position_embedding_type"]) == \
        ("Phi3ForCausalLM", "swiglu", 0.5, "rope_gpt_neox")
    assert not any(k.endswith("bias") or k.endswith("mlp.gate.weight") for k in t)
    src = lift(d / "ckpt")
    mlp = next(src.graph.find("mlp"))                          # fc = [up; gate] (silu of the second half)
    assert torch.equal(t[f"transformer.layers.{mlp.layer}.mlp.fc.weight"],
                       torch.cat([mlp.params["up"].source.materialize(), mlp.params["gate"].source.materialize()]))
    theirs = trtllm_reader.logits(str(out), ref["tokens"])
    assert err(theirs, ref["logits"]) < TOL
    from mexc.frontends.trtllm import lift_trtllm

    ours = lift_trtllm(out)                                       # mexc's reader, as verify runs it
    assert err(run(ours, ref["tokens"]), theirs) < 1e-5


def test_trtllm_reader_honours_rotary_pct(tmp_path):
    """The reader's partial rotary is what runs: the checkpoint read as full rotary is measurably wrong."""
    d = megatron_checkpoint("phi3")
    ref = load_reference(d)
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", build="never"))
    cfg = json.loads((out / "config.json").read_text())
    cfg["rotary_pct"] = 1.0
    (out / "config.json").write_text(json.dumps(cfg))
    assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) > 1e-3


def test_verify_passes_on_phi3_trtllm_and_fails_when_corrupted(tmp_path, capsys):
    from test_trtllm_backend import corrupt_scale

    d = megatron_checkpoint("phi3")
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=2, build="never"))
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0
    assert "OK" in capsys.readouterr().out
    corrupt_scale(out, "rank1.safetensors", "transformer.layers.1.mlp.fc.weight", 3.0)
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 1
    assert "FAIL" in capsys.readouterr().out


def _trt_check(m):
    return get_backend("trtllm").check(m, CompileOptions(target="trtllm"))


def _hf_classify(m):
    """(family, refusals) as the hf target sees the model (the lifted fused QKV is split by its legalization)."""
    family, problems = families.classify(m)
    return family, [p for p in problems if "fused QKV must be split" not in p]


def test_full_rotary_llama_stays_llama_and_biased_partial_is_refused():
    m = lift(megatron_checkpoint("llama") / "ckpt")
    assert _hf_classify(m) == ("llama", [])
    from mexc.backends.trtllm import _arch

    assert _arch(m) == ("LlamaForCausalLM", [])
    m = lift(megatron_checkpoint("qwen") / "ckpt")               # q/k/v bias + partial rotary: no exact class
    family, problems = _hf_classify(m)
    assert family != "phi3" and any("partial rotary" in p and "Phi3ForCausalLM" in p for p in problems)
    assert any("partial rotary" in p for p in _trt_check(m))


def test_phi3_refusals_name_the_class_and_reason():
    m = lift(megatron_checkpoint("phi3") / "ckpt")
    assert _hf_classify(m) == ("phi3", []) and not _trt_check(m)
    for a in m.graph.find("attention"):
        a.attrs["rope"] = dataclasses.replace(a.attrs["rope"], scaling="linear", factor=2.0)
    family, problems = _hf_classify(m)
    assert family == "phi3" and any("'linear'" in p and "Phi3ForCausalLM" in p for p in problems)
    assert any("'linear'" in p and "Phi3ForCausalLM" in p for p in _trt_check(m))
