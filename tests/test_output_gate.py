"""The attention output gate (issue 17's ``attention_output_gate`` row, Qwen3-Next's full-attention layers) from
real megatron-core checkpoints, honoured by hf and onnx and refused in one line by trtllm.

Oracle: megatron-core 0.16.1's own logits (tests/fixture_makers/megatron_core.py, local layer spec on CPU). With
``attention_output_gate`` its ``linear_qkv`` emits per query group ``[q, gate, k, v]`` and the core attention
output is multiplied by ``sigmoid(gate)`` per head and channel before ``linear_proj``
(``SelfAttention.get_query_key_value_tensors`` / ``_apply_output_gate``, megatron/core/transformer/attention.py).

* ``output-gate``: the gate with RMSNorm q/k norms (``qk_layernorm``, eps 1e-6), GQA 4/2, SwiGLU, untied: what
  transformers' Qwen3NextForCausalLM computes with every layer full attention (its q_proj emits ``[q_h; gate_h]``
  per head; its norms compute with ``1 + w``);
* ``output-gate-plain``: the gate without q/k norms: Qwen3NextAttention always normalizes q and k, so the hf
  target refuses it in one line; the interpreter and onnx honour it;
* ``output-gate-bias``: ``output-gate`` with ``add_qkv_bias`` (the gate rows' biases split off with them), saved
  at tp 2 (legacy): Qwen3NextForCausalLM with ``attention_bias``.

Decode steps: the fixture's logits are causal, so the logits of token t decoded through the KV cache equal
megatron-core's prefill logits at t."""

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
PREFIX = 2          # tokens prefilled before the one-token decode steps


@pytest.mark.parametrize("kind,tp,fmt", [("output-gate", 1, "torch"), ("output-gate", 2, "torch_dist"),
                                         ("output-gate-plain", 1, "torch"), ("output-gate-bias", 2, "torch")])
def test_lift_and_interpreter_follow_megatron_core(kind, tp, fmt):
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    attns = list(m.graph.find("attention"))
    assert all(a.attrs["output_gate"] for a in attns)
    assert {tuple(a.params["gate"].type.shape) for a in attns} == {(4 * 16, 64)}   # heads x head_dim, hidden
    assert {tuple(a.params["qkv"].type.shape) for a in attns} == {((4 + 2 * 2) * 16, 64)}
    assert all(("gate_bias" in a.params) == (kind == "output-gate-bias") for a in attns)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for a in attns:              # the fixture exercises the gate: without it, other logits
        a.attrs["output_gate"] = False
        del a.params["gate"]
        a.params.pop("gate_bias", None)
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-2


@pytest.mark.parametrize("pipeline", ["reshard{tp=2}", "relayout-qkv{to=concat},reshard{tp=4}", "split-qkv"])
def test_gate_follows_the_query_heads_through_resharding(pipeline):
    """The gate is column-parallel with the query heads: each simulated rank gates its own heads (tp=4 > 2 KV
    groups replicates K/V, not the gate)."""
    d = megatron_checkpoint("output-gate")
    ref = load_reference(d)
    m = lift(d / "ckpt")
    PassManager(parse_pipeline(pipeline))(m)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


def test_attention_output_gate_argument_is_read():
    args = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128, swiglu=True,
                normalization="RMSNorm", position_embedding_type="rope")
    assert from_args(dict(args, attention_output_gate=True), "CKPT").output_gate
    assert not from_args(args, "CKPT").output_gate


@pytest.mark.parametrize("kind,tp,fmt", [("output-gate", 1, "torch"), ("output-gate", 2, "torch_dist"),
                                         ("output-gate-bias", 2, "torch")])
def test_hf_qwen3_next_reproduces_megatron_prefill_and_cached_decode(tmp_path, kind, tp, fmt):
    """bias: Megatron's add_qkv_bias gives q, gate, k and v biases (no o_proj bias: written as zeros)."""
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["Qwen3NextForCausalLM"], "qwen3_next")
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["num_experts"] == 0
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert cfg["attention_bias"] == (kind == "output-gate-bias")
    model = hf_model(out, "Qwen3NextForCausalLM")
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL
    assert max(hf_cached_errors(model, ref, prefix=PREFIX)) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind,tp", [("output-gate", 1), ("output-gate-plain", 1), ("output-gate-bias", 2)])
def test_onnx_prefill_and_decode_match_megatron(tmp_path, kind, tp, profile):
    d = megatron_checkpoint(kind, tp=tp)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=PREFIX, whole=True).worst < TOL


def test_refusals_are_one_line_each(tmp_path):
    """hf: the gate without q/k RMSNorm (Qwen3NextAttention always normalizes); a gated model no other hf class
    takes; trtllm: no TensorRT-LLM <= 1.2 checkpoint class has the gate. Nothing is left behind."""
    from mexc.backends.hf import families
    from mexc.driver import get_backend

    plain = megatron_checkpoint("output-gate-plain")
    with pytest.raises(BackendError) as e:
        compile_checkpoint(plain / "ckpt", tmp_path / "hf", CompileOptions(target="hf"))
    assert "without RMSNorm q/k norms" in e.value.message and "Qwen3NextForCausalLM" in e.value.message
    assert not (tmp_path / "hf").exists()
    assert "; " not in e.value.message.split("cannot lower this model: ", 1)[1]   # one refusal
    m = lift(megatron_checkpoint("output-gate") / "ckpt")
    PassManager(parse_pipeline("split-qkv"))(m)
    assert families.classify(m) == ("qwen3_next", [])
    for a in m.graph.find("attention"):
        a.attrs["window"] = 3
    family, problems = families.classify(m)
    assert family == "qwen3_next" and len(problems) == 1 and "sliding-window" in problems[0]
    problems = get_backend("trtllm").check(lift(megatron_checkpoint("output-gate") / "ckpt"),
                                           CompileOptions(target="trtllm"))
    assert len(problems) == 1 and "attention_output_gate" in problems[0] and "TensorRT-LLM" in problems[0]
