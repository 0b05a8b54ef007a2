"""Sliding-window attention (issue 17's window rows) from real megatron-core checkpoints, honoured by every
target that can carry it and refused in one line by the one that cannot.

Oracle: megatron-core 0.16.1's own logits (tests/fixture_makers/megatron_core.py, local layer spec on CPU). Its
``DotProductAttention`` does implement the window: ``is_layer_window_attention(window_size,
window_attn_skip_freq, layer_number)`` picks the windowed layers and ``FusedScaleMaskSoftmax
.forward_torch_softmax`` replaces the causal mask by ``get_sliding_window_causal_mask`` (query i sees keys
i-L..i for ``window_size=(L, 0)``; megatron/core/transformer/{dot_product_attention,utils}.py,
megatron/core/fusions/fused_softmax.py). Each fixture has 8 tokens, more than its window holds:

* ``window``: ``window_size=(3, 0)`` on both layers (MistralForCausalLM, ``sliding_window=4``);
* ``swa``: the same window with ``window_attn_skip_freq=2``: layer 1 windowed, layer 2 full (Ministral);
* ``window-list``: ``window_size=(2, 0)``, ``window_attn_skip_freq=[0, 1]``: layer 1 full, layer 2 windowed;
* ``window-moe``: Mixtral-style MoE (4 experts, top-2) with ``window_size=(3, 0)`` on both layers (Mixtral).

Decode steps: the fixture's logits are causal, so the logits of token t decoded through the KV cache must equal
megatron-core's prefill logits at t; decoding from t=2 to 7 crosses every window (keys t-L..t)."""

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
from mexc.errors import ConfigError
from mexc.frontends.megatron.config import from_args
from mexc.frontends.megatron.config_features import layer_window

TOL = 1e-4
KINDS = {"window": ("MistralForCausalLM", [3, 3]), "swa": ("MinistralForCausalLM", [3, None]),
         "window-list": ("MinistralForCausalLM", [None, 2]), "window-moe": ("MixtralForCausalLM", [3, 3])}
PREFIX = 2          # tokens prefilled before the one-token decode steps


@pytest.mark.parametrize("kind,fmt,pp", [("window", "torch", 1), ("window", "torch_dist", 1), ("swa", "torch", 1),
                                         ("swa", "torch_dist", 2), ("window-list", "torch", 1),
                                         ("window-moe", "torch", 1)])
def test_lift_and_interpreter_follow_megatron_core(kind, fmt, pp):
    """pp=2: megatron-core numbers layers globally (layer 2 is stage 1's first), and so does the lift."""
    d = megatron_checkpoint(kind, pp=pp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    assert [a.attrs["window"] for a in m.graph.find("attention")] == KINDS[kind][1]
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    for a in m.graph.find("attention"):          # the fixture exercises the window: without it, other logits
        a.attrs["window"] = None
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-2


@pytest.mark.parametrize("skip", [None, 1, 2, 3, [1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]])
def test_windowed_layers_are_megatron_cores_choice(skip):
    """The lift's per-layer choice against megatron-core's own ``is_layer_window_attention`` (1-based layers)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    args = _args(window_size=(5, 0), window_attn_skip_freq=skip)
    arch = from_args(args, "CKPT")
    want = [5 if is_layer_window_attention((5, 0), skip, n + 1) else None for n in range(6)]
    assert [layer_window(arch, i) for i in range(6)] == want


@pytest.mark.parametrize("value", [(4, 1), (-1, 0), (4, -1), "four", (4,)])
def test_windows_mexc_cannot_express_are_refused_by_name(value):
    with pytest.raises(ConfigError, match=r"window_size=.*\(L, 0\)"):
        from_args(_args(window_size=value), "CKPT")


def test_window_overrides_are_checked():
    arch = from_args(_args(), "CKPT", {"window_size": [7, 0], "window_skip": 2})
    assert [layer_window(arch, i) for i in range(6)] == [7, None, 7, None, 7, None]
    with pytest.raises(ConfigError, match="override window_size"):
        from_args(_args(), "CKPT", {"window_size": [7, 3]})


def _args(**kw) -> dict:
    return dict(num_layers=6, hidden_size=64, num_attention_heads=4, padded_vocab_size=128, swiglu=True,
                normalization="RMSNorm", position_embedding_type="rope", **kw)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_class_reproduces_megatron_prefill_and_cached_decode(tmp_path, kind):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    arch, windows = KINDS[kind]
    w = next(x for x in windows if x is not None)
    assert cfg["architectures"] == [arch] and cfg["sliding_window"] == w + 1   # transformers counts the query
    if arch == "MinistralForCausalLM":
        assert cfg["layer_types"] == ["full_attention" if x is None else "sliding_attention" for x in windows]
    model = hf_model(out, arch)
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL
    assert max(hf_cached_errors(model, ref, prefix=PREFIX)) < TOL     # transformers' own (sliding) KV cache


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_onnx_prefill_and_decode_across_the_window_match_megatron(tmp_path, kind, profile):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert any("microsoft/onnxruntime#25927" in n for n in res.emit.notes) == (profile == "ort")
    decoded = onnx_errors(out / "model.onnx", ref, prefix=PREFIX, whole=True)
    assert decoded.worst < TOL
    assert decoded.past["past_key_values.0.key"].shape[2] == ref["tokens"].shape[1]   # every key kept: the mask cuts


def test_onnx_graph_carries_each_layers_window(tmp_path):
    import onnx

    for profile in ("ort", "tensorrt"):
        out = tmp_path / profile
        compile_checkpoint(megatron_checkpoint("swa") / "ckpt", out,
                           CompileOptions(target="onnx", profile=profile, build="never"))
        g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        if profile == "ort":
            gqa = [n for n in g.node if n.op_type == "GroupQueryAttention"]
            lws = [{a.name: a.i for a in n.attribute}.get("local_window_size") for n in gqa]
            assert lws == [4, None]
        else:
            masks = [n.input[3] for n in g.node if n.op_type == "Attention"]
            assert masks[0] != masks[1] and "window3" in masks[0]


def test_trtllm_refuses_in_one_line(tmp_path):
    import subprocess
    import sys

    ck = megatron_checkpoint("swa") / "ckpt"
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "compile", str(ck), "--target", "trtllm", "-o",
                        str(tmp_path / "out"), "--build", "never"], capture_output=True, text=True)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "hint:"))]
    assert r.returncode != 0 and len(lines) == 2 and lines[0].startswith("error:"), r.stderr
    assert "sliding-window attention (layer 0: keys i-3..i; 1 of 2 layers windowed)" in lines[0]
    assert "max_attention_window_size" in lines[0] and "--target hf" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_hf_refuses_what_mistral_and_ministral_cannot_say():
    from mexc.backends.hf import families

    m = lift(megatron_checkpoint("window") / "ckpt")
    a0, a1 = m.graph.find("attention")
    a1.attrs["window"] = 2
    family, problems = families.classify(m)
    assert family == "mistral" and any("different sliding windows [2, 3]" in p for p in problems)
    a0.attrs["window"] = a1.attrs["window"] = None
    assert families.classify(m)[0] == "llama"          # no window: Llama again
    m = lift(megatron_checkpoint("window-moe") / "ckpt")
    next(m.graph.find("attention")).attrs["window"] = None
    family, problems = families.classify(m)
    assert family == "mixtral" and any("different sliding windows (3, None)" in p and "MixtralForCausalLM" in p
                                       for p in problems), problems
    m = lift(megatron_checkpoint("qwen3") / "ckpt")    # QK norm + window: no class in mexc has both
    next(m.graph.find("attention")).attrs["window"] = 3
    family, problems = families.classify(m)
    assert family == "qwen3" and any("sliding-window attention (node" in p and "Qwen3ForCausalLM" in p
                                     for p in problems), problems


def test_nemo2_config_window_is_lifted(tmp_path):
    """A NeMo 2 checkpoint (megatron-core TransformerConfig fields in context/model.yaml) with the swa fixture's
    window_size / window_attn_skip_freq: the fixtures share their weights (same seed and shapes), so the lift must
    reproduce megatron-core's swa logits."""
    import yaml
    import wrapper_fixtures as W

    root, _ = W.nemo2_dir("llama", tmp_path / "n2")
    p = root / "context" / "model.yaml"
    cfg = yaml.safe_load(p.read_text())
    cfg["config"].update(window_size=[3, 0], window_attn_skip_freq=2)
    p.write_text(yaml.safe_dump(cfg))
    m = lift(root)
    assert [a.attrs["window"] for a in m.graph.find("attention")] == [3, None]
    ref = load_reference(megatron_checkpoint("swa"))
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


@pytest.mark.parametrize("target", ["hf", "onnx"])
def test_verify_passes_on_windowed_outputs(tmp_path, target, capsys):
    from mexc.tools.cli import main

    ck = megatron_checkpoint("swa") / "ckpt"
    compile_checkpoint(ck, tmp_path / target, CompileOptions(target=target, build="never"))
    assert main(["verify", str(tmp_path / target), "--against", str(ck)]) == 0
    assert "OK" in capsys.readouterr().out


def test_onnxruntime_genai_greedy_past_the_window(tmp_path):
    """onnxruntime-genai's own decode loop (its KV-cache buffers) on the ort output: the greedy tokens of the
    reference interpreter (full recompute each step, equal to megatron-core on prefill) for 12 tokens past a
    2-token prompt, far beyond the 4-key window."""
    og = pytest.importorskip("onnxruntime_genai")
    ck = megatron_checkpoint("swa") / "ckpt"
    out = tmp_path / "onnx"
    compile_checkpoint(ck, out, CompileOptions(target="onnx", profile="ort", build="never"))
    model = lift(ck)
    seq = load_reference(ck.parent)["tokens"][:1, :2]
    new = 12
    for _ in range(new):
        seq = torch.cat([seq, run(model, seq)[:, -1, :100].argmax(-1, keepdim=True)], 1)
    m = og.Model(str(out))
    params = og.GeneratorParams(m)
    params.set_search_options(do_sample=False, max_length=2 + new)
    gen = og.Generator(m, params)
    gen.append_tokens(seq[0, :2].tolist())
    while not gen.is_done():
        gen.generate_next_token()
    got, want = list(gen.get_sequence(0)), seq[0].tolist()
    eos = json.loads((out / "genai_config.json").read_text())["model"].get("eos_token_id")   # none: no tokenizer
    assert got[: len(want)] == want[: len(got)] and (len(got) == len(want) or got[-1] == eos), (got, want)
    assert len(got) > 5, got          # the run went past the window
