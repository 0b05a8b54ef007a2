"""`mexc verify` checks the whole artifact before it compares logits (issue 14 "Deliver 4", issue 19 item 9).

Outputs of the bundled megatron-core checkpoint (examples/llama-tiny, TP=2) are compiled once; each test
corrupts a copy by flipping bytes inside one tensor's data region, located by parsing the safetensors header
(or the ONNX initializer's external-data entry) here, independently of mexc. Oracles: the untouched output
passes; transformers and the test-side TensorRT-LLM reader (tests/trtllm_reader.py) show that the corruptions
used are invisible to a logit check; torch decides what is NaN/Inf.
"""

import json
import math
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

import trtllm_reader
from mexc.tools.cli import main
from mexc.tools.integrity import CHUNK, NONFINITE, Report, _nonfinite, check_file, safetensors_spans
from mexc.tools.verify import PROMPTS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama-tiny"
UNUSED = 97  # a token id the logit check never feeds
assert UNUSED not in PROMPTS


def mexc(capsys, *args):
    """Run the CLI in-process: (exit status, stdout, stderr). An uncaught exception fails the test."""
    capsys.readouterr()
    rc = main([*map(str, args)])
    o = capsys.readouterr()
    return rc, o.out, o.err


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    base = tmp_path_factory.mktemp("verify")
    made = {}
    for name, args in {"trtllm": ["--target", "trtllm", "--tp", "2"], "hf": ["--target", "hf"],
                       "onnx": ["--target", "onnx"]}.items():
        out = base / name
        assert main(["compile", str(EXAMPLE), *args, "-o", str(out), "--quiet"]) == 0
        made[name] = out
    return made


def copy(outputs, kind, tmp_path) -> Path:
    dst = tmp_path / kind
    shutil.copytree(outputs[kind], dst)
    return dst


def st_region(path: Path, tensor: str) -> tuple[int, int, str, list]:
    """(absolute offset, length, dtype, shape) of ``tensor`` in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))[tensor]
    b, e = h["data_offsets"]
    return 8 + n + b, e - b, h["dtype"], h["shape"]


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_f32(path: Path, tensor: str, index: int, value: float) -> None:
    """Store ``value`` as element ``index`` (flat) of an F32 tensor, in place."""
    off, length, dtype, _ = st_region(path, tensor)
    assert dtype == "F32" and 4 * index < length
    write_at(path, off + 4 * index, struct.pack("<f", value))


def resign(out: Path, file: str, tensor: str) -> None:
    """Make the manifest agree with the tensor's current bytes (a compile bug, or a careful attacker)."""
    off, length, _, _ = st_region(out / file, tensor)
    with open(out / file, "rb") as f:
        f.seek(off)
        digest = xxhash.xxh3_128_hexdigest(f.read(length))
    mf = out / "mexc-manifest.json"
    m = json.loads(mf.read_text())
    m["files"][file][tensor] = digest
    mf.write_text(json.dumps(m))


def fail_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("FAIL")]


@pytest.mark.parametrize("kind", ["trtllm", "hf", "onnx"])
def test_untouched_output_passes(capsys, outputs, kind):
    rc, out, err = mexc(capsys, "verify", outputs[kind], "--against", EXAMPLE)
    assert rc == 0, out + err
    assert not fail_lines(out) and "note:" not in out
    assert f"source: {EXAMPLE.resolve()} (megatron, torch, iteration 10), as recorded in the manifest" in out
    files = {"trtllm": 2, "hf": 1, "onnx": 1}[kind]
    assert f"artifact: {files} file(s)" in out and "NaN/Inf: OK" in out
    assert out.strip().splitlines()[-1].endswith(": OK")
    if kind == "trtllm":
        assert "TensorRT-LLM itself is not involved" in out and "every rank" in out
        assert "ranks: replicated tensors and shared KV heads are identical on all 2 TP ranks: OK" in out


@pytest.mark.parametrize("kind,files,tensor", [
    ("hf", ["model.safetensors"], "model.embed_tokens.weight"),
    # replicated on both TP ranks: changed alike on both, so the copies still agree
    ("trtllm", ["rank0.safetensors", "rank1.safetensors"], "transformer.vocab_embedding.weight"),
])
def test_corrupted_unused_embedding_row_fails(capsys, outputs, tmp_path, kind, files, tensor):
    out = copy(outputs, kind, tmp_path)
    for file in files:
        _, _, _, shape = st_region(out / file, tensor)
        for j in range(shape[1]):
            set_f32(out / file, tensor, UNUSED * shape[1] + j, 0.5)
    # the corruption cannot be seen through the logits of the prompts (independent runtimes)
    if kind == "hf":
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            clean = AutoModelForCausalLM.from_pretrained(outputs[kind], dtype=torch.float32)(PROMPTS).logits
            bad = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(PROMPTS).logits
    else:
        clean, bad = trtllm_reader.logits(str(outputs[kind]), PROMPTS), trtllm_reader.logits(str(out), PROMPTS)
    assert torch.equal(clean, bad)
    rc, stdout, err = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1, stdout + err
    assert fail_lines(stdout) == [f"FAIL {file}: tensor {tensor}: checksum differs from the manifest "
                                  "(its bytes changed after compile)" for file in files]
    assert "logits: not compared" in stdout


def test_corrupted_rank1_replicated_tensor_fails(capsys, outputs, tmp_path):
    out = copy(outputs, "trtllm", tmp_path)
    name = "transformer.layers.0.input_layernorm.weight"
    set_f32(out / "rank1.safetensors", name, 5, 3.25)
    assert torch.equal(rank0_logits(outputs["trtllm"]), rank0_logits(out)), "a logit check reads rank 0's copy"
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1
    assert fail_lines(stdout) == [f"FAIL rank1.safetensors: tensor {name}: checksum differs from the manifest "
                                  "(its bytes changed after compile)"]
    # with the manifest made to agree, the copies still differ across ranks; the independent reader agrees
    resign(out, "rank1.safetensors", name)
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE, "--json")
    res = json.loads(stdout)
    assert rc == 1 and res["ok"] is False and res["max_abs_delta"] is None
    assert res["artifact"]["ok"] and res["ranks"]["problems"] == [f"FAIL rank1.safetensors: tensor {name}: differs from rank0's copy "
                                           "(TensorRT-LLM keeps it replicated: every TP rank must hold the same bytes)"]
    with pytest.raises(AssertionError, match="input_layernorm.weight: must be replicated"):
        trtllm_reader.read_checkpoint(str(out))


def test_differing_copy_of_a_shared_kv_head_fails(capsys, tmp_path):
    out = tmp_path / "tp4"  # 2 KV heads over 4 ranks: ranks 0, 1 hold head 0, ranks 2, 3 head 1
    assert main(["compile", str(EXAMPLE), "--target", "trtllm", "--tp", "4", "-o", str(out), "--quiet"]) == 0
    clean = rank0_logits(out)
    cfg = json.loads((out / "config.json").read_text())
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    name = "transformer.layers.1.attention.qkv.weight"
    _, _, _, shape = st_region(out / "rank1.safetensors", name)
    assert shape[0] == 3 * d  # [Q_r; K_r; V_r], one head each
    set_f32(out / "rank1.safetensors", name, (d + 2) * shape[1] + 7, 0.75)  # a K row
    resign(out, "rank1.safetensors", name)
    assert torch.equal(rank0_logits(out), clean), "a logit check runs the first copy of each KV head"
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1 and "NaN/Inf: OK" in stdout
    assert fail_lines(stdout) == [f"FAIL rank1.safetensors: tensor {name}: its copy of KV head 0 (rows {d}..{3 * d}) "
                                  "differs from rank0.safetensors's; ranks sharing a KV head must hold the same K "
                                  "and V rows"]
    with pytest.raises(AssertionError, match="KV head 0 duplicated over tp ranks"):
        trtllm_reader.read_checkpoint(str(out))


def rank0_logits(out: Path) -> torch.Tensor:
    """The logits verify's logit step computes for a trtllm output (mexc's reader takes a replicated tensor
    from the first rank of its stage)."""
    from mexc.backends.reference.executor import run
    from mexc.frontends.trtllm import lift_trtllm

    return run(lift_trtllm(out), PROMPTS)


def test_nan_and_inf_are_named(capsys, outputs, tmp_path):
    out = copy(outputs, "hf", tmp_path)
    f = out / "model.safetensors"
    set_f32(f, "model.norm.weight", 7, math.nan)
    set_f32(f, "lm_head.weight", 130, math.inf)
    set_f32(f, "lm_head.weight", 131, -math.inf)
    for t in ("model.norm.weight", "lm_head.weight"):
        resign(out, "model.safetensors", t)
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1
    assert fail_lines(stdout) == [
        "FAIL model.safetensors: tensor lm_head.weight: 2 NaN/Inf value(s), the first at flat index 130",
        "FAIL model.safetensors: tensor model.norm.weight: 1 NaN/Inf value(s), the first at flat index 7"]


def test_onnx_external_data_is_checked(capsys, outputs, tmp_path):
    import onnx

    out = copy(outputs, "onnx", tmp_path)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ext = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    t = max(ext, key=lambda t: int({e.key: e.value for e in t.external_data}["length"]))
    loc = {e.key: e.value for e in t.external_data}
    write_at(out / loc["location"], int(loc["offset"]) + 12, b"\x01\x02\x03")
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1
    assert fail_lines(stdout) == [f"FAIL model.onnx.data: tensor {t.name}: checksum differs from the manifest "
                                  "(its bytes changed after compile)"]


def _truncate(out):
    f = out / "rank1.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _truncate_deep(out):
    f = out / "rank1.safetensors"
    f.write_bytes(f.read_bytes()[:-60000])


def _drop_rank(out):
    (out / "rank1.safetensors").unlink()


def _extra_rank(out):
    shutil.copy(out / "rank0.safetensors", out / "rank2.safetensors")


def _rewrite(out, change):
    from safetensors.torch import load_file, save_file

    t = load_file(out / "rank1.safetensors")
    change(t)
    save_file(t, out / "rank1.safetensors", {"format": "pt"})


def _extra_tensor(out):
    _rewrite(out, lambda t: t.update({"transformer.extra.weight": torch.ones(3)}))


def _missing_tensor(out):
    _rewrite(out, lambda t: t.pop("transformer.ln_f.weight"))


def _bad_header(out):
    write_at(out / "rank1.safetensors", 8, b"{garbage")


def _outside(out):
    m = json.loads((out / "mexc-manifest.json").read_text())
    m["files"]["../rank0.safetensors"] = m["files"]["rank0.safetensors"]
    (out / "mexc-manifest.json").write_text(json.dumps(m))


def _fifo(out):
    import os

    (out / "rank1.safetensors").unlink()
    os.mkfifo(out / "rank1.safetensors")


@pytest.mark.parametrize("break_it,needles", [
    (_truncate, ["FAIL rank1.safetensors: tensor", "truncated"]),
    (_truncate_deep, ["FAIL rank1.safetensors: tensor", "truncated; ", "more tensor(s) after it are cut too"]),
    (_drop_rank, ["FAIL rank1.safetensors: missing (the manifest lists 17 tensors in it)"]),
    (_extra_rank, ["FAIL rank2.safetensors: weight file not in the manifest"]),
    (_extra_tensor, ["FAIL rank1.safetensors: tensor transformer.extra.weight: not in the manifest"]),
    (_missing_tensor, ["FAIL rank1.safetensors: tensor transformer.ln_f.weight: missing from the file"]),
    (_bad_header, ["FAIL rank1.safetensors: header is not valid JSON"]),
    (_outside, ["FAIL mexc-manifest.json: lists '../rank0.safetensors', which is not a file inside the output"]),
    (_fifo, ["FAIL rank1.safetensors: is not a regular file"]),
], ids=lambda v: v.__name__.strip("_") if callable(v) else "")
def test_damaged_trtllm_output(capsys, outputs, tmp_path, break_it, needles):
    out = copy(outputs, "trtllm", tmp_path)
    break_it(out)
    rc, stdout, err = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1 and not err, stdout + err
    fails = fail_lines(stdout)
    assert len(fails) == 1, stdout
    for n in needles:
        assert n in fails[0], (n, stdout)
    assert "logits: not compared" in stdout


def test_bf16_onnx_is_one_clear_line(capsys, tmp_path):
    out = tmp_path / "bf16"
    assert main(["compile", str(EXAMPLE), "--target", "onnx", "--dtype", "bfloat16", "-o", str(out), "--quiet"]) == 0
    rc, stdout, err = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1 and "NaN/Inf: OK" in stdout
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bfloat16" in errors[0] and "Traceback" not in err


def test_damaged_manifest_is_one_clear_line(capsys, outputs, tmp_path):
    out = copy(outputs, "hf", tmp_path)
    (out / "mexc-manifest.json").write_text('{"target": "hf", "mod')
    rc, _, err = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 1 and err.startswith("error: ") and "mexc-manifest.json: not valid JSON" in err


def test_against_another_checkpoint_is_named(capsys, outputs, tmp_path):
    twin = tmp_path / "copy-of-example"
    shutil.copytree(EXAMPLE, twin)
    rc, stdout, _ = mexc(capsys, "verify", outputs["hf"], "--against", twin)
    assert rc == 0 and f"note: --against {twin} (iteration 10) is not the recorded source" in stdout
    for rank in ("00", "01"):  # another model: its final norm doubled (our own fixture file, so a full load)
        pt = twin / "iter_0000010" / f"mp_rank_{rank}" / "model_optim_rng.pt"
        sd = torch.load(pt, weights_only=False)
        sd["model"]["decoder.final_layernorm.weight"].mul_(2.0)
        torch.save(sd, pt)
    rc, stdout, _ = mexc(capsys, "verify", outputs["hf"], "--against", twin)
    assert rc == 1 and "is not the recorded source" in stdout and "NaN/Inf: OK" in stdout
    assert stdout.strip().splitlines()[-1].endswith("FAIL (--against is not the recorded source)")


@pytest.mark.parametrize("code", sorted(NONFINITE))
def test_nonfinite_bit_patterns_match_torch(code):
    tdt = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[code]
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tdt.itemsize]
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4096 * tdt.itemsize,), dtype=torch.uint8, generator=g)
    t = raw.view(tdt)
    if tdt.itemsize > 1:  # random bits rarely hit an all-ones exponent: plant some
        t[::97] = float("nan")
        t[5::101] = float("inf")
    else:
        t.view(bits)[::97] = 0x7F
    want = (~torch.isfinite(t.float() if tdt.itemsize == 1 else t)).nonzero().flatten()
    n, first = _nonfinite(code, memoryview(t.view(torch.uint8).numpy()))
    assert n == want.numel() > 0 and first == want[0].item()


def test_checksums_stream_in_bounded_memory(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "big.safetensors"
    big = torch.zeros(24 << 20)  # 96 MiB of float32
    save_file({"big": big}, f)
    expected = {"big": xxhash.xxh3_128_hexdigest(big.numpy().tobytes())}
    del big
    spans, why = safetensors_spans(f)
    assert why is None and spans[0].length == 96 << 20
    report = Report()
    tracemalloc.start()
    try:
        check_file(f, f.name, spans, expected, report, bytearray(CHUNK))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.bytes == 96 << 20
    assert peak < 4 * CHUNK < (96 << 20) / 2, peak


def test_safetensors_header_parser_agrees_with_the_library(outputs):
    from safetensors import safe_open

    f = outputs["trtllm"] / "rank0.safetensors"
    spans, why = safetensors_spans(f)
    assert why is None
    raw = f.read_bytes()
    with safe_open(f, "pt") as h:
        assert sorted(s.name for s in spans) == sorted(h.keys())
        for s in spans:
            t = h.get_tensor(s.name)
            assert np.array_equal(np.frombuffer(raw[s.offset:s.offset + s.length], np.uint8),
                                  t.contiguous().view(torch.uint8).reshape(-1).numpy())


def test_the_iteration_dir_and_its_save_dir_are_one_source(capsys, tmp_path):
    """Compiled from ``iter_0000010`` and verified against the save dir (or a copy elsewhere): only the copy is
    "not the recorded source"."""
    out = tmp_path / "hf"
    assert main(["compile", str(EXAMPLE / "iter_0000010"), "--target", "hf", "-o", str(out), "--quiet"]) == 0
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", EXAMPLE)
    assert rc == 0 and "not the recorded source" not in stdout
    shutil.copytree(EXAMPLE, tmp_path / "copy")
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", tmp_path / "copy")
    assert rc == 0 and "not the recorded source" in stdout
