"""The TensorRT-LLM target: outputs read back by an independent reader (tests/trtllm_reader.py, which follows
TensorRT-LLM's documented semantics and knows nothing of mexc), then run by `transformers`."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import trtllm_reader
from megatron_fixtures import load_reference, megatron_checkpoint
from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import BackendError, ToolNotFoundError, UsageError
from mexc.passes import PassManager, parse_pipeline

SOURCES = {
    "llama-tp2-legacy": ("llama", 2, 1, "torch"),
    "gpt-pp2-dist": ("gpt", 1, 2, "torch_dist"),
    "moe": ("moe", 1, 1, "torch"),
    "mqa-pp2": ("mqa", 1, 2, "torch"),
}
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def compile_to(tmp_path, src, **kw):
    kind, tp, pp, fmt = SOURCES[src]
    d = megatron_checkpoint(kind, tp=tp, pp=pp, fmt=fmt)
    out = tmp_path / f"{src}-{kw.get('tp', 1)}-{kw.get('pp', 1)}"
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", **kw))
    return d, out, res


@pytest.mark.slow
@pytest.mark.parametrize("src", list(SOURCES))
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=lambda v: str(v))
def test_trtllm_output_reproduces_megatron_logits(tmp_path, src, tp, pp):
    kw = dict(tp=tp, pp=pp)
    if src == "moe" and tp == 2:
        kw["ep"] = 2
    d, out, res = compile_to(tmp_path, src, **kw)
    ref = load_reference(d)
    cfg, tensors = trtllm_reader.read_checkpoint(str(out))  # refuses a config check_config finds fault with
    got = trtllm_reader.logits(str(out), ref["tokens"])
    want = ref["logits"][..., : got.shape[-1]]
    # TensorRT-LLM's "gelu" is the tanh approximation; Megatron's is exact erf: a small, stated difference
    tol = 1e-3 if src.startswith("gpt") else 1e-4
    assert (got - want).abs().max().item() < tol
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "mexc-manifest.json"] + [f"rank{r}.safetensors" for r in range(tp * pp)]


def test_gpt_gelu_difference_is_only_the_tanh_approximation(tmp_path):
    d, out, _ = compile_to(tmp_path, "gpt-pp2-dist", tp=2)
    ref = load_reference(d)
    model = lift(d / "ckpt")
    for n in model.graph.find("mlp"):
        n.attrs["activation"] = "gelu-tanh"
    got = trtllm_reader.logits(str(out), ref["tokens"])
    assert (got - run(model, ref["tokens"])[..., : got.shape[-1]]).abs().max().item() < 1e-5


def test_config_fields_trtllm_requires(tmp_path):
    _, out, _ = compile_to(tmp_path, "mqa-pp2", tp=2, pp=3)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "LlamaForCausalLM"
    assert cfg["mapping"] == {"world_size": 6, "tp_size": 2, "pp_size": 3, "cp_size": 1, "moe_tp_size": 2,
                              "moe_ep_size": 1}
    assert cfg["num_key_value_heads"] == 1 and cfg["head_size"] == 32  # kv_channels, not hidden/heads
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_act"] == "silu"
    assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["rotary_base"] == 10000.0
    assert cfg["dtype"] == "float32" and cfg["logits_dtype"] == "float32"
    # uneven PP: stages get layers [0,1], [2], [3]; layer keys are stage-local; ln_f/lm_head on the last
    names = []
    for r in range(6):
        with safe_open(out / f"rank{r}.safetensors", "pt") as f:
            names.append(set(f.keys()))
    assert "transformer.vocab_embedding.weight" in names[0] and "transformer.vocab_embedding.weight" not in names[2]
    assert "transformer.layers.1.attention.qkv.weight" in names[0]
    assert "transformer.layers.1.attention.qkv.weight" not in names[2]
    assert "lm_head.weight" in names[4] and "transformer.ln_f.weight" in names[5] and "lm_head.weight" not in names[2]
    with safe_open(out / "rank1.safetensors", "pt") as f:
        # per-rank [Q_r; K_r; V_r] with the single KV head replicated: (2 + 2*1) * 32 rows
        assert f.get_slice("transformer.layers.0.attention.qkv.weight").get_shape() == [128, 64]
        assert f.get_slice("transformer.layers.0.attention.dense.weight").get_shape() == [64, 64]


def test_moe_config_and_layout(tmp_path):
    _, out, _ = compile_to(tmp_path, "moe", tp=2, ep=2)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_act"] == "swiglu"
    assert cfg["moe"]["num_experts"] == 4 and cfg["moe"]["top_k"] == 2 and cfg["moe"]["normalization_mode"] == 1
    assert cfg["mapping"]["moe_ep_size"] == 2 and cfg["mapping"]["moe_tp_size"] == 1
    with safe_open(out / "rank0.safetensors", "pt") as f:
        assert f.get_slice("transformer.layers.0.mlp.fc.weight").get_shape() == [2, 128, 64]
        assert f.get_tensor("transformer.layers.0.mlp.router.weight").dtype == torch.float32


def test_vocab_trim_and_lm_head_padding(tmp_path):
    # below the checkpoint's 100 ids --vocab-size is refused; an explicit trim-vocab pass may still cut
    d, out, _ = compile_to(tmp_path, "llama-tp2-legacy", tp=2, pipeline="trim-vocab{size=99}")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 99
    with safe_open(out / "rank1.safetensors", "pt") as f:
        head = f.get_tensor("lm_head.weight")
    assert head.shape == (50, 64) and torch.all(head[-1] == 0)  # 99 -> padded to 100 for tp=2
    ref = load_reference(d)
    tokens = ref["tokens"] % 99
    got = trtllm_reader.logits(str(out), tokens)
    model = lift(d / "ckpt")
    PassManager(parse_pipeline("trim-vocab{size=99}"))(model)
    assert got.shape[-1] == 99
    assert (got - run(model, tokens)).abs().max().item() < 1e-4


def test_bf16_output_within_tolerance(tmp_path):
    d, out, _ = compile_to(tmp_path, "llama-tp2-legacy", tp=2, dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    with safe_open(out / "rank0.safetensors", "pt") as f:
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.bfloat16
    ref = load_reference(d)
    got = trtllm_reader.logits(str(out), ref["tokens"])
    assert got.shape[-1] == 100 and cfg["vocab_size"] == 100   # padding trimmed: the args' 99 ids + eod
    assert (got - ref["logits"][..., :100]).abs().max().item() < 2e-2


@pytest.mark.parametrize("quant,algo", [("int8-wo", "W8A16"), ("int4-wo", "W4A16")])
def test_weight_only_quant_is_left_to_trtllm_build(tmp_path, quant, algo):
    d, out, res = compile_to(tmp_path, "llama-tp2-legacy", tp=2, quant=quant, dtype="float16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == algo and cfg["quantization"]["exclude_modules"] == ["lm_head"]
    assert any("trtllm-build quantizes" in n for n in res.notes)
    ref = load_reference(d)
    got = trtllm_reader.logits(str(out), ref["tokens"])  # the reader emulates trtllm-build's quantization
    rel = (got - ref["logits"][..., :100]).abs().max().item() / ref["logits"].abs().max().item()
    assert rel < (3e-2 if quant == "int8-wo" else 3e-1)


def test_fp8_is_refused_with_a_reason(tmp_path):
    with pytest.raises(BackendError) as e:
        compile_to(tmp_path, "llama-tp2-legacy", quant="fp8")
    assert "calibration" in e.value.message
    assert not (tmp_path / "llama-tp2-legacy-1-1").exists()


def test_engine_build_is_never_faked(tmp_path):
    _, out, res = compile_to(tmp_path, "llama-tp2-legacy")
    assert any("trtllm-build --checkpoint_dir" in n and "not installed" in n for n in res.notes)
    assert not (out / "engines").exists()
    with pytest.raises(ToolNotFoundError) as e:
        compile_to(tmp_path, "gpt-pp2-dist", build="always")
    assert "trtllm-build --checkpoint_dir" in e.value.hint and "nothing was written" in e.value.message
    assert not (tmp_path / "gpt-pp2-dist-1-1").exists()


def test_existing_output_is_refused_then_replaced_with_force(tmp_path):
    d = megatron_checkpoint("llama", tp=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UsageError, match="already exists"):
        compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm"))
    with pytest.raises(UsageError, match="not a mexc output"):   # --force replaces only an earlier output
        compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", force=True))
    assert (out / "keep").exists()
    shutil.rmtree(out)
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=2))
    (out / "keep").write_text("x")
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", force=True))
    assert not (out / "keep").exists() and not (out / "rank1.safetensors").exists()
    assert (out / "rank0.safetensors").exists()


def test_outputs_are_deterministic(tmp_path):
    d = megatron_checkpoint("gpt", tp=1, pp=2, fmt="torch_dist")
    a, b = tmp_path / "a", tmp_path / "b"
    for o in (a, b):
        compile_checkpoint(d / "ckpt", o, CompileOptions(target="trtllm", tp=2))
    for f in sorted(p.name for p in a.iterdir()):
        if f == "mexc-manifest.json":
            continue
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = (json.loads((x / "mexc-manifest.json").read_text()) for x in (a, b))
    assert ma["files"] == mb["files"] and ma["pipeline"] == mb["pipeline"]


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_parallel_embedding_keeps_the_trimmed_vocab(tmp_path, dtype):
    d, out, _ = compile_to(tmp_path, "llama-tp2-legacy", tp=2, pipeline="trim-vocab{size=99}",
                        parallel_embedding=True, dtype=dtype)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 99 and cfg["use_parallel_embedding"]  # also when lower-dtype casts the padding
    with safe_open(out / "rank1.safetensors", "pt") as f:
        assert f.get_slice("transformer.vocab_embedding.weight").get_shape() == [50, 64]
    if dtype:
        return  # the fp32 case checks the logits; bf16 is the config question
    tokens = load_reference(d)["tokens"] % 99
    got = trtllm_reader.logits(str(out), tokens)
    model = lift(d / "ckpt")
    PassManager(parse_pipeline("trim-vocab{size=99}"))(model)
    assert got.shape[-1] == 99 and (got - run(model, tokens)).abs().max().item() < 1e-4


# ------------------------------------------------------------------------ verify reads every class it writes


def corrupt_scale(out, file: str, tensor: str, factor: float) -> None:
    """Multiply an F32 tensor of ``file`` by ``factor`` in place and re-sign the manifest, so that only the
    logits check (mexc's reader of the class) can see the change."""
    import struct

    from test_verify import resign, st_region, write_at

    off, length, dtype, _ = st_region(out / file, tensor)
    assert dtype == "F32"
    with open(out / file, "rb") as f:
        f.seek(off)
        vals = struct.unpack(f"<{length // 4}f", f.read(length))
    write_at(out / file, off, struct.pack(f"<{len(vals)}f", *(v * factor for v in vals)))
    resign(out, file, tensor)


@pytest.mark.parametrize("kind,tp", [("gemma", 1), ("gemma", 2), ("falcon", 1), ("falcon2", 1)])
def test_verify_reads_gemma_and_falcon_classes(tmp_path, capsys, kind, tp):
    """A correct Gemma / Falcon output passes `mexc verify` (once a false FAIL and a crash: the reader knew only
    Llama/GPT); a corrupted one fails on its logits."""
    from mexc.tools.cli import main

    d = megatron_checkpoint(kind)
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, build="never"))
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0, capsys.readouterr().out
    text = capsys.readouterr().out
    assert "trtllm: max |delta logits|" in text and "OK" in text
    corrupt_scale(out, "rank0.safetensors", "transformer.layers.0.attention.dense.weight", 3.0)
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "FAIL" in x]
    assert lines and all("checksum" not in x for x in lines), lines


def test_reader_refuses_a_class_mexc_does_not_write(tmp_path):
    from mexc.errors import CheckpointError
    from mexc.frontends.trtllm import lift_trtllm

    d = megatron_checkpoint("llama")
    out = tmp_path / "trt"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", build="never"))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(cfg | {"architecture": "BloomForCausalLM"}))
    with pytest.raises(CheckpointError, match="BloomForCausalLM.*not a class mexc's trtllm target writes"):
        lift_trtllm(out)


def test_every_class_is_one_file_with_rules_rows_and_reader():
    """The class tables the writer uses are the ones the reader inverts: every row's tensor name is unique per
    (role, params) and every class can say what it cannot express."""
    from mexc.backends.trtllm import describe
    from mexc.backends.trtllm.classes import REGISTRY

    names = [c.name for c in REGISTRY]
    assert names == ["DeepseekV2ForCausalLM", "GemmaForCausalLM", "FalconForCausalLM", "Phi3ForCausalLM",
                     "QWenForCausalLM", "LlamaForCausalLM", "GPTForCausalLM"]
    for cls in REGISTRY:
        keys = [(r.role, r.params) for r in cls.rows]
        assert len(keys) == len(set(keys)) and cls.rules and callable(cls.extra["read"])
    text = describe()
    assert "attention.q_layernorm.weight" in text and "mlp_layernorm" in text and "cannot:" in text
