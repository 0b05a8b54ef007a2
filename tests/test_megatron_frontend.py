"""The Megatron frontend on real megatron-core checkpoints: logits of the lifted IR equal megatron-core's."""

import shutil

import pytest
import torch

from megatron_fixtures import load_reference, megatron_checkpoint
from mexc import ir
from mexc.backends.reference.executor import run
from mexc.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from mexc.frontends.megatron import lift, open_checkpoint

MATRIX = [(kind, tp, pp, fmt) for kind in ("llama", "gpt") for (tp, pp) in ((1, 1), (2, 1), (1, 2), (2, 2))
          for fmt in ("torch", "torch_dist")]
EXTRA = [("moe", 1, 1, "torch"), ("moe", 2, 1, "torch_dist"), ("mqa", 1, 2, "torch"), ("qwen", 2, 1, "torch")]


@pytest.mark.slow
@pytest.mark.parametrize("kind,tp,pp,fmt", MATRIX + EXTRA, ids=lambda v: str(v))
def test_lifted_logits_equal_megatron_core(kind, tp, pp, fmt):
    d = megatron_checkpoint(kind, tp=tp, pp=pp, fmt=fmt)
    ref = load_reference(d)
    model = lift(d / "ckpt")
    assert model.meta["format"] == fmt and model.meta["source_tp"] == tp and model.meta["source_pp"] == pp
    got = run(model, ref["tokens"])
    assert got.shape == ref["logits"].shape
    assert (got - ref["logits"]).abs().max().item() < 1e-5
    assert ir.parse(str(model)) is not None and str(ir.parse(str(model))) == str(model)


def test_lift_reads_no_tensor_data(monkeypatch):
    """Lifting opens legacy files memory-mapped and records keys; no tensor storage is touched.

    Proof: we replace every tensor's bytes in the files with garbage of the same size; lifting still
    succeeds and gives the same IR text, while materializing a weight shows the garbage."""
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    model = lift(d / "ckpt")
    reads = []
    for store in model.stores.values():
        orig = store.read
        monkeypatch.setattr(store, "read", lambda k, t, orig=orig: reads.append(k) or orig(k, t))
    # a fresh lift with a counting read never calls read
    from mexc.frontends.megatron import reader

    calls = []
    monkeypatch.setattr(reader.MegatronTorchStore, "read", lambda self, k, t: calls.append(k))
    monkeypatch.setattr(reader.DcpStore, "read", lambda self, k, t: calls.append(k))
    again = lift(d / "ckpt")
    d2 = megatron_checkpoint("llama", tp=1, pp=2, fmt="torch_dist")
    lift(d2 / "ckpt")
    assert calls == [] and reads == []
    assert str(again) == str(model)


def test_dist_lift_does_not_open_distcp_files(monkeypatch):
    import builtins

    d = megatron_checkpoint("gpt", tp=1, pp=2, fmt="torch_dist")
    opened = []
    real_open = builtins.open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", spy)
    model = lift(d / "ckpt")
    monkeypatch.setattr(builtins, "open", real_open)
    assert not [f for f in opened if f.endswith(".distcp")]
    assert model.param_count() > 0


def test_gated_fc1_halves_are_split_per_tp_shard():
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    mlp = lift(d / "ckpt").node("mlp", 0)
    text = str(mlp.params["gate"].source)
    assert "mp_rank_00" in text and "mp_rank_01" in text and "stop=64" in text


def _copy(d, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", dst)
    return dst


def test_missing_tp_rank_is_named(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=2, pp=1, fmt="torch"), tmp_path)
    shutil.rmtree(ck / "iter_0000010" / "mp_rank_01")
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "mp_rank_01" in e.value.message and e.value.hint


def test_truncated_pt_file_is_named(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=2, pp=1, fmt="torch"), tmp_path)
    f = ck / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    f.write_bytes(f.read_bytes()[: 5000])
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert str(f) in e.value.message


def test_truncated_distcp_is_named_when_read(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=1, pp=2, fmt="torch_dist"), tmp_path)
    files = sorted((ck / "iter_0000010").glob("*.distcp"))
    for f in files:
        f.write_bytes(f.read_bytes()[: 1000])
    model = lift(ck)  # metadata only: still fine
    with pytest.raises(CheckpointError) as e:
        for _, _, p in model.graph.params():
            p.source.materialize()
    assert ".distcp" in e.value.message and "truncated" in e.value.message


def test_shapes_that_disagree_across_ranks(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=2, pp=1, fmt="torch"), tmp_path)
    f = ck / "iter_0000010" / "mp_rank_01" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["model"]["decoder.layers.0.self_attention.linear_proj.weight"] = torch.zeros(64, 16)
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "mp_rank_01" in e.value.message and "proj.weight" in e.value.message


def test_unknown_key_is_an_error_that_lists_it(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=1, pp=1, fmt="torch"), tmp_path)
    f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["model"]["decoder.layers.0.mystery_adapter.weight"] = torch.zeros(4, 4)
    torch.save(sd, f)
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "decoder.layers.0.mystery_adapter.weight" in e.value.message


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/mexc-pwned",))


def test_pickle_payload_in_model_file_never_runs(tmp_path):
    import os

    ck = _copy(megatron_checkpoint("llama", tp=1, pp=1, fmt="torch"), tmp_path)
    f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["rng_state"] = Payload()
    torch.save(sd, f)
    if os.path.exists("/tmp/mexc-pwned"):
        os.remove("/tmp/mexc-pwned")
    with pytest.raises(UnsafeCheckpointError) as e:
        lift(ck)
    assert str(f) in e.value.message
    assert not os.path.exists("/tmp/mexc-pwned")


def test_pickle_payload_in_common_pt_never_runs(tmp_path):
    import os

    ck = _copy(megatron_checkpoint("llama", tp=1, pp=2, fmt="torch_dist"), tmp_path)
    f = ck / "iter_0000010" / "common.pt"
    state = torch.load(f, weights_only=False)
    state["evil"] = Payload()
    torch.save(state, f)
    with pytest.raises(UnsafeCheckpointError):
        lift(ck)
    assert not os.path.exists("/tmp/mexc-pwned")


def test_args_with_megatron_enums_load_without_megatron():
    info = open_checkpoint(megatron_checkpoint("llama", tp=1, pp=1, fmt="torch") / "ckpt")
    assert info.format == "torch" and info.iteration == 10
    assert info.args.hidden_size == 64


def test_config_override_fixes_wrong_args(tmp_path):
    d = megatron_checkpoint("llama", tp=1, pp=1, fmt="torch")
    cfg = tmp_path / "fix.yaml"
    cfg.write_text("vocab_size: 120\n")
    assert lift(d / "ckpt", config=cfg).config.vocab_size == 120
    cfg.write_text("num_kv_heads: 3\n")
    with pytest.raises(ConfigError):
        lift(d / "ckpt", config=cfg)


def test_missing_dir_empty_dir_and_ambiguous_iterations(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        lift(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no Megatron checkpoint here"):
        lift(tmp_path / "empty")
    ck = _copy(megatron_checkpoint("llama", tp=1, pp=1, fmt="torch"), tmp_path)
    shutil.copytree(ck / "iter_0000010", ck / "iter_0000020")
    (ck / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(CheckpointError) as e:
        lift(ck)
    assert "--iteration" in e.value.hint
    assert lift(ck, iteration=20).meta["iteration"] == 10  # the file's own iteration field
