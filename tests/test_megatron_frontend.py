"""The Megatron frontend on real megatron-core checkpoints: logits of the lifted IR equal megatron-core's."""

import shutil
from pathlib import Path

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


def test_truncated_distcp_is_named_at_lift(tmp_path):
    ck = _copy(megatron_checkpoint("llama", tp=1, pp=2, fmt="torch_dist"), tmp_path)
    files = sorted((ck / "iter_0000010").glob("*.distcp"))
    for f in files:
        f.write_bytes(f.read_bytes()[: 1000])
    with pytest.raises(CheckpointError) as e:
        lift(ck)  # the .metadata's byte ranges are checked against the files before anything is read
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
    with pytest.raises(CheckpointError, match="no such file or directory"):
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


# ------------------------------------------------------------------------------ other key layouts of real weights
# These rewrite a real megatron-core checkpoint into the layouts other Megatron versions save (the weights and
# the reference logits stay megatron-core's), then check the lifted logits.


def _rewrite(src_dir, tmp_path, fn, args_update=None):
    ck = _copy(src_dir, tmp_path)
    for f in sorted((ck / "iter_0000010").glob("mp_rank_*/model_optim_rng.pt")):
        sd = torch.load(f, weights_only=False)
        sd["model"] = fn(sd["model"])
        for k, v in (args_update or {}).items():
            setattr(sd["args"], k, v)
        torch.save(sd, f)
    return ck


def test_transformer_engine_key_names(tmp_path):
    import io

    d = megatron_checkpoint("gpt", tp=2)

    def te(sd):
        out = {}
        for k, v in sd.items():
            k = k.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
            k = k.replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
            out[k] = io.BytesIO(b"te-fp8-meta") if k.endswith("_extra_state") else v
        return out

    ck = _rewrite(d, tmp_path, te, {"transformer_impl": "transformer_engine"})
    ref = load_reference(d)
    assert (run(lift(ck), ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


def test_pre_mcore_language_model_names(tmp_path):
    d = megatron_checkpoint("llama", tp=2)
    ren = [("decoder.layers.", "layers."), (".input_layernorm.", ".input_norm."),
           ("self_attention.linear_qkv.", "self_attention.query_key_value."),
           ("self_attention.linear_proj.", "self_attention.dense."), (".pre_mlp_layernorm.", ".post_attention_norm."),
           ("mlp.linear_fc1.", "mlp.dense_h_to_4h."), ("mlp.linear_fc2.", "mlp.dense_4h_to_h."),
           ("decoder.final_layernorm.", "final_norm.")]

    def legacy(sd):
        lm = {"embedding": {"word_embeddings": {"weight": sd["embedding.word_embeddings.weight"]}}, "encoder": {},
              "output_layer": {"weight": sd["output_layer.weight"]}}
        for k, v in sd.items():
            if k.startswith(("embedding.", "output_layer.")) or k.endswith("_extra_state"):
                continue
            for a, b in ren:
                k = k.replace(a, b)
            lm["encoder"][k] = v
        return {"language_model": lm}

    ck = _rewrite(d, tmp_path, legacy, {"use_legacy_models": True})
    ref = load_reference(d)
    model = lift(ck)
    assert "language_model.encoder.layers.1.self_attention.query_key_value.weight" in str(model)
    assert (run(model, ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


def test_virtual_pipeline_chunks(tmp_path):
    """A 4-layer model saved with pp=2, vp=2: stage p, chunk k holds global layer 2k + p as its local layer 0."""
    import re

    d = megatron_checkpoint("mqa", tp=1)
    src = torch.load(d / "ckpt" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    ck = tmp_path / "vp"
    it = ck / "iter_0000010"
    for p in range(2):
        model = {}
        for k in range(2):
            chunk = {}
            g = 2 * k + p
            for key, v in src["model"].items():
                m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
                if m and int(m.group(1)) == g:
                    chunk[f"decoder.layers.0.{m.group(2)}"] = v
                elif key.startswith("embedding.") and p == 0 and k == 0:
                    chunk[key] = v
                elif key.startswith(("decoder.final_layernorm", "output_layer")) and p == 1 and k == 1:
                    chunk[key] = v
            model[f"model{k}"] = chunk
        args = argparse_copy(src["args"], pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
        (it / f"mp_rank_00_{p:03d}").mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 10, **model},
                   it / f"mp_rank_00_{p:03d}" / "model_optim_rng.pt")
    (ck / "latest_checkpointed_iteration.txt").write_text("10")
    ref = load_reference(d)
    lifted = lift(ck)
    assert lifted.meta["source_vp"] == 2
    assert "mp_rank_00_001:model0/decoder.layers.0.self_attention" in str(lifted.node("attention", 1).params["qkv"].source)
    assert (run(lifted, ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


def argparse_copy(ns, **kw):
    import argparse

    d = dict(vars(ns))
    d.update(kw)
    return argparse.Namespace(**d)


def test_malicious_dcp_metadata_is_refused(tmp_path):
    import os
    import pickle

    ck = _copy(megatron_checkpoint("llama", tp=1, pp=2, fmt="torch_dist"), tmp_path)
    meta = ck / "iter_0000010" / ".metadata"
    meta.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UnsafeCheckpointError) as e:
        lift(ck)
    assert "posix.system" in e.value.message or "os.system" in e.value.message
    assert str(meta) in e.value.message
    assert not os.path.exists("/tmp/mexc-pwned")


def test_malicious_common_state_inside_dcp_is_refused(tmp_path):
    """megatron-core >= 0.17 keeps args in a DCP bytes item; its bytes go through the same allow-list."""
    import io
    import os

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from mexc.frontends.megatron.reader import DcpStore

    src = Path(__file__).resolve().parent / "data" / "mcore-0.19.2" / "llama-tp1" / "ckpt"
    ck = tmp_path / "ckpt"
    shutil.copytree(src, ck)
    it = ck / "iter_0000010"
    store = DcpStore("x", str(it))
    key = next(k for k, md in store.metadata.state_dict_metadata.items()
               if isinstance(md, BytesStorageMetadata) and k.startswith("common_state"))
    info = store._chunks(key)[0][2]
    buf = io.BytesIO()
    torch.save([{"args": Payload()}], buf)
    evil = buf.getvalue()
    path = it / info.relative_path
    data = bytearray(path.read_bytes())
    assert len(evil) <= info.length
    end = info.offset + info.length
    data[end - len(evil): end] = evil  # a payload inside the original byte range (a zip is read from its end)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsafeCheckpointError) as e:
        lift(ck)
    assert "common_state" in e.value.message
    assert not os.path.exists("/tmp/mexc-pwned")


def test_moe_grouped_gemm_key_names(tmp_path):
    """TEGroupedMLP saves experts as experts.linear_fc1.weight<j> instead of experts.local_experts.<j>..."""
    import re

    d = megatron_checkpoint("moe", tp=1)

    def grouped(sd):
        out = {}
        for k, v in sd.items():
            m = re.match(r"(.*)\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$", k)
            if m:
                out[f"{m.group(1)}.mlp.experts.{m.group(3)}.weight{m.group(2)}"] = v
            elif "local_experts" not in k:
                out[k] = v
        return out

    ck = _rewrite(d, tmp_path, grouped, {"moe_grouped_gemm": True})
    model = lift(ck)
    assert "mlp.experts.linear_fc1.weight3" in str(model)
    ref = load_reference(d)
    assert (run(model, ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------ what real training runs also save


def test_legacy_file_with_optimizer_and_numpy_rng_state(tmp_path):
    """Megatron-LM saves optimizer state, fp32 masters and rng_state (with np.random.get_state()) by default."""
    import numpy as np

    d = megatron_checkpoint("llama", tp=1)
    ck = _copy(d, tmp_path)
    f = ck / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    sd = torch.load(f, weights_only=False)
    sd["optimizer"] = {"fp32_from_fp16_params": [[torch.zeros(4)]], "optimizer": {"state": {}}}
    sd["opt_param_scheduler"] = {"max_lr": 3e-4}
    sd["rng_state"] = [{"random_rng_state": (3, tuple(range(5)), None), "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state()}]
    torch.save(sd, f)
    ref = load_reference(d)
    assert (run(lift(ck), ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


def test_dist_checkpoint_with_chained_optimizer_state(tmp_path):
    """megatron-core's ChainedOptimizer saves its state under chained_<i>.optimizer.*: not model weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    d = megatron_checkpoint("moe", tp=2, fmt="torch_dist")
    ck = _copy(d, tmp_path)
    it = ck / "iter_0000010"
    dcp_to_torch_save(str(it), str(tmp_path / "full.pt"))
    sd = torch.load(tmp_path / "full.pt", weights_only=False)
    for i in (0, 1):
        sd[f"chained_{i}.optimizer.distributed.dp_group_idx_0.gbuf_idx_0.bucket_idx_0.exp_avg"] = torch.zeros(64)
    for p in it.glob("*.distcp"):
        p.unlink()
    (it / ".metadata").unlink()
    dcp.save(sd, checkpoint_id=str(it), no_dist=True)
    ref = load_reference(d)
    assert (run(lift(ck), ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5


def test_old_non_zip_torch_save_format(tmp_path):
    d = megatron_checkpoint("llama", tp=2)
    ck = _copy(d, tmp_path)
    for f in (ck / "iter_0000010").glob("mp_rank_*/model_optim_rng.pt"):
        sd = torch.load(f, weights_only=False)
        torch.save(sd, f, _use_new_zipfile_serialization=False)
    model = lift(ck)
    ref = load_reference(d)
    for _, _, p in model.graph.params():  # reading and releasing heap tensors must not corrupt them
        p.source.materialize()
        p.source.release()
    assert (run(model, ref["tokens"]) - ref["logits"]).abs().max().item() < 1e-5
