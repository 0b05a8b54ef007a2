"""Checkpoints written by Megatron-LM's own training-loop save (tests/data/real-saves, made by
tests/fixture_makers/megatron_lm_saves.py at pinned Megatron-LM tags) compile to every target and reproduce the
logits megatron-core computed with the same model in the same process before it saved.

Oracles: transformers (hf target), onnxruntime (onnx target), tests/trtllm_reader.py (trtllm target,
TensorRT-LLM's own checkpoint semantics). Bounds: fp32 max |d logits| <= 1e-4; bf16 saves (megatron computed
in bf16) the bf16 bound of test_hf_backend; GELU models on trtllm the tanh-GELU rule of test_families
(TensorRT-LLM's "gelu" is the tanh approximation). A case whose ``case.json`` says ``"expect": "refused"``
must fail with one MexcError whose text holds ``expect_error`` and write nothing. The corpus is committed (CI
has no GitHub access); megatron-core is not needed to run these tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import trtllm_reader
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.driver import compile_checkpoint  # noqa: E402
from mexc.errors import MexcError  # noqa: E402
from test_families import TOL, _tanh_gelu_only, err  # noqa: E402
from test_hf_backend import BF16_TOL  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "data" / "real-saves"
CASE_DIRS = sorted(p.parent for p in CORPUS.glob("*/case.json"))
# what tests/fixture_makers/megatron_lm_saves.py makes; a case lost from the corpus fails test_corpus_is_complete
EXPECTED = {"torch-tp2", "dist-tp2", "bf16-dist-tp2", "distopt-torch-dp2", "distopt-dist-dp2", "vp-torch-pp2",
            "uneven-torch-pp2", "tied-torch-pp2", "moe-torch-ep2", "moe-torch-tp2-ep2-etp1",
            "async-dist-tp1", "dist-tp2-v0.19", "torch-tp1-v0.19"}
MAX_CORPUS_BYTES = 8 * 2**20


def info(d: Path) -> dict:
    """``case.json``: tag, megatron-core version, flags, tp/pp/ep/etp/vp, format, dtype, expect[,
    expect_error]."""
    return json.loads((d / "case.json").read_text())


def reference(d: Path) -> dict:
    """``reference.safetensors``: tokens [2, 8] int64, logits [2, 8, padded vocab] float32."""
    return load_file(str(d / "reference.safetensors"))


def bound(c: dict) -> float:
    return BF16_TOL if c["dtype"] == "bfloat16" else TOL


def gelu(c: dict) -> bool:
    """Megatron's default activation (no --swiglu / --squared-relu) is exact erf GELU."""
    return "--swiglu" not in c["flags"] and "--squared-relu" not in c["flags"]


@pytest.fixture(params=CASE_DIRS, ids=[d.name for d in CASE_DIRS])
def case(request):
    return request.param


def compile_or_refuse(d: Path, out: Path, **opts) -> bool:
    """Compile ``d``; for a case that must be refused, assert the one-line refusal and that nothing was
    written. Returns True when there is an output to check."""
    c = info(d)
    if c["expect"] == "refused":
        with pytest.raises(MexcError) as e:
            compile_checkpoint(d / "ckpt", out, CompileOptions(build="never", **opts))
        assert c["expect_error"] in str(e.value) and "\n" not in str(e.value) and "\x1b" not in str(e.value)
        assert not out.exists()
        return False
    assert c["expect"] == "exact", c["expect"]
    compile_checkpoint(d / "ckpt", out, CompileOptions(build="never", **opts))
    return True


def test_corpus_is_complete():
    assert {d.name for d in CASE_DIRS} == EXPECTED
    assert sum(f.stat().st_size for f in CORPUS.rglob("*") if f.is_file()) < MAX_CORPUS_BYTES
    for d in CASE_DIRS:
        c, ref = info(d), reference(d)
        assert (d / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
        assert ref["tokens"].shape == (2, 8) and ref["logits"].shape == (2, 8, c["padded_vocab_size"])
        assert ref["logits"].dtype == torch.float32 and torch.isfinite(ref["logits"]).all()


def test_hf_matches_megatron(tmp_path, case):
    out = tmp_path / "hf"
    if not compile_or_refuse(case, out, target="hf"):
        return
    c, ref = info(case), reference(case)
    transformers.logging.set_verbosity_error()
    model, missing = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert not {k: v for k, v in missing.items() if v}, missing
    with torch.no_grad():
        logits = model.eval()(ref["tokens"]).logits
    assert err(logits, ref["logits"]) <= bound(c)


def test_onnx_matches_megatron(tmp_path, case):
    from test_onnx_backend import Decoder

    c = info(case)
    out = tmp_path / "onnx"
    # onnxruntime's CPU provider has no bf16 MatMul: a bf16 save is compiled to fp32 (--dtype float32)
    if not compile_or_refuse(case, out, target="onnx", dtype="float32" if c["dtype"] == "bfloat16" else None):
        return
    ref = reference(case)
    logits, _ = Decoder(out / "model.onnx").step(ref["tokens"].numpy(), None, 0)
    assert err(logits, ref["logits"]) <= bound(c)


def test_trtllm_matches_megatron(tmp_path, case):
    """At the save's own TP (the reader checks the per-rank layout and merges it)."""
    c = info(case)
    out = tmp_path / "trtllm"
    if not compile_or_refuse(case, out, target="trtllm", tp=c["tp"]):
        return
    ref = reference(case)
    cfg, _ = trtllm_reader.read_checkpoint(str(out))
    assert cfg["mapping"]["tp_size"] == c["tp"]
    got = trtllm_reader.logits(str(out), ref["tokens"])
    if gelu(c) and c["dtype"] != "bfloat16":
        _tanh_gelu_only(got, case, ref)
    else:
        assert err(got, ref["logits"]) <= bound(c)
