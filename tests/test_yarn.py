"""YaRN RoPE scaling on a Llama-style GPTModel (issue 17) from a real megatron-core checkpoint (fixture kind
``yarn``: position_embedding_type yarn, factor 4 over 256 original positions, beta_fast 16, mscale 1 /
mscale_all_dim 0.5, as Megatron-LM 0.19 saves it). The reference interpreter, transformers' LlamaForCausalLM
with ``rope_type: yarn`` (the cos/sin factor written as computed: ``attention_factor``) and onnxruntime (both
profiles, prefill and decode) reproduce megatron-core's logits within 1e-4 in fp32. trtllm writes TensorRT-LLM's
LLaMA ``rotary_scaling: {type: yarn}`` with the cos/sin factor folded into ``attention_multiplier`` (its v1 rope
kernel drops a table-only factor), read back by the test-side reader and by mexc's own within 1e-4."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import ConfigError
from mexc.frontends.megatron.config import from_args
from mexc.frontends.megatron.reader import open_checkpoint

TOL = 1e-4
FACTOR = (0.1 * math.log(4.0) + 1) / (0.05 * math.log(4.0) + 1)   # get_mscale(4, 1) / get_mscale(4, 0.5)


@pytest.mark.parametrize("tp", [1, 2])
def test_reference_interpreter_matches_megatron(tp):
    d = megatron_checkpoint("yarn", tp=tp)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    rope = next(m.graph.find("attention")).attrs["rope"]
    assert (rope.scaling, rope.factor, rope.original_max_positions, rope.beta_fast, rope.beta_slow, rope.mscale,
            rope.mscale_all_dim, rope.truncate) == ("yarn", 4.0, 256, 16.0, 1.0, 1.0, 0.5, True)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for knob in (dict(scaling="none"), dict(mscale_all_dim=0.0), dict(beta_slow=2.0)):  # each knob matters
        for a in m.graph.find("attention"):
            a.attrs["rope"] = dataclasses.replace(rope, **knob)
        assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-4, knob


def test_hf_llama_yarn_matches_megatron(tmp_path):
    d = megatron_checkpoint("yarn")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    rp = cfg["rope_parameters"]
    assert cfg["architectures"] == ["LlamaForCausalLM"] and rp["rope_type"] == "yarn"
    assert (rp["factor"], rp["original_max_position_embeddings"], rp["beta_fast"], rp["truncate"]) == \
        (4.0, 256, 16.0, True)
    assert math.isclose(rp["attention_factor"], FACTOR, rel_tol=1e-12)
    assert cfg["max_position_embeddings"] == 256 * 4        # the extended context (transformers warns below it)
    model = hf_model(out)
    assert math.isclose(model.model.rotary_emb.attention_scaling, FACTOR, rel_tol=1e-9)
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_onnx_prefill_and_decode_match_megatron(tmp_path, profile):
    d = megatron_checkpoint("yarn")
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < TOL


@pytest.mark.parametrize("tp", [1, 2])
def test_trtllm_llama_yarn_read_back(tmp_path, tp):
    import trtllm_reader
    from mexc.frontends.trtllm import lift_trtllm

    d = megatron_checkpoint("yarn", tp=tp)
    ref = load_reference(d)
    out = tmp_path / "trt"
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, build="never"))
    assert any("attention_multiplier" in n and f"{FACTOR:.6g}" in n for n in res.emit.notes), res.emit.notes
    cfg, _ = trtllm_reader.read_checkpoint(str(out))
    assert cfg["architecture"] == "LlamaForCausalLM" and cfg["position_embedding_type"] == "rope_gpt_neox"
    assert cfg["rotary_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
                                     "beta_fast": 16.0, "beta_slow": 1.0, "mscale": 0.0, "mscale_all_dim": 0.0}
    assert cfg["attention_multiplier"] == pytest.approx(FACTOR ** 2)
    theirs = trtllm_reader.logits(str(out), ref["tokens"])
    assert err(theirs, ref["logits"]) < TOL
    assert err(run(lift_trtllm(out), ref["tokens"]), ref["logits"]) < TOL      # mexc's reader (verify)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("attention_multiplier")                                             # the folded factor is what runs
    (out / "config.json").write_text(json.dumps(cfg))
    assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) > 3 * TOL   # 5.6e-4 measured


def test_trtllm_reader_flags_a_table_only_yarn_factor(tmp_path):
    """The factor in rotary_scaling (mscale != mscale_all_dim) reaches only TensorRT-LLM's v2 rope kernel: a
    checkpoint that relies on it is flagged by the reader; mexc never writes one."""
    import trtllm_reader

    out = tmp_path / "trt"
    compile_checkpoint(megatron_checkpoint("yarn") / "ckpt", out, CompileOptions(target="trtllm", build="never"))
    cfg = json.loads((out / "config.json").read_text())
    assert not trtllm_reader.check_config(cfg)
    cfg["rotary_scaling"].update(mscale=1.0, mscale_all_dim=0.5)
    assert any("v1" in p and "yarn" in p for p in trtllm_reader.check_config(cfg))


def test_trtllm_refuses_yarn_without_a_rounded_correction_range(tmp_path):
    from mexc.driver import get_backend

    m = lift(megatron_checkpoint("yarn") / "ckpt")
    for a in m.graph.find("attention"):
        a.attrs["rope"] = dataclasses.replace(a.attrs["rope"], truncate=False)
    problems = get_backend("trtllm").check(m, CompileOptions(target="trtllm"))
    assert any("correction range" in p and "floors / ceils" in p for p in problems), problems


@pytest.mark.parametrize("name,value,words", [
    ("rotary_percent", 0.5, ["rotary_percent=0.5", "ignores"]),
    ("rotary_interleaved", True, ["interleaved"]),
])
def test_lift_refuses_what_megatron_yarn_does_not_compute(name, value, words):
    args = {**vars(open_checkpoint(megatron_checkpoint("yarn") / "ckpt").args), name: value}
    with pytest.raises(ConfigError) as e:
        from_args(args, "CKPT")
    assert all(w in str(e.value) for w in words) and e.value.hint


def test_yarn_defaults_are_megatron_cores():
    args = {**vars(open_checkpoint(megatron_checkpoint("yarn") / "ckpt").args), "yarn_beta_fast": None,
            "yarn_original_max_position_embeddings": None, "mscale_all_dim": None}
    rope = from_args(args, "CKPT").rope      # YarnRotaryEmbedding's defaults: 4096 positions, beta 32, all_dim 0
    assert (rope.original_max_positions, rope.beta_fast, rope.mscale_all_dim) == (4096, 32.0, 0.0)
