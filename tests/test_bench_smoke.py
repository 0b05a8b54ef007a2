"""The compile benchmark end to end on the tiny preset (both checkpoint formats, trtllm and hf): figures are
present and sane. No timing assertions: this machine's speed is not the subject."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from mexc.tools.synth_checkpoint import PRESETS, write_checkpoint


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_synthetic_checkpoint_lifts_and_runs(tmp_path, fmt):
    from mexc.backends.reference.executor import run
    from mexc.frontends.megatron import lift

    p = PRESETS["tiny"]
    model = lift(write_checkpoint("tiny", tmp_path / "ckpt", fmt, tp=2))
    assert model.meta.get("format") == fmt
    assert model.config.num_layers == p.num_layers
    assert model.param_count() == p.param_count(2)
    logits = run(model, torch.tensor([[1, 2, 3, 4, 5]]))
    assert logits.shape[-1] == p.padded_vocab(2)
    assert torch.isfinite(logits).all()


def test_legacy_layout_matches_megatron(tmp_path):
    """Per-rank shard shapes and stage-local layer numbers of a TP2 PP2 legacy save."""
    p = PRESETS["tiny"]
    root = write_checkpoint("tiny", tmp_path / "ckpt", "torch", tp=2, pp=2)
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    d = root / "iter_0000001"
    assert sorted(x.name for x in d.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                   "mp_rank_01_001"]
    first = torch.load(d / "mp_rank_01_000" / "model_optim_rng.pt", weights_only=False)
    last = torch.load(d / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 1
    a = first["args"]
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size, a.params_dtype) == (2, 2, torch.bfloat16)
    m, H, d_ = first["model"], p.hidden_size, p.kv_channels
    assert m["embedding.word_embeddings.weight"].shape == (p.padded_vocab(2) // 2, H)
    assert m["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (
        (p.num_attention_heads + 2 * p.num_query_groups) * d_ // 2, H)
    assert m["decoder.layers.0.self_attention.linear_proj.weight"].shape == (H, p.num_attention_heads * d_ // 2)
    assert m["decoder.layers.0.mlp.linear_fc1.weight"].shape == (p.ffn_hidden_size, H)
    assert m["decoder.layers.0.mlp.linear_fc2.weight"].shape == (H, p.ffn_hidden_size // 2)
    assert m["decoder.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert "decoder.layers.1.input_layernorm.weight" not in m and "output_layer.weight" not in m
    assert "decoder.layers.0.input_layernorm.weight" in last["model"] and "output_layer.weight" in last["model"]
    assert all(torch.isfinite(t.float()).all() for t in m.values() if isinstance(t, torch.Tensor))


def test_bench_tiny_end_to_end(tmp_path):
    out_json = tmp_path / "bench.json"
    workdir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "mexc.tools.bench", "--preset", "tiny", "--formats", "torch,torch_dist",
         "--targets", "trtllm,hf", "--workdir", str(workdir), "--json", str(out_json), "--no-drop-caches"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    # the printed table: a row per format x (cp, trtllm, hf) with the figures filled in
    for fmt in ("torch", "torch_dist"):
        for target in ("cp -r", "trtllm", "hf"):
            row = re.search(rf"^{fmt}\s+{re.escape(target)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                            rf"\s+([\d.]+)", text, re.M)
            assert row, f"no {fmt}/{target} row in:\n{text}"
    assert "RSS goal" in text and "largest tensor" in text
    report = json.loads(out_json.read_text())
    assert report["machine"]["direct_io"] in (True, False)
    (res,) = report["results"]
    assert res["preset"] == "tiny" and res["largest_tensor_bytes"] > 0
    for fmt in ("torch", "torch_dist"):
        fr = res["formats"][fmt]
        assert fr["source_bytes"] > 0 and fr["cp"]["gbps"] > 0
        # the disk ceiling read every source byte and wrote at least as many, in the same run (where the file
        # system takes O_DIRECT; elsewhere the reason is recorded)
        dd = fr.get("dd")
        assert dd or "dd" in fr["dd_error"]
        if dd:
            assert dd["read_bytes"] == fr["source_bytes"] <= dd["write_bytes"] and dd["wall_s"] > 0
        for target in ("trtllm", "hf"):
            run = fr["runs"][target]
            assert run["rc"] == 0, run.get("error")
            assert run["bytes"] > 0.9 * 2 * PRESETS["tiny"].param_count(2)  # every weight, bf16
            assert run["wall_s"] > 0 and run["gbps"] > 0 and run["ratio_cp"] > 0
            assert run["throughput_ok"] == (run["ratio_cp"] >= 1.0)
            if dd:
                assert run["ratio_dd"] > 0 and run["disk_ok"] == (run["ratio_dd"] <= 1.3)
            assert 0 < run["peak_rss"] < 64e9
            # the embedding / head, written without Megatron's padding rows (no tokenizer: the saved vocab)
            assert 0.9 * res["largest_tensor_bytes"] < run["largest_output_tensor_bytes"] <= res["largest_tensor_bytes"]
    assert not workdir.exists() or not any(workdir.iterdir()), "bench data left behind"
