"""Issue 16: every saved Megatron argument is honoured, refused or irrelevant; the settings that change the
math are exact on every target or refused with one line. Oracles: megatron-core 0.16.1's own logits (fixtures),
transformers, onnxruntime and the test-side TensorRT-LLM reader."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trtllm_reader
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import CheckpointError, ConfigError
from mexc.frontends.megatron import arguments as A
from mexc.frontends.megatron.argument_versions import SPANS
from mexc.frontends.megatron.config import ARG_ALIASES, MegatronArch, from_args
from mexc.frontends.megatron.reader import open_checkpoint
from mexc.passes import PassManager, parse_pipeline

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "llama-tiny"
TOL = 1e-4
needs_mcore = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core is a test dependency")


def err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    V = min(a.shape[-1], b.shape[-1])
    return (a[..., :V] - b[..., :V]).abs().max().item()


def mexc(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def with_args(src: Path, dst: Path, **changes) -> Path:
    """A copy of the legacy checkpoint ``src`` whose saved args carry ``changes``."""
    shutil.copytree(src, dst)
    for f in dst.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        sd = torch.load(f, weights_only=False)
        for k, v in changes.items():
            setattr(sd["args"], k, v)
        torch.save(sd, f)
    return dst


# ------------------------------------------------------------------------------------------- the table


def test_every_megatron_lm_argument_has_a_verdict():
    names = [n for v in SPANS.values() for n in v.split()]
    assert len(names) > 800 and len(set(names)) == len(names)
    assert [n for n in names if A.lookup(n) is None] == []
    assert A.lookup("not_a_megatron_argument") is None
    for row in A.ROWS:   # a row says what it is honoured by, or how to fix a refusal
        assert row.verdict in (A.HONOURED, A.REFUSED, A.IRRELEVANT)
        assert (row.fix if row.verdict == A.REFUSED else row.by), row.name
    assert A.BY_NAME["window_size"].versions == "0.15-0.19"
    assert A.BY_NAME["moe_router_topk_scaling_factor"].versions == "0.11-0.19"
    assert A.BY_NAME["layernorm_epsilon"].versions == "0.9-0.19"   # norm_epsilon until 0.15, then this name
    assert A.lookup("lr").verdict == A.IRRELEVANT and "optimizer" not in A.lookup("lr").by


def test_config_reads_what_the_table_honours():
    assert ARG_ALIASES == A.arg_aliases()
    fields = {f.name for f in dataclasses.fields(MegatronArch)}
    for field, names in ARG_ALIASES.items():
        assert all(A.BY_NAME[n].verdict == A.HONOURED for n in names), field
    assert {"num_layers", "hidden_size", "norm_eps", "moe_topk_scale"} <= set(ARG_ALIASES) & fields


def _example_args() -> dict:
    return dict(vars(open_checkpoint(EXAMPLE).args))


@pytest.mark.parametrize("name,value,words", [
    ("window_size", (3, 2), ["window_size=(3, 2)", "(L, 0)"]),    # a right window: refused (window (L, 0) is honoured)
    ("apply_residual_connection_post_layernorm", True, ["apply_residual_connection_post_layernorm=True"]),
    ("normalization", "LayerNorm1p", ["normalization=LayerNorm1p", "RMSNorm"]),
    ("moe_router_load_balancing_type", "sinkhorn", ["sinkhorn", "Sinkhorn"]),
    ("moe_apply_probs_on_input", True, ["moe_apply_probs_on_input=True"]),
])
def test_lift_refuses_by_name_value_and_fix(name, value, words):
    args = {**_example_args(), name: value}
    with pytest.raises(ConfigError) as e:
        from_args(args, "CKPT")
    assert all(w in str(e.value) for w in words) and e.value.hint


def test_defaults_and_harmless_values_are_not_refused():
    args = {**_example_args(), "moe_router_load_balancing_type": "seq_aux_loss", "hidden_dropout": 0.3,
            "window_size": None, "window_attn_skip_freq": 2,   # read by Megatron only with a window
            "fp32_residual_connection": True, "lr": 3e-4, "moe_router_topk_scaling_factor": None}
    arch = from_args(args, "CKPT")
    assert arch.moe_topk_scale == 1.0 and A.apply(args).problems == [] and A.apply(args).unknown == []


def test_real_saves_with_default_settings_lift():
    """The example and every real Megatron-LM training-loop save committed under tests/data/real-saves/."""
    saves = [EXAMPLE, *sorted(p.parent for p in (REPO / "tests" / "data" / "real-saves").glob(
        "**/latest_checkpointed_iteration.txt"))]
    for ckpt in saves:
        info = open_checkpoint(ckpt)
        v = A.apply(info.args)
        assert v.problems == [], (ckpt, v.problems)
        from_args(info.args, str(ckpt))


def test_unknown_args_warn_once_and_are_listed(tmp_path):
    ck = with_args(EXAMPLE, tmp_path / "ck", my_lab_flag=3, other_lab_flag="x")
    r = mexc("compile", ck, "--target", "hf", "-o", tmp_path / "out", "--build", "never")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "my_lab_flag" in warnings[0] and "other_lab_flag" in warnings[0]
    manifest = json.loads((tmp_path / "out" / "mexc-manifest.json").read_text())
    assert manifest["frontend"] == {"replicated": "check", "unknown_args": ["my_lab_flag", "other_lab_flag"],
                                    "set": {}, "iteration": None}
    r = mexc("inspect", ck)
    assert r.returncode == 0 and "my_lab_flag" in r.stdout
    r = mexc("inspect", "--args", ck)
    assert r.returncode == 0
    rows = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()[:-2] if line.strip()}
    assert rows["my_lab_flag"] == "UNKNOWN" and rows["lr"] == "irrelevant" and rows["swiglu"] == "honoured"
    assert "nothing refused" in r.stdout.splitlines()[-1]


def test_inspect_args_names_a_refusal(tmp_path):
    ck = with_args(EXAMPLE, tmp_path / "ck", window_size=(4, 1))    # a right window (mexc honours (L, 0))
    r = mexc("inspect", "--args", ck, "--json")
    data = json.loads(r.stdout)
    assert any("window_size=(4, 1)" in p for p in data["problems"])
    assert {a["name"]: a["status"] for a in data["args"]}["window_size"] == "REFUSED"
    r = mexc("compile", ck, "--target", "onnx", "-o", tmp_path / "out")
    assert r.returncode != 0 and r.stderr.startswith("error:") and "window_size=(4, 1)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2   # error + hint
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- the four cases

TARGETS = ("hf", "onnx", "trtllm")


def _target_logits(d: Path, target: str, out: Path, tp: int = 1, **kw):
    """(logits of the compiled output on the fixture's tokens, the CompileResult)."""
    ref = load_reference(d)
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target=target, tp=tp, build="never", **kw))
    if target == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(ref["tokens"]).logits, res
    if target == "onnx":
        from test_onnx_backend import Decoder

        return Decoder(out / "model.onnx").step(ref["tokens"].numpy(), None, 0)[0], res
    return trtllm_reader.logits(str(out), ref["tokens"]), res


@needs_mcore
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_moe_topk_scaling_factor_is_exact(tmp_path, target):
    d = megatron_checkpoint("moe-scaled")
    ref = load_reference(d)
    model = lift(d / "ckpt")
    assert {n.attrs["topk_scale"] for n in model.graph.find("moe")} == {2.5}
    assert err(run(model, ref["tokens"]), ref["logits"]) < TOL          # verify's oracle honours it
    unscaled = lift(d / "ckpt", overrides={"moe_topk_scale": 1.0})
    assert err(run(unscaled, ref["tokens"]), ref["logits"]) > 100 * TOL  # an ignored factor would show
    for tp in ((1, 2) if target == "trtllm" else (1,)):
        logits, res = _target_logits(d, target, tmp_path / f"{target}{tp}", tp=tp)
        assert res.pipeline.removeprefix("trim-vocab{size=100},").startswith("fold-moe-scaling,")
        assert err(logits, ref["logits"]) < TOL


@needs_mcore
@pytest.mark.slow
def test_fold_moe_scaling_pass():
    d = megatron_checkpoint("moe-scaled")
    ref = load_reference(d)
    model = lift(d / "ckpt")
    PassManager(parse_pipeline("fold-moe-scaling"))(model)
    assert {n.attrs["topk_scale"] for n in model.graph.find("moe")} == {1.0}
    assert all(n.params["fc2"].source.op == "mul_scalar" for n in model.graph.find("moe"))
    assert err(run(model, ref["tokens"]), ref["logits"]) < TOL
    PassManager(parse_pipeline("fold-moe-scaling"))(model)   # nothing left to do: fc2 is not scaled twice
    assert all(n.params["fc2"].source.inputs[0].op != "mul_scalar" for n in model.graph.find("moe"))


@needs_mcore
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_interleaved_rope_is_exact(tmp_path, target):
    d = megatron_checkpoint("rope-interleaved")
    ref = load_reference(d)
    model = lift(d / "ckpt")
    assert next(model.graph.find("attention")).attrs["rope"].interleaved
    assert err(run(model, ref["tokens"]), ref["logits"]) < TOL
    runs = {"trtllm": [dict(tp=1), dict(tp=2)], "onnx": [dict(profile="ort"), dict(profile="tensorrt")]}
    for i, kw in enumerate(runs.get(target, [{}])):
        out = tmp_path / f"{target}{i}"
        logits, res = _target_logits(d, target, out, **kw)
        assert err(logits, ref["logits"]) < TOL
        if target == "trtllm":   # TensorRT-LLM's Llama never reads rope_gptj: the rows are permuted instead
            assert res.pipeline.removeprefix("trim-vocab{size=100},").startswith("rope-to-half,")
            assert json.loads((out / "config.json").read_text())["position_embedding_type"] == "rope_gpt_neox"


@needs_mcore
@pytest.mark.slow
def test_rope_to_half_pass_permutes_q_and_k_rows_only():
    d = megatron_checkpoint("rope-interleaved")
    ref = load_reference(d)
    model = lift(d / "ckpt")
    before = next(model.graph.find("attention")).params["qkv"].source.materialize()
    PassManager(parse_pipeline("rope-to-half"))(model)
    node = next(model.graph.find("attention"))
    assert not node.attrs["rope"].interleaved
    after = node.params["qkv"].source.materialize()
    g = (after.view(2, 4, 16, 64), before.view(2, 4, 16, 64))   # 2 groups x [q, q, k, v] x head_dim 16
    assert torch.equal(g[0][:, 3], g[1][:, 3])                   # v rows untouched
    assert torch.equal(g[0][:, :3, :8], g[1][:, :3, 0::2]) and torch.equal(g[0][:, :3, 8:], g[1][:, :3, 1::2])
    assert err(run(model, ref["tokens"]), ref["logits"]) < TOL


@needs_mcore
@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_replicated_copies_that_differ_are_refused(tmp_path, target):
    ck = megatron_checkpoint("tp-drift", tp=2) / "ckpt"
    tp = ["--tp", "2"] if target == "trtllm" else []
    r = mexc("compile", ck, "--target", target, *tp, "-o", tmp_path / "out", "--build", "never")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines[-2].startswith("error:") and lines[-1].startswith("hint:"), r.stderr
    assert "input_layernorm.weight" in lines[-2] and "mp_rank_00 vs mp_rank_01" in lines[-2]
    assert "max |difference|" in lines[-2] and "--replicated" in lines[-1]
    assert not (tmp_path / "out").exists()


@needs_mcore
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["rank0", "mean"])
def test_replicated_choice_is_explicit_and_recorded(tmp_path, mode):
    d = megatron_checkpoint("tp-drift", tp=2)
    ref = load_reference(d)
    model = lift(d / "ckpt", overrides={"replicated": mode})   # what --replicated passes
    r = mexc("compile", d / "ckpt", "--target", "hf", "-o", tmp_path / "hf", "--replicated", mode)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "hf" / "mexc-manifest.json").read_text())
    assert manifest["frontend"]["replicated"] == mode
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        hf = m(ref["tokens"]).logits
    assert err(hf, run(model, ref["tokens"])) < TOL   # the output is the model the user chose ...
    assert err(hf, ref["logits"]) > 1e-3               # ... which no TP rank of Megatron computed
    w = [next(model.graph.find("norm")).params["weight"].source.materialize()]
    shards = [torch.load(f, weights_only=False)["model"]["decoder.layers.0.input_layernorm.weight"]
              for f in sorted((d / "ckpt").glob("iter_*/mp_rank_*/model_optim_rng.pt"))]
    assert torch.equal(w[0], shards[0] if mode == "rank0" else (shards[0] + shards[1]) / 2)
