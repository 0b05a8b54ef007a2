"""Golden IR text before (input.mlir.txt) and after each built-in pass (on a seeded synthetic model, so the
text is machine-independent). Every case changes something: passes with nothing to do on the plain model
(canonicalize, dce) get a prepared input, kept as ``<case>.input.mlir.txt``.

Regenerate after an intended change with:  MEXC_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py
"""

import os
from pathlib import Path

import pytest
from mexc import ir
from mexc.ir.ops import default_attrs
from mexc.passes import PassManager, parse_pipeline
from tiny_models import random_llama

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = {
    "relayout-qkv": "relayout-qkv{to=concat}",
    "split-qkv": "split-qkv",
    "fuse-qkv": "split-qkv,fuse-qkv",
    "reshard": "relayout-qkv{to=concat},reshard{tp=4 pp=2}",
    "lower-dtype": "lower-dtype{to=bf16 keep-norms-fp32=true}",
    "quantize": "quantize{scheme=int4-wo group-size=32}",
    "canonicalize": "canonicalize{tie=true}",
    "trim-vocab": "trim-vocab{size=100}",
    "dce": "dce",
}


def small():
    return random_llama(hidden=64, layers=2, vocab=128, ffn=128, heads=4, kv=2)


def zero_centered_tied(model):
    """Gemma-style norms (stored gamma = weight - 1) and an untied head, for canonicalize{tie=true} to fold
    and tie."""
    for n in model.graph.find("norm"):
        n.attrs["zero_centered"] = True
    return model


def dead_branch(model):
    """A norm and an MLP off the embedding whose result nothing reads (a chain: dce must remove both)."""
    emb = model.node("embedding")
    st = model.stores["rnd"]
    norm = ir.Node("norm", [emb.output], default_attrs("norm") | {"kind": "rmsnorm"},
                   {"weight": ir.Param(ir.load(st, "dead.norm", ir.TensorType(ir.f32, (64,))))}, layer=0)
    model.graph.insert_after(emb, norm)
    mlp = ir.Node("mlp", [norm.output], default_attrs("mlp") | {"activation": "silu", "gated": False},
                  {"fc1": ir.Param(ir.load(st, "dead.fc1", ir.TensorType(ir.f32, (32, 64)))),
                   "fc2": ir.Param(ir.load(st, "dead.fc2", ir.TensorType(ir.f32, (64, 32))))}, layer=0)
    model.graph.insert_after(norm, mlp)
    return model


PREPARE = {"canonicalize": zero_centered_tied, "dce": dead_branch}


@pytest.mark.parametrize("name", list(CASES))
def test_golden_ir_text(name):
    model = small()
    inp = GOLDEN / "input.mlir.txt"
    if name in PREPARE:
        inp = GOLDEN / f"{name}.input.mlir.txt"
        model = PREPARE[name](model)
        ir.verify(model)
    before = str(model)
    pm = PassManager(parse_pipeline(CASES[name]))
    pm(model)
    after = str(model)
    assert str(ir.parse(after)) == after
    assert after != before and pm.results[-1][1].modified, f"{name}: the golden case must change something"
    files = {inp: before, GOLDEN / f"{name}.after.mlir.txt": after}
    for path, text in files.items():
        if os.environ.get("MEXC_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.read_text() == text, f"{path.name} changed; see the module docstring to regenerate"
