"""Checkpoint layouts Megatron-LM writes that the hand-built fixtures never had (issue 20): 8-digit iterations,
release/ without args (with --config / --set), two directories for one rank, torch_dcp, NeMo layouts; each is
read exactly (megatron-core's logits) or refused with one line naming the fix."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from megatron_fixtures import load_reference, megatron_checkpoint
from mexc.backends.reference.executor import run
from mexc.errors import CheckpointError
from mexc.frontends.megatron import lift, open_checkpoint


def _copy(d, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", dst)
    return dst


def _max_diff(model, d) -> float:
    ref = load_reference(d)
    return (run(model, ref["tokens"]) - ref["logits"]).abs().max().item()


def test_eight_digit_iteration_without_tracker(tmp_path):
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    ck = _copy(d, tmp_path)
    (ck / "iter_0000010").rename(ck / "iter_00000010")
    (ck / "latest_checkpointed_iteration.txt").unlink()
    assert open_checkpoint(ck).iteration == 10
    assert _max_diff(lift(ck), d) < 1e-5
    (ck / "latest_checkpointed_iteration.txt").write_text("10")  # the tracker names it by number
    assert _max_diff(lift(ck, iteration=10), d) < 1e-5


def _strip_args(ck):
    fields = None
    for f in sorted(ck.glob("*/mp_rank_*/model_optim_rng.pt")):
        sd = torch.load(f, weights_only=False)
        fields = vars(sd.pop("args"))
        torch.save(sd, f)
    return fields


def test_release_without_args_needs_and_takes_the_architecture(tmp_path):
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    ck = _copy(d, tmp_path)
    (ck / "iter_0000010").rename(ck / "release")
    (ck / "latest_checkpointed_iteration.txt").write_text("release")
    args = _strip_args(ck)
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "no saved args" in e.value.message and "--config" in e.value.hint
    import argparse
    import dataclasses

    from mexc.frontends.megatron.config import from_args

    # what `mexc inspect` of the same model shows: the architecture fields (scalars), not the parallel layout
    arch = dataclasses.asdict(from_args(argparse.Namespace(**args), "args"))
    fields = {k: v for k, v in arch.items() if isinstance(v, (int, float, str, bool)) and k not in ("tp", "pp", "ep", "vp")}
    (tmp_path / "arch.yaml").write_text(yaml.safe_dump(fields))
    model = lift(ck, config=tmp_path / "arch.yaml")
    assert model.meta["source_tp"] == 2
    assert _max_diff(model, d) < 1e-5


def test_two_directories_for_one_rank_are_named(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=2, pp=1, fmt="torch"), tmp_path)
    it = ck / "iter_0000010"
    shutil.copytree(it / "mp_rank_00", it / "mp_rank_00_000")  # pp=1 ep=1: the same rank twice
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "mp_rank_00 and mp_rank_00_000" in e.value.message


def test_absurd_parallel_sizes_are_refused_quickly(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=2, pp=1, fmt="torch"), tmp_path)
    for f in sorted(ck.glob("*/mp_rank_*/model_optim_rng.pt")):
        sd = torch.load(f, weights_only=False)
        sd["args"].tensor_model_parallel_size = 10 ** 9
        torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "tensor_model_parallel_size" in e.value.message


def test_plain_dcp_checkpoint_is_named_torch_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp

    it = tmp_path / "ckpt" / "iter_0000010"
    dcp.save({"model.embedding.word_embeddings.weight": torch.zeros(4, 2)}, checkpoint_id=str(it), no_dist=True)
    with pytest.raises(CheckpointError) as e:
        lift(tmp_path / "ckpt")
    assert "torch_dcp" in e.value.message and "torch_dist" in e.value.hint


def test_symlinked_rank_file_outside_the_checkpoint_is_refused(tmp_path):
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    ck = _copy(d, tmp_path)
    f = ck / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    outside = tmp_path / "elsewhere.pt"
    f.rename(outside)
    f.symlink_to(outside)
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "outside the checkpoint" in e.value.message


def test_rank_file_replaced_after_lift_is_an_error_not_a_crash(tmp_path):
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    ck = _copy(d, tmp_path)
    model = lift(ck)
    f = ck / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[: len(data) // 2])  # a new, shorter file: touching the old mapping's pages would SIGBUS
    with pytest.raises(CheckpointError) as e:
        for _, _, p in model.graph.params():
            p.source.materialize()
    assert "changed while mexc was reading it" in e.value.message


def test_vocab_size_below_the_saved_vocabulary_is_refused(tmp_path):
    from mexc.backends.base import CompileOptions
    from mexc.driver import compile_checkpoint
    from mexc.errors import UsageError

    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")  # NullTokenizer: 99 ids + eod = 100
    with pytest.raises(UsageError) as e:
        compile_checkpoint(d / "ckpt", tmp_path / "out", CompileOptions(target="hf", vocab_size=50))
    assert "--vocab-size 50" in e.value.message and "100" in e.value.message
    assert not (tmp_path / "out").exists()
