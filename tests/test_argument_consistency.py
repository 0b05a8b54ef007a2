"""Saved (or --set) arguments against the tensors and against megatron-core's own reading of them (QA findings,
session 5): never silently wrong.

* ``moe_ffn_hidden_size`` that contradicts the experts' ``linear_fc2`` (all TP / ETP shards merged) is refused in
  one line, as ``num_experts`` already is.
* ``moe_layer_freq`` expanded as megatron-core 0.16.1 does (``models/gpt/gpt_layer_specs.py``
  ``get_gpt_decoder_layer_specs``: that function is the oracle here) must give the layers that have a router.
* ``moe_router_topk_limited_devices`` (device-limited routing: a pre-0.11 development build's max-per-rank
  selection, group-limited top-k over EP groups from 0.11 on; the saved args cannot tell which) is refused.
* An odd rotary dimension (``rotary_percent`` 0.3125 of kv_channels 16: ``int`` 5): megatron-core rotates 6
  channels (3 frequencies over 5). Fixture kind phi3-odd-rotary from real megatron-core: mexc's interpreter,
  transformers' Phi3ForCausalLM and onnxruntime reproduce its logits; TensorRT-LLM (rotary_embedding_dim 5) and
  StableLM (``rotary_ndims`` 5) are refused in one line.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings

import pytest
import torch
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="needs megatron-core for the fixtures")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.backends.hf import families  # noqa: E402
from mexc.backends.reference.executor import run  # noqa: E402
from mexc.driver import compile_checkpoint, get_backend, lift  # noqa: E402
from mexc.frontends.megatron.config_features import moe_layer_pattern  # noqa: E402
from mexc.tools.cli import main  # noqa: E402


def _with_args(tmp_path, kind: str, **args):
    """The legacy TP1 fixture ``kind`` with saved args replaced (the tensors unchanged)."""
    dst = tmp_path / "ckpt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(megatron_checkpoint(kind) / "ckpt", dst)
    for f in dst.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(f, weights_only=False)
        for k, v in args.items():
            setattr(sd["args"], k, v)
        torch.save(sd, f)
    return dst


def _refused(capsys, argv, out, *words):
    capsys.readouterr()
    assert main(argv) != 0 and not out.exists()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and all(w in lines[0] for w in words), lines
    return lines[0]


# ------------------------------------------------------------------------------------------ moe_ffn_hidden_size
def test_set_moe_ffn_hidden_size_that_contradicts_the_experts_is_refused(tmp_path, capsys):
    ckpt = megatron_checkpoint("deepseek-v3") / "ckpt"       # experts' linear_fc2 is [64, 32]: size 32
    out = tmp_path / "hf"
    _refused(capsys, ["compile", str(ckpt), "--target", "hf", "--set", "moe_ffn_hidden_size=16", "-o", str(out),
                      "--quiet"], out, "moe_ffn_hidden_size=16", "linear_fc2")


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_moe_ffn_hidden_size_is_checked_after_the_tp_merge(tmp_path, capsys, tp):
    """The moe fixture's experts are 64 wide in all (32 per rank at tp 2): the saved 64 lifts at both tp, a saved
    32 (the per-rank size) is refused."""
    d = megatron_checkpoint("moe", tp=tp)
    assert {n.params["fc2"].type.shape[-1] for n in lift(d / "ckpt").graph.find("moe")} == {64}
    with pytest.raises(Exception, match="moe_ffn_hidden_size=32"):
        lift(d / "ckpt", overrides={"moe_ffn_hidden_size": 32})


# ------------------------------------------------------------------------------------------------ moe_layer_freq
def _megatron_pattern(freq, num_layers: int) -> tuple[int, ...]:
    """Which layers megatron-core 0.16.1 builds as MoE for ``moe_layer_freq`` (its own spec function)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_moe_experts=4,
                            moe_layer_freq=freq, moe_ffn_hidden_size=32, moe_router_pre_softmax=True)
    specs = get_gpt_decoder_layer_specs(cfg, use_transformer_engine=False)
    return tuple(int("MoE" in s.submodules.mlp.module.__name__) for s in specs)


@pytest.mark.parametrize("freq", [1, 2, 3, [0, 1, 1, 0, 1, 1], [1, 0, 0, 0, 0, 0]])
def test_moe_layer_freq_expands_as_megatron_core(freq):
    assert moe_layer_pattern(freq, 6, "args") == _megatron_pattern(freq, 6)


def test_moe_layer_freq_text_forms():
    assert moe_layer_pattern("([0]*1+[1]*2)", 3, "a") == (0, 1, 1)
    assert moe_layer_pattern("([1]*2+[0]*1)*2", 6, "a") == (1, 1, 0, 1, 1, 0)
    assert moe_layer_pattern("2", 3, "a") == (1, 0, 1)
    for bad in ("__import__('os')", "[2, 1, 1]", "[1]*99999999", "0", [0, 1]):
        with pytest.raises(Exception, match="moe_layer_freq"):
            moe_layer_pattern(bad, 3, "a")


@pytest.mark.parametrize("freq", [[0, 0, 1], [1, 1, 1], 2, None, 1])
def test_moe_layer_freq_that_contradicts_the_routers_is_refused(tmp_path, capsys, freq):
    """deepseek-v3: layer 0 dense, layers 1-2 MoE ([0, 1, 1])."""
    ckpt = _with_args(tmp_path, "deepseek-v3", moe_layer_freq=freq)
    out = tmp_path / "hf"
    _refused(capsys, ["compile", str(ckpt), "--target", "hf", "-o", str(out), "--quiet"], out, "moe_layer_freq")


def test_moe_layer_freq_text_that_agrees_lifts(tmp_path):
    ckpt = _with_args(tmp_path, "deepseek-v3", moe_layer_freq="([0]*1+[1]*2)")
    assert sorted(n.layer for n in lift(ckpt).graph.find("moe")) == [1, 2]
    ckpt = _with_args(tmp_path / "none", "deepseek-v3", moe_layer_freq=None)   # refused; --set fixes it
    assert sorted(n.layer for n in lift(ckpt, overrides={"moe_layer_freq": [0, 1, 1]}).graph.find("moe")) == [1, 2]


# ------------------------------------------------------------------------------ moe_router_topk_limited_devices
def test_topk_limited_devices_is_refused_in_one_line(tmp_path, capsys):
    ckpt = _with_args(tmp_path, "moe", moe_router_topk_limited_devices=1)
    out = tmp_path / "hf"
    _refused(capsys, ["compile", str(ckpt), "--target", "hf", "-o", str(out), "--quiet"], out,
             "moe_router_topk_limited_devices=1")
    from mexc.frontends.megatron import arguments

    assert arguments.lookup("moe_router_topk_limited_devices").verdict == arguments.REFUSED


@pytest.mark.parametrize("value", [None, 0])
def test_topk_limited_devices_unset_lifts(tmp_path, value):
    assert lift(_with_args(tmp_path, "moe", moe_router_topk_limited_devices=value)).graph.find("moe")


# ------------------------------------------------------------------------------------------ odd rotary dimension
def test_odd_rotary_interpreter_and_hf_match_megatron(tmp_path):
    d = megatron_checkpoint("phi3-odd-rotary")
    ref = load_reference(d)
    src = lift(d / "ckpt")
    rope = next(iter(src.graph.find("attention"))).attrs["rope"]
    assert (rope.rotary_dim(16), rope.rotated_dim(16)) == (5, 6)
    assert err(run(src, ref["tokens"]), ref["logits"]) < 1e-5
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    model = hf_model(out).eval()
    assert type(model).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < 1e-4


def test_odd_interleaved_rotary_rewritten_to_half_matches_megatron(tmp_path):
    """rope-to-half permutes the 6 rotating channels (not 5) of each q/k head for Phi3ForCausalLM."""
    d = megatron_checkpoint("phi3-odd-interleaved")
    ref = load_reference(d)
    assert err(run(lift(d / "ckpt"), ref["tokens"]), ref["logits"]) < 1e-5
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    with torch.no_grad():
        assert err(hf_model(out).eval()(ref["tokens"]).logits, ref["logits"]) < 1e-4


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_odd_rotary_onnx_matches_megatron(tmp_path, profile):
    d = megatron_checkpoint("phi3-odd-rotary")
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(out / "model.onnx", load_reference(d), prefix=5).worst < 1e-4


def test_odd_rotary_trtllm_is_refused_in_one_line(tmp_path, capsys):
    d = megatron_checkpoint("phi3-odd-rotary")
    out = tmp_path / "trt"
    _refused(capsys, ["compile", str(d / "ckpt"), "--target", "trtllm", "--build", "never", "-o", str(out),
                      "--quiet"], out, "odd rotary dimension", "6 channels")


def test_odd_rotary_stablelm_is_refused_and_even_partial_is_not():
    m = lift(megatron_checkpoint("gptnext") / "ckpt")             # StableLmForCausalLM, head_dim 16
    for percent, refused in ((0.25, False), (0.3125, True)):
        for a in m.graph.find("attention"):
            a.attrs["rope"] = dataclasses.replace(a.attrs["rope"], percent=percent)
        family, problems = families.classify(m)
        odd = [p for p in problems if "odd rotary dimension" in p]
        assert family == "stablelm" and bool(odd) == refused, problems
    assert get_backend("hf").check(m, CompileOptions(target="hf"))


@pytest.mark.parametrize("kind,override,words", [
    ("deepseek-v2-group", "moe_group_topk=1", "hold fewer than moe_topk=3 experts"),
    ("deepseek-v3", "moe_num_groups=4", "hold fewer than moe_topk=2 experts"),
])
def test_group_routing_that_cannot_hold_the_top_k_is_one_line(tmp_path, capsys, kind, override, words):
    """Before: an IR verifier failure (found by QA); megatron-core's group_limited_topk needs group_topk x
    experts per group >= top_k."""
    from mexc.tools.cli import main

    out = tmp_path / "o"
    assert main(["compile", str(megatron_checkpoint(kind) / "ckpt"), "--target", "hf", "--set", override, "-o",
                 str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith(f"error: --set {override}: does not fit the checkpoint") and \
        words in err[0], err
    assert not out.exists()
