"""gpt-oss's parts as IR features (issue 17), each from a real megatron-core 0.16.1 checkpoint:

* attention sinks (fixture kinds ``sinks`` and ``sinks-window``: ``softmax_type="learnable"``, a learned logit per
  head in the softmax denominator, megatron-core ``SoftmaxOne``; ``sinks-window`` alternates windowed and full
  layers as gpt-oss does, ``window_attn_skip_freq=2``). The reference interpreter (TP 1 and 2, torch and
  torch_dist), transformers' GraniteSWAForCausalLM (the dense class with sinks) and onnxruntime (both profiles,
  prefill and KV-cache decode across the window) reproduce megatron-core's logits within 1e-4 in fp32; trtllm
  refuses in one line. ``sinks-off-by-one``: ``softmax_type="off-by-one"``, a constant 0 logit.
* the clamped GLU (``glu-oai``: ``quick_geglu``, ``glu_linear_offset=1``, ``activation_func_clamp_value``, biases):
  interpreter and onnxruntime; hf (no dense class) and trtllm refuse in one line.
* gpt-oss itself (``gpt-oss``: the above + YaRN + MoE top-k-then-softmax with router and expert biases; TP 1
  and 2, legacy and torch_dist): interpreter, transformers' GptOssForCausalLM and onnxruntime within 1e-4;
  trtllm refuses in one line.

Oracle: megatron-core's logits (the fixture's ``reference.pt``), never mexc itself.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import BackendError, CheckpointError
from mexc.frontends.megatron.config import from_args
from mexc.frontends.megatron.reader import open_checkpoint

TOL = 1e-4


# ------------------------------------------------------------------------------------------ attention sinks
@pytest.mark.parametrize("tp,fmt", [(1, "torch"), (2, "torch"), (2, "torch_dist")])
def test_sinks_reference_interpreter_matches_megatron(tp, fmt):
    d = megatron_checkpoint("sinks", tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    attns = list(m.graph.find("attention"))
    assert all(a.attrs["sinks"] and a.params["sinks"].type.shape == (4,) for a in attns)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    if tp == 2:   # the sinks split by heads with q/k/v, each simulated rank using its own heads' sinks
        from mexc.passes import PassManager, parse_pipeline
        sharded = lift(d / "ckpt")
        PassManager(parse_pipeline("reshard{tp=2}"))(sharded)
        sh = next(sharded.graph.find("attention")).params["sinks"].sharding
        assert (sh.dim, sh.parts) == (0, 2)
        assert err(run(sharded, ref["tokens"]), ref["logits"]) < 1e-5
    sinks = attns[1].params["sinks"].source.materialize()
    assert sinks.std() > 0.3     # the fixture's sinks differ per head: a swapped or lost sink shows
    for a in attns:              # without the sinks the logits move far beyond the tolerance
        a.attrs["sinks"] = False
        del a.params["sinks"]
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-2


@pytest.mark.parametrize("kind", ["sinks", "sinks-window"])
@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_sinks_onnx_prefill_and_decode_match_megatron(tmp_path, kind, profile):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    decoded = onnx_errors(out / "model.onnx", ref, prefix=3, whole=True)   # decode steps cross the 3-key window
    assert decoded.worst < TOL
    assert decoded.past["past_key_values.0.key"].shape[2] == ref["tokens"].shape[1]   # the sink is no cached key


def test_sinks_onnx_graph_form(tmp_path):
    import onnx

    for profile in ("ort", "tensorrt"):
        out = tmp_path / profile
        compile_checkpoint(megatron_checkpoint("sinks") / "ckpt", out,
                           CompileOptions(target="onnx", profile=profile, build="never"))
        g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        if profile == "ort":
            gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
            assert len(gqa) == 2 and all(len(n.input) == 12 and n.input[11].endswith("/sinks") for n in gqa)
        else:
            att = [n for n in g.node if n.op_type == "Attention"]
            assert len(att) == 2 and all("sink/Concat_mask" in n.input[3] for n in att)


def test_off_by_one_is_a_zero_sink():
    d = megatron_checkpoint("sinks-off-by-one")
    ref = load_reference(d)
    m = lift(d / "ckpt")
    for a in m.graph.find("attention"):
        assert a.attrs["sinks"] and torch.equal(a.params["sinks"].source.materialize(), torch.zeros(4))
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for a in m.graph.find("attention"):
        a.attrs["sinks"] = False
        del a.params["sinks"]
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-2


def test_learnable_without_the_tensor_is_one_error_line():
    from mexc.frontends.megatron.lift import _sinks

    d = megatron_checkpoint("llama")
    arch = from_args({**vars(open_checkpoint(d / "ckpt").args), "softmax_type": "learnable"}, "CKPT")
    with pytest.raises(CheckpointError, match="softmax_type is learnable but layer 0 has no") as e:
        _sinks({}, arch, 0, "CKPT")
    assert e.value.hint


@pytest.mark.parametrize("kind", ["sinks", "sinks-window", "sinks-off-by-one"])
def test_sinks_hf_granite_swa_matches_megatron(tmp_path, kind):
    import json

    pytest.importorskip("transformers")
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GraniteSWAForCausalLM"]
    assert cfg["layer_types"] == (["sliding_attention", "full_attention"] if kind == "sinks-window" else
                                  ["full_attention"] * 2)
    assert cfg["attention_multiplier"] == 0.25 and cfg["embedding_multiplier"] == cfg["residual_multiplier"] == 1
    if kind == "sinks-window":
        assert cfg["sliding_window"] == 4
    model = hf_model(out)
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL


def test_hf_refuses_sinks_on_some_layers_only():
    from mexc.backends.hf import families

    m = lift(megatron_checkpoint("sinks") / "ckpt")
    a = next(m.graph.find("attention"))
    a.attrs["sinks"] = False
    del a.params["sinks"]
    family, problems = families.classify(m)
    assert family == "granite_swa" and any("without sinks" in p for p in problems)


@pytest.mark.parametrize("target,words", [("trtllm", ["attention sinks"])])
def test_sinks_refused_in_one_line(tmp_path, target, words):
    import subprocess
    import sys

    ck = megatron_checkpoint("sinks") / "ckpt"
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "compile", str(ck), "--target", target, "-o",
                        str(tmp_path / "out"), "--build", "never"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1 and all(w in lines[0] for w in words), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    with pytest.raises(BackendError):
        compile_checkpoint(ck, tmp_path / "o2", CompileOptions(target=target, build="never"))


# ------------------------------------------------------------------------------------------ clamped GLU
@pytest.mark.parametrize("tp,fmt", [(1, "torch"), (2, "torch_dist")])
def test_clamped_glu_reference_interpreter_matches_megatron(tp, fmt):
    d = megatron_checkpoint("glu-oai", tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    mlps = list(m.graph.find("mlp"))
    assert all((a.attrs["activation"], a.attrs["gated"], a.attrs["glu_clamp"], a.attrs["glu_offset"]) ==
               ("quick-gelu", True, 0.5, 1.0) for a in mlps)
    assert {"gate_bias", "up_bias", "fc2_bias"} <= set(mlps[0].params)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for knob in (dict(glu_clamp=None), dict(glu_offset=0.0), dict(glu_clamp=0.6)):   # each knob matters
        saved = dict(mlps[0].attrs)
        for a in mlps:
            a.attrs.update(knob)
        assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-3, knob
        for a in mlps:
            a.attrs.update(saved)


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_clamped_glu_onnx_matches_megatron(tmp_path, profile):
    d = megatron_checkpoint("glu-oai")
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < TOL


@pytest.mark.parametrize("target,words", [("hf", "clamped / offset GLU"),
                                          ("trtllm", "no TensorRT-LLM class .* activation=\\['quick-gelu'\\]")])
def test_clamped_glu_refused_in_one_line(tmp_path, target, words):
    with pytest.raises(BackendError, match=words) as e:
        compile_checkpoint(megatron_checkpoint("glu-oai") / "ckpt", tmp_path / "o",
                           CompileOptions(target=target, build="never"))
    assert "\n" not in str(e.value).split("hint")[0].strip() and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ gpt-oss
def test_gpt_oss_reference_interpreter_matches_megatron():
    # TP 2: megatron-core takes MoE biases only with expert_tensor_parallel_size 1 (transformer_config.py)
    for tp, fmt in ((1, "torch"), (1, "torch_dist"), (2, "torch"), (2, "torch_dist")):
        d = megatron_checkpoint("gpt-oss", tp=tp, fmt=fmt)
        ref = load_reference(d)
        m = lift(d / "ckpt")
        moe = next(m.graph.find("moe"))
        assert {"router_bias", "gate_bias", "up_bias", "fc2_bias"} <= set(moe.params)
        assert [a.attrs["window"] for a in m.graph.find("attention")] == [3, None]   # window_attn_skip_freq=2
        assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    from mexc.passes import PassManager, parse_pipeline
    sharded = lift(d / "ckpt")
    PassManager(parse_pipeline("reshard{tp=2 ep=2}"))(sharded)    # expert biases split with their experts
    assert str(next(sharded.graph.find("moe")).params["fc2_bias"].sharding) == "split(dim=0,ep=2)"
    assert err(run(sharded, ref["tokens"]), ref["logits"]) < 1e-5
    for name in ("router_bias", "fc2_bias"):    # each expert bias matters
        saved = moe.params.pop(name)
        assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-4, name
        moe.params[name] = saved


def test_gpt_oss_hf_matches_megatron(tmp_path):
    import json

    pytest.importorskip("transformers")
    d = megatron_checkpoint("gpt-oss")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"]
    assert (cfg["layer_types"], cfg["sliding_window"], cfg["swiglu_limit"], cfg["attention_bias"],
            cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["rope_parameters"]["rope_type"]) == \
        (["sliding_attention", "full_attention"], 4, 0.5, True, 4, 2, "yarn")
    model = hf_model(out, "GptOssForCausalLM")
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL
        for t in range(5, ref["tokens"].shape[1] + 1):         # and each prefix (the window slides)
            assert err(model(ref["tokens"][:, :t]).logits, ref["logits"][:, :t]) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_gpt_oss_onnx_prefill_and_decode_match_megatron(tmp_path, profile):
    d = megatron_checkpoint("gpt-oss")
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=3, whole=True).worst < TOL


def test_gpt_oss_trtllm_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    ck = megatron_checkpoint("gpt-oss") / "ckpt"
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "compile", str(ck), "--target", "trtllm", "-o",
                        str(tmp_path / "out"), "--build", "never"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1 and "attention sinks" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_hf_refuses_what_gpt_oss_cannot_say():
    from mexc.backends.hf import families

    m = lift(megatron_checkpoint("gpt-oss") / "ckpt")
    for mo in m.graph.find("moe"):
        mo.attrs["glu_offset"] = 0.5
    family, problems = families.classify(m)
    assert family == "gpt_oss" and any("up + 1" in p for p in problems)
