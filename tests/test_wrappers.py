"""NeMo 2 directories, .nemo archives (NeMo 1 and NeMo 2 inside, read in place) and Megatron-Bridge saves around
real megatron-core torch_dist checkpoints (tests/wrapper_fixtures.py): compiled to --target hf, transformers'
logits equal megatron-core's (fp32, 1e-4); settings without a lifted form, hostile archives and other backends are
one clear error naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import wrapper_fixtures as W
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.backends.reference.executor import run  # noqa: E402
from mexc.driver import compile_checkpoint, lift  # noqa: E402
from mexc.errors import CheckpointError, ConfigError, MexcError  # noqa: E402
from mexc.ir import parse, print_model  # noqa: E402

TOL = 1e-4


def err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    V = min(a.shape[-1], b.shape[-1])
    return (a[..., :V] - b[..., :V]).abs().max().item()


def hf_logits(ckpt: Path, out: Path, tokens) -> torch.Tensor:
    compile_checkpoint(ckpt, out, CompileOptions(target="hf"))
    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    with torch.no_grad():
        return model.eval()(tokens).logits


CASES = {
    "nemo2-dir-llama": lambda tmp: W.nemo2_dir("llama", tmp / "nemo2"),
    "nemo2-dir-moe": lambda tmp: W.nemo2_dir("moe", tmp / "nemo2"),
    "nemo2-dir-llama31": lambda tmp: W.nemo2_dir("llama3", tmp / "nemo2"),
    "nemo1-archive-gpt-tp2": lambda tmp: W.nemo1_archive("gpt", tmp / "gpt.nemo", tp=2),
    "nemo2-archive-llama": lambda tmp: W.nemo1_archive("llama", tmp / "llama.nemo", inner="nemo2"),
    "bridge-llama": lambda tmp: W.bridge_save("llama", tmp / "bridge"),
    "bridge-gpt-tp2": lambda tmp: W.bridge_save("gpt", tmp / "bridge", tp=2),
    "bridge-model-config-llama": lambda tmp: W.bridge_save("llama", tmp / "bridge", form="model-config"),
    "bridge-model-config-gpt": lambda tmp: W.bridge_save("gpt", tmp / "bridge", form="model-config"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_output_matches_megatron(tmp_path, case):
    ckpt, d = CASES[case](tmp_path)
    ref = load_reference(d)
    assert err(hf_logits(ckpt, tmp_path / "hf", ref["tokens"]), ref["logits"]) < TOL
    m = lift(ckpt)
    assert "unknown_args" not in m.meta  # every field of the dumped TransformerConfig has a verdict
    rope = next(m.graph.find("attention")).attrs["rope"]
    if case.endswith("llama31"):  # the logits barely move at 8 positions: check the scaling itself
        assert (rope.scaling, rope.factor, rope.base) == ("llama3", 8.0, 500000.0)
    else:
        assert rope.scaling == "none"
    cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    h = json.loads((d / "fixture.json").read_text())["hparams"]
    assert cfg.num_hidden_layers == h["num_layers"]
    assert cfg.tie_word_embeddings == (not h["untie_embeddings_and_output_weights"])


@pytest.mark.parametrize("kind", ["llama", "gpt"])
def test_checkpoint_written_by_nemo_matches_megatron(tmp_path, kind):
    """A whole NeMo 2 checkpoint written by NeMo 2.7.3's own MegatronCheckpointIO and TrainerContext (committed,
    tests/fixture_makers/nemo_checkpoint.py) with megatron-core's logits from the same process: as a directory and
    packed as a .nemo tar, through hf and transformers."""
    d = W.REAL_NEMO_CONTEXT / f"{kind}-checkpoint"
    root = next(d.glob("megatron_gpt--*"))
    ref = load_file(d / "reference.safetensors")
    assert json.loads((d / "made-by.json").read_text())["keys"][0].startswith("module.")
    assert err(hf_logits(root, tmp_path / "hf", ref["tokens"]), ref["logits"]) < TOL
    packed = tmp_path / "packed.nemo"
    with tarfile.open(packed, "w:") as tar:
        tar.add(root, arcname=".")
    assert err(hf_logits(packed, tmp_path / "hf-packed", ref["tokens"]), ref["logits"]) < TOL
    assert lift(root).meta["iteration"] == 9


def test_configs_are_the_tools_own():
    """The NeMo 2 contexts and Megatron-Bridge run configs the tests read were written by NeMo / Megatron-Bridge
    (tests/data/wrappers/README.md), and the fixture builders use them."""
    for kind in ("llama", "gpt", "llama3", "moe"):
        d = W.REAL_NEMO_CONTEXT / kind
        assert json.loads((d / "made-by.json").read_text())["nemo_toolkit"] == "2.7.3"
        assert (d / "context" / "io.json").is_file() and (d / "context" / "model.yaml").is_file()
    for kind in ("llama", "gpt"):
        d = W.REAL_BRIDGE_CONFIG / kind
        assert json.loads((d / "made-by.json").read_text())["megatron_bridge"] == "0.3.1"
        cfg = yaml.safe_load((d / "run_config.yaml").read_text())
        assert cfg["_target_"] == "megatron.bridge.training.config.ConfigContainer"
        assert cfg["model"]["_target_"] == "megatron.bridge.models.gpt_provider.GPTModelProvider"


def test_other_entry_points(tmp_path):
    """The iter_ directory of a Bridge save, the weights/ directory of a NeMo 2 checkpoint and an unpacked NeMo 1
    directory read the same weights."""
    root, d = W.bridge_save("llama", tmp_path / "bridge")
    ref = load_reference(d)
    assert err(run(lift(root / "iter_0000010"), ref["tokens"]), ref["logits"]) < TOL
    root, d = W.nemo2_dir("llama", tmp_path / "nemo2")
    m = lift(root / "weights")
    assert m.meta["iteration"] == 9 and err(run(m, ref["tokens"]), ref["logits"]) < TOL
    nemo, d = W.nemo1_archive("gpt", tmp_path / "gpt.nemo")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(nemo) as tar:
        tar.extractall(unpacked, filter="data")
    ref = load_reference(d)
    assert err(run(lift(unpacked), ref["tokens"]), ref["logits"]) < TOL


def test_tokenizer_the_wrapper_saved_is_carried(tmp_path):
    """Megatron-Bridge's iter_N/tokenizer/ (its run_config names a path not on this machine) and NeMo 2's
    context/nemo_tokenizer/ end up in the output as HF tokenizer files."""
    import shutil

    tok = Path(__file__).resolve().parent.parent / "examples" / "llama-tiny-tokenizer"  # 100 tokens, HF files
    root, _ = W.bridge_save("llama", tmp_path / "bridge")
    it = root / "iter_0000010"
    shutil.copytree(tok, it / "tokenizer")
    cfg = yaml.safe_load((it / "run_config.yaml").read_text())
    cfg["tokenizer"].update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/lustre/run/tokenizer")
    (it / "run_config.yaml").write_text(yaml.safe_dump(cfg))
    n2, _ = W.nemo2_dir("llama", tmp_path / "nemo2")
    shutil.copytree(tok, n2 / "context" / "nemo_tokenizer")
    m = yaml.safe_load((n2 / "context" / "model.yaml").read_text())
    m["tokenizer"] = {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                      "pretrained_model_name": "nemo_tokenizer"}
    (n2 / "context" / "model.yaml").write_text(yaml.safe_dump(m))
    for ckpt in (root, n2):
        out = tmp_path / f"hf-{ckpt.name}"
        compile_checkpoint(ckpt, out, CompileOptions(target="hf"))
        got = transformers.AutoTokenizer.from_pretrained(out)
        assert len(got) == 100 and got("hello world").input_ids == \
            transformers.AutoTokenizer.from_pretrained(tok)("hello world").input_ids


def test_archive_store_round_trips_through_ir_text(tmp_path):
    """The IR text names the tar store by archive, member dir and prefix; parsed back, it reads the same weights."""
    nemo, d = W.nemo1_archive("llama", tmp_path / "llama.nemo", inner="nemo2")
    text = print_model(lift(nemo))
    assert "megatron-dist-tar(" in text and "module." in text
    ref = load_reference(d)
    assert err(run(parse(text), ref["tokens"]), ref["logits"]) < TOL


def test_verify_against_an_archive(tmp_path):
    nemo, _ = W.nemo1_archive("gpt", tmp_path / "gpt.nemo")
    compile_checkpoint(nemo, tmp_path / "hf", CompileOptions(target="hf"))
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "verify", str(tmp_path / "hf"), "--against", str(nemo)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- refusals


def _nemo2_with(tmp_path, **changes):
    root, _ = W.nemo2_dir("llama", tmp_path / "n2")
    p = root / "context" / "model.yaml"
    cfg = yaml.safe_load(p.read_text())
    for k, v in changes.items():
        if k == "_model_target_":
            cfg["_target_"] = v
        else:
            cfg["config"][k] = v
    p.write_text(yaml.safe_dump(cfg))
    return root


@pytest.mark.parametrize("change,words", [
    ({"window_size": [16, 4]}, "window_size"),     # a right window ((L, 0) is honoured)
    ({"activation_func": {"_target_": "torch.nn.functional.relu", "_call_": False}}, "activation_func"),
    ({"transformer_layer_spec": {"_target_": "my.module.custom_spec", "_call_": False}}, "transformer_layer_spec"),
    ({"_target_": "nemo.collections.llm.gpt.model.gemma.GemmaConfig"}, "GemmaConfig"),
    ({"_model_target_": "nemo.collections.llm.t5.model.t5.T5Model"}, "T5Model"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm"),
    ({"heterogeneous_block_specs": True}, "heterogeneous_block_specs"),
    ({"hidden_size": None}, "no hidden_size"),
    ({"position_embedding_type": "mrope"}, "position_embedding_type"),
    ({"_target_": "nemo.collections.llm.gpt.model.llama.Llama31Config", "high_freq_factor": 2.0}, "high_freq_factor"),
])
def test_nemo2_settings_without_a_lifted_form_are_refused(tmp_path, change, words):
    root = _nemo2_with(tmp_path, **change)
    with pytest.raises(ConfigError) as e:
        lift(root)
    assert words in e.value.message and "context/model.yaml" in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize("change,words", [
    ({"headscale": True}, "headscale"), ({"mcore_gpt": False}, "mcore_gpt"), ({"activation": "reglu"}, "reglu"),
    ({"position_embedding_type": "alibi"}, "alibi"), ({"transformer_block_type": "normformer"}, "normformer"),
    ({"max_position_embeddings": "${multiply:2,${.encoder_seq_length}}"}, "interpolation"),
])
def test_nemo1_settings_without_a_lifted_form_are_refused(tmp_path, change, words):
    d = megatron_checkpoint("gpt", fmt="torch_dist")
    nemo, _ = W.nemo1_archive("gpt", tmp_path / "x.nemo", config={**W.nemo1_config(d), **change})
    with pytest.raises(ConfigError) as e:
        lift(nemo)
    assert words in e.value.message and "model_config.yaml" in e.value.message


def test_bridge_setting_and_format_refusals(tmp_path):
    root, d = W.bridge_save("llama", tmp_path / "b")
    cfgp = root / "iter_0000010" / "run_config.yaml"
    cfg = yaml.safe_load(cfgp.read_text())
    cfg["model"]["apply_residual_connection_post_layernorm"] = True
    cfgp.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm"):
        lift(root)
    cfg["model"]["apply_residual_connection_post_layernorm"] = False
    cfg["checkpoint"]["ckpt_format"] = "fsdp_dtensor"
    cfgp.write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="fsdp_dtensor"):
        lift(root)
    cfgp.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        lift(root)


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:") as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else __import__("io").BytesIO(data))
    return path


def _file(name, data=b"x"):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return i, data


@pytest.mark.parametrize("bad,words", [
    ("dotdot", "'..' name"), ("absolute", "absolute"), ("symlink", "not a plain file"), ("device", "not a plain file"),
    ("twice", "appears twice"), ("truncated", "past the end"), ("gzip", "compressed"),
])
def test_hostile_archives_are_refused(tmp_path, bad, words):
    good, _ = W.nemo1_archive("gpt", tmp_path / "good.nemo")
    with tarfile.open(good) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    p = tmp_path / "bad.nemo"
    if bad == "dotdot":
        _tar_with(p, members + [_file("./model_weights/../../evil")])
    elif bad == "absolute":
        _tar_with(p, members + [_file("/etc/evil")])
    elif bad in ("symlink", "device"):
        i = tarfile.TarInfo("./model_weights/link")
        i.type, i.linkname = (tarfile.SYMTYPE, "/etc/passwd") if bad == "symlink" else (tarfile.CHRTYPE, "")
        _tar_with(p, members + [(i, None)])
    elif bad == "twice":
        _tar_with(p, members + [_file("./model_config.yaml", b"num_layers: 1")])
    elif bad == "truncated":
        data = good.read_bytes()
        big = max((m for m, _ in members if m.isreg()), key=lambda m: m.size)
        p.write_bytes(data[:big.offset_data + big.size // 2])
    else:
        import gzip

        p.write_bytes(gzip.compress(good.read_bytes()))
    with pytest.raises(CheckpointError) as e:
        lift(p)
    assert words in e.value.message and str(p) in e.value.message


@pytest.mark.parametrize("text,words", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in
                                                         zip("abcdefg", "bcdefgh")) + "model: *h\n", "YAML nodes"),
    ("model: " + "[" * 100000 + "]" * 100000 + "\n", "not valid YAML"),
])
def test_hostile_config_files_are_refused(tmp_path, text, words):
    """An alias bomb (10^8 nodes as shared references) and absurd nesting are one error, not a hang or a crash."""
    root, _ = W.bridge_save("llama", tmp_path / "b")
    (root / "iter_0000010" / "run_config.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        lift(root)
    assert words in e.value.message and "run_config.yaml" in e.value.message


def test_zarr_weights_and_io_json_only_are_refused(tmp_path):
    root, _ = W.nemo2_dir("llama", tmp_path / "n2")
    (root / "weights" / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(CheckpointError, match="zarr"):
        lift(root)
    root, _ = W.nemo2_dir("llama", tmp_path / "n2b")
    (root / "context" / "model.yaml").unlink()
    (root / "context" / "io.json").write_text("{}")
    with pytest.raises(CheckpointError, match="io.json"):
        lift(root)


def test_cli_prints_one_error_line(tmp_path):
    root = _nemo2_with(tmp_path, window_size=[16, 4])
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "compile", str(root), "--target", "hf", "-o",
                        str(tmp_path / "out")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 1 and "window_size" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_plain_megatron_saves_are_not_taken_for_wrappers(tmp_path):
    from mexc.frontends.megatron.wrappers import open_wrapped

    d = megatron_checkpoint("llama", fmt="torch_dist")
    assert open_wrapped(d / "ckpt") is None and open_wrapped(d / "ckpt" / "iter_0000010") is None
    with pytest.raises(MexcError, match="no such"):
        lift(tmp_path / "missing.nemo")
