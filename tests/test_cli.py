"""The `mexc` command as a user meets it: bad inputs give one clear error, outputs are atomic, verify works."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_fixtures import megatron_checkpoint
from mexc.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent


def mexc(*args):
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def assert_clean_error(r, *needles):
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


@pytest.fixture(scope="module")
def llama():
    return megatron_checkpoint("llama", tp=2) / "ckpt"


def copy_ckpt(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_help_shows_examples():
    r = mexc("--help")
    assert r.returncode == 0 and "example:" in r.stdout
    for cmd in ("compile", "inspect", "passes", "verify"):
        r = mexc(cmd, "--help")
        assert r.returncode == 0 and "example:" in r.stdout, cmd


def test_compile_inspect_and_verify_the_example(tmp_path):
    ex = ROOT / "examples" / "llama-tiny"
    out = tmp_path / "hf"
    r = mexc("compile", ex, "--target", "hf", "--vocab-size", "101", "-o", out, "--json")  # NullTokenizer 100 + eod
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["target"] == "hf" and summary["bytes"] > 0 and "trim-vocab{size=101}" in summary["pipeline"]
    r = mexc("verify", out, "--against", ex)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    r = mexc("inspect", ex, "--json")
    info = json.loads(r.stdout)
    assert info["format"] == "torch" and info["parallel"]["tp"] == 2 and info["parameters"] == 90432
    r = mexc("inspect", ex, "--layers")
    assert "attention" in r.stdout and "qkv:f32[128,64]" in r.stdout


def test_verify_catches_a_wrong_output(tmp_path, llama):
    out = tmp_path / "trt"
    assert mexc("compile", llama, "--target", "trtllm", "--tp", "2", "-o", out, "--quiet").returncode == 0
    assert mexc("verify", out, "--against", llama).returncode == 0
    from safetensors.torch import load_file, save_file

    f = out / "rank1.safetensors"
    t = load_file(f)
    t["transformer.layers.1.mlp.proj.weight"] = t["transformer.layers.1.mlp.proj.weight"] * 3
    save_file(t, f)
    r = mexc("verify", out, "--against", llama, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["ok"] is False
    r = mexc("inspect", out, "--ir")  # a TensorRT-LLM checkpoint lifts back into the IR
    assert r.returncode == 0 and 'load(trt, "rank1.safetensors:transformer.layers.1.mlp.proj.weight"' in r.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "iterations", "missing-rank", "truncated-pt",
                                  "unknown-pass", "bad-pipeline", "tp0", "tp-negative", "tp-text", "exists",
                                  "vocab-tp", "kv-tp", "unknown-target"])
def test_bad_input_corpus(case, tmp_path, llama):
    out = tmp_path / "out"
    args = ["compile", llama, "--target", "trtllm", "-o", out]
    needles = []
    if case == "missing":
        args[1], needles = tmp_path / "nope", ["no such file or directory"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[1], needles = tmp_path / "empty", ["no Megatron checkpoint here"]
    elif case == "iterations":
        ck = copy_ckpt(llama, tmp_path)
        shutil.copytree(ck / "iter_0000010", ck / "iter_0000011")
        (ck / "latest_checkpointed_iteration.txt").unlink()
        args[1], needles = ck, ["2 iterations", "--iteration"]
    elif case == "missing-rank":
        ck = copy_ckpt(llama, tmp_path)
        shutil.rmtree(ck / "iter_0000010" / "mp_rank_00")
        args[1], needles = ck, ["mp_rank_00", "copy"]
    elif case == "truncated-pt":
        ck = copy_ckpt(llama, tmp_path)
        f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
        f.write_bytes(f.read_bytes()[:3000])
        args[1], needles = ck, [str(f), "corrupt or truncated"]
    elif case == "unknown-pass":
        args += ["--pipeline", "make-it-fast"]
        needles = ["unknown pass 'make-it-fast'", "mexc passes"]
    elif case == "bad-pipeline":
        args += ["--pipeline", "reshard{tp=2"]
        needles = ["malformed pipeline"]
    elif case == "tp0":
        args += ["--tp", "0"]
        needles = ["--tp", "positive integer"]
    elif case == "tp-negative":
        args += ["--pp", "-2"]
        needles = ["--pp"]
    elif case == "tp-text":
        args += ["--tp", "two"]
        needles = ["--tp"]
    elif case == "exists":
        out.mkdir()
        needles = ["already exists", "--force"]
    elif case == "vocab-tp":
        args += ["--tp", "3"]
        needles = ["--tp 3 does not divide 4 attention heads / 2 KV heads; use --tp 1, 2 or 4"]
    elif case == "kv-tp":
        args[1] = megatron_checkpoint("llama", tp=1) / "ckpt"
        args += ["--tp", "4", "--pipeline", "reshard{tp=4}"]  # before relayout: grouped QKV over 4 ranks
        needles = ["relayout-qkv{to=concat}"]
    elif case == "unknown-target":
        args[3], needles = "tflite", ["invalid choice"]
    r = mexc(*args)
    assert_clean_error(r, *needles)
    if case != "exists":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".mexc-tmp-" in p.name]


def test_unknown_architecture_tensor_is_named(tmp_path):
    ck = copy_ckpt(megatron_checkpoint("llama", tp=1) / "ckpt", tmp_path)
    f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["model"]["decoder.layers.0.self_attention.linear_gate.weight"] = torch.zeros(2, 2)
    torch.save(sd, f)
    assert_clean_error(mexc("compile", ck, "--target", "hf", "-o", tmp_path / "o"), "linear_gate.weight")


def test_args_missing_fields(tmp_path):
    ck = copy_ckpt(megatron_checkpoint("llama", tp=1) / "ckpt", tmp_path)
    f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    del sd["args"].hidden_size
    torch.save(sd, f)
    r = mexc("inspect", ck)
    assert_clean_error(r, "hidden_size", "--config")
    cfg = tmp_path / "fix.yaml"
    cfg.write_text("hidden_size: 64\n")
    assert mexc("inspect", ck, "--config", cfg).returncode == 0
    r = mexc("inspect", ck, "--set", "hidden_size=64", "--set", "vocab_size=120", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["vocab_size"] == 120
    assert_clean_error(mexc("inspect", ck, "--set", "hidden_size=64", "--set", "heads_of_hydra=9"), "heads_of_hydra")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_no_space_or_no_permission_leaves_nothing(tmp_path, llama, monkeypatch, capsys, err):
    import mexc.backends.trtllm as trt

    real = trt.write_safetensors

    def failing(path, *a, **k):
        if path.name == "rank1.safetensors":
            raise OSError(err, os.strerror(err))
        return real(path, *a, **k)

    monkeypatch.setattr(trt, "write_safetensors", failing)
    out = tmp_path / "o"
    rc = main(["compile", str(llama), "--target", "trtllm", "--tp", "2", "-o", str(out)])
    e = capsys.readouterr().err
    assert rc != 0 and "error:" in e and "nothing was left behind" in e
    assert ("free some disk space" in e) if err == errno.ENOSPC else ("permissions" in e)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["sigterm", "sigint", "exception"])
def test_interrupted_compile_leaves_no_partial_output(tmp_path, llama, monkeypatch, capsys, how):
    import mexc.backends.base as base

    real = base.write_safetensors
    state = {"n": 0}

    def interrupting(path, entries, metadata=None, on_tensor=None, cancel=None):
        def hook(name, n):
            state["n"] += 1
            if state["n"] == 5:
                if how == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif how == "sigint":
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise RuntimeError("disk controller on fire")
        return real(path, entries, metadata, hook, cancel=cancel)

    import mexc.backends.trtllm as trt

    monkeypatch.setattr(trt, "write_safetensors", interrupting)
    out = tmp_path / "o"
    old = signal.getsignal(signal.SIGTERM)
    old_int = signal.getsignal(signal.SIGINT)
    # a shell starts background jobs with SIGINT ignored (and mexc, like any Unix tool, keeps an inherited
    # ignore): give this process Python's default so the test does not depend on how it was launched
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if how == "exception":   # a bug: its traceback, one error line, exit 3 (errors.EXIT_INTERNAL)
            rc = main(["compile", str(llama), "--target", "trtllm", "-o", str(out), "--jobs", "1"])
            err = capsys.readouterr().err
            assert rc == 3 and "RuntimeError: disk controller on fire" in err and "Traceback" in err
            assert err.splitlines()[-2].startswith("error: internal error in mexc")
        else:
            rc = main(["compile", str(llama), "--target", "trtllm", "-o", str(out), "--jobs", "1"])
            assert rc == 130 and "interrupted" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
    assert state["n"] >= 5
    assert list(tmp_path.iterdir()) == []


def test_passes_lists_every_pass_with_options():
    r = mexc("passes")
    for name in ("relayout-qkv", "reshard", "lower-dtype", "quantize", "canonicalize", "dce", "fuse-qkv",
                 "split-qkv", "trim-vocab"):
        assert name in r.stdout
    assert "tp:int=1" in r.stdout
    r = mexc("passes", "reshard")
    assert r.returncode == 0 and "parallel-embedding: bool = false" in r.stdout and "KV heads replicated" in r.stdout


def test_draw_dot_and_svg(tmp_path, llama):
    f = tmp_path / "g.dot"
    r = mexc("inspect", llama, "--draw", f)
    assert r.returncode == 0
    text = f.read_text()
    assert text.startswith("digraph") and 'attention[1]' in text and "->" in text
    svg = tmp_path / "g.svg"
    assert mexc("inspect", llama, "--draw", svg).returncode == 0
    import xml.etree.ElementTree as ET

    root = ET.parse(svg).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    labels = [t.text for t in root.iter(ns + "text")]
    assert len(labels) == 15 and labels[0].startswith("embedding") and labels[-1].startswith("lm_head")
    assert len(list(root.iter(ns + "path"))) >= 4  # residual skip edges


def test_shell_completion_script_completes_targets(tmp_path):
    r = mexc("completion", "bash")
    assert r.returncode == 0
    script = tmp_path / "c.sh"
    script.write_text(r.stdout)
    probe = subprocess.run(["bash", "-c", f'source {script}; COMP_WORDS=(mexc compile x --target ""); '
                            'COMP_CWORD=4; _mexc; echo "${COMPREPLY[@]}"'], capture_output=True, text=True)
    assert probe.stdout.split() == ["trtllm", "hf", "onnx", "tensorrt"]


def test_output_that_is_or_contains_the_checkpoint_is_refused(tmp_path):
    ck = copy_ckpt(megatron_checkpoint("llama", tp=1) / "ckpt", tmp_path)
    for out in (ck, tmp_path):
        r = mexc("compile", ck, "--target", "trtllm", "-o", out, "--force")
        assert_clean_error(r, "is the checkpoint or contains it")
    assert (ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def test_user_reshard_that_contradicts_the_target_layout(tmp_path, llama):
    r = mexc("compile", llama, "--target", "trtllm", "-o", tmp_path / "o", "--pipeline", "reshard{tp=2}")
    assert_clean_error(r, "--tp 1", "reshard")


def test_verify_tolerance_follows_the_written_dtype_and_quantization(tmp_path, llama):
    out = tmp_path / "bf16"
    assert mexc("compile", llama, "--target", "hf", "-o", out, "--pipeline", "lower-dtype{to=bf16}").returncode == 0
    r = mexc("verify", out, "--against", llama, "--json")
    res = json.loads(r.stdout)   # relative to the reference logits, with a floor (tools/verify.py TOLERANCE)
    assert r.returncode == 0 and res["tolerance"] == max(5e-3, 2 ** -5 * res["reference_max_abs"])
    out = tmp_path / "q"
    assert mexc("compile", llama, "--target", "onnx", "-o", out, "--quant", "int8-wo").returncode == 0
    r = mexc("verify", out, "--against", llama, "--json")
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res["tolerance"] == 0.05 and res["max_abs_delta"] > 1e-4
