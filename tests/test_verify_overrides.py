"""`mexc verify` lifts ``--against`` with the compile's ``--set`` / ``--config`` / ``--iteration``, as recorded in
the manifest's ``frontend`` record: an output is reproducible from its manifest. The oracle is the source lifted
with the same fields (mexc's reference interpreter) on one side and transformers on the output on the other; the
sliding-window fixture's saved window changes its logits, so a verify that dropped the flags would FAIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_fixtures import megatron_checkpoint
from mexc.tools.cli import main


def mexc(capsys, *args):
    capsys.readouterr()
    rc = main([*map(str, args)])
    o = capsys.readouterr()
    return rc, o.out, o.err


@pytest.fixture(scope="module")
def window():
    return megatron_checkpoint("window") / "ckpt"


def manifest(out: Path) -> dict:
    return json.loads((out / "mexc-manifest.json").read_text())


def test_set_is_recorded_and_reapplied(capsys, window, tmp_path):
    out = tmp_path / "o"
    assert mexc(capsys, "compile", window, "--target", "hf", "-o", out, "--quiet", "--set", "window_size=[0,0]")[0] == 0
    fe = manifest(out)["frontend"]
    assert fe["set"] == {"window_size": [0, 0]} and fe["iteration"] is None and "config" not in fe
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", window)
    assert rc == 0, stdout
    assert "as compiled with --set window_size=[0,0]" in stdout and stdout.rstrip().endswith(": OK")
    # the record is what makes it pass: without it, --against keeps its saved window and the logits differ
    m = manifest(out)
    m["frontend"].pop("set")
    (out / "mexc-manifest.json").write_text(json.dumps(m))
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", window)
    assert rc == 1 and stdout.rstrip().endswith(": FAIL"), stdout


def test_config_content_and_iteration_are_recorded_and_reapplied(capsys, window, tmp_path):
    cfg = tmp_path / "fix.yaml"
    cfg.write_text("window_size: [0, 0]\n")
    out = tmp_path / "o"
    assert mexc(capsys, "compile", window, "--target", "hf", "-o", out, "--quiet", "--config", cfg,
                "--iteration", "10")[0] == 0
    fe = manifest(out)["frontend"]
    assert fe["config"] == {"path": str(cfg.resolve()), "fields": {"window_size": [0, 0]}} and fe["iteration"] == 10
    cfg.unlink()   # verify uses the content recorded at compile time, not the file
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", window, "--json")
    res = json.loads(stdout)
    assert rc == 0 and res["ok"], stdout
    assert res["compile_flags"] == f"--config {cfg.resolve()} --iteration 10"


def test_set_after_config_wins_as_at_compile_time(capsys, window, tmp_path):
    cfg = tmp_path / "fix.yaml"
    cfg.write_text("window_size: [2, 0]\n")
    out = tmp_path / "o"
    assert mexc(capsys, "compile", window, "--target", "hf", "-o", out, "--quiet", "--config", cfg,
                "--set", "window_size=[0,0]")[0] == 0
    rc, stdout, _ = mexc(capsys, "verify", out, "--against", window)
    assert rc == 0 and f"as compiled with --config {cfg.resolve()} --set window_size=[0,0]" in stdout, stdout
