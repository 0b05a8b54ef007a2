"""Hybrid Mamba-2 models (issue 18): Megatron ``MambaModel`` checkpoints (Nemotron-H shaped: ``M-M*-M``, GQA
attention without positions, squared-ReLU MLP, grouped Mamba heads) converted to ``NemotronHForCausalLM``.

megatron-core cannot run Mamba layers on a CPU, so the oracle is a small random transformers
``NemotronHForCausalLM``: tests/nemotron_h_writer.py writes its weights as Megatron checkpoints (legacy
TP1/TP2 and torch_dist TP1/TP2) following Megatron-Bridge's NemotronH mapping; the lifted model run by mexc's
reference interpreter and the hf output loaded by transformers must reproduce its logits within 1e-4 in fp32.
trtllm and onnx refuse with one line naming what is missing (docs/targets.md)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.nemotron_h")

import nemotron_h_writer as writer
from mexc import ir
from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, get_backend, lift
from mexc.errors import BackendError, CheckpointError, ConfigError, MexcError
from mexc.ir.ops import layer_pattern
from mexc.passes import PassManager, parse_pipeline
from mexc.passes.quantize import LINEAR_WEIGHTS
from mexc.passes.reshard import split_of
from mexc.tools.cli import main

TOL = 1e-4
CASES = [(1, "torch"), (2, "torch"), (1, "torch_dist"), (2, "torch_dist")]


def err(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


@pytest.fixture(scope="module")
def ref():
    m = writer.reference(seed=0)
    tokens = torch.randint(0, m.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    return m, tokens, writer.logits(m, tokens)


@pytest.fixture(scope="module")
def ckpts(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("mamba")
    return {(tp, fmt): writer.write(ref[0], root / f"{fmt}-tp{tp}", tp, fmt) for tp, fmt in CASES}


@pytest.mark.parametrize("tp,fmt", CASES)
def test_lift_and_hf_match_transformers(ref, ckpts, tmp_path, tp, fmt):
    m, tokens, want = ref
    model = lift(ckpts[(tp, fmt)])
    assert layer_pattern(model.graph) == writer.PATTERN
    assert model.meta["source_tp"] == tp and model.meta["format"] == fmt
    assert err(run(model, tokens), want) < TOL
    out = tmp_path / "hf"
    compile_checkpoint(ckpts[(tp, fmt)], out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"], cfg["hybrid_override_pattern"]) == (
        ["NemotronHForCausalLM"],
        "nemotron_h",
        writer.PATTERN,
    )
    assert (cfg["mamba_num_heads"], cfg["n_groups"], cfg["ssm_state_size"], cfg["conv_kernel"]) == (
        8,
        2,
        16,
        4,
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == "NemotronHForCausalLM"
    with torch.no_grad():
        got = hf(tokens).logits
    assert err(got, want) < TOL
    # the written tensors are the reference's, name for name (the Hub's backbone.* names)
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    sd = writer._hf(m)
    assert set(written) == set(sd)
    assert max(err(written[k], sd[k]) for k in sd) == 0.0


def test_reference_interpreter_splits_as_megatron_does(ref, ckpts):
    """Resharded to tp=2 pp=2, each simulated rank computes with whole heads and groups (z, x, B, C, dt, conv,
    A_log, D, dt_bias and the gated norm split on dim 0, out_proj on dim 1); a wrong split is caught."""
    _, tokens, want = ref
    model = lift(ckpts[(1, "torch")])
    PassManager(parse_pipeline("reshard{tp=2 pp=2}"))(model)
    mamba = next(model.graph.find("mamba"))
    assert {k: p.sharding.dim for k, p in mamba.params.items()} == {
        **{k: 0 for k in mamba.params if k != "out"},
        "out": 1,
    }
    assert err(run(model, tokens), want) < TOL
    again = ir.parse(str(model))  # the text form round-trips with the new op
    assert err(run(again, tokens), want) < TOL
    p = mamba.params["in_B"]  # rank halves of B swapped: groups land on the wrong rank
    half = p.type.shape[0] // 2
    p.source = ir.derive(
        "concat",
        ir.derive("slice", p.source, dim=0, start=half, stop=2 * half),
        ir.derive("slice", p.source, dim=0, start=0, stop=half),
        dim=0,
    )
    assert err(run(model, tokens), want) > 1e-2


def test_newer_conv_keys_and_a_tp_split_the_groups_do_not_allow(ref, tmp_path):
    m, tokens, want = ref
    d = writer.write_legacy(m, tmp_path / "c", 2, conv_key="conv1d_weight")  # megatron-core main's keys
    assert err(run(lift(d), tokens), want) < TOL
    model = lift(d)
    with pytest.raises(MexcError, match="num_groups=2 do not both divide by 4"):  # the verifier names it
        PassManager(parse_pipeline("relayout-qkv{to=concat},reshard{tp=4}"))(model)


def test_declared_params_drive_the_passes():
    assert {n for op, n in LINEAR_WEIGHTS if op == "mamba"} == {
        "in_z",
        "in_x",
        "in_B",
        "in_C",
        "in_dt",
        "out",
    }
    for name in ("in_z", "in_dt", "conv_x", "conv_C_bias", "A_log", "D", "dt_bias", "norm"):
        assert split_of("mamba", name) == (0, "tp"), name
    assert split_of("mamba", "out") == (1, "tp")


def test_megatron_args_are_honoured_or_refused(ref, tmp_path, capsys):
    from mexc.frontends.megatron.arguments import describe

    m = ref[0]
    text = describe(writer.megatron_args(m, 1))
    for name in (
        "hybrid_override_pattern",
        "mamba_state_dim",
        "mamba_head_dim",
        "mamba_num_groups",
        "mamba_num_heads",
    ):
        assert any(line.split()[:2] == ["honoured", name] for line in text.splitlines()), name
    assert not any(line.startswith("REFUSED") for line in text.splitlines())
    bad = writer.write_legacy(m, tmp_path / "ratio", 1, hybrid_attention_ratio=0.25)
    assert main(["compile", str(bad), "--target", "hf", "-o", str(tmp_path / "o1")]) != 0
    assert "hybrid_attention_ratio=0.25 (layers allocated by ratio" in capsys.readouterr().err
    wrong = writer.write_legacy(m, tmp_path / "groups", 2, mamba_num_groups=4)  # args disagree with tensors
    with pytest.raises(CheckpointError, match="do not fit the mamba args split 2 ways"):
        lift(wrong)
    mtp = writer.write_legacy(m, tmp_path / "mtp", 1, hybrid_override_pattern="M-M*-M/*-")
    with pytest.raises(ConfigError, match="multi-token-prediction"):
        lift(mtp)
    gdn = writer.write_legacy(m, tmp_path / "gdn", 1, hybrid_override_pattern="M-G*-M")
    with pytest.raises(ConfigError, match=r"layer symbols \['G'\] mexc does not lift"):
        lift(gdn)


def test_trtllm_and_onnx_refuse_with_one_line(ckpts, tmp_path, capsys):
    for target, says in (("trtllm", "NemotronHForCausalLM"), ("onnx", "conv and SSM state")):
        assert (
            main(["compile", str(ckpts[(1, "torch")]), "--target", target, "-o", str(tmp_path / target)]) != 0
        )
        err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err_lines) == 1 and "Mamba-2 mixer layers" in err_lines[0] and says in err_lines[0]
        assert not (tmp_path / target).exists()


def test_hf_refuses_what_nemotron_h_cannot_express(ckpts):
    from mexc.backends.hf import families

    model = lift(ckpts[(1, "torch")])
    for n in model.graph.find("mamba"):
        n.attrs["norm_before_gate"] = True
    family, problems = families.classify(model)
    assert family == "nemotron_h" and any("before the gate" in p for p in problems)
    model = lift(ckpts[(1, "torch")])
    for n in model.graph.find("mamba"):
        n.attrs["norm_eps"] = 1e-6
    assert any("layer_norm_epsilon for both" in p for p in families.classify(model)[1])
    with pytest.raises(BackendError, match="layer_norm_epsilon"):
        get_backend("hf").emit(model, "/nonexistent-mexc-out", CompileOptions(target="hf"))
