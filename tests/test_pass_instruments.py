"""Pass placement and instruments (issue 15, item 6): ``legalize`` in ``--pipeline``, the dtype-choice guard,
declared pass order, the semantic check with the reference interpreter, and user instruments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from megatron_fixtures import megatron_checkpoint
from mexc import ir
from mexc.backends.base import CompileOptions
from mexc.driver import compile_checkpoint
from mexc.errors import ParseError, PassError
from mexc.frontends.megatron import lift
from mexc.passes import PASSES, Pass, PassManager, PassResult, load_pass_file, parse_pipeline, register_pass
from mexc.passes.instruments import Instrument, SemanticCheck
from mexc.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
USER_PASS = ROOT / "docs" / "examples" / "keep_norms_fp32.py"


@pytest.fixture(scope="module")
def ckpt():
    load_pass_file(USER_PASS)
    return megatron_checkpoint("llama") / "ckpt"


@pytest.fixture
def temp_pass():
    names = []

    def make(name, cls):
        names.append(name)
        return register_pass(name)(cls)

    yield make
    for n in names:
        PASSES.pop(n, None)


def _dtypes(path: Path) -> dict[str, torch.dtype]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


def test_user_pass_after_legalization_survives_dtype_lowering(ckpt, tmp_path):
    """The documented pass placed after ``legalize``: norms stay fp32 in a bf16 hf output, transformers loads
    it, and its logits stay close to the fp32 model's."""
    out = tmp_path / "hf"
    res = compile_checkpoint(ckpt, out, CompileOptions(target="hf", dtype="bfloat16",
                                                       pipeline="legalize,keep-norms-fp32"))
    assert res.pipeline.endswith("lower-dtype{to=bfloat16 keep-norms-fp32=false keep-router-fp32=false},"
                                 "keep-norms-fp32{ops=norm}")
    dt = _dtypes(out / "model.safetensors")
    norms = [k for k in dt if k.endswith("norm.weight")]
    assert len(norms) == 5 and all(dt[k] == torch.float32 for k in norms)
    assert dt["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16


def test_user_choice_undone_by_legalization_is_an_error(ckpt, tmp_path, capsys):
    """Before ``legalize`` (the default place), the target's lower-dtype would recast the pinned norms."""
    rc = main(["compile", str(ckpt), "--target", "hf", "--dtype", "bfloat16", "--load", str(USER_PASS),
               "--pipeline", "keep-norms-fp32", "-o", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and not (tmp_path / "o").exists()
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: pass 'lower-dtype{to=bfloat16") and "keep-norms-fp32{ops=norm}" in lines[0]
    assert "silently undone" in lines[0]
    assert lines[1] == "hint: place it after the legalization: --pipeline '...,legalize,keep-norms-fp32{ops=norm}'"


def test_user_recast_of_its_own_choice_is_allowed(ckpt):
    """Only the target's passes are judged: a user pipeline may change its mind."""
    model = lift(ckpt)
    PassManager(parse_pipeline("keep-norms-fp32,lower-dtype{to=bf16}"))(model)
    assert all(n.params["weight"].type.dtype == ir.bf16 for n in model.graph.find("norm"))


@pytest.mark.parametrize("text,msg", [
    ("legalize", "only `mexc compile --pipeline` has a target"),
])
def test_legalize_outside_compile_is_refused(text, msg):
    with pytest.raises(ParseError, match=msg):
        parse_pipeline(text)


@pytest.mark.parametrize("text", ["legalize,legalize", "legalize{x=1}", "dce,legalize dce"])
def test_malformed_legalize_items(text):
    with pytest.raises(ParseError):
        parse_pipeline(text, markers=("legalize",))


def test_legalize_cannot_be_registered_as_a_pass():
    with pytest.raises(PassError, match="reserved"):
        register_pass("legalize")(type("X", (Pass,), {}))


def test_declared_order_is_checked_before_anything_runs(ckpt, temp_pass):
    ran = []

    @dataclass
    class NeedsRelayout(Pass):
        """Runs after relayout-qkv."""

        runs_after = ("relayout-qkv",)

        def run(self, model):
            ran.append(self.name)
            return PassResult(False)

    temp_pass("test-needs-relayout", NeedsRelayout)
    model = lift(ckpt)
    with pytest.raises(PassError, match="must run after 'relayout-qkv'") as e:
        PassManager(parse_pipeline("test-needs-relayout,relayout-qkv"))(model)
    assert e.value.hint == "move relayout-qkv before test-needs-relayout in --pipeline" and ran == []
    PassManager(parse_pipeline("relayout-qkv,test-needs-relayout"))(model)
    PassManager(parse_pipeline("test-needs-relayout"))(lift(ckpt))   # absent: no constraint
    assert ran == ["test-needs-relayout", "test-needs-relayout"]


def test_semantic_check_passes_exact_rewrites_and_names_a_wrong_pass(ckpt, temp_pass):
    model = lift(ckpt)
    check = SemanticCheck()
    PassManager(parse_pipeline("relayout-qkv{to=concat},reshard{tp=2},lower-dtype{to=bf16}"),
                instruments=[check])(model)
    errs = dict(check.checked)
    assert errs["relayout-qkv{to=concat}"] < 1e-6 and errs["reshard{tp=2 pp=1 ep=1 parallel-embedding=false}"] < 1e-5
    assert 0 < errs["lower-dtype{to=bf16 keep-norms-fp32=false keep-router-fp32=true}"] < 5e-2

    @dataclass
    class Scale(Pass):
        """Shifts one MLP weight: not semantics-preserving."""

        def run(self, model):
            p = model.node("mlp", 1).params["fc2"]
            p.source = ir.derive("add_scalar", p.source, value=0.05)
            return PassResult(True)

    temp_pass("test-scale-fc2", Scale)
    with pytest.raises(PassError, match=r"pass 'test-scale-fc2' \(after dce\) changed the model's logits"):
        PassManager(parse_pipeline("dce,test-scale-fc2"), instruments=[SemanticCheck()])(lift(ckpt))


def test_user_instrument_sees_every_pass_in_order(ckpt):
    calls = []

    class Record(Instrument):
        def before_pipeline(self, model):
            calls.append("start")

        def before_pass(self, p, model, done):
            calls.append(f"before {p.name} after {done}")

        def after_pass(self, p, model, done, result, seconds):
            assert seconds >= 0
            calls.append(f"after {p.name} modified={result.modified}")

        def after_pipeline(self, model):
            calls.append("end")

    PassManager(parse_pipeline("dce,relayout-qkv{to=concat}"), instruments=[Record()])(lift(ckpt))
    assert calls == ["start", "before dce after []", "after dce modified=False",
                     "before relayout-qkv after ['dce']", "after relayout-qkv modified=True", "end"]
