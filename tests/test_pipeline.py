"""Pass infrastructure: registry, textual pipelines, verify-after-each-pass, errors, user passes via the CLI."""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_fixtures import megatron_checkpoint
from mexc import ir
from mexc.errors import ParseError, PassError
from mexc.frontends.megatron import lift
from mexc.passes import PASSES, Pass, PassManager, PassResult, format_pipeline, parse_pipeline, register_pass

ROOT = Path(__file__).resolve().parent.parent


def test_pipeline_parses_and_prints_back_expanded():
    text = "relayout-qkv{to=concat},reshard{tp=2 pp=1},lower-dtype{to=bf16}"
    passes = parse_pipeline(text)
    full = format_pipeline(passes)
    assert full == ("relayout-qkv{to=concat},reshard{tp=2 pp=1 ep=1 parallel-embedding=false},"
                    "lower-dtype{to=bf16 keep-norms-fp32=false keep-router-fp32=true}")
    assert format_pipeline(parse_pipeline(full)) == full
    assert [p.name for p in passes] == ["relayout-qkv", "reshard", "lower-dtype"]
    assert passes[1].tp == 2


@pytest.mark.parametrize("bad,msg", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("reshard{tp=two}", "option tp=two"),
    ("reshard{bogus=1}", "has no option 'bogus'"),
    ("reshard{tp=2", "malformed pipeline"),
    ("relayout-qkv{to=sideways}", "must be one of"),
    ("reshard{tp=0}", "positive integer"),
    ("dce;dce", "expected ','"),
])
def test_malformed_pipelines_are_clear_errors(bad, msg):
    with pytest.raises(ParseError) as e:
        parse_pipeline(bad)
    assert msg in e.value.message and e.value.hint


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(PassError, match="already registered"):
        @register_pass("reshard")
        @dataclass
        class Another(Pass):
            def run(self, model):
                return PassResult(False)
    with pytest.raises(PassError, match="kebab-case"):
        register_pass("Not_Kebab")
    assert "reshard" in PASSES


def test_verifier_after_each_pass_names_the_pass_and_its_predecessors():
    @register_pass("test-break-heads")
    @dataclass
    class Break(Pass):
        """Corrupt the IR on purpose."""

        def run(self, model):
            model.node("attention", 1).attrs["num_kv_heads"] = 3
            return PassResult(True)

    model = lift(megatron_checkpoint("llama") / "ckpt")
    with pytest.raises(PassError) as e:
        PassManager(parse_pipeline("relayout-qkv,test-break-heads"))(model)
    m = e.value.message
    assert "after pass 'test-break-heads' (after relayout-qkv)" in m
    assert "node 8 (attention, layer 1)" in m and "num_kv_heads=3" in m
    PASSES.pop("test-break-heads")


def test_pass_crash_is_wrapped_with_context():
    @register_pass("test-crash")
    @dataclass
    class Crash(Pass):
        def run(self, model):
            raise ZeroDivisionError("boom")

    model = lift(megatron_checkpoint("llama") / "ckpt")
    with pytest.raises(PassError) as e:
        PassManager(parse_pipeline("dce,test-crash"))(model)
    assert "pass 'test-crash' (after dce) crashed: ZeroDivisionError: boom" in e.value.message
    PASSES.pop("test-crash")


def test_print_ir_after_and_dump_ir(tmp_path, capsys):
    model = lift(megatron_checkpoint("llama") / "ckpt")
    PassManager(parse_pipeline("relayout-qkv,reshard{tp=2}"), print_ir_after={"reshard"}, dump_ir=tmp_path)(model)
    err = capsys.readouterr().err
    assert "// ----- IR after reshard{tp=2" in err and "split(dim=0,tp=2)" in err
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00-input.mlir.txt", "01-relayout-qkv.mlir.txt", "02-reshard.mlir.txt"]
    assert ir.parse((tmp_path / "02-reshard.mlir.txt").read_text()).parallel.tp == 2


def test_docs_example_pass_is_the_file_the_docs_show():
    doc = (ROOT / "docs" / "writing_passes.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    assert code in (ROOT / "docs" / "examples" / "keep_norms_fp32.py").read_text()


def _mexc(*args, check=True):
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True,
                          text=True, check=check, cwd=ROOT)


def test_user_pass_runs_through_compile_and_shows_in_inspect(tmp_path):
    ck = megatron_checkpoint("llama", tp=2) / "ckpt"
    user = ROOT / "docs" / "examples" / "keep_norms_fp32.py"
    pipe = "lower-dtype{to=bf16},keep-norms-fp32"
    r = _mexc("inspect", ck, "--load", user, "--pipeline", pipe, "--ir")
    norm_lines = [l for l in r.stdout.splitlines() if re.match(r"\s+weight: \w+\[64\] ", l)]
    assert len(norm_lines) == 5 and all(l.strip().startswith("weight: f32[64]") for l in norm_lines)
    assert "weight: bf16[128,64]" in r.stdout  # the lm_head is lowered
    assert "qkv: bf16[" in r.stdout
    out = tmp_path / "trt"
    r = _mexc("compile", ck, "--target", "trtllm", "-o", out, "--load", user, "--pipeline", pipe)
    assert "keep-norms-fp32{ops=norm}" in r.stderr
    import json

    manifest = json.loads((out / "mexc-manifest.json").read_text())
    assert manifest["pipeline"].removeprefix("trim-vocab{size=100},").startswith(   # padding trimmed first
        "lower-dtype{to=bf16 keep-norms-fp32=false keep-router-fp32=true},keep-norms-fp32{ops=norm}")
    from safetensors import safe_open

    with safe_open(out / "rank0.safetensors", "pt") as f:
        assert f.get_tensor("transformer.layers.0.input_layernorm.weight").dtype.is_floating_point
        assert str(f.get_tensor("transformer.layers.0.input_layernorm.weight").dtype) == "torch.float32"
        assert str(f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype) == "torch.bfloat16"
    r = _mexc("passes", "keep-norms-fp32", "--load", user)
    assert "Keep normalization weights in fp32" in r.stdout and "ops: list = norm" in r.stdout
