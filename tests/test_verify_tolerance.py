"""`mexc verify`'s default bound scales with the reference logits (tools/verify.py ``TOLERANCE``): correct
bfloat16 outputs pass, wrong ones the former fixed bound (0.2 absolute, against logits of ~0.6) let through
FAIL. Oracles: mexc's float32 reference interpreter on the source, transformers (hf) / mexc's TensorRT-LLM
reader (trtllm) on the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_fixtures import megatron_checkpoint
from mexc.tools.cli import main
from mexc.tools.verify import top1_check
from test_verify import resign

OLD_BOUND = 0.2


def mexc(capsys, *args):
    capsys.readouterr()
    rc = main([*map(str, args)])
    return rc, capsys.readouterr().out


def verify_json(capsys, out: Path, ckpt: Path) -> tuple[int, dict]:
    rc, stdout = mexc(capsys, "verify", out, "--against", ckpt, "--json")
    return rc, json.loads(stdout)


@pytest.mark.parametrize("kind,args", [
    ("llama", ["--target", "hf"]),
    ("qwen2-moe", ["--target", "hf"]),
    ("mla-q", ["--target", "hf"]),
    ("softmax-scale", ["--target", "trtllm", "--tp", "2"]),
])
def test_correct_bf16_outputs_pass(capsys, tmp_path, kind, args):
    ck = megatron_checkpoint(kind) / "ckpt"
    out = tmp_path / "o"
    assert mexc(capsys, "compile", ck, *args, "--dtype", "bfloat16", "-o", out, "--quiet")[0] == 0
    rc, res = verify_json(capsys, out, ck)
    assert rc == 0 and res["ok"], res
    assert res["tolerance"] == pytest.approx(max(5e-3, 2 ** -5 * res["reference_max_abs"]))
    assert res["tolerance_source"].startswith("bfloat16: max(0.005, 0.0312 x max |reference logits|")
    assert res["top1_clear_positions"] > 0 and res["top1_clear_disagree"] == 0
    rc, stdout = mexc(capsys, "verify", out, "--against", ck)
    assert "x max |reference logits|" in stdout and "reference top-2 margin exceeds the tolerance" in stdout


def test_bf16_output_without_its_sliding_window_fails(capsys, tmp_path):
    ck = megatron_checkpoint("window") / "ckpt"
    out = tmp_path / "o"
    assert mexc(capsys, "compile", ck, "--target", "hf", "--dtype", "bfloat16", "-o", out, "--quiet",
                "--set", "window_size=null")[0] == 0
    m = json.loads((out / "mexc-manifest.json").read_text())
    m["frontend"].pop("set")   # as a compile that dropped the window on its own would have recorded it
    (out / "mexc-manifest.json").write_text(json.dumps(m))
    rc, res = verify_json(capsys, out, ck)
    assert rc == 1 and not res["ok"]
    assert res["tolerance"] < res["max_abs_delta"] < OLD_BOUND, res


def test_corrupted_bf16_output_fails(capsys, tmp_path):
    """Layer 1's MLP output zeroed in the stored weights, checksums re-signed (a compile bug)."""
    from safetensors.torch import load_file, save_file

    ck = megatron_checkpoint("llama") / "ckpt"
    out = tmp_path / "o"
    assert mexc(capsys, "compile", ck, "--target", "hf", "--dtype", "bfloat16", "-o", out, "--quiet")[0] == 0
    t = load_file(out / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"].zero_()
    save_file(t, out / "model.safetensors", {"format": "pt"})
    for name in t:
        resign(out, "model.safetensors", name)
    rc, res = verify_json(capsys, out, ck)
    assert rc == 1 and res["artifact"]["ok"] and not res["ok"]
    assert res["tolerance"] < res["max_abs_delta"] < OLD_BOUND, res


def test_top1_must_agree_where_the_reference_margin_exceeds_the_tolerance():
    ref = torch.tensor([[[1.0, 0.5, 0.0], [0.50, 0.45, 0.0]]])
    got = torch.tensor([[[0.7, 0.8, 0.0], [0.45, 0.50, 0.0]]])   # |delta| <= 0.3 everywhere
    # position 0: margin 0.5 > 0.35 and the output picks another token; position 1: near-tied, not judged
    assert top1_check(got, ref, 0.35) == (0.0, 1, 1)
    assert top1_check(ref, ref, 0.35) == (1.0, 1, 0)
