"""Golden IR text before (input.mlir.txt) and after each built-in pass (on a seeded synthetic model, so the text is machine-independent).

Regenerate after an intended change with:  MEXC_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py
"""

import os
from pathlib import Path

import pytest

from mexc import ir
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
    "canonicalize": "canonicalize{untie=true}",
    "trim-vocab": "trim-vocab{size=100}",
    "dce": "dce",
}


def small():
    return random_llama(hidden=64, layers=2, vocab=128, ffn=128, heads=4, kv=2)


@pytest.mark.parametrize("name", list(CASES))
def test_golden_ir_text(name):
    model = small()
    before = str(model)
    PassManager(parse_pipeline(CASES[name]))(model)
    after = str(model)
    assert str(ir.parse(after)) == after
    files = {GOLDEN / "input.mlir.txt": before, GOLDEN / f"{name}.after.mlir.txt": after}
    for path, text in files.items():
        if os.environ.get("MEXC_UPDATE_GOLDEN"):
            path.write_text(text)
        assert path.read_text() == text, f"{path.name} changed; see the module docstring to regenerate"
